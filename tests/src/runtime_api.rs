//! A stand-in for the Lambda Runtime API, following AWS's documented sequence, for what
//! `cargo lambda watch` cannot show: many `/invocation/next` polls at once (Lambda Managed
//! Instances, `AWS_LAMBDA_MAX_CONCURRENCY`), the SnapStart restore (`/runtime/restore/next`,
//! after which every connection of the snapshotted environment is gone) and the error
//! endpoints (`/init/error`, `/restore/error`, `/invocation/{id}/error`).
//!
//! It also answers the Extensions API's registration (an extension's `/event/next` stays parked,
//! as on AWS when no event is subscribed): AWS Lambda Web Adapter, the benchmark's peer, exits
//! when its registration fails.
//!
//! Connections are served one task each so that a simulated restore can drop them all, as a
//! restored copy finds them.

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::sse;
use futures_util::StreamExt;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

const V: &str = "/2018-06-01/runtime";
const EXT: &str = "/2020-01-01/extension";

/// What the runtime posted to an error endpoint.
#[derive(Debug, Clone)]
pub struct Posted {
    /// The endpoint, e.g. `restore/error`.
    pub path: String,
    /// `Lambda-Runtime-Function-Error-Type`.
    pub error_type: String,
    /// The JSON body.
    pub body: Value,
}

type Queue = mpsc::UnboundedReceiver<(String, Value)>;

struct Shared {
    queue_tx: mpsc::UnboundedSender<(String, Value)>,
    queue_rx: tokio::sync::Mutex<Queue>,
    /// `/invocation/next` calls parked now.
    polling: watch::Sender<usize>,
    /// Responses being streamed, by request id.
    responses: Mutex<HashMap<String, mpsc::UnboundedSender<Bytes>>>,
    /// Responses begun and not finished.
    streaming: AtomicUsize,
    /// Most responses streaming at once.
    max_streaming: AtomicUsize,
    /// `/restore/next` parked: the sender that answers it.
    restore: Mutex<Option<oneshot::Sender<()>>>,
    restore_parked: watch::Sender<bool>,
    posted: Mutex<Vec<Posted>>,
    posted_changed: watch::Sender<usize>,
    next_id: AtomicU64,
}

/// A running fake (its listener and connections end on drop).
pub struct RuntimeApi {
    /// `host:port`, the form AWS sets `AWS_LAMBDA_RUNTIME_API` to.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// Connections accepted so far.
    accepted: watch::Receiver<u64>,
    accept: JoinHandle<()>,
}

/// One invocation's response, as the runtime streams it.
pub struct Invocation {
    /// Lambda's request id.
    pub request_id: String,
    body: mpsc::UnboundedReceiver<Bytes>,
    sent: Instant,
}

/// A response read to its end (see [`Invocation::complete`]).
pub struct Completed {
    /// From queueing the event to the end of the runtime's response.
    pub latency: Duration,
    /// The prelude's JSON (`statusCode`, `headers`, …).
    pub prelude: Value,
    /// The body after the prelude's 8-NUL separator.
    pub body: Bytes,
}

impl RuntimeApi {
    /// Listens on a free loopback port.
    pub async fn start() -> Self {
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            queue_tx,
            queue_rx: tokio::sync::Mutex::new(queue_rx),
            polling: watch::channel(0).0,
            responses: Mutex::default(),
            streaming: AtomicUsize::new(0),
            max_streaming: AtomicUsize::new(0),
            restore: Mutex::new(None),
            restore_parked: watch::channel(false).0,
            posted: Mutex::default(),
            posted_changed: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        });
        let app = Router::new()
            .route(&format!("{V}/invocation/next"), get(next))
            .route(&format!("{V}/invocation/{{id}}/response"), post(response))
            .route(
                &format!("{V}/invocation/{{id}}/error"),
                post(invocation_error),
            )
            .route(&format!("{V}/init/error"), post(init_error))
            .route(&format!("{V}/restore/next"), get(restore_next))
            .route(&format!("{V}/restore/error"), post(restore_error))
            .route(&format!("{EXT}/register"), post(extension_register))
            .route(&format!("{EXT}/event/next"), get(extension_next))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local addr");
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let conns = connections.clone();
        let (accepted_tx, accepted) = watch::channel(0u64);
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(app.clone());
                let task = tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut conns = conns.lock().unwrap();
                conns.retain(|t| !t.is_finished());
                conns.push(task);
                drop(conns);
                accepted_tx.send_modify(|n| *n += 1);
            }
        });
        Self {
            addr,
            shared,
            connections,
            accepted,
            accept,
        }
    }

    /// Queues a Function URL event for `POST /invoke?action=invoke_tool` with `body`, signed
    /// (SRI v2, key `k1`) for a function with no name.
    pub fn invoke_tool(&self, body: Bytes) -> Invocation {
        let sid = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["session_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        crate::signer("k1", crate::SECRET_A)
            .sign_v2(
                crate::now(),
                &crate::nonce(),
                "",
                &sid,
                "invoke_tool",
                &body,
            )
            .apply(&mut headers)
            .unwrap();
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static(connector::protocol::EVENT_STREAM),
        );
        self.queue(function_url_event(&headers, &body))
    }

    /// Queues the same Function URL request without a signature (for a function that has no
    /// request authentication, like the SDK's serverless server behind LWA).
    pub fn invoke_unsigned(&self, body: Bytes) -> Invocation {
        self.queue(function_url_event(&http::HeaderMap::new(), &body))
    }

    /// Queues a raw event.
    pub fn queue(&self, event: Value) -> Invocation {
        let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let request_id = format!("fake-{}-{n:04}", std::process::id());
        let (tx, body) = mpsc::unbounded_channel();
        self.shared
            .responses
            .lock()
            .unwrap()
            .insert(request_id.clone(), tx);
        self.shared
            .queue_tx
            .send((request_id.clone(), event))
            .expect("queue open");
        Invocation {
            request_id,
            body,
            sent: Instant::now(),
        }
    }

    /// Waits until at least `n` `/invocation/next` polls are parked at once.
    pub async fn wait_polling(&self, n: usize, within: Duration) {
        if !self.polling_reached(n, within).await {
            panic!(
                "{n} polls of /invocation/next were not parked at once within {within:?} \
                 (now {})",
                *self.shared.polling.borrow()
            )
        }
    }

    /// Whether at least `n` `/invocation/next` polls are parked at once within `within`.
    pub async fn polling_reached(&self, n: usize, within: Duration) -> bool {
        let mut rx = self.shared.polling.subscribe();
        match tokio::time::timeout(within, rx.wait_for(|p| *p >= n)).await {
            Ok(r) => {
                r.expect("fake alive");
                true
            }
            Err(_) => false,
        }
    }

    /// `/invocation/next` polls parked now.
    pub fn polling(&self) -> usize {
        *self.shared.polling.borrow()
    }

    /// Most responses that were streaming at the same time.
    pub fn max_streaming(&self) -> usize {
        self.shared.max_streaming.load(Ordering::SeqCst)
    }

    /// Waits until the runtime parks on `/restore/next`.
    pub async fn wait_restore_parked(&self, within: Duration) {
        let mut rx = self.shared.restore_parked.subscribe();
        tokio::time::timeout(within, rx.wait_for(|p| *p))
            .await
            .unwrap_or_else(|_| panic!("the runtime did not call /restore/next within {within:?}"))
            .expect("fake alive");
    }

    /// Simulates a SnapStart restore: answers the parked `/restore/next`, then drops every
    /// connection the environment had when it was snapshotted, once the runtime has opened a new
    /// one (which it must: those connections do not survive a restore).
    pub async fn restore(&self) {
        let old: Vec<JoinHandle<()>> = self.connections.lock().unwrap().drain(..).collect();
        let mut accepted = self.accepted.clone();
        let before = *accepted.borrow_and_update();
        let answer = self
            .shared
            .restore
            .lock()
            .unwrap()
            .take()
            .expect("/restore/next is parked");
        answer.send(()).expect("the restore poll is waiting");
        tokio::time::timeout(Duration::from_secs(30), accepted.wait_for(|n| *n > before))
            .await
            .expect("the runtime opened a new Runtime API connection after the restore")
            .expect("fake alive");
        for task in old {
            task.abort();
        }
    }

    /// Waits for a post to `path` (e.g. `restore/error`).
    pub async fn wait_posted(&self, path: &str, within: Duration) -> Posted {
        let mut rx = self.shared.posted_changed.subscribe();
        let found = tokio::time::timeout(within, async {
            loop {
                if let Some(p) = self
                    .shared
                    .posted
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|p| p.path == path)
                {
                    return p.clone();
                }
                rx.changed().await.expect("fake alive");
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "nothing was posted to {path} within {within:?}; posted: {:?}",
                self.posted()
            )
        })
    }

    /// Everything posted to the error endpoints so far.
    pub fn posted(&self) -> Vec<Posted> {
        self.shared.posted.lock().unwrap().clone()
    }
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.accept.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

impl Invocation {
    /// Reads the response up to the SRI `end` event (bounded by `within`), after the prelude
    /// and its 8-NUL separator, timing each event from when the invocation was queued.
    pub async fn events(&mut self, within: Duration) -> Vec<(Duration, Event)> {
        let sent = self.sent;
        let mut events = Vec::new();
        let read = async {
            let mut head = Vec::new();
            let rest = loop {
                let Some(b) = self.body.recv().await else {
                    panic!(
                        "the response ended inside its prelude: {:?}",
                        String::from_utf8_lossy(&head)
                    )
                };
                head.extend_from_slice(&b);
                if let Some(at) = head.windows(8).position(|w| w == [0u8; 8]) {
                    let prelude: Value = serde_json::from_slice(&head[..at]).expect("JSON prelude");
                    assert_eq!(prelude["statusCode"], 200, "{prelude}");
                    break Bytes::copy_from_slice(&head[at + 8..]);
                }
            };
            let body = &mut self.body;
            let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(rest) })
                .chain(futures_util::stream::poll_fn(move |cx| {
                    body.poll_recv(cx).map(|b| b.map(Ok))
                }));
            let mut events_stream = sse::decode(Box::pin(stream));
            while let Some(e) = events_stream.next().await {
                let e = e.expect("valid SSE");
                let end = e.kind == EventKind::End;
                events.push((sent.elapsed(), e));
                if end {
                    break;
                }
            }
        };
        if tokio::time::timeout(within, read).await.is_err() {
            panic!(
                "invocation {} did not end within {within:?}; events so far: {:?}",
                self.request_id,
                events.iter().map(|(_, e)| e.kind).collect::<Vec<_>>()
            );
        }
        events
    }

    /// Reads the whole response (bounded by `within`): it is complete when the runtime's
    /// `POST …/response` has ended. Panics, naming the invocation, when it ends without a
    /// prelude (e.g. the runtime posted to `…/error` instead) or is not done in time.
    pub async fn complete(mut self, within: Duration) -> Completed {
        let mut all = Vec::new();
        let read = async {
            while let Some(b) = self.body.recv().await {
                all.extend_from_slice(&b);
            }
        };
        if tokio::time::timeout(within, read).await.is_err() {
            panic!(
                "invocation {} did not complete within {within:?} ({} bytes so far)",
                self.request_id,
                all.len()
            );
        }
        let latency = self.sent.elapsed();
        let Some(at) = all.windows(8).position(|w| w == [0u8; 8]) else {
            panic!(
                "invocation {} ended without a streamed prelude: {:?}",
                self.request_id,
                String::from_utf8_lossy(&all)
            )
        };
        let prelude = serde_json::from_slice(&all[..at]).unwrap_or_else(|e| {
            panic!(
                "invocation {}: the prelude is not JSON ({e}): {:?}",
                self.request_id,
                String::from_utf8_lossy(&all[..at])
            )
        });
        Completed {
            latency,
            prelude,
            body: Bytes::copy_from_slice(&all[at + 8..]),
        }
    }

    /// Waits for the first bytes of the response (the runtime has taken the event and
    /// started answering).
    pub async fn started(&mut self, within: Duration) -> Bytes {
        tokio::time::timeout(within, self.body.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "invocation {} not answered within {within:?}",
                    self.request_id
                )
            })
            .expect("a response body")
    }
}

/// A Function URL (payload 2.0) event for `POST /invoke?action=invoke_tool`, shaped as AWS
/// sends it, so that both `lambda_http` (LWA) and the bootstrap read it as a Function URL
/// request.
fn function_url_event(headers: &http::HeaderMap, body: &[u8]) -> Value {
    let mut h = serde_json::Map::new();
    for (k, v) in headers {
        h.insert(k.as_str().to_owned(), json!(v.to_str().unwrap()));
    }
    h.insert("content-type".into(), json!("application/json"));
    h.insert("host".into(), json!("fake.lambda-url.us-east-1.on.aws"));
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/invoke",
        "rawQueryString": "action=invoke_tool",
        "headers": h,
        "queryStringParameters": {"action": "invoke_tool"},
        "body": std::str::from_utf8(body).expect("UTF-8 body"),
        "isBase64Encoded": false,
        "requestContext": {
            "accountId": "anonymous",
            "apiId": "fake",
            "domainName": "fake.lambda-url.us-east-1.on.aws",
            "domainPrefix": "fake",
            "requestId": format!("req-{}", crate::nonce()),
            "routeKey": "$default",
            "stage": "$default",
            "time": "01/Jan/2026:00:00:00 +0000",
            "timeEpoch": epoch,
            "http": {
                "method": "POST",
                "path": "/invoke",
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "sri-tests",
            },
        },
    })
}

async fn next(State(s): State<Arc<Shared>>) -> Response {
    s.polling.send_modify(|p| *p += 1);
    // Counted down however the poll ends (answered, or its connection dropped).
    struct Parked(Arc<Shared>);
    impl Drop for Parked {
        fn drop(&mut self) {
            self.0.polling.send_modify(|p| *p -= 1);
        }
    }
    let parked = Parked(s.clone());
    let (id, event) = {
        let mut q = s.queue_rx.lock().await;
        q.recv().await.expect("queue open")
    };
    drop(parked);
    let deadline = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 600_000;
    (
        [
            ("lambda-runtime-aws-request-id", id),
            ("lambda-runtime-deadline-ms", deadline.to_string()),
            (
                "lambda-runtime-invoked-function-arn",
                "arn:aws:lambda:us-east-1:000000000000:function:fake".to_owned(),
            ),
            ("content-type", "application/json".to_owned()),
        ],
        event.to_string(),
    )
        .into_response()
}

async fn response(State(s): State<Arc<Shared>>, Path(id): Path<String>, body: Body) -> StatusCode {
    let Some(tx) = s.responses.lock().unwrap().remove(&id) else {
        return StatusCode::BAD_REQUEST;
    };
    let now = s.streaming.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_streaming.fetch_max(now, Ordering::SeqCst);
    let mut frames = body.into_data_stream();
    while let Some(Ok(b)) = frames.next().await {
        let _ = tx.send(b);
    }
    s.streaming.fetch_sub(1, Ordering::SeqCst);
    StatusCode::ACCEPTED
}

fn record(s: &Shared, path: &str, headers: &HeaderMap, body: &[u8]) {
    let error_type = headers
        .get("lambda-runtime-function-error-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body =
        serde_json::from_slice(body).unwrap_or_else(|_| json!(String::from_utf8_lossy(body)));
    s.posted.lock().unwrap().push(Posted {
        path: path.to_owned(),
        error_type,
        body,
    });
    s.posted_changed.send_modify(|n| *n += 1);
}

async fn invocation_error(
    State(s): State<Arc<Shared>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    s.responses.lock().unwrap().remove(&id);
    record(&s, "invocation/error", &headers, &body);
    StatusCode::ACCEPTED
}

async fn init_error(State(s): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    record(&s, "init/error", &headers, &body);
    StatusCode::ACCEPTED
}

async fn restore_error(
    State(s): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    record(&s, "restore/error", &headers, &body);
    StatusCode::ACCEPTED
}

async fn restore_next(State(s): State<Arc<Shared>>) -> StatusCode {
    let (tx, rx) = oneshot::channel();
    *s.restore.lock().unwrap() = Some(tx);
    s.restore_parked.send_replace(true);
    // Parked while the environment is snapshotted; answered in each restored copy.
    let _ = rx.await;
    StatusCode::OK
}

async fn extension_register(State(s): State<Arc<Shared>>) -> Response {
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    (
        [("lambda-extension-identifier", format!("fake-ext-{n}"))],
        axum::Json(json!({
            "functionName": "fake",
            "functionVersion": "$LATEST",
            "handler": "bootstrap",
        })),
    )
        .into_response()
}

async fn extension_next() -> StatusCode {
    // No event is subscribed to: parked until the connection goes (restore, shutdown, drop).
    std::future::pending::<()>().await;
    StatusCode::OK
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fake's own contract, as a runtime sees it over HTTP: an extension registers and
    /// parks, an event is handed out with its request id, and a streamed response completes
    /// with its prelude split off.
    #[tokio::test]
    async fn extensions_park_and_a_streamed_response_completes() {
        let api = RuntimeApi::start().await;
        let base = format!("http://{}", api.addr);
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let reg = client
            .post(format!("{base}{EXT}/register"))
            .header("lambda-extension-name", "probe")
            .body(r#"{"events":[]}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(reg.status(), 200);
        let id = reg.headers()["lambda-extension-identifier"]
            .to_str()
            .unwrap()
            .to_owned();
        let parked = client
            .get(format!("{base}{EXT}/event/next"))
            .header("lambda-extension-identifier", id)
            .send();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), parked)
                .await
                .is_err(),
            "an extension with no events subscribed stays parked"
        );

        let inv = api.invoke_unsigned(Bytes::from_static(b"{\"session_id\":\"s\"}"));
        let next = client
            .get(format!("{base}{V}/invocation/next"))
            .send()
            .await
            .unwrap();
        let rid = next.headers()["lambda-runtime-aws-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(rid, inv.request_id);
        let event: Value = next.json().await.unwrap();
        assert_eq!(event["rawPath"], "/invoke");
        assert_eq!(event["requestContext"]["http"]["method"], "POST");
        let signature = connector::protocol::signing::HEADER_SIGNATURE;
        assert!(
            event["headers"].get(signature).is_none(),
            "unsigned: {event}"
        );
        let mut streamed = br#"{"statusCode":200}"#.to_vec();
        streamed.extend_from_slice(&[0; 8]);
        streamed.extend_from_slice(b"data");
        let posted = client
            .post(format!("{base}{V}/invocation/{rid}/response"))
            .body(streamed)
            .send()
            .await
            .unwrap();
        assert_eq!(posted.status(), 202);
        let done = inv.complete(Duration::from_secs(10)).await;
        assert_eq!(done.prelude["statusCode"], 200);
        assert_eq!(&done.body[..], b"data");
    }
}
