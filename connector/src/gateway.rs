//! The gateway: the endpoint the daemon is given. It takes the daemon's unsigned invoke, signs
//! it (SRI v1), calls the function, and rewrites its SSE events as the daemon's NDJSON
//! (`{…}\n\n`, no `data:`), passing plugin objects through byte for byte.
//!
//! It never lets a failure look like success: a function stream that ends without `end` becomes
//! an explicit session error. Failures before anything ran are non-2xx with
//! `{"errorType","errorMessage"}`; 502 (which the daemon retries) only when nothing has run.

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

/// `POST /v1/functions/{name}/invoke?action=…`
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(action) = query.get("action").filter(|a| !a.is_empty()).cloned() else {
        return error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the `action` query parameter is missing",
        );
    };
    state
        .metrics
        .invocations
        .get_or_create(&crate::metrics::ActionLabel {
            action: action.clone(),
        })
        .inc();
    // Read the (chunked) body whole: its hash is signed, and it is sent with Content-Length.
    let body = match axum::body::to_bytes(body, state.max_request_bytes + 1).await {
        Ok(b) if b.len() <= state.max_request_bytes => b,
        Ok(_) | Err(_) => {
            state.metrics.error("PayloadTooLarge");
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PayloadTooLarge",
                &format!(
                    "the request body is over {} bytes (MAX_SERVERLESS_REQUEST_BYTES)",
                    state.max_request_bytes
                ),
            );
        }
    };
    let session_id = match Envelope::parse(body.clone()) {
        Ok(e) => e.session_id().to_owned(),
        Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
    };
    let Some(target) = state.backend.wait_target(&name, state.start_wait).await else {
        let known = state.backend.list().iter().any(|f| f.name == name);
        let (status, kind, msg) = if known {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "PluginNotReady",
                format!("function `{name}` is starting or restarting; retry shortly"),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                "FunctionNotFound",
                format!("no function named `{name}`; launch the plugin first"),
            )
        };
        state.metrics.error(kind);
        return error(status, kind, &msg);
    };
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let started = Instant::now();
    let stream = match state
        .client
        .invoke_function(&name, &target, &action, body, traceparent)
        .await
    {
        Ok(s) => s,
        Err(InvokeError::Rejected {
            status,
            error_type,
            message,
        }) => {
            state.metrics.error(&error_type);
            // A 502 from the function would make the daemon resend; only we decide that.
            let status = if status == 502 {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY)
            };
            return error(status, &error_type, &message);
        }
        Err(e @ InvokeError::Unreachable(_)) => {
            state.metrics.error("FunctionUnreachable");
            return error(
                StatusCode::BAD_GATEWAY,
                "FunctionUnreachable",
                &e.to_string(),
            );
        }
        Err(e) => {
            state.metrics.error("BadRequest");
            return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string());
        }
    };
    let metrics = state.clone();
    metrics.metrics.active_streams.inc();
    let out = ndjson(stream, session_id, metrics, started);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(out))
        .expect("response")
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
    futures_util::stream::unfold(
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
                                Ok(truncated(&session_id, &e.to_string())),
                                (None, first, true, guard),
                            ));
                        }
                        None => {
                            guard.0.metrics.error("FunctionStreamTruncated");
                            return Some((
                                Ok(truncated(
                                    &session_id,
                                    "the function's stream ended without `end`",
                                )),
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
                                return Some((Ok(line), (None, first, true, guard)));
                            }
                            if ev.kind == EventKind::Error
                                && let Some(e) = events::SessionError::from_event_data(&ev.data)
                            {
                                guard.0.metrics.error(&e.error_type);
                            }
                            let end = ev.kind == EventKind::End;
                            let mut line = Vec::with_capacity(ev.data.len() + 2);
                            line.extend_from_slice(&ev.data);
                            line.extend_from_slice(b"\n\n");
                            return Some((
                                Ok(Bytes::from(line)),
                                (Some(stream), first, end, guard),
                            ));
                        }
                    }
                }
            }
        },
    )
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
