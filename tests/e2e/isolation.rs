//! Sessions of one plugin cannot hold each other up, processes are never left behind, and the
//! plugin cannot reach the runtime's secrets.
//!
//! - A caller that stops reading a flood is cut at its session's buffer budget (or its deadline)
//!   while a fast tool on the same plugin keeps answering in milliseconds.
//! - A replaced process dies when its last session ends or reaches its deadline, even when that
//!   session's caller never reads; a SIGKILLed bootstrap takes its plugin with it, sandboxed
//!   or not.
//! - A fixture plugin reading `/proc/<ppid>/environ`, `/proc/<ppid>/mem` and its own
//!   environment finds no canary secret under `bootstrap serve`, the Lambda emulator and the
//!   connector's local backend.

use base64::Engine;
use connector::protocol::EVENT_STREAM;
use connector::protocol::events::EventKind;
use harness::difypkg::Package;
use harness::emulator::Lambda;
use harness::sri::{Connector, ConnectorOptions};
use harness::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

fn faults(tool: &str, params: Value) -> bytes::Bytes {
    envelope(&session_id(tool), tool_data("faults", tool, params, None))
}

/// The fast tool: the plugin's pid, and how long the call took end to end.
async fn whoami(base: &str) -> (u32, Duration) {
    let started = Instant::now();
    let ev = invoke_stream(base, faults("whoami", json!({}))).await;
    let took = started.elapsed();
    assert_well_formed(&ev);
    let text = texts(&ev).pop().unwrap_or_else(|| {
        panic!(
            "whoami did not answer: {:?}",
            ev.iter().map(|(_, e)| e.json().ok()).collect::<Vec<_>>()
        )
    });
    let pid = text
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("whoami said {text:?}"));
    (pid, took)
}

/// Whether `pid` is gone (reaped, or a zombie: it runs nothing any more).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

async fn wait_gone(pid: u32, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    while !gone(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) still running after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_caller_that_stops_reading_is_cut_at_its_budget_while_other_sessions_stay_fast() {
    let daemon = harness::daemon::FakeDaemon::start_with("greeting", b"hello from dify").await;
    let b = Bootstrap::start(
        Options::new("faults")
            .env("SRI_BACKWARDS", "direct")
            .env("DIFY_PLUGIN_DAEMON_URL", daemon.url()),
    );
    b.wait_ready().await;
    let base = b.url();
    let (pid, _) = whoami(&base).await;

    // 2,000 × 64 KiB, and the caller reads nothing but the response head.
    let stuck = signed_call(
        &base,
        "invoke_tool",
        faults("flood", json!({"count": 2000, "size": 65536})),
        EVENT_STREAM,
    )
    .await;
    assert_eq!(stuck.status(), 200);
    b.wait_log("session cut at its buffer budget", Duration::from_secs(30))
        .await;

    // The plugin is still flooding (its output for the cut session is dropped as it comes):
    // every other session goes on at full speed.
    const FLOOD_DONE: &str = "the plugin finished a session cut at its buffer budget";
    let mut took = Vec::new();
    let mut during_flood = 0;
    for _ in 0..100 {
        let (p, t) = whoami(&base).await;
        assert_eq!(p, pid, "served by the same process");
        took.push(t);
        if !b.logs().iter().any(|l| l.contains(FLOOD_DONE)) {
            during_flood += 1;
        }
    }
    took.sort();
    let p99 = took[98];
    eprintln!(
        "whoami beside a stuck flood: p50 {:?}, p99 {p99:?}, max {:?}; {during_flood} of 100 \
         done while the plugin still flooded",
        took[49], took[99]
    );
    assert!(
        during_flood >= 50,
        "only {during_flood} of the 100 calls ran while the plugin flooded"
    );
    assert!(
        p99 < Duration::from_millis(50),
        "p99 {p99:?} (slowest: {:?})",
        &took[90..]
    );
    // Backwards calls and heartbeats do not wait on the stuck caller either.
    let ev = invoke_stream(&base, faults("callback", json!({"key": "greeting"}))).await;
    assert_eq!(texts(&ev), ["hello from dify"]);
    assert_eq!(health(&base).await["ready"], true);

    // The stuck caller, reading at last, finds what was relayed, then the session error.
    let ev = read_events(stuck).await;
    assert_well_formed(&ev);
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginOutputTooLarge", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("SRI_SESSION_BUFFER_BYTES"),
        "{err}"
    );
    assert_eq!(err["args"]["limit_bytes"], 8 * 1024 * 1024, "{err}");
    let done = b.wait_log(FLOOD_DONE, Duration::from_secs(60)).await;
    let dropped = serde_json::from_str::<Value>(&done).unwrap()["dropped_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        dropped > 64 << 20,
        "most of the 128 MiB was dropped, not buffered: {done}"
    );
    let relayed = kinds(&ev)
        .iter()
        .filter(|k| **k == EventKind::Chunk)
        .count();
    assert!(relayed < 2000, "the session was cut ({relayed} chunks)");

    let h = health(&base).await;
    assert_eq!(h["generation"], 1, "the plugin did nothing wrong: {h}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(&base).await["active_sessions"] != 0 {
        assert!(
            Instant::now() < deadline,
            "sessions left: {}",
            health(&base).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_replaced_process_dies_at_its_last_sessions_deadline_though_its_caller_never_reads() {
    let b = Bootstrap::start(
        Options::new("faults")
            .env("PLUGIN_MAX_EXECUTION_TIMEOUT", "3")
            // Budgets above the flood: only the deadline ends the stuck session.
            .env("SRI_SESSION_BUFFER_BYTES", (96 << 20).to_string())
            .env("SRI_MAX_BUFFERED_BYTES", (128 << 20).to_string()),
    );
    b.wait_ready().await;
    let base = b.url();
    let (old, _) = whoami(&base).await;

    // A hang (its timeout replaces the process) and, opened after it, a flood nobody reads.
    let hang = signed_call(
        &base,
        "invoke_tool",
        faults("hang", json!({})),
        EVENT_STREAM,
    )
    .await;
    assert_eq!(hang.status(), 200);
    let stuck = signed_call(
        &base,
        "invoke_tool",
        faults("flood", json!({"count": 400, "size": 65536})),
        EVENT_STREAM,
    )
    .await;
    assert_eq!(stuck.status(), 200);
    let hang = tokio::spawn(read_events(hang));

    let ev = hang.await.unwrap();
    assert_eq!(error_of(&ev)["error_type"], "PluginTimeout");
    // Replaced while the flood's session is still on it; that session's deadline ends it.
    wait_gone(old, Duration::from_secs(15), "the replaced plugin process").await;
    let (new, took) = whoami(&base).await;
    assert_ne!(new, old, "served by the replacement");
    assert!(took < Duration::from_secs(5), "{took:?}");

    let ev = read_events(stuck).await;
    assert_well_formed(&ev);
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginTimeout", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("the caller did not read"),
        "{err}"
    );
    assert_eq!(health(&base).await["generation"], 2);
}

/// Every process below `pid` (by host pid: a sandboxed plugin is PID 1 of its own namespace).
fn descendants(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            Some((p, rest.split_whitespace().nth(1)?.parse().ok()?))
        })
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found.remove(0);
    found
}

/// SIGKILLs a ready bootstrap (sandbox `mode`) and waits for every process it started to go.
async fn a_killed_bootstrap_takes_its_plugin_with_it(mode: &str) {
    let b = Bootstrap::start(Options::new("faults").env("SRI_SANDBOX", mode));
    b.wait_ready().await;
    whoami(&b.url()).await;
    let below = descendants(b.pid());
    assert!(
        !below.is_empty(),
        "no plugin process under the bootstrap (sandbox {mode})"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the bootstrap");
    for pid in below {
        let what = format!("a process of the killed bootstrap (sandbox {mode})");
        wait_gone(pid, Duration::from_secs(10), &what).await;
    }
}

#[tokio::test]
async fn a_killed_bootstrap_takes_its_plugin_with_it_unsandboxed() {
    a_killed_bootstrap_takes_its_plugin_with_it("off").await;
}

/// As root the sandboxed plugin changes uid, which disarms a parent-death signal set before.
#[tokio::test]
async fn a_killed_bootstrap_takes_its_sandboxed_plugin_with_it() {
    a_killed_bootstrap_takes_its_plugin_with_it("required").await;
}

/// Canary secrets, unique to this run.
struct Canaries {
    signing_secret: Vec<u8>,
    api_key: String,
    aws_id: String,
    aws_secret: String,
    aws_token: String,
}

impl Canaries {
    fn new() -> Self {
        let tag = format!("{}{}", std::process::id(), now());
        Self {
            signing_secret: format!("CANARY-SIGNING-SECRET-{tag}-0123456789").into_bytes(),
            api_key: format!("CANARY-API-KEY-{tag}-abcdef"),
            aws_id: format!("AKIACANARY{tag}"),
            aws_secret: format!("CANARY-AWS-SECRET-{tag}-xyz"),
            aws_token: format!("CANARY-AWS-TOKEN-{tag}-uvw"),
        }
    }

    fn signing_b64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.signing_secret)
    }

    /// The test ring plus the canary key (which verifies only).
    fn ring_with_canary(&self) -> String {
        format!("{},k9:{}", keys_env(&[SECRET_A]), self.signing_b64())
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY",
                self.api_key.clone(),
            ),
            ("AWS_ACCESS_KEY_ID", self.aws_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.aws_secret.clone()),
            ("AWS_SESSION_TOKEN", self.aws_token.clone()),
        ]
    }

    /// What the probe looks for.
    fn list(&self) -> String {
        [
            String::from_utf8(self.signing_secret.clone()).unwrap(),
            self.signing_b64(),
            self.api_key.clone(),
            self.aws_id.clone(),
            self.aws_secret.clone(),
            self.aws_token.clone(),
        ]
        .join(",")
    }
}

fn probe_data(c: &Canaries) -> Value {
    tool_data(
        "faults",
        "secrets_probe",
        json!({"canaries": c.list()}),
        None,
    )
}

/// Asserts that the probe's report shows nothing: its own environment clean, and every
/// ancestor that is one of ours (`bootstrap`, `sri`) unreadable or clean. Returns how many of
/// ours it looked at.
fn assert_nothing_found(report: &Value, context: &str) -> usize {
    assert_eq!(
        report["self_env_sensitive"],
        json!([]),
        "{context}: the plugin's environment: {report}"
    );
    assert_eq!(report["self_env_canary"], false, "{context}: {report}");
    assert_ne!(report["self_environ_canary"], true, "{context}: {report}");
    let ours: Vec<&Value> = report["ancestors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| ["bootstrap", "sri"].contains(&a["comm"].as_str().unwrap_or_default()))
        .collect();
    for a in &ours {
        assert_ne!(a["environ_canary"], true, "{context}: {a}");
        assert_eq!(
            a.get("environ_sensitive").cloned().unwrap_or(json!([])),
            json!([]),
            "{context}: {a}"
        );
        assert_ne!(a["mem_canary"], true, "{context}: {a}");
        assert_eq!(
            a["mem"], "denied",
            "{context}: the plugin can read its runtime's memory: {a}"
        );
        // The environment may stay readable (some kernels and sandboxes show a non-dumpable
        // process's initial environment block to its user): then the values must be wiped.
        assert!(
            a["environ"] == "denied" || a["environ_canary"] == false,
            "{context}: {a}"
        );
    }
    ours.len()
}

fn probe_report(ev: &[(Duration, connector::protocol::events::Event)]) -> Value {
    assert_well_formed(ev);
    let text = texts(ev).pop().expect("the probe reports");
    serde_json::from_str(&text).expect("the probe's JSON")
}

fn with_canaries(opts: Options, c: &Canaries) -> Options {
    let mut opts = opts.env("SRI_SIGNING_KEYS", c.ring_with_canary());
    for (k, v) in c.env() {
        opts = opts.env(k, v);
    }
    opts
}

#[tokio::test]
async fn under_bootstrap_serve_the_plugin_finds_no_secret() {
    let c = Canaries::new();
    let b = Bootstrap::start(with_canaries(Options::new("faults"), &c));
    b.wait_ready().await;
    let report = probe_report(
        &invoke_stream(&b.url(), envelope(&session_id("probe"), probe_data(&c))).await,
    );
    let ours = assert_nothing_found(&report, "bootstrap serve");
    assert_eq!(ours, 1, "the bootstrap is the plugin's parent: {report}");
}

#[tokio::test]
async fn under_the_lambda_emulator_the_plugin_finds_no_secret_nor_the_runtime_api() {
    let c = Canaries::new();
    let lambda = Lambda::start(with_canaries(Options::new("faults"), &c));
    let report = probe_report(
        &invoke_stream(
            &lambda.function_url(),
            envelope(&session_id("probe"), probe_data(&c)),
        )
        .await,
    );
    // AWS_LAMBDA_RUNTIME_API is among the names the probe reports when set.
    let ours = assert_nothing_found(&report, "Lambda runtime");
    assert_eq!(ours, 1, "the bootstrap is the plugin's parent: {report}");
}

#[tokio::test]
async fn under_the_local_backend_the_plugin_finds_no_secret() {
    let c = Canaries::new();
    let mut opts = ConnectorOptions {
        api_key: c.api_key.clone(),
        ..ConnectorOptions::default()
    }
    .env("SRI_SIGNING_KEYS", format!("k1:{}", c.signing_b64()))
    // The hardening that holds without the plugin sandbox (a host that allows none of it):
    // the plugin sees its ancestors and still finds nothing. Sandboxed, it does not even see
    // them (tests/e2e/sandbox.rs).
    .env("SRI_SANDBOX", "off");
    for (k, v) in c.env() {
        if k != "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY" {
            opts = opts.env(k, v);
        }
    }
    let conn = Connector::start_with(opts);
    let d = conn
        .daemon()
        .with_launch_timeout(Duration::from_secs(180))
        .with_execution_timeout(Duration::from_secs(120));
    let o = d
        .launch_package(&Package::from_dir(&plugin_dir("faults")), false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", conn.log_tail(60)));
    let (_, endpoint) = o
        .installed
        .clone()
        .unwrap_or_else(|| panic!("not installed: {}\n{}", o.transcript(), conn.log_tail(60)));
    let sid = session_id("probe");
    let out = d
        .invoke(
            &endpoint,
            "invoke_tool",
            &envelope(&sid, probe_data(&c)),
            &sid,
        )
        .await;
    let text = out
        .texts()
        .pop()
        .unwrap_or_else(|| panic!("no report: {}\n{}", out.transcript(), conn.log_tail(40)));
    let report: Value = serde_json::from_str(&text).expect("the probe's JSON");
    let ours = assert_nothing_found(&report, "local backend");
    assert_eq!(
        ours, 2,
        "the bootstrap and `sri serve` are the plugin's parent and grandparent: {report}"
    );
}
