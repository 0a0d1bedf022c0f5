//! The Dify request envelope: the bytes the daemon sends, kept intact.
//!
//! The function must hand the plugin exactly what the daemon sent (unknown fields included),
//! so an [`Envelope`] keeps the raw body and only reads the few fields the runtime needs.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;

use crate::Error;

/// A parsed view over a request envelope that keeps the original bytes.
#[derive(Clone, Debug)]
pub struct Envelope {
    raw: Bytes,
    session_id: String,
    event: String,
    action: Option<String>,
    secrets: Vec<String>,
}

#[derive(Deserialize)]
struct View<'a> {
    #[serde(borrow)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct DataView<'a> {
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(default)]
    credentials: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Envelope {
    /// Parses `raw` as an envelope, checking what the plugin needs to route it.
    pub fn parse(raw: Bytes) -> Result<Self, Error> {
        // Checked whole first: serde skips the fields it does not read without validating
        // their bytes, and the plugin must never get a line its SDK cannot decode.
        let text = std::str::from_utf8(&raw).map_err(|e| {
            Error::Envelope(format!(
                "body is not UTF-8 ({e}); send the Dify request envelope as JSON"
            ))
        })?;
        // serde reads a struct from an array too, by position: only an object is an envelope.
        let is_object = |json: &str| json.trim_start().starts_with('{');
        if !is_object(text) {
            return Err(Error::Envelope(
                "body is not a JSON object; send the Dify request envelope as JSON".into(),
            ));
        }
        let view: View<'_> = serde_json::from_str(text).map_err(|e| {
            Error::Envelope(format!(
                "body is not a JSON object ({e}); send the Dify request envelope as JSON"
            ))
        })?;
        let session_id = match view.session_id {
            Some(s) if !s.is_empty() => s.into_owned(),
            _ => {
                return Err(Error::Envelope(
                    "`session_id` is missing or empty; every envelope needs its session id".into(),
                ));
            }
        };
        let event = view
            .event
            .map(Cow::into_owned)
            .ok_or_else(|| Error::Envelope("`event` is missing; Dify sends \"request\"".into()))?;
        let data = view
            .data
            .ok_or_else(|| Error::Envelope("`data` is missing".into()))?;
        if !is_object(data.get()) {
            return Err(Error::Envelope("`data` is not an object".into()));
        }
        let data: DataView<'_> = serde_json::from_str(data.get())
            .map_err(|e| Error::Envelope(format!("`data` is not an object: {e}")))?;
        let secrets = data
            .credentials
            .into_iter()
            .flat_map(|m| m.into_iter())
            .filter_map(|(_, v)| match v {
                serde_json::Value::String(s) => Some(s),
                _ => None,
            })
            .collect();
        let action = data.action.map(Cow::into_owned);
        Ok(Self {
            raw,
            session_id,
            event,
            action,
            secrets,
        })
    }

    /// The body exactly as received.
    pub fn bytes(&self) -> &Bytes {
        &self.raw
    }

    /// The envelope as one stdin line for a plugin: the original bytes with any raw line
    /// breaks (which valid JSON can only hold as insignificant whitespace) turned into spaces,
    /// followed by `\n`.
    pub fn to_line(&self) -> Bytes {
        let mut line = Vec::with_capacity(self.raw.len() + 1);
        line.extend(
            self.raw
                .iter()
                .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
        );
        line.push(b'\n');
        line.into()
    }

    /// The envelope's `session_id`.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The envelope's `event` (`request` for invocations).
    pub fn event(&self) -> &str {
        &self.event
    }

    /// `data.action`, when present.
    pub fn action(&self) -> Option<&str> {
        self.action.as_deref()
    }

    /// String values of `data.credentials`: what must never appear in logs.
    pub fn secrets(&self) -> &[String] {
        &self.secrets
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = r#"{"session_id":"s1","conversation_id":null,"message_id":null,"app_id":null,"endpoint_id":null,"context":{},"event":"request","data":{"action":"invoke_tool","credential_type":"api-key","credentials":{"api_key":"k-123"},"provider":"p","tool":"t","tool_parameters":{"q":"x"},"type":"tool","user_id":"u","x_unknown":[1,2]}}"#;

    #[test]
    fn parses_and_keeps_bytes() {
        let env = Envelope::parse(Bytes::from_static(BODY.as_bytes())).unwrap();
        assert_eq!(env.session_id(), "s1");
        assert_eq!(env.event(), "request");
        assert_eq!(env.action(), Some("invoke_tool"));
        assert_eq!(env.secrets(), ["k-123"]);
        assert_eq!(env.bytes().as_ref(), BODY.as_bytes());
        assert_eq!(&env.to_line()[..BODY.len()], BODY.as_bytes());
        assert_eq!(env.to_line().last(), Some(&b'\n'));
    }

    /// Found by `fuzz/fuzz_targets/envelope.rs`: bytes that are not UTF-8 inside a field the
    /// runtime does not read were accepted (serde skips such fields unvalidated) and would
    /// have reached the plugin's stdin.
    #[test]
    fn refuses_bytes_that_are_not_utf8_anywhere() {
        let mut body = br#"{"session_id":"s","event":"request","x":""#.to_vec();
        body.extend_from_slice(&[0xfd, 0xfe]);
        body.extend_from_slice(br#"","data":{}}"#);
        let err = Envelope::parse(Bytes::from(body)).unwrap_err().to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    /// Found by the `envelope` fuzz target: serde reads a struct from an array too, by position,
    /// so `"data": ["r"]` gave the action `r` (and a whole array envelope a session id) that the
    /// plugin, reading the JSON, would not see.
    #[test]
    fn arrays_are_not_objects() {
        let data = br#"{"session_id":"s","event":"request","data":["r"]}"#;
        let err = Envelope::parse(Bytes::from_static(data))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`data` is not an object"), "{err}");
        let whole = br#"["s","request",{}]"#;
        let err = Envelope::parse(Bytes::from_static(whole))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a JSON object"), "{err}");
    }

    #[test]
    fn flattens_pretty_json_to_one_line() {
        let body = "{\n \"session_id\": \"s\",\r\n \"event\": \"request\", \"data\": {}\n}";
        let line = Envelope::parse(Bytes::from(body)).unwrap().to_line();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["session_id"], "s");
    }

    #[test]
    fn rejects_what_a_plugin_cannot_route() {
        for (body, needle) in [
            ("not json", "not a JSON object"),
            ("[1]", "not a JSON object"),
            (r#"{"event":"request","data":{}}"#, "session_id"),
            (
                r#"{"session_id":"","event":"request","data":{}}"#,
                "session_id",
            ),
            (r#"{"session_id":"s","data":{}}"#, "`event`"),
            (r#"{"session_id":"s","event":"request"}"#, "`data`"),
            (r#"{"session_id":"s","event":"request","data":3}"#, "`data`"),
        ] {
            let err = Envelope::parse(Bytes::from(body)).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }
}
