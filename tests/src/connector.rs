//! Starting and stopping the connector (`sri serve`) for end-to-end tests.
//!
//! Each [`Connector`] gets a fresh data directory (removed on drop), listens on a loopback port
//! chosen by the OS, and is killed on drop: SIGTERM, then SIGKILL of its whole process group after
//! a bounded wait (its group holds the functions it supervises). It can be stopped and started
//! again on the same data directory and the same address, as a restarted connector would be.

use crate::godaemon::GoDaemon;
use crate::{Py, SECRET_A, bootstrap_bin, keys_env, root};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The API key the tests give the connector and the daemon.
pub const API_KEY: &str = "sri-e2e-connector-key-0123456789";

/// How long the connector may take to listen.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long it may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The `sri` binary built by `cargo build` (or `SRI_CONNECTOR_BIN`).
pub fn sri_bin() -> PathBuf {
    let path = std::env::var_os("SRI_CONNECTOR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root().join("target"));
            target.join("debug").join("sri")
        });
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p sri-connector` first (`make test` does)",
        path.display()
    );
    path
}

/// A temporary directory removed on drop (kept when `SRI_KEEP_TEST_DIRS` is set).
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh, empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "sri-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SRI_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A `uv` in `dir` that appends each call's argv and environment (ended by a `----` line) to
/// `dir/calls.log`, then runs the real uv: what `sri` hands its installer, seen from outside.
/// Returns the spy and its log.
pub fn uv_spy(dir: &Path) -> (PathBuf, PathBuf) {
    let calls = dir.join("calls.log");
    let spy = dir.join("uv");
    std::fs::write(
        &spy,
        format!(
            "#!/bin/sh\n{{ printf 'argv:'; for a in \"$@\"; do printf ' [%s]' \"$a\"; done; \
             printf '\\n'; env; echo '----'; }} >> '{}'\nexec '{}' \"$@\"\n",
            calls.display(),
            root().join(".venv/tools/bin/uv").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&spy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    (spy, calls)
}

/// Options for [`Connector::start_with`].
#[derive(Clone)]
pub struct ConnectorOptions {
    /// `DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY`.
    pub api_key: String,
    /// The Python environment whose interpreter builds the functions' venvs.
    pub py: Py,
    /// Extra environment (e.g. `SRI_PUBLIC_URL`).
    pub env: Vec<(String, String)>,
}

impl Default for ConnectorOptions {
    fn default() -> Self {
        Self {
            api_key: API_KEY.into(),
            py: Py::Py312,
            env: Vec::new(),
        }
    }
}

impl ConnectorOptions {
    /// Options of a connector on the `emulator` backend: the Lambda zip under cargo lambda,
    /// packaged with the stripped host bootstrap, with the test tooling's Python 3.12 as the
    /// bare interpreter (see [`emulator_env`]).
    pub fn emulator() -> Self {
        let mut o = Self::default();
        o.env.extend(emulator_env());
        o
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: impl Into<String>) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }
}

/// How a stop went.
#[derive(Debug, Clone)]
pub struct StopReport {
    /// Exit status.
    pub status: Option<ExitStatus>,
    /// It exited by itself within [`STOP_TIMEOUT`] of SIGTERM.
    pub graceful: bool,
    /// Processes of its group were still alive after it exited (functions it left behind);
    /// they were killed.
    pub strays: bool,
    /// Time from SIGTERM to exit.
    pub took: Duration,
}

/// A running `sri serve`.
pub struct Connector {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
    opts: ConnectorOptions,
    data_dir: TempDir,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Connector {
    /// Starts one with the default options on a fresh data directory.
    pub fn start() -> Self {
        Self::start_with(ConnectorOptions::default())
    }

    /// Starts one with these options on a fresh data directory.
    pub fn start_with(opts: ConnectorOptions) -> Self {
        let data_dir = TempDir::new("connector");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (child, addr) = spawn(&opts, data_dir.path(), "127.0.0.1:0", &logs);
        Self {
            child: Some(child),
            addr,
            opts,
            data_dir,
            logs,
        }
    }

    /// Base URL (`DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `SRI_PUBLIC_URL`: as configured, else `http://<listen>`.
    pub fn public_url(&self) -> String {
        self.opts
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "SRI_PUBLIC_URL")
            .map(|(_, v)| v.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| self.url())
    }

    /// The relay's base URL (`SRI_RELAY_LISTEN`'s address, from its "relay listening" log
    /// line; waits for it, bounded).
    pub fn relay_url(&self) -> String {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(a) = self
                .logs()
                .iter()
                .find_map(|l| logged_listen(l, "relay listening"))
            {
                return format!("http://{a}");
            }
            assert!(
                Instant::now() < deadline,
                "no \"relay listening\" log line within {START_TIMEOUT:?}; logs:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A daemon configured with the right key.
    pub fn daemon(&self) -> GoDaemon {
        GoDaemon::new(&self.url(), Some(&self.opts.api_key))
    }

    /// A daemon configured with another key (`None`: no `Authorization` header).
    pub fn daemon_with_key(&self, key: Option<&str>) -> GoDaemon {
        GoDaemon::new(&self.url(), key)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// Its pid (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Log lines so far (stderr and stdout, across restarts).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// The logs, for assertion messages (the last `n` lines).
    pub fn log_tail(&self, n: usize) -> String {
        let logs = self.logs();
        logs[logs.len().saturating_sub(n)..].join("\n")
    }

    /// SIGTERM, a bounded wait, then SIGKILL of the whole process group. Keeps the data dir.
    pub fn stop(&mut self) -> StopReport {
        let Some(mut child) = self.child.take() else {
            return StopReport {
                status: None,
                graceful: true,
                strays: false,
                took: Duration::ZERO,
            };
        };
        stop_group(&mut child)
    }

    /// Stops it and starts it again on the same data directory and address (the daemon keeps
    /// the endpoint URLs it was given, so the public URL must not change).
    pub fn restart(&mut self) -> StopReport {
        let report = self.stop();
        self.logs.lock().unwrap().push("---- restart ----".into());
        let (child, addr) = spawn(
            &self.opts,
            self.data_dir.path(),
            &self.addr.to_string(),
            &self.logs,
        );
        assert_eq!(addr, self.addr, "restarted on another address");
        self.child = Some(child);
        report
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_group(&mut child);
        }
    }
}

/// The backend the connector tests run on: `SRI_TEST_BACKEND` (`local`, the default, or
/// `emulator`), so one test file covers both (`make test` runs the connector tests twice).
pub fn test_backend() -> String {
    std::env::var("SRI_TEST_BACKEND").unwrap_or_else(|_| "local".into())
}

/// Whether the tests run on the emulator backend ([`test_backend`]).
pub fn on_emulator() -> bool {
    test_backend() == "emulator"
}

/// The environment of a connector on the emulator backend. The package cache is shared by the
/// run's tests and kept across runs under `target/` (a cache: its entries are keyed by every
/// input, and uv's downloads make repeated dependency installs fast).
pub fn emulator_env() -> Vec<(String, String)> {
    let python = std::fs::canonicalize(Py::Py312.python()).expect("canonical python path");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    [
        ("SRI_BACKEND", "emulator".to_owned()),
        (
            "SRI_CARGO_LAMBDA",
            crate::emulator::cargo_lambda().display().to_string(),
        ),
        (
            "SRI_LAMBDA_BOOTSTRAP",
            crate::stripped_bootstrap().display().to_string(),
        ),
        ("SRI_LAMBDA_PYTHON", "3.12".to_owned()),
        (
            "SRI_CACHE_DIR",
            target.join("sri-test-cache/emulator").display().to_string(),
        ),
        // The venv's base interpreter: no site-packages of the venv, as on Lambda.
        ("SRI_EMULATOR_PYTHON", python.display().to_string()),
        ("SRI_PYTHON_3_12", python.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

fn spawn(
    opts: &ConnectorOptions,
    data_dir: &Path,
    listen: &str,
    logs: &Arc<Mutex<Vec<String>>>,
) -> (Child, SocketAddr) {
    let python = std::fs::canonicalize(opts.py.python()).expect("canonical python path");
    let mut cmd = Command::new(sri_bin());
    cmd.args(["serve", "--listen", listen])
        .env("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", &opts.api_key)
        .env("SRI_SIGNING_KEYS", keys_env(&[SECRET_A]))
        .env("SRI_DATA_DIR", data_dir)
        .env("SRI_BOOTSTRAP_BIN", bootstrap_bin())
        .env("SRI_PYTHON", python)
        // The test tooling's uv: venvs in about a second from its cache (pip takes ~20 s).
        .env("SRI_UV", root().join(".venv/tools/bin/uv"))
        .env("AWS_LAMBDA_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env_remove("SRI_PUBLIC_URL")
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that what it spawns can be cleaned up with it.
        .process_group(0);
    if on_emulator() && !opts.env.iter().any(|(k, _)| k == "SRI_BACKEND") {
        cmd.envs(emulator_env());
    }
    for (k, v) in &opts.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn sri");
    let (tx, rx) = std::sync::mpsc::channel();
    for pipe in [
        Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
        Box::new(child.stdout.take().expect("stdout")),
    ] {
        let sink = logs.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(addr) = listening(&line) {
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
    }
    drop(tx);
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(a) => {
                let addr = a
                    .parse()
                    .unwrap_or_else(|e| panic!("listen address {a:?}: {e}"));
                return (child, addr);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // Both pipes closed: it exited.
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Give the log threads what is left (bounded).
            let _ = rx.recv_timeout(Duration::from_millis(500));
            panic!(
                "sri serve exited with {status} before listening; logs:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
        if Instant::now() >= deadline {
            stop_group(&mut child);
            panic!(
                "sri serve did not log \"sri listening\" within {START_TIMEOUT:?}; logs:\n{}",
                logs.lock().unwrap().join("\n")
            );
        }
    }
}

/// The `listen` address of a `{"message":"sri listening","listen":"…"}` log line (fields at the
/// top level or under `fields`).
pub fn listening(line: &str) -> Option<String> {
    logged_listen(line, "sri listening")
}

/// The `listen` address of a log line whose message is `message`.
pub fn logged_listen(line: &str, message: &str) -> Option<String> {
    let v: Value = serde_json::from_str(line).ok()?;
    for o in [&v, &v["fields"]] {
        if o["message"] == message
            && let Some(a) = o["listen"].as_str()
        {
            return Some(a.to_owned());
        }
    }
    if v["message"] == message {
        return v["fields"]["listen"].as_str().map(str::to_owned);
    }
    None
}

fn stop_group(child: &mut Child) -> StopReport {
    use nix::sys::signal::{Signal, kill, killpg};
    use nix::unistd::Pid;
    let pid = Pid::from_raw(child.id() as i32);
    let started = Instant::now();
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = started + STOP_TIMEOUT;
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let graceful = status.is_some();
    let took = started.elapsed();
    // The group (its pgid is its pid): anything still alive in it was left behind.
    let strays = kill(Pid::from_raw(-pid.as_raw()), None).is_ok();
    let _ = killpg(pid, Signal::SIGKILL);
    if status.is_none() {
        status = child.wait().ok();
    }
    StopReport {
        status,
        graceful,
        strays,
        took,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_line_forms() {
        assert_eq!(
            listening(r#"{"level":"INFO","message":"sri listening","listen":"127.0.0.1:4321"}"#),
            Some("127.0.0.1:4321".into())
        );
        assert_eq!(
            listening(r#"{"fields":{"message":"sri listening","listen":"127.0.0.1:1"}}"#),
            Some("127.0.0.1:1".into())
        );
        assert_eq!(listening(r#"{"message":"other","listen":"x"}"#), None);
        assert_eq!(listening("not json"), None);
    }
}
