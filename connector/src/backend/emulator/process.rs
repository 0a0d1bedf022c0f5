//! Running one function as Lambda would: a fresh `cargo lambda watch --only-lambda-apis` (the
//! emulated Lambda service and its Function URL) on a free loopback port, and the zip's own
//! `bin/bootstrap` started the way a managed Python runtime starts its `AWS_LAMBDA_EXEC_WRAPPER`
//! (the runtime's command line as arguments, Lambda's variables in the environment), in a
//! mount namespace where the task root is read-only.
//!
//! Both are restarted together when the function's process exits (a fresh emulator each time:
//! a poller that dies mid-`/next` can swallow the next invocation), until told to stop.

use futures_util::FutureExt;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::layout;
use super::readonly::Prepared;
use crate::backend::Progress;
use crate::transport::Target;

/// What a function is doing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum State {
    /// Starting (or restarting).
    #[default]
    Starting,
    /// Initialized and polling for invocations.
    Ready(Target),
    /// Its init failed; the message carries the error it reported to `/runtime/init/error`.
    Failed(String),
}

/// How the functions run (the same for each).
pub struct Runner {
    /// `cargo-lambda`.
    pub cargo_lambda: PathBuf,
    /// The bare interpreter of the target's Python minor (the managed runtime's).
    pub python: PathBuf,
    /// The region Function URL calls are signed for.
    pub region: String,
    /// How long an init may take.
    pub ready_timeout: Duration,
    /// Whether the task root can be mounted read-only (see `readonly`).
    pub readonly_mount: bool,
}

/// One function's run settings.
pub struct Spec {
    /// Its name (`AWS_LAMBDA_FUNCTION_NAME`, the emulator's route).
    pub name: String,
    /// Its directory (see `layout`).
    pub dir: PathBuf,
    /// `MemorySize`.
    pub memory_mb: i32,
    /// The environment the Lambda backend would set (secrets included).
    pub env: BTreeMap<String, String>,
    /// The unpacked SDK layer it uses (mounted read-only with the task root).
    pub layer: Option<PathBuf>,
}

/// How long a function's processes get to stop after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a function whose init failed may take to exit.
const INIT_EXIT: Duration = Duration::from_secs(5);
/// How long cargo lambda may take to listen.
const EMULATOR_START: Duration = Duration::from_secs(30);

/// What cargo (run by cargo lambda to read its manifest) needs besides.
const CARGO_ENV: &[&str] = &["HOME", "CARGO_HOME", "RUSTUP_HOME", "RUSTUP_TOOLCHAIN"];

fn command(program: &Path, extra: &[&str]) -> Command {
    let mut cmd = crate::child::function_command(program, extra);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    cmd
}

/// Runs the function until `stop`, publishing its state. The first round's progress goes to
/// `progress` (the launch stream).
pub async fn supervise(
    runner: Arc<Runner>,
    spec: Spec,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
    mut progress: Option<Progress>,
) {
    let mut failures = 0u32;
    loop {
        let started = Instant::now();
        let say = |p: &Option<Progress>, msg: String| {
            if let Some(p) = p {
                let _ = p.send(("run", msg));
            }
        };
        let round = async {
            let mut emulator = start_emulator(&runner, &spec).await?;
            say(
                &progress,
                format!(
                    "cargo lambda watch (the Lambda emulator) listening on 127.0.0.1:{}",
                    emulator.port
                ),
            );
            let function = start_function(&runner, &spec, &emulator).await?;
            Ok::<_, String>((emulator.take(), function, emulator.port))
        };
        let (mut emu, mut function, port) = match round.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(function = %spec.name, error = %e, "cannot start the emulated function");
                let _ = state.send(State::Failed(e));
                progress = None;
                if wait_or_stop(&mut stop, backoff(&mut failures, started)).await {
                    return;
                }
                continue;
            }
        };
        write_pids(&spec.dir, &[emu.id(), function.id()]).await;
        let target = Target::FunctionUrl {
            url: format!("http://127.0.0.1:{port}/lambda-url/{}", spec.name),
            region: runner.region.clone(),
            function: spec.name.clone(),
        };
        say(&progress, "function init: starting the plugin".into());
        let init = Instant::now();
        tokio::select! {
            ready = wait_ready(&target, runner.ready_timeout) => {
                match ready {
                    Ok(()) => {
                        say(&progress, format!("function initialized in {} ms", init.elapsed().as_millis()));
                        tracing::info!(function = %spec.name, target = %target, "emulated function ready");
                        let _ = state.send(State::Ready(target));
                    }
                    Err(e) => {
                        // The emulator answers the pending call as soon as the init error is
                        // posted; the function exits (and its log is written) right after.
                        let _ = tokio::time::timeout(INIT_EXIT, function.wait()).await;
                        let why = init_error(&spec.dir).await.unwrap_or(e);
                        tracing::warn!(function = %spec.name, error = %why, "emulated function init failed");
                        let _ = state.send(State::Failed(why));
                    }
                }
            }
            status = function.wait() => {
                let why = init_error(&spec.dir).await.unwrap_or_else(|| format!(
                    "the function exited during init ({}); see {}",
                    status.map(|s| s.to_string()).unwrap_or_default(),
                    spec.dir.join("bootstrap.log").display()
                ));
                tracing::warn!(function = %spec.name, error = %why, "emulated function init failed");
                let _ = state.send(State::Failed(why));
            }
            _ = stop.wait_for(|s| *s).map(|_| ()) => {}
        }
        progress = None;
        if !*stop.borrow() && matches!(*state.borrow(), State::Ready(_)) {
            tokio::select! {
                status = function.wait() => {
                    tracing::warn!(function = %spec.name, status = ?status.ok(), "emulated function exited");
                    let _ = state.send(State::Starting);
                }
                status = emu.wait() => {
                    tracing::warn!(function = %spec.name, status = ?status.ok(), "cargo lambda watch exited");
                    let _ = state.send(State::Starting);
                }
                _ = stop.wait_for(|s| *s).map(|_| ()) => {}
            }
        }
        // The function first, so that it does not see its Runtime API vanish mid-call.
        terminate(&mut function).await;
        terminate(&mut emu).await;
        if *stop.borrow() {
            let _ = state.send(State::Starting);
            return;
        }
        if wait_or_stop(&mut stop, backoff(&mut failures, started)).await {
            return;
        }
    }
}

fn backoff(failures: &mut u32, started: Instant) -> Duration {
    *failures = if started.elapsed() > Duration::from_secs(30) {
        0
    } else {
        *failures + 1
    };
    Duration::from_millis(200).saturating_mul(1 << (*failures).min(7))
}

/// Waits `d`; true when told to stop meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.wait_for(|s| *s).map(|_| ()) => true,
    }
}

struct Emulator {
    child: Option<Child>,
    port: u16,
}

impl Emulator {
    fn take(&mut self) -> Child {
        self.child.take().expect("taken once")
    }
}

/// Starts cargo lambda on a free port; a port taken between choosing and binding it makes it
/// exit, and another is tried.
async fn start_emulator(runner: &Runner, spec: &Spec) -> Result<Emulator, String> {
    let mut last = String::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free loopback port: {e}"))?
            .port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.dir.join("emulator.log"))
            .map_err(|e| format!("opening emulator.log: {e}"))?;
        let mut cmd = command(&runner.cargo_lambda, CARGO_ENV);
        cmd.args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-A",
            "127.0.0.1",
            "-P",
        ])
        .arg(port.to_string())
        .current_dir(layout::cargo(&spec.dir))
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
        let mut child = cmd.spawn().map_err(|e| {
            format!(
                "cannot run {} ({e}); set SRI_CARGO_LAMBDA to cargo-lambda (`make tools` installs \
                 it in .venv/tools/bin, or `pip install cargo-lambda`)",
                runner.cargo_lambda.display()
            )
        })?;
        let deadline = Instant::now() + EMULATOR_START;
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(Emulator {
                    child: Some(child),
                    port,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                last = format!(
                    "cargo lambda watch exited on port {port} ({status}); see {}",
                    spec.dir.join("emulator.log").display()
                );
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill().await;
                return Err(format!(
                    "cargo lambda watch did not listen on 127.0.0.1:{port} within {} s",
                    EMULATOR_START.as_secs()
                ));
            }
            // Connection attempts are the readiness signal: it prints nothing parseable.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Err(last)
}

/// Starts the zip's bootstrap as a managed Python runtime starts its exec wrapper.
async fn start_function(
    runner: &Runner,
    spec: &Spec,
    emulator: &Emulator,
) -> Result<Child, String> {
    let task = layout::task(&spec.dir);
    let tmp = layout::fresh_tmp(&spec.dir).map_err(|e| e.to_string())?;
    let wrapper = task.join("bin").join("bootstrap");
    let mut cmd = command(&wrapper, &[]);
    // The managed runtime's own command line, which the wrapper ignores.
    cmd.arg(&runner.python);
    cmd.envs(&spec.env)
        .env("AWS_LAMBDA_EXEC_WRAPPER", &wrapper)
        // The host's interpreter of the runtime's minor version stands in for /var/lang's.
        .env("SRI_PYTHON", &runner.python)
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{}/.rt/{}", emulator.port, spec.name),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", &spec.name)
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env(
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            spec.memory_mb.to_string(),
        )
        .env("AWS_REGION", &runner.region)
        .env("AWS_DEFAULT_REGION", &runner.region)
        .env("LAMBDA_TASK_ROOT", &task)
        .env("TMPDIR", &tmp)
        .env("HOME", &tmp)
        .current_dir(&task)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if runner.readonly_mount {
        let prepared = Prepared::new(&task).with_layer(spec.layer.as_deref());
        // SAFETY: `enter` makes system calls only, with what was prepared before the fork.
        unsafe {
            cmd.pre_exec(move || prepared.enter());
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {} ({e})", wrapper.display()))?;
    let log = spec.dir.join("bootstrap.log");
    tokio::spawn(pump(child.stderr.take().expect("stderr"), log.clone()));
    tokio::spawn(pump(child.stdout.take().expect("stdout"), log));
    Ok(child)
}

/// Appends a stream's lines to the function's log.
async fn pump(from: impl tokio::io::AsyncRead + Unpin, path: PathBuf) {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .ok();
    let mut lines = BufReader::new(from).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
    }
}

/// Waits until the function answers its health check through the Function URL: the emulator
/// holds the call until the runtime polls for work, which it does once its init is done.
async fn wait_ready(target: &Target, within: Duration) -> Result<(), String> {
    let Target::FunctionUrl { url, .. } = target else {
        unreachable!("the emulator's targets are Function URLs")
    };
    let client = reqwest::Client::builder()
        .timeout(within)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .get(format!("{url}/health"))
        .send()
        .await
        .map_err(|e| {
            format!(
                "the function did not answer its health check: {}",
                crate::error::chain(&e)
            )
        })?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(());
    }
    Err(format!(
        "the function's health check answered {status}: {}",
        body.chars().take(500).collect::<String>()
    ))
}

/// The error the function reported to `/runtime/init/error` (the bootstrap logs the same text
/// as it posts it).
pub async fn init_error(dir: &Path) -> Option<String> {
    // The log is copied by tasks that may still be draining the exited process's pipes.
    for _ in 0..20 {
        if let Some(e) = logged_init_error(dir).await {
            return Some(e);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

async fn logged_init_error(dir: &Path) -> Option<String> {
    let log = tokio::fs::read_to_string(dir.join("bootstrap.log"))
        .await
        .ok()?;
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            (v["message"] == "initialization failed").then(|| {
                format!(
                    "Runtime.InitError: {}",
                    v["error"].as_str().unwrap_or_default()
                )
            })
        })
}

async fn write_pids(dir: &Path, pids: &[Option<u32>]) {
    let text: Vec<String> = pids.iter().flatten().map(u32::to_string).collect();
    let _ = tokio::fs::write(dir.join("pids"), text.join("\n")).await;
}

/// Stops processes a previous connector left running for this function (they would hold the
/// emulator's port and poll a dead Runtime API).
pub async fn stop_stale(dir: &Path) {
    let Ok(text) = tokio::fs::read_to_string(dir.join("pids")).await else {
        return;
    };
    for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline"))
            .await
            .unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if !(cmdline.contains("bootstrap") || cmdline.contains("cargo-lambda")) {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if nix::sys::signal::kill(pid, None).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
