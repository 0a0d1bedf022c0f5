//! Hostile packages (`harness::hostile`, generated at test time) against the one intake:
//! through the daemon-exact client and through `sri package`, every one is refused with a
//! message naming the problem, the connector's memory stays bounded, nothing is left on disk,
//! a canary in the connector's environment never shows up anywhere, and the next good launch
//! still works.

use harness::benchmarks::status_kib;
use harness::difypkg::Package;
use harness::godaemon::GoDaemon;
use harness::hostile::{self, RawEntry};
use harness::sri::{Connector, ConnectorOptions};
use harness::{bootstrap_bin, envelope, plugin_dir, session_id, tool_data};
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The deflate bomb's size: the issue asks for more than 10 GiB.
const BOMB_GIB: u64 = 11;

fn daemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(Duration::from_secs(180))
        .with_execution_timeout(Duration::from_secs(120))
}

fn canary() -> String {
    format!("sri-canary-{}", harness::nonce())
}

/// What is left in a directory (names), if it exists.
fn listing(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_hostile_package_is_refused_and_leaves_nothing() {
    let canary = canary();
    let c = Connector::start_with(ConnectorOptions::default().env("SRI_TEST_CANARY", &canary));
    let d = daemon(&c);
    d.ping().await.expect("ping");
    let pid = c.pid().expect("pid");
    let rss_before = status_kib(pid, "VmRSS:");
    let corpus = hostile::corpus(BOMB_GIB);
    let mut transcripts = String::new();
    for case in &corpus {
        let pkg = Package::from_zip(case.bytes.clone(), "sri", "sample", "0.1.0");
        let o = d
            .launch(&pkg.bytes, &pkg.filename(), false, &pkg.unique_identifier())
            .await
            .unwrap_or_else(|e| panic!("{}: launch refused (want a failed line): {e}", case.what));
        let t = o.transcript();
        eprintln!(
            "{}: {:?} in {:.2} s (connector peak RSS {} KiB)",
            case.what,
            o.failures(),
            o.elapsed.as_secs_f64(),
            status_kib(pid, "VmHWM:")
        );
        assert!(
            o.failures().iter().any(|m| {
                let m = m.to_lowercase();
                case.words.iter().all(|w| m.contains(w))
            }),
            "{}: no failed line with {:?}:\n{t}\nlogs:\n{}",
            case.what,
            case.words,
            c.log_tail(20)
        );
        assert!(o.installed.is_none(), "{}: installed\n{t}", case.what);
        assert_eq!(
            o.chunks.last().map(|c| c.stage.as_str()),
            Some("end"),
            "{}",
            case.what
        );
        transcripts.push_str(&t);
    }

    // The daemon's claims about a good package must match it.
    let good = Package::from_dir(&plugin_dir("sample"));
    let other = "0".repeat(64);
    for (what, filename, identifier, word) in [
        (
            "checksum in the filename",
            format!("sri@sample@0.1.0@{other}.difypkg"),
            good.unique_identifier(),
            "filename",
        ),
        (
            "checksum in the metadata",
            good.filename(),
            format!("sri/sample:0.1.0@{other}"),
            "metadata",
        ),
    ] {
        let o = d
            .launch(&good.bytes, &filename, false, &identifier)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            o.failures()
                .iter()
                .any(|m| m.contains(word) && m.contains(&other)),
            "{what}: no failed line naming the {word}:\n{}",
            o.transcript()
        );
        assert!(o.installed.is_none(), "{what}: installed");
        transcripts.push_str(&o.transcript());
    }

    let peak = status_kib(pid, "VmHWM:");
    eprintln!(
        "connector RSS {} KiB before the corpus, peak {} KiB",
        rss_before, peak
    );
    assert!(
        peak.saturating_sub(rss_before) < 64 * 1024,
        "the connector's memory grew by {} KiB during the corpus (limit 64 MiB)",
        peak - rss_before
    );
    // Nothing left behind: no unpacked tree, no half-built function.
    assert!(
        listing(&c.data_dir().join("intake")).is_empty(),
        "left in intake/: {:?}",
        listing(&c.data_dir().join("intake"))
    );
    assert!(
        listing(&c.data_dir().join("functions")).is_empty(),
        "left in functions/: {:?}",
        listing(&c.data_dir().join("functions"))
    );
    assert!(d.list_instances(None).await.unwrap().is_empty());

    // The connector keeps serving: the next good launch installs and answers.
    let o = d.launch_package(&good, false).await.expect("good launch");
    let (_, endpoint) = o.installed.clone().unwrap_or_else(|| {
        panic!(
            "the good package after the corpus: {}\nlogs:\n{}",
            o.transcript(),
            c.log_tail(40)
        )
    });
    transcripts.push_str(&o.transcript());
    let sid = session_id("after-corpus");
    let call = d
        .invoke(
            &endpoint,
            "invoke_tool",
            &envelope(
                &sid,
                tool_data(
                    "sample",
                    "echo",
                    json!({"q": "still here"}),
                    Some("sri-demo-key"),
                ),
            ),
            &sid,
        )
        .await;
    assert!(
        call.texts().concat().contains("still here"),
        "{}",
        call.transcript()
    );

    // The canary is nowhere: launch lines, logs, the function's files and venv.
    assert!(!transcripts.contains(&canary), "canary in a launch line");
    assert!(
        !c.logs().iter().any(|l| l.contains(&canary)),
        "canary in the connector's logs"
    );
    let hits = harness::files_containing(c.data_dir(), canary.as_bytes());
    assert!(hits.is_empty(), "canary in {hits:?}");
}

#[test]
fn sri_package_refuses_every_hostile_package() {
    let work = harness::sri::TempDir::new("hostile-package");
    let canary = canary();
    for (i, case) in hostile::corpus(BOMB_GIB).iter().enumerate() {
        let input = work.path().join(format!("case-{i}.difypkg"));
        std::fs::write(&input, &case.bytes).expect("write case");
        let out = work.path().join(format!("case-{i}.zip"));
        let run = Command::new(harness::sri::sri_bin())
            .args([
                "package",
                "--arch",
                "x86_64",
                "--python",
                "3.12",
                "--no-bytecode",
            ])
            .arg("--bootstrap")
            .arg(bootstrap_bin())
            .arg("-o")
            .arg(&out)
            .arg(&input)
            .env("SRI_CACHE_DIR", work.path().join("cache"))
            .env("SRI_UV", harness::root().join(".venv/tools/bin/uv"))
            .env("SRI_TEST_CANARY", &canary)
            .output()
            .expect("run sri package");
        let stderr = String::from_utf8_lossy(&run.stderr).to_lowercase();
        assert!(
            !run.status.success(),
            "{}: sri package succeeded",
            case.what
        );
        assert!(
            case.words.iter().all(|w| stderr.contains(w)),
            "{}: the error does not say {:?}:\n{stderr}",
            case.what,
            case.words
        );
        assert!(!out.exists(), "{}: a zip was written", case.what);
        assert!(
            !stderr.contains(&canary),
            "{}: canary in the error",
            case.what
        );
    }
    // Nothing of any case was left in the cache's work area or the system's temporary
    // directory's intake trees of this run.
    let tmp = work.path().join("cache").join("tmp");
    assert!(
        listing(&tmp).is_empty(),
        "left in the cache: {:?}",
        listing(&tmp)
    );
}

#[test]
fn modes_are_normalised_and_world_writable_files_are_not() {
    use std::os::unix::fs::PermissionsExt;
    let mut entries = hostile::sample_entries(|m| m);
    entries.push(RawEntry::file("data/open.txt", b"anyone may write me").with_mode(0o100666));
    entries.push(RawEntry::file("bin/run.sh", b"#!/bin/sh\n").with_mode(0o100777));
    let pkg = connector::package::Package::read(hostile::raw_zip(&entries).into())
        .expect("a world-writable file is normalised, not refused");
    let dir = harness::sri::TempDir::new("modes");
    let dest = dir.path().join("plugin");
    pkg.extract(&dest).expect("extract");
    let mode = |p: &str| {
        std::fs::metadata(dest.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("data/open.txt"), 0o644);
    assert_eq!(mode("bin/run.sh"), 0o755);
    assert_eq!(mode("main.py"), 0o644);
}
