//! A fake of the Dify daemon's `/backwards-invocation/transaction` route, behaving like the
//! daemon's: `text/event-stream`, one JSON line plus a blank line per `backwards_response`
//! event as it is produced, ending with `end`; a bare `\n\n` heartbeat whenever nothing was
//! written for the heartbeat interval (25 s in the daemon, shortened by tests); HTTP 400 with a
//! bare JSON error for an unknown session; gzip when the request accepts it. It answers
//! storage `get`, streamed `llm` (chunks `tok0`, `tok1`, … spaced by a delay) and `tool`
//! (`echo:<q>`), and counts every request it receives.

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How the fake daemon answers (change it between calls through [`DaemonState::behaviour`]).
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Silence after which a blank-line heartbeat is written (the daemon's is 25 s).
    pub heartbeat: Duration,
    /// Chunks of a streamed LLM answer.
    pub llm_chunks: usize,
    /// Pause before each LLM chunk after the first.
    pub llm_delay: Duration,
    /// `Some`: only these sessions exist (others get 400, as the daemon answers a session it
    /// does not hold); `None`: every session exists.
    pub known_sessions: Option<HashSet<String>>,
    /// Wait this long before answering at all (a slow daemon).
    pub answer_after: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(25),
            llm_chunks: 5,
            llm_delay: Duration::ZERO,
            known_sessions: None,
            answer_after: Duration::ZERO,
        }
    }
}

/// What the fake daemon saw and holds.
#[derive(Default)]
pub struct DaemonState {
    /// Plugin storage.
    pub storage: Mutex<HashMap<String, Vec<u8>>>,
    /// Requests received: (session header, body).
    pub requests: Mutex<Vec<(Option<String>, Value)>>,
    /// Every request that reached the route, whatever it was.
    pub count: AtomicUsize,
    /// Answers sent gzip-encoded.
    pub gzipped: AtomicUsize,
    /// Heartbeats written.
    pub heartbeats: AtomicUsize,
    /// Unix time (s) at which each LLM chunk was written, in order.
    pub llm_sent_at: Mutex<Vec<f64>>,
    /// How it answers.
    pub behaviour: Mutex<Behaviour>,
}

impl DaemonState {
    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

/// A running fake daemon.
pub struct FakeDaemon {
    /// Its address.
    pub addr: SocketAddr,
    /// Its state.
    pub state: Arc<DaemonState>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeDaemon {
    /// Starts it on a free loopback port.
    pub async fn start() -> Self {
        let state = Arc::new(DaemonState::default());
        let app = Router::new()
            .route("/backwards-invocation/transaction", post(transaction))
            .with_state(state.clone());
        let (addr, task) = crate::serve_loopback(app).await;
        Self { addr, state, task }
    }

    /// Starts one whose plugin storage holds `key` = `value` (what the `callback` fixture reads).
    pub async fn start_with(key: &str, value: &[u8]) -> Self {
        let d = Self::start().await;
        d.state
            .storage
            .lock()
            .unwrap()
            .insert(key.into(), value.to_vec());
        d
    }

    /// Base URL (`DIFY_PLUGIN_DAEMON_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Changes how it answers.
    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.state.behaviour.lock().unwrap());
    }
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// What one answer is made of: lines, each after a pause.
type Script = Vec<(Duration, String)>;

async fn transaction(
    State(state): State<Arc<DaemonState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.count.fetch_add(1, Ordering::SeqCst);
    let session = headers
        .get("dify-plugin-session-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "{\"error\":\"invalid json\"}").into_response();
    };
    state
        .requests
        .lock()
        .unwrap()
        .push((session.clone(), req.clone()));
    let behaviour = state.behaviour.lock().unwrap().clone();
    let known = |s: &str| {
        behaviour
            .known_sessions
            .as_ref()
            .is_none_or(|k| k.contains(s))
    };
    let Some(session) = session.filter(|s| known(s)) else {
        return (
            StatusCode::BAD_REQUEST,
            "{\"error\":\"session id not found\"}",
        )
            .into_response();
    };
    tokio::time::sleep(behaviour.answer_after).await;
    let invoke = &req["data"]["data"];
    let id = invoke["backwards_request_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let line = |event: &str, message: &str, data: Value| {
        let v = json!({"session_id": session, "conversation_id": null, "message_id": null,
                       "app_id": null, "endpoint_id": null, "context": {},
                       "event": "backwards_response",
                       "data": {"backwards_request_id": id, "event": event, "message": message, "data": data}});
        format!("{v}\n\n")
    };
    let mut script: Script = Vec::new();
    let mut llm = false;
    match (invoke["type"].as_str(), invoke["request"]["opt"].as_str()) {
        (Some("storage"), Some("get")) => {
            let key = invoke["request"]["key"].as_str().unwrap_or_default();
            match state.storage.lock().unwrap().get(key) {
                Some(v) => {
                    script.push((
                        Duration::ZERO,
                        line("response", "struct", json!({"data": hex(v)})),
                    ));
                    script.push((Duration::ZERO, line("end", "", Value::Null)));
                }
                None => script.push((
                    Duration::ZERO,
                    line("error", &format!("key {key} not found"), Value::Null),
                )),
            }
        }
        (Some("llm"), _) => {
            llm = true;
            for i in 0..behaviour.llm_chunks {
                let chunk = json!({"model": "fake-llm", "prompt_messages": [], "system_fingerprint": null,
                                   "delta": {"index": i, "message": {"role": "assistant", "content": format!("tok{i}"), "name": null, "tool_calls": []},
                                             "usage": null, "finish_reason": null}});
                let pause = if i == 0 {
                    Duration::ZERO
                } else {
                    behaviour.llm_delay
                };
                script.push((pause, line("response", "stream", chunk)));
            }
            script.push((Duration::ZERO, line("end", "", Value::Null)));
        }
        (Some("tool"), _) => {
            let q = invoke["request"]["tool_parameters"]["q"]
                .as_str()
                .unwrap_or_default();
            let msg =
                json!({"type": "text", "message": {"text": format!("echo:{q}")}, "meta": null});
            script.push((Duration::ZERO, line("response", "stream", msg)));
            script.push((Duration::ZERO, line("end", "", Value::Null)));
        }
        _ => script.push((
            Duration::ZERO,
            line("error", "unsupported invocation", Value::Null),
        )),
    }
    let gzip = headers
        .get("accept-encoding")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    if gzip {
        state.gzipped.fetch_add(1, Ordering::SeqCst);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    let st = state.clone();
    tokio::spawn(async move {
        let mut enc =
            gzip.then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()));
        // Every piece is flushed as written (the daemon flushes each line).
        let mut encode = |s: &[u8]| -> Bytes {
            match enc.as_mut() {
                Some(e) => {
                    e.write_all(s).expect("gzip");
                    e.flush().expect("gzip flush");
                    Bytes::from(std::mem::take(e.get_mut()))
                }
                None => Bytes::copy_from_slice(s),
            }
        };
        for (pause, text) in script {
            // Heartbeats while waiting, as the daemon writes them.
            let mut left = pause;
            while left > behaviour.heartbeat {
                tokio::time::sleep(behaviour.heartbeat).await;
                left -= behaviour.heartbeat;
                st.heartbeats.fetch_add(1, Ordering::SeqCst);
                if tx.send(encode(b"\n\n")).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(left).await;
            if llm && text.contains("\"stream\"") {
                st.llm_sent_at.lock().unwrap().push(unix_now());
            }
            if tx.send(encode(text.as_bytes())).await.is_err() {
                return;
            }
        }
        if let Some(e) = enc.take() {
            let _ = tx.send(Bytes::from(e.finish().expect("gzip finish"))).await;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream");
    if gzip {
        resp = resp.header("content-encoding", "gzip");
    }
    resp.body(Body::from_stream(stream)).expect("response")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
