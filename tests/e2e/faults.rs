//! Plugins that misbehave: crash, hang, flood, print garbage, leak secrets, call back into Dify.
//! Each failure must reach the caller as a clear `error` then `end`, and the runtime must keep
//! serving.

use connector::protocol::events::EventKind;
use harness::daemon::FakeDaemon;
use harness::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn faults(tool: &str, params: serde_json::Value) -> bytes::Bytes {
    envelope(
        &session_id(tool),
        tool_data("faults", tool, params, Some("sk-test-0123456789")),
    )
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn crash_mid_stream_reports_exit_and_the_next_call_runs_on_a_restarted_plugin() {
    let b = Bootstrap::start(Options::new("faults"));
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("crash", json!({}))).await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["before crash"]);
    assert_eq!(
        kinds(&ev)[kinds(&ev).len() - 3],
        EventKind::Error,
        "error right before usage and end"
    );
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginProcessExited");
    assert_eq!(err["args"]["exit_status"], "exit status 3");
    assert!(
        err["args"]["stderr_tail"]
            .as_str()
            .unwrap()
            .contains("fatal: simulated crash"),
        "{err}"
    );
    assert!(err["args"].as_object().unwrap().len() <= 10);
    let usage = ev[ev.len() - 2].1.json().unwrap();
    assert!(
        usage["memory_used_mb"].as_u64().unwrap() > 10,
        "peak memory survives the crash: {usage}"
    );

    let ev = invoke_stream(&b.url(), faults("leak_secret", json!({}))).await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["ok"]);
    assert_eq!(
        health(&b.url()).await["generation"],
        2,
        "served by the restarted plugin"
    );
}

#[tokio::test]
async fn a_hung_plugin_times_out_before_the_deadline_and_is_recycled() {
    let b = Bootstrap::start(Options::new("faults").env("PLUGIN_MAX_EXECUTION_TIMEOUT", "2"));
    b.wait_ready().await;
    let started = Instant::now();
    let ev = invoke_stream(&b.url(), faults("hang", json!({}))).await;
    let took = started.elapsed();
    assert_well_formed(&ev);
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginTimeout", "{err}");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "timed out after {took:?}"
    );
    let ev = invoke_stream(&b.url(), faults("leak_secret", json!({}))).await;
    assert_eq!(texts(&ev), ["ok"]);
    assert_eq!(
        health(&b.url()).await["generation"],
        2,
        "the hung process was replaced"
    );
}

#[tokio::test]
async fn an_oversized_line_is_refused_with_bounded_memory() {
    let b = Bootstrap::start(Options::new("faults"));
    b.wait_ready().await;
    let before = vm_hwm_kib(b.pid());
    let ev = invoke_stream(&b.url(), faults("huge", json!({"size": 64 * 1024 * 1024}))).await;
    assert_well_formed(&ev);
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginOutputTooLarge");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("PLUGIN_RUNTIME_MAX_BUFFER_SIZE")
    );
    let after = vm_hwm_kib(b.pid());
    // A 64 MiB line must cost at most the 5 MiB limit plus slack, never the line itself.
    assert!(
        after < before + 24 * 1024,
        "bootstrap peak RSS grew from {before} KiB to {after} KiB"
    );
    // The process keeps serving.
    let ev = invoke_stream(&b.url(), faults("leak_secret", json!({}))).await;
    assert_eq!(texts(&ev), ["ok"]);
}

#[tokio::test]
async fn non_json_output_is_a_protocol_error() {
    let b = Bootstrap::start(Options::new("faults"));
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("garbage", json!({}))).await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["before garbage"]);
    let err = error_of(&ev);
    assert_eq!(err["error_type"], "PluginProtocolError");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("this is not json"),
        "{err}"
    );
    let ev = invoke_stream(&b.url(), faults("leak_secret", json!({}))).await;
    assert_eq!(texts(&ev), ["ok"]);
}

#[tokio::test]
async fn credentials_never_reach_the_logs() {
    let b = Bootstrap::start(Options::new("faults"));
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("leak_secret", json!({}))).await;
    assert_eq!(texts(&ev), ["ok"]);
    let line = b.wait_log("secret=", Duration::from_secs(10)).await;
    assert!(line.contains("secret=***"), "{line}");
    assert!(
        b.logs().iter().all(|l| !l.contains("sk-test-0123456789")),
        "a credential reached the logs"
    );
}

#[tokio::test]
async fn the_plugin_never_sees_the_signing_keys() {
    let b = Bootstrap::start(
        Options::new("faults").env("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", "k"),
    );
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("env_probe", json!({}))).await;
    assert_eq!(texts(&ev), ["visible: none"]);
}

#[tokio::test]
async fn backwards_invocation_reaches_the_daemon_and_answers_the_plugin() {
    let daemon = FakeDaemon::start_with("greeting", b"hello from dify").await;
    let b = Bootstrap::start(
        Options::new("faults")
            .env("SRI_BACKWARDS", "direct")
            .env("DIFY_PLUGIN_DAEMON_URL", daemon.url()),
    );
    b.wait_ready().await;
    let body = faults("callback", json!({"key": "greeting"}));
    let sid = serde_json::from_slice::<serde_json::Value>(&body).unwrap()["session_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ev = invoke_stream(&b.url(), body).await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["hello from dify"]);
    let reqs = daemon.state.requests.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(
        reqs[0].0.as_deref(),
        Some(sid.as_str()),
        "Dify-Plugin-Session-ID header"
    );
    assert_eq!(reqs[0].1["data"]["type"], "invoke");
    // No session/invoke line ever reaches the caller.
    assert!(
        ev.iter()
            .all(|(_, e)| !String::from_utf8_lossy(&e.data).contains("\"invoke\""))
    );

    // A daemon error reaches the plugin as an exception, not a hang.
    let ev = invoke_stream(&b.url(), faults("callback", json!({"key": "missing"}))).await;
    let text = texts(&ev).join("");
    assert!(
        text.starts_with("callback failed") && text.contains("missing"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unreachable_daemon_fails_the_callback_promptly() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let b = Bootstrap::start(
        Options::new("faults")
            .env("SRI_BACKWARDS", "direct")
            .env("DIFY_PLUGIN_DAEMON_URL", format!("http://{closed}")),
    );
    b.wait_ready().await;
    let started = Instant::now();
    let ev = invoke_stream(&b.url(), faults("callback", json!({"key": "greeting"}))).await;
    assert_well_formed(&ev);
    let text = texts(&ev).join("");
    assert!(
        text.starts_with("callback failed") && text.contains("cannot reach the Dify daemon"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn no_daemon_url_is_a_clear_callback_error() {
    let b = Bootstrap::start(Options::new("faults").env("SRI_BACKWARDS", "direct"));
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("callback", json!({}))).await;
    let text = texts(&ev).join("");
    assert!(text.contains("DIFY_PLUGIN_DAEMON_URL is not set"), "{text}");
    // Relay mode (the default) without a relay names its own variable.
    let b = Bootstrap::start(Options::new("faults"));
    b.wait_ready().await;
    let ev = invoke_stream(&b.url(), faults("callback", json!({}))).await;
    let text = texts(&ev).join("");
    assert!(text.contains("SRI_RELAY_URL is not set"), "{text}");
}
