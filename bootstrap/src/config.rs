//! The bootstrap's options, read once from the command line and the environment.

use clap::{Args, Parser, Subcommand};
use connector::logging::{LogFormat, parse_log_format};
use connector::secret::{self, Secret};

use std::path::PathBuf;
use std::time::Duration;

/// Runs a Dify plugin behind SRI (v2, and v1 while `SRI_ACCEPT_V1` allows): as an AWS Lambda custom runtime (when
/// `AWS_LAMBDA_RUNTIME_API` is set) or as a plain HTTP server (`bootstrap serve`).
#[derive(Debug, Clone, Parser)]
#[command(name = "bootstrap", version, about)]
pub struct Config {
    /// What to run; without a subcommand, the Lambda runtime.
    #[command(subcommand)]
    pub mode: Option<Mode>,
    /// Plugin options shared by every mode.
    #[command(flatten)]
    pub plugin: PluginOptions,
    /// What Lambda tells the runtime about its execution environment.
    #[command(flatten)]
    pub lambda: LambdaOptions,
}

/// Set by Lambda itself; read only in Lambda mode.
#[derive(Debug, Clone, Args)]
pub struct LambdaOptions {
    /// Invocations Lambda may send this execution environment at once (set by Lambda Managed
    /// Instances): that many workers poll the Runtime API, sharing one plugin process.
    #[arg(long, env = "AWS_LAMBDA_MAX_CONCURRENCY", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CONCURRENCY))]
    pub max_concurrency: u32,
    /// How this environment was initialised (`on-demand`, `provisioned-concurrency`,
    /// `snap-start`, …); `snap-start` makes the runtime wait for a restore after init.
    #[arg(long, env = "AWS_LAMBDA_INITIALIZATION_TYPE")]
    pub initialization_type: Option<String>,
}

/// Highest `AWS_LAMBDA_MAX_CONCURRENCY` accepted: each worker holds one connection to the
/// Runtime API, and this is far above what Lambda configures per environment.
pub const MAX_CONCURRENCY: i64 = 4096;

impl LambdaOptions {
    /// Whether Lambda will snapshot this environment after init (SnapStart).
    pub fn snap_start(&self) -> bool {
        self.initialization_type.as_deref() == Some("snap-start")
    }
}

/// The run modes.
#[derive(Debug, Clone, Subcommand)]
pub enum Mode {
    /// Serve SRI over plain HTTP (`POST /invoke`, `GET /health`).
    #[cfg(feature = "serve")]
    Serve {
        /// Address to listen on.
        #[arg(long, env = "SRI_LISTEN", default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Deadlines and caps of the listener.
        #[command(flatten)]
        limits: ServeLimits,
    },
    /// Run as an AWS Lambda custom runtime (the default when `AWS_LAMBDA_RUNTIME_API` is set).
    Lambda,
    /// Print, as JSON, which sandbox mechanisms this host allows (`SRI_SANDBOX`'s options
    /// apply), then exit: the connector's local backend asks before starting functions.
    #[cfg(feature = "sandbox")]
    SandboxProbe,
}

/// Deadlines and caps of `bootstrap serve`'s listener, far above what the connector needs.
#[cfg(feature = "serve")]
#[derive(Debug, Clone, Copy, Args)]
pub struct ServeLimits {
    /// Seconds a connection may take to send a request head (and its first bytes).
    #[arg(long, env = "SRI_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may take to arrive whole.
    #[arg(long, env = "SRI_BODY_READ_TIMEOUT_SECS", default_value_t = 60)]
    pub body_read_timeout_secs: u64,
    /// Connections open at once; more wait in the backlog.
    #[arg(long, env = "SRI_MAX_CONNECTIONS", default_value_t = 16_384)]
    pub max_connections: usize,
    /// Concurrent streams on one h2c connection (the connector multiplexes a function's
    /// streams past its dedicated connections on one).
    #[arg(long, env = "SRI_MAX_H2C_STREAMS", default_value_t = 16_384)]
    pub max_h2c_streams: u32,
    /// Bytes of request bodies read at once across every connection and stream, before their
    /// signatures are checked; a request past it gets a retryable 503 (each body is at most
    /// `MAX_SERVERLESS_REQUEST_BYTES`).
    #[arg(long, env = "SRI_MAX_PENDING_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_pending_body_bytes: usize,
}

/// How backwards invocations reach the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackwardsMode {
    /// Signed, through the connector's relay (`SRI_RELAY_URL`).
    Relay,
    /// Unsigned, straight to the daemon (`DIFY_PLUGIN_DAEMON_URL`).
    Direct,
}

/// How the plugin is run and bounded.
#[derive(Debug, Clone, Args)]
pub struct PluginOptions {
    /// The plugin directory (holds `manifest.yaml`). Default: `$LAMBDA_TASK_ROOT/plugin` on
    /// Lambda, else the current directory.
    #[arg(long, env = "SRI_PLUGIN_DIR")]
    pub plugin_dir: Option<PathBuf>,
    /// Python interpreter that runs the plugin.
    #[arg(long, env = "SRI_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// Extra directories put first on the plugin's `PYTHONPATH` (`:`-separated), e.g. vendored
    /// dependencies. Default: `$LAMBDA_TASK_ROOT/vendor` when it exists.
    #[arg(long, env = "SRI_PYTHONPATH")]
    pub python_path: Option<String>,
    /// Seconds to wait for the plugin's first heartbeat.
    #[arg(long, env = "SRI_READY_TIMEOUT_SECS", default_value_t = 30)]
    pub ready_timeout_secs: u64,
    /// Longest invocation, in seconds (Dify's `PLUGIN_MAX_EXECUTION_TIMEOUT`); Lambda's own
    /// deadline (minus the margin) applies when it is sooner.
    #[arg(long, env = "PLUGIN_MAX_EXECUTION_TIMEOUT", default_value_t = 600)]
    pub max_execution_secs: u64,
    /// Milliseconds kept before Lambda's deadline to report a timeout cleanly.
    #[arg(long, env = "SRI_DEADLINE_MARGIN_MS", default_value_t = 1000)]
    pub deadline_margin_ms: u64,
    /// Longest plugin output line, in bytes (Dify's `PLUGIN_RUNTIME_MAX_BUFFER_SIZE`).
    #[arg(long, env = "PLUGIN_RUNTIME_MAX_BUFFER_SIZE", default_value_t = 5 * 1024 * 1024)]
    pub max_line_bytes: usize,
    /// Plugin output held in memory at once across all sessions, in bytes.
    #[arg(long, env = "SRI_MAX_BUFFERED_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub max_buffered_bytes: usize,
    /// Plugin output one session may have queued for a caller that does not read, in bytes;
    /// past it the session is cut with an error, and the plugin's other sessions never wait.
    /// At least the longest line (`PLUGIN_RUNTIME_MAX_BUFFER_SIZE`).
    #[arg(long, env = "SRI_SESSION_BUFFER_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub session_buffer_bytes: usize,
    /// This function's name, bound by SRI v2 signatures (a request signed for another function
    /// is refused). Default: `AWS_LAMBDA_FUNCTION_NAME` on Lambda, else empty.
    #[arg(long, env = "SRI_FUNCTION_NAME")]
    pub function_name: Option<String>,
    /// Whether SRI v1 signatures (no nonce, not bound to the function) are still accepted;
    /// set `false` once every caller signs SRI v2.
    #[arg(long, env = "SRI_ACCEPT_V1", default_value_t = true, action = clap::ArgAction::Set)]
    pub accept_v1: bool,
    /// Extra environment variables passed to the plugin (comma-separated names), beyond the
    /// allowlist (`PATH`, `HOME`, locale, proxies, CA bundles, `PYTHON*`, `LAMBDA_TASK_ROOT`,
    /// `AWS_REGION`, …). Secrets (signing keys, API keys, AWS credentials) and
    /// `AWS_LAMBDA_RUNTIME_API` are refused.
    #[arg(long, env = "SRI_PLUGIN_ENV", value_delimiter = ',')]
    pub plugin_env: Vec<String>,
    /// Largest request body, in bytes (Dify's `MAX_SERVERLESS_REQUEST_BYTES`).
    #[arg(long, env = "MAX_SERVERLESS_REQUEST_BYTES", default_value_t = 5 * 1024 * 1024)]
    pub max_request_bytes: usize,
    /// Seconds of silence after which a keepalive comment is sent on a stream.
    #[arg(long, env = "SRI_KEEPALIVE_SECS", default_value_t = 10)]
    pub keepalive_secs: u64,
    /// Accepted difference between a request's timestamp and this clock, in seconds.
    #[arg(long, env = "SRI_MAX_CLOCK_SKEW_SECS", default_value_t = 300)]
    pub max_clock_skew_secs: u64,
    /// How backwards invocations reach the daemon: `relay` (signed, through the connector's
    /// relay at `SRI_RELAY_URL`) or `direct` (to `DIFY_PLUGIN_DAEMON_URL`, on a private network).
    #[arg(long, env = "SRI_BACKWARDS", value_enum, default_value = "relay")]
    pub backwards: BackwardsMode,
    /// The connector's relay, for backwards invocations in `relay` mode.
    #[arg(long, env = "SRI_RELAY_URL")]
    pub relay_url: Option<String>,
    /// The Dify plugin daemon, for backwards invocations in `direct` mode
    /// (`…/backwards-invocation/transaction`).
    #[arg(long, env = "DIFY_PLUGIN_DAEMON_URL")]
    pub daemon_url: Option<String>,
    /// Seconds a backwards invocation may take (the SDK's `MAX_INVOCATION_TIMEOUT`).
    #[arg(long, env = "SRI_BACKWARDS_TIMEOUT_SECS", default_value_t = 250)]
    pub backwards_timeout_secs: u64,
    /// The SRI key ring, `kid:base64secret[,kid:base64secret…]` (secrets ≥ 32 bytes; the first
    /// signs, all verify). Set it in the environment, not on the command line.
    #[arg(long, env = "SRI_SIGNING_KEYS", hide_env_values = true, value_parser = secret::parse)]
    pub signing_keys: Option<Secret>,
    /// Log format: `text` or `json` (Lambda's `AWS_LAMBDA_LOG_FORMAT=JSON` selects json).
    #[arg(long, env = "AWS_LAMBDA_LOG_FORMAT", default_value = "text", value_parser = parse_log_format)]
    pub log_format: LogFormat,
    /// The plugin's sandbox (`bootstrap serve` only).
    #[cfg(feature = "sandbox")]
    #[command(flatten)]
    pub sandbox: crate::sandbox::Options,
}

impl Config {
    /// Reads the configuration. When started as Lambda's `AWS_LAMBDA_EXEC_WRAPPER` the
    /// arguments are the managed runtime's command line, which is ignored.
    pub fn load() -> Self {
        let args: Vec<String> = std::env::args().collect();
        #[cfg(not(feature = "serve"))]
        if args.get(1).is_some_and(|a| a == "serve") {
            eprintln!(
                "error: this bootstrap is a Lambda build, without `serve` (--no-default-features); \
                 build it with the default features (`cargo build -p sri-bootstrap`) to serve HTTP"
            );
            std::process::exit(2);
        }
        let explicit = args.get(1).is_some_and(|a| {
            a.starts_with('-')
                || a == "serve"
                || a == "lambda"
                || a == "help"
                || a == "sandbox-probe"
        });
        if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() && !explicit {
            Self::parse_from(&args[..1])
        } else {
            Self::parse()
        }
    }
}

impl PluginOptions {
    /// The plugin directory, resolved against the Lambda task root.
    pub fn plugin_dir(&self) -> PathBuf {
        match (&self.plugin_dir, std::env::var_os("LAMBDA_TASK_ROOT")) {
            (Some(dir), _) => dir.clone(),
            (None, Some(root)) => PathBuf::from(root).join("plugin"),
            (None, None) => PathBuf::from("."),
        }
    }

    /// The packager's record of the manifest ([`connector::manifest::RECORD_FILE`] at
    /// `$LAMBDA_TASK_ROOT`), when the plugin is the task root's own (`SRI_PLUGIN_DIR` unset).
    pub fn manifest_record(&self) -> Option<PathBuf> {
        if self.plugin_dir.is_some() {
            return None;
        }
        let root = std::env::var_os("LAMBDA_TASK_ROOT")?;
        let record = PathBuf::from(root).join(connector::manifest::RECORD_FILE);
        record.is_file().then_some(record)
    }

    /// Directories to prepend to `PYTHONPATH`.
    pub fn python_path(&self) -> Option<String> {
        if let Some(p) = &self.python_path {
            return Some(p.clone());
        }
        let root = std::env::var_os("LAMBDA_TASK_ROOT")?;
        let vendor = PathBuf::from(root).join("vendor");
        vendor.is_dir().then(|| vendor.display().to_string())
    }

    /// The function name SRI v2 signatures must bind.
    pub fn function_name(&self) -> String {
        self.function_name
            .clone()
            .or_else(|| std::env::var("AWS_LAMBDA_FUNCTION_NAME").ok())
            .unwrap_or_default()
    }

    /// The ready timeout.
    pub fn ready_timeout(&self) -> Duration {
        Duration::from_secs(self.ready_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_options_bound_the_workers_and_recognise_snap_start() {
        let c = Config::try_parse_from(["bootstrap", "--max-concurrency", "8"]).unwrap();
        assert_eq!(c.lambda.max_concurrency, 8);
        assert!(!c.lambda.snap_start());
        for bad in ["0", "4097", "many"] {
            let err = Config::try_parse_from(["bootstrap", "--max-concurrency", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("max-concurrency"), "{bad}: {err}");
        }
        let c =
            Config::try_parse_from(["bootstrap", "--initialization-type", "snap-start"]).unwrap();
        assert!(c.lambda.snap_start());
        let c =
            Config::try_parse_from(["bootstrap", "--initialization-type", "on-demand"]).unwrap();
        assert!(!c.lambda.snap_start());
    }
}
