//! `InvokeWithResponseStream`: the transport for functions that expose no Function URL.
//!
//! The bootstrap understands Function URL (API Gateway v2) events only, so the SRI request —
//! signature headers included — travels as one, and the bootstrap cannot tell the two paths
//! apart. What comes back differs from a Function URL in two ways this module absorbs:
//!
//! - The payload may start with the integration-response prelude (JSON, then 8 NUL bytes) that a
//!   Function URL would have turned into the status and headers. It is stripped here and its
//!   `statusCode` honoured: a non-2xx prelude is the function refusing the call.
//! - Failures arrive inside the stream (HTTP status 200 regardless): an `InvokeComplete` event
//!   with an `ErrorCode`. Before any SRI byte that is a refusal; after, a broken stream.

use aws_sdk_lambda::config::http::HttpResponse;
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::primitives::event_stream::EventReceiver;
use aws_sdk_lambda::types::InvokeWithResponseStreamResponseEvent as StreamEvent;
use aws_sdk_lambda::types::error::InvokeWithResponseStreamResponseEventError;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

pub use super::wire::{Head, MAX_PRELUDE_BYTES, request_event, split_prelude};
use super::{Target, aws_hint};
use crate::client::{ByteStream, Failure, InvokeError, rejection};

/// How much of a refusal's body is read to word the error.
const MAX_ERROR_BODY: usize = 4096;

/// Why a response stream stopped short, before it is known whether anything was streamed.
enum Fault {
    /// `InvokeComplete` with an `ErrorCode`.
    Complete { code: String, details: String },
    /// The event stream itself failed (connection, framing).
    Receive(String),
}

impl Fault {
    /// After SRI bytes were streamed: the stream broke off.
    fn broken(self) -> InvokeError {
        InvokeError::Broken(match self {
            Self::Complete { code, details } => format!(
                "Lambda ended the invocation with {code}: {details} (see the function's \
                 CloudWatch logs)"
            ),
            Self::Receive(e) => format!("reading the response stream: {e}"),
        })
    }
}

/// Sends one `InvokeWithResponseStream` call and waits until the payload's first bytes say
/// whether the function accepted it. Returns the SRI bytes (prelude stripped) on success.
pub(crate) async fn start(
    lambda: &aws_sdk_lambda::Client,
    target: &Target,
    function: &str,
    qualifier: &str,
    payload: Vec<u8>,
) -> Result<ByteStream, Failure> {
    let out = lambda
        .invoke_with_response_stream()
        .function_name(function)
        .qualifier(qualifier)
        .payload(Blob::new(payload))
        .send()
        .await
        .map_err(|e| sdk_failure(e, target))?;
    if let Some(version) = out.executed_version.as_deref() {
        tracing::debug!(%target, version, "InvokeWithResponseStream accepted");
    }
    let mut chunks = receive(out.event_stream);
    let mut head = BytesMut::new();
    let (status, body_start) = loop {
        match split_prelude(&head) {
            Ok(Head::NeedMore) => {}
            Ok(Head::Bare) => break (200, 0),
            Ok(Head::Prelude { status, body_start }) => break (status, body_start),
            Err(e) => return Err(Failure::Fatal(protocol_error(&e))),
        }
        match chunks.next().await {
            Some(Ok(b)) => head.extend_from_slice(&b),
            // A clean end before any byte: the stream decoder reports the missing `end`.
            None if head.is_empty() => break (200, 0),
            None => return Err(Failure::refused(bare_answer(&head, target))),
            Some(Err(Fault::Complete { code, details })) => {
                // Nothing was streamed, but the function ran and failed (crash, timeout, init
                // error): 500, not 502, so that nobody resends a call that may have had effects.
                let message = match aws_hint(500, target) {
                    Some(hint) => format!("{details} — {hint}"),
                    None => details,
                };
                return Err(Failure::Fatal(InvokeError::Rejected {
                    status: 500,
                    error_type: code,
                    message,
                }));
            }
            Some(Err(Fault::Receive(e))) => {
                return Err(Failure::Retry(InvokeError::Unreachable(format!(
                    "reading the response stream: {e}"
                ))));
            }
        }
    };
    let rest = head.split_off(body_start).freeze();
    if !(200..300).contains(&status) {
        let mut body = BytesMut::from(&rest[..]);
        while body.len() < MAX_ERROR_BODY {
            match chunks.next().await {
                Some(Ok(b)) => body.extend_from_slice(&b),
                _ => break,
            }
        }
        return Err(Failure::refused(rejection(status, None, &body, target)));
    }
    let first = futures_util::stream::iter((!rest.is_empty()).then_some(Ok(rest)));
    Ok(Box::pin(
        first.chain(chunks.map(|item| item.map_err(Fault::broken))),
    ))
}

/// A payload that is JSON but has no prelude separator. Lambda keeps the prelude in the
/// payload, but a path in between may strip it (`cargo lambda watch`'s direct `Invoke` route
/// does): then an error body (`{"errorType","errorMessage"}`) is still the function refusing the
/// call, with the status the bootstrap gives that error type.
fn bare_answer(head: &[u8], target: &Target) -> InvokeError {
    let v: serde_json::Value = serde_json::from_slice(head).unwrap_or_default();
    let Some(error_type) = v["errorType"].as_str() else {
        return protocol_error("the response ended inside its prelude");
    };
    let status = crate::protocol::events::http_status(error_type);
    rejection(status, None, head, target)
}

fn protocol_error(why: &str) -> InvokeError {
    InvokeError::Rejected {
        status: 502,
        error_type: "FunctionProtocolError".into(),
        message: format!("{why}: the function is not running the SRI bootstrap"),
    }
}

/// The payload bytes of the event stream, ending cleanly at an `InvokeComplete` without error.
fn receive(
    rx: EventReceiver<StreamEvent, InvokeWithResponseStreamResponseEventError>,
) -> impl futures_util::Stream<Item = Result<Bytes, Fault>> + Send + Unpin + 'static {
    Box::pin(futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        loop {
            return match rx.recv().await {
                Ok(Some(StreamEvent::PayloadChunk(chunk))) => match chunk.payload {
                    Some(p) if !p.as_ref().is_empty() => {
                        Some((Ok(Bytes::from(p.into_inner())), Some(rx)))
                    }
                    _ => continue,
                },
                Ok(Some(StreamEvent::InvokeComplete(done))) => match done.error_code {
                    None => None,
                    Some(code) => {
                        let details = done.error_details.unwrap_or_default();
                        let details: String = details.chars().take(2048).collect();
                        Some((Err(Fault::Complete { code, details }), None))
                    }
                },
                // Event types newer than this SDK carry nothing we need.
                Ok(Some(_)) => continue,
                Ok(None) => None,
                Err(e) => Some((
                    Err(Fault::Receive(DisplayErrorContext(&e).to_string())),
                    None,
                )),
            };
        }
    }))
}

/// An `InvokeWithResponseStream` call that failed before any stream: AWS's refusal (with what to
/// fix) or a transport failure (retried: nothing ran).
fn sdk_failure<E>(e: SdkError<E, HttpResponse>, target: &Target) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match &e {
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            let err = service.err();
            let error_type = err.code().unwrap_or("LambdaError").to_owned();
            let mut message = err.message().unwrap_or_default().to_owned();
            if let Some(hint) = aws_hint(status, target) {
                message = if message.is_empty() {
                    hint
                } else {
                    format!("{message} — {hint}")
                };
            }
            let err = InvokeError::Rejected {
                status,
                error_type,
                message,
            };
            // Lambda refused the invocation itself (throttled, not ready, a service error):
            // the function did not run, so a transient refusal is safe to retry.
            match status {
                429 | 502 | 503 | 504 => Failure::Retry(err),
                _ => Failure::Fatal(err),
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            Failure::Retry(InvokeError::Unreachable(format!(
                "{target}: {}",
                DisplayErrorContext(&e)
            )))
        }
        _ => Failure::Fatal(InvokeError::Unreachable(format!(
            "{target}: {}",
            DisplayErrorContext(&e)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::wire::SEPARATOR;
    use http::HeaderMap;

    #[test]
    fn finds_the_prelude_whole_or_in_pieces() {
        let prelude = br#"{"statusCode":401,"headers":{},"cookies":[]}"#;
        let mut wire = prelude.to_vec();
        wire.extend_from_slice(&SEPARATOR);
        wire.extend_from_slice(b"{\"errorType\":\"Sri.Unauthorized\"}");
        for cut in 0..prelude.len() + SEPARATOR.len() {
            assert_eq!(
                split_prelude(&wire[..cut]).unwrap(),
                Head::NeedMore,
                "{cut}"
            );
        }
        assert_eq!(
            split_prelude(&wire).unwrap(),
            Head::Prelude {
                status: 401,
                body_start: prelude.len() + 8
            }
        );
        assert_eq!(split_prelude(b"event: start\n").unwrap(), Head::Bare);
        assert_eq!(split_prelude(b": keepalive\n").unwrap(), Head::Bare);
        assert_eq!(
            split_prelude(b"{}\0\0\0\0\0\0\0\0").unwrap(),
            Head::Prelude {
                status: 200,
                body_start: 10
            }
        );
    }

    #[test]
    fn bounds_and_checks_the_prelude() {
        let mut long = b"{\"x\":\"".to_vec();
        long.resize(MAX_PRELUDE_BYTES + 1, b'a');
        assert!(split_prelude(&long).unwrap_err().contains("separator"));
        assert!(
            split_prelude(b"{nope\0\0\0\0\0\0\0\0")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(
            split_prelude(b"{\"statusCode\":\"x\"}\0\0\0\0\0\0\0\0")
                .unwrap_err()
                .contains("statusCode")
        );
    }

    #[test]
    fn the_event_has_the_function_url_shape() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", "application/json".parse().unwrap());
        headers.insert("x-dify-plugin-session", "s-1".parse().unwrap());
        let envelope = "{\"session_id\":\"s-1\",\"data\":\"é \\\" \\n\"}";
        let event: serde_json::Value =
            serde_json::from_slice(&request_event("invoke tool", &headers, envelope.as_bytes()))
                .unwrap();
        assert_eq!(event["rawPath"], "/invoke");
        assert_eq!(event["rawQueryString"], "action=invoke%20tool");
        assert_eq!(event["requestContext"]["http"]["method"], "POST");
        assert_eq!(event["headers"]["x-dify-plugin-session"], "s-1");
        assert_eq!(event["isBase64Encoded"], false);
        assert_eq!(
            event["body"].as_str().unwrap().as_bytes(),
            envelope.as_bytes()
        );

        let binary = request_event("a", &headers, &[0xff, 0x00]);
        let event: serde_json::Value = serde_json::from_slice(&binary).unwrap();
        assert_eq!(event["isBase64Encoded"], true);
        assert_eq!(event["body"], "/wA=");
    }
}
