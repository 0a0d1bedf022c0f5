//! The gateway: the endpoint the daemon is given. It takes the daemon's unsigned invoke, signs
//! it (SRI v2), calls the function, and rewrites its SSE events as the daemon's NDJSON
//! (`{…}\n\n`, no `data:`), passing plugin objects through byte for byte.
//!
//! Only capability endpoints are served (`/v1/functions/{name}/{token}`, see
//! [`crate::capability`]): every caller without the function's token gets the same 404, checked
//! before anything else is read.
//!
//! It never lets a failure look like success: a function stream that ends without `end` becomes
//! an explicit session error. Failures before anything ran are non-2xx with
//! `{"errorType","errorMessage"}`, and never 502: the daemon resends a 502 up to 3 times, and the
//! client here has already retried what was safe, so one daemon call makes at most 3 attempts.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::client::InvokeError;
use crate::protocol::envelope::Envelope;
use crate::protocol::events::{self, EventKind};
use crate::server::AppState;

/// The daemon's longest response line (`PLUGIN_RUNTIME_MAX_BUFFER_SIZE`).
pub const MAX_LINE: usize = 5 * 1024 * 1024;

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        events::error_body(kind, message, None),
    )
        .into_response()
}

/// What every caller without a valid capability gets, whatever was wrong (no token, a wrong
/// one, another function's, an unknown function, a pre-token endpoint): the same answer, so it
/// tells nothing about what is installed, and the fix for the one legitimate caller it can hit.
pub const NOT_FOUND_MESSAGE: &str = "no function at this endpoint: call the endpoint the launch \
     returned (`sri list` shows them); endpoints made before capability tokens must be \
     re-launched (README: Upgrading)";

fn not_found(state: &AppState) -> Response {
    state.metrics.error("FunctionNotFound");
    error(StatusCode::NOT_FOUND, "FunctionNotFound", NOT_FOUND_MESSAGE)
}

/// `POST /v1/functions/{name}/{token}/invoke?action=…`: the capability endpoint.
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path((name, token)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = crate::names::check(&name) {
        return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
    }
    if !state.launcher.capabilities().check(&name, &token) {
        return not_found(&state);
    }
    call(state, name, query, headers, body).await
}

/// `POST /v1/functions/{name}/invoke?action=…`: the endpoint of functions launched before
/// capability tokens, served only with `SRI_LEGACY_ENDPOINTS=true`.
pub async fn invoke_legacy(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = crate::names::check(&name) {
        return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
    }
    if !state.legacy_endpoints {
        if state.backend.list().iter().any(|f| f.name == name) {
            warn_legacy(&name);
        }
        return not_found(&state);
    }
    call(state, name, query, headers, body).await
}

/// Tells the operator (not the caller) that a deployed function is still called at its
/// pre-token endpoint, at most once a minute whoever sends such calls.
fn warn_legacy(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 60
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            function = %name,
            "a call to the token-less endpoint of a deployed function was refused: re-launch \
             the plugin so the daemon stores its capability endpoint (Dify: reinstall the \
             plugin), or set SRI_LEGACY_ENDPOINTS=true during the migration (README: Upgrading)"
        );
    }
}

/// One daemon call to an authorized function name.
async fn call(
    state: Arc<AppState>,
    name: String,
    query: HashMap<String, String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(action) = query.get("action").filter(|a| !a.is_empty()).cloned() else {
        state.metrics.error("BadRequest");
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the `action` query parameter is missing",
        );
    };
    // Wait for a (re)starting function before reading the body: a waiting call holds no
    // request bytes (the caller's are held back by TCP flow control).
    let Some(target) = state.backend.wait_target(&name, state.start_wait).await else {
        drop(body);
        if !state.backend.list().iter().any(|f| f.name == name) {
            return not_found(&state);
        }
        state.metrics.error("PluginNotReady");
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "PluginNotReady",
            &format!(
                "function `{name}` did not become ready within {} s (SRI_RESTART_WAIT_SECS); \
                 retry shortly",
                state.start_wait.as_secs()
            ),
        );
    };
    state.metrics.invocation(&action);
    // Read the (chunked) body whole: its hash is signed, and it is sent with Content-Length.
    let limit = state.max_request_bytes;
    let read = axum::body::to_bytes(body, limit + 1);
    let body = match tokio::time::timeout(state.limits.body_read_timeout, read).await {
        Ok(Ok(b)) if b.len() <= limit => b,
        Ok(Ok(_)) => {
            state.metrics.error("PayloadTooLarge");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                &format!("the request body is over {limit} bytes (MAX_SERVERLESS_REQUEST_BYTES)"),
            );
        }
        Ok(Err(e)) => {
            state.metrics.error("BadRequest");
            return error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("could not read the request body: {e}"),
            );
        }
        Err(_) => {
            state.metrics.error("RequestTimeout");
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                &format!(
                    "the request body did not arrive within {} s (SRI_BODY_READ_TIMEOUT_SECS)",
                    state.limits.body_read_timeout.as_secs()
                ),
            );
        }
    };
    let envelope = match Envelope::parse(body) {
        Ok(e) => e,
        Err(e) => {
            state.metrics.error("BadRequest");
            return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
        }
    };
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let started = Instant::now();
    let session_id = envelope.session_id().to_owned();
    // Registered before the call (the plugin may call back at once), until the stream ends:
    // the relay accepts this function's backwards calls for the session meanwhile.
    let signed = target.signed_name().unwrap_or(&name).to_owned();
    let registration = state.relay_sessions.register(&session_id, &signed);
    let claim = crate::relay::claim_for(
        state.client.keys(),
        &state.relay_sessions,
        &signed,
        &session_id,
    );
    let stream = match state
        .client
        .invoke_envelope(
            &name,
            &target,
            &action,
            &envelope,
            traceparent,
            Some(&claim),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => return refusal(&state, e),
    };
    let metrics = state.clone();
    metrics.metrics.active_streams.inc();
    let out = ndjson(stream, session_id, metrics, started).map(move |item| {
        let _held = &registration;
        item
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(out))
        .expect("response")
}

/// A call the client could not start, as the daemon's answer. Never a 502: the daemon resends
/// on 502, and the client has already made every attempt that was safe (retries included), so
/// a 502 would multiply them, or resend a call a function may have acted on.
fn refusal(state: &AppState, e: InvokeError) -> Response {
    match e {
        InvokeError::Rejected {
            status,
            error_type,
            message,
        } => {
            state.metrics.error(&error_type);
            let status = match StatusCode::from_u16(status) {
                Ok(s)
                    if s != StatusCode::BAD_GATEWAY
                        && (s.is_client_error() || s.is_server_error()) =>
                {
                    s
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, &error_type, &message)
        }
        e @ InvokeError::Unreachable(_) => {
            state.metrics.error("FunctionUnreachable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "FunctionUnreachable",
                &e.to_string(),
            )
        }
        e => {
            state.metrics.error("BadRequest");
            error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string())
        }
    }
}

/// Rewrites SRI events as NDJSON lines, guaranteeing an `end` after an explicit error when
/// the function's stream breaks off.
fn ndjson(
    stream: crate::client::EventStream,
    session_id: String,
    state: Arc<AppState>,
    started: Instant,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    struct Guard(Arc<AppState>, Instant);
    impl Drop for Guard {
        fn drop(&mut self) {
            self.0.metrics.active_streams.dec();
            self.0
                .metrics
                .duration
                .observe(self.1.elapsed().as_secs_f64());
        }
    }
    let guard = Guard(state, started);
    let lines = futures_util::stream::unfold(
        (Some(stream), false, false, guard),
        move |(stream, mut first, ended, guard)| {
            let session_id = session_id.clone();
            async move {
                let mut stream = stream?;
                if ended {
                    return None;
                }
                loop {
                    let item = stream.next().await;
                    if !first {
                        first = true;
                        guard
                            .0
                            .metrics
                            .first_byte
                            .observe(guard.1.elapsed().as_secs_f64());
                    }
                    let ev = match item {
                        Some(Ok(ev)) => ev,
                        Some(Err(e)) => {
                            guard.0.metrics.error("FunctionStreamBroken");
                            return Some((
                                (truncated(&session_id, &e.to_string()), None),
                                (None, first, true, guard),
                            ));
                        }
                        None => {
                            guard.0.metrics.error("FunctionStreamTruncated");
                            return Some((
                                (
                                    truncated(
                                        &session_id,
                                        "the function's stream ended without `end`",
                                    ),
                                    None,
                                ),
                                (None, first, true, guard),
                            ));
                        }
                    };
                    match ev.kind {
                        EventKind::Start | EventKind::Usage => continue,
                        EventKind::Chunk | EventKind::Log | EventKind::Error | EventKind::End => {
                            if ev.data.len() > MAX_LINE {
                                guard.0.metrics.error("PluginOutputTooLarge");
                                let line = truncated(
                                    &session_id,
                                    &format!(
                                        "a plugin object of {} bytes is over the daemon's {MAX_LINE}-byte line limit",
                                        ev.data.len()
                                    ),
                                );
                                return Some(((line, None), (None, first, true, guard)));
                            }
                            if ev.kind == EventKind::Error
                                && let Some(e) = events::SessionError::from_event_data(&ev.data)
                            {
                                guard.0.metrics.error(&e.error_type);
                            }
                            let end = ev.kind == EventKind::End;
                            return Some((ndjson_line(ev.data), (Some(stream), first, end, guard)));
                        }
                    }
                }
            }
        },
    );
    lines.flat_map(|(line, rest)| {
        futures_util::stream::iter(std::iter::once(line).chain(rest).map(Ok))
    })
}

/// Objects this large go out as they came (`data`, then `\n\n` as a frame of its own) rather
/// than copied into one line: at ~1 MiB per object the copy was a large part of the gateway's
/// work, while for small objects one write beats two frames.
const ZERO_COPY_FROM: usize = 64 * 1024;

/// One NDJSON line for the daemon: the event's data and the blank line that ends it.
fn ndjson_line(data: Bytes) -> (Bytes, Option<Bytes>) {
    const END: &[u8] = b"\n\n";
    if data.len() >= ZERO_COPY_FROM {
        return (data, Some(Bytes::from_static(END)));
    }
    let mut line = Vec::with_capacity(data.len() + END.len());
    line.extend_from_slice(&data);
    line.extend_from_slice(END);
    (line.into(), None)
}

/// A session error and `end` for a stream that cannot be completed.
fn truncated(session_id: &str, why: &str) -> Bytes {
    let mut args = serde_json::Map::new();
    args.insert("reason".into(), json!(why));
    let mut out = events::session_error(
        session_id,
        "FunctionStreamBroken",
        &format!("the invocation did not complete: {why}"),
        args,
    )
    .to_vec();
    out.extend_from_slice(b"\n\n");
    out.extend_from_slice(&events::session_end(session_id));
    out.extend_from_slice(b"\n\n");
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_the_data_and_a_blank_line_in_one_or_two_frames() {
        for len in [0, 1, ZERO_COPY_FROM - 1, ZERO_COPY_FROM, 3 * ZERO_COPY_FROM] {
            let data = Bytes::from(vec![b'x'; len]);
            let (first, rest) = ndjson_line(data.clone());
            let mut line = first.to_vec();
            line.extend_from_slice(rest.as_deref().unwrap_or_default());
            assert_eq!(line, [&data[..], b"\n\n"].concat(), "{len} bytes");
            // Large data goes out as it came: the same buffer, not a copy.
            assert_eq!(rest.is_some(), len >= ZERO_COPY_FROM, "{len} bytes");
            if rest.is_some() {
                assert_eq!(first.as_ptr(), data.as_ptr());
            }
        }
    }
}
