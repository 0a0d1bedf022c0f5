//! A fake of the Dify daemon's `/backwards-invocation/transaction` route, answering storage
//! requests the way the daemon does: `text/event-stream`, one JSON line plus a blank line per
//! `backwards_response` event, ending with `end`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// What the fake daemon saw and holds.
#[derive(Default)]
pub struct DaemonState {
    /// Plugin storage.
    pub storage: Mutex<HashMap<String, Vec<u8>>>,
    /// Requests received: (session header, body).
    pub requests: Mutex<Vec<(Option<String>, Value)>>,
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
}

impl Drop for FakeDaemon {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn transaction(
    State(state): State<Arc<DaemonState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
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
    let Some(session) = session else {
        return (
            StatusCode::BAD_REQUEST,
            "{\"error\":\"session id not found\"}",
        )
            .into_response();
    };
    let invoke = &req["data"]["data"];
    let id = invoke["backwards_request_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let line = |event: &str, data: Value| {
        let v = json!({"session_id": session, "event": "backwards_response",
                       "data": {"backwards_request_id": id, "event": event, "message": "", "data": data}});
        format!("{v}\n\n")
    };
    let mut out = String::new();
    match (invoke["type"].as_str(), invoke["request"]["opt"].as_str()) {
        (Some("storage"), Some("get")) => {
            let key = invoke["request"]["key"].as_str().unwrap_or_default();
            match state.storage.lock().unwrap().get(key) {
                Some(v) => {
                    out.push_str(&line("response", json!({"data": hex(v)})));
                    out.push_str(&line("end", Value::Null));
                }
                None => out.push_str(&line("error", Value::Null).replace(
                    "\"message\":\"\"",
                    &format!("\"message\":\"key {key} not found\""),
                )),
            }
        }
        _ => out.push_str(
            &line("error", Value::Null)
                .replace("\"message\":\"\"", "\"message\":\"unsupported invocation\""),
        ),
    }
    ([("content-type", "text/event-stream")], out).into_response()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
