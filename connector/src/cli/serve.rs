//! `sri serve`: its options, read once, and the start-up that turns them into a running
//! connector (key ring, backend, intake, launcher, server).

use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::backend::emulator::{EmulatorBackend, EmulatorContext, EmulatorOptions};
use crate::backend::lambda::{LambdaBackend, LambdaContext, LambdaOptions};
use crate::backend::local::{LocalBackend, LocalOptions};
use crate::capability::Capabilities;
use crate::client::{Client, ClientOptions};
use crate::launch::Launcher;
use crate::protocol::signing::KeyRing;
use crate::relay::sessions::Sessions;
use crate::relay::{BackwardsMode, Relay, RelayMetrics};
use crate::secret::{self, Secret};
use crate::server::{API_KEY_ENV, AppState};

/// Options of `sri serve`.
#[derive(Debug, Args)]
pub struct ServeOptions {
    /// Address to listen on.
    #[arg(long, env = "SRI_LISTEN", default_value = "127.0.0.1:5004")]
    pub listen: SocketAddr,
    /// The URL the daemon reaches this connector at (endpoints are `{public_url}/v1/functions/{name}`).
    #[arg(long, env = "SRI_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The control plane's API key (the daemon sends it in `Authorization`); at least 16 bytes.
    #[arg(long, env = API_KEY_ENV, hide_env_values = true, value_parser = secret::parse)]
    pub api_key: Option<Secret>,
    /// Keys of the gateway's capability endpoints (`secret[,older…]`, each ≥ 32 bytes; the first
    /// issues, all are accepted). Default: derived from each key of the signing ring.
    #[arg(long, env = "SRI_ENDPOINT_SECRET", hide_env_values = true, value_parser = secret::parse)]
    pub endpoint_secret: Option<Secret>,
    /// Also serve the token-less endpoints (`/v1/functions/{name}/invoke`) of functions launched
    /// before capability endpoints, to anyone who can reach the port: for a migration only.
    #[arg(long, env = "SRI_LEGACY_ENDPOINTS")]
    pub legacy_endpoints: bool,
    /// Seconds a connection may take to send a request head (and its first bytes).
    #[arg(long, env = "SRI_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// Seconds an invoke body may take to arrive whole.
    #[arg(long, env = "SRI_BODY_READ_TIMEOUT_SECS", default_value_t = 60)]
    pub body_read_timeout_secs: u64,
    /// Seconds a launch upload (the .difypkg) may take to arrive whole.
    #[arg(long, env = "SRI_UPLOAD_TIMEOUT_SECS", default_value_t = 240)]
    pub upload_timeout_secs: u64,
    /// Connections open at once (each open daemon stream holds one); more wait in the backlog.
    #[arg(long, env = "SRI_MAX_CONNECTIONS", default_value_t = 25_000)]
    pub max_connections: usize,
    /// Seconds an invocation waits for a function that is (re)starting before `PluginNotReady`.
    #[arg(long, env = "SRI_RESTART_WAIT_SECS", default_value_t = 120)]
    pub restart_wait_secs: u64,
    /// The largest SSE line, and event, accepted from a function, in bytes.
    #[arg(long, env = "SRI_MAX_EVENT_BYTES", default_value_t = crate::client::MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
    /// SRI key ring shared with the functions (`kid:base64secret,…`).
    #[arg(long, env = "SRI_SIGNING_KEYS", hide_env_values = true, value_parser = secret::parse)]
    pub signing_keys: Option<Secret>,
    /// A Secrets Manager secret holding the key ring instead (infra/'s SigningSecretArn output).
    #[arg(long, env = "SRI_SIGNING_KEYS_SECRET_ID")]
    pub signing_keys_secret_id: Option<String>,
    /// Where functions run: `local` (processes on this host), `emulator` (the Lambda zip under
    /// cargo lambda on this host) or `lambda` (AWS Lambda).
    #[arg(long, env = "SRI_BACKEND", value_enum, default_value = "local")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub lambda: LambdaOptions,
    #[command(flatten)]
    pub emulator: EmulatorOptions,
    /// Where the local backend keeps functions.
    #[arg(long, env = "SRI_DATA_DIR", default_value = ".sri-data")]
    pub data_dir: PathBuf,
    /// The `bootstrap` binary (default: beside `sri`).
    #[arg(long, env = "SRI_BOOTSTRAP_BIN")]
    pub bootstrap: Option<PathBuf>,
    /// Python that plugin venvs are made from.
    #[arg(long, env = "SRI_PYTHON", default_value = "python3")]
    pub python: String,
    /// `uv` for fast dependency installs (default: `uv` on PATH; pip otherwise).
    #[arg(long, env = "SRI_UV")]
    pub uv: Option<PathBuf>,
    /// What installs a local function's dependencies: `auto` (uv when there is one, else the
    /// venv's pip), `uv`, or `pip` (honours pip's own configuration: pip.conf, PIP_INDEX_URL).
    #[arg(long, env = "SRI_INSTALLER", value_enum, default_value = "auto")]
    pub installer: Installer,
    /// The package index dependency installs use (default: the installer's own settings,
    /// `UV_INDEX_URL` / `PIP_INDEX_URL` or PyPI); a package can never choose one.
    #[arg(long, env = "SRI_INDEX_URL")]
    pub index_url: Option<String>,
    /// Seconds one dependency install step may take before it is killed.
    #[arg(long, env = "SRI_INSTALL_TIMEOUT_SECS", default_value_t = 900)]
    pub install_timeout_secs: u64,
    /// The daemon's private address: where the relay forwards backwards invocations (and, in
    /// direct mode only, what functions are given).
    #[arg(long, env = "DIFY_PLUGIN_DAEMON_URL")]
    pub daemon_url: Option<String>,
    /// The relay for backwards invocations.
    #[command(flatten)]
    pub relay: crate::relay::RelayOptions,
    /// What a package may expand to (the intake's limits).
    #[command(flatten)]
    pub intake: crate::intake::Limits,
    /// The local backend's plugin sandbox.
    #[command(flatten)]
    pub sandbox: crate::sandbox::SandboxOptions,
    /// Refuse packages whose signature the daemon did not verify (pair with the daemon's
    /// `FORCE_VERIFYING_SIGNATURE`).
    #[arg(long, env = "SRI_REQUIRE_VERIFIED", default_value_t = false, action = clap::ArgAction::Set)]
    pub require_verified: bool,
    /// Largest invoke body accepted.
    #[arg(long, env = "MAX_SERVERLESS_REQUEST_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Seconds a new function may take to become ready.
    #[arg(long, env = "SRI_READY_TIMEOUT_SECS", default_value_t = 120)]
    pub ready_timeout_secs: u64,
    /// Concurrent invocations per local function that get an HTTP/1.1 connection of their own
    /// (lowest latency); further ones share one h2c connection (least memory per stream).
    #[arg(long, env = "SRI_DEDICATED_STREAMS", default_value_t = crate::client::DEFAULT_DEDICATED_STREAMS)]
    pub dedicated_streams: usize,
}

/// What installs a local function's dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Installer {
    /// uv when there is one, else pip.
    Auto,
    /// uv (`SRI_UV`, or `uv` on PATH).
    Uv,
    /// The venv's own pip.
    Pip,
}

/// The backends `sri serve` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// `bootstrap serve` processes on this host (no cloud account).
    Local,
    /// The Lambda zip of each function under `cargo lambda watch` on this host (no AWS account).
    Emulator,
    /// AWS Lambda functions.
    Lambda,
}

pub(super) async fn serve(o: ServeOptions) -> anyhow::Result<()> {
    let api_key =
        crate::server::check_api_key(o.api_key.as_ref().map(|k| k.0.as_str()))?.to_owned();
    raise_open_file_limit();
    // Loaded once, lazily: only the secret lookup and the Lambda backend need AWS.
    let needs_aws = o.signing_keys_secret_id.is_some() || o.backend == BackendKind::Lambda;
    let sdk = match needs_aws {
        true => Some(
            crate::aws::sdk_config(o.lambda.region.as_deref(), o.lambda.endpoint_url.as_deref())
                .await,
        ),
        false => None,
    };
    let given = o.signing_keys.clone().filter(|k| !k.0.trim().is_empty());
    let signing_keys = match (given, &o.signing_keys_secret_id) {
        (Some(_), Some(_)) => {
            anyhow::bail!("both SRI_SIGNING_KEYS and SRI_SIGNING_KEYS_SECRET_ID are set; keep one")
        }
        (Some(k), None) => k,
        (None, Some(id)) => {
            let sdk = sdk.as_ref().expect("loaded when a secret id is set");
            crate::aws::signing_keys_from_secret(sdk, id).await?
        }
        (None, None) => anyhow::bail!(
            "no SRI signing keys: set SRI_SIGNING_KEYS (`kid:base64secret,…`, secrets ≥ 32 \
             bytes) or SRI_SIGNING_KEYS_SECRET_ID (a Secrets Manager secret holding them)"
        ),
    };
    let keys: KeyRing = signing_keys.0.parse()?;
    let capabilities = match &o.endpoint_secret {
        Some(s) if !s.0.trim().is_empty() => Capabilities::from_secrets(&s.0)?,
        _ => Capabilities::from_ring(&keys),
    };
    let listener = crate::server::bind(o.listen).await?;
    let public_url = match o.public_url.clone() {
        Some(u) => u,
        None => format!("http://{}", listener.local_addr()?),
    };
    anyhow::ensure!(
        !public_url.contains(',') && !public_url.contains('='),
        "SRI_PUBLIC_URL must not contain `,` or `=` (the daemon's launch parser splits on them)"
    );
    let relay_listener = tokio::net::TcpListener::bind(o.relay.relay_listen)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (SRI_RELAY_LISTEN): {e}",
                o.relay.relay_listen
            )
        })?;
    let relay_url = match o.relay.relay_public_url.clone() {
        Some(u) => {
            anyhow::ensure!(
                u.starts_with("https://") || u.starts_with("http://"),
                "SRI_RELAY_PUBLIC_URL must be an http(s) URL (e.g. https://relay.example.com), \
                 got `{u}`"
            );
            u.trim_end_matches('/').to_owned()
        }
        None => {
            if o.backend == BackendKind::Lambda && o.relay.backwards == BackwardsMode::Relay {
                tracing::warn!(
                    "SRI_RELAY_PUBLIC_URL is not set: Lambda functions are given the relay's \
                     loopback address, which only a local emulator reaches; set it to the \
                     relay's public URL (infra/README.md) or choose SRI_BACKWARDS=direct"
                );
            }
            format!("http://{}", relay_listener.local_addr()?)
        }
    };
    let backwards_env =
        crate::relay::function_env(o.relay.backwards, &relay_url, o.daemon_url.as_deref());
    let relay_sessions = Arc::new(Sessions::new(
        Duration::from_secs(o.relay.relay_grace_secs),
        Duration::from_secs(o.relay.relay_session_ttl_secs),
    ));
    let uv = o.uv.clone().or_else(|| find_on_path("uv"));
    let relay_keys = keys.clone();
    let mut client = Client::new(
        keys,
        ClientOptions {
            dedicated_streams: o.dedicated_streams,
            max_event_bytes: o.max_event_bytes,
            ..ClientOptions::default()
        },
    );
    let bootstrap = match o.bootstrap.clone() {
        Some(b) => b,
        None => std::env::current_exe()?.with_file_name("bootstrap"),
    };
    let backend: Arc<dyn Backend> = match o.backend {
        BackendKind::Local => {
            anyhow::ensure!(
                bootstrap.exists(),
                "the bootstrap binary {} is missing; set SRI_BOOTSTRAP_BIN",
                bootstrap.display()
            );
            let uv = match o.installer {
                Installer::Auto => uv,
                Installer::Pip => None,
                Installer::Uv => Some(uv.ok_or_else(|| {
                    anyhow::anyhow!(
                        "SRI_INSTALLER=uv, but there is no uv: set SRI_UV or put uv on PATH"
                    )
                })?),
            };
            LocalBackend::open(LocalOptions {
                data_dir: o.data_dir.clone(),
                bootstrap,
                python: o.python.clone(),
                uv,
                signing_keys: signing_keys.0.clone(),
                backwards_env,
                ready_timeout: Duration::from_secs(o.ready_timeout_secs),
                index_url: o.index_url.clone(),
                install_timeout: Duration::from_secs(o.install_timeout_secs),
                sandbox: o.sandbox.clone(),
            })
            .await?
        }
        BackendKind::Emulator => {
            let uv = uv.ok_or_else(|| {
                anyhow::anyhow!(
                    "the emulator backend installs plugin dependencies with uv: put `uv` on PATH \
                     or set SRI_UV (`make tools` installs one in .venv/tools/bin)"
                )
            })?;
            let region = o
                .lambda
                .region
                .clone()
                .unwrap_or_else(|| crate::backend::emulator::DEFAULT_REGION.to_owned());
            client = client.with_aws(&crate::aws::emulator_config(&region));
            EmulatorBackend::open(
                o.emulator.clone(),
                EmulatorContext {
                    lambda: o.lambda.clone(),
                    signing_keys: signing_keys.clone(),
                    backwards_env: backwards_env.clone(),
                    uv,
                    index_url: o.index_url.clone(),
                    install_timeout: Duration::from_secs(o.install_timeout_secs),
                    data_dir: o.data_dir.clone(),
                    bootstrap: bootstrap.clone(),
                    ready_timeout: Duration::from_secs(o.ready_timeout_secs),
                },
            )
            .await?
        }
        BackendKind::Lambda => {
            let uv = uv.ok_or_else(|| {
                anyhow::anyhow!(
                    "the lambda backend installs plugin dependencies with uv: put `uv` on PATH \
                     or set SRI_UV (`make tools` installs one in .venv/tools/bin)"
                )
            })?;
            let sdk = sdk.as_ref().expect("loaded for the lambda backend");
            client = client.with_aws(sdk);
            LambdaBackend::open(
                sdk,
                o.lambda.clone(),
                LambdaContext {
                    signing_keys: signing_keys.clone(),
                    backwards_env,
                    uv,
                    index_url: o.index_url.clone(),
                    install_timeout: Duration::from_secs(o.install_timeout_secs),
                },
            )
            .await?
        }
    };
    // The connector owns this directory: whatever an interrupted intake left there goes.
    let intake = crate::intake::Intake::new(o.intake.clone(), o.data_dir.join("intake"))?;
    intake.sweep();
    let launcher = Arc::new(Launcher::new(backend.clone(), public_url, capabilities));
    let state = Arc::new(AppState {
        backend,
        launcher,
        client,
        metrics: Default::default(),
        api_key,
        intake: Arc::new(intake),
        require_verified: o.require_verified,
        max_request_bytes: o.max_request_bytes,
        start_wait: Duration::from_secs(o.restart_wait_secs),
        limits: crate::server::Limits {
            header_read_timeout: Duration::from_secs(o.header_read_timeout_secs),
            body_read_timeout: Duration::from_secs(o.body_read_timeout_secs),
            upload_timeout: Duration::from_secs(o.upload_timeout_secs),
            max_connections: o.max_connections,
        },
        legacy_endpoints: o.legacy_endpoints,
        relay_sessions: relay_sessions.clone(),
    });
    if let Some(report) = state.backend.sandbox() {
        state.metrics.sandbox(&report);
    }
    let relay = Arc::new(Relay::new(
        relay_keys,
        relay_sessions,
        o.daemon_url.as_deref(),
        &o.relay,
        state.limits.body_read_timeout,
        RelayMetrics::of(&state.metrics),
    ));
    let (stop_relay, relay_stopped) = tokio::sync::oneshot::channel::<()>();
    let relay_task = tokio::spawn(crate::relay::serve(
        relay,
        relay_listener,
        state.limits,
        async move {
            let _ = relay_stopped.await;
        },
    ));
    if o.legacy_endpoints {
        tracing::warn!(
            "SRI_LEGACY_ENDPOINTS is set: token-less endpoints run plugins for anyone who can \
             reach this port; re-launch the plugins and unset it (README: Upgrading)"
        );
    }
    let served = crate::server::serve(state, listener, shutdown_signal()).await;
    let _ = stop_relay.send(());
    let _ = relay_task.await;
    served?;
    Ok(())
}

/// Every open stream holds two sockets (daemon side and function side): the usual soft limit
/// of 1024 would refuse new streams at ~500. Raise the soft limit to the hard one.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit"),
        }
    }
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("stopping");
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
