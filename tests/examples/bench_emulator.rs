//! `make bench`, emulator part: the sample plugin on the `local` and `emulator` backends side by
//! side, through `sri serve` driven as the Go daemon drives it. In one run:
//! 1. launch → ready (the daemon's launch stream from request to `end`), first launch on a
//!    fresh data dir (the emulator's package cache is warmed once before, so packaging is a
//!    cache hit and what is measured is the emulator start and the function's init);
//! 2. warm time to the response head of the gateway, p50/p99, over `SRI_BENCH_CALLS` (200)
//!    interleaved `echo` calls per backend;
//! 3. cold start of an emulated function (its init, as the launch stream reports it, then the
//!    first call), with and without shipped bytecode, and with the shared SDK layer (the
//!    default: the trimmed zip, the layer unpacked in place of `/opt`) and without it (one
//!    self-contained zip), median of `SRI_BENCH_COLD` (3) launches.
//!
//! Writes its section of `BENCHMARKS.md` (between `<!-- bench:emulator:begin -->` and
//! `<!-- bench:emulator:end -->`) and prints it. Needs what `make test` needs (`sri`,
//! `bootstrap`, `.venv`, cargo-lambda).

use harness::benchmarks::{knob, loadavg, median, pct, run_lines, write_section};
use harness::difypkg::Package;
use harness::godaemon::GoDaemon;
use harness::sri::{Connector, ConnectorOptions};
use harness::{envelope, plugin_dir, session_id, tool_data};
use serde_json::json;
use std::time::{Duration, Instant};

fn daemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(Duration::from_secs(600))
        .with_execution_timeout(Duration::from_secs(60))
}

fn options(backend: &str) -> ConnectorOptions {
    match backend {
        "emulator" => ConnectorOptions::emulator(),
        _ => ConnectorOptions::default().env("SRI_BACKEND", "local"),
    }
}

/// Launches the sample; its endpoint, the launch time, and the init time the stream reported.
async fn launch(c: &Connector) -> (String, Duration, Option<f64>) {
    let started = Instant::now();
    let o = daemon(c)
        .launch_package(&Package::from_dir(&plugin_dir("sample")), false)
        .await
        .expect("launch");
    let took = started.elapsed();
    assert!(
        o.failures().is_empty(),
        "launch failed:\n{}",
        o.transcript()
    );
    let (_, endpoint) = o.installed.clone().expect("installed");
    let init_ms = o.chunks.iter().find_map(|ch| {
        ch.message
            .strip_prefix("function initialized in ")
            .and_then(|r| r.strip_suffix(" ms"))
            .and_then(|n| n.parse().ok())
    });
    (endpoint, took, init_ms)
}

/// One `echo` call; the time to the response head (ms), after checking it answered.
async fn call(d: &GoDaemon, endpoint: &str) -> f64 {
    let sid = session_id("bench");
    let data = tool_data("sample", "echo", json!({"q": 1}), Some("sri-demo-key"));
    let o = d
        .invoke(endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    assert!(
        o.function_errors().is_empty() && o.status == Some(200),
        "{}",
        o.transcript()
    );
    o.headers_after.expect("a response head").as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() {
    let calls = knob("SRI_BENCH_CALLS", 200);
    let cold = knob("SRI_BENCH_COLD", 3);
    let t0 = Instant::now();
    let load_start = loadavg();
    let date =
        harness::benchmarks::cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();

    // Warm the package cache once, so the launches below measure start and init.
    {
        let c = Connector::start_with(options("emulator"));
        launch(&c).await;
    }

    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for backend in ["local", "emulator"] {
        let c = Connector::start_with(options(backend));
        let (endpoint, took, _) = launch(&c).await;
        let d = daemon(&c);
        for _ in 0..20 {
            call(&d, &endpoint).await;
        }
        runs.push((backend, c, d, endpoint, took, Vec::with_capacity(calls)));
    }
    for _ in 0..calls {
        for (_, _, d, endpoint, _, samples) in runs.iter_mut() {
            let ms = call(d, endpoint).await;
            samples.push(ms);
        }
    }
    for (backend, _, _, _, took, samples) in &runs {
        rows.push(format!(
            "| `{backend}` | {:.2} s | {:.2} | {:.2} |",
            took.as_secs_f64(),
            median(samples),
            pct(samples, 0.99)
        ));
    }
    let gap = median(&runs[1].5) - median(&runs[0].5);
    drop(runs);

    let mut cold_rows = Vec::new();
    for (label, bytecode, layer) in [
        ("with bytecode, SDK layer (the default)", true, true),
        (
            "with bytecode, self-contained (`SRI_LAMBDA_SDK_LAYER=false`)",
            true,
            false,
        ),
        ("without bytecode, SDK layer", false, true),
    ] {
        let mut inits = Vec::new();
        let mut firsts = Vec::new();
        for _ in 0..cold {
            let mut o = options("emulator");
            if !bytecode {
                o = o.env("SRI_PYTHON_3_12", "none");
            }
            if !layer {
                o = o.env("SRI_LAMBDA_SDK_LAYER", "false");
            }
            let c = Connector::start_with(o);
            let (endpoint, _, init) = launch(&c).await;
            inits.push(init.expect("the launch stream reports the init time"));
            firsts.push(call(&daemon(&c), &endpoint).await);
        }
        cold_rows.push(format!(
            "| {label} | {:.0} | {:.1} |",
            median(&inits),
            median(&firsts)
        ));
    }

    let mut body = run_lines(
        "make bench (bench_emulator)",
        &date,
        t0.elapsed(),
        &load_start,
        &loadavg(),
    );
    body.push_str(&format!(
        "\n\nThe sample plugin through `sri serve`'s gateway, on the `local` backend and on the \
         `emulator` backend (its Lambda zip under `cargo lambda watch`, Function URL route), \
         {calls} interleaved warm `echo` calls each (time to the gateway's response head).\n\n\
         | backend | launch → ready | warm p50 (ms) | warm p99 (ms) |\n|---|---|---|---|\n{}\n\n\
         Emulator minus local at p50: {gap:+.2} ms (target: within 1.5 ms).\n\n\
         Cold start of an emulated function, median of {cold} launches:\n\n\
         | zip | init (ms) | first call (ms) |\n|---|---|---|\n{}\n",
        rows.join("\n"),
        cold_rows.join("\n")
    ));
    println!("{body}");
    let path = harness::root().join("BENCHMARKS.md");
    write_section(&path, "emulator", &body).expect("write BENCHMARKS.md");
}
