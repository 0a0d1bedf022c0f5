//! `bootstrap serve`: SRI v1 over plain HTTP (the local backend, tests, and platforms such as
//! Cloud Run or Azure Functions custom handlers).
//!
//! Two routes on hyper directly (a router framework would only add weight to the function's
//! binary). Accepts chunked and `Content-Length` bodies alike (the Dify daemon sends chunked
//! ones), sets TCP_NODELAY on every connection, and lets in-flight streams finish on shutdown.
//!
//! With the `h2c` feature (default; Lambda builds leave it out) it speaks HTTP/1.1 and HTTP/2
//! with prior knowledge on the same port: the connector's local backend multiplexes streams to a
//! function over one h2c connection, other callers keep HTTP/1.1.

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
    tracing::info!(listen = %local, "serving SRI v1");
    #[cfg(feature = "h2c")]
    let http = {
        let mut http =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        http.http2()
            // Streams are what callers open here, one per invocation, as HTTP/1.1 callers
            // open connections: no cap below the process's own limits (hyper's default is 200).
            .max_concurrent_streams(None)
            // Request bodies are read whole and at once; a larger connection window keeps
            // concurrent uploads from queueing behind one another.
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME);
        http
    };
    #[cfg(not(feature = "h2c"))]
    let http = hyper::server::conn::http1::Builder::new();
    connector::accept::serve_until(listener, shutdown, DRAIN, |io| {
        let handler = handler.clone();
        let service = service_fn(move |req| route(handler.clone(), max_request_bytes, req));
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
    max_request_bytes: usize,
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
        (&Method::POST, "/invoke") => invoke(&handler, max_request_bytes, req).await,
        _ => respond(Reply::error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "routes: POST /invoke?action=…, GET /health",
            "",
        )),
    })
}

async fn invoke(
    handler: &Handler,
    max_request_bytes: usize,
    req: Request<Incoming>,
) -> Response<Body> {
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
    // One byte over the limit is enough to know it is too large.
    let body = match Limited::new(body, max_request_bytes + 1).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
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
