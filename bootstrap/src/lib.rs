//! The bootstrap: a custom AWS Lambda runtime (and plain HTTP server) that runs a Dify plugin's
//! Python process behind SRI v1.
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
pub mod serve;
pub mod supervisor;

use std::sync::Arc;
use std::time::{Duration, Instant};

pub use config::Config;
pub use error::Error;

use config::Mode;
use connector::protocol::signing::KeyRing;
use invocation::{Handler, Limits};
use process::{Shared, Spec};
use redact::Redactor;
use supervisor::Supervisor;

/// How long the plugin gets to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_millis(300);

/// Runs the bootstrap in the mode `config` selects.
pub async fn run(config: Config) -> Result<(), Error> {
    let started = Instant::now();
    match config.mode.clone() {
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
        Some(Mode::Lambda) | None => {
            let api = std::env::var("AWS_LAMBDA_RUNTIME_API").map_err(|_| {
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
            lambda::run(&api, setup, config.plugin.ready_timeout()).await
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
    let plugin_dir = o.plugin_dir();
    let manifest = connector::manifest::Manifest::load(&plugin_dir)?;
    let redactor = Arc::new(Redactor::default());
    let backwards = Arc::new(backwards::Backwards::new(
        o.daemon_url.as_deref(),
        Duration::from_secs(o.backwards_timeout_secs),
        o.max_line_bytes,
        redactor.clone(),
    ));
    let shared = Arc::new(Shared {
        redactor: redactor.clone(),
        budget: Arc::new(tokio::sync::Semaphore::new(o.max_buffered_bytes)),
        max_buffered: o.max_buffered_bytes,
        max_line: o.max_line_bytes,
        backwards,
    });
    let spec = Spec {
        python: o.python.clone(),
        entrypoint: manifest.entrypoint.clone(),
        plugin_dir,
        python_path: o.python_path(),
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
    Ok(Arc::new(Handler::new(
        supervisor,
        keys,
        redactor,
        limits,
        manifest.identity(),
        started,
    )))
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
