//! Lambda's fast paths, against a Runtime API fake that follows AWS's documented sequences
//! (`harness::runtime_api`): Managed Instances (`AWS_LAMBDA_MAX_CONCURRENCY` workers sharing
//! one plugin process) and SnapStart (init once, wait for the restore, reconnect, report a
//! failed restore on `/runtime/restore/error`).

use harness::emulator::spawn_runtime;
use harness::runtime_api::RuntimeApi;
use harness::*;
use serde_json::json;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const START: Duration = Duration::from_secs(90);

/// Waits (bounded) until a log line contains `needle`.
async fn wait_log(logs: &Arc<Mutex<Vec<String>>>, needle: &str, within: Duration) {
    let until = Instant::now() + within;
    while !logs.lock().unwrap().iter().any(|l| l.contains(needle)) {
        assert!(
            Instant::now() < until,
            "no log line with `{needle}` within {within:?}; logs:\n{}",
            logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Running {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Running {
    fn start(api: &RuntimeApi, opts: Options) -> Self {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let child = spawn_runtime(&api.addr.to_string(), &opts, logs.clone());
        Self { child, logs }
    }

    fn count(&self, needle: &str) -> usize {
        self.logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        stop(&mut self.child);
        if std::thread::panicking() {
            eprintln!("bootstrap logs:\n{}", self.logs.lock().unwrap().join("\n"));
        }
    }
}

fn stream(prefix: &str, n: u32, delay_ms: u64) -> bytes::Bytes {
    envelope(
        &session_id(prefix),
        tool_data(
            "sample",
            "stream",
            json!({"n": n, "delay_ms": delay_ms, "prefix": prefix}),
            None,
        ),
    )
}

#[tokio::test]
async fn eight_workers_share_one_plugin_and_a_stuck_invocation_holds_none_back() {
    let api = RuntimeApi::start().await;
    let rt = Running::start(
        &api,
        Options::new("sample").env("AWS_LAMBDA_MAX_CONCURRENCY", "8"),
    );
    api.wait_polling(8, START).await;
    let plugin = harness::child_pids(rt.child.id());
    assert_eq!(plugin.len(), 1, "one plugin process: {plugin:?}");

    // One invocation that never completes (its second chunk is days away)…
    let mut stuck = api.invoke_tool(stream("stuck", 2, 1_000_000_000));
    stuck.started(Duration::from_secs(30)).await;
    // …and seven more, each streaming four chunks 300 ms apart.
    let mut calls: Vec<_> = (0..7)
        .map(|i| api.invoke_tool(stream(&format!("s{i}"), 4, 300)))
        .collect();
    let started = Instant::now();
    let mut results = Vec::new();
    for call in &mut calls {
        results.push(call.events(Duration::from_secs(60)).await);
    }
    let elapsed = started.elapsed();
    for (i, ev) in results.iter().enumerate() {
        assert_well_formed(ev);
        let want: Vec<String> = (0..4).map(|k| format!("s{i} {k}")).collect();
        assert_eq!(texts(ev), want, "session s{i}: its own chunks, in order");
    }
    assert_eq!(
        api.max_streaming(),
        8,
        "all eight responses streamed at the same time"
    );
    // Run one after another, the seven would take ≥ 6.3 s.
    assert!(
        elapsed < Duration::from_millis(6300),
        "the seven ran one after another ({elapsed:?})"
    );
    assert_eq!(
        harness::child_pids(rt.child.id()),
        plugin,
        "still the one plugin process"
    );
    // The seven workers are free again; the stuck one is still held.
    api.wait_polling(7, Duration::from_secs(30)).await;
    assert_eq!(api.polling(), 7, "the stuck invocation keeps its worker");
}

#[tokio::test]
async fn snapstart_initialises_once_then_serves_after_the_restore_on_new_connections() {
    let api = RuntimeApi::start().await;
    let rt = Running::start(
        &api,
        Options::new("faults").env("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start"),
    );
    api.wait_restore_parked(START).await;
    assert_eq!(
        api.polling(),
        0,
        "no invocation is polled for before the snapshot"
    );
    let plugin = harness::child_pids(rt.child.id());
    assert_eq!(plugin.len(), 1, "one plugin process: {plugin:?}");

    // The restored copy: the answer to /restore/next, then every old connection gone.
    api.restore().await;
    let mut call = api.invoke_tool(envelope(
        &session_id("snap"),
        tool_data("faults", "whoami", json!({}), None),
    ));
    let ev = call.events(Duration::from_secs(30)).await;
    assert_well_formed(&ev);
    assert_eq!(
        texts(&ev),
        [format!("pid={}", plugin[0])],
        "served by the plugin initialised before the snapshot"
    );
    assert_eq!(
        rt.count("starting plugin"),
        1,
        "the plugin was imported once"
    );
    assert!(
        rt.count("restored from the SnapStart snapshot") == 1,
        "{:?}",
        rt.logs.lock().unwrap()
    );
    assert!(api.posted().is_empty(), "{:?}", api.posted());
}

#[tokio::test]
async fn a_failed_restore_is_reported_on_restore_error_with_the_python_error() {
    // A copy of the sample plugin, broken after the snapshot: its process dies, and its
    // replacement cannot import the plugin.
    let dir = std::env::temp_dir().join(format!("sri-restore-{}", nonce()));
    copy_dir(&plugin_dir("sample"), &dir);
    let api = RuntimeApi::start().await;
    let logs = Arc::new(Mutex::new(Vec::new()));
    let mut child = spawn_runtime(
        &api.addr.to_string(),
        &Options::new(dir.to_str().unwrap()).env("AWS_LAMBDA_INITIALIZATION_TYPE", "snap-start"),
        logs.clone(),
    );
    api.wait_restore_parked(START).await;
    let main = dir.join("main.py");
    let code = std::fs::read_to_string(&main).unwrap();
    std::fs::write(&main, format!("import sri_restore_canary_missing\n{code}")).unwrap();
    let plugin = harness::child_pids(child.id());
    assert_eq!(plugin.len(), 1, "{plugin:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plugin[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_log(&logs, "plugin restarted", Duration::from_secs(30)).await;

    api.restore().await;
    let posted = api
        .wait_posted("restore/error", Duration::from_secs(60))
        .await;
    assert_eq!(posted.error_type, "Runtime.RestoreError");
    let msg = posted.body["errorMessage"].as_str().unwrap_or_default();
    assert!(
        msg.contains("ModuleNotFoundError") && msg.contains("sri_restore_canary_missing"),
        "{}",
        posted.body
    );
    let status = tokio::task::spawn_blocking(move || {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < until,
                "bootstrap did not exit after a failed restore"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(!status.success(), "a failed restore exits non-zero");
    assert_eq!(
        api.polling(),
        0,
        "no invocation polled for after a failed restore"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dst = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dst);
        } else {
            std::fs::copy(entry.path(), dst).unwrap();
        }
    }
}
