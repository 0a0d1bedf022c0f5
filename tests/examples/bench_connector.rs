//! `make bench`, second part: what the connector's gateway (`POST /v1/functions/{name}/{token}/invoke`
//! of `sri serve`) costs. Writes its section of `BENCHMARKS.md` at the repository root (the text
//! between `<!-- bench:connector:begin -->` and `<!-- bench:connector:end -->`) and prints it.
//!
//! Three measurements, in one run:
//! 1. added latency: a daemon-like client (unsigned, NDJSON until the `end` object) through the
//!    gateway to a real `bootstrap serve` (template's sample plugin, tool `echo`, real SDK on
//!    `.venv/py312`), against the same client signing and calling `bootstrap serve` directly
//!    (SSE until `end`), interleaved;
//! 2. idle streams: 10,000 concurrent invocations held open through the gateway by a fake SRI
//!    function that sends `start` and then only keepalive comments; VmRSS of the gateway before
//!    and with all of them open;
//! 3. relay throughput: a fake function streaming large `chunk` events as fast as it can, read
//!    as fast as possible directly, through the gateway, and through a byte proxy (the least a
//!    relay that reads what it relays does: the ceiling for the gateway), with each process's CPU
//!    time per byte.
//!
//! The gateway runs alone in a child process (this binary re-executed with `--gateway-child`:
//! `connector::server::serve`, the router of `sri serve`, with a backend of fixed targets), so
//! that its memory is measured by itself; the fake function is another child
//! (`--function-child`), and so is the byte proxy (`--proxy-child`); the clients run here. Children exit when their stdin closes, and the
//! panic hook stops every process started (the release profile aborts on panic). Needs
//! `target/release/bootstrap` and `.venv/py312`: `make bench` builds and installs them.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use connector::Error;
use connector::backend::{Backend, Function, Progress};
use connector::client::{Client, ClientOptions};
use connector::launch::Launcher;
use connector::package::Package;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::signing::KeyRing;
use connector::protocol::{EVENT_STREAM, sse};
use connector::server::AppState;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use harness::benchmarks::{
    cmd_out, dify_plugin_version, http_client, install_cleanup, knob, loadavg, median, mib, ms,
    pct, run_lines, track,
};
use harness::*;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::{BufRead, Read, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Warm-up rounds of the latency measurement.
const WARMUP: usize = 30;
/// Measured rounds (`SRI_BENCH_GATEWAY_ROUNDS` overrides).
const ROUNDS: usize = 2000;
/// Concurrent idle streams (`SRI_BENCH_STREAMS` overrides).
const STREAMS: usize = 10_000;
/// Streams being opened at once (the listen backlog is 1024).
const OPENING: usize = 256;
/// How long all streams are held open before the second memory reading.
const HOLD: Duration = Duration::from_secs(6);
/// The fake function's keepalive interval on idle streams.
const KEEPALIVE_MS: u64 = 5000;
/// The gateway's idle timeout in the idle-streams measurement (default: 60 s).
const IDLE_STREAMS_TIMEOUT_SECS: u64 = 600;
/// The gateway's idle timeout in the keepalive probe (keepalives every quarter of it).
const IDLE_PROBE_SECS: u64 = 2;
/// MiB streamed per throughput run and path (`SRI_BENCH_BULK_MIB` overrides).
const BULK_MIB: usize = 256;
/// Throughput runs per path and event size.
const BULK_RUNS: usize = 9;
/// Raw bytes of a large blob chunk: 768 KiB, 1 MiB as base64.
const BIG_RAW: usize = 768 * 1024;
/// Raw bytes of the blob chunks the SDK sends (`dify-wire.md`: ≤ 8192).
const SDK_RAW: usize = 8192;
/// MiB streamed per throughput run with SDK-sized chunks.
const SDK_MIB: usize = 32;
/// Passes per row of the decoding-alone table (the median is reported).
const DECODE_PASSES: usize = 7;
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
const BULK_TIMEOUT: Duration = Duration::from_secs(60);
const CHILD_START: Duration = Duration::from_secs(20);
/// What `make bench` runs for this part.
const COMMAND: &str = "make bench (its last step, after the bootstrap's benchmark: cargo run \
                       --release --locked -p sri-tests --example bench_connector)";

// ---------------------------------------------------------------------------------------------
// Cleanup on failure: the release profile aborts on panic, so no destructor would stop the
// processes started so far. A panic hook stops them (SIGTERM, then SIGKILL after 3 s), each
// identified by pid and start time so that a reused pid is never hit.

// ---------------------------------------------------------------------------------------------
// Open-file limits: the gateway holds two sockets per stream.

/// Open-file limits after [`raise_nofile`]: (soft, hard), and why raising fell short.
#[derive(Clone, Debug)]
struct NoFile {
    soft: u64,
    hard: u64,
    refused: Option<String>,
}

/// Raises RLIMIT_NOFILE to at least `want` (soft and hard; raising the hard limit needs
/// CAP_SYS_RESOURCE), or the soft limit to the hard one when `want` is `None`.
fn raise_nofile(want: Option<u64>) -> NoFile {
    use nix::libc::{RLIMIT_NOFILE, getrlimit, rlimit, setrlimit};
    let mut cur = rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a pointer to an rlimit.
    unsafe { getrlimit(RLIMIT_NOFILE, &mut cur) };
    let (soft, hard) = (cur.rlim_cur, cur.rlim_max);
    let target = match want {
        Some(w) => rlimit {
            rlim_cur: soft.max(w),
            rlim_max: hard.max(w),
        },
        None => rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        },
    };
    let mut refused = None;
    // SAFETY: as above. Failure (no privilege) leaves the limits as they were.
    if unsafe { setrlimit(RLIMIT_NOFILE, &target) } != 0 {
        refused = Some(std::io::Error::last_os_error().to_string());
        let soft_only = rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: as above.
        unsafe { setrlimit(RLIMIT_NOFILE, &soft_only) };
    }
    // SAFETY: as above.
    unsafe { getrlimit(RLIMIT_NOFILE, &mut cur) };
    NoFile {
        soft: cur.rlim_cur,
        hard: cur.rlim_max,
        refused,
    }
}

/// Descriptors the gateway needs besides one per stream (listener, epoll, pipes, its dedicated
/// and h2c connections to the function, the bench's own calls), with room to spare.
const GATEWAY_BASE_FDS: u64 = 64 + connector::client::DEFAULT_DEDICATED_STREAMS as u64;

/// "soft/hard" of a process's open-file limit, from `/proc/PID/limits`.
fn nofile_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|l| {
            let line = l.lines().find(|l| l.starts_with("Max open files"))?;
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(format!("{}/{}", f.get(3)?, f.get(4)?))
        })
        .unwrap_or_else(|| "?".into())
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

// ---------------------------------------------------------------------------------------------
// Children: the gateway and the fake function

/// Exits the process when its stdin closes (the parent is gone or done with it).
fn exit_with_stdin() {
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        std::process::exit(0);
    });
}

fn announce(addr: std::net::SocketAddr) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "listening on {addr}");
    let _ = out.flush();
}

/// A backend with fixed targets, one per function name.
struct Fixed(HashMap<String, String>);

impl Backend for Fixed {
    fn deploy<'a>(&'a self, _: &'a Package, _: Progress) -> BoxFuture<'a, Result<Function, Error>> {
        async { Err(Error::Backend("the bench's backend deploys nothing".into())) }.boxed()
    }
    fn find(&self, _: &str) -> Option<Function> {
        None
    }
    fn list(&self) -> Vec<Function> {
        self.0
            .keys()
            .map(|name| Function {
                name: name.clone(),
                identifier: format!("bench/{name}:0.0.1@x"),
                checksum: "x".into(),
            })
            .collect()
    }
    fn target(&self, name: &str) -> Option<connector::transport::Target> {
        self.0
            .get(name)
            .cloned()
            .map(connector::transport::Target::h2c)
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

/// `--gateway-child name=url[,name=url…] idle_timeout_secs [dedicated_streams]`: the gateway as
/// `sri serve` runs it (same runtime, `server::serve`, defaults of `sri serve`) on 127.0.0.1:0.
fn gateway_child(routes: &str, idle_secs: u64, dedicated_streams: usize) {
    exit_with_stdin();
    raise_nofile(None);
    let targets: HashMap<String, String> = routes
        .split(',')
        .filter_map(|r| r.split_once('='))
        .map(|(n, u)| (n.to_owned(), u.to_owned()))
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let backend: Arc<dyn Backend> = Arc::new(Fixed(targets));
        let state = Arc::new(AppState {
            launcher: Arc::new(Launcher::new(
                backend.clone(),
                "http://127.0.0.1".into(),
                capabilities(),
            )),
            backend,
            client: Client::new(
                signer("k1", SECRET_A),
                ClientOptions {
                    idle_timeout: Duration::from_secs(idle_secs),
                    dedicated_streams,
                    ..ClientOptions::default()
                },
            ),
            metrics: Default::default(),
            api_key: "bench".into(),
            intake: Arc::new(
                connector::intake::Intake::new(Default::default(), std::env::temp_dir()).unwrap(),
            ),
            require_verified: false,
            max_request_bytes: 5_242_880,
            start_wait: Duration::from_secs(1),
            limits: connector::server::Limits::default(),
            legacy_endpoints: false,
            relay_sessions: Default::default(),
        });
        let listener = connector::server::bind("127.0.0.1:0".parse().unwrap())
            .await
            .expect("bind");
        announce(listener.local_addr().expect("address"));
        connector::server::serve(state, listener, std::future::pending())
            .await
            .expect("serve");
    });
}

/// The gateway's capability tokens, as `sri serve` derives them from its ring.
fn capabilities() -> connector::capability::Capabilities {
    connector::capability::Capabilities::from_ring(&signer("k1", SECRET_A))
}

/// The endpoint the gateway hands the daemon for function `name` (its token included).
fn gw_endpoint(base: &str, name: &str) -> String {
    format!("{base}/v1/functions/{name}/{}", capabilities().token(name))
}

/// The fake function's counters.
#[derive(Default)]
struct FnState {
    open: AtomicUsize,
    peak: AtomicUsize,
    served: AtomicUsize,
    /// Base64 text to slice blobs from.
    blob: Bytes,
}

/// An idle stream, counted while its body exists.
struct Open(Arc<FnState>);

impl Open {
    fn new(s: Arc<FnState>) -> Self {
        let n = s.open.fetch_add(1, Ordering::SeqCst) + 1;
        s.peak.fetch_max(n, Ordering::SeqCst);
        Self(s)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The fake SRI function: tool `idle` answers `start`, then a keepalive comment every
/// `keepalive_ms`, forever; tool `bulk` answers `start`, `count` `chunk` events holding a
/// `blob_chunk` of `raw` bytes (as base64), and `end`, as fast as the connection takes them.
/// Signatures are not checked.
async fn fn_invoke(State(st): State<Arc<FnState>>, body: Bytes) -> Response {
    st.served.fetch_add(1, Ordering::Relaxed);
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let sid = v["session_id"].as_str().unwrap_or("s").to_owned();
    let p = &v["data"]["tool_parameters"];
    let start = sse::encode(&Event::new(
        EventKind::Start,
        None,
        json!({"session_id": sid, "request_id": "bench", "cold_start": false}).to_string(),
    ));
    let body = match v["data"]["tool"].as_str() {
        Some("idle") => {
            let every = Duration::from_millis(p["keepalive_ms"].as_u64().unwrap_or(KEEPALIVE_MS));
            let open = Open::new(st.clone());
            let keepalives = futures_util::stream::unfold(open, move |open| async move {
                tokio::time::sleep(every).await;
                Some((
                    Ok::<_, Infallible>(Bytes::from_static(sse::KEEPALIVE)),
                    open,
                ))
            });
            Body::from_stream(futures_util::stream::once(async { Ok(start) }).chain(keepalives))
        }
        Some("bulk") => {
            let count = p["count"].as_u64().unwrap_or(1) as usize;
            let raw = p["raw"].as_u64().unwrap_or(1024) as usize;
            let b64 = raw.div_ceil(3) * 4;
            assert!(b64 <= st.blob.len(), "blob over the fake's buffer");
            let total = raw * count;
            let mut parts: Vec<Bytes> = Vec::with_capacity(3 * count + 2);
            parts.push(start);
            // Large events go out in three pieces around a shared blob (no copy); smaller ones
            // as one piece each, as the bootstrap writes its events.
            let contiguous = b64 <= 64 * 1024;
            for i in 0..count {
                let at = parts.len();
                parts.push(
                    format!(
                        "event: chunk\nid: {}\ndata: {{\"event\":\"session\",\"session_id\":\"{sid}\",\
                         \"data\":{{\"type\":\"stream\",\"data\":{{\"type\":\"blob_chunk\",\
                         \"id\":\"bench-blob\",\"sequence\":{i},\"total_length\":{total},\"blob\":\"",
                        i + 1
                    )
                    .into(),
                );
                parts.push(st.blob.slice(..b64));
                parts.push(format!("\",\"end\":{}}}}}}}\n\n", i + 1 == count).into());
                if contiguous {
                    let event: Vec<u8> = parts.drain(at..).flatten().collect();
                    parts.push(event.into());
                }
            }
            parts.push(sse::encode(&Event::new(
                EventKind::End,
                Some(count as u64 + 1),
                connector::protocol::events::session_end(&sid),
            )));
            Body::from_stream(futures_util::stream::iter(
                parts.into_iter().map(Ok::<_, Infallible>),
            ))
        }
        other => {
            return (
                http::StatusCode::BAD_REQUEST,
                format!("{{\"errorType\":\"BadRequest\",\"errorMessage\":\"tool {other:?}\"}}"),
            )
                .into_response();
        }
    };
    Response::builder()
        .header("content-type", EVENT_STREAM)
        .header("cache-control", "no-cache")
        .body(body)
        .expect("response")
}

/// `--function-child`: the fake SRI function on 127.0.0.1:0.
fn function_child() {
    exit_with_stdin();
    raise_nofile(None);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let st = Arc::new(FnState {
            blob: Bytes::from(vec![b'A'; 2 * 1024 * 1024]),
            ..FnState::default()
        });
        let app = Router::new()
            .route("/invoke", post(fn_invoke))
            .route(
                "/open",
                get(|State(s): State<Arc<FnState>>| async move {
                    axum::Json(json!({
                        "open": s.open.load(Ordering::SeqCst),
                        "peak": s.peak.load(Ordering::SeqCst),
                        "served": s.served.load(Ordering::SeqCst),
                    }))
                }),
            )
            .with_state(st);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        announce(listener.local_addr().expect("address"));
        // As `bootstrap serve` does: HTTP/1.1 and h2c on one port, no cap on concurrent streams.
        let mut http = auto::Builder::new(TokioExecutor::new());
        http.http2()
            .max_concurrent_streams(None)
            .initial_connection_window_size(16 * 1024 * 1024)
            .max_frame_size(256 * 1024);
        loop {
            let (tcp, _) = listener.accept().await.expect("accept");
            let _ = tcp.set_nodelay(true);
            let conn = http
                .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(app.clone()))
                .into_owned();
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    });
}

/// Bytes a relay copies per read: as much as a read from loopback hands over, so that the
/// byte proxy makes as few system calls as it can.
const PROXY_BUF: usize = 1024 * 1024;

/// `--proxy-child host:port`: the least a process between the daemon and a function does if it
/// reads what it relays (the gateway must, to rewrite SSE as NDJSON): every byte read and written
/// on unchanged (no HTTP, no decoding), on 127.0.0.1:0. Its throughput is the gateway's ceiling.
fn proxy_child(target: &str) {
    exit_with_stdin();
    let target = target.to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        announce(listener.local_addr().expect("address"));
        loop {
            let (mut down, _) = listener.accept().await.expect("accept");
            let target = target.clone();
            tokio::spawn(async move {
                let Ok(mut up) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut down, &mut up, PROXY_BUF, PROXY_BUF,
                )
                .await;
            });
        }
    });
}

/// A child of this binary, stopped on drop (stdin closed, then SIGTERM, SIGKILL after 5 s).
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: String,
}

impl Proc {
    fn spawn(what: &str, args: &[&str]) -> Self {
        let exe = std::env::current_exe().expect("own path");
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the {what}: {e}"));
        track(child.id());
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = std::io::BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {} // drain
        });
        let line = match rx.recv_timeout(CHILD_START) {
            Ok(l) => l,
            Err(_) => {
                stop(&mut child);
                panic!("the {what} did not announce its address within {CHILD_START:?}");
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("the {what} said {line:?}"))
            .to_owned();
        Self { child, stdin, addr }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        stop(&mut self.child);
    }
}

// ---------------------------------------------------------------------------------------------
// The daemon-like client: reads lines as they come, keeping only the head of each.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// SRI SSE (`event:`/`id:`/`data:` lines, blank line ends an event).
    Sse,
    /// The gateway's NDJSON (`{…}\n\n`).
    Ndjson,
}

/// Bytes kept of each line: enough to tell what the object is.
const HEAD: usize = 4096;

/// Splits a response body into lines without copying them, timing the first plugin message
/// and the session's `end`.
struct Reader {
    framing: Framing,
    t0: Instant,
    head: Vec<u8>,
    line_len: usize,
    /// SSE: the current event's name.
    event: Vec<u8>,
    /// SSE: the current event's data (head, length).
    data: Option<(Vec<u8>, usize)>,
    messages: u64,
    message_bytes: u64,
    body_chunks: u64,
    body_bytes: u64,
    first: Option<Duration>,
    end: Option<Duration>,
}

impl Reader {
    fn new(framing: Framing, t0: Instant) -> Self {
        Self {
            framing,
            t0,
            head: Vec::with_capacity(HEAD),
            line_len: 0,
            event: Vec::new(),
            data: None,
            messages: 0,
            message_bytes: 0,
            body_chunks: 0,
            body_bytes: 0,
            first: None,
            end: None,
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        self.body_chunks += 1;
        self.body_bytes += data.len() as u64;
        while !data.is_empty() {
            match find_nl(data) {
                Some(i) => {
                    self.take(&data[..i]);
                    self.line_done();
                    data = &data[i + 1..];
                }
                None => {
                    self.take(data);
                    break;
                }
            }
        }
    }

    fn take(&mut self, seg: &[u8]) {
        self.line_len += seg.len();
        if self.head.len() < HEAD {
            let n = (HEAD - self.head.len()).min(seg.len());
            self.head.extend_from_slice(&seg[..n]);
        }
    }

    fn line_done(&mut self) {
        let (head, len) = (std::mem::take(&mut self.head), self.line_len);
        self.line_len = 0;
        match self.framing {
            Framing::Ndjson if len > 0 => {
                // A whole line is parsed; of a longer one (a big chunk) the head tells enough.
                let kind = if len <= HEAD {
                    let v: Value = serde_json::from_slice(&head).unwrap_or_else(|_| {
                        panic!("not a JSON line: {}", String::from_utf8_lossy(&head))
                    });
                    match v["data"]["type"].as_str() {
                        Some("end") => "end",
                        Some("error") => "error",
                        _ => "chunk",
                    }
                } else if find(&head, b"\"type\":\"error\"").is_some() {
                    "error"
                } else {
                    "chunk"
                };
                self.object(kind.as_bytes(), &head, len);
            }
            Framing::Ndjson => {}
            Framing::Sse if len == 0 => {
                if let Some((data, n)) = self.data.take() {
                    let event = std::mem::take(&mut self.event);
                    self.object(&event, &data, n);
                }
                self.event.clear();
            }
            Framing::Sse => {
                if let Some(name) = head.strip_prefix(b"event: ") {
                    self.event = name.to_vec();
                } else if let Some(data) = head.strip_prefix(b"data: ") {
                    self.data = Some((data.to_vec(), len - 6));
                }
                // `id:` lines and `: keepalive` comments need nothing.
            }
        }
        self.head = head;
        self.head.clear();
    }

    fn object(&mut self, kind: &[u8], head: &[u8], len: usize) {
        let at = self.t0.elapsed();
        match kind {
            b"chunk" => {
                self.messages += 1;
                self.message_bytes += len as u64;
                self.first.get_or_insert(at);
            }
            b"end" => self.end = Some(at),
            b"error" => panic!("session error: {}", String::from_utf8_lossy(head)),
            _ => {} // start, usage, log
        }
    }
}

/// The first `\n` of `b`, eight bytes at a time (as a daemon's line scanner would).
fn find_nl(b: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    const NL: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    let mut i = 0;
    while i + 8 <= b.len() {
        let w = u64::from_le_bytes(b[i..i + 8].try_into().unwrap()) ^ NL;
        if w.wrapping_sub(LO) & !w & HI != 0 {
            break;
        }
        i += 8;
    }
    b[i..].iter().position(|&c| c == b'\n').map(|p| p + i)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One streamed call: signed SSE to a function (`ring`), or unsigned to the gateway (NDJSON).
async fn call(
    client: &reqwest::Client,
    url: &str,
    ring: Option<&KeyRing>,
    sid: &str,
    body: Bytes,
    framing: Framing,
) -> Reader {
    let t0 = Instant::now();
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("accept", EVENT_STREAM);
    if let Some(ring) = ring {
        let mut headers = http::HeaderMap::new();
        // SRI v2 for the function the gateway routes `echo` to, as the gateway signs it.
        ring.sign_v2(now(), &harness::nonce(), "echo", sid, "invoke_tool", &body)
            .apply(&mut headers)
            .expect("sign");
        req = req.headers(headers);
    }
    let resp = req
        .body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {url}: {e}"));
    let status = resp.status();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        panic!("{url} answered {status}: {text}");
    }
    let mut r = Reader::new(framing, t0);
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        r.feed(&chunk.unwrap_or_else(|e| panic!("{url}: body: {e}")));
    }
    assert!(r.end.is_some(), "{url}: the body ended without `end`");
    r
}

async fn bounded<T, F: std::future::Future<Output = T>>(what: &str, limit: Duration, f: F) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: not done within {limit:?}"))
}

fn tool_request(sid: &str, tool: &str, params: Value) -> Bytes {
    envelope(sid, tool_data("bench", tool, params, None))
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

/// CPU time a process has used so far, all its threads, user and system (`/proc/PID/stat`).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let ticks: u64 = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // In USER_HZ, which is 100 on x86_64 and arm64.
    Some(Duration::from_millis(ticks * 10))
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--gateway-child") => {
            let idle = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(60);
            let dedicated = args
                .get(4)
                .and_then(|s| s.parse().ok())
                .unwrap_or(connector::client::DEFAULT_DEDICATED_STREAMS);
            return gateway_child(args.get(2).expect("routes"), idle, dedicated);
        }
        Some("--function-child") => return function_child(),
        Some("--proxy-child") => return proxy_child(args.get(2).expect("target")),
        Some(other) => panic!("unknown argument {other:?}"),
        None => {}
    }
    install_cleanup("bench_connector");
    let release = harness::benchmarks::release_bootstrap();

    let asked = knob("SRI_BENCH_STREAMS", STREAMS);
    // Each stream is one socket here and one in the gateway (its streams to the function share
    // a few h2c connections); the children
    // inherit this limit. Where the hard limit cannot be raised far enough, hold as many
    // streams as the gateway can (in hundreds), and say so.
    let nofile = raise_nofile(Some(asked as u64 + GATEWAY_BASE_FDS));
    let fit = (nofile.soft.saturating_sub(GATEWAY_BASE_FDS) / 100 * 100) as usize;
    let streams = asked.min(fit);
    if streams < asked {
        eprintln!(
            "bench_connector: RLIMIT_NOFILE is {}/{} ({}): holding {streams} streams, not {asked}",
            nofile.soft,
            nofile.hard,
            nofile.refused.as_deref().unwrap_or("not raised")
        );
    }
    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("SRI_BOOTSTRAP_BIN", &release) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(run(streams, asked, nofile));
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "connector", &report).expect("write BENCHMARKS.md");
    println!("{report}");
    println!("(written to {})", out.display());
}

/// A throughput run: MB/s of plugin objects delivered, and the mean body chunk the client got.
#[derive(Clone, Copy, Debug)]
struct Bulk {
    mb_s: f64,
    chunk_kib: f64,
    /// Bytes per plugin object.
    object: f64,
    /// Bytes of plugin objects delivered.
    bytes: f64,
    /// CPU time used during the run by the function, the relay (none when direct) and this
    /// process (the client).
    cpu: [Duration; 3],
}

/// CPU seconds per GB delivered by the function, the relay and the client over `runs`.
fn cpu_per_gb(runs: &[Bulk]) -> [f64; 3] {
    let gb: f64 = runs.iter().map(|b| b.bytes).sum::<f64>() / 1e9;
    [0, 1, 2].map(|i| runs.iter().map(|b| b.cpu[i].as_secs_f64()).sum::<f64>() / gb)
}

/// Path `path` of the throughput runs: its URL, its framing, and its relay (`Some(true)` the
/// gateway, `Some(false)` the byte proxy, `None` direct).
fn relay_path<'a>(
    path: usize,
    direct: &'a str,
    gateway: &'a str,
    proxy: &'a str,
) -> (&'a str, Framing, Option<bool>) {
    match path {
        0 => (direct, Framing::Sse, None),
        1 => (gateway, Framing::Ndjson, Some(true)),
        _ => (proxy, Framing::Sse, Some(false)),
    }
}

async fn bulk(
    client: &reqwest::Client,
    url: &str,
    framing: Framing,
    raw: usize,
    mib: usize,
) -> Bulk {
    let event = raw.div_ceil(3) * 4;
    let count = (mib * 1024 * 1024).div_ceil(event);
    let sid = session_id("bulk");
    let body = tool_request(&sid, "bulk", json!({"count": count, "raw": raw}));
    let r = bounded(
        "throughput run",
        BULK_TIMEOUT,
        call(client, url, None, &sid, body, framing),
    )
    .await;
    assert_eq!(r.messages, count as u64, "{url}: chunks delivered");
    let secs = r.end.expect("end").as_secs_f64();
    Bulk {
        mb_s: r.message_bytes as f64 / 1e6 / secs,
        chunk_kib: r.body_bytes as f64 / r.body_chunks as f64 / 1024.0,
        object: r.message_bytes as f64 / r.messages as f64,
        bytes: r.message_bytes as f64,
        cpu: [Duration::ZERO; 3],
    }
}

/// Decodes `wire` with `connector::protocol::sse::decode` delivered in `chunk`-byte pieces, as
/// the gateway's client does; MB/s of event data.
async fn decode_alone(wire: &Bytes, chunk: usize) -> f64 {
    let pieces: Vec<Bytes> = (0..wire.len())
        .step_by(chunk)
        .map(|i| wire.slice(i..(i + chunk).min(wire.len())))
        .collect();
    let t0 = Instant::now();
    let mut events = std::pin::pin!(sse::decode(futures_util::stream::iter(
        pieces.into_iter().map(Ok::<_, Infallible>),
    )));
    let mut data = 0usize;
    while let Some(e) = events.next().await {
        data += e.expect("valid SSE").data.len();
    }
    data as f64 / 1e6 / t0.elapsed().as_secs_f64()
}

/// The same pieces through this file's line reader (no decoding): the linear baseline.
fn split_alone(wire: &Bytes, chunk: usize) -> f64 {
    let t0 = Instant::now();
    let mut r = Reader::new(Framing::Sse, t0);
    for i in (0..wire.len()).step_by(chunk) {
        r.feed(&wire[i..(i + chunk).min(wire.len())]);
    }
    assert!(r.end.is_some());
    r.message_bytes as f64 / 1e6 / t0.elapsed().as_secs_f64()
}

/// `n` big `chunk` events and `end`, as SSE.
fn bulk_wire(n: usize, raw: usize) -> Bytes {
    let blob = "A".repeat(raw.div_ceil(3) * 4);
    let mut w = Vec::new();
    for i in 0..n {
        let data = format!(
            "{{\"event\":\"session\",\"session_id\":\"s\",\"data\":{{\"type\":\"stream\",\"data\":\
             {{\"type\":\"blob_chunk\",\"id\":\"b\",\"sequence\":{i},\"total_length\":{},\
             \"blob\":\"{blob}\",\"end\":false}}}}}}",
            n * raw
        );
        w.extend_from_slice(&sse::encode(&Event::new(
            EventKind::Chunk,
            Some(i as u64 + 1),
            data,
        )));
    }
    w.extend_from_slice(&sse::encode(&Event::new(
        EventKind::End,
        Some(n as u64 + 1),
        connector::protocol::events::session_end("s"),
    )));
    w.into()
}

async fn fn_counts(client: &reqwest::Client, func: &str) -> Value {
    let resp = client
        .get(format!("{func}/open"))
        .send()
        .await
        .expect("GET /open");
    resp.json().await.expect("JSON")
}

/// A metric's value from the gateway's `/metrics` (summed over its label sets).
async fn metric(client: &reqwest::Client, gw: &str, name: &str) -> f64 {
    let text = client
        .get(format!("{gw}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// What the gateway does with a stream that is alive but sends only keepalive comments, with
/// its client idle timeout at `IDLE_PROBE_SECS`: how long until the stream ended, and whether
/// it ended with `FunctionStreamBroken` (`None`: still open after three idle timeouts).
async fn idle_timeout_probe(client: &reqwest::Client, func: &str) -> Option<(Duration, bool)> {
    let gw = Proc::spawn(
        "gateway",
        &[
            "--gateway-child",
            &format!("idle={func}"),
            &IDLE_PROBE_SECS.to_string(),
        ],
    );
    let sid = session_id("probe");
    let body = tool_request(
        &sid,
        "idle",
        json!({"keepalive_ms": IDLE_PROBE_SECS * 1000 / 4}),
    );
    let t0 = Instant::now();
    let read = async {
        let resp = client
            .post(format!(
                "{}/invoke?action=invoke_tool",
                gw_endpoint(&gw.url(), "idle")
            ))
            .header("content-type", "application/json")
            .header("accept", EVENT_STREAM)
            .body(body)
            .send()
            .await
            .expect("probe call");
        resp.text().await.unwrap_or_default()
    };
    let limit = Duration::from_secs(3 * IDLE_PROBE_SECS);
    let out = tokio::time::timeout(limit, read)
        .await
        .ok()
        .map(|text| (t0.elapsed(), text.contains("FunctionStreamBroken")));
    drop(gw);
    out
}

async fn run(streams: usize, asked: usize, nofile: NoFile) -> String {
    let started = Instant::now();
    let rounds = knob("SRI_BENCH_GATEWAY_ROUNDS", ROUNDS);
    let bulk_mib = knob("SRI_BENCH_BULK_MIB", BULK_MIB);
    let load_start = loadavg();
    let client = http_client();
    let ring = signer("k1", SECRET_A);
    let me = std::process::id();

    // ----- 1. Added latency: direct vs through the gateway, interleaved.
    println!("bench_connector: added latency ({rounds} rounds)…");
    // The function knows its name, as the local backend's do (SRI v2 binds it).
    let boot = tokio::task::block_in_place(|| {
        Bootstrap::start(Options::new("sample").env("SRI_FUNCTION_NAME", "echo"))
    });
    track(boot.pid());
    track(boot.plugin_pid().await);
    boot.wait_ready().await;
    let gw = Proc::spawn(
        "gateway",
        &["--gateway-child", &format!("echo={}", boot.url()), "60"],
    );
    // The same gateway with every call on the shared h2c connection, for comparison.
    let gw_h2c = Proc::spawn(
        "gateway (h2c only)",
        &[
            "--gateway-child",
            &format!("echo={}", boot.url()),
            "60",
            "0",
        ],
    );
    let gw_rss_start = vm_rss_kib(gw.pid());
    let direct_url = format!("{}/invoke?action=invoke_tool", boot.url());
    let gw_urls = [gw.url(), gw_h2c.url()]
        .map(|u| format!("{}/invoke?action=invoke_tool", gw_endpoint(&u, "echo")));
    // [direct, gateway, gateway h2c only] × [ttfb, total], and per-round differences.
    let mut lat: [[Vec<f64>; 2]; 3] = Default::default();
    for round in 0..WARMUP + rounds {
        let mut got = [None, None, None];
        for k in 0..3 {
            let path = (round + k) % 3;
            let sid = session_id("lat");
            let body = envelope(
                &sid,
                tool_data("sample", "echo", json!({"text": "bench"}), None),
            );
            let r = if path == 0 {
                let f = call(&client, &direct_url, Some(&ring), &sid, body, Framing::Sse);
                bounded("direct call", CALL_TIMEOUT, f).await
            } else {
                let f = call(
                    &client,
                    &gw_urls[path - 1],
                    None,
                    &sid,
                    body,
                    Framing::Ndjson,
                );
                bounded("gateway call", CALL_TIMEOUT, f).await
            };
            assert_eq!(r.messages, 2, "echo answers two messages");
            got[path] = Some((r.first.expect("a message"), r.end.expect("end")));
        }
        if round >= WARMUP {
            for (path, g) in got.iter().enumerate() {
                let (first, end) = g.expect("every path called");
                lat[path][0].push(ms(first));
                lat[path][1].push(ms(end));
            }
        }
    }
    let gw_rss_lat = vm_rss_kib(gw.pid());
    let gw_nofile = nofile_of(gw.pid());
    drop(gw);
    drop(gw_h2c);
    drop(boot);

    // ----- 2. Idle streams held by the gateway.
    println!("bench_connector: {streams} idle streams…");
    let func = Proc::spawn("fake function", &["--function-child"]);
    let fn_nofile = nofile_of(func.pid());
    let routes = format!("idle={0},bulk={0}", func.url());
    let gw = Proc::spawn(
        "gateway",
        &[
            "--gateway-child",
            &routes,
            &IDLE_STREAMS_TIMEOUT_SECS.to_string(),
        ],
    );
    let idle_url = format!(
        "{}/invoke?action=invoke_tool",
        gw_endpoint(&gw.url(), "idle")
    );
    let bulk_url = format!(
        "{}/invoke?action=invoke_tool",
        gw_endpoint(&gw.url(), "bulk")
    );
    // Warm-up: a few complete small streams through the same paths.
    for _ in 0..20 {
        let sid = session_id("warm");
        let body = tool_request(&sid, "bulk", json!({"count": 4, "raw": 3072}));
        bounded(
            "warm-up",
            CALL_TIMEOUT,
            call(&client, &bulk_url, None, &sid, body, Framing::Ndjson),
        )
        .await;
    }
    let pids = [gw.pid(), func.pid(), me];
    let rss_before: Vec<Option<u64>> = pids.iter().map(|p| vm_rss_kib(*p)).collect();
    let fds_before = open_fds(gw.pid());
    let stream_client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let t_open = Instant::now();
    let opening = futures_util::stream::iter(0..streams)
        .map(|_| {
            let (c, url) = (stream_client.clone(), idle_url.clone());
            async move {
                let sid = session_id("idle");
                let body = tool_request(&sid, "idle", json!({"keepalive_ms": KEEPALIVE_MS}));
                let resp = c
                    .post(&url)
                    .header("content-type", "application/json")
                    .header("accept", EVENT_STREAM)
                    .body(body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("open an idle stream: {e:?}"));
                if resp.status() != 200 {
                    let status = resp.status();
                    let text = resp.text().await.unwrap_or_default();
                    panic!("an idle stream was refused: {status}: {text}");
                }
                resp
            }
        })
        .buffer_unordered(OPENING)
        .collect::<Vec<reqwest::Response>>();
    let held = bounded(
        "opening the idle streams",
        Duration::from_secs(120),
        opening,
    )
    .await;
    let opened_in = t_open.elapsed();
    let fn_open = fn_counts(&client, &func.url()).await;
    let gauge_open = metric(&client, &gw.url(), "sri_active_streams").await;
    let fds_open = open_fds(gw.pid());
    let rss_open: Vec<Option<u64>> = pids.iter().map(|p| vm_rss_kib(*p)).collect();
    // Hold them past one keepalive interval, then read again.
    tokio::time::sleep(HOLD).await;
    let rss_hold: Vec<Option<u64>> = pids.iter().map(|p| vm_rss_kib(*p)).collect();
    let fn_hold = fn_counts(&client, &func.url()).await;
    let gauge_hold = metric(&client, &gw.url(), "sri_active_streams").await;
    let broken = metric(&client, &gw.url(), "sri_invocation_errors_total").await;
    assert_eq!(held.len(), streams);
    let t_close = Instant::now();
    drop(held);
    // Disconnecting the clients must release the function's streams too (bounded wait).
    let released = loop {
        let open = fn_counts(&client, &func.url()).await["open"]
            .as_u64()
            .unwrap_or(0);
        let gauge = metric(&client, &gw.url(), "sri_active_streams").await;
        if open == 0 && gauge == 0.0 {
            break Some(t_close.elapsed());
        }
        if t_close.elapsed() > Duration::from_secs(30) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let rss_closed: Vec<Option<u64>> = pids.iter().map(|p| vm_rss_kib(*p)).collect();
    drop(stream_client);
    drop(gw);
    let probe = idle_timeout_probe(&client, &func.url()).await;

    // ----- 3. Relay throughput, direct and through a fresh gateway, interleaved.
    println!("bench_connector: throughput…");
    let gw = Proc::spawn(
        "gateway",
        &["--gateway-child", &format!("bulk={}", func.url()), "60"],
    );
    let bulk_url = format!(
        "{}/invoke?action=invoke_tool",
        gw_endpoint(&gw.url(), "bulk")
    );
    let direct_url = format!("{}/invoke?action=invoke_tool", func.url());
    let proxy = Proc::spawn("byte proxy", &["--proxy-child", &func.addr]);
    let proxy_url = format!("{}/invoke?action=invoke_tool", proxy.url());
    // [size][path] runs; size 0 = big chunks, 1 = SDK-sized; path 0 = direct, 1 = through the
    // gateway, 2 = through the byte proxy.
    let mut runs: [[Vec<Bulk>; 3]; 2] = Default::default();
    for (size, raw, mib) in [(0, BIG_RAW, bulk_mib), (1, SDK_RAW, SDK_MIB)] {
        for path in 0..3 {
            // One small warm-up per path.
            let (url, framing, _) = relay_path(path, &direct_url, &bulk_url, &proxy_url);
            bulk(&client, url, framing, raw, 4).await;
        }
        for run in 0..BULK_RUNS {
            for k in 0..3 {
                let path = (run + k) % 3;
                let (url, framing, relay) = relay_path(path, &direct_url, &bulk_url, &proxy_url);
                let relay = relay.map(|gateway| if gateway { gw.pid() } else { proxy.pid() });
                let pids = [Some(func.pid()), relay, Some(std::process::id())];
                let before = pids.map(|p| p.and_then(cpu_time));
                let mut b = bulk(&client, url, framing, raw, mib).await;
                let after = pids.map(|p| p.and_then(cpu_time));
                for i in 0..3 {
                    if let (Some(a), Some(b0)) = (after[i], before[i]) {
                        b.cpu[i] = a.saturating_sub(b0);
                    }
                }
                runs[size][path].push(b);
            }
        }
    }
    let gw_rss_bulk = vm_rss_kib(gw.pid());
    drop(gw);
    drop(proxy);
    drop(func);

    // The gateway's SSE decoding alone, in-process, on the big events.
    println!("bench_connector: SSE decoding alone…");
    let mut decode_rows = Vec::new();
    for (size, raw, n, mut pieces) in [
        (0, BIG_RAW, 16, vec![16, 64, 256, 1024]),
        (1, SDK_RAW, 1536, vec![4, 16, 64, 256]),
    ] {
        let wire = bulk_wire(n, raw);
        let observed = median(
            &runs[size][0]
                .iter()
                .map(|b| b.chunk_kib)
                .collect::<Vec<_>>(),
        );
        let observed = (observed.round() as usize).max(1);
        if !pieces.contains(&observed) {
            pieces.push(observed);
            pieces.sort();
        }
        for kib in pieces {
            // Each pass takes milliseconds: the median of several, alternating.
            let (mut decode, mut split) = (Vec::new(), Vec::new());
            for _ in 0..DECODE_PASSES {
                decode.push(decode_alone(&wire, kib * 1024).await);
                split.push(split_alone(&wire, kib * 1024));
            }
            let (decode, split) = (median(&decode), median(&split));
            decode_rows.push((size, wire.len(), kib, decode, split, kib == observed));
        }
    }
    let load_end = loadavg();
    let elapsed = started.elapsed();

    // ----- report
    let mut r = String::new();
    let date = cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let root_s = root().to_str().unwrap().to_owned();
    let git = cmd_out("git", &["-C", &root_s, "rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|| "?".into());
    let dirty = cmd_out("git", &["-C", &root_s, "status", "--porcelain"]).is_some();
    let rustc = cmd_out("rustc", &["--version"]).unwrap_or_default();
    let python = Command::new(Py::Py312.python())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();

    let _ = writeln!(r, "## The connector's gateway\n");
    let _ = writeln!(
        r,
        "Written by `tests/examples/bench_connector.rs`, which `make bench` runs after the \
         bootstrap's benchmark: a separate run, described here, that every figure of this \
         section comes from. The gateway is `connector::server::serve` (the router and \
         runtime of `sri serve`) with a backend of fixed targets, alone in a child process \
         (the bench binary re-executed with `--gateway-child`), so that its memory is its own; \
         the fake SRI function (axum) is another child; the clients run in the bench process.\n"
    );
    r.push_str(&run_lines(COMMAND, &date, elapsed, &load_start, &load_end));
    let _ = writeln!(
        r,
        "- software: {rustc}; {python}, dify-plugin {}",
        dify_plugin_version()
    );
    let _ = writeln!(
        r,
        "- repository: {git}{}; `target/release/bootstrap`, the bench and its gateway built \
         with the release profile",
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        }
    );
    let _ = writeln!(
        r,
        "- RLIMIT_NOFILE (soft/hard), raised by the bench before it starts anything and \
         inherited: bench {}/{}, gateway {gw_nofile}, fake function {fn_nofile}{}\n",
        nofile.soft,
        nofile.hard,
        match &nofile.refused {
            Some(why) => format!(
                " (raising the hard limit to {} was refused: {why})",
                asked as u64 + GATEWAY_BASE_FDS
            ),
            None => String::new(),
        }
    );

    // Latency
    let (d_ttfb, d_total, g_ttfb, g_total) = (&lat[0][0], &lat[0][1], &lat[1][0], &lat[1][1]);
    let (h_ttfb, h_total) = (&lat[2][0], &lat[2][1]);
    let paired = |a: &Vec<f64>, b: &Vec<f64>| {
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        median(&d)
    };
    let _ = writeln!(r, "### Added latency\n");
    let _ = writeln!(
        r,
        "{rounds} measured rounds after {WARMUP} warm-up rounds; each round makes one call of \
         each kind, one at a time, in rotating order. All calls go to the same `bootstrap \
         serve` (the template's sample plugin, tool `echo` with `{{\"text\": \"bench\"}}`: one \
         JSON message, one text message, `end`) from the same reqwest client (keep-alive, \
         TCP_NODELAY). *Direct*: signed SRI v2 (signing is timed), SSE read until `end`. \
         *Through the gateway*: the daemon's call, unsigned `POST /v1/functions/echo/{{token}}/invoke?\
         action=invoke_tool` with `Accept: text/event-stream`, NDJSON read until the `end` \
         object; the gateway signs, calls the function over its pooled connection and \
         rewrites the events: as `sri serve` does by default (`SRI_DEDICATED_STREAMS=64`), one \
         call at a time gets an HTTP/1.1 connection of its own; *h2c only* is the same gateway \
         with `SRI_DEDICATED_STREAMS=0`, every call a stream of one shared h2c connection (what \
         calls beyond the 64th concurrent one get). **TTFB** = the first tool message fully \
         received; **total** = `end`.\n"
    );
    let _ = writeln!(r, "| path | TTFB p50 | TTFB p99 | total p50 | total p99 |");
    let _ = writeln!(r, "|---|---:|---:|---:|---:|");
    for (name, t, e) in [
        ("direct to `bootstrap serve` (signed, SSE)", d_ttfb, d_total),
        ("through the gateway (daemon-like, NDJSON)", g_ttfb, g_total),
        ("through the gateway, h2c only", h_ttfb, h_total),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            pct(t, 0.5),
            pct(t, 0.99),
            pct(e, 0.5),
            pct(e, 0.99)
        );
    }
    let added = pct(g_ttfb, 0.5) - pct(d_ttfb, 0.5);
    let _ = writeln!(
        r,
        "\n| difference | p50 TTFB | p99 TTFB | p50 total | p99 total | median of per-round differences (TTFB) | target (p50 TTFB) |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---|");
    let _ = writeln!(
        r,
        "| gateway − direct | {added:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | ≤ 0.3 ms: {} |",
        pct(g_ttfb, 0.99) - pct(d_ttfb, 0.99),
        pct(g_total, 0.5) - pct(d_total, 0.5),
        pct(g_total, 0.99) - pct(d_total, 0.99),
        paired(g_ttfb, d_ttfb),
        if added <= 0.3 {
            "met".to_owned()
        } else {
            format!("**missed by {:.3} ms**", added - 0.3)
        }
    );
    let _ = writeln!(
        r,
        "| gateway, h2c only − direct | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | {:+.3} ms | – |\n",
        pct(h_ttfb, 0.5) - pct(d_ttfb, 0.5),
        pct(h_ttfb, 0.99) - pct(d_ttfb, 0.99),
        pct(h_total, 0.5) - pct(d_total, 0.5),
        pct(h_total, 0.99) - pct(d_total, 0.99),
        paired(h_ttfb, d_ttfb),
    );
    let _ = writeln!(
        r,
        "The gateway's VmRSS: {} when started, {} after the {} calls through it.\n",
        mib(gw_rss_start),
        mib(gw_rss_lat),
        WARMUP + rounds
    );

    // Idle streams
    let per = |i: usize, with: &[Option<u64>]| -> Option<f64> {
        Some((with[i]? as f64 - rss_before[i]? as f64) / streams as f64)
    };
    let gw_per = per(0, &rss_hold)
        .into_iter()
        .chain(per(0, &rss_open))
        .fold(0f64, f64::max);
    let probe_text = match probe {
        Some((d, true)) => format!(
            "It has to be: the function's keepalive comments do not reset it. A gateway with a \
             {IDLE_PROBE_SECS} s idle timeout cut a live stream that had a keepalive every {} ms \
             after {:.2} s, with `FunctionStreamBroken` (\"no event or keepalive for \
             {IDLE_PROBE_SECS} s\"): the client's timeout waits for the next *event*, and the \
             SSE decoder swallows comments",
            IDLE_PROBE_SECS * 1000 / 4,
            d.as_secs_f64()
        ),
        Some((d, false)) => format!(
            "A gateway with a {IDLE_PROBE_SECS} s idle timeout ended a live stream that had a \
             keepalive every {} ms after {:.2} s, without `FunctionStreamBroken`",
            IDLE_PROBE_SECS * 1000 / 4,
            d.as_secs_f64()
        ),
        None => format!(
            "A gateway with a {IDLE_PROBE_SECS} s idle timeout kept a stream with a keepalive \
             every {} ms open for {} s: keepalives reset the timeout",
            IDLE_PROBE_SECS * 1000 / 4,
            3 * IDLE_PROBE_SECS
        ),
    };
    let _ = writeln!(r, "### {streams} idle streams\n");
    if streams < asked {
        let _ = writeln!(
            r,
            "**{asked} streams were asked for; {streams} is the most this machine allows.** \
             The gateway holds a descriptor per stream (the daemon's connection) plus a few, \
             so {asked} streams need more than {} open files in one process; the hard \
             RLIMIT_NOFILE here is {} and raising it was refused ({}).\n",
            asked,
            nofile.hard,
            nofile.refused.as_deref().unwrap_or("not raised")
        );
    }
    let _ = writeln!(
        r,
        "{streams} concurrent daemon-like invocations through a fresh gateway to the fake \
         function, which answers `start` and then only a `: keepalive` comment every {} s. \
         They were opened {OPENING} at a time (one HTTP/1.1 connection each, as the Go daemon \
         does; the gateway gives the first {} of them connections of their own to the function \
         and multiplexes the rest over h2c) and all were open \
         at once: the function counted {} open (peak {}), the gateway's `sri_active_streams` \
         said {gauge_open:.0}, and the gateway held {} file descriptors ({} before). After \
         holding them {} s (past one keepalive on every stream): the function {} open, the \
         gauge {gauge_hold:.0}, the gateway's `sri_invocation_errors_total` {broken:.0}. \
         The gateway's client idle timeout was set to {IDLE_STREAMS_TIMEOUT_SECS} s for this \
         measurement (default 60 s). {probe_text}. Opening took {:.1} s. VmRSS from `/proc/PID/status`; *before* = after {} \
         small complete streams through the same gateway, with nothing open.\n",
        KEEPALIVE_MS / 1000,
        connector::client::DEFAULT_DEDICATED_STREAMS,
        fn_open["open"],
        fn_open["peak"],
        fds_open.map_or("?".into(), |n| n.to_string()),
        fds_before.map_or("?".into(), |n| n.to_string()),
        HOLD.as_secs(),
        fn_hold["open"],
        opened_in.as_secs_f64(),
        20,
    );
    let _ = writeln!(
        r,
        "| process | VmRSS before | with all open | after holding {} s | after closing | per open stream | target |",
        HOLD.as_secs()
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|---:|---|");
    for (i, name) in [
        "gateway (`sri serve`'s router)",
        "fake function (hyper h2c server side of each stream, for scale)",
        "bench process (reqwest client side of each stream, for scale)",
    ]
    .iter()
    .enumerate()
    {
        let g = per(i, &rss_hold)
            .into_iter()
            .chain(per(i, &rss_open))
            .fold(0f64, f64::max);
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} | {} | {:.1} KiB | {} |",
            mib(rss_before[i]),
            mib(rss_open[i]),
            mib(rss_hold[i]),
            mib(rss_closed[i]),
            g,
            if i > 0 {
                "–".to_owned()
            } else if gw_per <= 20.0 {
                "≤ 20 KiB: met".into()
            } else {
                format!("≤ 20 KiB: **missed by {:.1} KiB**", gw_per - 20.0)
            }
        );
    }
    let _ = writeln!(
        r,
        "\n*Per open stream* = (the larger of the two readings with all open − before) / \
         {streams}. Per stream the gateway holds the server side of the daemon's HTTP/1.1 \
         connection (hyper's HTTP/1.1 connection, the request's task, the NDJSON rewriter) and, \
         past the first {}, one stream of the h2c connection to the function that they share \
         (reqwest/h2; the fake function's row is the server side of those streams). Closing: the clients dropped their \
         connections and {}.\n",
        connector::client::DEFAULT_DEDICATED_STREAMS,
        match released {
            Some(d) => format!(
                "the gateway released every upstream stream (function: 0 open, gauge 0) within \
                 {:.2} s",
                d.as_secs_f64()
            ),
            None => "**the gateway still held upstream streams 30 s later**".into(),
        }
    );

    // Throughput
    let mbs = |v: &[Bulk]| v.iter().map(|b| b.mb_s).collect::<Vec<_>>();
    let big_obj = runs[0][0][0].object;
    let sdk_obj = runs[1][0][0].object;
    let _ = writeln!(r, "### Relay throughput\n");
    let _ = writeln!(
        r,
        "The fake function streams `chunk` events, each a plugin `blob_chunk` object \
         (`{{\"event\":\"session\",…,\"data\":{{\"type\":\"stream\",\"data\":{{\"type\":\
         \"blob_chunk\",…,\"blob\":\"<base64>\"}}}}}}`), as fast as the connection takes \
         them; the client reads as fast as it can, splitting lines without copying them. \
         *MB/s* = bytes of plugin objects delivered (10⁶ B) / time from the request to `end`. \
         {BULK_RUNS} runs per path. Large \
         objects: {bulk_mib} MiB per run in objects of ~{:.2} MiB ({} KiB blobs, under the \
         daemon's 5 MiB line limit); SDK-sized: {SDK_MIB} MiB per run in the {SDK_RAW}-byte \
         blob chunks the SDK itself sends (~{:.1} KB objects). The mean body chunk is what \
         reqwest handed the client per read.\n",
        big_obj / 1048576.0,
        BIG_RAW / 1024,
        sdk_obj / 1000.0,
    );
    let _ = writeln!(
        r,
        "*Through a byte proxy* is the direct call through a child that reads every byte and \
         writes it on unchanged (`tokio::io::copy_bidirectional`, {} KiB buffers; no HTTP, no \
         decoding): the least a relay that reads what it relays does (the gateway must, to rewrite \
         SSE as NDJSON), so its throughput is the ceiling for the gateway \
         on this machine. The three paths take turns in rotating order.\n",
        PROXY_BUF / 1024
    );
    let _ = writeln!(
        r,
        "| objects | path | MB/s, each run | MB/s, median | mean body chunk | / direct | / byte proxy | target |"
    );
    let _ = writeln!(r, "|---|---|---|---:|---:|---:|---:|---|");
    let names = ["direct", "through the gateway", "through a byte proxy"];
    for (size, label) in [(0, "large (~1 MiB)"), (1, "SDK-sized (~11 KB)")] {
        let med: Vec<f64> = (0..3).map(|p| median(&mbs(&runs[size][p]))).collect();
        for (path, pname) in names.iter().enumerate() {
            let v = &runs[size][path];
            let each: Vec<String> = v.iter().map(|b| format!("{:.0}", b.mb_s)).collect();
            let ck = median(&v.iter().map(|b| b.chunk_kib).collect::<Vec<_>>());
            let ratio = |of: usize| {
                if path == 0 || path == of {
                    "–".to_owned()
                } else {
                    format!("×{:.3}", med[path] / med[of])
                }
            };
            let target = match (path, size) {
                (1, 0) => {
                    let x = med[1] / med[0];
                    format!(
                        "≥ ×0.7 of direct: {}",
                        if x >= 0.7 { "met" } else { "**missed**" }
                    )
                }
                _ => "–".into(),
            };
            let _ = writeln!(
                r,
                "| {label} | {pname} | {} | {:.0} | {ck:.1} KiB | {} | {} | {target} |",
                each.join(", "),
                med[path],
                ratio(0),
                ratio(2),
            );
        }
    }
    let _ = writeln!(
        r,
        "\nCPU time per GB of plugin objects delivered (10⁹ B), all runs of a path summed, from \
         `/proc/PID/stat` (user + system, 10 ms ticks): what each process spends on a byte, \
         whatever the machine's neighbours do to the wall clock. *Per core* = GB/s the relay \
         would move with a core of its own.\n"
    );
    let _ = writeln!(
        r,
        "| objects | path | function | relay | client | relay per core | relay / (function + client) |"
    );
    let _ = writeln!(r, "|---|---|---:|---:|---:|---:|---:|");
    for (size, label) in [(0, "large (~1 MiB)"), (1, "SDK-sized (~11 KB)")] {
        for (path, pname) in names.iter().enumerate() {
            let [f, rl, c] = cpu_per_gb(&runs[size][path]);
            let (relay, core, share) = if path == 0 {
                ("–".to_owned(), "–".to_owned(), "–".to_owned())
            } else {
                (
                    format!("{rl:.3} s"),
                    format!("{:.2} GB/s", 1.0 / rl),
                    format!("×{:.2}", rl / (f + c)),
                )
            };
            let _ = writeln!(
                r,
                "| {label} | {pname} | {f:.3} s | {relay} | {c:.3} s | {core} | {share} |"
            );
        }
    }
    let _ = writeln!(
        r,
        "\nWith a core per process, the slowest process would set the pace: projected GB/s = \
         1 / the largest CPU time per GB on the path (a projection from the table above, not a \
         measurement; this machine has {} cores for the three processes).\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        r,
        "| objects | direct | through the gateway | through a byte proxy | gateway / direct |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|---:|");
    for (size, label) in [(0, "large (~1 MiB)"), (1, "SDK-sized (~11 KB)")] {
        let pace: Vec<f64> = (0..3)
            .map(|path| {
                1.0 / cpu_per_gb(&runs[size][path])
                    .into_iter()
                    .fold(0.0, f64::max)
            })
            .collect();
        let _ = writeln!(
            r,
            "| {label} | {:.2} GB/s | {:.2} GB/s | {:.2} GB/s | ×{:.3} |",
            pace[0],
            pace[1],
            pace[2],
            pace[1] / pace[0]
        );
    }
    let _ = writeln!(
        r,
        "\nThe gateway's VmRSS after the throughput runs: {}.\n",
        mib(gw_rss_bulk)
    );
    let _ = writeln!(
        r,
        "The SSE decoding the gateway's client does on every body chunk, timed alone: \
         `connector::protocol::sse::decode` in this process on the same kind of events handed \
         over in pieces of a given size, against this file's line splitter on the same pieces \
         (linear, no copy, the client's own cost above). A linear decoder runs at the same \
         speed whatever the piece size; one that re-reads partial lines slows down as the \
         pieces shrink.\n"
    );
    let _ = writeln!(
        r,
        "| events | piece size | `sse::decode`, MB/s of event data (median of {DECODE_PASSES}) | line splitter, MB/s |"
    );
    let _ = writeln!(r, "|---|---:|---:|---:|");
    for (size, wire_len, kib, decode, split, obs) in &decode_rows {
        let _ = writeln!(
            r,
            "| {} | {kib} KiB{} | {decode:.0} | {split:.0} |",
            if *size == 0 {
                format!("16 large ({:.1} MiB of SSE)", *wire_len as f64 / 1048576.0)
            } else {
                format!(
                    "1536 SDK-sized ({:.1} MiB of SSE)",
                    *wire_len as f64 / 1048576.0
                )
            },
            if *obs {
                " (≈ the mean body chunk read directly)"
            } else {
                ""
            }
        );
    }
    r
}
