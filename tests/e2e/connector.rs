//! The connector (`sri serve`, local backend) driven exactly as the Go Dify plugin daemon drives
//! it (`harness::godaemon`, rules from `dify-wire.md`), with plugins packed as the daemon packs
//! them (`harness::difypkg`), running on the real SDK.
//!
//! Each test starts its own connector on a fresh data directory. The first launch of a package
//! builds a venv and installs `dify_plugin` (uv or pip): each launch may take up to 180 s, and
//! its time is printed.

use harness::difypkg::{Package, collect_dir, sample_as, zip_files};
use harness::godaemon::{GoDaemon, InvokeOutcome, LaunchOutcome, decode_error_response};
use harness::sri::Connector;
use harness::{envelope, plugin_dir, session_id, tool_data};
use serde_json::{Value, json};
use std::time::Duration;

/// Per-launch budget (the daemon's own default is 240 s).
const LAUNCH_BUDGET: Duration = Duration::from_secs(180);
/// Per-invocation budget (the daemon's own default is 600 s).
const INVOKE_BUDGET: Duration = Duration::from_secs(120);
/// The demo key the sample plugin accepts.
const DEMO_KEY: &str = "sri-demo-key";

fn daemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(LAUNCH_BUDGET)
        .with_execution_timeout(INVOKE_BUDGET)
}

fn sample() -> Package {
    Package::from_dir(&plugin_dir("sample"))
}

/// What every launch stream must look like, success or not: nothing the daemon skips or only
/// tolerates, no read error, closed right after `end` (else the daemon waits for its deadline
/// and marks the install failed).
fn assert_stream_clean(o: &LaunchOutcome, c: &Connector) {
    let ctx = || format!("\n{}\nconnector logs:\n{}", o.transcript(), c.log_tail(40));
    assert!(
        !o.deadline_hit,
        "launch stream still open after {LAUNCH_BUDGET:?}{}",
        ctx()
    );
    assert!(
        o.stream_error.is_none(),
        "launch stream error {:?}{}",
        o.stream_error,
        ctx()
    );
    assert!(
        o.skipped.is_empty(),
        "lines the daemon skips: {:?}{}",
        o.skipped,
        ctx()
    );
    assert!(
        o.lint.is_empty(),
        "chunks the daemon only tolerates: {:?}{}",
        o.lint,
        ctx()
    );
    let end_at = o.end_at.unwrap_or_else(|| panic!("no `end` line{}", ctx()));
    let eof_at = o
        .eof_at
        .unwrap_or_else(|| panic!("stream never closed{}", ctx()));
    assert!(
        eof_at.saturating_sub(end_at) < Duration::from_secs(2),
        "stream closed {:?} after `end`, not right after it{}",
        eof_at.saturating_sub(end_at),
        ctx()
    );
    assert_eq!(o.lines_after_end, 0, "lines after `end`{}", ctx());
    assert_eq!(
        o.chunks.last().map(|c| c.stage.as_str()),
        Some("end"),
        "`end` is the last chunk{}",
        ctx()
    );
}

/// Launches `pkg` and asserts that the daemon would install it; returns (name, endpoint).
async fn launch_ok(c: &Connector, d: &GoDaemon, pkg: &Package) -> (String, String) {
    let o = d
        .launch_package(pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\nconnector logs:\n{}", c.log_tail(60)));
    eprintln!(
        "launch of {} took {:.1} s (headers after {:.2} s, {} lines)",
        pkg.unique_identifier(),
        o.elapsed.as_secs_f64(),
        o.headers_after.as_secs_f64(),
        o.lines.len()
    );
    assert_stream_clean(&o, c);
    let ctx = || format!("\n{}\nconnector logs:\n{}", o.transcript(), c.log_tail(60));
    assert!(
        o.failures().is_empty(),
        "failed chunks: {:?}{}",
        o.failures(),
        ctx()
    );
    let run = o
        .chunks
        .iter()
        .find(|ch| ch.stage == "run" && ch.state == "success")
        .unwrap_or_else(|| panic!("no run/success chunk{}", ctx()));
    let fs = harness::godaemon::parse_final_stage(&run.message)
        .unwrap_or_else(|e| panic!("the daemon cannot parse {:?}: {e}{}", run.message, ctx()));
    assert!(o.done, "no Done{}", ctx());
    let (name, endpoint) = o.installed.clone().unwrap_or_else(|| {
        panic!(
            "the daemon would not install it: {:?}{}",
            o.install_errors,
            ctx()
        )
    });
    assert!(
        o.install_errors.is_empty(),
        "{:?}{}",
        o.install_errors,
        ctx()
    );
    assert_eq!(
        (fs.name.as_str(), fs.endpoint.as_str()),
        (name.as_str(), endpoint.as_str())
    );
    assert!(!fs.id.is_empty(), "empty id{}", ctx());
    assert_capability_endpoint(&endpoint, &c.public_url(), &name);
    (name, endpoint)
}

/// `{public_url}/v1/functions/{name}/{token}`: a token of at least 128 bits, nothing the
/// daemon's launch parser splits on.
fn assert_capability_endpoint(endpoint: &str, public_url: &str, name: &str) {
    let prefix = format!("{public_url}/v1/functions/{name}/");
    let token = endpoint
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("endpoint {endpoint} is not under {prefix}"));
    assert!(
        token.len() * 6 >= 128
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "token {token:?} of {endpoint}"
    );
}

/// Invokes `action` with `data` in a fresh session.
async fn call(d: &GoDaemon, endpoint: &str, action: &str, data: Value) -> (String, InvokeOutcome) {
    let sid = session_id(action);
    let o = d
        .invoke(endpoint, action, &envelope(&sid, data), &sid)
        .await;
    (sid, o)
}

/// The response carried its own `end` (never the daemon's invented one), as the last line, in
/// the SDK's exact shape; every line is a well-formed event of this session.
fn assert_ended(o: &InvokeOutcome, sid: &str, c: &Connector) {
    let ctx = || format!("\n{}\nconnector logs:\n{}", o.transcript(), c.log_tail(40));
    assert_eq!(o.status, Some(200), "status{}", ctx());
    assert_eq!(o.attempts, 1, "retried{}", ctx());
    assert!(
        o.end_received() && !o.end_invented(),
        "end {:?}: the connector must send `end` itself{}",
        o.end,
        ctx()
    );
    assert_eq!(
        o.lines.last(),
        Some(&json!({"event":"session","session_id":sid,"data":{"type":"end","data":{}}})),
        "last line{}",
        ctx()
    );
    for l in &o.lines {
        let event = l["event"].as_str().unwrap_or_default();
        assert!(
            ["session", "log", "heartbeat"].contains(&event),
            "unexpected line {l}{}",
            ctx()
        );
        if event == "session" {
            assert_eq!(l["session_id"], sid, "session id of {l}{}", ctx());
        }
    }
    assert!(
        o.ignored.is_empty(),
        "ignored objects {:?}{}",
        o.ignored,
        ctx()
    );
}

fn validate_data(api_key: &str) -> Value {
    json!({"action": "validate_tool_credentials", "credentials": {"api_key": api_key},
           "provider": "sample", "type": "tool", "user_id": "u-test"})
}

#[tokio::test]
async fn ping_answers_pong() {
    let c = Connector::start();
    daemon(&c)
        .ping()
        .await
        .unwrap_or_else(|e| panic!("{e}\nlogs:\n{}", c.log_tail(20)));
}

#[tokio::test]
async fn instances_of_an_unknown_package_are_empty() {
    let c = Connector::start();
    let d = daemon(&c);
    let pkg = sample();
    assert_eq!(d.instances(&pkg.filename()).await.unwrap(), None);
    assert!(d.list_instances(None).await.unwrap().is_empty());
    // The raw answer, as the daemon decodes it: no error, an empty (not null) `Items`.
    let raw: Value = d
        .request(
            reqwest::Method::GET,
            &format!(
                "/v1/runner/instances?filename={}",
                harness::godaemon::query_escape(&pkg.filename())
            ),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(raw["error"], "", "{raw}");
    assert_eq!(raw["Items"], json!([]), "{raw}");
}

#[tokio::test]
async fn sample_plugin_launches_and_every_tool_answers() {
    let c = Connector::start();
    let d = daemon(&c);
    let pkg = sample();
    let (name, endpoint) = launch_ok(&c, &d, &pkg).await;

    // instances now finds it, under the same name and endpoint.
    let found = d
        .instances(&pkg.filename())
        .await
        .unwrap()
        .expect("instances finds the launched function");
    assert_eq!(
        (found.name.as_str(), found.endpoint.as_str()),
        (name.as_str(), endpoint.as_str())
    );
    assert!(
        !found.id.is_empty() && !found.resource_name.is_empty(),
        "{found:?}"
    );
    assert_eq!(d.list_instances(None).await.unwrap().len(), 1);

    // echo: one JSON message and one text message, verbatim from the SDK.
    let params = json!({"query": "dify", "n": 7});
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("sample", "echo", params.clone(), Some(DEMO_KEY)),
    )
    .await;
    assert_ended(&o, &sid, &c);
    let stream: Vec<&Value> = o
        .session_lines()
        .into_iter()
        .filter(|l| l["data"]["type"] == "stream")
        .collect();
    assert_eq!(
        stream,
        [
            &json!({"event":"session","session_id":sid,"data":{"type":"stream","data":
                {"type":"json","message":{"json_object":params},"meta":null}}}),
            &json!({"event":"session","session_id":sid,"data":{"type":"stream","data":
                {"type":"text","message":{"text":"{\"n\": 7, \"query\": \"dify\"}"},"meta":null}}}),
        ],
        "{}",
        o.transcript()
    );
    assert_eq!(o.result().unwrap().len(), 2);

    // stream n=3: three chunks, in order, each its own line.
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("sample", "stream", json!({"n": 3, "delay_ms": 50}), None),
    )
    .await;
    assert_ended(&o, &sid, &c);
    assert_eq!(
        o.texts(),
        ["chunk 0", "chunk 1", "chunk 2"],
        "{}",
        o.transcript()
    );
    for (i, l) in o
        .session_lines()
        .into_iter()
        .filter(|l| l["data"]["type"] == "stream")
        .enumerate()
    {
        assert_eq!(
            l,
            &json!({"event":"session","session_id":sid,"data":{"type":"stream","data":
                {"type":"text","message":{"text":format!("chunk {i}")},"meta":null}}})
        );
    }

    // whoami sees the credential, never echoes it.
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("sample", "whoami", json!({}), Some(DEMO_KEY)),
    )
    .await;
    assert_ended(&o, &sid, &c);
    assert_eq!(
        o.texts(),
        ["api_key credential is set"],
        "{}",
        o.transcript()
    );
    assert!(!o.transcript().contains(DEMO_KEY));

    // Credential validation: ok …
    let (sid, o) = call(
        &d,
        &endpoint,
        "validate_tool_credentials",
        validate_data(DEMO_KEY),
    )
    .await;
    assert_ended(&o, &sid, &c);
    assert_eq!(
        o.result().unwrap(),
        [json!({"result": true})],
        "{}",
        o.transcript()
    );

    // … and failure: the SDK's session error, then its end; the daemon reports the error.
    let (sid, o) = call(
        &d,
        &endpoint,
        "validate_tool_credentials",
        validate_data("wrong"),
    )
    .await;
    assert_ended(&o, &sid, &c);
    let errors = o.function_errors();
    assert_eq!(errors.len(), 1, "{}", o.transcript());
    assert_eq!(
        errors[0]["error_type"],
        "ToolProviderCredentialValidationError"
    );
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid api_key"),
        "{}",
        o.transcript()
    );
    assert!(
        decode_error_response(errors[0]).is_some(),
        "the daemon would drop this error (args must be a flat object of ≤ 10 keys): {}",
        errors[0]
    );
    let err_line = o
        .session_lines()
        .into_iter()
        .find(|l| l["data"]["type"] == "error")
        .unwrap();
    assert_eq!(err_line["event"], "session");
    assert_eq!(err_line["session_id"], sid);
    let e = o.result().unwrap_err();
    assert_eq!(e.error_type, "ToolProviderCredentialValidationError");
}

#[tokio::test]
async fn crashing_tool_is_a_process_exited_session_error() {
    let c = Connector::start();
    let d = daemon(&c);
    let (_, endpoint) = launch_ok(&c, &d, &Package::from_dir(&plugin_dir("faults"))).await;
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("faults", "crash", json!({}), None),
    )
    .await;
    assert_ended(&o, &sid, &c);
    let errors = o.function_errors();
    assert_eq!(errors.len(), 1, "one session error{}", o.transcript());
    assert_eq!(
        errors[0]["error_type"],
        "PluginProcessExited",
        "{}",
        o.transcript()
    );
    assert!(decode_error_response(errors[0]).is_some(), "{}", errors[0]);
    assert_eq!(o.result().unwrap_err().error_type, "PluginProcessExited");
    // The function recovers: the next call works (the plugin is restarted).
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("faults", "leak_secret", json!({}), Some("s3cr3t-value")),
    )
    .await;
    assert_ended(&o, &sid, &c);
    assert_eq!(o.texts(), ["ok"], "{}", o.transcript());
}

#[tokio::test]
async fn concurrent_launches_make_one_function() {
    let c = Connector::start();
    let d = daemon(&c);
    let pkg = sample();
    let started = std::time::Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let (d, pkg) = (d.clone(), pkg.clone());
        set.spawn(async move { d.launch_package(&pkg, false).await });
    }
    let mut names = Vec::new();
    while let Some(r) = set.join_next().await {
        let o = r
            .expect("task")
            .unwrap_or_else(|e| panic!("launch refused: {e}\nlogs:\n{}", c.log_tail(60)));
        assert_stream_clean(&o, &c);
        let (name, endpoint) = o
            .installed
            .clone()
            .unwrap_or_else(|| panic!("not installed: {:?}\n{}", o.install_errors, o.transcript()));
        assert_capability_endpoint(&endpoint, &c.public_url(), &name);
        names.push(name);
    }
    eprintln!(
        "10 concurrent launches took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 1, "one function name for all: {names:?}");
    let all = d.list_instances(None).await.unwrap();
    assert_eq!(all.len(), 1, "exactly one function: {all:?}");
    assert_eq!(all[0].name, names[0]);
    // And it works.
    let (sid, o) = call(
        &d,
        &all[0].endpoint,
        "invoke_tool",
        tool_data("sample", "stream", json!({"n": 2, "delay_ms": 0}), None),
    )
    .await;
    assert_ended(&o, &sid, &c);
    assert_eq!(o.texts(), ["chunk 0", "chunk 1"]);
}

#[tokio::test]
async fn wrong_or_missing_api_key_is_refused_with_the_variable_name() {
    let c = Connector::start();
    let pkg = sample();
    for key in [Some("wrong-key"), Some(""), None] {
        let d = c.daemon_with_key(key).with_launch_timeout(LAUNCH_BUDGET);
        // The daemon cannot even start.
        let e = d.ping().await.expect_err("ping with a bad key");
        eprintln!("ping with key {key:?}: {e}");
        for (method, path) in [
            (reqwest::Method::POST, "/ping".to_owned()),
            (
                reqwest::Method::GET,
                format!(
                    "/v1/runner/instances?filename={}",
                    harness::godaemon::query_escape(&pkg.filename())
                ),
            ),
            (reqwest::Method::GET, "/v1/runner/instances".to_owned()),
        ] {
            let r = d.request(method.clone(), &path).send().await.unwrap();
            let status = r.status().as_u16();
            let body = r.text().await.unwrap();
            assert_eq!(status, 401, "{method} {path} with key {key:?}: {body}");
            assert!(
                body.contains("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"),
                "{method} {path} with key {key:?}: the body must name the variable: {body}"
            );
        }
        let e = d
            .launch_package(&pkg, false)
            .await
            .expect_err("launch with a bad key");
        assert!(
            e.contains("status code: 401")
                && e.contains("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"),
            "launch with key {key:?}: {e}"
        );
    }
    // Nothing was launched.
    assert!(daemon(&c).list_instances(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn broken_packages_fail_with_a_reason_and_end() {
    let c = Connector::start();
    let d = daemon(&c);
    let sample_files = collect_dir(&plugin_dir("sample"));
    let with_manifest = |name: &str, edit: &dyn Fn(String) -> String, drop: &[&str]| {
        let files: Vec<(String, Vec<u8>)> = sample_files
            .iter()
            .filter(|(p, _)| !drop.contains(&p.as_str()))
            .map(|(p, b)| {
                if p == "manifest.yaml" {
                    let m = String::from_utf8(b.clone())
                        .unwrap()
                        .replace("name: sample", &format!("name: {name}"));
                    (p.clone(), edit(m).into_bytes())
                } else {
                    (p.clone(), b.clone())
                }
            })
            .collect();
        Package::from_files(&files)
    };
    let cases: Vec<(&str, Package, Vec<&str>)> = vec![
        (
            "not a zip",
            Package::from_zip(
                b"this is not a zip archive".to_vec(),
                "sri",
                "broken-nozip",
                "0.0.1",
            ),
            vec!["zip"],
        ),
        (
            "zip without manifest.yaml",
            Package::from_zip(
                zip_files(&[("main.py".into(), b"print(1)\n".to_vec())]),
                "sri",
                "broken-nomanifest",
                "0.0.1",
            ),
            vec!["manifest.yaml"],
        ),
        (
            "language: go",
            with_manifest(
                "broken-go",
                &|m| m.replace("language: python", "language: go"),
                &[],
            ),
            vec!["go", "python"],
        ),
        (
            "entrypoint module missing",
            with_manifest("broken-noentry", &|m| m, &["main.py"]),
            vec!["main.py"],
        ),
    ];
    for (what, pkg, words) in &cases {
        let o = d.launch_package(pkg, false).await.unwrap_or_else(|e| {
            panic!("{what}: launch refused (want HTTP 200 + failed line): {e}")
        });
        eprintln!(
            "{what}: {:?} in {:.2} s",
            o.failures(),
            o.elapsed.as_secs_f64()
        );
        assert_stream_clean(&o, &c);
        let failures = o.failures();
        assert!(
            failures.iter().any(|m| {
                let m = m.to_lowercase();
                words.iter().all(|w| m.contains(w))
            }),
            "{what}: no failed line mentioning {words:?}:\n{}",
            o.transcript()
        );
        assert!(
            o.installed.is_none(),
            "{what}: the daemon would install it\n{}",
            o.transcript()
        );
        assert!(
            o.chunks
                .iter()
                .all(|ch| !(ch.stage == "run" && ch.state == "success")),
            "{what}: run/success\n{}",
            o.transcript()
        );
        assert_eq!(d.instances(&pkg.filename()).await.unwrap(), None, "{what}");
    }
    assert!(d.list_instances(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn function_survives_a_connector_restart() {
    let mut c = Connector::start();
    let d = daemon(&c);
    let pkg = sample();
    let (name, endpoint) = launch_ok(&c, &d, &pkg).await;
    let echo = || tool_data("sample", "echo", json!({"q": "before"}), Some(DEMO_KEY));
    let (sid, o) = call(&d, &endpoint, "invoke_tool", echo()).await;
    assert_ended(&o, &sid, &c);

    let report = c.restart();
    eprintln!(
        "connector stopped in {:.2} s: {report:?}",
        report.took.as_secs_f64()
    );
    assert!(
        report.graceful,
        "no clean exit on SIGTERM: {report:?}\n{}",
        c.log_tail(40)
    );
    assert!(
        !report.strays,
        "processes left behind after the connector exited: {report:?}\n{}",
        c.log_tail(40)
    );

    // The daemon still holds the old endpoint and calls it straight away (no instances call,
    // no retry but on 502): the first call must already work.
    let started = std::time::Instant::now();
    let (sid, o) = call(&d, &endpoint, "invoke_tool", echo()).await;
    eprintln!(
        "first invoke after restart took {:.2} s: status {:?}, error {:?}",
        started.elapsed().as_secs_f64(),
        o.status,
        o.error.as_ref().map(|e| e.to_string())
    );
    if !o.end_received() {
        // Diagnose before failing: does the function come back at all, and when?
        let mut recovered = None;
        let deadline = started + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let (_, again) = call(&d, &endpoint, "invoke_tool", echo()).await;
            if again.end_received() {
                recovered = Some(started.elapsed());
                break;
            }
        }
        panic!(
            "the first invoke after a connector restart failed as the daemon sees it (it retries \
             only 502): {}; a later call {}\n{}\nconnector logs:\n{}",
            o.error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
            match recovered {
                Some(t) => format!("succeeded {:.2} s after the restart", t.as_secs_f64()),
                None => "still failed 60 s after the restart".into(),
            },
            o.transcript(),
            c.log_tail(30)
        );
    }
    assert_ended(&o, &sid, &c);
    assert_eq!(o.result().unwrap().len(), 2, "{}", o.transcript());

    let found = d
        .instances(&pkg.filename())
        .await
        .unwrap()
        .expect("still listed");
    assert_eq!((found.name, found.endpoint), (name, endpoint));
}

#[tokio::test]
async fn a_launch_cut_by_the_daemons_deadline_finishes_in_the_background() {
    let c = Connector::start();
    // A deadline far shorter than the build: the daemon gives up on the stream, as its 240 s
    // absolute deadline does with a slow install.
    let d = c.daemon().with_launch_timeout(Duration::from_millis(300));
    let pkg = sample();
    let o = d
        .launch_package(&pkg, false)
        .await
        .expect("launch accepted");
    assert!(
        o.deadline_hit,
        "the short deadline cut the stream:\n{}",
        o.transcript()
    );
    assert!(!o.done);
    // The build carries on; a later `instances` call finds the function.
    let d = daemon(&c);
    let deadline = std::time::Instant::now() + LAUNCH_BUDGET;
    let found = loop {
        if let Some(i) = d.instances(&pkg.filename()).await.unwrap() {
            break i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never deployed:\n{}",
            c.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // And a relaunch answers at once with the same function.
    let again = d.launch_package(&pkg, false).await.unwrap();
    assert!(again.done, "{}", again.transcript());
    assert!(
        again.elapsed < Duration::from_secs(2),
        "relaunch took {:?}",
        again.elapsed
    );
    let (name, _) = again.installed.clone().expect("installed");
    assert_eq!(name, found.name);
}

#[tokio::test]
async fn the_cli_lists_removes_and_garbage_collects() {
    let c = Connector::start();
    let d = daemon(&c);
    let (name, _) = launch_ok(&c, &d, &sample()).await;
    let sri = |args: &[&str]| {
        let out = std::process::Command::new(harness::sri::sri_bin())
            .args(args)
            .env("SRI_URL", c.url())
            .env(
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY",
                harness::sri::API_KEY,
            )
            .output()
            .expect("run sri");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = sri(&["list"]);
    assert!(ok && out.contains(&name), "{out}{err}");
    // `sri invoke` calls the capability endpoint the control plane hands out.
    let (ok, out, err) = sri(&[
        "invoke",
        &name,
        "--provider",
        "sample",
        "--tool",
        "echo",
        "--params",
        r#"{"text":"from the cli"}"#,
        "--credentials",
        &json!({"api_key": DEMO_KEY}).to_string(),
    ]);
    assert!(ok && out.contains("from the cli"), "sri invoke: {out}{err}");
    let (ok, out, err) = sri(&["gc", "--keep", "1"]);
    assert!(
        ok && !out.contains(&name),
        "gc keeps the only version: {out}{err}"
    );
    let (ok, _, err) = sri(&["remove", &name]);
    assert!(ok, "{err}");
    assert!(
        !c.data_dir().join("functions").join(&name).exists(),
        "its directory is gone"
    );
    assert!(d.list_instances(None).await.unwrap().is_empty());
    let (ok, _, err) = sri(&["remove", &name]);
    assert!(!ok && err.contains("no function named"), "{err}");
}

/// The sample plugin renamed `name`, without requirements.txt and with `pyproject` as its
/// pyproject.toml when given.
fn sample_variant(name: &str, pyproject: Option<&str>) -> Package {
    let mut files: Vec<(String, Vec<u8>)> = collect_dir(&plugin_dir("sample"))
        .into_iter()
        .filter(|(p, _)| pyproject.is_none() || p != "requirements.txt")
        .map(|(p, b)| {
            if p == "manifest.yaml" {
                let m = String::from_utf8(b).unwrap();
                (
                    p,
                    m.replace("name: sample", &format!("name: {name}"))
                        .into_bytes(),
                )
            } else {
                (p, b)
            }
        })
        .collect();
    if let Some(text) = pyproject {
        files.push(("pyproject.toml".into(), text.as_bytes().to_vec()));
    }
    Package::from_files(&files)
}

/// A PEP 621 pyproject.toml with the sample's dependency (what `requirements.txt` says).
const PYPROJECT: &str = r#"[project]
name = "sample"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["dify_plugin>=0.7.4,<0.11"]
"#;

#[tokio::test]
async fn dependencies_install_with_pip_or_uv_from_requirements_or_pyproject() {
    let echo = || tool_data("sample", "echo", json!({"q": "deps"}), Some(DEMO_KEY));
    // pip (SRI_INSTALLER=pip): requirements.txt, then a plugin with only pyproject.toml.
    let c = Connector::start_with(
        harness::sri::ConnectorOptions::default().env("SRI_INSTALLER", "pip"),
    );
    let d = daemon(&c);
    for pkg in [
        sample_variant("sample-pip", None),
        sample_variant("sample-pip-pyproject", Some(PYPROJECT)),
    ] {
        let (_, endpoint) = launch_ok(&c, &d, &pkg).await;
        let (sid, o) = call(&d, &endpoint, "invoke_tool", echo()).await;
        assert_ended(&o, &sid, &c);
        assert_eq!(o.result().unwrap().len(), 2, "{}", o.transcript());
    }
    // A pyproject-only plugin that runs at all had its dependencies installed (there is no
    // dify_plugin otherwise), and venvs made for pip carry pip (uv's do not).
    assert_eq!(venvs_with_pip(&c), 2, "both venvs were made for pip");
    // Dependencies pip cannot be told: a dynamic list is refused, naming the fix.
    let dynamic = sample_variant(
        "sample-dynamic",
        Some("[project]\nname = \"x\"\nversion = \"0\"\ndynamic = [\"dependencies\"]\n"),
    );
    let o = d.launch_package(&dynamic, false).await.expect("HTTP 200");
    assert_stream_clean(&o, &c);
    assert!(
        o.failures()
            .iter()
            .any(|m| m.contains("dynamic") && m.contains("requirements.txt")),
        "{}",
        o.transcript()
    );
    assert!(o.installed.is_none(), "{}", o.transcript());
    drop(c);

    // uv (the default when there is one): the pyproject-only plugin too.
    let c = Connector::start();
    let d = daemon(&c);
    let (_, endpoint) = launch_ok(
        &c,
        &d,
        &sample_variant("sample-uv-pyproject", Some(PYPROJECT)),
    )
    .await;
    let (sid, o) = call(&d, &endpoint, "invoke_tool", echo()).await;
    assert_ended(&o, &sid, &c);
    assert_eq!(venvs_with_pip(&c), 0, "the venv was made by uv");
}

/// Plugins whose names clean to one string (`acme/foo_bar`, `acme/foo-bar`, `acme-foo/bar`) get
/// one function each, and every call reaches the plugin it was made for.
#[tokio::test]
async fn plugins_whose_names_clean_alike_get_their_own_functions_and_calls() {
    let c = Connector::start();
    let d = daemon(&c);
    let mut launched = Vec::new();
    for (author, name) in [
        ("acme", "foo_bar"),
        ("acme", "foo-bar"),
        ("acme-foo", "bar"),
    ] {
        let pkg = Package::from_files(&sample_as(author, name, "0.1.0", true));
        let (function, endpoint) = launch_ok(&c, &d, &pkg).await;
        assert_eq!(
            function,
            connector::backend::local_function_name(author, name, &pkg.checksum)
        );
        assert!(
            connector::backend::is_function_name(&function),
            "{function}"
        );
        launched.push((format!("{author}/{name}"), function, endpoint));
    }
    let mut functions: Vec<&String> = launched.iter().map(|(_, f, _)| f).collect();
    functions.sort();
    functions.dedup();
    assert_eq!(functions.len(), 3, "one function per plugin: {launched:?}");
    // Call them interleaved: each answers as itself.
    for _round in 0..2 {
        for (plugin, _, endpoint) in &launched {
            let (sid, o) = call(
                &d,
                endpoint,
                "invoke_tool",
                tool_data("sample", "stream", json!({"n": 2, "delay_ms": 0}), None),
            )
            .await;
            assert_ended(&o, &sid, &c);
            assert_eq!(
                o.texts(),
                [format!("{plugin} 0"), format!("{plugin} 1")],
                "{}",
                o.transcript()
            );
        }
    }
}

/// A function directory whose `meta.json` names another package is never reused for a package
/// that maps to the same name: the launch fails naming both checksums, and nothing is touched.
#[tokio::test]
async fn a_function_is_reused_only_for_the_same_checksum() {
    let c = Connector::start();
    let d = daemon(&c);
    let pkg = Package::from_files(&sample_as("acme", "reuse", "0.1.0", true));
    let name = connector::backend::local_function_name("acme", "reuse", &pkg.checksum);
    let other = "f".repeat(64);
    let dir = c.data_dir().join("functions").join(&name);
    std::fs::create_dir_all(&dir).expect("function dir");
    let meta = json!({"function": {"name": name, "identifier": format!("acme/reuse:0.0.9@{other}"),
                      "checksum": other}, "created_at": 1});
    std::fs::write(dir.join("meta.json"), meta.to_string()).expect("meta.json");
    let o = d
        .launch_package(&pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", c.log_tail(40)));
    assert_stream_clean(&o, &c);
    let failures = o.failures().join("\n");
    assert!(
        failures.contains(&other) && failures.contains(&pkg.checksum),
        "the failure names both checksums: {failures}\n{}",
        o.transcript()
    );
    assert!(o.installed.is_none(), "{}", o.transcript());
    assert!(
        !dir.join("plugin").exists() && !dir.join("venv").exists(),
        "the other package's function was touched"
    );
}

/// How many of the connector's functions have a venv with its own pip.
fn venvs_with_pip(c: &Connector) -> usize {
    let functions = c.data_dir().join("functions");
    std::fs::read_dir(&functions)
        .unwrap_or_else(|e| panic!("{}: {e}", functions.display()))
        .filter_map(Result::ok)
        .filter(|f| f.path().join("venv/bin/pip").exists())
        .count()
}

/// The sample plugin renamed `name`, with `file` (`requirements.txt` or `pyproject.toml`) set
/// to `text` and the other dependency file left out.
fn sample_with_dependencies(name: &str, file: &str, text: &str) -> Package {
    let mut files: Vec<(String, Vec<u8>)> = collect_dir(&plugin_dir("sample"))
        .into_iter()
        .filter(|(p, _)| p != "requirements.txt" && p != "pyproject.toml")
        .map(|(p, b)| match p.as_str() {
            "manifest.yaml" => {
                let m = String::from_utf8(b).unwrap();
                let m = m.replace("name: sample", &format!("name: {name}"));
                (p, m.into_bytes())
            }
            _ => (p, b),
        })
        .collect();
    files.push((file.into(), text.as_bytes().to_vec()));
    Package::from_files(&files)
}

/// Dependency files are data, never options: `-r /proc/self/environ`, a `file://` reference and
/// a pyproject `--index-url` fail the launch with the file, the line and the rule before any
/// installer runs. A canary in the connector's environment reaches no launch line, no log line,
/// no installer invocation (uv is spied on through SRI_UV) and nothing in the built function,
/// and a good package still installs through the same path.
#[tokio::test]
async fn dependency_files_are_data_and_the_connectors_environment_stays_home() {
    let canary = format!(
        "sri-canary-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let spy_dir = harness::sri::TempDir::new("uv-spy");
    let (spy, calls) = harness::sri::uv_spy(spy_dir.path());
    let c = Connector::start_with(
        harness::sri::ConnectorOptions::default()
            .env("SRI_UV", spy.display().to_string())
            .env("SRI_TEST_CANARY", &canary),
    );
    let d = daemon(&c);
    let hostile = [
        (
            sample_with_dependencies(
                "reqs-environ",
                "requirements.txt",
                "-r /proc/self/environ\n",
            ),
            vec!["requirements.txt line 1:", "`-r`", "another file"],
        ),
        (
            sample_with_dependencies(
                "reqs-file-url",
                "requirements.txt",
                "# pinned\ndify_plugin>=0.7.4,<0.11 \\\n  ; python_version >= '3.8'\nfoo @ file:///etc/passwd\n",
            ),
            vec!["requirements.txt line 4:", "direct URL reference"],
        ),
        (
            sample_with_dependencies(
                "reqs-pyproject-index",
                "pyproject.toml",
                "[project]\nname = \"x\"\nversion = \"0.1\"\ndependencies = [\n  \"dify_plugin>=0.7.4\",\n  \"--index-url=http://127.0.0.1:9/simple\",\n]\n",
            ),
            vec!["pyproject.toml line 6:", "`--index-url`", "SRI_INDEX_URL"],
        ),
    ];
    let mut transcripts = String::new();
    for (pkg, words) in &hostile {
        let o = d.launch_package(pkg, false).await.expect("HTTP 200");
        assert_stream_clean(&o, &c);
        let failures = o.failures();
        assert!(
            failures.iter().any(|m| words.iter().all(|w| m.contains(w))),
            "{}: no failed line with {words:?}:\n{}",
            pkg.name,
            o.transcript()
        );
        assert!(o.installed.is_none(), "{}", o.transcript());
        transcripts.push_str(&o.transcript());
    }
    assert!(
        !calls.exists(),
        "an installer ran for a refused package:\n{}",
        std::fs::read_to_string(&calls).unwrap_or_default()
    );

    // A good package goes through the spy: venv, then the install of the parsed list.
    let (_, endpoint) = launch_ok(&c, &d, &sample()).await;
    let (sid, o) = call(
        &d,
        &endpoint,
        "invoke_tool",
        tool_data("sample", "echo", json!({"q": "deps"}), Some(DEMO_KEY)),
    )
    .await;
    assert_ended(&o, &sid, &c);
    let spied = std::fs::read_to_string(&calls).expect("uv was called");
    let invocations: Vec<&str> = spied.split("----\n").filter(|s| !s.is_empty()).collect();
    assert!(invocations.len() >= 2, "venv + install:\n{spied}");
    let install = invocations
        .iter()
        .find(|i| i.starts_with("argv: [pip] [install]"))
        .unwrap_or_else(|| panic!("no uv pip install:\n{spied}"));
    assert!(
        install.contains("sri-requirements.txt]") && !install.contains("plugin/requirements.txt"),
        "uv reads the connector's parsed list, never the package's file:\n{install}"
    );
    for inv in &invocations {
        for var in [
            "SRI_SIGNING_KEYS=",
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY=",
            "SRI_TEST_CANARY=",
            "SRI_DATA_DIR=",
        ] {
            assert!(!inv.contains(var), "{var} reached the installer:\n{inv}");
        }
        assert!(
            inv.contains("\nHOME=") && inv.contains(".home-"),
            "scratch HOME:\n{inv}"
        );
    }
    assert!(!spied.contains(&canary), "the canary reached the installer");
    transcripts.push_str(&o.transcript());
    assert!(
        !transcripts.contains(&canary),
        "the canary reached a launch or invoke line"
    );
    let logs = c.logs().join("\n");
    assert!(
        !logs.contains(&canary),
        "the canary reached the connector's logs"
    );
    let leaked = harness::files_containing(&c.data_dir().join("functions"), canary.as_bytes());
    assert!(
        leaked.is_empty(),
        "the canary reached the function: {leaked:?}"
    );
}

/// The index is the operator's (`SRI_INDEX_URL`), and its credentials never reach the daemon:
/// an index that refuses connections fails the install, the failed line says where uv went,
/// and the password in the URL is not in it, nor in the connector's logs.
#[tokio::test]
async fn the_operators_index_is_used_and_its_credentials_are_never_echoed() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let password = format!("pw-{}-secret", std::process::id());
    let c = Connector::start_with(harness::sri::ConnectorOptions::default().env(
        "SRI_INDEX_URL",
        format!("http://sri:{password}@127.0.0.1:{port}/simple"),
    ));
    let d = daemon(&c);
    let pkg = sample_with_dependencies(
        "reqs-operator-index",
        "requirements.txt",
        "dify_plugin>=0.7.4,<0.11\n",
    );
    let o = d.launch_package(&pkg, false).await.expect("HTTP 200");
    eprintln!("failed lines: {:?}", o.failures());
    assert_stream_clean(&o, &c);
    assert!(o.installed.is_none(), "{}", o.transcript());
    assert!(
        o.failures().iter().any(|m| m
            .contains("installing the dependencies from requirements.txt failed")
            && m.contains(&format!("127.0.0.1:{port}"))),
        "{}",
        o.transcript()
    );
    assert!(!o.transcript().contains(&password), "{}", o.transcript());
    assert!(
        !c.logs().join("\n").contains(&password),
        "{}",
        c.log_tail(40)
    );
}
