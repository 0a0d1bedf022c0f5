//! What the local backend's plugin sandbox costs: cold start (bootstrap spawn → plugin ready)
//! and warm calls through the local backend, with `SRI_SANDBOX=off` and `required` side by side
//! in one run. Writes its section of `BENCHMARKS.md`.
//!
//! One connector per mode launches the sample plugin (real SDK) through the daemon-exact
//! client; warm calls are `echo` through its gateway, alternating modes call by call. Cold
//! starts run that function's own `bootstrap serve` (plugin dir, venv, keys, as the connector
//! starts it), alternating modes round by round, until `/health` says ready.

use harness::benchmarks::{http_client, install_cleanup, machine, median, ms, pct, target_dir};
use harness::godaemon::GoDaemon;
use harness::sri::{Connector, ConnectorOptions};
use harness::{envelope, keys_env, plugin_dir, root, session_id, tool_data};
use serde_json::json;
use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEMO_KEY: &str = "sri-demo-key";
const MODES: [&str; 2] = ["off", "required"];

struct Side {
    connector: Connector,
    daemon: GoDaemon,
    endpoint: String,
    function_dir: PathBuf,
}

async fn side(mode: &str, bootstrap: &Path) -> Side {
    let connector = Connector::start_with(
        ConnectorOptions::default()
            .env("SRI_SANDBOX", mode)
            .env("SRI_BOOTSTRAP_BIN", bootstrap.display().to_string()),
    );
    let daemon = connector
        .daemon()
        .with_launch_timeout(Duration::from_secs(240))
        .with_execution_timeout(Duration::from_secs(60));
    let pkg = harness::difypkg::Package::from_dir(&plugin_dir("sample"));
    let o = daemon
        .launch_package(&pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}"));
    let (_, endpoint) = o
        .installed
        .clone()
        .unwrap_or_else(|| panic!("not installed ({mode}): {}", o.transcript()));
    let function_dir = std::fs::read_dir(connector.data_dir().join("functions"))
        .expect("functions")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join("meta.json").exists())
        .expect("the function's directory");
    Side {
        connector,
        daemon,
        endpoint,
        function_dir,
    }
}

async fn echo(s: &Side) -> Duration {
    let sid = session_id("echo");
    let data = tool_data("sample", "echo", json!({"text": "hi"}), Some(DEMO_KEY));
    let started = Instant::now();
    let o = s
        .daemon
        .invoke(&s.endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    let took = started.elapsed();
    assert!(
        o.end_received() && o.texts().iter().any(|t| t.contains("hi")),
        "{}",
        o.transcript()
    );
    took
}

/// Spawns the function's bootstrap as the connector does and times it to ready.
async fn cold_start(bootstrap: &Path, s: &Side, mode: &str) -> Duration {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(bootstrap)
        .args(["serve", "--listen", &addr.to_string()])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("SRI_PLUGIN_DIR", s.function_dir.join("plugin"))
        .env("SRI_PYTHON", s.function_dir.join("venv/bin/python"))
        .env("SRI_SIGNING_KEYS", keys_env(&[harness::SECRET_A]))
        .env("SRI_SANDBOX", mode)
        .env("SRI_SANDBOX_HIDE", s.connector.data_dir())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bootstrap");
    let client = http_client();
    let deadline = started + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("http://{addr}/health"))
            .send()
            .await
            .ok()
            .filter(|r| r.status().is_success());
        if ready.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "{mode}: not ready within 60 s");
        // Polling (a benchmark, not a test): 1 ms granularity on a ~1 s figure.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let _ = child.kill().await;
    took
}

fn main() {
    install_cleanup("bench_sandbox");
    // `SRI_BENCH_BIN_DIR`: binaries from elsewhere (e.g. target/debug for a quick look); their
    // figures are printed only, never written over the release build's in BENCHMARKS.md.
    let elsewhere = std::env::var_os("SRI_BENCH_BIN_DIR").map(PathBuf::from);
    let release = elsewhere
        .clone()
        .unwrap_or_else(|| target_dir().join("release"));
    let (sri, bootstrap) = (release.join("sri"), release.join("bootstrap"));
    for b in [&sri, &bootstrap] {
        assert!(
            b.exists(),
            "{} is missing: `make bench` builds it (cargo build --release)",
            b.display()
        );
    }
    // SAFETY: first statement of a single-threaded main.
    unsafe { std::env::set_var("SRI_CONNECTOR_BIN", &sri) };
    let rounds = harness::benchmarks::knob("SRI_BENCH_SANDBOX_ROUNDS", 7);
    let calls = harness::benchmarks::knob("SRI_BENCH_SANDBOX_CALLS", 300);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let report = rt.block_on(async {
        let sides = [
            side(MODES[0], &bootstrap).await,
            side(MODES[1], &bootstrap).await,
        ];
        let active = reqwest::get(format!("{}/healthz", sides[1].connector.url()))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let mut cold: [Vec<f64>; 2] = Default::default();
        for _ in 0..rounds {
            for (i, mode) in MODES.iter().enumerate() {
                cold[i].push(ms(cold_start(&bootstrap, &sides[i], mode).await));
            }
        }
        let mut warm: [Vec<f64>; 2] = Default::default();
        for s in &sides {
            for _ in 0..20 {
                echo(s).await;
            }
        }
        for _ in 0..calls {
            for (s, w) in sides.iter().zip(warm.iter_mut()) {
                w.push(ms(echo(s).await));
            }
        }
        let mut r = String::new();
        let _ = writeln!(r, "## Plugin sandbox (local backend)\n");
        let _ = writeln!(
            r,
            "`cargo run --release -p sri-tests --example bench_sandbox`: the sample plugin \
             (dify_plugin {}) on two connectors, `SRI_SANDBOX=off` and `required`, in one run. \
             **Cold start** = spawning the function's `bootstrap serve` → `/health` ready \
             ({rounds} rounds, modes alternating); **warm call** = an `echo` through the \
             gateway with the daemon-exact client, whole call ({calls} per mode, alternating).\n",
            harness::benchmarks::dify_plugin_version()
        );
        for line in machine() {
            let _ = writeln!(r, "- {line}");
        }
        let _ = writeln!(r, "- sandbox (required): `{}`\n", active.trim());
        let _ = writeln!(
            r,
            "| mode | cold start median | cold start min | warm call p50 | warm call p99 |"
        );
        let _ = writeln!(r, "|---|---|---|---|---|");
        for (i, mode) in MODES.iter().enumerate() {
            let min = cold[i].iter().copied().fold(f64::INFINITY, f64::min);
            let _ = writeln!(
                r,
                "| `{mode}` | {:.1} ms | {min:.1} ms | {:.3} ms | {:.3} ms |",
                median(&cold[i]),
                pct(&warm[i], 0.5),
                pct(&warm[i], 0.99)
            );
        }
        let _ = writeln!(
            r,
            "\nAdded by the sandbox: cold start {:+.1} ms (median; target ≤ 20 ms), warm call \
             {:+.3} ms (p50; target ≤ 0.05 ms).",
            median(&cold[1]) - median(&cold[0]),
            pct(&warm[1], 0.5) - pct(&warm[0], 0.5)
        );
        r
    });
    print!("{report}");
    if let Some(dir) = elsewhere {
        println!(
            "\n(binaries from {}: BENCHMARKS.md left as it was)",
            dir.display()
        );
        return;
    }
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "sandbox", &report).expect("write BENCHMARKS.md");
}
