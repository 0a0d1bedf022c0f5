//! Finding what this connector deployed before: every function with our prefix and ownership tag,
//! its published versions, and (when the signing keys changed) republishing the live version so
//! it verifies with the current key ring. AWS is the state; this only reads it back.

use aws_sdk_lambda::types::FunctionConfiguration;

use super::deploy::environment;
use super::errors::aws_err;
use super::{LIVE_ALIAS, LambdaBackend, MANAGED_BY, TAG_MANAGED_BY};
use crate::Error;

impl LambdaBackend {
    /// Reads back every function this connector owns, its versions, alias and URL.
    pub(super) async fn discover(&self) -> Result<(), Error> {
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
    pub(super) async fn managed_functions(&self) -> Result<Vec<FunctionConfiguration>, Error> {
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
    pub(super) async fn versions(
        &self,
        aws_name: &str,
    ) -> Result<Vec<FunctionConfiguration>, Error> {
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
}
