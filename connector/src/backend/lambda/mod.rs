//! The AWS Lambda backend: one Lambda function per plugin (`{prefix}-{author}-{name}-{hash of
//! the exact author/name}`), one published version per package checksum, a `live` alias on the
//! newest, and a Function URL (`AWS_IAM`, `RESPONSE_STREAM`) on the alias.
//!
//! AWS itself is the state: version descriptions carry the checksum, tags mark what this
//! connector owns, so a restarted connector (or a second one) finds every deployment again, and
//! every deploy step first looks at what exists. That makes a launch idempotent per checksum and
//! lets a deploy that was interrupted halfway converge on the next launch.
//!
//! Calls for the live version go to its Function URL (SigV4) while AWS recently said `live` runs
//! that exact version; every other call (an older version the daemon still has installed, or
//! `live` not confirmed lately, since another replica may have moved it) goes to the exact
//! version with `InvokeWithResponseStream`, because a Function URL can only point at an alias.
//!
//! The jobs live in submodules: `naming`, `deploy`, `discovery`, `routing`, `gc`, `layers`
//! (the shared SDK layer) and `errors`.

mod deploy;
mod discovery;
mod errors;
mod fastpath;
mod gc;
mod layers;
pub mod naming;
mod routing;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, Function, Progress};
use crate::Error;
use crate::package::Package;
use crate::packaging::{self, Arch, PythonVersion};
use crate::transport::Target;
pub use naming::lambda_function_name;
use routing::LiveState;

/// The alias the Function URL and new calls follow.
pub const LIVE_ALIAS: &str = "live";
/// Tag marking what this connector owns (gc and discovery only touch functions that carry it).
pub const TAG_MANAGED_BY: &str = "sri:managed-by";
/// Its value.
pub const MANAGED_BY: &str = "sri-connector";
/// Tag naming the plugin (`author/name`).
pub const TAG_PLUGIN: &str = "sri:plugin";
/// Tag naming the checksum the function's code was last built from.
pub const TAG_CHECKSUM: &str = "sri:checksum";

/// Longest a waiter waits for a function to become active or finish an update.
const WAIT: Duration = Duration::from_secs(300);

/// How the gateway reaches the live version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    /// The Function URL with SigV4 (`lambda:InvokeFunctionUrl`).
    FunctionUrl,
    /// `InvokeWithResponseStream` (`lambda:InvokeFunction`), no URL needed.
    InvokeStream,
}

/// The Lambda backend's settings (`sri serve --backend lambda`).
#[derive(Debug, Clone, clap::Args)]
pub struct LambdaOptions {
    /// AWS region (default: the SDK's chain: AWS_REGION, profile, IMDS).
    #[arg(long = "lambda-region", env = "AWS_REGION")]
    pub region: Option<String>,
    /// Endpoint override for every AWS call (a moto_server URL in tests).
    #[arg(long = "aws-endpoint-url", env = "AWS_ENDPOINT_URL")]
    pub endpoint_url: Option<String>,
    /// Execution role of the plugin functions (infra/: `PluginExecutionRoleArn` output).
    #[arg(long = "lambda-role-arn", env = "SRI_LAMBDA_ROLE_ARN")]
    pub role_arn: Option<String>,
    /// Function name prefix; the connector's IAM policy is scoped to `{prefix}-*`.
    #[arg(
        long = "lambda-prefix",
        env = "SRI_LAMBDA_PREFIX",
        default_value = "sri"
    )]
    pub prefix: String,
    /// Instruction set of the functions.
    #[arg(long = "lambda-arch", env = "SRI_LAMBDA_ARCH", default_value = "arm64")]
    pub arch: Arch,
    /// Managed Python runtime of the functions.
    #[arg(
        id = "lambda_python",
        long = "lambda-python",
        env = "SRI_LAMBDA_PYTHON",
        default_value = "3.12"
    )]
    pub python: PythonVersion,
    /// Memory (MB); default from template/function.json.
    #[arg(long = "lambda-memory-mb", env = "SRI_LAMBDA_MEMORY_MB")]
    pub memory_mb: Option<i32>,
    /// Timeout (s); default from template/function.json.
    #[arg(long = "lambda-timeout-s", env = "SRI_LAMBDA_TIMEOUT_S")]
    pub timeout_s: Option<i32>,
    /// How the gateway calls functions.
    #[arg(
        long = "lambda-transport",
        env = "SRI_LAMBDA_TRANSPORT",
        value_enum,
        default_value = "function-url"
    )]
    pub transport: Transport,
    /// How long (ms) what AWS said about `live` is trusted before a Function URL call asks
    /// again (another replica may have moved it); 0 asks before every Function URL call.
    #[arg(
        long = "lambda-route-ttl-ms",
        env = "SRI_LAMBDA_ROUTE_TTL_MS",
        default_value_t = 1000
    )]
    pub route_ttl_ms: u64,
    /// S3 bucket for zips over Lambda's 50 MiB direct-upload limit.
    #[arg(long = "artifact-bucket", env = "SRI_ARTIFACT_BUCKET")]
    pub artifact_bucket: Option<String>,
    /// KMS key encrypting the functions' environment (it holds the signing keys).
    #[arg(long = "lambda-kms-key-arn", env = "SRI_LAMBDA_KMS_KEY_ARN")]
    pub kms_key_arn: Option<String>,
    /// The shared bootstrap layer (infra/); the functions then run `/opt/bootstrap`.
    #[arg(long = "bootstrap-layer-arn", env = "SRI_BOOTSTRAP_LAYER_ARN")]
    pub bootstrap_layer_arn: Option<String>,
    /// Put `dify_plugin` and its dependencies in a shared Lambda layer, published once per
    /// (SDK version, Python, architecture) and reused by content hash; `false` builds
    /// self-contained zips. The emulator backend unpacks the layer in place of `/opt`.
    #[arg(long = "lambda-sdk-layer", env = "SRI_LAMBDA_SDK_LAYER", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub sdk_layer: bool,
    /// Publish versions with SnapStart (python3.12+): a cold start restores a sandbox whose
    /// plugin is already imported.
    #[arg(long = "lambda-snapstart", env = "SRI_LAMBDA_SNAPSTART", default_value_t = false,
          action = clap::ArgAction::Set)]
    pub snap_start: bool,
    /// Run the functions on this Lambda Managed Instances capacity provider (python3.13+):
    /// every function on it must trust the others (README, "Lambda Managed Instances").
    #[arg(
        long = "lambda-capacity-provider-arn",
        env = "SRI_LAMBDA_CAPACITY_PROVIDER_ARN"
    )]
    pub capacity_provider_arn: Option<String>,
    /// Invocations one sandbox on the capacity provider takes at once (AWS's default when unset).
    #[arg(long = "lambda-max-concurrency", env = "SRI_LAMBDA_MAX_CONCURRENCY",
          value_parser = clap::value_parser!(i32).range(1..=4096))]
    pub max_concurrency: Option<i32>,
    /// Who may invoke the functions (default: the account that owns the execution role).
    #[arg(long = "lambda-invoker", env = "SRI_LAMBDA_INVOKER_PRINCIPAL")]
    pub invoker_principal: Option<String>,
    /// The bootstrap binary for the functions' architecture (default: `cargo lambda build`'s
    /// output, see `make lambda-bootstrap`).
    #[arg(
        id = "lambda_bootstrap",
        long = "lambda-bootstrap",
        env = "SRI_LAMBDA_BOOTSTRAP"
    )]
    pub bootstrap: Option<PathBuf>,
    /// A directory of wheels to install from (with `--offline`: the only source).
    #[arg(long, env = "SRI_WHEELHOUSE")]
    pub wheelhouse: Option<PathBuf>,
    /// Install dependencies from the wheelhouse only (air-gapped hosts).
    #[arg(long, env = "SRI_OFFLINE")]
    pub offline: bool,
    /// Where built zips are cached.
    #[arg(
        long = "package-cache",
        env = "SRI_CACHE_DIR",
        default_value = ".sri-cache"
    )]
    pub cache_dir: PathBuf,
}

impl LambdaOptions {
    /// The operator's memory and timeout overrides (shared with the emulator backend).
    pub fn overrides(&self) -> crate::backend::settings::Overrides {
        crate::backend::settings::Overrides {
            memory_mb: self.memory_mb,
            timeout_s: self.timeout_s,
        }
    }
}

/// What the backend needs besides [`LambdaOptions`].
#[derive(Debug, Clone)]
pub struct LambdaContext {
    /// The SRI v1 key ring the functions verify with (`SRI_SIGNING_KEYS` on each function).
    pub signing_keys: crate::secret::Secret,
    /// Handed to the functions for backwards invocations (see [`crate::relay::function_env`]).
    pub backwards_env: Vec<(String, String)>,
    /// `uv`, which installs dependencies for the target platform.
    pub uv: PathBuf,
    /// The operator's package index (`SRI_INDEX_URL`).
    pub index_url: Option<String>,
    /// How long installing a package's dependencies may take.
    pub install_timeout: std::time::Duration,
}

/// One published version = one deployed package.
#[derive(Debug, Clone)]
struct Deployed {
    function: Function,
    aws_name: String,
    version: String,
}

/// The Lambda backend.
pub struct LambdaBackend {
    options: LambdaOptions,
    context: LambdaContext,
    region: String,
    role_arn: String,
    lambda: aws_sdk_lambda::Client,
    s3: aws_sdk_s3::Client,
    packaging: packaging::Options,
    deployed: Mutex<BTreeMap<String, Deployed>>,
    live: Mutex<HashMap<String, LiveState>>,
    /// One `live` refresh at a time per Lambda function (calls arriving meanwhile share it).
    refreshing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Rate limit of lookups for deployments this replica does not know.
    missed: Mutex<routing::Misses>,
    /// One deploy at a time per Lambda function (two checksums of one plugin share it).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Held shared by a deploy from choosing its SDK layer version until its function uses
    /// it, and exclusively by `gc` deleting layer versions, so this replica's gc never deletes
    /// a layer version a deploy in progress is about to attach.
    layer_use: tokio::sync::RwLock<()>,
}

impl LambdaBackend {
    /// Connects to AWS (`sdk`: see [`crate::aws::sdk_config`]) and finds the functions this
    /// connector deployed before.
    pub async fn open(
        sdk: &aws_config::SdkConfig,
        options: LambdaOptions,
        context: LambdaContext,
    ) -> Result<Arc<Self>, Error> {
        let role_arn = options.role_arn.clone().ok_or_else(|| {
            Error::Backend(
                "the lambda backend needs SRI_LAMBDA_ROLE_ARN: the execution role of the plugin \
                 functions (infra/'s PluginExecutionRoleArn output)"
                    .into(),
            )
        })?;
        naming::check_prefix(&options.prefix)?;
        fastpath::check(&options)?;
        let region = sdk
            .region()
            .map(|r| r.to_string())
            .ok_or_else(|| Error::Backend("no AWS region: set AWS_REGION".into()))?;
        let bootstrap = options
            .bootstrap
            .clone()
            .unwrap_or_else(|| packaging::default_bootstrap(options.arch));
        let packaging = packaging::Options {
            target: packaging::Target {
                arch: options.arch,
                python: options.python,
            },
            bootstrap,
            wheelhouse: options.wheelhouse.clone(),
            offline: options.offline,
            index_url: context.index_url.clone(),
            install_timeout: context.install_timeout,
            cache_dir: options.cache_dir.clone(),
            uv: context.uv.clone(),
            bytecode: true,
            sdk_layer: options.sdk_layer,
        };
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(options.endpoint_url.is_some())
                .build(),
        );
        let this = Arc::new(Self {
            lambda: aws_sdk_lambda::Client::new(sdk),
            s3,
            region,
            role_arn,
            packaging,
            options,
            context,
            deployed: Mutex::new(BTreeMap::new()),
            live: Mutex::new(HashMap::new()),
            refreshing: Mutex::new(HashMap::new()),
            missed: Mutex::new(routing::Misses::default()),
            locks: Mutex::new(HashMap::new()),
            layer_use: tokio::sync::RwLock::new(()),
        });
        this.discover().await?;
        Ok(this)
    }

    fn lock_for(&self, aws_name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock")
            .entry(aws_name.to_owned())
            .or_default()
            .clone()
    }
}

impl Backend for LambdaBackend {
    fn deploy<'a>(
        &'a self,
        pkg: &'a Package,
        progress: Progress,
    ) -> BoxFuture<'a, Result<Function, Error>> {
        async move { self.deploy_inner(pkg, &progress).await }.boxed()
    }

    fn find(&self, checksum: &str) -> Option<Function> {
        self.deployed
            .lock()
            .expect("lock")
            .values()
            .find(|d| d.function.checksum == checksum)
            .map(|d| d.function.clone())
    }

    fn list(&self) -> Vec<Function> {
        self.deployed
            .lock()
            .expect("lock")
            .values()
            .map(|d| d.function.clone())
            .collect()
    }

    fn target(&self, name: &str) -> Option<Target> {
        self.route_known(name)
    }

    fn wait_target<'a>(&'a self, name: &'a str, within: Duration) -> BoxFuture<'a, Option<Target>> {
        async move { self.resolve(name, within).await }.boxed()
    }

    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>> {
        async move {
            let d = self
                .deployed
                .lock()
                .expect("lock")
                .get(name)
                .cloned()
                .ok_or_else(|| Error::Backend(format!("no function named `{name}`")))?;
            let lock = self.lock_for(&d.aws_name);
            let _guard = lock.lock().await;
            // Another replica may have moved `live` onto this version since.
            self.refresh(&d.aws_name).await?;
            let d = self.known(name).unwrap_or(d);
            self.delete_deployment(&d).await
        }
        .boxed()
    }

    fn gc(&self, keep: usize) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        async move { self.collect(keep).await }.boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}
