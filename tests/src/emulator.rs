//! `cargo lambda watch` as the Lambda emulator, with our `bootstrap` as the function.
//!
//! The emulator runs with `--only-lambda-apis` on a free loopback port; the bootstrap is then
//! started by the test with `AWS_LAMBDA_RUNTIME_API` pointing at it (as cargo-lambda would), so
//! the same built binary serves every test. The function is named `bootstrap` because the
//! emulator only routes names of binaries in the workspace.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Options, bootstrap_command, plugin_dir, root, stop};

/// The function name the emulator routes.
pub const FUNCTION: &str = "bootstrap";

/// The `cargo-lambda` executable installed by the test tooling.
pub fn cargo_lambda() -> PathBuf {
    let path = std::env::var_os("SRI_CARGO_LAMBDA")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/tools/bin/cargo-lambda"));
    assert!(
        path.exists(),
        "{} is missing: `make tools` installs cargo-lambda from PyPI",
        path.display()
    );
    path
}

/// A free loopback port (bound, then released: the caller binds it next).
///
/// Never the same port twice in one test process: the OS may hand a just-released port to the
/// next `bind(:0)`, and two servers started in parallel on one port would let a test that lost
/// the race talk to the other test's server (and see "connection refused" once it stops).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A fresh `cargo lambda watch --only-lambda-apis` on a free loopback port (killed on drop).
/// One per function run: a poller that dies mid-`/next` can swallow the next invocation.
pub struct Emulator {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Emulator {
    /// Starts it from the repository root (it routes only names of the workspace's binaries,
    /// hence the function name [`FUNCTION`]) and waits (bounded) until it accepts connections.
    /// A port taken between choosing and binding it makes it exit: then another port is tried.
    pub fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(this) => return this,
                Err(e) => last = e,
            }
        }
        panic!("cargo lambda watch did not start: {last}");
    }

    fn try_start() -> Result<Self, String> {
        let port = free_port();
        let child = Command::new(cargo_lambda())
            .args([
                "lambda",
                "watch",
                "--only-lambda-apis",
                "-A",
                "127.0.0.1",
                "-P",
            ])
            .arg(port.to_string())
            .current_dir(root())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn cargo lambda watch");
        let mut this = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Connection attempts are the readiness signal here: it prints nothing parseable.
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = this.child.try_wait() {
                return Err(format!("it exited early on port {port}: {status}"));
            }
            if Instant::now() >= deadline {
                return Err(format!("it did not listen on 127.0.0.1:{port} within 30 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(this)
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `AWS_LAMBDA_RUNTIME_API` as cargo-lambda hands it to a function (a URL with a path).
    pub fn runtime_api(&self) -> String {
        format!("http://127.0.0.1:{}/.rt/{FUNCTION}", self.port)
    }

    /// The emulated Function URL.
    pub fn function_url(&self) -> String {
        format!("http://127.0.0.1:{}/lambda-url/{FUNCTION}", self.port)
    }

    /// The emulated direct `Invoke` route (streams the function's raw response).
    pub fn invoke_url(&self) -> String {
        format!(
            "http://127.0.0.1:{}/2015-03-31/functions/{FUNCTION}/invocations",
            self.port
        )
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A running emulator plus the bootstrap polling it; both are stopped on drop.
pub struct Lambda {
    bootstrap: Option<Child>,
    emulator: Emulator,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Lambda {
    /// Starts a fresh emulator (one per test: a poller that dies mid-`/next` can swallow the
    /// next invocation) and the bootstrap for `opts`.
    pub fn start(opts: Options) -> Self {
        let emulator = Emulator::start();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let bootstrap = spawn_runtime(&emulator.runtime_api(), &opts, logs.clone());
        Self {
            bootstrap: Some(bootstrap),
            emulator,
            logs,
        }
    }

    /// `AWS_LAMBDA_RUNTIME_API` as cargo-lambda hands it to a function.
    pub fn runtime_api(&self) -> String {
        self.emulator.runtime_api()
    }

    /// The emulated Function URL.
    pub fn function_url(&self) -> String {
        self.emulator.function_url()
    }

    /// The emulated direct `Invoke` route.
    pub fn invoke_url(&self) -> String {
        self.emulator.invoke_url()
    }

    /// The bootstrap's log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }
}

/// Starts the bootstrap in Lambda mode against `api`, collecting its logs.
pub fn spawn_runtime(api: &str, opts: &Options, logs: Arc<Mutex<Vec<String>>>) -> Child {
    let mut cmd = bootstrap_command(opts);
    cmd.args(&opts.args).env("AWS_LAMBDA_RUNTIME_API", api);
    cmd.env("SRI_PLUGIN_DIR", plugin_dir(&opts.plugin))
        .env("SRI_PYTHON", opts.py.python());
    let mut child = cmd.spawn().expect("spawn bootstrap");
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            logs.lock().unwrap().push(line);
        }
    });
    child
}

impl Drop for Lambda {
    fn drop(&mut self) {
        // The bootstrap first, so that it does not see its Runtime API vanish mid-call.
        if let Some(b) = self.bootstrap.as_mut() {
            stop(b);
        }
    }
}
