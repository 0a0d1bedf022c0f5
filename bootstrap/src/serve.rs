//! `bootstrap serve`: SRI v1 over plain HTTP (the local backend, tests, and platforms such as
//! Cloud Run or Azure Functions custom handlers).
//!
//! Accepts chunked and `Content-Length` bodies alike (the Dify daemon sends chunked ones).

use axum::Router;
use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use http::{HeaderValue, StatusCode, header};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Error;
use crate::invocation::{Frame, Handler, Reply, ReplyBody, Request};

/// Serves `handler` on `listen` until `shutdown` completes; in-flight streams are let finish.
pub async fn serve(
    handler: Arc<Handler>,
    listen: SocketAddr,
    max_request_bytes: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Io {
            context: format!("cannot listen on {listen} (SRI_LISTEN)"),
            source: e,
        })?;
    let local = listener.local_addr().map_err(|e| Error::Io {
        context: "local address".into(),
        source: e,
    })?;
    // Small SSE writes must not wait for delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tracing::info!(listen = %local, "serving SRI v1");
    let app = Router::new()
        .route("/invoke", post(invoke))
        .route("/health", get(health))
        .fallback(|| async {
            reply_into_response(Reply::error(
                StatusCode::NOT_FOUND,
                "NotFound",
                "routes: POST /invoke?action=…, GET /health",
                "",
            ))
        })
        .with_state(AppState {
            handler,
            max_request_bytes,
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| Error::Io {
            context: "serving HTTP".into(),
            source: e,
        })
}

#[derive(Clone)]
struct AppState {
    handler: Arc<Handler>,
    max_request_bytes: usize,
}

async fn health(State(state): State<AppState>) -> Response {
    let (status, body) = state.handler.health();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn invoke(State(state): State<AppState>, req: HttpRequest) -> Response {
    let (parts, body) = req.into_parts();
    let action = parts.uri.query().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "action")
            .map(|(_, v)| v.into_owned())
    });
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    // One byte over the limit is enough to know it is too large; the handler says so.
    let body = match axum::body::to_bytes(body, state.max_request_bytes + 1).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            let (status, kind, msg) = if too_large {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PayloadTooLarge",
                    format!(
                        "the request body is over {} bytes (MAX_SERVERLESS_REQUEST_BYTES)",
                        state.max_request_bytes
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("could not read the request body: {e}"),
                )
            };
            return reply_into_response(Reply::error(status, kind, &msg, &request_id));
        }
    };
    let reply = state
        .handler
        .invoke(Request {
            action,
            headers: parts.headers,
            body,
            request_id,
            deadline_ms: None,
        })
        .await;
    reply_into_response(reply)
}

fn reply_into_response(reply: Reply) -> Response {
    let body = match reply.body {
        ReplyBody::Full(b) => Body::from(b),
        ReplyBody::Stream(rx) => {
            Body::from_stream(ReceiverStream::new(rx).filter_map(|f| async move {
                match f {
                    Frame::Data(b) => Some(Ok::<_, std::convert::Infallible>(b)),
                    Frame::Failed { .. } => None,
                }
            }))
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = reply.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(reply.content_type),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}
