//! The SRI event vocabulary and the Dify objects the runtime itself creates.
//!
//! Plugin objects travel verbatim (as the bytes of one JSON line); only `start`, `usage` and
//! errors made by the runtime are built here.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::fmt;
use std::str::FromStr;

/// The kind of an SRI event (the SSE `event:` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// The invocation was accepted: [`StartInfo`].
    Start,
    /// A plugin `session`/`stream` object, verbatim.
    Chunk,
    /// A plugin `log` object, verbatim.
    Log,
    /// A `session`/`error` object: the plugin's verbatim, or one made by the runtime.
    Error,
    /// Resource figures for the invocation: [`Usage`].
    Usage,
    /// The `session`/`end` object; always the last event of a stream.
    End,
}

impl EventKind {
    /// The SSE event name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Chunk => "chunk",
            Self::Log => "log",
            Self::Error => "error",
            Self::Usage => "usage",
            Self::End => "end",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "start" => Self::Start,
            "chunk" => Self::Chunk,
            "log" => Self::Log,
            "error" => Self::Error,
            "usage" => Self::Usage,
            "end" => Self::End,
            other => return Err(format!("unknown SRI event `{other}`")),
        })
    }
}

/// One SRI event: its kind, its sequence number (session data only) and its JSON data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What the event is.
    pub kind: EventKind,
    /// Sequence number (1, 2, … within a stream).
    pub id: Option<u64>,
    /// One line of JSON text.
    pub data: Bytes,
}

impl Event {
    /// Creates an event.
    pub fn new(kind: EventKind, id: Option<u64>, data: impl Into<Bytes>) -> Self {
        Self {
            kind,
            id,
            data: data.into(),
        }
    }

    /// The data parsed as JSON (for consumers that need fields, not bytes).
    pub fn json(&self) -> serde_json::Result<Value> {
        serde_json::from_slice(&self.data)
    }
}

/// Data of the `start` event.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StartInfo {
    /// The envelope's session id.
    pub session_id: String,
    /// The platform's request id (Lambda's, or one made by `serve`).
    pub request_id: String,
    /// Whether this is the first invocation served by this plugin process.
    pub cold_start: bool,
    /// Milliseconds from process start to plugin ready, on a cold start.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub init_ms: Option<u64>,
}

/// Data of the `usage` event and the buffered response's `usage`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Wall time of the invocation, from accepted to the last event.
    pub execution_time_ms: u64,
    /// Peak resident memory of the plugin process (MiB).
    pub memory_used_mb: u64,
    /// Stream chunks relayed.
    pub chunks: u64,
    /// Bytes of stream chunks relayed.
    pub bytes: u64,
    /// Whether the invocation paid a cold start.
    pub cold_start: bool,
}

/// The `error_type`s the runtime itself produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorType {
    /// The plugin process is not (yet, or no longer) able to take requests.
    PluginNotReady,
    /// The plugin process exited while the invocation ran.
    PluginProcessExited,
    /// The invocation outlived its deadline.
    PluginTimeout,
    /// The plugin wrote a line over the limit.
    PluginOutputTooLarge,
    /// The plugin wrote something that is not the Dify stdio protocol.
    PluginProtocolError,
    /// The request body is over the limit.
    PayloadTooLarge,
    /// The request is malformed.
    BadRequest,
}

/// The HTTP status that goes with an error type on the wire: what the function answers when it
/// refuses a call with it, and the `code` of a buffered error. One table, so the bootstrap that
/// answers and the client that reads a bare answer agree. Unknown types are 500.
pub fn http_status(error_type: &str) -> u16 {
    match error_type {
        "Sri.Unauthorized" => 401,
        "NotFound" => 404,
        "PluginTimeout" => 504,
        "PluginNotReady" | "PluginProcessExited" => 503,
        "PluginOutputTooLarge" | "PayloadTooLarge" => 413,
        "PluginProtocolError" => 502,
        "BadRequest" => 400,
        _ => 500,
    }
}

impl ErrorType {
    /// The name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PluginNotReady => "PluginNotReady",
            Self::PluginProcessExited => "PluginProcessExited",
            Self::PluginTimeout => "PluginTimeout",
            Self::PluginOutputTooLarge => "PluginOutputTooLarge",
            Self::PluginProtocolError => "PluginProtocolError",
            Self::PayloadTooLarge => "PayloadTooLarge",
            Self::BadRequest => "BadRequest",
        }
    }
}

impl fmt::Display for ErrorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The most keys a session error's `args` may have: the daemon silently drops an error with
/// more (and reports success), so the runtime never makes one.
pub const MAX_ERROR_ARGS: usize = 10;

/// A Dify `session`/`error` object as one JSON line.
///
/// `args` is flattened to scalars and cut to [`MAX_ERROR_ARGS`] keys.
pub fn session_error(
    session_id: &str,
    error_type: &str,
    message: &str,
    args: Map<String, Value>,
) -> Bytes {
    let args: Map<String, Value> = args
        .into_iter()
        .take(MAX_ERROR_ARGS)
        .map(|(k, v)| match v {
            Value::Object(_) | Value::Array(_) => (k, Value::String(v.to_string())),
            v => (k, v),
        })
        .collect();
    line(json!({
        "event": "session",
        "session_id": session_id,
        "data": {"type": "error", "data": {"error_type": error_type, "message": message, "args": args}},
    }))
}

/// A Dify `session`/`end` object as one JSON line.
pub fn session_end(session_id: &str) -> Bytes {
    line(json!({"event": "session", "session_id": session_id, "data": {"type": "end", "data": {}}}))
}

/// The body of a non-2xx answer, in the shape the daemon reads (`errorType`, `errorMessage`).
pub fn error_body(error_type: &str, message: &str, request_id: Option<&str>) -> Bytes {
    let mut v = json!({"errorType": error_type, "errorMessage": message});
    if let Some(id) = request_id {
        v["requestId"] = Value::String(id.to_owned());
    }
    line(v)
}

fn line(v: Value) -> Bytes {
    serde_json::to_vec(&v)
        .expect("JSON values serialize")
        .into()
}

/// The parts of a session `error` object the runtime reads.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionError {
    /// `error_type`.
    pub error_type: String,
    /// `message`.
    pub message: String,
    /// `args`, as sent.
    pub args: Value,
}

impl SessionError {
    /// Reads a `session`/`error` object (as carried by an `error` event).
    pub fn from_event_data(data: &[u8]) -> Option<Self> {
        let v: Value = serde_json::from_slice(data).ok()?;
        let inner = v.get("data")?.get("data")?;
        Some(Self {
            error_type: inner.get("error_type")?.as_str()?.to_owned(),
            message: inner
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            args: inner.get("args").cloned().unwrap_or(Value::Null),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_error_is_flat_and_small() {
        let mut args = Map::new();
        for i in 0..15 {
            args.insert(format!("k{i:02}"), json!({"nested": i}));
        }
        let line = session_error("s", "PluginTimeout", "late", args);
        let v: Value = serde_json::from_slice(&line).unwrap();
        let args = v["data"]["data"]["args"].as_object().unwrap();
        assert_eq!(args.len(), MAX_ERROR_ARGS);
        assert!(args.values().all(|v| !v.is_object() && !v.is_array()));
        let e = SessionError::from_event_data(&line).unwrap();
        assert_eq!(
            (e.error_type.as_str(), e.message.as_str()),
            ("PluginTimeout", "late")
        );
    }

    #[test]
    fn end_and_error_body_shapes() {
        let v: Value = serde_json::from_slice(&session_end("s")).unwrap();
        assert_eq!(
            v,
            json!({"event":"session","session_id":"s","data":{"type":"end","data":{}}})
        );
        let v: Value = serde_json::from_slice(&error_body("BadRequest", "m", Some("r"))).unwrap();
        assert_eq!(
            v,
            json!({"errorType":"BadRequest","errorMessage":"m","requestId":"r"})
        );
    }
}
