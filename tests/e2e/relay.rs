//! The relay (issue #11): plugins call Dify back through the connector's signed relay, and the
//! daemon's port is never exposed. A real SDK plugin (`fixtures/plugins/callbacks`) makes a
//! streamed LLM call, a tool call and a storage call through the local backend (and under
//! `cargo lambda`) against a fake daemon route that behaves like the daemon's; calls that are
//! unsigned, badly or stalely signed, for another function's session, for a session not in
//! flight, or replayed are refused without the daemon ever being called; a daemon that is down,
//! slow or answers 400 fails the plugin's call with a clear error.

use bytes::Bytes;
use connector::protocol::relay::{ACTION, HEADER_CLAIM, HEADER_FUNCTION, TRANSACTION_PATH};
use connector::protocol::signing::KeyRing;
use connector::relay::claim;
use harness::daemon::FakeDaemon;
use harness::difypkg::Package;
use harness::godaemon::{GoDaemon, InvokeOutcome};
use harness::sri::{Connector, ConnectorOptions};
use harness::{Py, SECRET_A, envelope, now, plugin_dir, session_id, signer, tool_data};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const LAUNCH_BUDGET: Duration = Duration::from_secs(180);
const INVOKE_BUDGET: Duration = Duration::from_secs(120);

fn godaemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(LAUNCH_BUDGET)
        .with_execution_timeout(INVOKE_BUDGET)
}

/// Launches the `callbacks` fixture; its (function name, endpoint).
async fn launch(c: &Connector, d: &GoDaemon) -> (String, String) {
    let pkg = Package::from_dir(&plugin_dir("callbacks"));
    let o = d
        .launch_package(&pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\nconnector logs:\n{}", c.log_tail(60)));
    o.installed.clone().unwrap_or_else(|| {
        panic!(
            "not installed: {:?}\n{}\nconnector logs:\n{}",
            o.install_errors,
            o.transcript(),
            c.log_tail(60)
        )
    })
}

async fn call(d: &GoDaemon, endpoint: &str, tool: &str, params: Value) -> (String, InvokeOutcome) {
    let sid = session_id(tool);
    let data = tool_data("callbacks", tool, params, None);
    let o = d
        .invoke(endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    (sid, o)
}

/// Every chunk in order, as it arrived; the tool's and storage's answers after them.
async fn callbacks_stream_through_the_relay(py: Py) {
    let daemon = FakeDaemon::start_with("greeting", b"hello from dify").await;
    daemon.set(|b| {
        b.heartbeat = Duration::from_millis(100);
        b.llm_chunks = 5;
        b.llm_delay = Duration::from_millis(300);
    });
    let c = Connector::start_with(
        ConnectorOptions {
            py,
            ..ConnectorOptions::default()
        }
        .env("DIFY_PLUGIN_DAEMON_URL", daemon.url()),
    );
    let d = godaemon(&c);
    let (_, endpoint) = launch(&c, &d).await;
    let (sid, o) = call(&d, &endpoint, "all_calls", json!({})).await;
    let ctx = || format!("\n{}\nconnector logs:\n{}", o.transcript(), c.log_tail(40));
    assert!(o.result().is_ok(), "{:?}{}", o.result(), ctx());
    let texts = o.texts();
    assert_eq!(texts.len(), 7, "{texts:?}{}", ctx());
    let mut got_at = Vec::new();
    for (i, t) in texts[..5].iter().enumerate() {
        let (content, at) = t
            .strip_prefix("llm:")
            .and_then(|r| r.split_once('@'))
            .unwrap_or_else(|| panic!("chunk {i}: {t}"));
        assert_eq!(content, format!("tok{i}"), "{texts:?}");
        got_at.push(at.parse::<f64>().expect("time"));
    }
    assert_eq!(texts[5], "tool:echo:ping");
    assert_eq!(texts[6], "storage:hello from dify");
    // Streamed, not buffered: the plugin had each chunk before the daemon wrote the next.
    let sent = daemon.state.llm_sent_at.lock().unwrap().clone();
    assert_eq!(sent.len(), 5);
    for i in 0..4 {
        assert!(
            got_at[i] < sent[i + 1],
            "chunk {i} reached the plugin at {} but the daemon wrote chunk {} at {}: buffered",
            got_at[i],
            i + 1,
            sent[i + 1]
        );
    }
    // Every call reached the daemon for this session, gzip-encoded, through heartbeats.
    let reqs = daemon.state.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    for (session, body) in &reqs {
        assert_eq!(session.as_deref(), Some(sid.as_str()));
        assert_eq!(body["session_id"], sid.as_str());
    }
    assert_eq!(daemon.state.gzipped.load(Ordering::SeqCst), 3);
    assert!(daemon.state.heartbeats.load(Ordering::SeqCst) >= 4);
    // Counted by type and outcome, never by session.
    let metrics = reqwest::get(format!("{}/metrics", c.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for t in ["llm", "tool", "storage"] {
        let series = format!("sri_backwards_calls_total{{type=\"{t}\",outcome=\"ok\"}} 1");
        assert!(metrics.contains(&series), "{series} missing:\n{metrics}");
    }
    assert!(!metrics.contains(&sid), "a session id in the metrics");
    // No request body in the logs (they carry prompts and credentials).
    assert!(
        !c.logs().iter().any(|l| l.contains("fake-llm")),
        "a backwards body was logged"
    );
}

#[tokio::test]
async fn sdk_0_10_callbacks_stream_through_the_relay() {
    callbacks_stream_through_the_relay(Py::Py312).await;
}

#[tokio::test]
async fn sdk_0_7_callbacks_stream_through_the_relay() {
    callbacks_stream_through_the_relay(Py::Py311).await;
}

/// A hand-made backwards call to the relay.
struct Backwards {
    ring: KeyRing,
    function: String,
    session: String,
    timestamp: u64,
    claim: Option<String>,
    sign: bool,
}

impl Backwards {
    fn new(function: &str, session: &str) -> Self {
        Self {
            ring: signer("k1", SECRET_A),
            function: function.into(),
            session: session.into(),
            timestamp: now(),
            claim: None,
            sign: true,
        }
    }

    fn body(&self) -> Bytes {
        serde_json::to_vec(&json!({"event": "session", "session_id": self.session,
            "data": {"type": "invoke", "data": {"type": "storage", "backwards_request_id": "r1",
                     "request": {"opt": "get", "key": "greeting"}}}}))
        .unwrap()
        .into()
    }

    fn headers(&self) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if self.sign {
            self.ring
                .sign_v2(
                    self.timestamp,
                    &harness::nonce(),
                    &self.function,
                    &self.session,
                    ACTION,
                    &self.body(),
                )
                .apply(&mut h)
                .unwrap();
        }
        h.insert(HEADER_FUNCTION, self.function.parse().unwrap());
        if let Some(c) = &self.claim {
            h.insert(HEADER_CLAIM, c.parse().unwrap());
        }
        h
    }
}

async fn post(relay: &str, headers: http::HeaderMap, body: Bytes) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(format!("{relay}{TRANSACTION_PATH}"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("relay reachable");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn refused_calls_never_reach_the_daemon() {
    let daemon = FakeDaemon::start_with("greeting", b"hello from dify").await;
    let c = Connector::start_with(
        ConnectorOptions::default()
            .env("DIFY_PLUGIN_DAEMON_URL", daemon.url())
            .env("SRI_RELAY_GRACE_SECS", "1"),
    );
    let relay = c.relay_url();
    let d = godaemon(&c);
    let (name, endpoint) = launch(&c, &d).await;

    // A session in flight: `hold` keeps it open while the calls below are made for it.
    let held = c.daemon().with_execution_timeout(INVOKE_BUDGET);
    let (sid, held_call) = {
        let sid = session_id("hold");
        let data = tool_data("callbacks", "hold", json!({"seconds": 8}), None);
        let env = envelope(&sid, data);
        let (s, e) = (sid.clone(), endpoint.clone());
        let task = tokio::spawn(async move { held.invoke(&e, "invoke_tool", &env, &s).await });
        (sid, task)
    };
    // Accepted once the gateway has registered the session (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    let accepted = loop {
        let b = Backwards::new(&name, &sid);
        let (headers, body) = (b.headers(), b.body());
        let (status, text) = post(&relay, headers.clone(), body.clone()).await;
        if status == 200 {
            assert!(text.contains("backwards_response"), "{text}");
            break (headers, body);
        }
        assert_eq!(status, 403, "{text}");
        assert!(
            Instant::now() < deadline,
            "the in-flight session was never accepted: {text}\n{}",
            c.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reached = daemon.state.count();
    assert_eq!(reached, 1);

    let refusals: Vec<(&str, u16, &str, http::HeaderMap, Bytes)> = {
        let mut v = Vec::new();
        let b = Backwards {
            sign: false,
            ..Backwards::new(&name, &sid)
        };
        v.push(("no signature", 401, "missing header", b.headers(), b.body()));
        let b = Backwards::new(&name, &sid);
        let mut h = b.headers();
        h.remove(HEADER_FUNCTION);
        v.push(("no function", 401, HEADER_FUNCTION, h, b.body()));
        let b = Backwards {
            ring: signer("k1", [7u8; 32]),
            ..Backwards::new(&name, &sid)
        };
        v.push(("bad signature", 401, "bad signature", b.headers(), b.body()));
        let b = Backwards::new(&name, &sid);
        let mut other_body = b.body().to_vec();
        other_body.extend_from_slice(b" ");
        v.push((
            "body changed",
            401,
            "bad signature",
            b.headers(),
            other_body.into(),
        ));
        let b = Backwards {
            timestamp: now() - 1000,
            ..Backwards::new(&name, &sid)
        };
        v.push(("stale", 401, "stale timestamp", b.headers(), b.body()));
        let other = format!("{}-other", &name[..name.len().min(40)]);
        let b = Backwards::new(&other, &sid);
        v.push((
            "another function's session",
            403,
            "another function",
            b.headers(),
            b.body(),
        ));
        let stray = session_id("stray");
        let b = Backwards::new(&name, &stray);
        v.push(("not in flight", 403, "not in flight", b.headers(), b.body()));
        let b = Backwards {
            claim: Some(claim::issue(
                &signer("k1", SECRET_A),
                &name,
                &sid,
                now() + 60,
            )),
            ..Backwards::new(&name, &stray)
        };
        v.push((
            "another session's claim",
            403,
            "does not match",
            b.headers(),
            b.body(),
        ));
        let b = Backwards {
            claim: Some(claim::issue(
                &signer("k1", SECRET_A),
                &name,
                &stray,
                now() - 5,
            )),
            ..Backwards::new(&name, &stray)
        };
        v.push(("expired claim", 403, "expired", b.headers(), b.body()));
        v.push((
            "replay",
            401,
            "replayed",
            accepted.0.clone(),
            accepted.1.clone(),
        ));
        v
    };
    for (what, status, reason, headers, body) in refusals {
        let (got, text) = post(&relay, headers, body).await;
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(reason), "{what}: {text}");
        assert_eq!(daemon.state.count(), reached, "{what} reached the daemon");
    }

    // Another replica's session: vouched for by the claim its gateway issued.
    let elsewhere = session_id("elsewhere");
    let b = Backwards {
        claim: Some(claim::issue(
            &signer("k1", SECRET_A),
            &name,
            &elsewhere,
            now() + 60,
        )),
        ..Backwards::new(&name, &elsewhere)
    };
    let (status, text) = post(&relay, b.headers(), b.body()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(daemon.state.count(), reached + 1);

    // Once the invocation is over (and the grace period with it), its session is refused.
    let o = held_call.await.unwrap();
    assert_eq!(o.texts(), ["held"], "{}", o.transcript());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = Backwards::new(&name, &sid);
        let (status, text) = post(&relay, b.headers(), b.body()).await;
        if status == 403 {
            assert!(text.contains("no longer in flight"), "{text}");
            break;
        }
        assert_eq!(status, 200, "{text}");
        assert!(
            Instant::now() < deadline,
            "still accepted 10 s after the end"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Each listener serves only its own routes.
    let client = reqwest::Client::new();
    for (method, path) in [
        ("GET", "/healthz"),
        ("GET", "/metrics"),
        ("POST", "/ping"),
        ("POST", "/v1/launch"),
        ("GET", "/v1/runner/instances"),
    ] {
        let r = client
            .request(method.parse().unwrap(), format!("{relay}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{method} {path} on the relay");
    }
    let on_relay = endpoint.replacen(&c.public_url(), &relay, 1);
    let r = client
        .post(format!("{on_relay}/invoke?action=invoke_tool"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the gateway on the relay listener");
    let b = Backwards::new(&name, &elsewhere);
    let r = client
        .post(format!("{}{TRANSACTION_PATH}", c.url()))
        .headers(b.headers())
        .body(b.body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the relay on the control-plane listener");
}

#[tokio::test]
async fn a_daemon_that_refuses_is_slow_or_down_fails_the_call_in_time() {
    let daemon = FakeDaemon::start_with("greeting", b"hello from dify").await;
    let c = Connector::start_with(
        ConnectorOptions::default()
            .env("DIFY_PLUGIN_DAEMON_URL", daemon.url())
            .env("SRI_RELAY_TIMEOUT_SECS", "2"),
    );
    let d = godaemon(&c);
    let (_, endpoint) = launch(&c, &d).await;
    let storage = json!({"calls": "storage"});

    let failed = |o: &InvokeOutcome, needle: &str, within: Duration| {
        let err = match o.result() {
            Err(e) => e.to_value().to_string(),
            Ok(v) => panic!("succeeded: {v:?}\n{}", o.transcript()),
        };
        assert!(err.contains(needle), "expected {needle:?} in {err}");
        assert!(o.end_received(), "no end of its own:\n{}", o.transcript());
        assert!(o.elapsed < within, "took {:?}", o.elapsed);
    };

    // 400: the daemon does not hold the session.
    daemon.set(|b| b.known_sessions = Some(Default::default()));
    let (_, o) = call(&d, &endpoint, "all_calls", storage.clone()).await;
    failed(&o, "session id not found", Duration::from_secs(30));
    assert!(
        o.result()
            .unwrap_err()
            .to_value()
            .to_string()
            .contains("400"),
        "{}",
        o.transcript()
    );

    // Slow: past the relay's 2 s, the call fails (the daemon would answer after 30 s).
    daemon.set(|b| {
        b.known_sessions = None;
        b.answer_after = Duration::from_secs(30);
    });
    let (_, o) = call(&d, &endpoint, "all_calls", storage.clone()).await;
    failed(&o, "did not answer in time", Duration::from_secs(20));

    // Down.
    drop(daemon);
    let (_, o) = call(&d, &endpoint, "all_calls", storage).await;
    failed(&o, "cannot be reached", Duration::from_secs(30));
}

/// Under `cargo lambda watch` (the Function URL route), as on Lambda: the function reaches the
/// relay by its URL, and the relay — which never saw the session go through its gateway, as
/// another replica would not — accepts the calls by the claim the invocation carried.
#[tokio::test]
async fn under_cargo_lambda_callbacks_go_through_the_relay_by_their_claim() {
    use harness::emulator::Lambda;
    use harness::{Call, Options, read_events, texts};
    const FN: &str = "sri-relay-lambda-fixture";
    let daemon = FakeDaemon::start_with("greeting", b"hello from dify").await;
    daemon.set(|b| {
        b.heartbeat = Duration::from_millis(100);
        b.llm_chunks = 4;
        b.llm_delay = Duration::from_millis(300);
    });
    let c = Connector::start_with(
        ConnectorOptions::default().env("DIFY_PLUGIN_DAEMON_URL", daemon.url()),
    );
    let lambda = Lambda::start(
        Options::new("callbacks")
            .env("SRI_RELAY_URL", c.relay_url())
            .env("SRI_FUNCTION_NAME", FN),
    );
    let url = lambda.function_url();
    let invoke = |claim: Option<String>| {
        let url = url.clone();
        async move {
            let sid = session_id("lambda");
            let body = envelope(&sid, tool_data("callbacks", "all_calls", json!({}), None));
            let mut headers = http::HeaderMap::new();
            signer("k1", SECRET_A)
                .sign_v2(now(), &harness::nonce(), FN, &sid, "invoke_tool", &body)
                .apply(&mut headers)
                .unwrap();
            if let Some(make) = claim {
                let c = if make == "valid" {
                    claim::issue(&signer("k1", SECRET_A), FN, &sid, now() + 600)
                } else {
                    make
                };
                headers.insert(HEADER_CLAIM, c.parse().unwrap());
            }
            let resp = Call {
                base: &url,
                action: "invoke_tool",
                body,
                ring: None,
                accept: connector::protocol::EVENT_STREAM,
            }
            .send_with(headers)
            .await;
            assert_eq!(resp.status(), 200);
            read_events(resp).await
        }
    };

    let ev = invoke(Some("valid".into())).await;
    let t = texts(&ev);
    assert_eq!(
        t.len(),
        6,
        "{t:?}\nbootstrap logs:\n{}",
        lambda.logs().join("\n")
    );
    for (i, text) in t[..4].iter().enumerate() {
        assert!(text.starts_with(&format!("llm:tok{i}@")), "{t:?}");
    }
    assert_eq!(t[4..], ["tool:echo:ping", "storage:hello from dify"]);
    let sent = daemon.state.llm_sent_at.lock().unwrap().clone();
    for i in 0..3 {
        let got: f64 = t[i].rsplit('@').next().unwrap().parse().unwrap();
        assert!(
            got < sent[i + 1],
            "chunk {i} buffered: {got} ≥ {}",
            sent[i + 1]
        );
    }
    assert_eq!(daemon.state.count(), 3);
    assert_eq!(daemon.state.gzipped.load(Ordering::SeqCst), 3);

    // Without a claim (or with another session's) the session is not in flight here: refused,
    // the daemon never called, and the plugin's call fails with the reason.
    let other = claim::issue(&signer("k1", SECRET_A), FN, "another-session", now() + 600);
    for (claim, reason) in [(None, "not in flight"), (Some(other), "does not match")] {
        let ev = invoke(claim).await;
        let err = harness::error_of(&ev).to_string();
        assert!(err.contains("403") && err.contains(reason), "{err}");
        assert_eq!(daemon.state.count(), 3, "a refused call reached the daemon");
    }
}
