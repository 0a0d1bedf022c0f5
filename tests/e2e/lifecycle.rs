//! Process lifecycle: running as PID 1 in a container, and SIGTERM reaching the plugin.

use harness::*;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn as_pid_1_the_plugin_keeps_running() {
    // A new PID namespace makes the bootstrap PID 1, as in a container. The SDK kills itself
    // within 0.5 s when its parent is PID 1, so a stream lasting well over that proves it is not.
    let b = Bootstrap::start(Options::new("sample").wrap(&[
        "unshare",
        "--pid",
        "--fork",
        "--kill-child=SIGTERM",
        "--mount-proc",
    ]));
    b.wait_ready().await;
    // Pids in the new namespace start at 1 (the bootstrap as init), so the plugin's is small.
    let pid = b.plugin_pid().await;
    assert!(
        pid < 64,
        "the bootstrap runs in its own PID namespace (plugin pid {pid})"
    );
    let ev = invoke_stream(
        &b.url(),
        envelope(
            &session_id("pid1"),
            tool_data("sample", "stream", json!({"n": 3, "delay_ms": 700}), None),
        ),
    )
    .await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["chunk 0", "chunk 1", "chunk 2"]);
    assert_eq!(
        health(&b.url()).await["generation"],
        1,
        "the plugin never restarted"
    );
}

#[tokio::test]
async fn sigterm_stops_the_plugin_too() {
    let mut b = Bootstrap::start(Options::new("sample"));
    b.wait_ready().await;
    let plugin = nix::unistd::Pid::from_raw(b.plugin_pid().await as i32);
    assert!(nix::sys::signal::kill(plugin, None).is_ok(), "plugin runs");
    let status = b.terminate();
    assert!(
        status.success(),
        "bootstrap exits cleanly on SIGTERM: {status}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while nix::sys::signal::kill(plugin, None).is_ok() && !is_zombie(plugin.as_raw()) {
        assert!(
            Instant::now() < deadline,
            "plugin {plugin} still alive after the bootstrap stopped"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    b.wait_log("SIGTERM received", Duration::from_secs(1)).await;
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
}
