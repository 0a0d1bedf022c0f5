//! `bootstrap serve`: SRI over plain HTTP (the local backend, tests, and platforms such as
//! Cloud Run or Azure Functions custom handlers).
//!
//! Two routes on hyper directly (a router framework would only add weight to the function's
//! binary). Accepts chunked and `Content-Length` bodies alike (the Dify daemon sends chunked
//! ones), sets TCP_NODELAY on every connection, and lets in-flight streams finish on shutdown.
//!
//! With the `h2c` feature (default; Lambda builds leave it out) it speaks HTTP/1.1 and HTTP/2
//! with prior knowledge on the same port: the connector's local backend multiplexes streams to a
//! function over one h2c connection, other callers keep HTTP/1.1.
//!
//! Every bound is a [`ServeLimits`]: a connection cap and a first-bytes deadline (the shared
//! accept loop), a header-read deadline (HTTP/1.1), a stream cap (h2c), and a deadline on each
//! request body, which is read whole before its signature is checked. Response streams have no
//! deadline here: the invocation's own deadline bounds them.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;

use crate::Error;
use crate::config::ServeLimits;
use crate::invocation::{Frame as ReplyFrame, Handler, Reply, ReplyBody, Request as Invocation};

/// How long in-flight streams may run on after a shutdown signal.
const DRAIN: Duration = Duration::from_secs(10);

/// The h2c connection's receive window (request bodies).
#[cfg(feature = "h2c")]
const H2_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The largest h2c frame accepted (request bodies run to megabytes).
#[cfg(feature = "h2c")]
const H2_MAX_FRAME: u32 = 256 * 1024;

type Body = BoxBody<Bytes, Infallible>;

/// How request bodies are read: their size, their deadline, and a budget (in KiB) of body bytes
/// held across every connection and stream before a signature is checked, so that callers
/// without a key cannot pile up bodies (16,384 streams × 5 MiB would be 80 GiB).
struct BodyRules {
    max_bytes: usize,
    timeout: Duration,
    unverified_kib: Arc<tokio::sync::Semaphore>,
}

/// Serves `handler` on `listen` until `shutdown` completes; in-flight streams are let finish.
pub async fn serve(
    handler: Arc<Handler>,
    listen: SocketAddr,
    max_request_bytes: usize,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let header_timeout = Duration::from_secs(limits.header_read_timeout_secs);
    let rules = Arc::new(BodyRules {
        max_bytes: max_request_bytes,
        timeout: Duration::from_secs(limits.body_read_timeout_secs),
        unverified_kib: Arc::new(tokio::sync::Semaphore::new(
            (limits.max_pending_body_bytes / 1024).clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )),
    });
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
    tracing::info!(listen = %local, "serving SRI v1");
    #[cfg(feature = "h2c")]
    let http = {
        let mut http =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        http.http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout);
        http.http2()
            // Streams are what callers open here, one per invocation, as HTTP/1.1 callers
            // open connections: hyper's default cap (200) is far too low for the connector's
            // multiplexed idle streams, so the cap is ours.
            .max_concurrent_streams(limits.max_h2c_streams)
            // Request bodies are read whole and at once; a larger connection window keeps
            // concurrent uploads from queueing behind one another.
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME);
        http
    };
    #[cfg(not(feature = "h2c"))]
    let http = {
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout);
        http
    };
    let accept = connector::accept::Limits {
        max_connections: limits.max_connections,
        first_bytes_timeout: header_timeout,
    };
    connector::accept::serve_until(listener, shutdown, DRAIN, accept, |io| {
        let handler = handler.clone();
        let rules = rules.clone();
        let service = service_fn(move |req| route(handler.clone(), rules.clone(), req));
        // The h2c-or-HTTP/1.1 connection borrows its builder unless made owned.
        #[cfg(feature = "h2c")]
        let conn = http.serve_connection(io, service).into_owned();
        #[cfg(not(feature = "h2c"))]
        let conn = http.serve_connection(io, service);
        conn
    })
    .await;
    Ok(())
}

async fn route(
    handler: Arc<Handler>,
    rules: Arc<BodyRules>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(match (req.method(), req.uri().path()) {
        (&Method::GET, "/health") => {
            let (status, body) = handler.health();
            respond(Reply {
                status,
                content_type: connector::protocol::JSON,
                body: ReplyBody::Full(body),
            })
        }
        (&Method::POST, "/invoke") => invoke(&handler, &rules, req).await,
        _ => respond(Reply::error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "routes: POST /invoke?action=…, GET /health",
            "",
        )),
    })
}

async fn invoke(handler: &Handler, rules: &BodyRules, req: Request<Incoming>) -> Response<Body> {
    let (max_request_bytes, body_timeout) = (rules.max_bytes, rules.timeout);
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
    // The body's share of the budget, from what it says it holds (never more than the limit).
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
        .unwrap_or(max_request_bytes)
        .min(max_request_bytes + 1);
    let Ok(_held) = rules
        .unverified_kib
        .clone()
        .try_acquire_many_owned((declared / 1024 + 1).min(u32::MAX as usize) as u32)
    else {
        return respond(Reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "too many request bodies are being read at once (SRI_MAX_PENDING_BODY_BYTES); retry",
            &request_id,
        ));
    };
    // One byte over the limit is enough to know it is too large.
    let read = Limited::new(body, max_request_bytes + 1).collect();
    let body = match tokio::time::timeout(body_timeout, read).await {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            let msg = format!(
                "the request body did not arrive within {} s (SRI_BODY_READ_TIMEOUT_SECS)",
                body_timeout.as_secs()
            );
            return respond(Reply::error(
                StatusCode::REQUEST_TIMEOUT,
                "RequestTimeout",
                &msg,
                &request_id,
            ));
        }
        Ok(Err(e)) => {
            let (status, kind, msg) = if e.is::<http_body_util::LengthLimitError>() {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "PayloadTooLarge",
                    format!(
                        "the request body is over {max_request_bytes} bytes (MAX_SERVERLESS_REQUEST_BYTES)"
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("could not read the request body: {e}"),
                )
            };
            return respond(Reply::error(status, kind, &msg, &request_id));
        }
    };
    let reply = handler
        .invoke(Invocation {
            action,
            headers: parts.headers,
            body,
            request_id,
            deadline_ms: None,
        })
        .await;
    respond(reply)
}

fn respond(reply: Reply) -> Response<Body> {
    let body: Body = match reply.body {
        ReplyBody::Full(b) => Full::new(b).boxed(),
        ReplyBody::Stream(rx) => BodyExt::boxed(StreamBody::new(
            ReceiverStream::new(rx).filter_map(|f| async move {
                match f {
                    ReplyFrame::Data(b) => Some(Ok::<_, Infallible>(Frame::data(b))),
                    ReplyFrame::Failed { .. } => None,
                }
            }),
        )),
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
