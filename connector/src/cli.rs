//! The `sri` command line: `serve`, and the same operations from a terminal (`package`,
//! `deploy`, `invoke`, `list`, `remove`, `gc`) against a running `sri serve`.

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::backend::Backend;
use crate::backend::lambda::{LambdaBackend, LambdaContext, LambdaOptions};
use crate::backend::local::{LocalBackend, LocalOptions};
use crate::capability::Capabilities;
use crate::client::{Client, ClientOptions};
use crate::launch::Launcher;
use crate::logging::{LogFormat, parse_log_format};
use crate::package::Package;
use crate::packaging::{self, Arch, PythonVersion, Target};
use crate::protocol::signing::KeyRing;
use crate::secret::{self, Secret};
use crate::server::{API_KEY_ENV, AppState};

/// The Dify serverless connector: runs plugins as functions for a daemon with
/// `PLATFORM=serverless`.
#[derive(Debug, Parser)]
#[command(name = "sri", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format: `text` or `json`.
    #[arg(long, global = true, env = "AWS_LAMBDA_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the control plane and the gateway (the daemon's DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL).
    Serve(Box<ServeOptions>),
    /// Build the AWS Lambda zip of a plugin (directory or .difypkg) for an architecture and
    /// Python runtime; with `--difypkg`, write the package the daemon would upload instead.
    Package(PackageOptions),
    /// Deploy a plugin through a running connector, showing progress.
    Deploy {
        /// A plugin directory or a `.difypkg`.
        path: PathBuf,
        #[command(flatten)]
        remote: Remote,
    },
    /// Invoke a function through the gateway and stream its output.
    Invoke(InvokeOptions),
    /// List the deployed functions.
    List {
        #[command(flatten)]
        remote: Remote,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a function.
    Remove {
        /// Function name.
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove leftovers and superseded versions of each plugin.
    Gc {
        /// Versions kept per plugin.
        #[arg(long, default_value_t = 2)]
        keep: usize,
        #[command(flatten)]
        remote: Remote,
    },
}

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
    /// SRI v1 key ring shared with the functions (`kid:base64secret,…`).
    #[arg(long, env = "SRI_SIGNING_KEYS", hide_env_values = true, value_parser = secret::parse)]
    pub signing_keys: Option<Secret>,
    /// A Secrets Manager secret holding the key ring instead (infra/'s SigningSecretArn output).
    #[arg(long, env = "SRI_SIGNING_KEYS_SECRET_ID")]
    pub signing_keys_secret_id: Option<String>,
    /// Where functions run: `local` (processes on this host) or `lambda` (AWS Lambda).
    #[arg(long, env = "SRI_BACKEND", value_enum, default_value = "local")]
    pub backend: BackendKind,
    #[command(flatten)]
    pub lambda: LambdaOptions,
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
    /// The daemon's address, handed to functions for backwards invocations.
    #[arg(long, env = "DIFY_PLUGIN_DAEMON_URL")]
    pub daemon_url: Option<String>,
    /// What a package may expand to (the intake's limits).
    #[command(flatten)]
    pub intake: crate::intake::Limits,
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
    /// AWS Lambda functions.
    Lambda,
}

/// Options of `sri package`.
#[derive(Debug, Args)]
pub struct PackageOptions {
    /// A plugin directory or a `.difypkg`.
    pub path: PathBuf,
    /// Where to write the zip (default: `<author>-<name>-<version>-<arch>-py<version>.zip`), or
    /// with `--difypkg` the package (default: `<author>@<name>@<version>@<checksum>.difypkg`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Only check the plugin and write the `.difypkg` (no Lambda zip).
    #[arg(long)]
    pub difypkg: bool,
    /// Lambda architecture: `arm64` or `x86_64`.
    #[arg(long, env = "SRI_LAMBDA_ARCH", default_value = "arm64")]
    pub arch: Arch,
    /// Lambda Python runtime: `3.11`, `3.12` or `3.13`.
    #[arg(long, env = "SRI_LAMBDA_PYTHON", default_value = "3.12")]
    pub python: PythonVersion,
    /// A directory of wheels searched before the index (`--find-links`).
    #[arg(long, env = "SRI_WHEELHOUSE")]
    pub wheelhouse: Option<PathBuf>,
    /// Install only from `--wheelhouse`, never from an index (air-gapped builds).
    #[arg(long, env = "SRI_OFFLINE")]
    pub offline: bool,
    /// The package index (default: uv's own, `UV_INDEX_URL` or PyPI).
    #[arg(long, env = "SRI_INDEX_URL")]
    pub index_url: Option<String>,
    /// Seconds installing the dependencies may take before uv is killed.
    #[arg(long, env = "SRI_INSTALL_TIMEOUT_SECS", default_value_t = 900)]
    pub install_timeout_secs: u64,
    /// Ship no bytecode even when a matching interpreter is found.
    #[arg(long)]
    pub no_bytecode: bool,
    /// The bootstrap binary for `--arch` (default: `SRI_BOOTSTRAP_ARM64` / `SRI_BOOTSTRAP_X86_64`,
    /// else `target/lambda/<arch>/bootstrap` from `make lambda-bootstrap`).
    #[arg(long)]
    pub bootstrap: Option<PathBuf>,
    /// Built zips and uv's download cache (default: `$XDG_CACHE_HOME/sri` or `~/.cache/sri`).
    #[arg(long, env = "SRI_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The uv binary (default: `uv` on PATH, else `.venv/tools/bin/uv`).
    #[arg(long, env = "SRI_UV")]
    pub uv: Option<PathBuf>,
}

/// Where a running connector is.
#[derive(Debug, Args)]
pub struct Remote {
    /// The connector's URL.
    #[arg(long, env = "SRI_URL", default_value = "http://127.0.0.1:5004")]
    pub url: String,
    /// Its API key.
    #[arg(long, env = API_KEY_ENV, hide_env_values = true, value_parser = secret::parse)]
    pub api_key: Option<Secret>,
}

/// Options of `sri invoke`.
#[derive(Debug, Args)]
pub struct InvokeOptions {
    /// Function name (see `sri list`).
    pub name: String,
    /// Dify action.
    #[arg(long, default_value = "invoke_tool")]
    pub action: String,
    /// Tool provider.
    #[arg(long)]
    pub provider: String,
    /// Tool name.
    #[arg(long, default_value = "")]
    pub tool: String,
    /// Tool parameters (JSON object).
    #[arg(long, default_value = "{}")]
    pub params: String,
    /// Credentials (JSON object).
    #[arg(long, default_value = "{}")]
    pub credentials: String,
    /// Print the daemon's raw NDJSON objects.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote: Remote,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(o) => serve(*o).await,
        Command::Package(o) => package(o).await,
        Command::Deploy { path, remote } => deploy(&path, &remote).await,
        Command::Invoke(o) => invoke(o).await,
        Command::List { remote, json } => {
            let v: Value = request(&remote, reqwest::Method::GET, "/v1/runner/instances")
                .send()
                .await?
                .json()
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for i in v["Items"].as_array().into_iter().flatten() {
                    println!(
                        "{:<48} {:<60} {}",
                        i["Name"].as_str().unwrap_or(""),
                        i["Identifier"].as_str().unwrap_or(""),
                        i["Endpoint"].as_str().unwrap_or("")
                    );
                }
            }
            Ok(())
        }
        Command::Remove { name, remote } => {
            crate::names::check(&name)?;
            let resp = request(
                &remote,
                reqwest::Method::DELETE,
                &format!("/v1/functions/{name}"),
            )
            .send()
            .await?;
            let ok = resp.status().is_success();
            let v: Value = resp.json().await.unwrap_or_default();
            anyhow::ensure!(ok, "{}", v["error"].as_str().unwrap_or("remove failed"));
            println!("removed {name}");
            Ok(())
        }
        Command::Gc { keep, remote } => {
            let v: Value = request(
                &remote,
                reqwest::Method::POST,
                &format!("/v1/gc?keep={keep}"),
            )
            .send()
            .await?
            .json()
            .await?;
            for r in v["removed"].as_array().into_iter().flatten() {
                println!("removed {}", r.as_str().unwrap_or_default());
            }
            anyhow::ensure!(
                v["error"].as_str().unwrap_or_default().is_empty(),
                "{}",
                v["error"]
            );
            Ok(())
        }
    }
}

async fn package(o: PackageOptions) -> anyhow::Result<()> {
    let pkg = load(&o.path)?;
    if o.difypkg {
        let out = o.output.unwrap_or_else(|| PathBuf::from(pkg.filename()));
        std::fs::write(&out, &pkg.bytes)?;
        println!(
            "{}\n  checksum {}\n  wrote {}",
            pkg.unique_identifier(),
            pkg.checksum,
            out.display()
        );
        return Ok(());
    }
    let target = Target {
        arch: o.arch,
        python: o.python,
    };
    let mut opts = packaging::Options::new(target);
    if let Some(b) = o.bootstrap {
        opts.bootstrap = b;
    }
    if let Some(c) = o.cache_dir {
        opts.cache_dir = c;
    }
    if let Some(uv) = o.uv {
        opts.uv = uv;
    }
    opts.wheelhouse = o.wheelhouse;
    opts.offline = o.offline;
    opts.index_url = o.index_url;
    opts.install_timeout = Duration::from_secs(o.install_timeout_secs);
    opts.bytecode = !o.no_bytecode;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some((stage, msg)) = rx.recv().await {
            eprintln!("[{stage}] {msg}");
        }
    });
    let result = packaging::build(&pkg, &opts, &tx).await;
    drop(tx);
    let _ = printer.await;
    let a = result?;
    let m = &pkg.manifest;
    let out = o.output.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}-{}-{}.zip",
            m.author,
            m.name,
            m.version,
            target.slug()
        ))
    });
    // A copy: the cached zip stays for the next build.
    std::fs::copy(&a.zip, &out)?;
    println!(
        "{} for {target}\n  zip          {}\n  code sha256  {}\n  zipped       {}{}\n  unzipped     {} (limit {})\n  bytecode     {}\n  cache        {}",
        pkg.unique_identifier(),
        out.display(),
        a.code_sha256,
        packaging::human(a.zipped_bytes),
        if a.needs_s3() {
            " (over 50 MiB: the backend uploads it through S3)"
        } else {
            ""
        },
        packaging::human(a.unzipped_bytes),
        packaging::human(packaging::UNZIPPED_LIMIT),
        a.bytecode
            .as_deref()
            .map_or("none".to_owned(), |v| format!("Python {v}")),
        if a.cache_hit { "hit" } else { "miss" },
    );
    Ok(())
}

async fn serve(o: ServeOptions) -> anyhow::Result<()> {
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
            "no SRI v1 signing keys: set SRI_SIGNING_KEYS (`kid:base64secret,…`, secrets ≥ 32 \
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
    let uv = o.uv.clone().or_else(|| find_on_path("uv"));
    let mut client = Client::new(
        keys,
        ClientOptions {
            dedicated_streams: o.dedicated_streams,
            max_event_bytes: o.max_event_bytes,
            ..ClientOptions::default()
        },
    );
    let backend: Arc<dyn Backend> = match o.backend {
        BackendKind::Local => {
            let bootstrap = match o.bootstrap {
                Some(b) => b,
                None => std::env::current_exe()?.with_file_name("bootstrap"),
            };
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
                daemon_url: o.daemon_url.clone(),
                ready_timeout: Duration::from_secs(o.ready_timeout_secs),
                index_url: o.index_url.clone(),
                install_timeout: Duration::from_secs(o.install_timeout_secs),
            })
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
                    daemon_url: o.daemon_url.clone(),
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
    });
    if o.legacy_endpoints {
        tracing::warn!(
            "SRI_LEGACY_ENDPOINTS is set: token-less endpoints run plugins for anyone who can \
             reach this port; re-launch the plugins and unset it (README: Upgrading)"
        );
    }
    crate::server::serve(state, listener, shutdown_signal()).await?;
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

/// Reads a `.difypkg`, or packs a plugin directory the way the daemon can checksum it
/// ([`crate::package::load`]).
pub fn load(path: &Path) -> Result<Package, Error> {
    crate::package::load(path)
}

fn request(remote: &Remote, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
    let mut req = reqwest::Client::new().request(
        method,
        format!("{}{path}", remote.url.trim_end_matches('/')),
    );
    if let Some(k) = &remote.api_key {
        req = req.header("authorization", &k.0);
    }
    req
}

async fn deploy(path: &Path, remote: &Remote) -> anyhow::Result<()> {
    let pkg = load(path)?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    bar.set_message(format!("launching {}", pkg.unique_identifier()));
    let form = reqwest::multipart::Form::new()
        .part(
            "context",
            reqwest::multipart::Part::bytes(pkg.bytes.to_vec()).file_name(pkg.filename()),
        )
        .text("verified", "false")
        .text(
            "metadata",
            json!({"plugin_unique_identifier": pkg.unique_identifier()}).to_string(),
        );
    let resp = request(remote, reqwest::Method::POST, "/v1/launch")
        .multipart(form)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().is_success(),
        "launch answered {}: {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut endpoint = None;
    let mut failure = None;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(v) = line
                .trim()
                .strip_prefix("data:")
                .and_then(|j| serde_json::from_str::<Value>(j.trim()).ok())
            else {
                continue;
            };
            let (stage, state, msg) = (
                v["Stage"].as_str().unwrap_or(""),
                v["State"].as_str().unwrap_or(""),
                v["Message"].as_str().unwrap_or(""),
            );
            bar.suspend(|| eprintln!("[{stage}] {state}: {msg}"));
            bar.set_message(format!("{stage}: {msg}"));
            if state == "failed" && stage != "end" {
                failure = Some(msg.to_owned());
            }
            if stage == "run" && state == "success" {
                endpoint = Some(msg.to_owned());
            }
        }
    }
    bar.finish_and_clear();
    if let Some(f) = failure {
        anyhow::bail!("launch failed: {f}");
    }
    println!(
        "{}",
        endpoint.ok_or_else(|| anyhow::anyhow!("the launch ended without an endpoint"))?
    );
    Ok(())
}

/// The gateway endpoint of function `name`, as the connector hands it out (its capability
/// token included), on the connector's URL as this command reaches it (the public URL it hands
/// the daemon may not resolve here).
async fn endpoint_of(remote: &Remote, name: &str) -> anyhow::Result<String> {
    crate::names::check(name)?;
    let resp = request(remote, reqwest::Method::GET, "/v1/runner/instances")
        .send()
        .await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "listing the functions answered HTTP {status}: {} (the gateway endpoint carries a \
         token only the control plane hands out: set {API_KEY_ENV})",
        v["error"].as_str().unwrap_or_default()
    );
    let endpoint = v["Items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["Name"] == name)
        .and_then(|i| i["Endpoint"].as_str())
        .ok_or_else(|| anyhow::anyhow!("no function named `{name}` (see `sri list`)"))?;
    let path = endpoint
        .find("/v1/functions/")
        .map(|i| &endpoint[i..])
        .ok_or_else(|| anyhow::anyhow!("the endpoint {endpoint} is not a gateway endpoint"))?;
    Ok(format!("{}{path}", remote.url.trim_end_matches('/')))
}

async fn invoke(o: InvokeOptions) -> anyhow::Result<()> {
    let params: Value = serde_json::from_str(&o.params)
        .map_err(|e| anyhow::anyhow!("--params is not JSON: {e}"))?;
    let credentials: Value = serde_json::from_str(&o.credentials)
        .map_err(|e| anyhow::anyhow!("--credentials is not JSON: {e}"))?;
    let session = format!("cli-{:016x}", rand::random::<u64>());
    let envelope = json!({
        "session_id": session, "conversation_id": null, "message_id": null, "app_id": null, "endpoint_id": null,
        "context": {}, "event": "request",
        "data": {"action": o.action, "credential_type": "api-key", "credentials": credentials, "provider": o.provider,
                 "tool": o.tool, "tool_parameters": params, "type": "tool", "user_id": "sri-cli"},
    });
    let url = format!(
        "{}/invoke?{}",
        endpoint_of(&o.remote, &o.name).await?,
        crate::transport::invoke_query(&o.action)
    );
    let resp = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(envelope.to_string())
        .send()
        .await?;
    if !resp.status().is_success() {
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or_default();
        anyhow::bail!(
            "HTTP {status}: {}: {}",
            v["errorType"].as_str().unwrap_or(""),
            v["errorMessage"].as_str().unwrap_or("")
        );
    }
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut failed = false;
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if o.json {
                print!("{}", String::from_utf8_lossy(&line));
                continue;
            }
            let v: Value = serde_json::from_slice(&line).unwrap_or_default();
            let data = &v["data"];
            match (v["event"].as_str(), data["type"].as_str()) {
                (Some("session"), Some("stream")) => {
                    let m = &data["data"];
                    match m["type"].as_str() {
                        Some("text") => {
                            println!("{}", m["message"]["text"].as_str().unwrap_or_default())
                        }
                        _ => println!("{}", m),
                    }
                }
                (Some("session"), Some("error")) => {
                    failed = true;
                    eprintln!(
                        "error: {}: {}",
                        data["data"]["error_type"].as_str().unwrap_or(""),
                        data["data"]["message"].as_str().unwrap_or("")
                    );
                }
                (Some("log"), _) => {
                    eprintln!("log: {}", data["message"].as_str().unwrap_or_default())
                }
                _ => {}
            }
        }
    }
    anyhow::ensure!(!failed, "the invocation failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap only checks the option table (unique ids, valid defaults) when it is built.
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
