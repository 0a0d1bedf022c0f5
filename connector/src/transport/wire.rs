//! The bytes of the `InvokeWithResponseStream` path that are ours, not the AWS SDK's: the
//! Function URL event the request travels as, and the integration-response prelude (JSON, then
//! 8 NUL bytes) a response may start with. They live apart from the transport that uses them
//! (`invoke_stream`, which needs the AWS SDK), so they build and are fuzzed without it.

use http::HeaderMap;
use serde_json::json;

use super::invoke_query;
use crate::protocol::INVOKE_PATH;

/// The Function URL event carrying an SRI v1 request: `POST /invoke?action=…` with `headers`
/// (the SRI signature headers, `content-type`, `accept`, `traceparent`) and the envelope as the
/// body. A UTF-8 envelope (every JSON one) is sent as text, which round-trips byte for byte
/// through the event's JSON and is smaller than base64; anything else as base64.
pub fn request_event(action: &str, headers: &HeaderMap, envelope: &[u8]) -> Vec<u8> {
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.into())))
        .collect();
    let (body, is_base64) = match std::str::from_utf8(envelope) {
        Ok(text) => (text.to_owned(), false),
        Err(_) => {
            use base64::Engine;
            (
                base64::engine::general_purpose::STANDARD.encode(envelope),
                true,
            )
        }
    };
    let event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": INVOKE_PATH,
        "rawQueryString": invoke_query(action),
        "headers": headers,
        "requestContext": {"http": {"method": "POST", "path": INVOKE_PATH}},
        "body": body,
        "isBase64Encoded": is_base64,
    });
    serde_json::to_vec(&event).expect("a JSON value serialises")
}

/// The longest prelude accepted. Real ones are ~100 bytes; the bound keeps a function that
/// never sends the separator from making the connector buffer without end.
pub const MAX_PRELUDE_BYTES: usize = 64 * 1024;

/// The separator between the prelude and the payload.
pub(crate) const SEPARATOR: [u8; 8] = [0; 8];

/// What the first bytes of a payload say about a prelude.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// No prelude: the payload is SSE from its first byte (SSE never starts with `{`).
    Bare,
    /// A prelude with this status; the payload starts at `body_start`.
    Prelude {
        /// The prelude's `statusCode` (200 when absent).
        status: u16,
        /// Offset of the first payload byte.
        body_start: usize,
    },
}

/// Looks for the prelude at the start of `buf` (all payload bytes received so far). Fails on a
/// prelude over [`MAX_PRELUDE_BYTES`] or one that is not JSON.
pub fn split_prelude(buf: &[u8]) -> Result<Head, String> {
    match buf.first() {
        None => return Ok(Head::NeedMore),
        Some(b'{') => {}
        Some(_) => return Ok(Head::Bare),
    }
    let Some(end) = memchr::memmem::find(&buf[..buf.len().min(MAX_PRELUDE_BYTES + 8)], &SEPARATOR)
    else {
        return if buf.len() > MAX_PRELUDE_BYTES {
            Err(format!(
                "the response prelude has no 8-NUL separator within {MAX_PRELUDE_BYTES} bytes"
            ))
        } else {
            Ok(Head::NeedMore)
        };
    };
    let prelude: serde_json::Value = serde_json::from_slice(&buf[..end])
        .map_err(|e| format!("the response prelude is not JSON: {e}"))?;
    let status = match &prelude["statusCode"] {
        serde_json::Value::Null => 200,
        v => v
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .filter(|s| (100..600).contains(s))
            .ok_or_else(|| format!("the response prelude's statusCode `{v}` is not a status"))?,
    };
    Ok(Head::Prelude {
        status,
        body_start: end + SEPARATOR.len(),
    })
}
