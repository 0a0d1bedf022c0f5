//! The Lambda custom runtime: polls the Runtime API and answers each event with a streamed
//! response (prelude, 8-NUL separator, SSE), on a connection with TCP_NODELAY.
//!
//! Written over `lambda_runtime_api_client` rather than `lambda_runtime` because the latter
//! sends no TCP_NODELAY and writes stream errors into the body instead of real trailers.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use http_body::Frame as BodyFrame;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use lambda_runtime_api_client::body::Body;
use lambda_runtime_api_client::{PooledClient, build_request};
use serde::Deserialize;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Error;
use crate::config::LambdaOptions;
use crate::invocation::{Frame, Handler, Reply, ReplyBody, Request};

const NEXT: &str = "/2018-06-01/runtime/invocation/next";
const INIT_ERROR: &str = "/2018-06-01/runtime/init/error";
const RESTORE_NEXT: &str = "/2018-06-01/runtime/restore/next";
const RESTORE_ERROR: &str = "/2018-06-01/runtime/restore/error";
const ERROR_TYPE: &str = "lambda-runtime-function-error-type";
const ERROR_BODY: &str = "lambda-runtime-function-error-body";

/// Runs the runtime: starts the plugin (`setup` builds the handler; if it or the plugin's start
/// fails, the failure goes to `/runtime/init/error` with the Python error text and is
/// returned), waits for a SnapStart restore when `lambda.snap_start()`, then polls for events
/// with `lambda.max_concurrency` workers sharing the one plugin process.
pub async fn run(
    api: &str,
    setup: impl Future<Output = Result<Arc<Handler>, Error>>,
    ready_timeout: Duration,
    lambda: &LambdaOptions,
) -> Result<(), Error> {
    let client = Arc::new(client(api)?);
    // The plugin's start (the Python import) is the cold start's long pole: it begins while the
    // extension's registration is still on the wire, not after its round trip.
    let (extension, handler) = tokio::join!(register_shutdown_extension(client.clone()), setup);
    let handler = match handler {
        Ok(h) => h,
        Err(e) => return Err(report(&client, INIT_ERROR, "Runtime.InitError", e).await),
    };
    if let Err(e) = handler.supervisor().wait_ready(ready_timeout).await {
        handler
            .supervisor()
            .shutdown(Duration::from_millis(200))
            .await;
        return Err(report(&client, INIT_ERROR, "Runtime.InitError", e).await);
    }
    let client = if lambda.snap_start() {
        // Init is not a cold start's first byte here: pay for the backwards client now, so no
        // restored copy pays for it (it holds no connection yet, nothing to refresh).
        if let Err(e) = handler.supervisor().backwards().client().await {
            tracing::warn!(error = %e, "backwards client not built before the snapshot");
        }
        drop(client);
        let client = restore(api, &handler, ready_timeout).await?;
        if let Some(id) = extension {
            // The extension's long poll was a connection of the snapshotted copy.
            poll_extension(client.clone(), id);
        }
        client
    } else {
        client
    };
    let workers = lambda.max_concurrency as usize;
    tracing::info!(workers, "plugin ready; polling for invocations");
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(worker(client.clone(), handler.clone()));
    }
    // A worker only returns when the Runtime API failed; the environment is then unusable.
    match set.join_next().await {
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(Error::RuntimeApi(format!("a worker failed: {e}"))),
        Some(Ok(Ok(()))) | None => Ok(()),
    }
}

/// SnapStart: parks on `/runtime/restore/next` while Lambda snapshots the initialised
/// environment; in each restored copy, opens fresh Runtime API connections (those of the
/// snapshot are gone) and checks that the plugin still answers before the first event. A plugin
/// that does not is reported on `/runtime/restore/error`, so Lambda discards the copy.
///
/// Nothing else in the bootstrap must be refreshed: it holds no random state of its own before
/// the first event (request ids come from Lambda, nonces from the connector, its hash seeds
/// protect nothing secret), and no connection but the Runtime API's is opened during init (the
/// backwards client is built then, but connects only on a call).
async fn restore(
    api: &str,
    handler: &Handler,
    ready_timeout: Duration,
) -> Result<Arc<PooledClient>, Error> {
    tracing::info!("plugin ready; waiting for the SnapStart restore");
    {
        // A client of its own, dropped with the snapshot's connections.
        let before = client(api)?;
        let resp = before
            .call(
                build_request()
                    .method(Method::GET)
                    .uri(RESTORE_NEXT)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .map_err(|e| Error::RuntimeApi(format!("GET restore/next: {e}")))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        if !status.is_success() {
            return Err(Error::RuntimeApi(format!(
                "GET restore/next answered {status}: {}",
                String::from_utf8_lossy(&body.unwrap_or_default())
            )));
        }
    }
    let restored = std::time::Instant::now();
    let client = Arc::new(client(api)?);
    if let Err(e) = handler.supervisor().wait_ready(ready_timeout).await {
        handler
            .supervisor()
            .shutdown(Duration::from_millis(200))
            .await;
        return Err(report(&client, RESTORE_ERROR, "Runtime.RestoreError", e).await);
    }
    tracing::info!(
        after_restore_us = restored.elapsed().as_micros() as u64,
        "restored from the SnapStart snapshot"
    );
    Ok(client)
}

/// Polls for one event at a time and answers it; `AWS_LAMBDA_MAX_CONCURRENCY` of these run
/// side by side, so at most that many invocations are in flight (Lambda's own backpressure).
async fn worker(client: Arc<PooledClient>, handler: Arc<Handler>) -> Result<(), Error> {
    loop {
        // Never time out this call: the sandbox is frozen between events.
        let next = client
            .call(
                build_request()
                    .method(Method::GET)
                    .uri(NEXT)
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .map_err(|e| Error::RuntimeApi(format!("GET next: {e}")))?;
        let headers = next.headers().clone();
        let event = next
            .into_body()
            .collect()
            .await
            .map_err(|e| Error::RuntimeApi(format!("reading the event: {e}")))?
            .to_bytes();
        let Some(request_id) = headers
            .get("lambda-runtime-aws-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
        else {
            return Err(Error::RuntimeApi(
                "an event came without lambda-runtime-aws-request-id".into(),
            ));
        };
        let deadline_ms = headers
            .get("lambda-runtime-deadline-ms")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let reply = match parse_event(&event) {
            Ok(ev) => route(&handler, ev, request_id.clone(), deadline_ms).await,
            Err(why) => {
                tracing::warn!(request_id, why, "event is not a Function URL request");
                Reply::error(StatusCode::BAD_REQUEST, "BadRequest", &why, &request_id)
            }
        };
        if let Err(e) = respond(&client, &request_id, reply).await {
            tracing::error!(request_id, error = %e, "could not deliver the response");
        }
    }
}

/// Registers an internal extension that subscribes to no events. Lambda only sends SIGTERM
/// to a runtime that has an extension; without one, the plugin would be killed without notice
/// at shutdown. Failure is logged and ignored (older emulators lack the Extensions API).
/// Returns the extension's id once it polls.
async fn register_shutdown_extension(client: Arc<PooledClient>) -> Option<String> {
    let req = build_request()
        .method(Method::POST)
        .uri("/2020-01-01/extension/register")
        .header("lambda-extension-name", "sri-bootstrap-shutdown")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"events":[]}"#))
        .expect("request");
    let id = match client.call(req).await {
        Ok(resp) if resp.status().is_success() => resp
            .headers()
            .get("lambda-extension-identifier")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        Ok(resp) => {
            tracing::debug!(status = %resp.status(), "extension registration refused; SIGTERM may not be delivered");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "extension registration failed; SIGTERM may not be delivered");
            None
        }
    };
    let id = id?;
    tracing::info!("shutdown extension registered: SIGTERM will reach the plugin");
    poll_extension(client, id.clone());
    Some(id)
}

/// Keeps the shutdown extension polling for (no) events.
fn poll_extension(client: Arc<PooledClient>, id: String) {
    // An internal extension must keep polling; with no events subscribed this call parks on
    // AWS. An API that answers at once instead (cargo lambda answers 500) ends the loop, so it
    // never spins.
    tokio::spawn(async move {
        loop {
            let req = build_request()
                .method(Method::GET)
                .uri("/2020-01-01/extension/event/next")
                .header("lambda-extension-identifier", id.as_str())
                .body(Body::empty())
                .expect("request");
            match client.call(req).await {
                Ok(resp) if resp.status().is_success() => {
                    let _ = resp.into_body().collect().await;
                }
                Ok(resp) => {
                    tracing::debug!(status = %resp.status(), "extension event polling refused; stopped");
                    return;
                }
                Err(_) => return,
            }
        }
    });
}

fn client(api: &str) -> Result<PooledClient, Error> {
    // `host:port` on AWS, `http://host:port/.rt/<fn>` under cargo lambda.
    let base = if api.contains("://") {
        api.to_owned()
    } else {
        format!("http://{api}")
    };
    let uri: http::Uri = base.parse().map_err(|e| {
        Error::RuntimeApi(format!(
            "AWS_LAMBDA_RUNTIME_API `{api}` is not an address: {e}"
        ))
    })?;
    let mut connector = HttpConnector::new();
    // Streamed responses are many small writes; Nagle + delayed ACK would hold each ~40 ms.
    connector.set_nodelay(true);
    Ok(PooledClient::builder()
        .with_connector(connector)
        .with_endpoint(uri)
        .build())
}

/// Reports an init or restore failure to `path` (the Python error text included) and
/// returns it.
async fn report(client: &PooledClient, path: &str, error_type: &str, error: Error) -> Error {
    // The emulator backend reads this line to show the daemon what `/runtime/init/error` got.
    if path == INIT_ERROR {
        tracing::error!(error = %error, error_type, "initialization failed");
    } else {
        tracing::error!(error = %error, error_type, "restore failed");
    }
    let body = connector::protocol::events::error_body(error_type, &error.to_string(), None);
    let req = build_request()
        .method(Method::POST)
        .uri(path)
        .header(ERROR_TYPE, error_type)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("request");
    if let Err(e) = client.call(req).await {
        tracing::error!(error = %e, path, "could not report the failure");
    }
    error
}

/// A Function URL (API Gateway v2) event, or a direct invoke payload of the same shape.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UrlEvent {
    raw_path: Option<String>,
    raw_query_string: Option<String>,
    #[serde(default)]
    headers: HashMap<String, String>,
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: bool,
    request_context: Option<RequestContext>,
}

#[derive(Debug, Deserialize)]
struct RequestContext {
    http: Option<HttpContext>,
}

#[derive(Debug, Deserialize)]
struct HttpContext {
    method: Option<String>,
    path: Option<String>,
}

/// Reads an invocation's event (public for the fuzz target in `fuzz/`).
pub fn parse_event(raw: &[u8]) -> Result<UrlEvent, String> {
    serde_json::from_slice(raw).map_err(|e| {
        format!("the event is not a Function URL request ({e}); invoke through the Function URL or send its event shape")
    })
}

async fn route(
    handler: &Handler,
    ev: UrlEvent,
    request_id: String,
    deadline_ms: Option<u64>,
) -> Reply {
    let http_ctx = ev.request_context.and_then(|c| c.http);
    let method = http_ctx
        .as_ref()
        .and_then(|h| h.method.clone())
        .unwrap_or_else(|| "POST".into());
    let path = ev
        .raw_path
        .or_else(|| http_ctx.and_then(|h| h.path))
        .unwrap_or_else(|| "/invoke".into());
    let path = path.trim_end_matches('/');
    if path.ends_with("/health") && method.eq_ignore_ascii_case("GET") {
        let (status, body) = handler.health();
        return Reply {
            status,
            content_type: connector::protocol::JSON,
            body: ReplyBody::Full(body),
        };
    }
    if !path.ends_with("/invoke") || !method.eq_ignore_ascii_case("POST") {
        return Reply::error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "routes: POST /invoke?action=…, GET /health",
            &request_id,
        );
    }
    let mut headers = HeaderMap::new();
    for (k, v) in &ev.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            headers.insert(k, v);
        }
    }
    let body = match (ev.body, ev.is_base64_encoded) {
        (None, _) => Bytes::new(),
        (Some(b), false) => Bytes::from(b),
        (Some(b), true) => {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(b) {
                Ok(b) => Bytes::from(b),
                Err(_) => {
                    return Reply::error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "the event body is marked base64 but is not",
                        &request_id,
                    );
                }
            }
        }
    };
    let action = ev.raw_query_string.as_deref().and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "action")
            .map(|(_, v)| v.into_owned())
    });
    handler
        .invoke(Request {
            action,
            headers,
            body,
            request_id,
            deadline_ms,
        })
        .await
}

/// Streams `reply` to `/invocation/{id}/response`: the prelude and the 8-NUL separator as
/// chunks of their own (the emulator needs both), then the body, then error trailers if the
/// session failed.
async fn respond(client: &PooledClient, request_id: &str, reply: Reply) -> Result<(), Error> {
    let (tx, rx) = mpsc::channel::<Result<BodyFrame<Bytes>, std::convert::Infallible>>(8);
    let req = build_request()
        .method(Method::POST)
        .uri(format!(
            "/2018-06-01/runtime/invocation/{request_id}/response"
        ))
        .header("lambda-runtime-function-response-mode", "streaming")
        .header(http::header::TRANSFER_ENCODING, "chunked")
        .header(
            http::header::CONTENT_TYPE,
            "application/vnd.awslambda.http-integration-response",
        )
        .header(
            http::header::TRAILER,
            "Lambda-Runtime-Function-Error-Type, Lambda-Runtime-Function-Error-Body",
        )
        .body(Body::new(StreamBody::new(ReceiverStream::new(rx))))
        .expect("request");
    let call = tokio::spawn(client.call(req));
    let prelude = serde_json::json!({
        "statusCode": reply.status.as_u16(),
        "headers": {"content-type": reply.content_type, "cache-control": "no-cache"},
        "cookies": [],
    });
    let data = |b: Bytes| Ok(BodyFrame::data(b));
    let _ = tx
        .send(data(serde_json::to_vec(&prelude).expect("JSON").into()))
        .await;
    let _ = tx.send(data(Bytes::from_static(&[0u8; 8]))).await;
    match reply.body {
        ReplyBody::Full(b) => {
            let _ = tx.send(data(b)).await;
        }
        ReplyBody::Stream(rx) => {
            let mut frames = ReceiverStream::new(rx);
            while let Some(frame) = frames.next().await {
                let out = match frame {
                    Frame::Data(b) => BodyFrame::data(b),
                    Frame::Failed {
                        error_type,
                        message,
                    } => {
                        use base64::Engine;
                        let body = connector::protocol::events::error_body(
                            &error_type,
                            &message,
                            Some(request_id),
                        );
                        let mut trailers = HeaderMap::new();
                        if let Ok(v) = HeaderValue::try_from(error_type.as_str()) {
                            trailers.insert(ERROR_TYPE, v);
                        }
                        let b64 = base64::engine::general_purpose::STANDARD.encode(&body);
                        trailers.insert(
                            ERROR_BODY,
                            HeaderValue::try_from(b64).expect("base64 is a header value"),
                        );
                        BodyFrame::trailers(trailers)
                    }
                };
                if tx.send(Ok(out)).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let resp = call
        .await
        .map_err(|e| Error::RuntimeApi(format!("response task: {e}")))?
        .map_err(|e| Error::RuntimeApi(format!("POST response: {e}")))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        return Err(Error::RuntimeApi(format!(
            "POST response answered {status}: {}",
            String::from_utf8_lossy(&body)
        )));
    }
    Ok(())
}
