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

/// A tool that says where `packaging` (a small pure-Python dependency of `dify_plugin`) and the
/// SDK itself were imported from, and which version of `packaging` the resolution gave.
const WHERE_FROM: &str = r#"import importlib.metadata
from collections.abc import Generator
from typing import Any
import json

import dify_plugin
import packaging
from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


def write_into_the_sdk():
    import os
    try:
        with open(os.path.join(os.path.dirname(dify_plugin.__file__), "planted.py"), "w") as f:
            f.write("x = 1\n")
        return "written"
    except OSError as e:
        return str(e)


class EchoTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        yield self.create_text_message(json.dumps({
            "sdk_write": write_into_the_sdk(),
            "packaging_file": packaging.__file__,
            "packaging_version": packaging.__version__,
            "packaging_metadata": importlib.metadata.version("packaging"),
            "sdk_file": dify_plugin.__file__,
        }))
"#;

/// The sample plugin named `name` whose echo tool reports [`WHERE_FROM`], with `extra`
/// appended to its requirements.
fn where_from(name: &str, extra: &str) -> Package {
    sample_with(|path, content| {
        let text = String::from_utf8(content.clone()).unwrap_or_default();
        match path {
            "manifest.yaml" => text
                .replacen("\nname: sample\n", &format!("\nname: {name}\n"), 1)
                .into_bytes(),
            "tools/echo.py" => WHERE_FROM.as_bytes().to_vec(),
            "requirements.txt" => format!("{text}{extra}\n").into_bytes(),
            _ => content,
        }
    })
}

async fn report(c: &Connector, endpoint: &str) -> serde_json::Value {
    let sid = session_id("where");
    let data = tool_data("sample", "echo", json!({}), None);
    let out = daemon(c)
        .invoke(endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    let texts = out.texts();
    assert_eq!(texts.len(), 1, "{}", out.transcript());
    serde_json::from_str(&texts[0]).unwrap_or_else(|e| panic!("{e}: {}", texts[0]))
}

#[tokio::test]
async fn the_sdk_layer_serves_the_sdk_and_a_plugins_own_pin_wins() {
    // No grace: gc below may remove the layer as soon as no function names it.
    let c = Connector::start_with(
        ConnectorOptions::emulator().env("SRI_EMULATOR_LAYER_GRACE_SECS", "0"),
    );
    let layers = c.data_dir().join("emulator").join("layers");

    let (plain_name, plain_endpoint, o) = launch_ok(&c, &where_from("layer_plain", "")).await;
    let said = messages(&o);
    assert!(
        said.contains("SDK layer"),
        "the launch stream does not mention the SDK layer:\n{said}"
    );
    let plain = report(&c, &plain_endpoint).await;
    let layer_dirs: Vec<_> = std::fs::read_dir(&layers)
        .unwrap_or_else(|e| panic!("{}: {e}", layers.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    assert_eq!(layer_dirs.len(), 1, "one unpacked layer: {layer_dirs:?}");
    let layer_site = layer_dirs[0].join("python");
    for key in ["packaging_file", "sdk_file"] {
        let file = plain[key].as_str().unwrap();
        assert!(
            file.starts_with(layer_site.to_str().unwrap()),
            "an unpinned plugin imports {key} from the layer ({}), not {file}",
            layer_site.display()
        );
    }
    // The layer is shared by every function of it: no plugin may change it for the others.
    let write = plain["sdk_write"].as_str().unwrap();
    assert!(
        write.contains("Read-only file system"),
        "writing into the shared layer: {write}"
    );
    let layer_packaging = plain["packaging_version"].as_str().unwrap().to_owned();
    assert_ne!(
        layer_packaging, "26.2",
        "the layer holds packaging 26.2 itself: the pin below would prove nothing"
    );
    let task = |name: &str| c.data_dir().join("emulator").join(name).join("task");
    assert!(
        !task(&plain_name).join("vendor/dify_plugin").exists(),
        "the SDK is not in the plugin's own zip"
    );

    let (pinned_name, pinned_endpoint, _) =
        launch_ok(&c, &where_from("layer_pinned", "packaging==26.2")).await;
    let pinned = report(&c, &pinned_endpoint).await;
    let vendor = task(&pinned_name).join("vendor");
    let file = pinned["packaging_file"].as_str().unwrap();
    assert!(
        file.starts_with(vendor.to_str().unwrap()),
        "the pinned plugin imports its own packaging from {}, not {file}",
        vendor.display()
    );
    assert_eq!(pinned["packaging_version"], "26.2", "{pinned}");
    assert_eq!(pinned["packaging_metadata"], "26.2", "{pinned}");
    assert!(
        pinned["sdk_file"]
            .as_str()
            .unwrap()
            .starts_with(layer_site.to_str().unwrap()),
        "the pinned plugin still takes the SDK from the same layer: {pinned}"
    );
    let count = std::fs::read_dir(&layers)
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .count();
    assert_eq!(count, 1, "both plugins share one unpacked layer");

    // gc keeps the layer while a function names it, and removes it with the last one.
    let layer_name = format!(
        "sdk-layer-{}",
        layer_dirs[0].file_name().unwrap().to_string_lossy()
    );
    let http = reqwest::Client::new();
    let gc = || async {
        let r = http
            .post(format!("{}/v1/gc?keep=1", c.url()))
            .header("authorization", harness::sri::API_KEY)
            .send()
            .await
            .expect("POST /v1/gc");
        assert!(r.status().is_success(), "gc: {}", r.status());
        r.text().await.unwrap()
    };
    let removed = gc().await;
    assert!(
        !removed.contains(&layer_name),
        "gc removed a used layer: {removed}"
    );
    assert!(layer_dirs[0].is_dir());
    for name in [&plain_name, &pinned_name] {
        let r = http
            .delete(format!("{}/v1/functions/{name}", c.url()))
            .header("authorization", harness::sri::API_KEY)
            .send()
            .await
            .expect("DELETE /v1/functions");
        assert!(r.status().is_success(), "delete {name}: {}", r.status());
    }
    let removed = gc().await;
    assert!(
        removed.contains(&layer_name),
        "gc removed {removed}, not {layer_name}"
    );
    assert!(!layer_dirs[0].exists(), "the unused layer is gone");
}
