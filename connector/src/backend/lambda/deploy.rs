//! Deploying one package: build the zip, converge the function's code and configuration, publish
//! (or reuse) the version for the checksum, point `live` at it, and make sure its Function URL
//! and invoke permissions exist. Every step first looks at what AWS has, so a deploy that was
//! interrupted halfway converges on the next launch.

use aws_sdk_lambda::client::Waiters;
use aws_sdk_lambda::error::ProvideErrorMetadata;
use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{
    Architecture, Environment, EphemeralStorage, FunctionCode, FunctionConfiguration,
    FunctionUrlAuthType, InvokeMode, Runtime,
};
use std::collections::HashMap;

use super::errors::{account_of, aws_err, is_not_found, waited};
use super::fastpath;
use super::naming::{deployment_name, lambda_function_name, version_description};
use super::routing::LiveState;
use super::{
    Deployed, LIVE_ALIAS, LambdaBackend, MANAGED_BY, TAG_CHECKSUM, TAG_MANAGED_BY, TAG_PLUGIN, WAIT,
};
use crate::Error;
use crate::backend::settings::function_settings;
use crate::backend::{Function, Progress};
use crate::package::Package;
use crate::packaging::{self, Artifact};

impl LambdaBackend {
    /// The function settings a package should run with.
    fn desired(&self, artifact: &Artifact, sdk_layer: Option<String>) -> Desired {
        let settings = function_settings(
            &artifact.config,
            self.options.overrides(),
            &self.context.signing_keys,
            &self.context.backwards_env,
        );
        let mut env = settings.env;
        let mut layers = Vec::new();
        if let Some(layer) = &self.options.bootstrap_layer_arn {
            layers.push(layer.clone());
            env.insert("AWS_LAMBDA_EXEC_WRAPPER".into(), "/opt/bootstrap".into());
        }
        // The SDK layer lands in /opt/python, beside the bootstrap layer's /opt/bootstrap.
        layers.extend(sdk_layer);
        Desired {
            runtime: artifact.config.runtime.clone(),
            handler: artifact.config.handler.clone(),
            arch: artifact.target.arch.lambda_name().to_owned(),
            memory_mb: settings.memory_mb,
            timeout_s: settings.timeout_s,
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

    pub(super) async fn deploy_inner(
        &self,
        pkg: &Package,
        progress: &Progress,
    ) -> Result<Function, Error> {
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
                "{:.1} MiB zipped, {:.1} MiB unzipped{}{}{}",
                artifact.zipped_bytes as f64 / 1048576.0,
                artifact.unzipped_bytes as f64 / 1048576.0,
                match &artifact.bytecode {
                    Some(v) => format!(", bytecode by Python {v}"),
                    None => ", no bytecode".into(),
                },
                match &artifact.layer {
                    Some(l) => format!(
                        ", SDK layer dify_plugin {} ({})",
                        l.manifest.sdk_version,
                        packaging::human(l.zipped_bytes)
                    ),
                    None => String::new(),
                },
                if artifact.cache_hit { " (cached)" } else { "" }
            ),
        );
        // Until the function uses the layer version, this replica's gc leaves it alone.
        let _layer_in_use = self.layer_use.read().await;
        let sdk_layer = match &artifact.layer {
            Some(l) => Some(self.ensure_layer(l, progress).await?),
            None => None,
        };
        let desired = self.desired(&artifact, sdk_layer);
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
                    .snap_start(fastpath::snap_start(&self.options))
                    .set_capacity_provider_config(fastpath::capacity_provider(&self.options))
                    .description(format!("Dify plugin {}/{} (sri)", m.author, m.name))
                    .set_tags(Some(tags.clone()))
                    .publish(false)
                    .send()
                    .await
                    .map_err(|e| aws_err(format!("CreateFunction {aws_name}"), &e))?;
                self.wait_active(&aws_name).await?;
            }
            Some(f) => {
                // The name's hash keeps plugins apart; the tag says for sure. A function of
                // another plugin is never taken over (a function with no plugin tag yet is
                // what an interrupted first deploy leaves).
                let plugin = format!("{}/{}", m.author, m.name);
                if let Some(owner) = f.tags().and_then(|t| t.get(TAG_PLUGIN))
                    && *owner != plugin
                {
                    return Err(Error::Backend(format!(
                        "the Lambda function {aws_name} belongs to plugin `{owner}`, not \
                         `{plugin}`; delete it or set another SRI_LAMBDA_PREFIX"
                    )));
                }
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
                if !desired.matches(&config) || !fastpath::matches(&self.options, &config) {
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
                        .snap_start(fastpath::snap_start(&self.options))
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
                if self.options.snap_start {
                    // Calls fail until its snapshot is taken.
                    self.wait_active(&format!("{aws_name}:{v}")).await?;
                }
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

        // Known true once the alias answered (a later answer wins over one asked before).
        let alias_asked = std::time::Instant::now();

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
        self.remember_live(
            &aws_name,
            LiveState {
                version: Some(version),
                url: Some(url),
                asked: alias_asked,
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

    pub(super) async fn wait_updated(&self, aws_name: &str) -> Result<(), Error> {
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
}

/// Function settings compared with what AWS has, so an unchanged relaunch writes nothing.
/// (No `Debug`: `env` holds the signing keys.)
pub(super) struct Desired {
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
    pub(super) fn matches(&self, c: &FunctionConfiguration) -> bool {
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

enum Code {
    Zip(Vec<u8>),
    S3 { bucket: String, key: String },
}

pub(super) fn environment(env: &HashMap<String, String>) -> Environment {
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
