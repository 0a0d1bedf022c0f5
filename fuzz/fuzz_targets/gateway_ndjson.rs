//! The gateway's NDJSON rewriter (`connector::gateway`): a function's SSE, whatever it is,
//! becomes the daemon's `{…}\n\n` lines. Driven end to end: a loopback function answers with
//! the fuzzer's bytes (in its pieces), and the real router serves the daemon's call.
//!
//! Oracle: the SSE decoded independently. A stream that reaches `end` comes out as exactly its
//! plugin objects, each on one line; any other stream (an object of several `data:` lines
//! included) as the objects before the break, then a session error and `end`. No line holds a
//! line break; nothing follows `end`.
#![no_main]

use axum::Router;
use axum::body::Body;
use axum::response::IntoResponse;
use axum::routing::post;
use bytes::Bytes;
use connector::backend::{Backend, Function, Progress};
use connector::capability::Capabilities;
use connector::client::{Client, ClientOptions};
use connector::gateway::MAX_LINE;
use connector::launch::Launcher;
use connector::package::Package;
use connector::protocol::events::{self, EventKind};
use connector::protocol::signing::{Key, KeyRing};
use connector::protocol::sse::{Decoder, Item};
use connector::server::{AppState, Limits, router};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{pieces, runtime, split};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tower::ServiceExt;

const SESSION: &str = "s1";
const ENVELOPE: &str = r#"{"session_id":"s1","event":"request","data":{"action":"invoke_tool"}}"#;

/// The pieces the function sends next.
static BODY: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

async fn function() -> axum::response::Response {
    let parts = std::mem::take(&mut *BODY.lock().unwrap());
    let stream =
        futures_util::stream::iter(parts.into_iter().map(Ok::<_, std::convert::Infallible>));
    (
        [("content-type", "text/event-stream")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// One function, `fn1`, at the loopback server.
struct Fixed(String);

impl Backend for Fixed {
    fn deploy<'a>(
        &'a self,
        _: &'a Package,
        _: Progress,
    ) -> BoxFuture<'a, Result<Function, connector::Error>> {
        async { Err(connector::Error::Backend("not here".into())) }.boxed()
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
    fn remove<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), connector::Error>> {
        async { Ok(()) }.boxed()
    }
    fn gc(&self, _: usize) -> BoxFuture<'_, Result<Vec<String>, connector::Error>> {
        async { Ok(vec![]) }.boxed()
    }
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

struct Setup {
    app: Router,
    path: String,
    max_event: usize,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        runtime().block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", l.local_addr().unwrap());
            tokio::spawn(async move {
                axum::serve(l, Router::new().route("/invoke", post(function)))
                    .await
                    .unwrap()
            });
            let ring = KeyRing::new(vec![Key::new("k1", vec![7u8; 32]).unwrap()]).unwrap();
            let caps = Capabilities::from_ring(&ring);
            let path = format!(
                "/v1/functions/fn1/{}/invoke?action=invoke_tool",
                caps.token("fn1")
            );
            let options = ClientOptions {
                attempts: 1,
                backoff: Duration::from_millis(1),
                // Small enough that the fuzzer reaches the cap.
                max_event_bytes: 4096,
                ..ClientOptions::default()
            };
            let max_event = options.max_event_bytes;
            let backend: Arc<dyn Backend> = Arc::new(Fixed(url));
            let state = AppState {
                launcher: Arc::new(Launcher::new(
                    backend.clone(),
                    "http://127.0.0.1".into(),
                    caps,
                )),
                backend,
                client: Client::new(ring, options),
                metrics: Default::default(),
                api_key: "key".into(),
                intake: Arc::new(
                    connector::intake::Intake::new(Default::default(), std::env::temp_dir())
                        .unwrap(),
                ),
                require_verified: false,
                max_request_bytes: 1 << 20,
                start_wait: Duration::from_millis(100),
                limits: Limits::default(),
                legacy_endpoints: false,
                relay_sessions: Default::default(),
            };
            Setup {
                app: router(Arc::new(state)),
                path,
                max_event,
            }
        })
    })
}

/// What the daemon must receive, by the protocol: the plugin objects up to `end`, and whether
/// the stream completed.
fn expected(sse: &[u8], max_event: usize) -> (Vec<Bytes>, bool) {
    let mut d = Decoder::new(max_event);
    d.push(sse);
    let mut out = Vec::new();
    while let Ok(Some(item)) = d.next_item() {
        let Item::Event(ev) = item else { continue };
        if ev.data.contains(&b'\n') {
            return (out, false);
        }
        match ev.kind {
            EventKind::Start | EventKind::Usage => {}
            _ if ev.data.len() > MAX_LINE => return (out, false),
            kind => {
                out.push(ev.data);
                if kind == EventKind::End {
                    return (out, true);
                }
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let (control, sse) = split(data);
    let setup = setup();
    *BODY.lock().unwrap() = pieces(sse, control.sizes)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    let req = http::Request::post(&setup.path)
        .body(Body::from(ENVELOPE))
        .unwrap();
    let (status, body) = runtime().block_on(async {
        let resp = setup.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        (
            status,
            axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap(),
        )
    });
    if status != 200 {
        assert_ne!(status, 502, "the daemon would resend a 502");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("refusals are JSON");
        assert!(
            v["errorType"].is_string() && v["errorMessage"].is_string(),
            "{v}"
        );
        return;
    }
    let (objects, complete) = expected(sse, setup.max_event);
    let mut want = Vec::new();
    for o in &objects {
        want.extend_from_slice(o);
        want.extend_from_slice(b"\n\n");
    }
    for o in &objects {
        assert!(
            !o.contains(&b'\n'),
            "a plugin object with a line break reaches the daemon: {o:?}"
        );
    }
    if complete {
        assert_eq!(body, want, "a complete stream is passed through exactly");
        return;
    }
    let rest = body.strip_prefix(want.as_slice()).unwrap_or_else(|| {
        panic!("the objects before the break are not passed through: {body:?} vs {want:?}")
    });
    let end = [events::session_end(SESSION).as_ref(), b"\n\n"].concat();
    let error = rest
        .strip_suffix(end.as_slice())
        .expect("a broken stream ends with `end`");
    let error = error.strip_suffix(b"\n\n").expect("one error line");
    let v: serde_json::Value = serde_json::from_slice(error).expect("the error line is JSON");
    assert_eq!(v["data"]["type"], "error", "{v}");
    assert_eq!(
        v["data"]["data"]["error_type"], "FunctionStreamBroken",
        "{v}"
    );
});
