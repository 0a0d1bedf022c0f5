//! Benchmark of the relay (issue #11): the latency it adds to a small backwards call
//! (function → relay → daemon → back) over the function calling the daemon directly, and the
//! throughput of a streamed LLM answer through it. Writes the `relay` section of
//! `BENCHMARKS.md`.
//!
//! Everything runs in this process on loopback: a daemon route answering like the daemon's
//! (`backwards_response` lines framed by `\n\n`), the connector's real relay (`relay::serve`:
//! the same accept loop, signature check, session lookup, replay guard and streaming), and a
//! client signing each call the way the bootstrap does (SRI v2, fresh nonce).

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use connector::protocol::relay::{
    ACTION, HEADER_DAEMON_SESSION, HEADER_FUNCTION, TRANSACTION_PATH,
};
use connector::relay::sessions::Sessions;
use connector::relay::{BackwardsMode, Relay, RelayMetrics, RelayOptions};
use harness::benchmarks::{knob, loadavg, median, pct, run_lines};
use harness::{SECRET_A, root, signer};
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ROUNDS: usize = 2000;
const WARMUP: usize = 200;
/// Bytes of the streamed answer (LLM chunk lines).
const STREAM_BYTES: usize = 256 * 1024 * 1024;
const STREAM_RUNS: usize = 5;
const FUNCTION: &str = "sri-bench-relay-0000000000000000-00000000000000000000000000000000";
const SESSION: &str = "00000000-0000-4000-8000-0000000000b1";

/// One `backwards_response` line, as the daemon writes it.
fn line(event: &str, data: &str) -> String {
    format!(
        "{{\"session_id\":\"{SESSION}\",\"conversation_id\":null,\"message_id\":null,\"app_id\":null,\
         \"endpoint_id\":null,\"context\":{{}},\"event\":\"backwards_response\",\"data\":{{\
         \"backwards_request_id\":\"r\",\"event\":\"{event}\",\"message\":\"stream\",\"data\":{data}}}}}\n\n"
    )
}

/// The daemon's route: a small answer (one response line and `end`), or, for an `llm` call, a
/// streamed answer of [`STREAM_BYTES`] in 64 KiB writes.
fn daemon(bulk: Arc<Vec<Bytes>>) -> Router {
    let small = Bytes::from(format!(
        "{}{}",
        line("response", "{\"data\":\"68656c6c6f\"}"),
        line("end", "null")
    ));
    Router::new().route(
        TRANSACTION_PATH,
        post(move |body: Bytes| {
            let (small, bulk) = (small.clone(), bulk.clone());
            async move {
                let llm = memchr_llm(&body);
                let body = if llm {
                    let chunks: Vec<Result<Bytes, std::convert::Infallible>> =
                        bulk.iter().cloned().map(Ok).collect();
                    Body::from_stream(futures_util::stream::iter(chunks))
                } else {
                    Body::from(small)
                };
                Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(body)
                    .unwrap()
            }
        }),
    )
}

fn bulk_chunks() -> Vec<Bytes> {
    let chunk = "{\"model\":\"fake-llm\",\"prompt_messages\":[],\"system_fingerprint\":null,\"delta\":{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"a token or two of an answer\"},\"usage\":null,\"finish_reason\":null}}";
    let one = line("response", chunk);
    let mut buf = String::with_capacity(64 * 1024 + one.len());
    let mut out = Vec::new();
    let mut total = 0;
    while total < STREAM_BYTES {
        buf.push_str(&one);
        if buf.len() >= 64 * 1024 {
            total += buf.len();
            out.push(Bytes::from(std::mem::take(&mut buf)));
        }
    }
    out.push(Bytes::from(line("end", "null")));
    out
}

fn memchr_llm(body: &[u8]) -> bool {
    let needle = b"\"type\":\"llm\"";
    body.windows(needle.len()).any(|w| w == needle)
}

/// A backwards call's body of the given invocation type.
fn call_body(kind: &str) -> Bytes {
    Bytes::from(format!(
        "{{\"event\":\"session\",\"session_id\":\"{SESSION}\",\"data\":{{\"type\":\"invoke\",\
         \"data\":{{\"type\":\"{kind}\",\"backwards_request_id\":\"r\",\"request\":{{\"opt\":\"get\",\"key\":\"greeting\"}}}}}}}}"
    ))
}

struct Caller {
    http: reqwest::Client,
    keys: connector::protocol::signing::KeyRing,
}

impl Caller {
    /// One call; the whole answer read. Signed as the bootstrap signs when `relay`.
    async fn call(&self, base: &str, relay: bool, bulk: bool) -> usize {
        let body = call_body(if bulk { "llm" } else { "storage" });
        let mut req = self
            .http
            .post(format!("{base}{TRANSACTION_PATH}"))
            .header(HEADER_DAEMON_SESSION, SESSION)
            .header("content-type", "application/json");
        if relay {
            let mut h = http::HeaderMap::new();
            let nonce = hex::encode(rand_bytes());
            self.keys
                .sign_v2(harness::now(), &nonce, FUNCTION, SESSION, ACTION, &body)
                .apply(&mut h)
                .unwrap();
            h.insert(HEADER_FUNCTION, FUNCTION.parse().unwrap());
            req = req.headers(h);
        }
        let mut resp = req.body(body).send().await.expect("call");
        assert!(resp.status().is_success(), "{}", resp.status());
        let mut n = 0;
        while let Some(c) = resp.chunk().await.expect("body") {
            n += c.len();
        }
        n
    }
}

fn rand_bytes() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    out[8..].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

async fn run() {
    let started = Instant::now();
    let load_start = loadavg();
    let rounds = knob("SRI_BENCH_RELAY_ROUNDS", ROUNDS);
    let (daemon_addr, _d) = harness::serve_loopback(daemon(Arc::new(bulk_chunks()))).await;
    let daemon_url = format!("http://{daemon_addr}");
    let sessions = Arc::new(Sessions::default());
    let _registration = sessions.register(SESSION, FUNCTION);
    let options = RelayOptions {
        backwards: BackwardsMode::Relay,
        relay_listen: "127.0.0.1:0".parse().unwrap(),
        relay_public_url: None,
        relay_grace_secs: 30,
        relay_session_ttl_secs: 900,
        relay_max_skew_secs: 300,
        relay_max_body_bytes: 32 << 20,
        relay_max_pending_body_bytes: 256 << 20,
        relay_timeout_secs: 300,
    };
    let relay = Arc::new(Relay::new(
        signer("k1", SECRET_A),
        sessions.clone(),
        Some(&daemon_url),
        &options,
        Duration::from_secs(60),
        RelayMetrics::default(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(connector::relay::serve(
        relay,
        listener,
        connector::server::Limits::default(),
        std::future::pending(),
    ));
    let caller = Caller {
        // As the bootstrap's client: keep-alive, TCP_NODELAY.
        http: reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap(),
        keys: signer("k1", SECRET_A),
    };

    // Small calls, alternating which path goes first.
    let (mut direct, mut relayed, mut diff) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..(WARMUP + rounds) {
        let mut d = 0.0;
        let mut r = 0.0;
        for relay_first in [i % 2 == 0, i % 2 != 0] {
            let (base, relay) = if relay_first {
                (&relay_url, true)
            } else {
                (&daemon_url, false)
            };
            let t = Instant::now();
            caller.call(base, relay, false).await;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if relay { r = ms } else { d = ms }
        }
        if i >= WARMUP {
            direct.push(d);
            relayed.push(r);
            diff.push(r - d);
        }
    }

    // Streamed answers.
    let (mut direct_mbs, mut relay_mbs) = (Vec::new(), Vec::new());
    for _ in 0..STREAM_RUNS {
        for relay in [false, true] {
            let base = if relay { &relay_url } else { &daemon_url };
            let t = Instant::now();
            let n = caller.call(base, relay, true).await;
            assert!(n >= STREAM_BYTES, "the streamed answer was cut: {n} bytes");
            let mbs = n as f64 / 1e6 / t.elapsed().as_secs_f64();
            if relay {
                relay_mbs.push(mbs)
            } else {
                direct_mbs.push(mbs)
            }
        }
    }

    let added_p50 = median(&relayed) - median(&direct);
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    let mut r = String::new();
    let _ = writeln!(
        r,
        "## Relay (backwards invocations)\n\n{}",
        run_lines(
            "cargo run --release --locked -p sri-tests --example bench_relay",
            &harness::benchmarks::cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_default(),
            started.elapsed(),
            &load_start,
            &loadavg()
        )
    );
    let _ = writeln!(
        r,
        "In one process on loopback: a daemon route answering like the daemon's, the \
         connector's relay (`relay::serve`: signature, freshness, replay guard, session lookup, \
         streaming pass-through) and a client signing each call as the bootstrap does (SRI v2, \
         fresh nonce; keep-alive, TCP_NODELAY). A small call is a storage `get` answered by one \
         `response` line and `end`. {rounds} measured rounds after {WARMUP} warm-up rounds, \
         each calling both paths, alternately first.\n"
    );
    let _ = writeln!(
        r,
        "| small call | p50 | p99 |\n|---|---:|---:|\n| direct to the daemon | {:.3} ms | {:.3} ms |\n\
         | through the relay | {:.3} ms | {:.3} ms |\n| added by the relay (p50 − p50; p99 − p99) | {:+.3} ms | {:+.3} ms |\n\
         | median of per-round differences | {:+.3} ms | – |\n",
        median(&direct),
        pct(&direct, 0.99),
        median(&relayed),
        pct(&relayed, 0.99),
        added_p50,
        pct(&relayed, 0.99) - pct(&direct, 0.99),
        median(&diff),
    );
    let _ = writeln!(
        r,
        "Target: ≤ 0.5 ms added at p50: {}.\n",
        verdict(added_p50 <= 0.5)
    );
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let _ = writeln!(
        r,
        "Streamed LLM answer of {} MiB (`backwards_response` chunk lines, written in 64 KiB \
         pieces), read whole by the client; {STREAM_RUNS} runs each:\n\n| path | median | best |\n|---|---:|---:|\n\
         | direct to the daemon | {:.0} MB/s | {:.0} MB/s |\n| through the relay | {:.0} MB/s | {:.0} MB/s |\n\n\
         Target: ≥ 100 MB/s through the relay: {}.",
        STREAM_BYTES >> 20,
        median(&direct_mbs),
        best(&direct_mbs),
        median(&relay_mbs),
        best(&relay_mbs),
        verdict(median(&relay_mbs) >= 100.0)
    );
    println!("{r}");
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "relay", &r).expect("write BENCHMARKS.md");
    println!("wrote the relay section of {}", out.display());
}
