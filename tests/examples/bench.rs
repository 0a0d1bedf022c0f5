//! `make bench`: what the bootstrap costs over talking to the plugin directly, and how it
//! compares with the closest public peer (AWS Lambda Web Adapter in front of the SDK's own
//! serverless HTTP server). Writes its section of `BENCHMARKS.md` at the repository root (the
//! text between `<!-- bench:bootstrap:begin -->` and `<!-- bench:bootstrap:end -->`) and prints it.
//!
//! Paths, all on the template's sample plugin (tool `echo`) on the real SDK (`.venv/py312`):
//! - (a) the floor: the plugin over stdio, no HTTP at all;
//! - (b) a signed SRI v1 call through `bootstrap serve`;
//! - (c) the same through the bootstrap under `cargo lambda watch` (Function URL route);
//! - (d) LWA + the SDK's serverless server under `cargo lambda watch` (Function URL route).
//!
//! (b)–(d) are each called with two HTTP clients: reqwest, and a minimal client that ACKs at
//! once (TCP_QUICKACK), which removes a stall that belongs to the emulator (its server sockets
//! have no TCP_NODELAY), not to the function.
//!
//! Warm calls are interleaved in one run (each iteration calls every path once, starting from
//! a rotating path) so that machine noise hits all paths alike. Cold starts use fresh
//! processes and a fresh emulator each. Needs `target/release/bootstrap` (and
//! `target/dist/bootstrap` for its size), `.venv/py312`, cargo-lambda and `lambda-adapter`:
//! `make bench` builds and installs them.

use bytes::Bytes;
use connector::protocol::signing::KeyRing;
use futures_util::StreamExt;
use harness::benchmarks::{
    cmd_out, dify_plugin_version, http_client, install_cleanup, knob, loadavg, median, mib, ms,
    pct, run_lines, target_dir, track,
};
use harness::emulator::Emulator;
use harness::lwa::{Lines, LwaFunction, lwa_bin, lwa_version};
use harness::*;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const WARMUP: usize = 30;
/// Measured rounds (`SRI_BENCH_ROUNDS` overrides, for a quick look).
const ITERATIONS: usize = 300;
/// Fresh starts per cold-start row (`SRI_BENCH_COLD` overrides).
const COLD_TRIALS: usize = 5;
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STALL_MS: f64 = 30.0;
/// What `make bench` runs (the install only once; `{lwa}` is the installed version).
const COMMAND: &str = "make bench (= cargo install --locked lambda_web_adapter --version {lwa} \
                       --root .venv/tools/lwa; cargo build --release --locked -p sri-bootstrap; \
                       cargo build --profile dist --locked -p sri-bootstrap; cargo run --release \
                       --locked -p sri-tests --example bench)";

// ---------------------------------------------------------------------------------------------
// Cleanup on failure: the release profile aborts on panic, so no destructor would stop the
// processes started so far. A panic hook stops them (SIGTERM, then SIGKILL after 3 s), each
// identified by pid and start time so that a reused pid is never hit.

fn main() {
    install_cleanup("bench");
    let release = harness::benchmarks::release_bootstrap();
    let dist = target_dir().join("dist/bootstrap");
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("SRI_BOOTSTRAP_BIN", &release) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(run(release, dist));
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "bootstrap", &report).expect("write BENCHMARKS.md");
    println!("{report}");
    println!("(written to {})", out.display());
}

// ---------------------------------------------------------------------------------------------
// Calls

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathId {
    Floor,
    Serve,
    ServeQuick,
    Lambda,
    LambdaQuick,
    Lwa,
    LwaQuick,
}

const PATHS: [PathId; 7] = [
    PathId::Floor,
    PathId::Serve,
    PathId::ServeQuick,
    PathId::Lambda,
    PathId::LambdaQuick,
    PathId::Lwa,
    PathId::LwaQuick,
];

impl PathId {
    fn label(self) -> &'static str {
        match self {
            PathId::Floor => "(a) plugin over stdio (the floor)",
            PathId::Serve => "(b) SRI via `bootstrap serve`",
            PathId::ServeQuick => "(b′) the same",
            PathId::Lambda => "(c) SRI via the bootstrap under `cargo lambda watch`, Function URL",
            PathId::LambdaQuick => "(c′) the same",
            PathId::Lwa => {
                "(d) LWA + SDK serverless server under `cargo lambda watch`, Function URL"
            }
            PathId::LwaQuick => "(d′) the same",
        }
    }

    fn tag(self) -> &'static str {
        ["(a)", "(b)", "(b′)", "(c)", "(c′)", "(d)", "(d′)"][self.index()]
    }

    fn client(self) -> &'static str {
        match self {
            PathId::Floor => "stdio pipes",
            PathId::Serve | PathId::Lambda | PathId::Lwa => "reqwest",
            _ => "raw, TCP_QUICKACK",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One call: time to the first tool message, and to the session's `end`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    ttfb: Duration,
    total: Duration,
}

fn request(sid: &str) -> Bytes {
    envelope(
        sid,
        tool_data("sample", "echo", json!({"text": "bench"}), None),
    )
}

/// The plugin alone, spoken to over its stdio the way the bootstrap does.
struct Floor {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: BufReader<tokio::process::ChildStdout>,
    line: String,
}

impl Floor {
    fn spawn() -> Self {
        let mut child = tokio::process::Command::new(Py::Py312.python())
            .args(["-m", "main"])
            .current_dir(plugin_dir("sample"))
            .env("INSTALL_METHOD", "local")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the plugin");
        track(child.id().expect("running"));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self {
            child,
            stdin,
            stdout,
            line: String::new(),
        }
    }

    async fn start() -> Self {
        let mut this = Self::spawn();
        let seen = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                this.line.clear();
                let n = this.stdout.read_line(&mut this.line).await.expect("read");
                assert!(n > 0, "the plugin closed stdout before its first heartbeat");
                if this.line.starts_with("{\"event\":\"heartbeat\"") {
                    return;
                }
            }
        })
        .await;
        assert!(
            seen.is_ok(),
            "the plugin wrote no heartbeat within {START_TIMEOUT:?}"
        );
        this
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// A cold start of the plugin alone: spawn, write the request at once (the SDK reads it
    /// once started), time the first heartbeat and the session.
    async fn cold() -> Cold {
        let sid = session_id("cold");
        let mut line = request(&sid).to_vec();
        line.push(b'\n');
        let t0 = Instant::now();
        let mut f = Self::spawn();
        f.stdin.write_all(&line).await.expect("write stdin");
        let (mut heartbeat, mut ttfb) = (None, None);
        let run = async {
            loop {
                f.line.clear();
                let n = f.stdout.read_line(&mut f.line).await.expect("read");
                assert!(n > 0, "the plugin closed stdout");
                let at = t0.elapsed();
                if f.line.starts_with("{\"event\":\"heartbeat\"") {
                    heartbeat.get_or_insert(at);
                }
                if !f.line.contains(&sid) {
                    continue;
                }
                let v: Value = serde_json::from_str(f.line.trim()).expect("plugin JSON line");
                match v["data"]["type"].as_str() {
                    Some("end") => return at,
                    Some("error") => panic!("(a) session failed: {}", f.line),
                    _ => {
                        ttfb.get_or_insert(at);
                    }
                }
            }
        };
        let total = tokio::time::timeout(START_TIMEOUT, run)
            .await
            .expect("(a) cold: no end within the start timeout");
        Cold {
            ready: heartbeat.expect("a heartbeat before the answer"),
            first_byte: ttfb.expect("a message before end"),
            total,
            own: None,
            other: None,
        }
    }

    async fn call(&mut self, sid: &str) -> Sample {
        let mut line = request(sid).to_vec();
        line.push(b'\n');
        let t0 = Instant::now();
        self.stdin.write_all(&line).await.expect("write stdin");
        self.stdin.flush().await.expect("flush stdin");
        let mut ttfb = None;
        loop {
            self.line.clear();
            let n = self.stdout.read_line(&mut self.line).await.expect("read");
            assert!(n > 0, "the plugin closed stdout");
            if !self.line.contains(sid) {
                continue; // heartbeats, logs, blank separators
            }
            let at = t0.elapsed();
            let v: Value = serde_json::from_str(self.line.trim()).expect("plugin JSON line");
            if v["session_id"] != sid {
                continue;
            }
            match v["data"]["type"].as_str() {
                Some("end") => {
                    return Sample {
                        ttfb: ttfb.expect("a message before end"),
                        total: at,
                    };
                }
                Some("error") => panic!("(a) session failed: {}", self.line),
                _ => {
                    ttfb.get_or_insert(at);
                }
            }
        }
    }
}

/// Watches a response body for the first tool message and the session's `end`.
struct Watch {
    /// SRI SSE (`true`) or the SDK's own event lines (`false`).
    sse: bool,
    sid: String,
    buf: Vec<u8>,
    ttfb: Option<Duration>,
    total: Option<Duration>,
}

impl Watch {
    fn sri(sid: &str) -> Self {
        Self::new(true, sid)
    }

    fn sdk(sid: &str) -> Self {
        Self::new(false, sid)
    }

    fn new(sse: bool, sid: &str) -> Self {
        Self {
            sse,
            sid: sid.to_owned(),
            buf: Vec::new(),
            ttfb: None,
            total: None,
        }
    }

    fn feed(&mut self, t0: Instant, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.sse {
            while let Some(end) = find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let at = t0.elapsed();
                let kind = block
                    .split(|b| *b == b'\n')
                    .find_map(|l| l.strip_prefix(b"event: "));
                match kind {
                    Some(b"chunk") if self.ttfb.is_none() => {
                        assert!(
                            find(&block, b"bench").is_some(),
                            "unexpected first chunk: {}",
                            String::from_utf8_lossy(&block)
                        );
                        self.ttfb = Some(at);
                    }
                    Some(b"end") => self.total = Some(at),
                    Some(b"error") => {
                        panic!("session error: {}", String::from_utf8_lossy(&block))
                    }
                    _ => {}
                }
            }
        } else {
            while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let line = line.trim_ascii();
                if line.is_empty() {
                    continue;
                }
                let at = t0.elapsed();
                let v: Value = serde_json::from_slice(line).unwrap_or_else(|_| {
                    panic!("not a JSON line: {}", String::from_utf8_lossy(line))
                });
                if v["event"] == "error" {
                    panic!("plugin error: {v}");
                }
                if v["event"] != "session" || v["session_id"] != self.sid.as_str() {
                    continue;
                }
                match v["data"]["type"].as_str() {
                    Some("end") => self.total = Some(at),
                    Some("error") => panic!("session error: {v}"),
                    _ => {
                        self.ttfb.get_or_insert(at);
                    }
                }
            }
        }
    }

    fn sample(self, what: &str) -> Sample {
        Sample {
            ttfb: self
                .ttfb
                .unwrap_or_else(|| panic!("{what}: no tool message in the body")),
            total: self
                .total
                .unwrap_or_else(|| panic!("{what}: no end in the body")),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The headers of a call: SRI v1 signature headers (b, c), none for the peer (d: it has no
/// request authentication). Built after the clock starts: signing is part of the cost.
fn call_headers(sse: bool, ring: &KeyRing, sid: &str, body: &[u8]) -> http::HeaderMap {
    let mut headers = http::HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    if sse {
        headers.insert("accept", "text/event-stream".parse().unwrap());
        ring.sign(now(), sid, "invoke_tool", body)
            .apply(&mut headers)
            .expect("sign");
    }
    headers
}

/// A call with reqwest (one pooled keep-alive client, TCP_NODELAY; the kernel's delayed ACKs).
async fn reqwest_call(
    t0: Instant,
    client: &reqwest::Client,
    ring: &KeyRing,
    base: &str,
    mut w: Watch,
    body: Bytes,
) -> Sample {
    let headers = call_headers(w.sse, ring, &w.sid, &body);
    let resp = client
        .post(format!("{base}/invoke?action=invoke_tool"))
        .headers(headers)
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {base}/invoke: {e}"));
    let status = resp.status();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        panic!("{base}/invoke answered {status}: {text}");
    }
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        w.feed(t0, &chunk.expect("body"));
    }
    w.sample(base)
}

/// A minimal HTTP/1.1 keep-alive client that sets TCP_QUICKACK before every read, so that the
/// server's unacknowledged small writes are never held by Nagle's algorithm waiting for this
/// side's delayed ACK (cargo-lambda's server sockets have no TCP_NODELAY). Everything else is
/// as plain as it gets: one connection, head and body in one write, chunked decoding.
struct RawClient {
    addr: String,
    prefix: String,
    conn: Option<tokio::net::TcpStream>,
    rbuf: Vec<u8>,
}

impl RawClient {
    fn new(base: &str) -> Self {
        let rest = base.strip_prefix("http://").expect("http:// base URL");
        let (addr, prefix) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        Self {
            addr: addr.to_owned(),
            prefix: prefix.to_owned(),
            conn: None,
            rbuf: Vec::with_capacity(16 * 1024),
        }
    }

    async fn read_more(&mut self) {
        use std::os::fd::AsRawFd;
        let stream = self.conn.as_mut().expect("connected");
        let one: nix::libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option value of the size given.
        unsafe {
            nix::libc::setsockopt(
                stream.as_raw_fd(),
                nix::libc::IPPROTO_TCP,
                nix::libc::TCP_QUICKACK,
                (&one as *const nix::libc::c_int).cast(),
                std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
            );
        }
        let n = tokio::io::AsyncReadExt::read_buf(stream, &mut self.rbuf)
            .await
            .expect("read");
        assert!(n > 0, "{}: connection closed mid-response", self.addr);
    }

    async fn line(&mut self) -> Vec<u8> {
        loop {
            if let Some(p) = find(&self.rbuf, b"\r\n") {
                let line = self.rbuf[..p].to_vec();
                self.rbuf.drain(..p + 2);
                return line;
            }
            self.read_more().await;
        }
    }

    async fn call(&mut self, t0: Instant, ring: &KeyRing, mut w: Watch, body: Bytes) -> Sample {
        let headers = call_headers(w.sse, ring, &w.sid, &body);
        let mut req = format!(
            "POST {}/invoke?action=invoke_tool HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.prefix,
            self.addr,
            body.len()
        )
        .into_bytes();
        for (k, v) in &headers {
            req.extend_from_slice(k.as_str().as_bytes());
            req.extend_from_slice(b": ");
            req.extend_from_slice(v.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req.extend_from_slice(&body);
        if self.conn.is_none() {
            let s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .unwrap_or_else(|e| panic!("connect {}: {e}", self.addr));
            s.set_nodelay(true).expect("nodelay");
            self.conn = Some(s);
            self.rbuf.clear();
        }
        tokio::io::AsyncWriteExt::write_all(self.conn.as_mut().unwrap(), &req)
            .await
            .expect("write request");
        let status = self.line().await;
        let (mut chunked, mut length, mut close) = (false, None, false);
        loop {
            let h = String::from_utf8(self.line().await).expect("ASCII header");
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((&h, ""));
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_ascii_lowercase());
            match k.as_str() {
                "transfer-encoding" => chunked = v.contains("chunked"),
                "content-length" => length = v.parse::<usize>().ok(),
                "connection" => close = v.contains("close"),
                _ => {}
            }
        }
        assert!(
            status.starts_with(b"HTTP/1.1 200"),
            "{}{}: {}",
            self.addr,
            self.prefix,
            String::from_utf8_lossy(&status)
        );
        if chunked {
            loop {
                let size_line = String::from_utf8(self.line().await).expect("chunk size");
                let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                    .expect("hex chunk size");
                if size == 0 {
                    while !self.line().await.is_empty() {} // trailers
                    break;
                }
                self.body_bytes(t0, size, &mut w).await;
                assert!(self.line().await.is_empty(), "CRLF after a chunk");
            }
        } else if let Some(len) = length {
            self.body_bytes(t0, len, &mut w).await;
        } else {
            panic!("{}: response without a length", self.addr);
        }
        if close {
            self.conn = None;
        }
        w.sample(&self.prefix)
    }

    /// Feeds `len` body bytes to `w` as they arrive.
    async fn body_bytes(&mut self, t0: Instant, mut len: usize, w: &mut Watch) {
        while len > 0 {
            if self.rbuf.is_empty() {
                self.read_more().await;
            }
            let take = len.min(self.rbuf.len());
            w.feed(t0, &self.rbuf[..take]);
            self.rbuf.drain(..take);
            len -= take;
        }
    }
}

async fn bounded<F: std::future::Future<Output = Sample>>(what: &str, f: F) -> Sample {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no end within {CALL_TIMEOUT:?}"))
}

// ---------------------------------------------------------------------------------------------
// The bootstrap in Lambda mode, with timestamped logs

struct LambdaBootstrap {
    child: Child,
    logs: Lines,
    emulator: Emulator,
    spawned_at: Instant,
}

impl LambdaBootstrap {
    /// A fresh emulator (not counted), then the bootstrap `bin` against it; does not wait.
    fn spawn(bin: &Path) -> Self {
        let emulator = Emulator::start();
        let mut cmd = Command::new(bin);
        cmd.env("AWS_LAMBDA_RUNTIME_API", emulator.runtime_api())
            .env("AWS_LAMBDA_FUNCTION_NAME", harness::emulator::FUNCTION)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "4096")
            .env("LAMBDA_TASK_ROOT", task_root())
            .env("SRI_PYTHON", Py::Py312.python())
            .env("SRI_SIGNING_KEYS", keys_env(&[SECRET_A, SECRET_B]))
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().expect("spawn bootstrap");
        let logs = Lines::collect(child.stderr.take().expect("stderr"));
        track(emulator.pid());
        track(child.id());
        Self {
            child,
            logs,
            emulator,
            spawned_at,
        }
    }

    fn wait_log(&self, needle: &str) -> (Instant, String) {
        tokio::task::block_in_place(|| self.logs.wait_for(needle, START_TIMEOUT)).unwrap_or_else(
            || {
                panic!(
                    "bootstrap: no log line with {needle:?} within {START_TIMEOUT:?}; logs:\n{}",
                    self.logs.dump()
                )
            },
        )
    }

    /// (process start → "plugin process started", init_ms, process start → polling).
    fn ready(&self) -> (Duration, Duration, Duration) {
        let (polling, _) = self.wait_log("plugin ready; polling");
        let spawned = self.wait_log("plugin process started").0;
        self.plugin_pid();
        let (_, line) = self.wait_log("\"plugin ready\",");
        let init_ms = serde_json::from_str::<Value>(&line).expect("JSON log")["init_ms"]
            .as_u64()
            .expect("init_ms logged");
        (
            spawned - self.spawned_at,
            Duration::from_millis(init_ms),
            polling - self.spawned_at,
        )
    }

    fn plugin_pid(&self) -> u32 {
        let (_, line) = self.wait_log("plugin process started");
        let pid = serde_json::from_str::<Value>(&line).expect("JSON log")["pid"]
            .as_u64()
            .expect("pid logged") as u32;
        track(pid);
        pid
    }
}

impl Drop for LambdaBootstrap {
    fn drop(&mut self) {
        stop(&mut self.child);
        // The emulator drops after this (field order).
    }
}

// ---------------------------------------------------------------------------------------------
// Cold starts

#[derive(Clone, Copy, Debug)]
struct Cold {
    ready: Duration,
    first_byte: Duration,
    total: Duration,
    /// (c): process start → plugin spawned; (d): process start → SDK server serving.
    own: Option<Duration>,
    /// (c): plugin spawn → first heartbeat (init_ms); (d): SDK serving → adapter polling.
    other: Option<Duration>,
}

async fn cold_sri(bin: &Path, ring: &KeyRing) -> Cold {
    let sid = session_id("cold");
    let body = request(&sid);
    let f = LambdaBootstrap::spawn(bin);
    // The event is pending when the runtime first polls, as on a real cold start.
    let call = {
        let (ring, url, t0) = (ring.clone(), f.emulator.function_url(), f.spawned_at);
        tokio::spawn(async move {
            let mut c = RawClient::new(&url);
            bounded("(c) cold call", c.call(t0, &ring, Watch::sri(&sid), body)).await
        })
    };
    let (own, init, ready) = f.ready();
    let s = call.await.expect("cold call");
    drop(f);
    Cold {
        ready,
        first_byte: s.ttfb,
        total: s.total,
        own: Some(own),
        other: Some(init),
    }
}

/// A task root laid out as a function zip's (`plugin/` and the packager's manifest record):
/// the dist build, like every Lambda build, reads the record rather than `manifest.yaml`.
fn task_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        let root = target_dir().join("bench-task-root");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).expect("bench task root");
        let plugin = plugin_dir("sample");
        std::os::unix::fs::symlink(&plugin, root.join("plugin")).expect("plugin symlink");
        let manifest = connector::cli::load(&plugin)
            .expect("the sample plugin")
            .manifest;
        std::fs::write(
            root.join(connector::manifest::RECORD_FILE),
            manifest.record(),
        )
        .expect("manifest record");
        root
    })
    .clone()
}

fn spawn_lwa() -> LwaFunction {
    let f = LwaFunction::spawn("sample", Py::Py312);
    for pid in [f.emulator_pid(), f.app_pid(), f.adapter_pid()] {
        track(pid);
    }
    f
}

async fn cold_lwa(ring: &KeyRing) -> Cold {
    let sid = session_id("cold");
    let body = request(&sid);
    let mut f = spawn_lwa();
    let t0 = f.spawned_at;
    let call = {
        let (ring, url) = (ring.clone(), f.function_url());
        tokio::spawn(async move {
            let mut c = RawClient::new(&url);
            bounded("(d) cold call", c.call(t0, &ring, Watch::sdk(&sid), body)).await
        })
    };
    let polling = tokio::task::block_in_place(|| f.wait_polling(START_TIMEOUT));
    let s = call.await.expect("cold call");
    let serving = f
        .app_serving_at()
        .expect("the SDK server printed `* Running on` before it served");
    drop(f);
    Cold {
        ready: polling - t0,
        first_byte: s.ttfb,
        total: s.total,
        own: Some(serving - t0),
        other: Some(polling.saturating_duration_since(serving)),
    }
}

// ---------------------------------------------------------------------------------------------
// Figures

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What `/proc/PID/stat` counts CPU time in (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;
const IDLE_WINDOW: Duration = Duration::from_secs(2);

/// User + system CPU time of `pid`, in USER_HZ ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// (file size, size after `strip`) in bytes.
fn sizes(bin: &Path) -> Option<(u64, Option<u64>)> {
    let file = std::fs::metadata(bin).ok()?.len();
    let tmp = std::env::temp_dir().join(format!("sri-bench-strip-{}", std::process::id()));
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&tmp)
        .arg(bin)
        .status()
        .ok()
        .filter(|s| s.success())
        .and_then(|_| std::fs::metadata(&tmp).ok())
        .map(|m| m.len());
    let _ = std::fs::remove_file(&tmp);
    Some((file, stripped))
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB ({bytes} B)", bytes as f64 / 1e6)
}

// ---------------------------------------------------------------------------------------------

async fn run(release: PathBuf, dist: PathBuf) -> String {
    let started = Instant::now();
    let iterations = knob("SRI_BENCH_ROUNDS", ITERATIONS);
    let cold_trials = knob("SRI_BENCH_COLD", COLD_TRIALS);
    let load_start = loadavg();
    let client = http_client();
    let ring = signer("k1", SECRET_A);
    let lwa = lwa_bin();
    println!("bench: sizes…");
    let size_release = sizes(&release);
    let size_dist = sizes(&dist);
    let size_lwa = sizes(&lwa);

    // Cold starts first, with nothing else of ours running; one of each kind per round, in a
    // rotating order, so that background load hits them alike.
    let mut cold_a = Vec::new();
    let mut cold_c = Vec::new();
    let mut cold_c_dist = Vec::new();
    let mut cold_d = Vec::new();
    for i in 0..cold_trials {
        println!("bench: cold start round {}/{cold_trials}…", i + 1);
        for k in 0..4 {
            match (i + k) % 4 {
                0 => cold_a.push(Floor::cold().await),
                1 => cold_c.push(cold_sri(&release, &ring).await),
                2 => cold_d.push(cold_lwa(&ring).await),
                _ if dist.exists() => cold_c_dist.push(cold_sri(&dist, &ring).await),
                _ => {}
            }
        }
    }

    // Idle RSS of the dist binary in Lambda mode.
    let rss_dist_idle = if dist.exists() {
        let f = LambdaBootstrap::spawn(&dist);
        f.ready();
        vm_rss_kib(f.child.id())
    } else {
        None
    };

    // Warm: every path up at once.
    println!("bench: starting the paths…");
    let mut floor = Floor::start().await;
    let serve = Bootstrap::start(Options::new("sample"));
    track(serve.pid());
    serve.wait_ready().await;
    let lam = LambdaBootstrap::spawn(&release);
    lam.ready();
    let mut peer = spawn_lwa();
    tokio::task::block_in_place(|| peer.wait_polling(START_TIMEOUT));
    let serve_url = serve.url();
    let lam_url = lam.emulator.function_url();
    let peer_url = peer.function_url();

    // pids: (label, pid)
    let serve_plugin = serve.plugin_pid().await;
    track(serve_plugin);
    let procs: Vec<(&str, u32)> = vec![
        ("bootstrap `serve` (release)", serve.pid()),
        ("bootstrap Lambda mode (release)", lam.child.id()),
        ("plugin under `bootstrap serve`", serve_plugin),
        ("plugin under the Lambda bootstrap", lam.plugin_pid()),
        ("plugin, floor (stdio)", floor.pid()),
        ("lambda-adapter (LWA)", peer.adapter_pid()),
        ("SDK serverless server under LWA", peer.app_pid()),
        ("`cargo lambda watch` serving (c)", lam.emulator.pid()),
        ("`cargo lambda watch` serving (d)", peer.emulator_pid()),
    ];
    let rss_idle: Vec<Option<u64>> = procs.iter().map(|(_, p)| vm_rss_kib(*p)).collect();
    // CPU used while idle: a fixed measurement window, everything ready, no traffic.
    let ticks0: Vec<Option<u64>> = procs.iter().map(|(_, p)| cpu_ticks(*p)).collect();
    let window = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let window = window.elapsed().as_secs_f64();
    let idle_cpu: Vec<Option<f64>> = procs
        .iter()
        .zip(&ticks0)
        .map(|((_, p), t0)| {
            let used = cpu_ticks(*p)?.checked_sub((*t0)?)?;
            Some(used as f64 / USER_HZ / window * 100.0)
        })
        .collect();

    let mut serve_raw = RawClient::new(&serve_url);
    let mut lam_raw = RawClient::new(&lam_url);
    let mut peer_raw = RawClient::new(&peer_url);
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); PATHS.len()];
    for round in 0..WARMUP + iterations {
        if round == 0 {
            println!("bench: {WARMUP} warm-up rounds…");
        } else if round == WARMUP {
            println!("bench: {iterations} measured rounds…");
        }
        for k in 0..PATHS.len() {
            let path = PATHS[(round + k) % PATHS.len()];
            let sid = session_id("bench");
            let body = request(&sid);
            let (sri, sdk) = (Watch::sri(&sid), Watch::sdk(&sid));
            let what = path.tag();
            let t0 = Instant::now();
            let s = match path {
                PathId::Floor => bounded(what, floor.call(&sid)).await,
                PathId::Serve => {
                    let f = reqwest_call(t0, &client, &ring, &serve_url, sri, body);
                    bounded(what, f).await
                }
                PathId::ServeQuick => bounded(what, serve_raw.call(t0, &ring, sri, body)).await,
                PathId::Lambda => {
                    let f = reqwest_call(t0, &client, &ring, &lam_url, sri, body);
                    bounded(what, f).await
                }
                PathId::LambdaQuick => bounded(what, lam_raw.call(t0, &ring, sri, body)).await,
                PathId::Lwa => {
                    let f = reqwest_call(t0, &client, &ring, &peer_url, sdk, body);
                    bounded(what, f).await
                }
                PathId::LwaQuick => bounded(what, peer_raw.call(t0, &ring, sdk, body)).await,
            };
            if round >= WARMUP {
                samples[path.index()].push(s);
            }
        }
    }
    let rss_after: Vec<Option<u64>> = procs.iter().map(|(_, p)| vm_rss_kib(*p)).collect();
    drop(peer);
    drop(lam);
    drop(serve);
    drop(floor);
    let load_end = loadavg();
    let elapsed = started.elapsed();

    // ----- report
    let ttfb: Vec<Vec<f64>> = samples
        .iter()
        .map(|v| v.iter().map(|s| ms(s.ttfb)).collect())
        .collect();
    let total: Vec<Vec<f64>> = samples
        .iter()
        .map(|v| v.iter().map(|s| ms(s.total)).collect())
        .collect();
    let a = PathId::Floor.index();
    let (b, b2) = (PathId::Serve.index(), PathId::ServeQuick.index());
    let (c, c2) = (PathId::Lambda.index(), PathId::LambdaQuick.index());
    let (d, d2) = (PathId::Lwa.index(), PathId::LwaQuick.index());
    let diff = |x: usize, y: usize, q: f64, v: &Vec<Vec<f64>>| pct(&v[x], q) - pct(&v[y], q);
    let paired = |x: usize, y: usize, v: &Vec<Vec<f64>>| {
        let d: Vec<f64> = v[x].iter().zip(&v[y]).map(|(p, q)| p - q).collect();
        median(&d)
    };

    let mut r = String::new();
    let date = cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let git = cmd_out(
        "git",
        &[
            "-C",
            root().to_str().unwrap(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_else(|| "?".into());
    let dirty = cmd_out(
        "git",
        &["-C", root().to_str().unwrap(), "status", "--porcelain"],
    )
    .is_some();
    let rustc = cmd_out("rustc", &["--version"]).unwrap_or_default();
    let python = Command::new(Py::Py312.python())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cargo_lambda =
        cmd_out(harness::emulator::cargo_lambda(), &["lambda", "--version"]).unwrap_or_default();
    let lwa_v = lwa_version().unwrap_or_else(|| "?".into());

    let _ = writeln!(r, "# Benchmarks\n");
    let _ = writeln!(
        r,
        "Written by the benchmark itself (`tests/examples/bench.rs`); every figure is from the \
         run described here. Machines are noisy: compare differences and ratios within one \
         run, not absolute values across machines.\n"
    );
    r.push_str(&run_lines(
        &COMMAND.replace("{lwa}", &lwa_v),
        &date,
        elapsed,
        &load_start,
        &load_end,
    ));
    let _ = writeln!(
        r,
        "- software: {rustc}; {python}, dify-plugin {}; cargo-lambda {}; lambda_web_adapter {lwa_v} \
         (`lambda-adapter`, from crates.io)",
        dify_plugin_version(),
        cargo_lambda.trim_start_matches("cargo-lambda ")
    );
    let _ = writeln!(
        r,
        "- repository: {git}{}; timings use `target/release/bootstrap`",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    );
    let _ = writeln!(
        r,
        "- workload: tool `echo` of `template/plugin` with `{{\"text\": \"bench\"}}`: the plugin \
         answers one JSON message, one text message, then `end`\n"
    );

    let _ = writeln!(r, "## Warm calls\n");
    let _ = writeln!(
        r,
        "{iterations} measured rounds after {WARMUP} warm-up rounds; each round calls every path \
         once, one call at a time, starting from a rotating path. **TTFB** = the first tool \
         message fully received: the session's first stdout line (a), the first `chunk` SSE \
         event (b, c), the first session line of the SDK's HTTP body (d). **total** = the \
         session's `end`. (b) and (c) include signing the request; (d) is unsigned (the peer \
         has no request authentication).\n\n\
         Two HTTP clients, both keep-alive with TCP_NODELAY: *reqwest* (as a daemon-side \
         connector would be; the kernel's delayed ACKs), and *raw*: a minimal HTTP/1.1 client \
         that sets TCP_QUICKACK before every read. `cargo lambda watch` serves without \
         TCP_NODELAY, so its second small write of a streamed response waits (Nagle) for the \
         client's delayed ACK, up to ~40 ms; ACKing at once removes that emulator-only stall, \
         which a real Function URL front end does not share. The primed rows (′) therefore show \
         what the function itself costs. Client effects of ~0.1 ms remain (the floor's own \
         client reads a pipe; (b′) can come out marginally under it), so read differences below \
         that as noise.\n"
    );
    let _ = writeln!(
        r,
        "| path | client | TTFB p50 | TTFB p99 | total p50 | total p99 | calls with TTFB ≥ {STALL_MS:.0} ms |"
    );
    let _ = writeln!(r, "|---|---|---:|---:|---:|---:|---:|");
    for p in PATHS {
        let i = p.index();
        let stalls = ttfb[i].iter().filter(|t| **t >= STALL_MS).count();
        let _ = writeln!(
            r,
            "| {} | {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {stalls} / {} |",
            p.label(),
            p.client(),
            pct(&ttfb[i], 0.5),
            pct(&ttfb[i], 0.99),
            pct(&total[i], 0.5),
            pct(&total[i], 0.99),
            ttfb[i].len()
        );
    }
    let _ = writeln!(r);
    let verdict = |v: f64, limit: f64| {
        if v <= limit {
            "met".to_owned()
        } else {
            format!("**missed by {:.2} ms**", v - limit)
        }
    };
    let _ = writeln!(
        r,
        "| difference | p50 TTFB | p99 TTFB | p50 total | median of per-round differences (TTFB) | target (p50 TTFB) |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---|");
    for (name, x, y, target) in [
        (
            "(b) − (a): `bootstrap serve` over the floor",
            b,
            a,
            Some(0.5),
        ),
        ("(b′) − (a): the same, raw client", b2, a, Some(0.5)),
        (
            "(c) − (a): bootstrap under the emulator over the floor",
            c,
            a,
            Some(1.0),
        ),
        (
            "(c′) − (a): the same, raw client (no emulator stall)",
            c2,
            a,
            Some(1.0),
        ),
        ("(c′) − (b′): the emulator's Function URL hop", c2, b2, None),
        (
            "(d) − (a): LWA under the emulator over the floor",
            d,
            a,
            None,
        ),
        ("(d′) − (a): the same, raw client", d2, a, None),
    ] {
        let v = diff(x, y, 0.5, &ttfb);
        let _ = writeln!(
            r,
            "| {name} | {v:+.2} ms | {:+.2} ms | {:+.2} ms | {:+.2} ms | {} |",
            diff(x, y, 0.99, &ttfb),
            diff(x, y, 0.5, &total),
            paired(x, y, &ttfb),
            target.map_or("–".to_owned(), |t| format!("≤ {t} ms: {}", verdict(v, t)))
        );
    }
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "**(d) / (c)**, the peer over this bootstrap on the same emulator, reqwest: p50 TTFB \
         ×{:.1}, p99 TTFB ×{:.1}, p50 total ×{:.1}, p99 total ×{:.1}. **(d′) / (c′)**, raw \
         client: p50 TTFB ×{:.1}, p99 TTFB ×{:.1}, p50 total ×{:.1}, p99 total ×{:.1}.\n",
        pct(&ttfb[d], 0.5) / pct(&ttfb[c], 0.5),
        pct(&ttfb[d], 0.99) / pct(&ttfb[c], 0.99),
        pct(&total[d], 0.5) / pct(&total[c], 0.5),
        pct(&total[d], 0.99) / pct(&total[c], 0.99),
        pct(&ttfb[d2], 0.5) / pct(&ttfb[c2], 0.5),
        pct(&ttfb[d2], 0.99) / pct(&ttfb[c2], 0.99),
        pct(&total[d2], 0.5) / pct(&total[c2], 0.5),
        pct(&total[d2], 0.99) / pct(&total[c2], 0.99),
    );

    let _ = writeln!(r, "## Cold start\n");
    let _ = writeln!(
        r,
        "Median of {cold_trials} fresh starts per row (min–max in brackets), one of each row per \
         round in a rotating order; a fresh emulator each (its own start is not counted). The \
         clock starts when the function's processes are spawned; the invocation is sent at that \
         instant and waits (in the emulator, or in the plugin's stdin pipe for (a)), as a real \
         cold start's event does; (c) and (d) are called with the raw client (no emulator \
         stall). *ready* = (a) the plugin's first heartbeat; (c) the bootstrap's log `plugin \
         ready; polling for invocations`; (d) LWA's first `/next`, seen by the Runtime API \
         proxy. *Own share*: (c) process start → `plugin process started` (the bootstrap's \
         own start: config, manifest, extension registration, spawn); (d) process start → the \
         SDK server prints `* Running on` (app and adapter start together). *Other share*: (c) \
         `init_ms` of `plugin ready` (spawn → first heartbeat: Python and the SDK); (d) from the \
         server's line to LWA's first `/next` (its readiness check polls every 10 ms).\n"
    );
    let _ = writeln!(
        r,
        "| function | start → ready | start → first byte | start → end | own share | other share |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|");
    let cold_row = |name: &str, v: &[Cold]| -> String {
        let f = |g: &dyn Fn(&Cold) -> Option<Duration>| {
            let x: Vec<f64> = v.iter().filter_map(|c| g(c).map(ms)).collect();
            if x.is_empty() {
                return "–".to_owned();
            }
            format!(
                "{:.1} ms ({:.1}–{:.1})",
                median(&x),
                pct(&x, 0.0),
                pct(&x, 1.0)
            )
        };
        format!(
            "| {name} | {} | {} | {} | {} | {} |",
            f(&|c| Some(c.ready)),
            f(&|c| Some(c.first_byte)),
            f(&|c| Some(c.total)),
            f(&|c| c.own),
            f(&|c| c.other)
        )
    };
    let _ = writeln!(r, "{}", cold_row("(a) the plugin alone (stdio)", &cold_a));
    let _ = writeln!(r, "{}", cold_row("(c) bootstrap, release build", &cold_c));
    if !cold_c_dist.is_empty() {
        let _ = writeln!(r, "{}", cold_row("(c) bootstrap, dist build", &cold_c_dist));
    }
    let _ = writeln!(
        r,
        "{}",
        cold_row("(d) LWA + SDK serverless server", &cold_d)
    );
    // Per-round differences: each round's starts ran back to back under the same load.
    let per_round = |x: &[Cold], y: &[Cold], g: fn(&Cold) -> Duration| {
        let d: Vec<f64> = x.iter().zip(y).map(|(p, q)| ms(g(p)) - ms(g(q))).collect();
        format!(
            "{:+.1} ms ({:+.1} to {:+.1})",
            median(&d),
            pct(&d, 0.0),
            pct(&d, 1.0)
        )
    };
    let _ = writeln!(
        r,
        "\nPer-round differences, median (min to max): start → first byte (c) − (a) {}, \
         (d) − (a) {}, (d) − (c) {}; start → ready (c) − (a) {}, (d) − (c) {}. The \
         plugin's own start (Python importing the SDK) varies by tens of ms from one start to \
         the next on this machine, more under load, so differences of that order are noise; the \
         bootstrap's own share above is measured directly.\n",
        per_round(&cold_c, &cold_a, |c| c.first_byte),
        per_round(&cold_d, &cold_a, |c| c.first_byte),
        per_round(&cold_d, &cold_c, |c| c.first_byte),
        per_round(&cold_c, &cold_a, |c| c.ready),
        per_round(&cold_d, &cold_c, |c| c.ready),
    );

    let _ = writeln!(r, "## Size and memory\n");
    let _ = writeln!(r, "| binary | file | stripped | target ≤ 3 MB |");
    let _ = writeln!(r, "|---|---:|---:|---|");
    for (name, s, check) in [
        ("`target/release/bootstrap`", size_release, true),
        ("`target/dist/bootstrap` (what ships)", size_dist, true),
        ("`lambda-adapter` (reference)", size_lwa, false),
    ] {
        match s {
            Some((file, stripped)) => {
                let st = stripped.unwrap_or(file);
                let _ = writeln!(
                    r,
                    "| {name} | {} | {} | {} |",
                    mb(file),
                    stripped.map_or("`strip` not found".into(), mb),
                    if !check {
                        "–".to_owned()
                    } else if st <= 3_000_000 {
                        "met".into()
                    } else {
                        format!("**missed by {:.2} MB**", (st - 3_000_000) as f64 / 1e6)
                    }
                );
            }
            None => {
                let _ = writeln!(r, "| {name} | not built | | |");
            }
        }
    }
    let _ = writeln!(
        r,
        "\nVmRSS from `/proc/PID/status`: *idle* = after ready, before any traffic; *after* = \
         idle again after the {} warm calls. *CPU while idle*: user + system time from \
         `/proc/PID/stat` over {:.0} s with everything ready and no traffic, in % of one core \
         (10 ms resolution); it should be ~0 for every process.\n",
        WARMUP + iterations,
        IDLE_WINDOW.as_secs_f64()
    );
    let _ = writeln!(
        r,
        "| process | VmRSS idle | VmRSS after the warm run | CPU while idle |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|");
    for (i, (name, _)) in procs.iter().enumerate() {
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} |",
            mib(rss_idle[i]),
            mib(rss_after[i]),
            idle_cpu[i].map_or("–".into(), |c| format!("{c:.1} %"))
        );
    }
    if dist.exists() {
        let _ = writeln!(
            r,
            "| bootstrap Lambda mode (dist), separate start | {} | – | – |",
            mib(rss_dist_idle)
        );
    }
    r
}
