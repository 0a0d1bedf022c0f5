//! The bootstrap: a custom AWS Lambda runtime (and plain HTTP server) that runs a Dify plugin's
//! Python process behind SRI (v2; v1 while `SRI_ACCEPT_V1` allows).
//!
//! [`supervisor`] keeps the plugin process running, [`process`] speaks its stdio protocol,
//! [`invocation`] turns SRI requests into plugin sessions, and [`lambda`] / [`serve`] are the
//! two transports over that one handler core.

pub mod backwards;
pub mod config;
pub mod error;
pub mod init;
pub mod invocation;
pub mod lambda;
pub mod lines;
pub mod process;
pub mod redact;
#[cfg(feature = "sandbox")]
pub mod sandbox;
#[cfg(feature = "serve")]
pub mod serve;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::Config;
pub use error::Error;

use config::Mode;
use connector::protocol::signing::KeyRing;
use invocation::{Auth, Handler, Limits};
use process::{Shared, Spec};
use redact::Redactor;
use supervisor::Supervisor;

/// The variable Lambda hands the runtime its API's address in.
pub const RUNTIME_API_ENV: &str = "AWS_LAMBDA_RUNTIME_API";

/// The Lambda Runtime API's address: taken out of the environment at start (see
/// `connector::harden`), or still in it when the library runs without the binary's `main`.
fn runtime_api() -> Option<String> {
    connector::harden::secret(RUNTIME_API_ENV)
        .map(str::to_owned)
        .or_else(|| std::env::var(RUNTIME_API_ENV).ok())
}

/// How long the plugin gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_millis(300);

/// Runs the bootstrap in the mode `config` selects.
pub async fn run(config: Config) -> Result<(), Error> {
    let started = Instant::now();
    match config.mode.clone() {
        #[cfg(feature = "serve")]
        Some(Mode::Serve { listen, limits }) => {
            let handler = build(&config, started)?;
            serve::serve(
                handler.clone(),
                listen,
                config.plugin.max_request_bytes,
                limits,
                shutdown_signal(),
            )
            .await?;
            handler.supervisor().shutdown(STOP_GRACE).await;
            Ok(())
        }
        #[cfg(feature = "sandbox")]
        Some(Mode::SandboxProbe) => {
            let report = sandbox::probe_report(&config.plugin.sandbox);
            println!("{}", serde_json::to_string(&report).expect("JSON"));
            Ok(())
        }
        Some(Mode::Lambda) | None => {
            let api = runtime_api().ok_or_else(|| {
                Error::RuntimeApi(
                    "AWS_LAMBDA_RUNTIME_API is not set: run inside Lambda (or `cargo lambda watch`), or use `bootstrap serve`".into(),
                )
            })?;
            let setup = async { build(&config, started) };
            let handler_slot = Arc::new(std::sync::Mutex::new(None::<Arc<Handler>>));
            let slot = handler_slot.clone();
            tokio::spawn(async move {
                shutdown_signal().await;
                let handler = slot.lock().expect("handler slot").clone();
                if let Some(h) = handler {
                    h.supervisor().shutdown(STOP_GRACE).await;
                }
                std::process::exit(0);
            });
            let setup = async move {
                let h = setup.await?;
                *handler_slot.lock().expect("handler slot") = Some(h.clone());
                Ok(h)
            };
            lambda::run(&api, setup, config.plugin.ready_timeout(), &config.lambda).await
        }
    }
}

/// Builds the handler and starts the plugin.
pub fn build(config: &Config, started: Instant) -> Result<Arc<Handler>, Error> {
    let o = &config.plugin;
    let keys: KeyRing = match &o.signing_keys {
        Some(s) => s.0.parse()?,
        None => KeyRing::from_env()?,
    };
    if o.session_buffer_bytes < o.max_line_bytes {
        return Err(Error::Config(format!(
            "SRI_SESSION_BUFFER_BYTES ({}) must be at least PLUGIN_RUNTIME_MAX_BUFFER_SIZE ({}): \
             a session must be able to queue its longest line",
            o.session_buffer_bytes, o.max_line_bytes
        )));
    }
    let env = plugin_env(&o.plugin_env)?;
    let plugin_dir = o.plugin_dir();
    let manifest = manifest(o, &plugin_dir)?;
    let redactor = Arc::new(Redactor::default());
    let route = backwards::Route::new(
        o.backwards,
        o.relay_url.as_deref(),
        o.daemon_url.as_deref(),
        keys.clone(),
        o.function_name(),
    );
    let backwards = Arc::new(backwards::Backwards::new(
        route,
        Duration::from_secs(o.backwards_timeout_secs),
        o.max_line_bytes,
        redactor.clone(),
    ));
    let shared = Arc::new(Shared {
        redactor: redactor.clone(),
        buffered: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        max_buffered: o.max_buffered_bytes,
        session_budget: o.session_buffer_bytes,
        max_line: o.max_line_bytes,
        backwards,
    });
    let spec = Spec {
        confine: confine(config, &manifest, &plugin_dir)?,
        python: o.python.clone(),
        entrypoint: manifest.entrypoint.clone(),
        plugin_dir,
        python_path: o.python_path(),
        env,
    };
    tracing::info!(plugin = %manifest.identity(), dir = %spec.plugin_dir.display(), "starting plugin");
    let supervisor = Supervisor::start(spec, shared, o.ready_timeout())?;
    let limits = Limits {
        max_request_bytes: o.max_request_bytes,
        max_execution: Duration::from_secs(o.max_execution_secs),
        deadline_margin: Duration::from_millis(o.deadline_margin_ms),
        keepalive: Duration::from_secs(o.keepalive_secs.max(1)),
        max_clock_skew_secs: o.max_clock_skew_secs,
        ready_timeout: o.ready_timeout(),
        max_line_bytes: o.max_line_bytes,
    };
    let auth = Auth {
        keys,
        function: o.function_name(),
        accept_v1: o.accept_v1,
    };
    tracing::info!(function = %auth.function, accept_v1 = auth.accept_v1, "SRI v2 verification");
    Ok(Arc::new(Handler::new(
        supervisor,
        auth,
        redactor,
        limits,
        manifest.identity(),
        started,
    )))
}

/// The plugin's manifest: the packager's record of it in a function zip, else `manifest.yaml`.
fn manifest(
    o: &config::PluginOptions,
    plugin_dir: &std::path::Path,
) -> Result<connector::manifest::Manifest, Error> {
    if let Some(record) = o.manifest_record() {
        return Ok(connector::manifest::Manifest::load_record(&record)?);
    }
    #[cfg(feature = "manifest-yaml")]
    return Ok(connector::manifest::Manifest::load(plugin_dir)?);
    #[cfg(not(feature = "manifest-yaml"))]
    Err(connector::Error::Manifest {
        path: plugin_dir.join("manifest.yaml").display().to_string(),
        reason: format!(
            "this Lambda build of the bootstrap reads only the packager's record of the manifest \
             ({} at LAMBDA_TASK_ROOT), and there is none: package the plugin with `sri package`, \
             or run a default build of the bootstrap, which reads manifest.yaml",
            connector::manifest::RECORD_FILE
        ),
    }
    .into())
}

/// The plugin's sandbox (`bootstrap serve` only: on Lambda, Firecracker is the sandbox).
#[cfg(feature = "sandbox")]
fn confine(
    config: &Config,
    manifest: &connector::manifest::Manifest,
    plugin_dir: &std::path::Path,
) -> Result<Option<Arc<dyn process::Confine>>, Error> {
    let o = &config.plugin;
    if !matches!(config.mode, Some(Mode::Serve { .. })) {
        if o.sandbox.mode != sandbox::Mode::Off {
            tracing::warn!(
                "SRI_SANDBOX applies to `bootstrap serve` only; on Lambda the function's own VM is the sandbox"
            );
        }
        return Ok(None);
    }
    let needs = sandbox::Needs {
        plugin_dir: std::fs::canonicalize(plugin_dir).unwrap_or_else(|_| plugin_dir.to_path_buf()),
        python: o.python.clone(),
        python_path: o.python_path(),
        memory_bytes: manifest.memory_bytes,
        function: o.function_name(),
    };
    Ok(sandbox::Plan::new(&o.sandbox, &needs)?.map(|p| p as Arc<dyn process::Confine>))
}

/// Without the `sandbox` feature (Lambda builds) the plugin is a plain child process.
#[cfg(not(feature = "sandbox"))]
fn confine(
    _: &Config,
    _: &connector::manifest::Manifest,
    _: &std::path::Path,
) -> Result<Option<Arc<dyn process::Confine>>, Error> {
    Ok(None)
}

/// Variables the plugin inherits: what a Python program needs to run, reach the network and
/// know where it is, and nothing that would let it act as the runtime.
const PLUGIN_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "TMP",
    "TEMP",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "LAMBDA_TASK_ROOT",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_LAMBDA_FUNCTION_NAME",
    "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
    // The SDK's own settings.
    "MAX_REQUEST_TIMEOUT",
    "MAX_INVOCATION_TIMEOUT",
    "HEARTBEAT_INTERVAL",
];

/// Prefixes of variables the plugin inherits (locale, the interpreter's settings).
const PLUGIN_ENV_PREFIXES: &[&str] = &["LC_", "PYTHON"];

/// Never passed to the plugin, even when named in `SRI_PLUGIN_ENV`.
const NEVER_TO_PLUGIN: &[&str] = &[
    "AWS_LAMBDA_RUNTIME_API",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
];

/// The plugin's environment: the allowlist plus `extra` (`SRI_PLUGIN_ENV`), taken from this
/// process's environment. Naming a secret in `extra` is refused.
pub fn plugin_env(
    extra: &[String],
) -> Result<Vec<(std::ffi::OsString, std::ffi::OsString)>, Error> {
    let secret = |name: &str| {
        connector::harden::SECRET_ENV.contains(&name)
            || NEVER_TO_PLUGIN.contains(&name)
            || name.starts_with("AWS_CONTAINER_")
    };
    for name in extra.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
        if secret(name) {
            return Err(Error::Config(format!(
                "SRI_PLUGIN_ENV names `{name}`, which the plugin must never see (secrets, AWS \
                 credentials, AWS_LAMBDA_RUNTIME_API): remove it from SRI_PLUGIN_ENV"
            )));
        }
    }
    Ok(std::env::vars_os()
        .filter(|(k, _)| {
            let Some(k) = k.to_str() else { return false };
            !secret(k)
                && (PLUGIN_ENV.contains(&k)
                    || PLUGIN_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
                    || extra.iter().any(|e| e.trim() == k))
        })
        .collect())
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; stopping"),
        _ = int.recv() => tracing::info!("SIGINT received; stopping"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_env_refuses_secrets_and_keeps_to_the_allowlist() {
        for name in [
            "SRI_SIGNING_KEYS",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_LAMBDA_RUNTIME_API",
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
        ] {
            let err = plugin_env(&[name.to_owned()]).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains("SRI_PLUGIN_ENV"),
                "{err}"
            );
        }
        let env = plugin_env(&["HOSTNAME".to_owned()]).unwrap();
        for (k, _) in &env {
            let k = k.to_str().unwrap();
            assert!(
                PLUGIN_ENV.contains(&k)
                    || PLUGIN_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
                    || k == "HOSTNAME",
                "{k} passed to the plugin"
            );
            assert!(!connector::harden::SECRET_ENV.contains(&k));
        }
    }
}
