//! The emulator backend: each function is its real Lambda zip (built as the Lambda backend
//! builds it, for this host's architecture), unpacked read-only as `/var/task` is, run under
//! `cargo lambda watch` with the zip's bootstrap as the exec wrapper of a bare interpreter, and
//! called through the emulator's Function URL route with the Lambda backend's `function-url`
//! transport. What a plugin does on AWS Lambda it does here, with no AWS account.
//!
//! Jobs: `layout` (the function's directory), `readonly` (the read-only task root), `process`
//! (the emulator and the function's process, supervised). Functions are re-adopted from the
//! data directory when the connector restarts, as the local backend's are.

mod layout;
mod process;
mod readonly;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;

use super::record::{self, Meta};
use super::settings::{Overrides, function_settings, plugin_budget};
use super::{Backend, Function, Progress, function_name};
use crate::Error;
use crate::package::Package;
use crate::packaging::{self, Arch, FunctionConfig, PythonVersion};
use crate::transport::Target;
use process::{Runner, Spec, State};

/// The emulator backend's own settings (`sri serve --backend emulator`; the packaging and
/// function settings are the Lambda backend's: `SRI_LAMBDA_PYTHON`, `SRI_LAMBDA_MEMORY_MB`,
/// `SRI_LAMBDA_TIMEOUT_S`, `SRI_CACHE_DIR`, `SRI_WHEELHOUSE`, …).
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorOptions {
    /// The `cargo-lambda` executable (default: `cargo-lambda` on PATH, else
    /// `.venv/tools/bin/cargo-lambda`, what `make tools` installs).
    #[arg(long = "cargo-lambda", env = "SRI_CARGO_LAMBDA")]
    pub cargo_lambda: Option<PathBuf>,
    /// The bare interpreter standing in for the managed runtime (default: a `python3.X` of the
    /// runtime's minor version, found as packaging finds one for bytecode).
    #[arg(
        id = "emulator_python",
        long = "emulator-python",
        env = "SRI_EMULATOR_PYTHON"
    )]
    pub python: Option<PathBuf>,
    /// Seconds gc keeps an unpacked SDK layer no function uses yet (a launch unpacks the
    /// layer before the function that will use it).
    #[arg(
        long = "emulator-layer-grace-secs",
        env = "SRI_EMULATOR_LAYER_GRACE_SECS",
        default_value_t = layout::LAYER_GRACE.as_secs()
    )]
    pub layer_grace_secs: u64,
}

/// What the backend needs from the rest of the connector's configuration.
#[derive(Clone)]
pub struct EmulatorContext {
    /// The Lambda backend's packaging and function settings.
    pub lambda: crate::backend::lambda::LambdaOptions,
    /// The key ring the functions verify with.
    pub signing_keys: crate::secret::Secret,
    /// How the functions call Dify back (the relay on loopback, or the daemon directly).
    pub backwards_env: Vec<(String, String)>,
    /// `uv`, which installs dependencies for the target platform.
    pub uv: PathBuf,
    /// The operator's package index.
    pub index_url: Option<String>,
    /// How long installing a package's dependencies may take.
    pub install_timeout: Duration,
    /// Where functions live (`{data_dir}/emulator/`).
    pub data_dir: PathBuf,
    /// The bootstrap packaged into the zips when `SRI_LAMBDA_BOOTSTRAP` is not set (the host's,
    /// beside `sri`: the emulator runs the host's architecture).
    pub bootstrap: PathBuf,
    /// How long a function's init may take.
    pub ready_timeout: Duration,
}

/// The deadline (s) cargo lambda gives every invocation (`lambda-runtime-deadline-ms`).
const EMULATOR_DEADLINE_S: i32 = 600;

/// The region Function URL calls are signed for when none is configured.
pub const DEFAULT_REGION: &str = "us-east-1";

struct Running {
    meta: Meta,
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
}

/// Functions as Lambda zips under cargo lambda.
pub struct EmulatorBackend {
    context: EmulatorContext,
    runner: Arc<Runner>,
    packaging: packaging::Options,
    running: Mutex<HashMap<String, Running>>,
    /// See [`EmulatorOptions::layer_grace_secs`].
    layer_grace: Duration,
}

/// This host's architecture, as Lambda names it.
pub fn host_arch() -> Result<Arch, Error> {
    std::env::consts::ARCH.parse().map_err(|_| {
        Error::Config(format!(
            "the emulator backend runs functions on this host, whose architecture ({}) Lambda \
             does not offer; use SRI_BACKEND=local",
            std::env::consts::ARCH
        ))
    })
}

impl EmulatorBackend {
    /// Checks the tools, opens the data dir and re-adopts the functions found there.
    pub async fn open(
        options: EmulatorOptions,
        context: EmulatorContext,
    ) -> Result<Arc<Self>, Error> {
        let arch = host_arch()?;
        let python_version: PythonVersion = context.lambda.python;
        let cargo_lambda = options
            .cargo_lambda
            .clone()
            .unwrap_or_else(default_cargo_lambda);
        if !cargo_lambda.is_file() {
            return Err(Error::Config(format!(
                "the emulator backend runs functions under cargo lambda, and {} is missing: set \
                 SRI_CARGO_LAMBDA (`make tools` installs it in .venv/tools/bin; `pip install \
                 cargo-lambda` does too)",
                cargo_lambda.display()
            )));
        }
        let python = match options.python.clone() {
            Some(p) => p,
            None => packaging::bytecode::find(python_version)
                .await
                .map(|i| i.path)
                .map_err(|nf| {
                    Error::Config(format!(
                        "the emulator backend needs a Python {python_version} interpreter to stand \
                         in for Lambda's managed runtime; set SRI_EMULATOR_PYTHON (tried: {})",
                        nf.tried.join(", ")
                    ))
                })?,
        };
        let functions = context.data_dir.join("emulator");
        std::fs::create_dir_all(&functions)
            .map_err(|e| Error::Backend(format!("cannot create {}: {e}", functions.display())))?;
        let readonly_mount = readonly::available(&functions).await;
        if !readonly_mount {
            tracing::warn!(
                "this host allows no mount namespace: the task roots are read-only by file mode \
                 only (writes into them fail with `Permission denied`, not Lambda's `Read-only \
                 file system`, and not at all for root)"
            );
        }
        let bootstrap = context
            .lambda
            .bootstrap
            .clone()
            .unwrap_or_else(|| context.bootstrap.clone());
        let packaging = packaging::Options {
            target: packaging::Target {
                arch,
                python: python_version,
            },
            bootstrap,
            wheelhouse: context.lambda.wheelhouse.clone(),
            offline: context.lambda.offline,
            index_url: context.index_url.clone(),
            install_timeout: context.install_timeout,
            cache_dir: context.lambda.cache_dir.clone(),
            uv: context.uv.clone(),
            bytecode: true,
            sdk_layer: context.lambda.sdk_layer,
        };
        let runner = Arc::new(Runner {
            cargo_lambda,
            python,
            region: context
                .lambda
                .region
                .clone()
                .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
            ready_timeout: context.ready_timeout,
            readonly_mount,
        });
        let this = Arc::new(Self {
            context,
            runner,
            packaging,
            running: Mutex::new(HashMap::new()),
            layer_grace: Duration::from_secs(options.layer_grace_secs),
        });
        let mut entries = tokio::fs::read_dir(&functions)
            .await
            .map_err(|e| Error::Backend(format!("reading {}: {e}", functions.display())))?;
        while let Ok(Some(entry)) = entries.next_entry().await {
            let dir = entry.path();
            let Ok(text) = tokio::fs::read(dir.join("meta.json")).await else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<Meta>(&text) else {
                tracing::warn!(dir = %dir.display(), "ignoring a function with unreadable meta.json");
                continue;
            };
            if crate::names::check(&meta.function.name).is_err() {
                continue;
            }
            process::stop_stale(&dir).await;
            tracing::info!(function = %meta.function.name, "re-adopting emulated function");
            if let Err(e) = this.start(meta, None) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot re-adopt");
            }
        }
        Ok(this)
    }

    /// The directory of function `name` (checked against the name grammar by callers).
    fn dir(&self, name: &str) -> PathBuf {
        debug_assert!(crate::names::check(name).is_ok(), "unchecked name {name:?}");
        self.context.data_dir.join("emulator").join(name)
    }

    /// Starts and supervises a built function.
    fn start(
        &self,
        meta: Meta,
        progress: Option<Progress>,
    ) -> Result<watch::Receiver<State>, Error> {
        let dir = self.dir(&meta.function.name);
        let text = std::fs::read(layout::task(&dir).join("sri-function.json")).map_err(|e| {
            Error::Backend(format!("reading the function's sri-function.json: {e}"))
        })?;
        let config: FunctionConfig = serde_json::from_slice(&text)
            .map_err(|e| Error::Backend(format!("the function's sri-function.json: {e}")))?;
        let settings = function_settings(
            &config,
            Overrides {
                memory_mb: self.context.lambda.memory_mb,
                timeout_s: self.context.lambda.timeout_s,
            },
            &self.context.signing_keys,
            &self.context.backwards_env,
        );
        let mut env = settings.env;
        let mut layer_dir = None;
        if let Some(l) = &config.layer {
            // The hash names a directory: nothing but a hash may get there.
            if !packaging::layer::is_sha256(&l.sha256) {
                return Err(Error::Backend(format!(
                    "the function's sri-function.json names the SDK layer `{}`, not a sha256; \
                     remove the function and launch it again to rebuild it",
                    l.sha256.chars().take(80).collect::<String>()
                )));
            }
            // The stand-in for the `/opt` mount: the layer unpacked once per hash.
            let site = layout::layer(&self.context.data_dir.join("emulator"), &l.sha256)
                .join(packaging::layer::SITE);
            if !site.is_dir() {
                return Err(Error::Backend(format!(
                    "the function needs the SDK layer {} (dify_plugin {}), which is not in {}; \
                     remove the function and launch it again to rebuild it",
                    l.sha256,
                    l.sdk_version,
                    site.display()
                )));
            }
            env.insert(
                "SRI_PYTHONPATH".into(),
                format!(
                    "{}:{}",
                    layout::task(&dir).join("vendor").display(),
                    site.display()
                ),
            );
            layer_dir = site.parent().map(Path::to_path_buf);
        }
        if settings.timeout_s > EMULATOR_DEADLINE_S {
            // Lambda's limit is 900 s, cargo lambda's own deadline 600 s: the plugin must still
            // give up first, so the caller gets a PluginTimeout rather than a cut stream.
            env.insert(
                "PLUGIN_MAX_EXECUTION_TIMEOUT".into(),
                plugin_budget(EMULATOR_DEADLINE_S).to_string(),
            );
        }
        let spec = Spec {
            name: meta.function.name.clone(),
            dir,
            memory_mb: settings.memory_mb,
            env,
            layer: layer_dir,
        };
        let (state_tx, state_rx) = watch::channel(State::Starting);
        let (stop_tx, stop_rx) = watch::channel(false);
        self.running.lock().expect("running lock").insert(
            meta.function.name.clone(),
            Running {
                meta,
                state: state_rx.clone(),
                stop: stop_tx,
            },
        );
        tokio::spawn(process::supervise(
            self.runner.clone(),
            spec,
            state_tx,
            stop_rx,
            progress,
        ));
        Ok(state_rx)
    }

    /// Builds the zip and lays the function out (reused when it already is, for this checksum).
    async fn build(
        &self,
        pkg: &Package,
        name: &str,
        progress: &Progress,
    ) -> Result<PathBuf, Error> {
        let final_dir = self.dir(name);
        if let Ok(text) = tokio::fs::read(final_dir.join("meta.json")).await {
            let meta: Meta = serde_json::from_slice(&text)
                .map_err(|e| Error::Backend(format!("meta.json of {name}: {e}")))?;
            if meta.function.checksum != pkg.checksum {
                return Err(Error::Backend(format!(
                    "function `{name}` already holds package {} (checksum {}), not {}; remove it \
                     (DELETE /v1/functions/{name}) to rebuild",
                    meta.function.identifier, meta.function.checksum, pkg.checksum
                )));
            }
            return Ok(final_dir);
        }
        let artifact = packaging::build(pkg, &self.packaging, progress).await?;
        let _ = progress.send((
            "package",
            format!(
                "{} Lambda zip for {} ({}, {} unzipped{}{})",
                if artifact.cache_hit {
                    "cached"
                } else {
                    "built"
                },
                artifact.target,
                packaging::human(artifact.zipped_bytes),
                packaging::human(artifact.unzipped_bytes),
                match &artifact.bytecode {
                    Some(v) => format!(", bytecode of Python {v}"),
                    None => ", no bytecode".into(),
                },
                match &artifact.layer {
                    Some(l) => format!(
                        "; SDK layer dify_plugin {}, {}",
                        l.manifest.sdk_version,
                        packaging::human(l.zipped_bytes)
                    ),
                    None => String::new(),
                }
            ),
        ));
        if let Some(l) = &artifact.layer {
            self.unpack_layer(l).await?;
        }
        let tmp = self
            .context
            .data_dir
            .join("emulator")
            .join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = layout::remove(&tmp);
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
        let (zip, t, n) = (artifact.zip.clone(), tmp.clone(), name.to_owned());
        let laid_out = tokio::task::spawn_blocking(move || -> Result<(), Error> {
            layout::unpack(&zip, &t)?;
            layout::write_cargo_shim(&t, &n)?;
            let meta = serde_json::to_vec_pretty(&meta).expect("JSON");
            std::fs::write(t.join("meta.json"), meta)
                .map_err(|e| Error::Backend(format!("writing meta.json: {e}")))
        })
        .await
        .map_err(|e| Error::Backend(format!("laying the function out stopped: {e}")))?;
        if let Err(e) = laid_out {
            let _ = layout::remove(&tmp);
            return Err(e);
        }
        tokio::fs::rename(&tmp, &final_dir).await.map_err(|e| {
            Error::Backend(format!(
                "cannot move the function into {}: {e}",
                final_dir.display()
            ))
        })?;
        Ok(final_dir)
    }

    /// Unpacks an SDK layer once per hash (read-only, like a task root); later functions of the
    /// same layer share it.
    async fn unpack_layer(&self, l: &packaging::layer::Layer) -> Result<(), Error> {
        let emulator = self.context.data_dir.join("emulator");
        let dest = layout::layer(&emulator, &l.sha256);
        if dest.join(packaging::layer::SITE).is_dir() {
            // Reused: new again for gc's grace period (SRI_EMULATOR_LAYER_GRACE_SECS), which
            // must not take it before this launch's function names it.
            let _ = std::fs::File::open(&dest)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(());
        }
        let tmp = emulator.join("layers").join(format!(
            ".{}.tmp-{}-{}",
            &l.sha256[..16],
            std::process::id(),
            rand::random::<u32>()
        ));
        let (zip, t, d) = (l.zip.clone(), tmp.clone(), dest.clone());
        tokio::task::spawn_blocking(move || -> Result<(), Error> {
            if let Err(e) = layout::unpack_into(&zip, &t) {
                let _ = layout::set_tree_writable(&t, true);
                let _ = std::fs::remove_dir_all(&t);
                return Err(e);
            }
            // Another launch may have unpacked the same layer meanwhile: either copy is it.
            if std::fs::rename(&t, &d).is_err() && d.join(packaging::layer::SITE).is_dir() {
                let _ = layout::set_tree_writable(&t, true);
                let _ = std::fs::remove_dir_all(&t);
            }
            Ok(())
        })
        .await
        .map_err(|e| Error::Backend(format!("unpacking the SDK layer stopped: {e}")))??;
        if !dest.join(packaging::layer::SITE).is_dir() {
            return Err(Error::Backend(format!(
                "cannot unpack the SDK layer into {}",
                dest.display()
            )));
        }
        Ok(())
    }

    async fn stop_function(&self, name: &str) {
        let running = self.running.lock().expect("running lock").remove(name);
        if let Some(r) = running {
            let _ = r.stop.send(true);
            let mut state = r.state.clone();
            // The supervisor closes the channel when it has stopped both processes.
            let _ = tokio::time::timeout(Duration::from_secs(15), async {
                while state.changed().await.is_ok() {}
            })
            .await;
        }
    }
}

/// `cargo-lambda` on PATH, else what `make tools` installs.
fn default_cargo_lambda() -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("cargo-lambda"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| Path::new(".venv/tools/bin/cargo-lambda").to_path_buf())
}

impl Backend for EmulatorBackend {
    fn deploy<'a>(
        &'a self,
        pkg: &'a Package,
        progress: Progress,
    ) -> BoxFuture<'a, Result<Function, Error>> {
        async move {
            if let Some(f) = self.find(&pkg.checksum) {
                return Ok(f);
            }
            let name = function_name(pkg);
            let fresh = !self.dir(&name).join("meta.json").exists();
            // A function of this name that is (re)starting or failed is started anew.
            self.stop_function(&name).await;
            let dir = self.build(pkg, &name, &progress).await?;
            let text = tokio::fs::read(dir.join("meta.json"))
                .await
                .map_err(|e| Error::Backend(format!("reading meta.json: {e}")))?;
            let meta: Meta = serde_json::from_slice(&text)
                .map_err(|e| Error::Backend(format!("meta.json: {e}")))?;
            let function = meta.function.clone();
            let mut state = self.start(meta, Some(progress.clone()))?;
            let outcome = state
                .wait_for(|s| !matches!(s, State::Starting))
                .await
                .map(|s| s.clone())
                .unwrap_or(State::Failed("the function's supervisor stopped".into()));
            let why = match outcome {
                State::Ready(_) => return Ok(function),
                State::Failed(why) => why,
                State::Starting => "the function stopped while starting".into(),
            };
            self.stop_function(&name).await;
            if fresh {
                let _ = layout::remove(&dir);
            }
            Err(Error::Backend(format!("the function's init failed: {why}")))
        }
        .boxed()
    }

    fn find(&self, checksum: &str) -> Option<Function> {
        self.running
            .lock()
            .expect("running lock")
            .values()
            .find(|r| {
                r.meta.function.checksum == checksum && matches!(*r.state.borrow(), State::Ready(_))
            })
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
        let running = self.running.lock().expect("running lock");
        match &*running.get(name)?.state.borrow() {
            State::Ready(t) => Some(t.clone()),
            _ => None,
        }
    }

    fn wait_target<'a>(&'a self, name: &'a str, within: Duration) -> BoxFuture<'a, Option<Target>> {
        async move {
            let mut state = self
                .running
                .lock()
                .expect("running lock")
                .get(name)?
                .state
                .clone();
            let ready =
                tokio::time::timeout(within, state.wait_for(|s| matches!(s, State::Ready(_))))
                    .await;
            match &*ready.ok()?.ok()? {
                State::Ready(t) => Some(t.clone()),
                _ => None,
            }
        }
        .boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let dir = self.dir(crate::names::check(name)?);
            // A function's directory holds its meta.json; `layers/` (the unpacked SDK layers,
            // a valid name too) and anything else there is not a function.
            if !dir.join("meta.json").is_file() {
                return Err(Error::Backend(format!("no function named `{name}`")));
            }
            self.stop_function(name).await;
            tokio::task::spawn_blocking(move || layout::remove(&dir))
                .await
                .map_err(|e| Error::Backend(format!("removing stopped: {e}")))?
        }
        .boxed()
    }

    fn gc(&self, keep: usize) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        async move {
            let mut removed = Vec::new();
            let functions = self.context.data_dir.join("emulator");
            for (name, path) in record::leftovers(&functions).await.unwrap_or_default() {
                let _ = layout::remove(&path);
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
            let grace = self.layer_grace;
            let layers = tokio::task::spawn_blocking(move || {
                layout::remove_unused_layers(&functions, grace)
            })
            .await
            .unwrap_or_default();
            removed.extend(layers);
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
            futures_util::future::join_all(names.iter().map(|n| self.stop_function(n))).await;
        }
        .boxed()
    }
}
