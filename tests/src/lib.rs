//! Test tooling shared by the end-to-end tests: finding the built binaries and the Python
//! environments, starting a `bootstrap` against a real plugin, signing SRI v1 requests, reading
//! event streams, and a fake Dify daemon for backwards invocations.
//!
//! Everything listens on 127.0.0.1 with ports chosen per run, and every wait is bounded.

/// Sections of `BENCHMARKS.md`, one per benchmark.
pub mod benchmarks;
pub mod cross;
pub mod daemon;
pub mod difypkg;
pub mod emulator;
pub mod eventstream;
pub mod godaemon;
pub mod hostile;
pub mod lwa;
pub mod moto;
pub mod runtime_api;
/// The connector process (`tests/src/connector.rs`; not named `connector`, which is the crate).
#[path = "connector.rs"]
pub mod sri;

use bytes::Bytes;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::signing::{Key, KeyRing};
use connector::protocol::sse;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The first key of the test ring (signs).
pub const SECRET_A: [u8; 32] = [0x11; 32];
/// The second key of the test ring (verifies only: rotation).
pub const SECRET_B: [u8; 32] = [0x22; 32];

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// [`bootstrap_bin`] without its debug information (200 MiB → a few MiB), for tests that
/// package it into a function zip: what they check is the deployment, and zipping the debug
/// build would dominate their time. Made once per build of the bootstrap, atomically.
pub fn stripped_bootstrap() -> PathBuf {
    static ONCE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = ONCE.lock().unwrap_or_else(|e| e.into_inner());
    let src = bootstrap_bin();
    let dst = src.with_file_name("bootstrap-stripped");
    let newer = |a: &std::path::Path, b: &std::path::Path| {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x >= y)
    };
    if !newer(&dst, &src) {
        let tmp = src.with_file_name(format!("bootstrap-stripped.{}", std::process::id()));
        let status = std::process::Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&tmp)
            .arg(&src)
            .status()
            .expect("run strip (binutils)");
        assert!(status.success(), "strip {} failed: {status}", src.display());
        std::fs::rename(&tmp, &dst).expect("rename the stripped bootstrap");
    }
    dst
}

/// Serves `app` on a free loopback port (the fakes of the tests: daemon, Runtime API,
/// InvokeWithResponseStream, Function URL); the task ends when the runtime does.
pub async fn serve_loopback(
    app: axum::Router,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local addr");
    let task = tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (addr, task)
}

/// The `bootstrap` binary built by `cargo build` (or `SRI_BOOTSTRAP_BIN`).
pub fn bootstrap_bin() -> PathBuf {
    let path = std::env::var_os("SRI_BOOTSTRAP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"));
            target.join("debug").join("bootstrap")
        });
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p sri-bootstrap` first (`make test` does)",
        path.display()
    );
    path
}

/// The Python environments the tests run plugins on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Py {
    /// Python 3.12 with dify-plugin 0.10.x: the primary environment (Lambda's python3.12).
    Py312,
    /// Python 3.11 with dify-plugin 0.7.4.
    Py311,
}

impl Py {
    /// The interpreter of the environment's venv.
    pub fn python(self) -> PathBuf {
        let dir = match self {
            Py::Py312 => "py312",
            Py::Py311 => "py311",
        };
        let path = root().join(".venv").join(dir).join("bin").join("python");
        assert!(
            path.exists(),
            "{} is missing: run `tests/tooling/setup-venvs.sh` (`make test` does)",
            path.display()
        );
        path
    }
}

/// A plugin directory: `sample` is the template's, the others are fixtures.
pub fn plugin_dir(name: &str) -> PathBuf {
    if name == "sample" {
        root().join("template").join("plugin")
    } else {
        root().join("tests/fixtures/plugins").join(name)
    }
}

/// `SRI_SIGNING_KEYS` for the given secrets, named `k1`, `k2`, ….
pub fn keys_env(secrets: &[[u8; 32]]) -> String {
    use base64::Engine;
    secrets
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "k{}:{}",
                i + 1,
                base64::engine::general_purpose::STANDARD.encode(s)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A key ring signing with `secret` under id `kid`.
pub fn signer(kid: &str, secret: [u8; 32]) -> KeyRing {
    KeyRing::new(vec![Key::new(kid, secret.to_vec()).expect("key")]).expect("ring")
}

/// Unix seconds now.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A Dify request envelope, keys in the daemon's order.
pub fn envelope(session_id: &str, data: Value) -> Bytes {
    let v = json!({
        "session_id": session_id, "conversation_id": null, "message_id": null, "app_id": null,
        "endpoint_id": null, "context": {}, "event": "request", "data": data,
    });
    serde_json::to_vec(&v).expect("JSON").into()
}

/// The `data` of an `invoke_tool` request.
pub fn tool_data(provider: &str, tool: &str, params: Value, api_key: Option<&str>) -> Value {
    let creds = api_key.map_or(json!({}), |k| json!({"api_key": k}));
    json!({"action": "invoke_tool", "credential_type": "api-key", "credentials": creds,
           "provider": provider, "tool": tool, "tool_parameters": params, "type": "tool", "user_id": "u-test"})
}

/// A fresh SRI v2 nonce (128 bits, hex): unique per process, call and instant.
pub fn nonce() -> String {
    use sha2::Digest;
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!(
        "{}-{}-{:?}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        SystemTime::now()
    );
    hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..16])
}

/// A fresh session id.
pub fn session_id(tag: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A running `bootstrap serve` (killed on drop, plugin included).
pub struct Bootstrap {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
}

/// Options for [`Bootstrap::start`].
pub struct Options {
    /// Plugin name (see [`plugin_dir`]).
    pub plugin: String,
    /// Python environment.
    pub py: Py,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// A command the bootstrap runs under (e.g. `unshare --pid --fork`).
    pub wrapper: Vec<String>,
    /// Arguments after the binary (Lambda mode; e.g. what a managed runtime passes a wrapper).
    pub args: Vec<String>,
}

impl Options {
    /// Defaults for `plugin` on the primary environment.
    pub fn new(plugin: &str) -> Self {
        Self {
            plugin: plugin.into(),
            py: Py::Py312,
            env: Vec::new(),
            wrapper: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Runs the bootstrap under `wrapper`.
    pub fn wrap(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }
    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
    /// Chooses the Python environment.
    pub fn py(mut self, py: Py) -> Self {
        self.py = py;
        self
    }
}

/// The bootstrap (under `opts.wrapper`, if any) with what every test run shares: the test key
/// ring, JSON logs at `info`, `opts.env`, stdio closed but stderr piped.
pub fn bootstrap_command(opts: &Options) -> Command {
    let mut cmd = match opts.wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(bootstrap_bin());
            c
        }
        None => Command::new(bootstrap_bin()),
    };
    // The options' own environment comes last, so a test can override any of these.
    cmd.env("SRI_SIGNING_KEYS", keys_env(&[SECRET_A, SECRET_B]))
        .env("AWS_LAMBDA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    cmd
}

impl Bootstrap {
    /// Starts `bootstrap serve` on a free loopback port and waits until it listens.
    pub fn start(opts: Options) -> Self {
        let mut cmd = bootstrap_command(&opts);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env("SRI_PLUGIN_DIR", plugin_dir(&opts.plugin))
            .env("SRI_PYTHON", opts.py.python())
            .env_remove("AWS_LAMBDA_RUNTIME_API");
        let mut child = cmd.spawn().expect("spawn bootstrap");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "serving SRI v1"
                {
                    let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_owned());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "bootstrap did not start listening within 20 s; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Self { child, addr, logs }
    }

    /// Base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Log lines so far (JSON).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The bootstrap's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The plugin's pid, from the bootstrap's log.
    pub async fn plugin_pid(&self) -> u32 {
        let line = self
            .wait_log("plugin process started", Duration::from_secs(20))
            .await;
        serde_json::from_str::<Value>(&line).unwrap()["pid"]
            .as_u64()
            .expect("pid logged") as u32
    }

    /// The pid of the plugin process of `generation`, from the bootstrap's log.
    pub async fn plugin_pid_of(&self, generation: u64) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = self.logs().iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                (v["message"] == "plugin process started" && v["generation"] == generation)
                    .then(|| v["pid"].as_u64())
                    .flatten()
            });
            if let Some(pid) = found {
                return pid as u32;
            }
            assert!(
                Instant::now() < deadline,
                "no plugin process of generation {generation} logged within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits (bounded) for the bootstrap to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal bootstrap");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bootstrap still running 10 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) until `/health` says ready; returns its body.
    pub async fn wait_ready(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let h = health(&self.url()).await;
            if h["ready"] == true {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "plugin not ready after 60 s: {h}; logs:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (bounded) for a log line containing `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.logs().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {within:?}; logs:\n{}",
                self.logs().join("\n")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Stops a child: SIGTERM, then SIGKILL after 5 s.
pub fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// `GET /health` as JSON.
pub async fn health(base: &str) -> Value {
    match reqwest::get(format!("{base}/health")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// A signed SRI v1 request.
pub struct Call<'a> {
    /// Function base URL (`…/invoke` is appended).
    pub base: &'a str,
    /// `action` query parameter.
    pub action: &'a str,
    /// Body.
    pub body: Bytes,
    /// Signing ring (`None`: unsigned).
    pub ring: Option<&'a KeyRing>,
    /// `Accept`.
    pub accept: &'a str,
}

impl Call<'_> {
    /// Sends it, signing for the envelope's session id now.
    pub async fn send(&self) -> reqwest::Response {
        let sid = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["session_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        if let Some(ring) = self.ring {
            ring.sign_v2(now(), &nonce(), "", &sid, self.action, &self.body)
                .apply(&mut headers)
                .unwrap();
        }
        self.send_with(headers).await
    }

    /// Sends it with exactly these extra headers.
    pub async fn send_with(&self, headers: http::HeaderMap) -> reqwest::Response {
        client()
            .post(format!("{}/invoke?action={}", self.base, self.action))
            .header("content-type", "application/json")
            .header("accept", self.accept)
            .headers(headers)
            .body(self.body.clone())
            .send()
            .await
            .expect("request reaches the function")
    }
}

fn client() -> reqwest::Client {
    static C: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client")
    })
    .clone()
}

/// Signs (key `k1`) and sends an SRI call, returning the raw response.
pub async fn signed_call(base: &str, action: &str, body: Bytes, accept: &str) -> reqwest::Response {
    let ring = signer("k1", SECRET_A);
    Call {
        base,
        action,
        body,
        ring: Some(&ring),
        accept,
    }
    .send()
    .await
}

/// Signs (SRI v2, for the function named `function`) and streams a tool call to a
/// `bootstrap serve` that knows its name (the local backend's), returning the decoded events.
pub async fn invoke_stream_as(base: &str, function: &str, body: Bytes) -> Vec<(Duration, Event)> {
    let sid = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["session_id"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let mut headers = http::HeaderMap::new();
    signer("k1", SECRET_A)
        .sign_v2(now(), &nonce(), function, &sid, "invoke_tool", &body)
        .apply(&mut headers)
        .unwrap();
    let call = Call {
        base,
        action: "invoke_tool",
        body,
        ring: None,
        accept: connector::protocol::EVENT_STREAM,
    };
    let resp = call.send_with(headers).await;
    assert_eq!(resp.status(), 200, "invoke_tool answered {}", resp.status());
    read_events(resp).await
}

/// Signs and invokes a tool, returning the decoded events with their arrival times.
pub async fn invoke_stream(base: &str, body: Bytes) -> Vec<(Duration, Event)> {
    invoke_stream_action(base, "invoke_tool", body).await
}

/// Signs and streams any action, returning the decoded events with their arrival times.
pub async fn invoke_stream_action(base: &str, action: &str, body: Bytes) -> Vec<(Duration, Event)> {
    let resp = signed_call(base, action, body, connector::protocol::EVENT_STREAM).await;
    assert_eq!(resp.status(), 200, "{action} answered {}", resp.status());
    read_events(resp).await
}

/// Decodes an SSE response up to its `end` event (the last event of every SRI stream, as the
/// connector reads it), timing each event from the call. Reading stops at `end` rather than at
/// EOF because `cargo lambda watch` may leave the connection open after a function's error
/// trailers.
pub async fn read_events(resp: reqwest::Response) -> Vec<(Duration, Event)> {
    let started = Instant::now();
    let mut stream = sse::decode(Box::pin(resp.bytes_stream()));
    let mut events = Vec::new();
    let read = async {
        while let Some(e) = stream.next().await {
            let e = e.expect("valid SSE");
            let end = e.kind == EventKind::End;
            events.push((started.elapsed(), e));
            if end {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .expect("stream finished within 60 s");
    events
}

/// The kinds of `events`, in order.
pub fn kinds(events: &[(Duration, Event)]) -> Vec<EventKind> {
    events.iter().map(|(_, e)| e.kind).collect()
}

/// The `message.text` of each chunk (text messages).
pub fn texts(events: &[(Duration, Event)]) -> Vec<String> {
    events
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Chunk)
        .filter_map(|(_, e)| {
            e.json().ok()?["data"]["data"]["message"]["text"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// The `error` event's `data.data` (error_type, message, args).
pub fn error_of(events: &[(Duration, Event)]) -> Value {
    let (_, e) = events
        .iter()
        .find(|(_, e)| e.kind == EventKind::Error)
        .unwrap_or_else(|| panic!("no error event in {:?}", kinds(events)));
    e.json().expect("JSON")["data"]["data"].clone()
}

/// Asserts the SRI stream grammar: `start` first, exactly one `end` last, `usage` right before it,
/// and every event numbered 1, 2, 3, ….
pub fn assert_well_formed(events: &[(Duration, Event)]) {
    let k = kinds(events);
    assert_eq!(k.first(), Some(&EventKind::Start), "{k:?}");
    assert_eq!(k.last(), Some(&EventKind::End), "{k:?}");
    assert_eq!(
        k.iter().filter(|k| **k == EventKind::End).count(),
        1,
        "{k:?}"
    );
    assert_eq!(k[k.len() - 2], EventKind::Usage, "{k:?}");
    let ids: Vec<Option<u64>> = events.iter().map(|(_, e)| e.id).collect();
    let want: Vec<Option<u64>> = (1..=events.len() as u64).map(Some).collect();
    assert_eq!(ids, want, "event ids");
}

/// Every file below `dir` that contains `needle` (links not followed).
pub fn files_containing(dir: &std::path::Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(t) = e.file_type() else { continue };
            if t.is_dir() {
                stack.push(e.path());
            } else if t.is_file()
                && let Ok(bytes) = std::fs::read(e.path())
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(e.path());
            }
        }
    }
    found
}

/// The direct children of `pid` (a bootstrap's plugin processes), from `/proc`.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("process alive") {
        let path = task.unwrap().path().join("children");
        if let Ok(s) = std::fs::read_to_string(path) {
            out.extend(s.split_whitespace().map(|p| p.parse::<u32>().unwrap()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}
