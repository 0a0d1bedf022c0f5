//! `make bench`: the throughput of one Lambda Managed-Instances-style sandbox, where one
//! execution environment takes up to `AWS_LAMBDA_MAX_CONCURRENCY` invocations at once. Writes
//! its section of `BENCHMARKS.md` (between `<!-- bench:concurrency:begin -->` and
//! `<!-- bench:concurrency:end -->`) and prints it.
//!
//! Paths, both on the template's sample plugin (tool `echo`) on the real SDK (`.venv/py312`),
//! each against a Runtime API fake of its own (`harness::runtime_api`, the same code):
//! - (x) our bootstrap in Lambda mode with `AWS_LAMBDA_MAX_CONCURRENCY=c` (c workers polling,
//!   one plugin process), called with signed SRI v2 Function URL events;
//! - (y) AWS Lambda Web Adapter 1.x with the same `AWS_LAMBDA_MAX_CONCURRENCY=c`
//!   (`lambda_runtime`'s concurrent mode: c pollers) in front of the SDK's serverless HTTP
//!   server, called with the same events unsigned (it has no request authentication).
//!
//! For each c in 1, 8, 32 both functions are started fresh; the driver keeps c invocations in
//! flight (queues the next one when one completes) and times each from queueing the event to
//! the end of the runtime's streamed response. Warm-up batches first, then rounds that
//! alternate which path goes first, so machine noise hits both alike. Every wait is bounded;
//! a failure stops every process the bench started (release builds abort on panic).

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use harness::benchmarks::{
    cmd_out, dify_plugin_version, install_cleanup, knob, loadavg, ms, pct, run_lines, track,
};
use harness::emulator::spawn_runtime;
use harness::lwa::{LwaProcesses, lwa_version};
use harness::runtime_api::{Completed, RuntimeApi};
use harness::*;
use serde_json::{Value, json};
use std::fmt::Write as _;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Concurrency levels (`AWS_LAMBDA_MAX_CONCURRENCY` and invocations kept in flight).
const LEVELS: [usize; 3] = [1, 8, 32];
/// Invocations per (path, c) before measuring (`SRI_BENCH_WARMUP` overrides).
const WARMUP: usize = 64;
/// Measured invocations per (path, c) (`SRI_BENCH_INVOCATIONS` overrides, for a quick look).
const INVOCATIONS: usize = 1024;
/// Measured rounds per c; each runs INVOCATIONS / ROUNDS on each path.
const ROUNDS: usize = 4;
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// What `make bench` runs for this section (`{lwa}` is the installed version).
const COMMAND: &str = "make bench (= cargo install --locked lambda_web_adapter --version {lwa} \
                       --root .venv/tools/lwa; cargo build --release --locked -p sri-bootstrap; \
                       cargo run --release --locked -p sri-tests --example bench_concurrency)";
/// What `/proc/PID/stat` counts CPU time in (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

fn main() {
    install_cleanup("bench_concurrency");
    let release = harness::benchmarks::release_bootstrap();

    // SAFETY: no other thread exists yet (the runtime is built below).
    unsafe { std::env::set_var("SRI_BOOTSTRAP_BIN", &release) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(run());
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "concurrency", &report).expect("write BENCHMARKS.md");
    println!("{report}");
    println!("(written to {})", out.display());
}

/// The report's rows, in [`Acc`] order: (x), (y), and (z), the SDK server under (y) called
/// directly (a reference: what the plugin's own HTTP server does without the adapter).
const LABELS: [&str; 3] = [
    "(x) bootstrap, Lambda mode",
    "(y) LWA + SDK serverless server",
    "(z) the SDK serverless server alone, direct HTTP",
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    Sri,
    Lwa,
}

impl Path {
    fn label(self) -> &'static str {
        LABELS[self as usize]
    }
}

fn request(sid: &str) -> Bytes {
    envelope(
        sid,
        tool_data("sample", "echo", json!({"text": "bench"}), None),
    )
}

/// Checks one response: a 200 prelude, the tool's text, the session's end, no error.
fn verify(path: Path, sid: &str, done: &Completed) {
    let body = String::from_utf8_lossy(&done.body);
    assert_eq!(
        done.prelude["statusCode"], 200,
        "{path:?}: {} {body}",
        done.prelude
    );
    match path {
        Path::Sri => {
            assert!(
                body.contains("event: chunk") && body.contains("bench"),
                "(x) no tool chunk in {body}"
            );
            assert!(
                body.contains("event: end") && !body.contains("event: error"),
                "(x) not a clean end: {body}"
            );
        }
        Path::Lwa => {
            let (mut text, mut end) = (false, false);
            for line in body.lines().map(str::trim).filter(|l| !l.is_empty()) {
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|_| panic!("(y) not a JSON line: {line}"));
                assert_ne!(v["event"], "error", "(y) plugin error: {v}");
                if v["session_id"] != sid {
                    continue;
                }
                match v["data"]["type"].as_str() {
                    Some("end") => end = true,
                    Some("error") => panic!("(y) session error: {v}"),
                    _ => text |= line.contains("bench"),
                }
            }
            assert!(text && end, "(y) no tool message or no end in {body}");
        }
    }
}

/// One function under test, on a fake of its own.
struct Function {
    /// First field: stopped before its Runtime API goes away.
    proc: Proc,
    path: Path,
    api: RuntimeApi,
    /// Its processes (runtime and plugin), for CPU time.
    pids: Vec<u32>,
}

enum Proc {
    Sri {
        child: Child,
        logs: Arc<Mutex<Vec<String>>>,
    },
    Lwa(LwaProcesses),
}

impl Function {
    async fn start(path: Path, c: usize) -> Self {
        let api = RuntimeApi::start().await;
        let rt_api = api.addr.to_string();
        let cs = c.to_string();
        let mut proc = match path {
            Path::Sri => {
                let logs = Arc::new(Mutex::new(Vec::new()));
                let opts = Options::new("sample").env("AWS_LAMBDA_MAX_CONCURRENCY", cs.as_str());
                let child = spawn_runtime(&rt_api, &opts, logs.clone());
                track(child.id());
                Proc::Sri { child, logs }
            }
            Path::Lwa => {
                let p = LwaProcesses::spawn(
                    &rt_api,
                    "sample",
                    Py::Py312,
                    &[("AWS_LAMBDA_MAX_CONCURRENCY", cs.as_str())],
                );
                track(p.adapter_pid());
                track(p.app_pid());
                Proc::Lwa(p)
            }
        };
        // Ready = all c workers parked on /invocation/next; the slices notice a dead process.
        let deadline = Instant::now() + START_TIMEOUT;
        while !api.polling_reached(c, Duration::from_millis(200)).await {
            proc.assert_alive();
            assert!(
                Instant::now() < deadline,
                "{}: {c} polls of /invocation/next not parked within {START_TIMEOUT:?} (now {}); \
                 logs:\n{}",
                path.label(),
                api.polling(),
                proc.dump()
            );
        }
        let pids = match &proc {
            Proc::Sri { child, .. } => {
                let plugin = harness::child_pids(child.id());
                assert_eq!(plugin.len(), 1, "(x) one plugin process: {plugin:?}");
                track(plugin[0]);
                vec![child.id(), plugin[0]]
            }
            Proc::Lwa(p) => vec![p.adapter_pid(), p.app_pid()],
        };
        Self {
            path,
            api,
            pids,
            proc,
        }
    }

    /// Runs `n` invocations keeping `c` in flight; adds latencies (ms), time and CPU to `acc`.
    async fn batch(&mut self, c: usize, n: usize, acc: &mut Acc) {
        let ticks = self.cpu_ticks(&self.pids);
        let path = self.path;
        let api = &self.api;
        let wall = drive(c, n, &mut acc.latencies, || {
            let sid = session_id("mi");
            let body = request(&sid);
            let inv = match path {
                Path::Sri => api.invoke_tool(body),
                Path::Lwa => api.invoke_unsigned(body),
            };
            async move {
                let done = inv.complete(CALL_TIMEOUT).await;
                verify(path, &sid, &done);
                done.latency
            }
        })
        .await;
        acc.wall += wall;
        acc.ticks += self.cpu_ticks(&self.pids).saturating_sub(ticks);
        self.proc.assert_alive();
    }

    /// (z): the same calls straight to the SDK server under LWA (no adapter, no Runtime API),
    /// over keep-alive HTTP/1.1 with TCP_NODELAY; CPU is the SDK server's alone.
    async fn batch_direct(&mut self, c: usize, n: usize, client: &reqwest::Client, acc: &mut Acc) {
        let Proc::Lwa(p) = &self.proc else {
            unreachable!("(z) runs on (y)'s SDK server")
        };
        let app = [p.app_pid()];
        let url = format!("http://127.0.0.1:{}/invoke", p.app_port);
        let ticks = self.cpu_ticks(&app);
        let wall = drive(c, n, &mut acc.latencies, || {
            let sid = session_id("mi");
            let body = request(&sid);
            let call = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send();
            async move {
                let t0 = Instant::now();
                let read = async {
                    let resp = call.await.expect("(z) POST /invoke");
                    let status = resp.status().as_u16();
                    (status, resp.bytes().await.expect("(z) body"))
                };
                let (status, body) = tokio::time::timeout(CALL_TIMEOUT, read)
                    .await
                    .unwrap_or_else(|_| panic!("(z) no response within {CALL_TIMEOUT:?}"));
                let latency = t0.elapsed();
                let done = Completed {
                    latency,
                    prelude: json!({"statusCode": status}),
                    body,
                };
                verify(Path::Lwa, &sid, &done);
                latency
            }
        })
        .await;
        acc.wall += wall;
        acc.ticks += self.cpu_ticks(&app).saturating_sub(ticks);
        self.proc.assert_alive();
    }

    fn cpu_ticks(&self, pids: &[u32]) -> u64 {
        pids.iter().filter_map(|p| cpu_ticks(*p)).sum()
    }
}

/// Keeps `c` of `issue`'s calls in flight until `n` have completed; pushes each latency (ms)
/// to `latencies` and returns the time it took.
async fn drive<F, Fut>(c: usize, n: usize, latencies: &mut Vec<f64>, mut issue: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut issued = 0;
    while issued < c.min(n) {
        inflight.push(issue());
        issued += 1;
    }
    while let Some(latency) = inflight.next().await {
        latencies.push(ms(latency));
        if issued < n {
            inflight.push(issue());
            issued += 1;
        }
    }
    started.elapsed()
}

impl Proc {
    fn assert_alive(&mut self) {
        match self {
            Proc::Sri { child, logs } => {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "(x) the bootstrap exited: {status}; logs:\n{}",
                        logs.lock().unwrap().join("\n")
                    );
                }
            }
            Proc::Lwa(p) => p.assert_alive("during the benchmark"),
        }
    }

    fn dump(&self) -> String {
        match self {
            Proc::Sri { logs, .. } => logs.lock().unwrap().join("\n"),
            Proc::Lwa(p) => p.dump(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Proc::Sri { child, .. } = self {
            stop(child);
        }
        // LwaProcesses stops its own.
    }
}

/// User + system CPU time of `pid` (all its threads), in USER_HZ ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Measurements of one (path, c).
#[derive(Default)]
struct Acc {
    latencies: Vec<f64>,
    wall: Duration,
    ticks: u64,
    /// Most responses streaming at once, as the fake saw them (none for (z)).
    max_streaming: Option<usize>,
}

impl Acc {
    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }

    fn cpu_ms_per_call(&self) -> f64 {
        self.ticks as f64 / USER_HZ * 1000.0 / self.latencies.len() as f64
    }
}

async fn run() -> String {
    let started = Instant::now();
    let load_start = loadavg();
    let warmup = knob("SRI_BENCH_WARMUP", WARMUP);
    let per_round = knob("SRI_BENCH_INVOCATIONS", INVOCATIONS).div_ceil(ROUNDS);
    let lwa_v = lwa_version().unwrap_or_else(|| "?".into());
    // As many idle connections kept as calls in flight, so (z) never reconnects.
    let client = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let mut results: Vec<(usize, [Acc; 3])> = Vec::new();
    for c in LEVELS {
        println!("bench_concurrency: c = {c}: starting both functions…");
        let mut x = Function::start(Path::Sri, c).await;
        let mut y = Function::start(Path::Lwa, c).await;
        let [mut ax, mut ay, mut az] = [Acc::default(), Acc::default(), Acc::default()];
        println!("bench_concurrency: c = {c}: {warmup} warm-up invocations each…");
        x.batch(c, warmup, &mut Acc::default()).await;
        y.batch(c, warmup, &mut Acc::default()).await;
        y.batch_direct(c, warmup, &client, &mut Acc::default())
            .await;
        for round in 0..ROUNDS {
            println!(
                "bench_concurrency: c = {c}: round {}/{ROUNDS}, {per_round} invocations each…",
                round + 1
            );
            if round % 2 == 0 {
                x.batch(c, per_round, &mut ax).await;
                y.batch(c, per_round, &mut ay).await;
                y.batch_direct(c, per_round, &client, &mut az).await;
            } else {
                y.batch_direct(c, per_round, &client, &mut az).await;
                y.batch(c, per_round, &mut ay).await;
                x.batch(c, per_round, &mut ax).await;
            }
        }
        ax.max_streaming = Some(x.api.max_streaming());
        ay.max_streaming = Some(y.api.max_streaming());
        drop(x);
        drop(y);
        results.push((c, [ax, ay, az]));
    }
    let load_end = loadavg();
    report(
        &results,
        warmup,
        per_round,
        &lwa_v,
        started.elapsed(),
        &load_start,
        &load_end,
    )
}

fn report(
    results: &[(usize, [Acc; 3])],
    warmup: usize,
    per_round: usize,
    lwa_v: &str,
    elapsed: Duration,
    load_start: &str,
    load_end: &str,
) -> String {
    let mut r = String::new();
    let date = cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let repo = root();
    let repo = repo.to_str().unwrap();
    let git =
        cmd_out("git", &["-C", repo, "rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "?".into());
    let dirty = cmd_out("git", &["-C", repo, "status", "--porcelain"]).is_some();
    let rustc = cmd_out("rustc", &["--version"]).unwrap_or_default();
    let python = cmd_out(Py::Py312.python(), &["--version"]).unwrap_or_else(|| "Python ?".into());

    let _ = writeln!(
        r,
        "# Managed-Instances throughput: one sandbox, c at once\n"
    );
    let _ = writeln!(
        r,
        "Written by `tests/examples/bench_concurrency.rs`; every figure is from the run \
         described here.\n"
    );
    r.push_str(&run_lines(
        &COMMAND.replace("{lwa}", lwa_v),
        &date,
        elapsed,
        load_start,
        load_end,
    ));
    let _ = writeln!(
        r,
        "- software: {rustc}; {python}, dify-plugin {}; lambda_web_adapter {lwa_v} \
         (`lambda-adapter`, from crates.io)",
        dify_plugin_version()
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
        "- workload: tool `echo` of `template/plugin` with `{{\"text\": \"bench\"}}` (one JSON \
         message, one text message, `end`), as a Function URL event through a Runtime API fake \
         (`tests/src/runtime_api.rs`, one per function, on 127.0.0.1)\n"
    );
    let _ = writeln!(
        r,
        "For each c, both functions start fresh with `AWS_LAMBDA_MAX_CONCURRENCY=c`: (x) our \
         bootstrap, c workers sharing one plugin process, signed SRI v2 events; (y) \
         `lambda-adapter` (LWA 1.x polls with c workers in `lambda_runtime`'s concurrent mode) in \
         front of the SDK's serverless server (gevent WSGI), the same events unsigned. The \
         driver keeps c invocations in flight, queueing the next as soon as one completes; \
         *latency* = event queued → the runtime's streamed response ended. {warmup} warm-up \
         invocations per function, then {ROUNDS} rounds of {per_round} per function, \
         alternating which goes first. *inv/s* = invocations / time spent in the measured \
         batches. *at once* = most responses the fake saw streaming at the same time. *CPU per \
         invocation* = user + system time of the function's two processes (runtime + plugin; \
         adapter + SDK server) over the measured batches, 10 ms resolution. The driver and both \
         fakes share this machine's cores with the function under test; each batch starts \
         and ends with fewer than c in flight (ramp and drain), alike on both paths.\n"
    );
    let _ = writeln!(
        r,
        "(z) is a reference, not a Lambda path: the same calls straight to (y)'s SDK server \
         (keep-alive HTTP/1.1, TCP_NODELAY, up to c connections), without the adapter or a \
         Runtime API; its CPU is the SDK server's alone. What (y) costs over (z) is the \
         adapter's. Where (z) itself takes ~40 ms one at a time, that is the SDK server's gevent \
         WSGI server writing each streamed line in a send of its own without TCP_NODELAY: on a \
         kept-alive connection (LWA keeps its connection to the app alive, as (z)'s client does) \
         its second write waits for the client's delayed ACK (Nagle). Checked by hand with \
         curl: ~3 ms per call on fresh connections, ~45 ms on one kept-alive connection. The \
         stall is the peer's own, in Lambda as here. With more in flight, other calls' traffic hides part of it.\n"
    );
    let _ = writeln!(
        r,
        "| c | path | invocations | inv/s | p50 | p99 | at once | CPU per invocation |"
    );
    let _ = writeln!(r, "|---:|---|---:|---:|---:|---:|---:|---:|");
    for (c, accs) in results {
        for (label, a) in LABELS.iter().zip(accs) {
            let _ = writeln!(
                r,
                "| {c} | {label} | {} | {:.0} | {:.2} ms | {:.2} ms | {} | {:.2} ms |",
                a.latencies.len(),
                a.per_second(),
                pct(&a.latencies, 0.5),
                pct(&a.latencies, 0.99),
                a.max_streaming.map_or("–".into(), |m| m.to_string()),
                a.cpu_ms_per_call()
            );
        }
    }
    let _ = writeln!(r);
    let _ = writeln!(
        r,
        "| c | throughput (x) / (y) | p50 latency (y) / (x) | p99 latency (y) / (x) | CPU per invocation (y) / (x) | throughput (x) / (z) |"
    );
    let _ = writeln!(r, "|---:|---:|---:|---:|---:|---:|");
    for (c, [x, y, z]) in results {
        let _ = writeln!(
            r,
            "| {c} | **×{:.1}** | ×{:.1} | ×{:.1} | ×{:.1} | ×{:.2} |",
            x.per_second() / y.per_second(),
            pct(&y.latencies, 0.5) / pct(&x.latencies, 0.5),
            pct(&y.latencies, 0.99) / pct(&x.latencies, 0.99),
            y.cpu_ms_per_call() / x.cpu_ms_per_call().max(f64::MIN_POSITIVE),
            x.per_second() / z.per_second()
        );
    }
    r
}
