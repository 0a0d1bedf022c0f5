//! What only the emulator backend (`SRI_BACKEND=emulator`: the exact Lambda zip under cargo
//! lambda) must show, driven as the Go daemon drives the connector: compiled dependencies from
//! manylinux wheels with no interpreter site-packages, a plugin that writes into its own
//! directory failing as on Lambda, the function timeout, and init errors in the launch stream.
//! The shared connector tests run on this backend too (`SRI_TEST_BACKEND=emulator`).

use harness::difypkg::{Package, collect_dir};
use harness::godaemon::{GoDaemon, LaunchOutcome};
use harness::sri::{Connector, ConnectorOptions};
use harness::{envelope, plugin_dir, session_id, tool_data};
use serde_json::json;
use std::time::{Duration, Instant};

/// Per-launch budget (a first launch installs the SDK for the target; later ones hit caches).
const LAUNCH_BUDGET: Duration = Duration::from_secs(240);

fn daemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(LAUNCH_BUDGET)
        .with_execution_timeout(Duration::from_secs(120))
}

/// The sample plugin with `edit` applied to its files (path, content).
fn sample_with(edit: impl Fn(&str, Vec<u8>) -> Vec<u8>) -> Package {
    let files: Vec<(String, Vec<u8>)> = collect_dir(&plugin_dir("sample"))
        .into_iter()
        .map(|(path, content)| {
            let content = edit(&path, content);
            (path, content)
        })
        .collect();
    Package::from_files(&files)
}

/// A sample variant named `name` whose `main.py` starts with `prelude`, with `extra` lines
/// appended to its requirements.
fn variant(name: &str, prelude: &str, extra: &str) -> Package {
    sample_with(|path, content| {
        let text = String::from_utf8(content.clone()).unwrap_or_default();
        match path {
            "manifest.yaml" => text
                .replacen("\nname: sample\n", &format!("\nname: {name}\n"), 1)
                .into_bytes(),
            "main.py" => format!("{prelude}\n{text}").into_bytes(),
            "requirements.txt" => format!("{text}{extra}\n").into_bytes(),
            _ => content,
        }
    })
}

async fn launch(c: &Connector, pkg: &Package) -> LaunchOutcome {
    let o = daemon(c)
        .launch_package(pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", c.log_tail(60)));
    assert!(
        o.done || !o.failures().is_empty(),
        "the stream did not end\n{}",
        o.transcript()
    );
    o
}

async fn launch_ok(c: &Connector, pkg: &Package) -> (String, String, LaunchOutcome) {
    let o = launch(c, pkg).await;
    let ctx = || format!("\n{}\nconnector logs:\n{}", o.transcript(), c.log_tail(60));
    assert!(
        o.failures().is_empty(),
        "failed: {:?}{}",
        o.failures(),
        ctx()
    );
    let (name, endpoint) = o
        .installed
        .clone()
        .unwrap_or_else(|| panic!("not installed{}", ctx()));
    (name, endpoint, o)
}

fn messages(o: &LaunchOutcome) -> String {
    o.chunks
        .iter()
        .map(|ch| format!("{}/{}: {}\n", ch.stage, ch.state, ch.message))
        .collect()
}

#[tokio::test]
async fn compiled_dependencies_come_from_manylinux_wheels_in_the_zip() {
    let c = Connector::start_with(ConnectorOptions::emulator());
    // The stand-in for the managed runtime has no numpy of its own: only the zip can bring it.
    let bare = harness::sri::emulator_env()
        .into_iter()
        .find(|(k, _)| k == "SRI_EMULATOR_PYTHON")
        .unwrap()
        .1;
    let probe = std::process::Command::new(&bare)
        .args(["-c", "import numpy"])
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "{bare} has numpy of its own: the test would prove nothing"
    );

    let pkg = variant(
        "sample_numpy",
        "import numpy\nassert numpy.__file__.startswith(__import__('os').environ['LAMBDA_TASK_ROOT']), numpy.__file__",
        "numpy>=2,<3",
    );
    let (name, endpoint, o) = launch_ok(&c, &pkg).await;
    // The stream says what happened: packaging, the emulator, the function's init.
    let said = messages(&o);
    for needle in [
        "Lambda zip for python3.12",
        "cargo lambda watch",
        "function initialized",
    ] {
        assert!(
            said.contains(needle),
            "no {needle:?} in the launch stream:\n{said}"
        );
    }
    let vendor = c
        .data_dir()
        .join("emulator")
        .join(&name)
        .join("task/vendor/numpy");
    let so = harness::files_containing(&vendor, b"\x7fELF");
    assert!(
        !so.is_empty(),
        "no compiled extension under {}",
        vendor.display()
    );

    let sid = session_id("np");
    let data = tool_data("sample", "echo", json!({"q": 1}), Some("sri-demo-key"));
    let out = daemon(&c)
        .invoke(&endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    assert!(out.function_errors().is_empty(), "{}", out.transcript());
    assert_eq!(out.result().unwrap().len(), 2, "{}", out.transcript());

    // Another connector on the same package cache: the zip is a cache hit, and it says so.
    drop(c);
    let c = Connector::start_with(ConnectorOptions::emulator());
    let (_, _, o) = launch_ok(&c, &pkg).await;
    let said = messages(&o);
    assert!(
        said.contains("cached Lambda zip"),
        "no cache hit in the launch stream:\n{said}"
    );
}

#[tokio::test]
async fn writing_into_the_package_at_import_fails_as_on_lambda() {
    let c = Connector::start_with(ConnectorOptions::emulator());
    let pkg = variant(
        "sample_writer",
        "import os\nopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cache.json'), 'w').write('{}')",
        "",
    );
    let o = launch(&c, &pkg).await;
    let failures = o.failures().join("\n");
    assert!(
        failures.contains("Read-only file system"),
        "the failure does not say Lambda's error:\n{}\nconnector logs:\n{}",
        o.transcript(),
        c.log_tail(40)
    );
    assert!(failures.contains("Runtime.InitError"), "{failures}");
    assert!(o.installed.is_none(), "{}", o.transcript());
}

#[tokio::test]
async fn an_init_error_reaches_the_daemon_with_the_python_error() {
    let c = Connector::start_with(ConnectorOptions::emulator());
    let o = launch(&c, &Package::from_dir(&plugin_dir("import_error"))).await;
    let failures = o.failures().join("\n");
    assert!(
        failures.contains("ModuleNotFoundError") && failures.contains("this_module_does_not_exist"),
        "{}\nconnector logs:\n{}",
        o.transcript(),
        c.log_tail(40)
    );
    // Nothing is left running or half-made: the next launch starts from scratch.
    assert!(daemon(&c).list_instances(None).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_call_past_the_function_timeout_is_a_plugin_timeout_and_the_next_succeeds() {
    // Lambda's timeout of 4 s gives the plugin 2 s (what the Lambda backend sets too); the
    // emulator's own deadline is 600 s.
    let c = Connector::start_with(ConnectorOptions::emulator().env("SRI_LAMBDA_TIMEOUT_S", "4"));
    let (_, endpoint, _) = launch_ok(
        &c,
        &harness::difypkg::Package::from_dir(&plugin_dir("sample")),
    )
    .await;
    let d = daemon(&c);
    let sid = session_id("slow");
    let data = tool_data("sample", "stream", json!({"n": 2, "delay_ms": 20000}), None);
    let started = Instant::now();
    let out = d
        .invoke(&endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    let took = started.elapsed();
    let errors = out.function_errors();
    assert_eq!(errors.len(), 1, "{}", out.transcript());
    assert_eq!(
        errors[0]["error_type"],
        "PluginTimeout",
        "{}",
        out.transcript()
    );
    assert!(took < Duration::from_secs(15), "the timeout took {took:?}");

    let sid = session_id("next");
    let data = tool_data("sample", "stream", json!({"n": 2, "delay_ms": 10}), None);
    let out = d
        .invoke(&endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    assert_eq!(out.texts(), ["chunk 0", "chunk 1"], "{}", out.transcript());
}
