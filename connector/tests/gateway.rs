//! The gateway and the client against a scripted function on loopback: what the daemon sees
//! when a function misbehaves, and when the client retries.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use connector::Error;
use connector::backend::{Backend, Function, Progress};
use connector::client::{Client, ClientOptions, InvokeError};
use connector::launch::Launcher;
use connector::package::Package;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::signing::{Key, KeyRing};
use connector::protocol::sse;
use connector::server::{AppState, router};
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scripted function answers, per attempt.
#[derive(Clone)]
enum Script {
    /// Status and body, no stream.
    Status(u16, &'static str),
    /// SSE events (kind, data), then close.
    Events(Vec<(EventKind, String)>),
    /// `start`, then `n` keepalive comments `gap` apart, then a chunk and `end`.
    Keepalives(usize, Duration),
}

#[derive(Default)]
struct Seen {
    attempts: AtomicUsize,
    headers: Mutex<Vec<HeaderMap>>,
}

async fn function(
    State((scripts, seen)): State<(Arc<Vec<Script>>, Arc<Seen>)>,
    headers: HeaderMap,
) -> Response {
    let n = seen.attempts.fetch_add(1, Ordering::SeqCst);
    seen.headers.lock().unwrap().push(headers);
    match scripts[n.min(scripts.len() - 1)].clone() {
        Script::Status(code, body) => {
            (StatusCode::from_u16(code).unwrap(), body.to_owned()).into_response()
        }
        Script::Keepalives(n, gap) => {
            let head = sse::encode(&Event::new(EventKind::Start, Some(1), "{}"));
            let tail: Vec<u8> = [chunk("late"), end()]
                .iter()
                .flat_map(|(k, d)| sse::encode(&Event::new(*k, None, d.clone())).to_vec())
                .collect();
            let parts = futures_util::stream::iter(0..n + 2).then(move |i| {
                let (head, tail) = (head.clone(), tail.clone());
                async move {
                    if i > 0 {
                        tokio::time::sleep(gap).await;
                    }
                    Ok::<_, std::convert::Infallible>(match i {
                        0 => head,
                        i if i == n + 1 => Bytes::from(tail),
                        _ => Bytes::from_static(sse::KEEPALIVE),
                    })
                }
            });
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(parts),
            )
                .into_response()
        }
        Script::Events(evs) => {
            let body: Vec<u8> = evs
                .iter()
                .enumerate()
                .flat_map(|(i, (k, d))| {
                    sse::encode(&Event::new(*k, Some(i as u64 + 1), d.clone())).to_vec()
                })
                .collect();
            ([("content-type", "text/event-stream")], body).into_response()
        }
    }
}

async fn start_function(scripts: Vec<Script>) -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/invoke", post(function))
        .with_state((Arc::new(scripts), seen.clone()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

/// A backend with one function at a fixed target.
struct Fixed(String);

impl Backend for Fixed {
    fn deploy<'a>(&'a self, _: &'a Package, _: Progress) -> BoxFuture<'a, Result<Function, Error>> {
        async { Err(Error::Backend("not here".into())) }.boxed()
    }
    fn find(&self, _: &str) -> Option<Function> {
        None
    }
    fn list(&self) -> Vec<Function> {
        vec![Function {
            name: "fn1".into(),
            identifier: "a/b:1@x".into(),
            checksum: "x".into(),
        }]
    }
    fn target(&self, name: &str) -> Option<connector::transport::Target> {
        (name == "fn1").then(|| connector::transport::Target::http(self.0.clone()))
    }
    fn remove<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        async { Ok(()) }.boxed()
    }
    fn gc(&self, _: usize) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        async { Ok(vec![]) }.boxed()
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

/// Invokes the scripted function and collects its whole stream.
async fn invoke_all(client: &Client, target: &str) -> Vec<Result<Event, InvokeError>> {
    client
        .invoke(target, "invoke_tool", Bytes::from(ENVELOPE), None)
        .await
        .unwrap()
        .collect()
        .await
}

fn ring() -> KeyRing {
    KeyRing::new(vec![Key::new("k1", vec![7u8; 32]).unwrap()]).unwrap()
}

fn fast() -> ClientOptions {
    ClientOptions {
        backoff: Duration::from_millis(10),
        idle_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

async fn start_gateway(target: String) -> String {
    let backend: Arc<dyn Backend> = Arc::new(Fixed(target));
    let state = Arc::new(AppState {
        launcher: Arc::new(Launcher::new(backend.clone(), "http://127.0.0.1".into())),
        backend,
        client: Client::new(ring(), fast()),
        metrics: Default::default(),
        api_key: "key".into(),
        max_package_bytes: 1 << 20,
        max_request_bytes: 1 << 20,
        start_wait: Duration::from_millis(100),
    });
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, router(state)).await.unwrap() });
    format!("http://{addr}")
}

const ENVELOPE: &str = r#"{"session_id":"s1","conversation_id":null,"message_id":null,"app_id":null,"endpoint_id":null,"context":{},"event":"request","data":{"action":"invoke_tool","tool":"t"}}"#;

fn chunk(text: &str) -> (EventKind, String) {
    (EventKind::Chunk, json!({"event":"session","session_id":"s1","data":{"type":"stream","data":{"type":"text","message":{"text":text}}}}).to_string())
}

fn end() -> (EventKind, String) {
    (
        EventKind::End,
        r#"{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}"#.into(),
    )
}

/// Calls the gateway like the daemon (unsigned) and splits its NDJSON.
async fn daemon_call(gateway: &str, name: &str) -> (u16, Vec<Value>, String) {
    let resp = reqwest::Client::new()
        .post(format!(
            "{gateway}/v1/functions/{name}/invoke?action=invoke_tool"
        ))
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(ENVELOPE)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let lines = text
        .split("\n\n")
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    (status, lines, text)
}

#[tokio::test]
async fn plugin_objects_pass_through_byte_for_byte_as_ndjson() {
    let c = chunk("héllo");
    let (target, seen) = start_function(vec![Script::Events(vec![
        (
            EventKind::Start,
            r#"{"session_id":"s1","request_id":"r","cold_start":false}"#.into(),
        ),
        c.clone(),
        (EventKind::Usage, r#"{"chunks":1}"#.into()),
        end(),
    ])])
    .await;
    let gw = start_gateway(target).await;
    let (status, lines, text) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 200);
    assert_eq!(
        text,
        format!("{}\n\n{}\n\n", c.1, end().1),
        "exact bytes, start/usage not forwarded"
    );
    assert_eq!(lines.len(), 2);
    // The function got a signed request, with the trace context.
    let h = seen.headers.lock().unwrap()[0].clone();
    assert!(
        h["x-dify-plugin-signature"]
            .to_str()
            .unwrap()
            .starts_with("v2=")
    );
    assert!(h["x-dify-plugin-nonce"].len() >= 24, "a nonce of ≥ 96 bits");
    assert_eq!(h["x-dify-plugin-session"], "s1");
    assert_eq!(
        h["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
}

#[tokio::test]
async fn a_stream_without_end_becomes_an_explicit_error() {
    let (target, _) = start_function(vec![Script::Events(vec![chunk("a")])]).await;
    let gw = start_gateway(target).await;
    let (status, lines, _) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert_eq!(lines[1]["data"]["type"], "error");
    assert_eq!(
        lines[1]["data"]["data"]["error_type"],
        "FunctionStreamBroken"
    );
    assert!(lines[1]["data"]["data"]["args"].as_object().unwrap().len() <= 10);
    assert_eq!(lines[2]["data"]["type"], "end");
}

#[tokio::test]
async fn an_oversized_object_is_never_forwarded() {
    let big = "x".repeat(6 * 1024 * 1024);
    let (target, _) = start_function(vec![Script::Events(vec![chunk(&big), end()])]).await;
    let gw = start_gateway(target).await;
    let (status, lines, text) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 200);
    assert!(text.len() < 64 * 1024, "the big line was forwarded");
    assert!(
        lines[0]["data"]["data"]["message"]
            .as_str()
            .unwrap()
            .contains("line limit"),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap()["data"]["type"], "end");
}

#[tokio::test]
async fn failures_before_anything_ran_are_non_2xx_the_daemon_can_show() {
    let (target, seen) = start_function(vec![Script::Status(
        401,
        r#"{"errorType":"Sri.Unauthorized","errorMessage":"bad signature: …"}"#,
    )])
    .await;
    let gw = start_gateway(target).await;
    let (status, _, text) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 401);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["errorType"], "Sri.Unauthorized");
    assert_eq!(
        seen.attempts.load(Ordering::SeqCst),
        1,
        "401 is not retried"
    );

    let (status, _, text) = daemon_call(&gw, "nope").await;
    assert_eq!(status, 404);
    assert!(text.contains("FunctionNotFound"));

    // Unreachable function: nothing ran, so 502 (the daemon may retry).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_gateway(format!("http://{closed}")).await;
    let (status, _, text) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 502);
    assert!(text.contains("FunctionUnreachable"), "{text}");
}

#[tokio::test]
async fn the_client_retries_only_before_the_first_byte() {
    let (target, seen) = start_function(vec![
        Script::Status(
            503,
            r#"{"errorType":"PluginNotReady","errorMessage":"starting"}"#,
        ),
        Script::Status(429, "slow down"),
        Script::Events(vec![chunk("ok"), end()]),
    ])
    .await;
    let client = Client::new(ring(), fast());
    let events: Vec<_> = invoke_all(&client, &target).await;
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(events.len(), 2);

    // A stream that started and then broke is not retried: the caller gets the error.
    let (target, seen) = start_function(vec![Script::Events(vec![chunk("a")])]).await;
    let events: Vec<_> = invoke_all(&client, &target).await;
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 1);
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events[0].is_ok(), "{events:?}");
    assert!(
        matches!(&events[1], Err(InvokeError::Broken(m)) if m.contains("without an `end`")),
        "a stream without `end` ends with an explicit error: {events:?}"
    );

    // Retries are bounded.
    let (target, seen) = start_function(vec![Script::Status(502, "")]).await;
    let err = client
        .invoke(&target, "invoke_tool", Bytes::from(ENVELOPE), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, InvokeError::Rejected { status: 502, .. }),
        "{err}"
    );
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn keepalives_keep_a_silent_stream_from_timing_out() {
    // Silent for 3× the idle timeout, with keepalives at half of it: not a broken stream.
    let (target, _) = start_function(vec![Script::Keepalives(6, Duration::from_millis(100))]).await;
    let client = Client::new(
        ring(),
        ClientOptions {
            idle_timeout: Duration::from_millis(200),
            ..fast()
        },
    );
    let events: Vec<_> = invoke_all(&client, &target).await;
    assert!(events.iter().all(Result::is_ok), "{events:?}");
    assert_eq!(events.len(), 3, "start, chunk, end");

    // Without keepalives the same silence is an error.
    let (target, _) = start_function(vec![Script::Keepalives(0, Duration::from_millis(600))]).await;
    let events: Vec<_> = invoke_all(&client, &target).await;
    assert!(
        matches!(events.last(), Some(Err(InvokeError::Broken(_)))),
        "{events:?}"
    );
}

/// A function on HTTP/1.1 and h2c (as `bootstrap serve` is) that records each request's HTTP
/// version, answers `start` and then holds the stream open.
async fn start_versioned_function() -> (String, Arc<Mutex<Vec<http::Version>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let seen: Arc<Mutex<Vec<http::Version>>> = Default::default();
    let app = Router::new()
        .route(
            "/invoke",
            post(
                |State(seen): State<Arc<Mutex<Vec<http::Version>>>>,
                 req: axum::extract::Request| async move {
                    seen.lock().unwrap().push(req.version());
                    let start = sse::encode(&Event::new(EventKind::Start, Some(1), "{}"));
                    let body = futures_util::stream::once(async { Ok::<_, Error>(start) })
                        .chain(futures_util::stream::pending());
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(axum::body::Body::from_stream(body))
                        .unwrap()
                },
            ),
        )
        .with_state(seen.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = l.accept().await.unwrap();
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn h2c_targets_get_dedicated_connections_first_then_share_h2c() {
    let (url, seen) = start_versioned_function().await;
    let client = Client::new(
        ring(),
        ClientOptions {
            dedicated_streams: 1,
            ..fast()
        },
    );
    let target = connector::transport::Target::h2c(url);
    let open = || async {
        let mut s = client
            .invoke_target(&target, "invoke_tool", Bytes::from(ENVELOPE), None)
            .await
            .expect("the stream opens");
        let first = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("`start` within 10 s");
        assert_eq!(first.unwrap().unwrap().kind, EventKind::Start);
        s
    };
    let a = open().await;
    let b = open().await;
    let c = open().await;
    // The dedicated place is given back when its stream is dropped.
    drop(a);
    let d = open().await;
    use http::Version;
    assert_eq!(
        *seen.lock().unwrap(),
        [
            Version::HTTP_11,
            Version::HTTP_2,
            Version::HTTP_2,
            Version::HTTP_11
        ],
        "one dedicated HTTP/1.1 stream at a time, the others on h2c"
    );
    drop((b, c, d));
}
