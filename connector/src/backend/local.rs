//! The embedded default backend: each function is a directory under the data dir holding the
//! unpacked plugin and a venv with its dependencies, served by a supervised `bootstrap serve`
//! on a loopback port. No cloud account needed.
//!
//! Builds happen in a temporary directory renamed into place when complete, so a failed or
//! interrupted build leaves nothing half built. On start the backend re-adopts every complete
//! function on disk (stale processes of a previous connector are stopped and started anew).

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::{oneshot, watch};

use crate::transport::Target;

use super::record::{self, Meta};
use super::{Backend, Function, Progress, function_name};
use crate::Error;
use crate::child;
use crate::package::Package;
use crate::requirements::Dependencies;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Where functions live.
    pub data_dir: PathBuf,
    /// The `bootstrap` binary.
    pub bootstrap: PathBuf,
    /// Interpreter venvs are made from.
    pub python: String,
    /// `uv`, when available (much faster installs); else pip.
    pub uv: Option<PathBuf>,
    /// `SRI_SIGNING_KEYS` handed to the functions.
    pub signing_keys: String,
    /// How functions make backwards calls (`SRI_BACKWARDS` and the relay's or the daemon's
    /// URL, see [`crate::relay::function_env`]).
    pub backwards_env: Vec<(String, String)>,
    /// How long a new function may take to become ready.
    pub ready_timeout: Duration,
    /// The package index installs use (`SRI_INDEX_URL`; default: the installer's own settings).
    pub index_url: Option<String>,
    /// How long one installer step may take (`SRI_INSTALL_TIMEOUT_SECS`).
    pub install_timeout: Duration,
    /// The plugins' sandbox (`SRI_SANDBOX*`).
    pub sandbox: crate::sandbox::SandboxOptions,
}

struct Running {
    meta: Meta,
    target: watch::Receiver<Option<Target>>,
    stop: watch::Sender<bool>,
}

/// Functions as local processes.
pub struct LocalBackend {
    opts: LocalOptions,
    sandbox: crate::sandbox::Report,
    running: Mutex<HashMap<String, Running>>,
}

impl LocalBackend {
    /// Opens the data dir and re-adopts the functions found there.
    pub async fn open(opts: LocalOptions) -> Result<Arc<Self>, Error> {
        let functions = opts.data_dir.join("functions");
        tokio::fs::create_dir_all(&functions).await.map_err(|e| {
            io(
                format!("cannot create the data dir {}", functions.display()),
                e,
            )
        })?;
        // Before any function starts: `required` on a host without it stops here.
        let sandbox = crate::sandbox::probe(&opts.bootstrap, &opts.sandbox, &opts.data_dir).await?;
        let this = Arc::new(Self {
            opts,
            sandbox,
            running: Mutex::new(HashMap::new()),
        });
        let mut entries = tokio::fs::read_dir(&functions)
            .await
            .map_err(|e| io("reading the data dir".into(), e))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let dir = entry.path();
            let Ok(text) = tokio::fs::read(dir.join("meta.json")).await else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
                tracing::warn!(dir = %dir.display(), "ignoring a function with unreadable meta.json");
                continue;
            };
            stop_stale(&dir).await;
            tracing::info!(function = %meta.function.name, "re-adopting function");
            this.start(meta, &dir);
        }
        Ok(this)
    }

    /// The directory of function `name`, which callers have checked against the name grammar
    /// ([`crate::names`]): a name is never joined into a path unchecked.
    fn dir(&self, name: &str) -> PathBuf {
        debug_assert!(crate::names::check(name).is_ok(), "unchecked name {name:?}");
        self.opts.data_dir.join("functions").join(name)
    }

    /// Starts and supervises `bootstrap serve` for a built function.
    fn start(&self, meta: Meta, dir: &Path) -> watch::Receiver<Option<Target>> {
        let (target_tx, target_rx) = watch::channel(None);
        let (stop_tx, stop_rx) = watch::channel(false);
        let name = meta.function.name.clone();
        self.running.lock().expect("running lock").insert(
            name.clone(),
            Running {
                meta,
                target: target_rx.clone(),
                stop: stop_tx,
            },
        );
        tokio::spawn(supervise(
            self.opts.clone(),
            dir.to_path_buf(),
            name,
            target_tx,
            stop_rx,
        ));
        target_rx
    }

    async fn build(
        &self,
        pkg: &Package,
        name: &str,
        progress: &Progress,
    ) -> Result<PathBuf, Error> {
        let final_dir = self.dir(name);
        if final_dir.join("meta.json").exists() {
            // Reused only for the very same package: the name carries part of the checksum,
            // meta.json all of it.
            let meta = read_meta(&final_dir).await?;
            if meta.function.checksum != pkg.checksum {
                return Err(Error::Backend(format!(
                    "function `{name}` already holds package {} (checksum {}), not {} (checksum \
                     {}); remove it (DELETE /v1/functions/{name}) to rebuild",
                    meta.function.identifier,
                    meta.function.checksum,
                    pkg.unique_identifier(),
                    pkg.checksum
                )));
            }
            return Ok(final_dir);
        }
        let tmp = self
            .opts
            .data_dir
            .join("functions")
            .join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        let result = self.build_into(pkg, name, &tmp, progress).await;
        if let Err(e) = result {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
        tokio::fs::rename(&tmp, &final_dir).await.map_err(|e| {
            io(
                format!("cannot move the build into {}", final_dir.display()),
                e,
            )
        })?;
        Ok(final_dir)
    }

    async fn build_into(
        &self,
        pkg: &Package,
        name: &str,
        tmp: &Path,
        progress: &Progress,
    ) -> Result<(), Error> {
        let _ = progress.send(("build", "unpacking the package".into()));
        let plugin = tmp.join("plugin");
        let (p, t) = (pkg.clone(), plugin.clone());
        tokio::task::spawn_blocking(move || p.extract(&t))
            .await
            .map_err(|e| Error::Backend(e.to_string()))??;
        // Parsed before any installer runs (the package's file never reaches one), off the
        // async workers: a hostile file costs parsing time.
        let p = plugin.clone();
        let deps = tokio::task::spawn_blocking(move || Dependencies::read(&p))
            .await
            .map_err(|e| Error::Backend(e.to_string()))??;
        let venv = tmp.join("venv");
        let _ = progress.send((
            "build",
            format!("creating a virtualenv with {}", self.opts.python),
        ));
        let create = match &self.opts.uv {
            Some(uv) => {
                let mut c = child::command(uv);
                c.args(["venv", "--quiet", "--python", &self.opts.python])
                    .arg(&venv);
                c
            }
            None => {
                let mut c = child::command(&self.opts.python);
                c.args(["-m", "venv"]).arg(&venv);
                c
            }
        };
        self.run(create, "creating the virtualenv", tmp).await?;
        let python = venv.join("bin").join("python");
        match deps {
            None => {}
            Some(deps) if deps.is_empty() => {}
            Some(deps) => {
                let _ = progress.send((
                    "build",
                    format!(
                        "installing {} dependencies from {}",
                        deps.requirements.len(),
                        deps.file
                    ),
                ));
                // pip cannot read pyproject.toml as a requirements file, and neither installer
                // may read the package's own file: both get the parsed list, written here.
                let reqs = tmp.join("sri-requirements.txt");
                tokio::fs::write(&reqs, deps.to_requirements_txt())
                    .await
                    .map_err(|e| io("writing the requirements file".into(), e))?;
                let mut install = self.installer(&venv, &python);
                install.arg("-r").arg(&reqs);
                self.run(
                    install,
                    &format!("installing the dependencies from {}", deps.file),
                    tmp,
                )
                .await?;
                let _ = tokio::fs::remove_file(&reqs).await;
            }
        }
        let meta = Meta {
            function: Function {
                name: name.to_owned(),
                identifier: pkg.unique_identifier(),
                checksum: pkg.checksum.clone(),
            },
            created_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs(),
        };
        let meta = serde_json::to_vec_pretty(&meta).expect("JSON");
        tokio::fs::write(tmp.join("meta.json"), meta)
            .await
            .map_err(|e| io("writing meta.json".into(), e))
    }

    /// `uv pip install` into the venv, or its own pip when there is no uv, with the operator's
    /// index; the requirements file follows.
    fn installer(&self, venv: &Path, python: &Path) -> Command {
        let mut c = match &self.opts.uv {
            Some(uv) => {
                let mut c = child::command(uv);
                // Bytecode compiled now (pip does so by default): a sandboxed plugin sees its
                // venv read-only, and would recompile every import at every start (seconds).
                c.args(["pip", "install", "--quiet", "--compile-bytecode"])
                    .arg("--python")
                    .arg(python);
                c
            }
            None => {
                let mut c = child::command(venv.join("bin").join("pip"));
                c.args(["install", "--quiet", "--disable-pip-version-check"]);
                c
            }
        };
        if let Some(url) = &self.opts.index_url {
            child::index(&mut c, url);
        }
        c
    }

    /// Runs one build step (see [`child::run`]); its scratch directory lives in the build dir.
    async fn run(&self, cmd: Command, what: &str, build_dir: &Path) -> Result<(), Error> {
        let out = child::run(
            cmd,
            what,
            self.opts.install_timeout,
            build_dir,
            Error::Backend,
        )
        .await?;
        if out.status.success() {
            return Ok(());
        }
        Err(Error::Backend(child::failure(what, &out)))
    }

    async fn stop_function(&self, name: &str) {
        let running = self.running.lock().expect("running lock").remove(name);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            // Wait (bounded) until the supervisor has stopped the process: it lets the
            // bootstrap drain before killing it.
            let mut target = r.target.clone();
            let _ = tokio::time::timeout(
                STOP_GRACE + Duration::from_secs(2),
                target.wait_for(|t| t.is_none()),
            )
            .await;
        }
    }
}

impl Backend for LocalBackend {
    fn deploy<'a>(
        &'a self,
        pkg: &'a Package,
        progress: Progress,
    ) -> BoxFuture<'a, Result<Function, Error>> {
        async move {
            let name = function_name(pkg);
            if let Some(f) = self.find(&pkg.checksum) {
                return Ok(f);
            }
            let fresh = !self.dir(&name).join("meta.json").exists();
            let dir = self.build(pkg, &name, &progress).await?;
            let meta = read_meta(&dir).await?;
            let _ = progress.send(("run", "starting the function".into()));
            let function = meta.function.clone();
            let mut target = self.start(meta, &dir);
            let ready = matches!(
                tokio::time::timeout(self.opts.ready_timeout, target.wait_for(|t| t.is_some()))
                    .await,
                Ok(Ok(_))
            );
            if ready {
                return Ok(function);
            }
            // Say why: the bootstrap's health reason carries the plugin's own error.
            let why = startup_failure(&dir).await;
            self.stop_function(&name).await;
            if fresh {
                let _ = tokio::fs::remove_dir_all(&dir).await;
            }
            Err(Error::Backend(format!(
                "the function did not become ready: {why}"
            )))
        }
        .boxed()
    }

    fn find(&self, checksum: &str) -> Option<Function> {
        self.running
            .lock()
            .expect("running lock")
            .values()
            .find(|r| r.meta.function.checksum == checksum && r.target.borrow().is_some())
            .map(|r| r.meta.function.clone())
    }

    fn list(&self) -> Vec<Function> {
        let mut v: Vec<Function> = self
            .running
            .lock()
            .expect("running lock")
            .values()
            .map(|r| r.meta.function.clone())
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn target(&self, name: &str) -> Option<Target> {
        self.running
            .lock()
            .expect("running lock")
            .get(name)
            .and_then(|r| r.target.borrow().clone())
    }

    fn wait_target<'a>(&'a self, name: &'a str, within: Duration) -> BoxFuture<'a, Option<Target>> {
        async move {
            let mut target = self
                .running
                .lock()
                .expect("running lock")
                .get(name)?
                .target
                .clone();
            let ready = tokio::time::timeout(within, target.wait_for(|t| t.is_some())).await;
            ready.ok()?.ok().and_then(|t| t.clone())
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let dir = self.dir(crate::names::check(name)?);
            if !dir.exists() {
                return Err(Error::Backend(format!("no function named `{name}`")));
            }
            self.stop_function(name).await;
            tokio::fs::remove_dir_all(&dir)
                .await
                .map_err(|e| io(format!("removing {}", dir.display()), e))
        }
        .boxed()
    }

    fn gc(&self, keep: usize) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        async move {
            let mut removed = Vec::new();
            let functions = self.opts.data_dir.join("functions");
            let leftovers = record::leftovers(&functions)
                .await
                .map_err(|e| io("reading the data dir".into(), e))?;
            for (name, path) in leftovers {
                let _ = tokio::fs::remove_dir_all(path).await;
                removed.push(name);
            }
            let metas: Vec<Meta> = {
                let running = self.running.lock().expect("running lock");
                running.values().map(|r| r.meta.clone()).collect()
            };
            for m in record::superseded(metas, keep) {
                self.remove(&m.function.name).await?;
                removed.push(m.function.name);
            }
            Ok(removed)
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async move {
            let names: Vec<String> = self
                .running
                .lock()
                .expect("running lock")
                .keys()
                .cloned()
                .collect();
            // All at once: each may take the bootstrap's whole drain.
            futures_util::future::join_all(names.iter().map(|n| self.stop_function(n))).await;
        }
        .boxed()
    }

    fn sandbox(&self) -> Option<crate::sandbox::Report> {
        Some(self.sandbox.clone())
    }
}

/// Runs the function's bootstrap, restarting it when it dies, until told to stop.
async fn supervise(
    opts: LocalOptions,
    dir: PathBuf,
    name: String,
    target: watch::Sender<Option<Target>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    loop {
        let started = std::time::Instant::now();
        // Only what a function needs: never the connector's own secrets.
        let mut cmd = child::function_command(&opts.bootstrap, &["HOME", "TMPDIR"]);
        cmd.args(["serve", "--listen", "127.0.0.1:0"])
            .env("SRI_PLUGIN_DIR", dir.join("plugin"))
            .env("SRI_PYTHON", dir.join("venv").join("bin").join("python"))
            .env("SRI_SIGNING_KEYS", &opts.signing_keys)
            // What SRI v2 signatures for this function bind.
            .env("SRI_FUNCTION_NAME", &name)
            .env("AWS_LAMBDA_LOG_FORMAT", "json")
            .envs(opts.sandbox.env(&opts.data_dir))
            .env_remove("AWS_LAMBDA_RUNTIME_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.envs(opts.backwards_env.iter().map(|(k, v)| (k, v)));
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(function = %name, error = %e, bootstrap = %opts.bootstrap.display(), "cannot start the bootstrap (SRI_BOOTSTRAP_BIN)");
                let _ = target.send(None);
                return;
            }
        };
        let _ = tokio::fs::write(dir.join("pid"), child.id().unwrap_or_default().to_string()).await;
        let (listen_tx, listen_rx) = oneshot::channel();
        tokio::spawn(pump_logs(
            child.stderr.take().expect("stderr"),
            dir.join("bootstrap.log"),
            listen_tx,
        ));
        let base = match tokio::time::timeout(Duration::from_secs(20), listen_rx).await {
            Ok(Ok(addr)) => Some(format!("http://{addr}")),
            _ => None,
        };
        if let Some(base) = &base
            && let Some(ready) = wait_healthy(base, opts.ready_timeout, &mut stop).await
        {
            tracing::info!(function = %name, target = %ready, "function ready");
            let _ = target.send(Some(ready));
        }
        tokio::select! {
            status = child.wait() => {
                let _ = target.send(None);
                tracing::warn!(function = %name, status = ?status.ok(), "function process exited");
            }
            _ = stop.wait_for(|s| *s).map(|_| ()) => {
                terminate(&mut child).await;
                let _ = target.send(None);
                return;
            }
        }
        failures = if started.elapsed() > Duration::from_secs(30) {
            0
        } else {
            failures + 1
        };
        let delay = Duration::from_millis(200).saturating_mul(1 << failures.min(7));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s).map(|_| ()) => return,
        }
    }
}

/// Waits until the bootstrap at `base` is ready, and says how to reach it: h2c when its health
/// says it speaks it (a bootstrap built without the `h2c` feature, as Lambda builds are, does
/// not), plain HTTP/1.1 otherwise. `None`: it did not become ready.
async fn wait_healthy(
    base: &str,
    within: Duration,
    stop: &mut watch::Receiver<bool>,
) -> Option<Target> {
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let stopped = *stop.borrow();
        if stopped || tokio::time::Instant::now() >= deadline {
            return None;
        }
        if let Ok(r) = client.get(format!("{base}/health")).send().await {
            let ok = r.status().is_success();
            let body = r.bytes().await.unwrap_or_default();
            let v = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
            if ok {
                return Some(if v["h2c"] == true {
                    Target::h2c(base)
                } else {
                    Target::http(base)
                });
            }
            // A plugin that failed to start will not recover by waiting.
            if v["reason"]
                .as_str()
                .is_some_and(|s| s.contains("failed to start") || s.contains("exited before"))
            {
                return None;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Copies the bootstrap's log lines to `bootstrap.log` and reports its listen address.
async fn pump_logs(
    stderr: tokio::process::ChildStderr,
    path: PathBuf,
    listen: oneshot::Sender<String>,
) {
    let mut listen = Some(listen);
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .await
        .ok();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if listen.is_some()
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["message"] == "serving SRI v1"
            && let Some(tx) = listen.take()
        {
            let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_owned());
        }
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(line.as_bytes()).await;
            let _ = f.write_all(b"\n").await;
        }
    }
}

/// Why a function's plugin did not start, from its log.
async fn startup_failure(dir: &Path) -> String {
    let log = tokio::fs::read_to_string(dir.join("bootstrap.log"))
        .await
        .unwrap_or_default();
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| {
            (v["message"] == "the plugin failed to start")
                .then(|| v["reason"].as_str().unwrap_or_default().to_owned())
        })
        .unwrap_or_else(|| {
            format!(
                "no heartbeat from the plugin; see {}",
                dir.join("bootstrap.log").display()
            )
        })
}

/// How long a bootstrap is given to stop after SIGTERM: its drain (10 s, `bootstrap serve`'s
/// `DRAIN`) and the time to stop its plugin. Killing it sooner would orphan the plugin.
const STOP_GRACE: Duration = Duration::from_secs(15);

async fn terminate(child: &mut tokio::process::Child) {
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

/// Stops a bootstrap left running by a previous connector (it would hold the old port).
async fn stop_stale(dir: &Path) {
    let Ok(pid) = tokio::fs::read_to_string(dir.join("pid")).await else {
        return;
    };
    let Ok(pid) = pid.trim().parse::<i32>() else {
        return;
    };
    let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline"))
        .await
        .unwrap_or_default();
    if String::from_utf8_lossy(&cmdline).contains("bootstrap") {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        for _ in 0..100 {
            if nix::sys::signal::kill(pid, None).is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

/// A function's `meta.json`.
async fn read_meta(dir: &Path) -> Result<Meta, Error> {
    let text = tokio::fs::read(dir.join("meta.json"))
        .await
        .map_err(|e| io("reading meta.json".into(), e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Backend(format!("meta.json: {e}")))
}

fn io(context: String, e: std::io::Error) -> Error {
    Error::Backend(format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::{Target, wait_healthy};

    /// A bootstrap that says it speaks h2c is reached over h2c; one that does not (a Lambda
    /// build, or an older one) over HTTP/1.1.
    #[tokio::test]
    async fn the_transport_follows_what_the_bootstraps_health_says() {
        for (health, want) in [
            (
                r#"{"status":"ok","h2c":true}"#,
                Target::h2c as fn(String) -> Target,
            ),
            (r#"{"status":"ok","h2c":false}"#, Target::http),
            (r#"{"status":"ok"}"#, Target::http),
        ] {
            let app = axum::Router::new()
                .route("/health", axum::routing::get(move || async move { health }));
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let base = format!("http://{}", l.local_addr().unwrap());
            let server = tokio::spawn(async move { axum::serve(l, app).await });
            let (_stop_tx, mut stop) = tokio::sync::watch::channel(false);
            let got = wait_healthy(&base, std::time::Duration::from_secs(10), &mut stop).await;
            assert_eq!(got, Some(want(base.clone())), "health {health}");
            server.abort();
        }
    }
}
