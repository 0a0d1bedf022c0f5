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
use connector::capability::Capabilities;
use connector::client::{Client, ClientOptions, InvokeError};
use connector::launch::Launcher;
use connector::package::Package;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::signing::{Key, KeyRing};
use connector::protocol::sse;
use connector::server::{AppState, Limits, router};
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
    /// 500 with a new error type per attempt (`Junk<n>`).
    JunkError,
    /// `start`, then one event of endless 1 KiB `data:` lines.
    EndlessEvent,
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
        Script::JunkError => (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"errorType": format!("Junk{n}"), "errorMessage": "junk"}).to_string(),
        )
            .into_response(),
        Script::EndlessEvent => {
            let head = sse::encode(&Event::new(EventKind::Start, Some(1), "{}"));
            let line = Bytes::from(format!("data: {}\n", "x".repeat(1018)));
            let parts = futures_util::stream::iter(0..).map(move |i: u64| {
                Ok::<_, std::convert::Infallible>(match i {
                    0 => head.clone(),
                    1 => Bytes::from_static(b"event: chunk\n"),
                    _ => line.clone(),
                })
            });
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(parts),
            )
                .into_response()
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

/// A backend whose one function is known but never ready (restarting for good).
struct Restarting;

impl Backend for Restarting {
    fn deploy<'a>(&'a self, _: &'a Package, _: Progress) -> BoxFuture<'a, Result<Function, Error>> {
        async { Err(Error::Backend("not here".into())) }.boxed()
    }
    fn find(&self, _: &str) -> Option<Function> {
        None
    }
    fn list(&self) -> Vec<Function> {
        Fixed(String::new()).list()
    }
    fn target(&self, _: &str) -> Option<connector::transport::Target> {
        None
    }
    fn wait_target<'a>(
        &'a self,
        _: &'a str,
        within: Duration,
    ) -> BoxFuture<'a, Option<connector::transport::Target>> {
        async move {
            tokio::time::sleep(within).await;
            None
        }
        .boxed()
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

fn caps() -> Capabilities {
    Capabilities::from_ring(&ring())
}

fn fast() -> ClientOptions {
    ClientOptions {
        backoff: Duration::from_millis(10),
        idle_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

async fn start_gateway(target: String) -> String {
    start_gateway_with(target, |_| {}).await
}

async fn start_gateway_with(target: String, tweak: impl FnOnce(&mut AppState)) -> String {
    start_gateway_on(Arc::new(Fixed(target)), tweak).await
}

/// A gateway over `backend` on a loopback port, `tweak`ed from the tests' defaults.
async fn start_gateway_on(backend: Arc<dyn Backend>, tweak: impl FnOnce(&mut AppState)) -> String {
    let mut state = AppState {
        launcher: Arc::new(Launcher::new(
            backend.clone(),
            "http://127.0.0.1".into(),
            caps(),
        )),
        backend,
        client: Client::new(ring(), fast()),
        metrics: Default::default(),
        api_key: "key".into(),
        intake: Arc::new(
            connector::intake::Intake::new(Default::default(), std::env::temp_dir()).unwrap(),
        ),
        require_verified: false,
        max_request_bytes: 1 << 20,
        start_wait: Duration::from_millis(100),
        limits: Limits::default(),
        legacy_endpoints: false,
        relay_sessions: Default::default(),
    };
    tweak(&mut state);
    let state = Arc::new(state);
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

/// Calls the gateway like the daemon (unsigned, at the function's capability endpoint) and
/// splits its NDJSON.
async fn daemon_call(gateway: &str, name: &str) -> (u16, Vec<Value>, String) {
    let endpoint = format!("{gateway}/v1/functions/{name}/{}", caps().token(name));
    call_at(&format!("{endpoint}/invoke?action=invoke_tool")).await
}

/// Posts the envelope to `url` and splits the NDJSON answer.
async fn call_at(url: &str) -> (u16, Vec<Value>, String) {
    let resp = reqwest::Client::new()
        .post(url)
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

    // Unreachable function: nothing ran, and the client has retried already, so 503 (never a
    // 502, which the daemon would resend three times more).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start_gateway(format!("http://{closed}")).await;
    let (status, _, text) = daemon_call(&gw, "fn1").await;
    assert_eq!(status, 503);
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
    let (target, seen) = start_function(vec![Script::Status(503, "")]).await;
    let err = client
        .invoke(&target, "invoke_tool", Bytes::from(ENVELOPE), None)
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, InvokeError::Rejected { status: 503, .. }),
        "{err}"
    );
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 3);

    // A function's 502 may come from a call it acted on (a crash mid-call): never resent.
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
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 1);
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

/// Callers without the function's token get one and the same 404, whatever they tried, and the
/// function is never called; names outside the grammar are refused before anything else.
#[tokio::test]
async fn only_the_capability_endpoint_reaches_the_function() {
    let (target, seen) = start_function(vec![Script::Events(vec![chunk("ok"), end()])]).await;
    let gw = start_gateway(target.clone()).await;
    let token = caps().token("fn1");
    let other = caps().token("fn2");
    let foreign = Capabilities::from_ring(
        &KeyRing::new(vec![Key::new("k1", vec![8u8; 32]).unwrap()]).unwrap(),
    )
    .token("fn1");
    let mut bodies = Vec::new();
    for path in [
        "fn1/invoke".to_owned(),                  // no token (a pre-token endpoint)
        format!("fn1/{}/invoke", "A".repeat(32)), // a wrong token
        format!("fn1/{}/invoke", &token[..31]),   // a truncated one
        format!("fn1/{other}/invoke"),            // another function's token
        format!("fn1/{foreign}/invoke"),          // a token made with another key
        format!("sri-guessed-0123456789ab/{token}/invoke"), // a guessed name
        format!("fn2/{other}/invoke"),            // a valid token, no such function
        format!("fn2/{token}/invoke"),
    ] {
        let (status, _, text) =
            call_at(&format!("{gw}/v1/functions/{path}?action=invoke_tool")).await;
        assert_eq!(status, 404, "{path}: {text}");
        bodies.push(text);
    }
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        1,
        "every refusal is the same answer: {bodies:?}"
    );
    let v: Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(v["errorType"], "FunctionNotFound");
    assert!(
        v["errorMessage"].as_str().unwrap().contains("re-launched"),
        "{v}"
    );
    for bad in ["..", "%2E%2E", "a%2Fb", "%2Fetc", "A", "fn1.x", "-x"] {
        // Raw: an HTTP client would resolve the dot segments before sending.
        let path = format!("/v1/functions/{bad}/{token}/invoke?action=invoke_tool");
        let (status, text) = raw_post(&gw, &path).await;
        assert_eq!(status, 400, "{bad}: {text}");
        assert!(text.contains("not a function name"), "{bad}: {text}");
    }
    assert_eq!(
        seen.attempts.load(Ordering::SeqCst),
        0,
        "the function was called"
    );
    let metrics = reqwest::get(format!("{gw}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("sri_invocations_total{"),
        "refused calls are not invocations: {metrics}"
    );

    // The endpoint the launch hands out works.
    let (status, lines, text) = daemon_call(&gw, "fn1").await;
    assert_eq!((status, lines.len()), (200, 2), "{text}");
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 1);

    // With the migration flag, the pre-token endpoint is served again.
    let gw = start_gateway_with(target, |s| s.legacy_endpoints = true).await;
    let (status, lines, text) =
        call_at(&format!("{gw}/v1/functions/fn1/invoke?action=invoke_tool")).await;
    assert_eq!((status, lines.len()), (200, 2), "{text}");
}

/// The daemon resends a call answered 502 (3 attempts in all); the client retries what did not
/// run. Together: at most 3 calls of a function for one daemon call.
#[tokio::test]
async fn a_function_answering_502_is_called_at_most_3_times_per_daemon_call() {
    for (script, most) in [
        (
            Script::Status(502, r#"{"errorType":"Boom","errorMessage":"crashed"}"#),
            1,
        ),
        (Script::Status(502, "<html>bad gateway</html>"), 1),
        (
            Script::Status(
                503,
                r#"{"errorType":"PluginNotReady","errorMessage":"later"}"#,
            ),
            3,
        ),
    ] {
        let (target, seen) = start_function(vec![script]).await;
        let gw = start_gateway(target).await;
        // The daemon's policy (dify-wire.md): resend on 502, 3 attempts in all.
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let (status, _, _) = daemon_call(&gw, "fn1").await;
            statuses.push(status);
            if status != 502 {
                break;
            }
        }
        assert_eq!(
            statuses.len(),
            1,
            "the daemon had cause to resend: {statuses:?}"
        );
        let calls = seen.attempts.load(Ordering::SeqCst);
        assert!(
            calls <= 3 && calls == most,
            "{calls} calls (want {most}), answers {statuses:?}"
        );
    }
}

/// Actions and error types come from callers and plugins: the metrics keep a closed set. (The
/// RSS of a real `sri` under the same load is checked in `tests/e2e/hostile_callers.rs`.)
#[tokio::test]
async fn junk_actions_and_error_types_do_not_grow_the_metrics() {
    let (target, seen) = start_function(vec![Script::JunkError]).await;
    let gw = start_gateway(target).await;
    let endpoint = format!("{gw}/v1/functions/fn1/{}/invoke", caps().token("fn1"));
    let http = reqwest::Client::new();
    for round in 0..10 {
        let calls = (0..1000).map(|i| {
            let (http, endpoint) = (http.clone(), endpoint.clone());
            async move {
                let resp = http
                    .post(format!("{endpoint}?action=junk_{round}_{i}"))
                    .body(ENVELOPE)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 500);
            }
        });
        futures_util::stream::iter(calls)
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
    }
    assert_eq!(seen.attempts.load(Ordering::SeqCst), 10_000);
    let text = http
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    assert!(series < 100, "{series} series:\n{text}");
    assert!(
        text.contains(r#"sri_invocations_total{action="other"} 10000"#),
        "{text}"
    );
    assert!(
        text.contains(r#"sri_invocation_errors_total{error_type="other"} 10000"#),
        "{text}"
    );
}

/// A function that sends one event of endless `data:` lines is cut at the second (SRI data is
/// one line; the decoder's own cap on an event's lines is tested in `protocol::sse`), and the
/// daemon gets an explicit session error and `end`.
#[tokio::test]
async fn an_endless_multi_line_event_is_cut_at_its_second_line() {
    let (target, _) = start_function(vec![Script::EndlessEvent]).await;
    let gw = start_gateway_with(target, |s| {
        s.client = Client::new(
            ring(),
            ClientOptions {
                max_event_bytes: 256 * 1024,
                ..fast()
            },
        );
    })
    .await;
    let (status, lines, text) =
        tokio::time::timeout(Duration::from_secs(30), daemon_call(&gw, "fn1"))
            .await
            .expect("the endless event was never cut");
    assert_eq!(status, 200);
    assert_eq!(lines.len(), 2, "{text}");
    let message = lines[0]["data"]["data"]["message"].as_str().unwrap();
    assert!(
        message.contains("a `chunk` event's data spans several `data:` lines"),
        "{message}"
    );
    assert_eq!(lines[1]["data"]["type"], "end");
}

/// `POST path` with the envelope, sent as written (no URL normalization): status and body.
async fn raw_post(base: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{ENVELOPE}",
        ENVELOPE.len()
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    (status, text)
}

/// A call for a function that does not come back waits a bounded time, without reading (or
/// holding) its body, and gets a 503 the daemon does not resend.
#[tokio::test]
async fn a_call_for_a_restarting_function_waits_bounded_without_its_body() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = start_gateway_on(Arc::new(Restarting), |s| {
        s.start_wait = Duration::from_millis(300)
    })
    .await;
    let addr = gw.trim_start_matches("http://");
    // Announce a 1 MB body and send none of it.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/functions/fn1/{}/invoke?action=invoke_tool HTTP/1.1\r\nhost: x\r\n\
         content-length: 1000000\r\n\r\n",
        caps().token("fn1")
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("an answer without the body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.contains("PluginNotReady") && text.contains("SRI_RESTART_WAIT_SECS"),
        "{text}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(5),
        "waited {waited:?} for a 300 ms bound"
    );
}
