//! The AWS Lambda backend: one Lambda function per plugin (`{prefix}-{author}-{name}`), one
//! published version per package checksum, a `live` alias on the newest, and a Function URL
//! (`AWS_IAM`, `RESPONSE_STREAM`) on the alias.
//!
//! AWS itself is the state: version descriptions carry the checksum, tags mark what this
//! connector owns, so a restarted connector (or a second one) finds every deployment again, and
//! every deploy step first looks at what exists. That makes a launch idempotent per checksum and
//! lets a deploy that was interrupted halfway converge on the next launch.
//!
//! Calls for the live version go to its Function URL (SigV4); calls for an older version that
//! the daemon still has installed go to that exact version with `InvokeWithResponseStream`,
//! because a Function URL can only point at an alias or `$LATEST`.

use aws_sdk_lambda::client::Waiters;
use aws_sdk_lambda::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{
    Architecture, Environment, EphemeralStorage, FunctionCode, FunctionConfiguration,
    FunctionUrlAuthType, InvokeMode, Runtime,
};
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Backend, Function, Progress};
use crate::Error;
use crate::package::Package;
use crate::packaging::{self, Arch, Artifact, PythonVersion};
use crate::transport::Target;

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
    /// S3 bucket for zips over Lambda's 50 MiB direct-upload limit.
    #[arg(long = "artifact-bucket", env = "SRI_ARTIFACT_BUCKET")]
    pub artifact_bucket: Option<String>,
    /// KMS key encrypting the functions' environment (it holds the signing keys).
    #[arg(long = "lambda-kms-key-arn", env = "SRI_LAMBDA_KMS_KEY_ARN")]
    pub kms_key_arn: Option<String>,
    /// The shared bootstrap layer (infra/); the functions then run `/opt/bootstrap`.
    #[arg(long = "bootstrap-layer-arn", env = "SRI_BOOTSTRAP_LAYER_ARN")]
    pub bootstrap_layer_arn: Option<String>,
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

/// What the backend needs besides [`LambdaOptions`].
#[derive(Debug, Clone)]
pub struct LambdaContext {
    /// The SRI v1 key ring the functions verify with (`SRI_SIGNING_KEYS` on each function).
    pub signing_keys: crate::secret::Secret,
    /// Handed to the functions for backwards invocations.
    pub daemon_url: Option<String>,
    /// `uv`, which installs dependencies for the target platform.
    pub uv: PathBuf,
}

/// One published version = one deployed package.
#[derive(Debug, Clone)]
struct Deployed {
    function: Function,
    aws_name: String,
    version: String,
}

/// What is known of one Lambda function.
#[derive(Debug, Clone, Default)]
struct LiveState {
    version: Option<String>,
    url: Option<String>,
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
    /// One deploy at a time per Lambda function (two checksums of one plugin share it).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn aws_err<E>(operation: impl Into<String>, e: &E) -> Error
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let operation = operation.into();
    let code = e.code().unwrap_or_default();
    let hint = match code {
        "AccessDeniedException" | "AccessDenied" | "UnrecognizedClientException" => {
            "; attach infra/'s connector policy to the connector's identity (its actions are scoped to `{prefix}-*`)"
        }
        "InvalidParameterValueException" if operation.contains("Function") => {
            "; check SRI_LAMBDA_ROLE_ARN (a role Lambda can assume) and the function settings"
        }
        "TooManyRequestsException" | "ThrottlingException" => "; retry shortly",
        _ => "",
    };
    Error::Aws {
        operation,
        detail: format!("{}{hint}", DisplayErrorContext(e)),
    }
}

fn is_not_found<E: ProvideErrorMetadata>(e: &E) -> bool {
    e.code() == Some("ResourceNotFoundException")
}

/// The Lambda function name for a plugin: `{prefix}-{author}-{name}`, only `[a-z0-9-]`, at most
/// 64 characters (a hash of the full name replaces the tail when it is longer).
pub fn lambda_function_name(prefix: &str, author: &str, name: &str) -> String {
    let clean = super::clean_name;
    let full = format!("{}-{}-{}", clean(prefix), clean(author), clean(name));
    if full.len() <= 64 {
        return full;
    }
    use sha2::Digest;
    let digest = hex::encode(sha2::Sha256::digest(full.as_bytes()));
    format!("{}-{}", &full[..55], &digest[..8])
}

/// The connector-level name of one deployment (what the daemon's endpoint carries).
fn deployment_name(aws_name: &str, checksum: &str) -> String {
    format!("{aws_name}-{}", &checksum[..checksum.len().min(12)])
}

/// The version description: how a version is tied back to its package.
fn version_description(pkg: &Package) -> String {
    format!(
        "sri checksum={} id={}",
        pkg.checksum,
        pkg.unique_identifier()
    )
}

fn parse_description(d: &str) -> Option<(String, String)> {
    let rest = d.strip_prefix("sri checksum=")?;
    let (checksum, id) = rest.split_once(" id=")?;
    Some((checksum.to_owned(), id.to_owned()))
}

/// The account id in an ARN (`arn:aws:iam::123456789012:role/x`).
fn account_of(arn: &str) -> Option<&str> {
    arn.split(':').nth(4).filter(|a| !a.is_empty())
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
            index_url: None,
            cache_dir: options.cache_dir.clone(),
            uv: context.uv.clone(),
            bytecode: true,
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
            locks: Mutex::new(HashMap::new()),
        });
        this.discover().await?;
        Ok(this)
    }

    /// Reads back every function this connector owns, its versions, alias and URL.
    async fn discover(&self) -> Result<(), Error> {
        let functions = self.managed_functions().await?;
        for f in &functions {
            let Some(name) = f.function_name() else {
                continue;
            };
            let versions = self.refresh(name).await?;
            self.reapply_keys(name, &versions).await?;
        }
        tracing::info!(
            functions = functions.len(),
            deployments = self.deployed.lock().expect("lock").len(),
            "lambda backend: discovered"
        );
        Ok(())
    }

    /// Republishes the live version of every function whose SRI v1 key ring is not the
    /// connector's (the ring was rotated): a published version's environment is immutable, so
    /// the new ring needs a new version of the same code, and `live` moves to it. Older versions
    /// keep the ring they were published with until they are relaunched or collected.
    async fn reapply_keys(
        &self,
        aws_name: &str,
        versions: &[FunctionConfiguration],
    ) -> Result<(), Error> {
        let Some(live) = self
            .live
            .lock()
            .expect("lock")
            .get(aws_name)
            .and_then(|l| l.version.clone())
        else {
            return Ok(());
        };
        let ring = &self.context.signing_keys.0;
        let Some(current) = versions.iter().find(|v| v.version() == Some(live.as_str())) else {
            return Ok(());
        };
        let env_of = |c: &FunctionConfiguration| {
            c.environment()
                .and_then(|e| e.variables())
                .cloned()
                .unwrap_or_default()
        };
        let mut env = env_of(current);
        if env.get("SRI_SIGNING_KEYS") == Some(ring) {
            return Ok(());
        }
        let latest = self
            .lambda
            .get_function_configuration()
            .function_name(aws_name)
            .send()
            .await
            .map_err(|e| aws_err(format!("GetFunctionConfiguration {aws_name}"), &e))?;
        if latest.code_sha256() != current.code_sha256() {
            tracing::warn!(
                function = aws_name,
                version = %live,
                "the signing keys changed but $LATEST no longer holds the live code; relaunch the plugin to apply them"
            );
            return Ok(());
        }
        tracing::info!(function = aws_name, version = %live, "signing keys changed: republishing the live version");
        env.insert("SRI_SIGNING_KEYS".into(), ring.clone());
        self.lambda
            .update_function_configuration()
            .function_name(aws_name)
            .environment(environment(&env))
            .send()
            .await
            .map_err(|e| aws_err(format!("UpdateFunctionConfiguration {aws_name}"), &e))?;
        self.wait_updated(aws_name).await?;
        let out = self
            .lambda
            .publish_version()
            .function_name(aws_name)
            .set_code_sha256(current.code_sha256().map(str::to_owned))
            .set_description(current.description().map(str::to_owned))
            .send()
            .await
            .map_err(|e| aws_err(format!("PublishVersion {aws_name}"), &e))?;
        self.lambda
            .update_alias()
            .function_name(aws_name)
            .name(LIVE_ALIAS)
            .set_function_version(out.version().map(str::to_owned))
            .send()
            .await
            .map_err(|e| aws_err(format!("UpdateAlias {aws_name}:{LIVE_ALIAS}"), &e))?;
        self.refresh(aws_name).await.map(|_| ())
    }

    /// Functions with our prefix and our ownership tag.
    async fn managed_functions(&self) -> Result<Vec<FunctionConfiguration>, Error> {
        let prefix = format!("{}-", self.options.prefix);
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .lambda
                .list_functions()
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| aws_err("ListFunctions", &e))?;
            for f in page.functions() {
                let (Some(name), Some(arn)) = (f.function_name(), f.function_arn()) else {
                    continue;
                };
                if !name.starts_with(&prefix) {
                    continue;
                }
                let tags = self
                    .lambda
                    .list_tags()
                    .resource(arn)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("ListTags {name}"), &e))?;
                if tags
                    .tags()
                    .and_then(|t| t.get(TAG_MANAGED_BY))
                    .map(String::as_str)
                    == Some(MANAGED_BY)
                {
                    out.push(f.clone());
                }
            }
            marker = page.next_marker().map(str::to_owned);
            if marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// Published versions of `aws_name` (not `$LATEST`).
    async fn versions(&self, aws_name: &str) -> Result<Vec<FunctionConfiguration>, Error> {
        let mut out = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .lambda
                .list_versions_by_function()
                .function_name(aws_name)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| aws_err(format!("ListVersionsByFunction {aws_name}"), &e))?;
            out.extend(
                page.versions()
                    .iter()
                    .filter(|v| v.version() != Some("$LATEST"))
                    .cloned(),
            );
            marker = page.next_marker().map(str::to_owned);
            if marker.is_none() {
                return Ok(out);
            }
        }
    }

    /// Re-reads one function's versions, alias and URL into memory; returns the versions.
    async fn refresh(&self, aws_name: &str) -> Result<Vec<FunctionConfiguration>, Error> {
        let versions = self.versions(aws_name).await?;
        let live_version = match self
            .lambda
            .get_alias()
            .function_name(aws_name)
            .name(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(a) => a.function_version().map(str::to_owned),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => None,
            Err(e) => return Err(aws_err(format!("GetAlias {aws_name}:{LIVE_ALIAS}"), &e)),
        };
        let url = match self
            .lambda
            .get_function_url_config()
            .function_name(aws_name)
            .qualifier(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(u) => Some(u.function_url().to_owned()),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => None,
            Err(e) => return Err(aws_err(format!("GetFunctionUrlConfig {aws_name}"), &e)),
        };
        let mut deployed = self.deployed.lock().expect("lock");
        deployed.retain(|_, d| d.aws_name != aws_name);
        for v in &versions {
            let (Some(version), Some((checksum, identifier))) =
                (v.version(), v.description().and_then(parse_description))
            else {
                continue;
            };
            let name = deployment_name(aws_name, &checksum);
            // A checksum republished (new signing keys) has several versions: the newest counts.
            let newer = |d: &Deployed| {
                version.parse::<u64>().unwrap_or(0) > d.version.parse::<u64>().unwrap_or(0)
            };
            if deployed.get(&name).is_some_and(|d| !newer(d)) {
                continue;
            }
            deployed.insert(
                name.clone(),
                Deployed {
                    function: Function {
                        name,
                        identifier,
                        checksum,
                    },
                    aws_name: aws_name.to_owned(),
                    version: version.to_owned(),
                },
            );
        }
        drop(deployed);
        self.live.lock().expect("lock").insert(
            aws_name.to_owned(),
            LiveState {
                version: live_version,
                url,
            },
        );
        Ok(versions)
    }

    fn lock_for(&self, aws_name: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .expect("lock")
            .entry(aws_name.to_owned())
            .or_default()
            .clone()
    }

    /// The function settings a package should run with.
    fn desired(&self, artifact: &Artifact) -> Desired {
        let mut env = artifact.config.environment.clone();
        env.insert(
            "SRI_SIGNING_KEYS".into(),
            self.context.signing_keys.0.clone(),
        );
        if let Some(url) = &self.context.daemon_url {
            env.insert("DIFY_PLUGIN_DAEMON_URL".into(), url.clone());
        }
        let mut layers = Vec::new();
        if let Some(layer) = &self.options.bootstrap_layer_arn {
            layers.push(layer.clone());
            env.insert("AWS_LAMBDA_EXEC_WRAPPER".into(), "/opt/bootstrap".into());
        }
        let timeout = self
            .options
            .timeout_s
            .unwrap_or(artifact.config.timeout_s as i32);
        // The plugin must give up before Lambda kills the sandbox, so the caller gets a
        // PluginTimeout event rather than a cut stream.
        env.insert(
            "PLUGIN_MAX_EXECUTION_TIMEOUT".into(),
            (timeout - timeout.min(30) / 2).max(1).to_string(),
        );
        Desired {
            runtime: artifact.config.runtime.clone(),
            handler: artifact.config.handler.clone(),
            arch: artifact.target.arch.lambda_name().to_owned(),
            memory_mb: self
                .options
                .memory_mb
                .unwrap_or(artifact.config.memory_mb as i32),
            timeout_s: timeout,
            ephemeral_mb: artifact.config.ephemeral_storage_mb as i32,
            env: env.into_iter().collect(),
            layers,
            kms_key_arn: self.options.kms_key_arn.clone(),
            role: self.role_arn.clone(),
        }
    }

    /// Where the zip goes: inline, or through S3 when it is over the direct-upload limit.
    async fn code(&self, aws_name: &str, artifact: &Artifact) -> Result<Code, Error> {
        if !artifact.needs_s3() {
            let bytes = tokio::fs::read(&artifact.zip).await.map_err(|e| {
                Error::Packaging(format!("reading {}: {e}", artifact.zip.display()))
            })?;
            return Ok(Code::Zip(bytes));
        }
        let Some(bucket) = &self.options.artifact_bucket else {
            return Err(Error::Packaging(format!(
                "the function zip is {:.1} MiB, over Lambda's {} MiB direct-upload limit; set \
                 SRI_ARTIFACT_BUCKET to an S3 bucket in {} (infra/'s ArtifactBucket output) so it \
                 is uploaded through S3",
                artifact.zipped_bytes as f64 / 1048576.0,
                packaging::DIRECT_UPLOAD_LIMIT / 1048576,
                self.region
            )));
        };
        let key = format!(
            "{}/{aws_name}/{}.zip",
            self.options.prefix,
            hex::encode(
                base64::Engine::decode(
                    &base64::engine::general_purpose::STANDARD,
                    &artifact.code_sha256
                )
                .unwrap_or_default()
            )
        );
        let body = aws_sdk_s3::primitives::ByteStream::from_path(&artifact.zip)
            .await
            .map_err(|e| Error::Packaging(format!("reading {}: {e}", artifact.zip.display())))?;
        self.s3
            .put_object()
            .bucket(bucket)
            .key(&key)
            .body(body)
            .send()
            .await
            .map_err(|e| aws_err(format!("S3 PutObject s3://{bucket}/{key}"), &e))?;
        Ok(Code::S3 {
            bucket: bucket.clone(),
            key,
        })
    }

    async fn deploy_inner(&self, pkg: &Package, progress: &Progress) -> Result<Function, Error> {
        let m = &pkg.manifest;
        let aws_name = lambda_function_name(&self.options.prefix, &m.author, &m.name);
        let lock = self.lock_for(&aws_name);
        let _guard = lock.lock().await;
        let say = |stage: &'static str, msg: String| {
            tracing::info!(function = %aws_name, stage, "{msg}");
            let _ = progress.send((stage, msg));
        };

        say(
            "build",
            format!(
                "packaging for {} / {}",
                self.options.arch,
                self.options.python.lambda_runtime()
            ),
        );
        let artifact = packaging::build(pkg, &self.packaging, progress).await?;
        say(
            "build",
            format!(
                "{:.1} MiB zipped, {:.1} MiB unzipped{}{}",
                artifact.zipped_bytes as f64 / 1048576.0,
                artifact.unzipped_bytes as f64 / 1048576.0,
                match &artifact.bytecode {
                    Some(v) => format!(", bytecode by Python {v}"),
                    None => ", no bytecode".into(),
                },
                if artifact.cache_hit { " (cached)" } else { "" }
            ),
        );
        let desired = self.desired(&artifact);
        let tags: HashMap<String, String> = [
            (TAG_MANAGED_BY, MANAGED_BY.to_owned()),
            (TAG_PLUGIN, format!("{}/{}", m.author, m.name)),
            (TAG_CHECKSUM, pkg.checksum.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        // 1. The function's code and configuration ($LATEST).
        let existing = match self
            .lambda
            .get_function()
            .function_name(&aws_name)
            .send()
            .await
        {
            Ok(f) => Some(f),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => None,
            Err(e) => return Err(aws_err(format!("GetFunction {aws_name}"), &e)),
        };
        match existing {
            None => {
                say("deploy", format!("creating function {aws_name}"));
                let code = match self.code(&aws_name, &artifact).await? {
                    Code::Zip(b) => FunctionCode::builder().zip_file(Blob::new(b)).build(),
                    Code::S3 { bucket, key } => FunctionCode::builder()
                        .s3_bucket(bucket)
                        .s3_key(key)
                        .build(),
                };
                self.lambda
                    .create_function()
                    .function_name(&aws_name)
                    .runtime(Runtime::from(desired.runtime.as_str()))
                    .role(&desired.role)
                    .handler(&desired.handler)
                    .code(code)
                    .architectures(Architecture::from(desired.arch.as_str()))
                    .memory_size(desired.memory_mb)
                    .timeout(desired.timeout_s)
                    .ephemeral_storage(ephemeral(desired.ephemeral_mb)?)
                    .environment(environment(&desired.env))
                    .set_layers(Some(desired.layers.clone()))
                    .set_kms_key_arn(desired.kms_key_arn.clone())
                    .description(format!("Dify plugin {}/{} (sri)", m.author, m.name))
                    .set_tags(Some(tags.clone()))
                    .publish(false)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("CreateFunction {aws_name}"), &e))?;
                self.wait_active(&aws_name).await?;
            }
            Some(f) => {
                let config = f.configuration().cloned().ok_or_else(|| Error::Aws {
                    operation: format!("GetFunction {aws_name}"),
                    detail: "the answer has no Configuration".into(),
                })?;
                let arn = config.function_arn().unwrap_or_default().to_owned();
                let arch_now = config
                    .architectures()
                    .first()
                    .map(|a| a.as_str().to_owned())
                    .unwrap_or_default();
                if config.code_sha256() != Some(artifact.code_sha256.as_str())
                    || arch_now != desired.arch
                {
                    say("deploy", format!("updating the code of {aws_name}"));
                    let req = self
                        .lambda
                        .update_function_code()
                        .function_name(&aws_name)
                        .architectures(Architecture::from(desired.arch.as_str()));
                    let req = match self.code(&aws_name, &artifact).await? {
                        Code::Zip(b) => req.zip_file(Blob::new(b)),
                        Code::S3 { bucket, key } => req.s3_bucket(bucket).s3_key(key),
                    };
                    req.send()
                        .await
                        .map_err(|e| aws_err(format!("UpdateFunctionCode {aws_name}"), &e))?;
                    self.wait_updated(&aws_name).await?;
                }
                if !desired.matches(&config) {
                    say(
                        "deploy",
                        format!("updating the configuration of {aws_name}"),
                    );
                    self.lambda
                        .update_function_configuration()
                        .function_name(&aws_name)
                        .runtime(Runtime::from(desired.runtime.as_str()))
                        .role(&desired.role)
                        .handler(&desired.handler)
                        .memory_size(desired.memory_mb)
                        .timeout(desired.timeout_s)
                        .ephemeral_storage(ephemeral(desired.ephemeral_mb)?)
                        .environment(environment(&desired.env))
                        .set_layers(Some(desired.layers.clone()))
                        .kms_key_arn(desired.kms_key_arn.clone().unwrap_or_default())
                        .send()
                        .await
                        .map_err(|e| {
                            aws_err(format!("UpdateFunctionConfiguration {aws_name}"), &e)
                        })?;
                    self.wait_updated(&aws_name).await?;
                }
                if f.tags().map(|t| t.get(TAG_CHECKSUM)) != Some(Some(&pkg.checksum))
                    || f.tags().and_then(|t| t.get(TAG_MANAGED_BY)).is_none()
                {
                    self.lambda
                        .tag_resource()
                        .resource(&arn)
                        .set_tags(Some(tags.clone()))
                        .send()
                        .await
                        .map_err(|e| aws_err(format!("TagResource {aws_name}"), &e))?;
                }
            }
        }

        // 2. A version for this checksum (reused if an earlier, interrupted deploy made it).
        let description = version_description(pkg);
        let version = match self
            .versions(&aws_name)
            .await?
            .into_iter()
            .filter(|v| v.description() == Some(description.as_str()) && desired.matches(v))
            .max_by_key(|v| v.version().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        {
            Some(v) => v.version().unwrap_or_default().to_owned(),
            None => {
                let out = self
                    .lambda
                    .publish_version()
                    .function_name(&aws_name)
                    .code_sha256(&artifact.code_sha256)
                    .description(&description)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("PublishVersion {aws_name}"), &e))?;
                let v = out.version().unwrap_or_default().to_owned();
                say("deploy", format!("published version {v}"));
                v
            }
        };

        // 3. `live` follows the newest deployment.
        match self
            .lambda
            .get_alias()
            .function_name(&aws_name)
            .name(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(a) if a.function_version() == Some(version.as_str()) => {}
            Ok(_) => {
                self.lambda
                    .update_alias()
                    .function_name(&aws_name)
                    .name(LIVE_ALIAS)
                    .function_version(&version)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("UpdateAlias {aws_name}:{LIVE_ALIAS}"), &e))?;
                say("deploy", format!("alias {LIVE_ALIAS} → version {version}"));
            }
            Err(e) if e.as_service_error().is_some_and(is_not_found) => {
                self.lambda
                    .create_alias()
                    .function_name(&aws_name)
                    .name(LIVE_ALIAS)
                    .function_version(&version)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("CreateAlias {aws_name}:{LIVE_ALIAS}"), &e))?;
                say("deploy", format!("alias {LIVE_ALIAS} → version {version}"));
            }
            Err(e) => return Err(aws_err(format!("GetAlias {aws_name}:{LIVE_ALIAS}"), &e)),
        }

        // 4. The Function URL on `live` (IAM-authenticated, streaming) and who may call it.
        let url = self.ensure_url(&aws_name).await?;
        self.ensure_permissions(&aws_name).await?;

        let function = Function {
            name: deployment_name(&aws_name, &pkg.checksum),
            identifier: pkg.unique_identifier(),
            checksum: pkg.checksum.clone(),
        };
        self.deployed.lock().expect("lock").insert(
            function.name.clone(),
            Deployed {
                function: function.clone(),
                aws_name: aws_name.clone(),
                version: version.clone(),
            },
        );
        self.live.lock().expect("lock").insert(
            aws_name.clone(),
            LiveState {
                version: Some(version),
                url: Some(url),
            },
        );
        Ok(function)
    }

    async fn ensure_url(&self, aws_name: &str) -> Result<String, Error> {
        match self
            .lambda
            .get_function_url_config()
            .function_name(aws_name)
            .qualifier(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(u)
                if u.auth_type() == &FunctionUrlAuthType::AwsIam
                    && u.invoke_mode() == Some(&InvokeMode::ResponseStream) =>
            {
                Ok(u.function_url().to_owned())
            }
            Ok(_) => {
                let u = self
                    .lambda
                    .update_function_url_config()
                    .function_name(aws_name)
                    .qualifier(LIVE_ALIAS)
                    .auth_type(FunctionUrlAuthType::AwsIam)
                    .invoke_mode(InvokeMode::ResponseStream)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("UpdateFunctionUrlConfig {aws_name}"), &e))?;
                Ok(u.function_url().to_owned())
            }
            Err(e) if e.as_service_error().is_some_and(is_not_found) => {
                let u = self
                    .lambda
                    .create_function_url_config()
                    .function_name(aws_name)
                    .qualifier(LIVE_ALIAS)
                    .auth_type(FunctionUrlAuthType::AwsIam)
                    .invoke_mode(InvokeMode::ResponseStream)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("CreateFunctionUrlConfig {aws_name}"), &e))?;
                Ok(u.function_url().to_owned())
            }
            Err(e) => Err(aws_err(format!("GetFunctionUrlConfig {aws_name}"), &e)),
        }
    }

    /// Resource-policy statements letting the invoker call the alias through its URL and with
    /// `InvokeWithResponseStream` (Function URLs with `AWS_IAM` check both actions).
    async fn ensure_permissions(&self, aws_name: &str) -> Result<(), Error> {
        let Some(principal) = self
            .options
            .invoker_principal
            .clone()
            .or_else(|| account_of(&self.role_arn).map(str::to_owned))
        else {
            return Ok(());
        };
        for (sid, action, url_auth) in [
            ("sri-invoke-url", "lambda:InvokeFunctionUrl", true),
            ("sri-invoke", "lambda:InvokeFunction", false),
        ] {
            let mut req = self
                .lambda
                .add_permission()
                .function_name(aws_name)
                .qualifier(LIVE_ALIAS)
                .statement_id(sid)
                .action(action)
                .principal(&principal);
            if url_auth {
                req = req.function_url_auth_type(FunctionUrlAuthType::AwsIam);
            }
            match req.send().await {
                Ok(_) => {}
                // Already there: the statement id is ours and fixed.
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.code() == Some("ResourceConflictException")) => {}
                Err(e) => return Err(aws_err(format!("AddPermission {aws_name} {sid}"), &e)),
            }
        }
        Ok(())
    }

    async fn wait_active(&self, aws_name: &str) -> Result<(), Error> {
        let waiting = self
            .lambda
            .wait_until_function_active_v2()
            .function_name(aws_name)
            .wait(WAIT);
        waited(
            format!("waiting for {aws_name} to become Active"),
            waiting.await,
        )
    }

    async fn wait_updated(&self, aws_name: &str) -> Result<(), Error> {
        let waiting = self
            .lambda
            .wait_until_function_updated_v2()
            .function_name(aws_name)
            .wait(WAIT);
        waited(
            format!("waiting for the update of {aws_name}"),
            waiting.await,
        )
    }

    /// Deletes one version; if it was live, moves `live` to the newest remaining one, and
    /// deletes the whole function when none remains.
    async fn delete_deployment(&self, d: &Deployed) -> Result<(), Error> {
        let aws_name = &d.aws_name;
        let remaining: Vec<Deployed> = self
            .deployed
            .lock()
            .expect("lock")
            .values()
            .filter(|o| o.aws_name == *aws_name && o.version != d.version)
            .cloned()
            .collect();
        if remaining.is_empty() {
            match self
                .lambda
                .delete_function()
                .function_name(aws_name)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                Err(e) => return Err(aws_err(format!("DeleteFunction {aws_name}"), &e)),
            }
            self.live.lock().expect("lock").remove(aws_name);
        } else {
            let live = self.live.lock().expect("lock").get(aws_name).cloned();
            if live.as_ref().and_then(|l| l.version.as_deref()) == Some(d.version.as_str()) {
                let newest = remaining
                    .iter()
                    .max_by_key(|o| o.version.parse::<u64>().unwrap_or(0))
                    .expect("not empty");
                self.lambda
                    .update_alias()
                    .function_name(aws_name)
                    .name(LIVE_ALIAS)
                    .function_version(&newest.version)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("UpdateAlias {aws_name}:{LIVE_ALIAS}"), &e))?;
                if let Some(l) = self.live.lock().expect("lock").get_mut(aws_name) {
                    l.version = Some(newest.version.clone());
                }
            }
            match self
                .lambda
                .delete_function()
                .function_name(aws_name)
                .qualifier(&d.version)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                Err(e) => {
                    return Err(aws_err(
                        format!("DeleteFunction {aws_name}:{}", d.version),
                        &e,
                    ));
                }
            }
        }
        self.deployed.lock().expect("lock").remove(&d.function.name);
        Ok(())
    }
}

/// Function settings compared with what AWS has, so an unchanged relaunch writes nothing.
/// (No `Debug`: `env` holds the signing keys.)
struct Desired {
    runtime: String,
    handler: String,
    arch: String,
    memory_mb: i32,
    timeout_s: i32,
    ephemeral_mb: i32,
    env: HashMap<String, String>,
    layers: Vec<String>,
    kms_key_arn: Option<String>,
    role: String,
}

impl Desired {
    fn matches(&self, c: &FunctionConfiguration) -> bool {
        let env = c
            .environment()
            .and_then(|e| e.variables())
            .cloned()
            .unwrap_or_default();
        let layers: Vec<String> = c
            .layers()
            .iter()
            .filter_map(|l| l.arn().map(str::to_owned))
            .collect();
        c.runtime().map(|r| r.as_str()) == Some(self.runtime.as_str())
            && c.handler() == Some(self.handler.as_str())
            && c.memory_size() == Some(self.memory_mb)
            && c.timeout() == Some(self.timeout_s)
            && c.role() == Some(self.role.as_str())
            && env == self.env
            && layers == self.layers
            && c.kms_key_arn().filter(|k| !k.is_empty()) == self.kms_key_arn.as_deref()
    }
}

/// How one deployment is called: the live version through its Function URL when that is the
/// configured transport and the URL is known; anything else (an older version the daemon still
/// has installed, or `invoke-stream`) by its exact version with `InvokeWithResponseStream` — a
/// Function URL can only point at an alias, and `live` may already run newer code.
fn route(transport: Transport, d: &Deployed, live: Option<&LiveState>, region: &str) -> Target {
    match (transport, live) {
        (
            Transport::FunctionUrl,
            Some(LiveState {
                version: Some(v),
                url: Some(url),
            }),
        ) if *v == d.version => Target::FunctionUrl {
            url: url.clone(),
            region: region.to_owned(),
            function: d.aws_name.clone(),
        },
        _ => Target::InvokeStream {
            function: d.aws_name.clone(),
            qualifier: d.version.clone(),
        },
    }
}

/// A waiter's outcome as this crate's error.
fn waited<T, E: std::error::Error + 'static>(
    operation: String,
    outcome: Result<T, E>,
) -> Result<(), Error> {
    outcome.map(|_| ()).map_err(|e| Error::Aws {
        operation,
        detail: DisplayErrorContext(&e).to_string(),
    })
}

enum Code {
    Zip(Vec<u8>),
    S3 { bucket: String, key: String },
}

fn environment(env: &HashMap<String, String>) -> Environment {
    Environment::builder()
        .set_variables(Some(env.clone()))
        .build()
}

fn ephemeral(mb: i32) -> Result<EphemeralStorage, Error> {
    EphemeralStorage::builder()
        .size(mb)
        .build()
        .map_err(|e| Error::Backend(format!("ephemeral storage: {e}")))
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
        let d = self.deployed.lock().expect("lock").get(name).cloned()?;
        let live = self.live.lock().expect("lock").get(&d.aws_name).cloned();
        Some(route(
            self.options.transport,
            &d,
            live.as_ref(),
            &self.region,
        ))
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
            self.delete_deployment(&d).await
        }
        .boxed()
    }

    fn gc(&self, keep: usize) -> BoxFuture<'_, Result<Vec<String>, Error>> {
        async move {
            let mut removed = Vec::new();
            for f in self.managed_functions().await? {
                let Some(aws_name) = f.function_name().map(str::to_owned) else {
                    continue;
                };
                let lock = self.lock_for(&aws_name);
                let _guard = lock.lock().await;
                self.refresh(&aws_name).await?;
                let mut mine: Vec<Deployed> = self
                    .deployed
                    .lock()
                    .expect("lock")
                    .values()
                    .filter(|d| d.aws_name == aws_name)
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    // A function with no deployment of ours: a deploy that never published.
                    match self
                        .lambda
                        .delete_function()
                        .function_name(&aws_name)
                        .send()
                        .await
                    {
                        Ok(_) => removed.push(aws_name.clone()),
                        Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                        Err(e) => return Err(aws_err(format!("DeleteFunction {aws_name}"), &e)),
                    }
                    self.live.lock().expect("lock").remove(&aws_name);
                    continue;
                }
                mine.sort_by_key(|d| std::cmp::Reverse(d.version.parse::<u64>().unwrap_or(0)));
                let live = self
                    .live
                    .lock()
                    .expect("lock")
                    .get(&aws_name)
                    .and_then(|l| l.version.clone());
                for d in mine.iter().skip(keep.max(1)) {
                    if live.as_deref() == Some(d.version.as_str()) {
                        continue;
                    }
                    self.delete_deployment(d).await?;
                    removed.push(d.function.name.clone());
                }
            }
            Ok(removed)
        }
        .boxed()
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        async {}.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_clean_and_bounded() {
        assert_eq!(
            lambda_function_name("sri", "Lang Genius", "web_search"),
            "sri-lang-genius-web-search"
        );
        let long = lambda_function_name("sri", &"a".repeat(40), &"b".repeat(40));
        assert_eq!(long.len(), 64);
        assert!(long.starts_with("sri-aaaa"));
        assert_ne!(
            long,
            lambda_function_name("sri", &"a".repeat(40), &"b".repeat(41))
        );
    }

    #[test]
    fn only_the_live_version_goes_through_the_function_url() {
        let deployed = |version: &str| Deployed {
            function: Function {
                name: format!("sri-a-b-{version}"),
                identifier: "a/b:1@x".into(),
                checksum: "x".into(),
            },
            aws_name: "sri-a-b".into(),
            version: version.into(),
        };
        let live = LiveState {
            version: Some("2".into()),
            url: Some("https://u.lambda-url.eu-west-1.on.aws/".into()),
        };
        let url = Target::FunctionUrl {
            url: "https://u.lambda-url.eu-west-1.on.aws/".into(),
            region: "eu-west-1".into(),
            function: "sri-a-b".into(),
        };
        let by_version = |v: &str| Target::InvokeStream {
            function: "sri-a-b".into(),
            qualifier: v.into(),
        };
        let t = Transport::FunctionUrl;
        assert_eq!(route(t, &deployed("2"), Some(&live), "eu-west-1"), url);
        assert_eq!(
            route(t, &deployed("1"), Some(&live), "eu-west-1"),
            by_version("1")
        );
        let no_url = LiveState {
            url: None,
            ..live.clone()
        };
        assert_eq!(
            route(t, &deployed("2"), Some(&no_url), "eu-west-1"),
            by_version("2")
        );
        assert_eq!(route(t, &deployed("2"), None, "eu-west-1"), by_version("2"));
        let t = Transport::InvokeStream;
        assert_eq!(
            route(t, &deployed("2"), Some(&live), "eu-west-1"),
            by_version("2")
        );
    }

    #[test]
    fn descriptions_round_trip() {
        assert_eq!(
            parse_description("sri checksum=abc id=a/b:1@abc"),
            Some(("abc".into(), "a/b:1@abc".into()))
        );
        assert_eq!(parse_description("something else"), None);
        assert_eq!(
            account_of("arn:aws:iam::123456789012:role/x"),
            Some("123456789012")
        );
    }
}
