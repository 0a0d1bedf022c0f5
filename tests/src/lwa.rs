//! The closest public peer, for the benchmark: AWS Lambda Web Adapter (`lambda-adapter`, the
//! `lambda_web_adapter` crate from crates.io, installed by `make bench`) in front of the Dify
//! SDK's own serverless HTTP mode, under `cargo lambda watch`.
//!
//! Also the pieces it needs, usable on their own:
//! - [`LwaProcesses`]: the adapter and the SDK server against any Runtime API (the throughput
//!   benchmark runs them against `harness::runtime_api`'s fake);
//! - [`Emulator`]: a fresh `cargo lambda watch --only-lambda-apis` on a free loopback port;
//! - [`RuntimeApiProxy`]: LWA (like `lambda_runtime`) wants a bare `host:port` in
//!   `AWS_LAMBDA_RUNTIME_API`, while the emulator serves the Runtime API under `/.rt/<fn>`; the
//!   proxy listens on a free port and forwards every request to `<emulator>/.rt/<fn><path>`,
//!   streaming both ways (no buffering) with TCP_NODELAY on both of its sockets, so that it adds
//!   no Nagle stalls of its own;
//! - [`Lines`]: a child's output lines with their arrival instants, with bounded waits.
//!
//! Everything listens on 127.0.0.1 with ports chosen per run, and every wait is bounded.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::serve::ListenerExt;
use futures_util::StreamExt;
use http::{HeaderName, StatusCode, header};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::emulator::{Emulator, FUNCTION, free_port};
use crate::{Py, plugin_dir, root, stop};

/// The `lambda-adapter` executable (`SRI_LWA_BIN`, else `.venv/tools/lwa/bin/lambda-adapter`).
pub fn lwa_bin() -> PathBuf {
    let path = std::env::var_os("SRI_LWA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/tools/lwa/bin/lambda-adapter"));
    assert!(
        path.exists(),
        "{} is missing: `make bench` installs it (`cargo install --locked lambda_web_adapter \
         --root .venv/tools/lwa`)",
        path.display()
    );
    path
}

/// The installed `lambda_web_adapter` version, from cargo's install record next to the binary.
pub fn lwa_version() -> Option<String> {
    let record = lwa_bin().parent()?.parent()?.join(".crates.toml");
    let text = std::fs::read_to_string(record).ok()?;
    let at = text.find("\"lambda_web_adapter ")? + "\"lambda_web_adapter ".len();
    Some(text[at..].split_whitespace().next()?.to_owned())
}

type Stamped = Vec<(Instant, String)>;

/// Lines a child writes, each with the instant it was read.
#[derive(Clone, Default)]
pub struct Lines {
    inner: Arc<(Mutex<Stamped>, Condvar)>,
}

impl Lines {
    /// Collects the lines of `reader` on a thread until it closes.
    pub fn collect(reader: impl Read + Send + 'static) -> Self {
        let lines = Self::default();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                let now = Instant::now();
                let (vec, cv) = &*sink.inner;
                vec.lock().unwrap().push((now, line));
                cv.notify_all();
            }
        });
        lines
    }

    /// All lines so far.
    pub fn all(&self) -> Vec<(Instant, String)> {
        self.inner.0.lock().unwrap().clone()
    }

    /// The first line containing `needle`, if any yet.
    pub fn find(&self, needle: &str) -> Option<(Instant, String)> {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(_, l)| l.contains(needle))
            .cloned()
    }

    /// Blocks (at most `within`) until a line contains `needle`; `None` on timeout.
    pub fn wait_for(&self, needle: &str, within: Duration) -> Option<(Instant, String)> {
        let deadline = Instant::now() + within;
        let (vec, cv) = &*self.inner;
        let mut guard = vec.lock().unwrap();
        loop {
            if let Some(hit) = guard.iter().find(|(_, l)| l.contains(needle)) {
                return Some(hit.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// The lines as text (for failure messages).
    pub fn dump(&self) -> String {
        self.all()
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An instant set once, with a bounded wait for it.
#[derive(Clone, Default)]
struct Once {
    inner: Arc<(Mutex<Option<Instant>>, Condvar)>,
}

impl Once {
    fn set_now(&self) {
        let (at, cv) = &*self.inner;
        let mut at = at.lock().unwrap();
        if at.is_none() {
            *at = Some(Instant::now());
            cv.notify_all();
        }
    }

    fn get(&self) -> Option<Instant> {
        *self.inner.0.lock().unwrap()
    }

    fn wait(&self, within: Duration) -> Option<Instant> {
        let (at, cv) = &*self.inner;
        let guard = at.lock().unwrap();
        *cv.wait_timeout_while(guard, within, |at| at.is_none())
            .unwrap()
            .0
    }
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    first_next: Once,
}

/// A streaming path-prefix proxy for the Runtime API: `http://<addr><path>` →
/// `<upstream><path>`. Runs on its own thread and runtime, so it does not share workers with
/// the caller's client; stopped on drop.
pub struct RuntimeApiProxy {
    /// Where it listens (`AWS_LAMBDA_RUNTIME_API` = this, bare `host:port`).
    pub addr: SocketAddr,
    first_next: Once,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RuntimeApiProxy {
    /// Starts forwarding to `upstream` (e.g. [`Emulator::runtime_api`]).
    pub fn start(upstream: &str) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let first_next = Once::default();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
        let upstream = upstream.trim_end_matches('/').to_owned();
        let seen = first_next.clone();
        let thread = std::thread::Builder::new()
            .name("rt-proxy".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("proxy runtime");
                rt.block_on(async move {
                    let client = reqwest::Client::builder()
                        .tcp_nodelay(true)
                        .no_proxy()
                        .pool_max_idle_per_host(16)
                        .build()
                        .expect("proxy client");
                    let state = Arc::new(ProxyState {
                        upstream,
                        client,
                        first_next: seen,
                    });
                    let app = axum::Router::new().fallback(forward).with_state(state);
                    let listener = tokio::net::TcpListener::from_std(std_listener)
                        .expect("tokio listener")
                        .tap_io(|tcp| {
                            let _ = tcp.set_nodelay(true);
                        });
                    // Not a graceful shutdown: `/next` long-polls never finish by themselves.
                    tokio::select! {
                        r = axum::serve(listener, app) => r.expect("proxy serve"),
                        _ = stop_rx => {}
                    }
                });
                // Dropping the runtime cancels the connection tasks still running.
            })
            .expect("proxy thread");
        Self {
            addr,
            first_next,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// When the function first asked for an event (`GET …/invocation/next`): it is ready.
    pub fn first_next(&self) -> Option<Instant> {
        self.first_next.get()
    }

    /// Waits (at most `within`) for the first `/next`.
    pub fn wait_first_next(&self, within: Duration) -> Option<Instant> {
        self.first_next.wait(within)
    }
}

impl Drop for RuntimeApiProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
    )
}

async fn forward(State(st): State<Arc<ProxyState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    if parts.method == http::Method::GET && parts.uri.path().ends_with("/runtime/invocation/next") {
        st.first_next.set_now();
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", st.upstream);
    let mut rb = st.client.request(parts.method.clone(), url);
    for (k, v) in &parts.headers {
        if !hop_by_hop(k) {
            rb = rb.header(k, v);
        }
    }
    let length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
    if chunked || length.is_some_and(|l| l > 0) {
        // Frames are forwarded as they arrive; Content-Length, when given, is kept above.
        rb = rb.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    match rb.send().await {
        Ok(resp) => {
            let mut out = Response::builder().status(resp.status());
            for (k, v) in resp.headers() {
                if !hop_by_hop(k) {
                    out = out.header(k, v);
                }
            }
            let stream = resp
                .bytes_stream()
                .map(|r| r.map_err(std::io::Error::other));
            out.body(Body::from_stream(stream))
                .expect("proxied response")
        }
        Err(e) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::from(format!("runtime API proxy: {e}")))
            .expect("error response"),
    }
}

/// LWA + the SDK's serverless HTTP server: the two processes of one Lambda function, against
/// any Runtime API (`host:port`). Both are killed on drop.
pub struct LwaProcesses {
    app: Child,
    adapter: Child,
    /// When both processes were spawned (the function's process start).
    pub spawned_at: Instant,
    /// The SDK server's stdout (it prints `* Running on …` right before serving).
    pub app_stdout: Lines,
    /// The adapter's logs, and the SDK server's stderr (prefixed `[app]`).
    pub adapter_logs: Lines,
    /// The SDK server's port on 127.0.0.1 (`SERVERLESS_PORT`).
    pub app_port: u16,
}

impl LwaProcesses {
    /// Spawns the plugin in `INSTALL_METHOD=serverless` and `lambda-adapter` (LWA 1.x,
    /// `AWS_LWA_*` settings, response streaming) at the same instant, the way the managed
    /// runtime starts the app while the adapter runs as an extension, with `env` added to the
    /// adapter's (e.g. `AWS_LAMBDA_MAX_CONCURRENCY`, which LWA 1.x honours through
    /// `lambda_runtime`'s concurrent mode). Does not wait.
    pub fn spawn(runtime_api: &str, plugin: &str, py: Py, env: &[(&str, &str)]) -> Self {
        let app_port = free_port();
        let mut app_cmd = Command::new(py.python());
        app_cmd
            .args(["-m", "main"])
            .current_dir(plugin_dir(plugin))
            .env("INSTALL_METHOD", "serverless")
            .env("SERVERLESS_HOST", "127.0.0.1")
            .env("SERVERLESS_PORT", app_port.to_string())
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut adapter_cmd = Command::new(lwa_bin());
        adapter_cmd
            .env("AWS_LAMBDA_RUNTIME_API", runtime_api)
            .env("AWS_LAMBDA_FUNCTION_NAME", FUNCTION)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")
            .env("AWS_LWA_PORT", app_port.to_string())
            .env("AWS_LWA_READINESS_CHECK_PATH", "/health")
            .env("AWS_LWA_INVOKE_MODE", "response_stream")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut app = app_cmd.spawn().expect("spawn the SDK serverless server");
        let mut adapter = adapter_cmd.spawn().expect("spawn lambda-adapter");
        let app_stdout = Lines::collect(app.stdout.take().expect("stdout"));
        // The SDK logs to stderr in this mode; collected with the adapter's logs.
        let adapter_logs = Lines::collect(adapter.stderr.take().expect("stderr"));
        let app_err = app.stderr.take().expect("stderr");
        let sink = adapter_logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(app_err).lines().map_while(Result::ok) {
                let (vec, cv) = &*sink.inner;
                vec.lock()
                    .unwrap()
                    .push((Instant::now(), format!("[app] {line}")));
                cv.notify_all();
            }
        });
        Self {
            app,
            adapter,
            spawned_at,
            app_stdout,
            adapter_logs,
            app_port,
        }
    }

    /// Panics, with both processes' logs, if either has exited.
    pub fn assert_alive(&mut self, when: &str) {
        for (name, child) in [
            ("SDK server", &mut self.app),
            ("lambda-adapter", &mut self.adapter),
        ] {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited {when}: {status}; logs:\n{}\n{}",
                    self.app_stdout.dump(),
                    self.adapter_logs.dump()
                );
            }
        }
    }

    /// Both processes' logs (for failure messages).
    pub fn dump(&self) -> String {
        format!("{}\n{}", self.app_stdout.dump(), self.adapter_logs.dump())
    }

    /// When the SDK server said it serves (`* Running on …`), if it has.
    pub fn app_serving_at(&self) -> Option<Instant> {
        self.app_stdout.find("* Running on").map(|(at, _)| at)
    }

    /// The SDK server's pid.
    pub fn app_pid(&self) -> u32 {
        self.app.id()
    }

    /// The adapter's pid.
    pub fn adapter_pid(&self) -> u32 {
        self.adapter.id()
    }
}

impl Drop for LwaProcesses {
    fn drop(&mut self) {
        stop(&mut self.adapter);
        stop(&mut self.app);
    }
}

/// LWA + the SDK's serverless HTTP server as one Lambda function under a fresh emulator.
/// Everything is killed on drop.
pub struct LwaFunction {
    procs: LwaProcesses,
    proxy: RuntimeApiProxy,
    emulator: Emulator,
    /// When both processes were spawned (the function's process start).
    pub spawned_at: Instant,
    /// The SDK server's stdout (it prints `* Running on …` right before serving).
    pub app_stdout: Lines,
    /// The adapter's logs.
    pub adapter_logs: Lines,
}

impl LwaFunction {
    /// Starts a fresh emulator and the proxy (not counted), then spawns the two processes
    /// ([`LwaProcesses::spawn`]) against it. Does not wait.
    pub fn spawn(plugin: &str, py: Py) -> Self {
        let emulator = Emulator::start();
        let proxy = RuntimeApiProxy::start(&emulator.runtime_api());
        let procs = LwaProcesses::spawn(&proxy.addr.to_string(), plugin, py, &[]);
        Self {
            spawned_at: procs.spawned_at,
            app_stdout: procs.app_stdout.clone(),
            adapter_logs: procs.adapter_logs.clone(),
            procs,
            proxy,
            emulator,
        }
    }

    /// The emulated Function URL.
    pub fn function_url(&self) -> String {
        self.emulator.function_url()
    }

    /// When the SDK server said it serves (`* Running on …`), if it has.
    pub fn app_serving_at(&self) -> Option<Instant> {
        self.procs.app_serving_at()
    }

    /// Waits (bounded) until the adapter polls `/next` (its readiness check passed); returns
    /// the instant of its first poll.
    pub fn wait_polling(&mut self, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            // Wakes at the first poll; the slices only let it notice a process that died.
            if let Some(at) = self.proxy.wait_first_next(Duration::from_millis(100)) {
                return at;
            }
            self.procs.assert_alive("before the adapter polled /next");
            assert!(
                Instant::now() < deadline,
                "lambda-adapter did not poll /next within {within:?}; logs:\n{}",
                self.procs.dump()
            );
        }
    }

    /// The SDK server's pid.
    pub fn app_pid(&self) -> u32 {
        self.procs.app_pid()
    }

    /// The adapter's pid.
    pub fn adapter_pid(&self) -> u32 {
        self.procs.adapter_pid()
    }

    /// The emulator's pid.
    pub fn emulator_pid(&self) -> u32 {
        self.emulator.pid()
    }
}
