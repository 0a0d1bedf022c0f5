//! The bootstrap as a Lambda custom runtime under `cargo lambda watch` (Function URL route),
//! and its init-error report. The whole function zip under the emulator is the emulator
//! backend's (tests/e2e/emulator.rs).

use axum::Router;
use axum::body::Bytes as AxBytes;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use connector::protocol::events::EventKind;
use harness::emulator::{Lambda, spawn_runtime};
use harness::*;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test]
async fn streams_incrementally_through_the_function_url() {
    let lambda = Lambda::start(Options::new("sample"));
    let url = lambda.function_url();
    // The first invocation waits for the runtime to poll; no separate readiness probe needed.
    let delay_ms = 300;
    let ev = invoke_stream(
        &url,
        envelope(
            &session_id("l"),
            tool_data(
                "sample",
                "stream",
                json!({"n": 4, "delay_ms": delay_ms}),
                None,
            ),
        ),
    )
    .await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["chunk 0", "chunk 1", "chunk 2", "chunk 3"]);
    let times: Vec<Duration> = ev
        .iter()
        .filter(|(_, e)| e.kind == EventKind::Chunk)
        .map(|(t, _)| *t)
        .collect();
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(
            gap >= Duration::from_millis(delay_ms * 2 / 3),
            "chunks arrived together (gap {gap:?}); times {times:?}"
        );
    }
    let start = ev[0].1.json().unwrap();
    assert!(
        start["request_id"].as_str().unwrap().len() > 8,
        "Lambda's request id: {start}"
    );

    // Health and auth through the same route.
    let h: Value = reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["ready"], true, "{h}");
    let body = envelope(
        &session_id("l"),
        tool_data("sample", "echo", json!({}), None),
    );
    let forged = signer("k1", [0x44; 32]);
    let resp = Call {
        base: &url,
        action: "invoke_tool",
        body,
        ring: Some(&forged),
        accept: "text/event-stream",
    }
    .send()
    .await;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["errorMessage"]
            .as_str()
            .unwrap()
            .contains("bad signature"),
        "{v}"
    );

    // Buffered mode too.
    let body = envelope(
        &session_id("l"),
        tool_data("sample", "stream", json!({"n": 2, "delay_ms": 1}), None),
    );
    let resp = signed_call(&url, "invoke_tool", body, "application/json").await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "success", "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn sdk_0_7_runs_under_the_emulator_too() {
    let lambda = Lambda::start(Options::new("sample").py(Py::Py311));
    let ev = invoke_stream(
        &lambda.function_url(),
        envelope(
            &session_id("l7"),
            tool_data("sample", "stream", json!({"n": 2, "delay_ms": 10}), None),
        ),
    )
    .await;
    assert_well_formed(&ev);
    assert_eq!(texts(&ev), ["chunk 0", "chunk 1"]);
}

#[tokio::test]
async fn a_crash_under_lambda_still_ends_the_stream_with_error_then_end() {
    let lambda = Lambda::start(Options::new("faults"));
    let ev = invoke_stream(
        &lambda.function_url(),
        envelope(
            &session_id("lc"),
            tool_data("faults", "crash", json!({}), None),
        ),
    )
    .await;
    assert_well_formed(&ev);
    assert_eq!(error_of(&ev)["error_type"], "PluginProcessExited");
}

// The function zip's own layout (plugin/, vendor/, bin/bootstrap as the exec wrapper of a bare
// interpreter, read-only task root) is run by the emulator backend: tests/e2e/emulator.rs and the
// connector tests on it (`SRI_TEST_BACKEND=emulator`).

/// What a fake Runtime API recorded of `/runtime/init/error`.
type Recorded = Arc<Mutex<Option<(HeaderMap, AxBytes)>>>;

#[tokio::test]
async fn an_import_failure_is_reported_to_init_error_with_the_python_error() {
    // cargo-lambda's emulator accepts /init/error but shows it nowhere, so this one test uses a
    // recording stand-in for the Runtime API.
    let recorded: Recorded = Arc::default();
    let rec = recorded.clone();
    let app = Router::new()
        .route(
            "/2018-06-01/runtime/init/error",
            post(move |h: HeaderMap, b: AxBytes| {
                *rec.lock().unwrap() = Some((h, b));
                async { axum::http::StatusCode::ACCEPTED }
            }),
        )
        .route(
            "/2018-06-01/runtime/invocation/next",
            get(std::future::pending::<()>),
        );
    let (addr, _task) = harness::serve_loopback(app).await;

    let logs = Arc::new(Mutex::new(Vec::new()));
    // AWS's form of the address: bare host:port.
    let mut child = spawn_runtime(
        &addr.to_string(),
        &Options::new("import_error"),
        logs.clone(),
    );
    let status = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "bootstrap did not exit after its init failed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    assert!(!status.success(), "init failure exits non-zero");
    let (headers, body) = recorded
        .lock()
        .unwrap()
        .clone()
        .expect("POST /runtime/init/error was made");
    assert_eq!(
        headers["lambda-runtime-function-error-type"],
        "Runtime.InitError"
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    let msg = v["errorMessage"].as_str().unwrap();
    assert!(
        msg.contains("ModuleNotFoundError") && msg.contains("this_module_does_not_exist"),
        "{v}"
    );
}
