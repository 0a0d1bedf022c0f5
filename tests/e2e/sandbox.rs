//! The local backend's plugin sandbox (`SRI_SANDBOX=required`), run as root as CI runs it.
//!
//! A fixture plugin generated here, one tool per hostile attempt, is launched twice as two
//! functions through the daemon-exact client. Every attempt of function A fails for the plugin
//! (reading or writing B's files, writing its own package, seeing other processes or their
//! environment, ptracing or killing the bootstrap and the connector, allocating past its
//! manifest's memory, forking without bound, filling `/tmp`), nothing outside changes, and B
//! answers normally after each one. Last, A disarms its own parent-death signal and the
//! bootstraps are SIGKILLed: no process they started survives them.

use harness::difypkg::Package;
use harness::godaemon::{GoDaemon, InvokeOutcome};
use harness::sri::{API_KEY, Connector, ConnectorOptions};
use harness::{envelope, session_id, tool_data};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The manifest's `resource.memory`: the limit the allocating tool runs into.
const MEMORY_MB: u64 = 256;
/// `SRI_SANDBOX_TMP_MB` and `SRI_SANDBOX_PIDS` of the test connector (small: quick to reach).
const TMP_MB: u64 = 64;
const PIDS: u64 = 128;

/// One tool: its name and the body of `attempt(p)`, which returns what to report as JSON.
const TOOLS: &[(&str, &str)] = &[
    (
        "whoami",
        "return {'pid': os.getpid(), 'uid': os.getuid(), 'gid': os.getgid()}",
    ),
    ("read_other", "return sorted(os.listdir(p['path']))"),
    (
        "write_other",
        "open(os.path.join(p['path'], 'pwned'), 'w').write('x')\n    return 'written'",
    ),
    (
        "write_own",
        "open('pwned', 'w').write('x')\n    return 'written'",
    ),
    (
        "procs",
        "pids = sorted(int(d) for d in os.listdir('/proc') if d.isdigit())\n    \
         env = {}\n    \
         for pid in set(pids) | {int(x) for x in p['pids'].split(',')}:\n        \
             try:\n            \
                 env[pid] = open(f'/proc/{pid}/environ', 'rb').read().decode('latin-1')\n        \
             except OSError as e:\n            \
                 env[pid] = 'refused: ' + str(e)\n    \
         return {'visible': pids, 'environ': env}",
    ),
    (
        "ptrace_kill",
        "import ctypes, signal\n    \
         libc = ctypes.CDLL(None, use_errno=True)\n    \
         out = {}\n    \
         for pid in [int(x) for x in p['pids'].split(',')]:\n        \
             r = libc.ptrace(16, pid, None, None)\n        \
             out[f'ptrace {pid}'] = 'attached' if r == 0 else os.strerror(ctypes.get_errno())\n        \
             try:\n            \
                 os.kill(pid, signal.SIGKILL)\n            \
                 out[f'kill {pid}'] = 'killed'\n        \
             except OSError as e:\n            \
                 out[f'kill {pid}'] = str(e)\n    \
         return out",
    ),
    (
        "unarm",
        "import ctypes\n    \
         libc = ctypes.CDLL(None, use_errno=True)\n    \
         libc.prctl(1, 0, 0, 0, 0)\n    \
         sig = ctypes.c_int(-1)\n    \
         libc.prctl(2, ctypes.byref(sig), 0, 0, 0)\n    \
         return {'pdeathsig': sig.value}",
    ),
    (
        "allocate",
        "chunks = []\n    \
         for _ in range(int(p['mb'])):\n        \
             chunks.append(bytearray(b'\\x01') * (1 << 20))\n    \
         return f'allocated {len(chunks)} MiB'",
    ),
    (
        "fork_bomb",
        "import time\n    \
         pids, err = [], None\n    \
         try:\n        \
             for _ in range(int(p['n'])):\n            \
                 pid = os.fork()\n            \
                 if pid == 0:\n                \
                     try:\n                    \
                         os.execv('/bin/sleep', ['sleep', '120'])\n                \
                     finally:\n                    \
                         os._exit(0)\n            \
                 pids.append(pid)\n    \
         except OSError as e:\n        \
             err = str(e)\n    \
         for pid in pids:\n        \
             os.kill(pid, 9)\n    \
         for pid in pids:\n        \
             os.waitpid(pid, 0)\n    \
         return {'forked': len(pids), 'error': err}",
    ),
    (
        "fill_tmp",
        "written, err = 0, None\n    \
         chunk = b'\\x01' * (1 << 20)\n    \
         try:\n        \
             with open('/tmp/fill', 'wb') as f:\n            \
                 for _ in range(int(p['mb'])):\n                \
                     f.write(chunk)\n                \
                     f.flush()\n                \
                     written += len(chunk)\n    \
         except OSError as e:\n        \
             err = str(e)\n    \
         os.remove('/tmp/fill')\n    \
         return {'written': written, 'error': err}",
    ),
];

/// The fixture plugin's files, at `version` (two versions: two functions).
fn plugin(version: &str) -> Vec<(String, Vec<u8>)> {
    let mut files = vec![
        (
            "manifest.yaml".to_owned(),
            format!(
                "version: {version}\ntype: plugin\nauthor: sri\nname: sandboxed\nlabel:\n  en_US: Sandboxed\n\
                 description:\n  en_US: Hostile attempts against the sandbox.\nicon: icon.svg\n\
                 resource:\n  memory: {}\nplugins:\n  tools:\n    - provider/sandboxed.yaml\n\
                 meta:\n  version: 0.0.1\n  arch:\n    - amd64\n  runner:\n    language: python\n    \
                 version: \"3.12\"\n    entrypoint: main\ncreated_at: 2025-01-01T00:00:00Z\nverified: false\n",
                MEMORY_MB * 1024 * 1024
            ),
        ),
        (
            "main.py".to_owned(),
            "from dify_plugin import DifyPluginEnv, Plugin\n\nplugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=120))\n\nif __name__ == \"__main__\":\n    plugin.run()\n".to_owned(),
        ),
        ("requirements.txt".to_owned(), "dify_plugin>=0.7.4,<0.11\n".to_owned()),
        (
            "_assets/icon.svg".to_owned(),
            "<svg xmlns=\"http://www.w3.org/2000/svg\"/>\n".to_owned(),
        ),
        (
            "provider/sandboxed.py".to_owned(),
            "from dify_plugin import ToolProvider\n\n\nclass SandboxedProvider(ToolProvider):\n    def _validate_credentials(self, credentials):\n        del credentials\n".to_owned(),
        ),
    ];
    let mut provider =
        "identity:\n  author: sri\n  name: sandboxed\n  label:\n    en_US: Sandboxed\n  \
         description:\n    en_US: Hostile attempts.\n  icon: icon.svg\ntools:\n"
            .to_owned();
    for (name, body) in TOOLS {
        provider.push_str(&format!("  - tools/{name}.yaml\n"));
        files.push((
            format!("tools/{name}.yaml"),
            format!(
                "identity:\n  name: {name}\n  author: sri\n  label:\n    en_US: {name}\n\
                 description:\n  human:\n    en_US: {name}\n  llm: {name}\nparameters: []\n\
                 extra:\n  python:\n    source: tools/{name}.py\n"
            ),
        ));
        files.push((
            format!("tools/{name}.py"),
            format!(
                "import json\nimport os\n\nfrom dify_plugin import Tool\n\n\n\
                 def attempt(p):\n    {body}\n\n\n\
                 class T(Tool):\n    def _invoke(self, tool_parameters):\n        \
                 yield self.create_text_message(json.dumps(attempt(tool_parameters)))\n"
            ),
        ));
    }
    provider.push_str("extra:\n  python:\n    source: provider/sandboxed.py\n");
    files.push(("provider/sandboxed.yaml".to_owned(), provider));
    files
        .into_iter()
        .map(|(p, c)| (p, c.into_bytes()))
        .collect()
}

struct Function {
    endpoint: String,
    dir: PathBuf,
}

async fn launch(c: &Connector, d: &GoDaemon, version: &str) -> Function {
    let pkg = Package::from_files(&plugin(version));
    let o = d
        .launch_package(&pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", c.log_tail(60)));
    let (_, endpoint) = o.installed.clone().unwrap_or_else(|| {
        panic!(
            "not installed: {:?}\n{}\n{}",
            o.install_errors,
            o.transcript(),
            c.log_tail(60)
        )
    });
    let functions = c.data_dir().join("functions");
    let dir = std::fs::read_dir(&functions)
        .expect("functions dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            std::fs::read_to_string(p.join("meta.json"))
                .is_ok_and(|m| m.contains(&format!("sri/sandboxed:{version}@")))
        })
        .unwrap_or_else(|| panic!("no function dir for {version} in {}", functions.display()));
    Function { endpoint, dir }
}

async fn call(d: &GoDaemon, f: &Function, tool: &str, params: Value) -> InvokeOutcome {
    let sid = session_id(tool);
    let data = tool_data("sandboxed", tool, params, None);
    d.invoke(&f.endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await
}

/// The tool's JSON answer; panics with the transcript when there is none.
fn answer(o: &InvokeOutcome) -> Value {
    let text = o
        .texts()
        .pop()
        .unwrap_or_else(|| panic!("no answer: {}", o.transcript()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The session's error (type, message): the call must have failed.
fn failure(o: &InvokeOutcome) -> (String, String) {
    let e = o
        .result()
        .expect_err(&format!("the attempt succeeded: {}", o.transcript()));
    (e.error_type, e.message)
}

/// B still answers, at once, as itself.
async fn b_answers(d: &GoDaemon, b: &Function, uid_b: u64, after: &str) {
    let o = call(d, b, "whoami", json!({})).await;
    assert_eq!(
        answer(&o)["uid"],
        uid_b,
        "function B after A's {after}: {}",
        o.transcript()
    );
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn every_hostile_attempt_fails_and_the_other_function_answers_throughout() {
    let signing = harness::keys_env(&[harness::SECRET_A]);
    let c = Connector::start_with(
        ConnectorOptions::default()
            .env("SRI_SANDBOX", "required")
            .env("SRI_SANDBOX_TMP_MB", TMP_MB.to_string())
            .env("SRI_SANDBOX_PIDS", PIDS.to_string()),
    );
    let d = c
        .daemon()
        .with_launch_timeout(Duration::from_secs(240))
        .with_execution_timeout(Duration::from_secs(120));

    // The mechanisms are reported, all of them active (this runs as root).
    let health: Value = reqwest::get(format!("{}/healthz", c.url()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let active = health["sandbox"]["active"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for m in [
        "memory-cgroup",
        "pids-cgroup",
        "pid-namespace",
        "mount-namespace",
        "private-tmp",
        "rlimits",
        "no-new-privs",
        "unprivileged-uid",
    ] {
        assert!(active.contains(&json!(m)), "{m} not active: {health}");
    }
    let metrics = reqwest::get(format!("{}/metrics", c.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("sri_sandbox_mechanism{mechanism=\"pid-namespace\"} 1"),
        "{metrics}"
    );

    let a = launch(&c, &d, "0.1.0").await;
    let b = launch(&c, &d, "0.2.0").await;
    let who_a = answer(&call(&d, &a, "whoami", json!({})).await);
    let who_b = answer(&call(&d, &b, "whoami", json!({})).await);
    let (uid_a, uid_b) = (
        who_a["uid"].as_u64().unwrap(),
        who_b["uid"].as_u64().unwrap(),
    );
    assert!(
        uid_a != 0 && uid_b != 0,
        "a plugin runs as root: {who_a} {who_b}"
    );
    assert_ne!(uid_a, uid_b, "two functions share a uid");
    assert_eq!(who_a["pid"], 1, "not in its own PID namespace: {who_a}");
    // Its venv is read-only to it: compiled at install, or every start recompiles the SDK.
    let sdk = glob_one(
        &a.dir.join("venv/lib"),
        "site-packages/dify_plugin/__pycache__",
    );
    assert!(
        std::fs::read_dir(&sdk).is_ok_and(|mut d| d.next().is_some()),
        "no bytecode in {}",
        sdk.display()
    );

    // B's files: invisible (so neither read nor written), and unchanged.
    let b_plugin = b.dir.join("plugin");
    let before = listing(&b_plugin);
    for tool in ["read_other", "write_other"] {
        let o = call(
            &d,
            &a,
            tool,
            json!({"path": b_plugin.display().to_string()}),
        )
        .await;
        let (_, message) = failure(&o);
        assert!(message.contains("No such file"), "{tool}: {message}");
        b_answers(&d, &b, uid_b, tool).await;
    }
    assert_eq!(listing(&b_plugin), before, "B's package changed");
    // Of the connector's data dir, only the path to its own function's package and venv.
    let data = std::fs::canonicalize(c.data_dir()).unwrap();
    let seen = answer(
        &call(
            &d,
            &a,
            "read_other",
            json!({"path": data.display().to_string()}),
        )
        .await,
    );
    assert_eq!(
        seen,
        json!(["functions"]),
        "the data dir as the plugin sees it"
    );
    let functions = data.join("functions");
    let seen = answer(
        &call(
            &d,
            &a,
            "read_other",
            json!({"path": functions.display().to_string()}),
        )
        .await,
    );
    let own = a.dir.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(seen, json!([own]), "other functions are visible");
    let seen = answer(
        &call(
            &d,
            &a,
            "read_other",
            json!({"path": a.dir.display().to_string()}),
        )
        .await,
    );
    assert_eq!(
        seen,
        json!(["plugin", "venv"]),
        "its function dir as the plugin sees it"
    );

    // Its own package: read-only.
    let o = call(&d, &a, "write_own", json!({})).await;
    let (_, message) = failure(&o);
    assert!(message.contains("Read-only file system"), "{message}");
    assert!(!a.dir.join("plugin").join("pwned").exists());
    b_answers(&d, &b, uid_b, "write_own").await;

    // Other processes: not even listed; no environment of the connector or a bootstrap.
    let connector_pid = c.pid().expect("connector running");
    let bootstraps = children(connector_pid);
    assert!(bootstraps.len() >= 2, "bootstraps: {bootstraps:?}");
    let mut targets: Vec<String> = bootstraps.iter().map(u32::to_string).collect();
    targets.push(connector_pid.to_string());
    let targets = targets.join(",");
    let seen = answer(&call(&d, &a, "procs", json!({"pids": targets})).await);
    assert_eq!(
        seen["visible"],
        json!([1]),
        "other processes visible: {seen}"
    );
    let environ = seen["environ"].to_string();
    let secret = signing.split_once(':').map(|(_, s)| s).unwrap_or(&signing);
    assert!(
        !environ.contains(secret)
            && !environ.contains(API_KEY)
            && !environ.contains("SRI_SIGNING_KEYS"),
        "a secret reached the plugin: {environ}"
    );
    b_answers(&d, &b, uid_b, "procs").await;

    // ptrace or kill its parent, the bootstrap, the connector: nothing to reach.
    let tried = answer(&call(&d, &a, "ptrace_kill", json!({"pids": targets})).await);
    for (what, result) in tried.as_object().unwrap() {
        assert!(
            result != "attached" && result != "killed",
            "{what}: {result} ({tried})"
        );
    }
    for pid in bootstraps.iter().chain([&connector_pid]) {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} died"
        );
    }
    b_answers(&d, &b, uid_b, "ptrace_kill").await;

    // 10,000 processes: stopped at the pids limit.
    let forked = answer(&call(&d, &a, "fork_bomb", json!({"n": 10_000})).await);
    assert!(
        forked["forked"].as_u64().unwrap() < PIDS && forked["error"].is_string(),
        "{forked}"
    );
    b_answers(&d, &b, uid_b, "fork_bomb").await;

    // 10 GiB into /tmp: stopped at its size.
    let filled = answer(&call(&d, &a, "fill_tmp", json!({"mb": 10 * 1024})).await);
    assert!(
        filled["written"].as_u64().unwrap() <= TMP_MB * 1024 * 1024
            && filled["error"]
                .as_str()
                .unwrap_or_default()
                .contains("No space left"),
        "{filled}"
    );
    b_answers(&d, &b, uid_b, "fill_tmp").await;

    // Past its manifest's memory: killed, and the error names the limit and its source.
    let o = call(&d, &a, "allocate", json!({"mb": 4 * MEMORY_MB})).await;
    let (error_type, message) = failure(&o);
    assert_eq!(error_type, "PluginProcessExited", "{}", o.transcript());
    assert!(
        message.contains(&format!("{MEMORY_MB} MiB")) && message.contains("resource.memory"),
        "{message}"
    );
    b_answers(&d, &b, uid_b, "allocate").await;
    // … and A's next call works (its plugin restarted).
    let again = answer(&call(&d, &a, "whoami", json!({})).await);
    assert_eq!(again["uid"], uid_a, "{again}");

    // A disarms its own parent-death signal; SIGKILLed bootstraps still take every process
    // they started along (the relay kills the plugin, and the namespace with it).
    let unarmed = answer(&call(&d, &a, "unarm", json!({})).await);
    assert_eq!(unarmed["pdeathsig"], 0, "{unarmed}");
    let bootstraps = children(connector_pid);
    let below: Vec<u32> = bootstraps.iter().flat_map(|b| descendants(*b)).collect();
    assert!(
        below.len() >= 2 * bootstraps.len(),
        "a relay and a plugin under each bootstrap: {below:?}"
    );
    for b in &bootstraps {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*b as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in below {
        while !gone(pid) {
            assert!(
                Instant::now() < deadline,
                "process {pid} outlived its SIGKILLed bootstrap"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// `dir/<the one subdirectory>/rest` (e.g. the venv's `python3.x`).
fn glob_one(dir: &Path, rest: &str) -> PathBuf {
    let sub = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .find(|e| e.path().is_dir())
        .unwrap_or_else(|| panic!("nothing in {}", dir.display()));
    sub.path().join(rest)
}

/// Every process below `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        found.extend(children(found[i]));
        i += 1;
    }
    found.remove(0);
    found
}

/// Whether `pid` runs nothing any more (reaped, or a zombie).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}
