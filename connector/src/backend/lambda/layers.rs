//! The shared SDK layer on Lambda: published once per content hash and reused by every function
//! that needs it, and collected by `gc` when no function uses it any more.
//!
//! A layer version is found again by its description ([`layer_description`]: our prefix and the
//! hex sha256 of its zip), so a restarted connector, or another replica, reuses what exists
//! instead of publishing the same content again; it is reused only once Lambda's own hash of
//! its content agrees.

use aws_sdk_lambda::primitives::Blob;
use aws_sdk_lambda::types::{
    Architecture, FunctionVersion, LayerVersionContentInput, LayerVersionsListItem, Runtime,
};
use base64::Engine as _;
use std::collections::HashSet;

use super::LambdaBackend;
use super::errors::{aws_err, is_not_found};
use super::naming::{layer_description, parse_layer_description, sdk_layer_name};
use crate::Error;
use crate::backend::Progress;
use crate::packaging::{self, layer::Layer};

impl LambdaBackend {
    /// The version ARN of `layer` on Lambda: an existing version with the same content hash, or
    /// a new one.
    pub(super) async fn ensure_layer(
        &self,
        layer: &Layer,
        progress: &Progress,
    ) -> Result<String, Error> {
        let m = &layer.manifest;
        let name = sdk_layer_name(&self.options.prefix, &m.sdk_version, &m.target);
        // One publish at a time per layer name (layer names never look like function names,
        // which end in a hash).
        let lock = self.lock_for(&name);
        let _guard = lock.lock().await;
        let described = self.layer_versions(&name).await?.into_iter().filter(|v| {
            v.description()
                .and_then(|d| parse_layer_description(&self.options.prefix, d))
                == Some(layer.sha256.as_str())
        });
        for v in described {
            let Some(arn) = v.layer_version_arn().map(str::to_owned) else {
                continue;
            };
            // The description is only a claim: reuse the version only if Lambda holds the very
            // zip (a version published by hand, or half-written, may say anything).
            if self
                .layer_content_is(&name, v.version(), &layer.sha256)
                .await?
            {
                tracing::info!(layer = %arn, "reusing the SDK layer");
                let _ = progress.send(("deploy", format!("reusing SDK layer {arn}")));
                return Ok(arn);
            }
            tracing::warn!(layer = %arn, sha256 = %layer.sha256, "an SDK layer version's description names our zip but its content differs; publishing a new version");
        }
        let content = if layer.needs_s3() {
            let Some(bucket) = &self.options.artifact_bucket else {
                return Err(Error::Packaging(format!(
                    "the SDK layer zip is {}, over Lambda's {} direct-upload limit; set \
                     SRI_ARTIFACT_BUCKET to an S3 bucket in {} (infra/'s ArtifactBucket output), \
                     or SRI_LAMBDA_SDK_LAYER=false",
                    packaging::human(layer.zipped_bytes),
                    packaging::human(packaging::DIRECT_UPLOAD_LIMIT),
                    self.region
                )));
            };
            let key = format!("{}/layers/{}.zip", self.options.prefix, layer.sha256);
            let body = aws_sdk_s3::primitives::ByteStream::from_path(&layer.zip)
                .await
                .map_err(|e| Error::Packaging(format!("reading {}: {e}", layer.zip.display())))?;
            self.s3
                .put_object()
                .bucket(bucket)
                .key(&key)
                .body(body)
                .send()
                .await
                .map_err(|e| aws_err(format!("S3 PutObject s3://{bucket}/{key}"), &e))?;
            LayerVersionContentInput::builder()
                .s3_bucket(bucket)
                .s3_key(key)
                .build()
        } else {
            let bytes = tokio::fs::read(&layer.zip)
                .await
                .map_err(|e| Error::Packaging(format!("reading {}: {e}", layer.zip.display())))?;
            LayerVersionContentInput::builder()
                .zip_file(Blob::new(bytes))
                .build()
        };
        let out = self
            .lambda
            .publish_layer_version()
            .layer_name(&name)
            .description(layer_description(
                &self.options.prefix,
                &m.sdk_version,
                &layer.sha256,
            ))
            .content(content)
            .compatible_runtimes(Runtime::from(m.target.python.lambda_runtime()))
            .compatible_architectures(Architecture::from(m.target.arch.lambda_name()))
            .send()
            .await
            .map_err(|e| aws_err(format!("PublishLayerVersion {name}"), &e))?;
        let arn = out.layer_version_arn().unwrap_or_default().to_owned();
        tracing::info!(layer = %arn, sha256 = %layer.sha256, bytes = layer.zipped_bytes, "published the SDK layer");
        let _ = progress.send((
            "deploy",
            format!(
                "published SDK layer {arn} ({})",
                packaging::human(layer.zipped_bytes)
            ),
        ));
        Ok(arn)
    }

    /// Deletes the versions of our SDK layers that no function version uses (any function in
    /// the account, not only ours: a layer someone else attached stays). Returns their ARNs.
    pub(super) async fn collect_layers(&self) -> Result<Vec<String>, Error> {
        // No deploy of this replica is between choosing a layer version and attaching it.
        let _no_deploys = self.layer_use.write().await;
        let mut used = HashSet::new();
        let mut marker = None;
        loop {
            let page = self
                .lambda
                .list_functions()
                .function_version(FunctionVersion::All)
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| aws_err("ListFunctions", &e))?;
            for f in page.functions() {
                used.extend(f.layers().iter().filter_map(|l| l.arn().map(str::to_owned)));
            }
            marker = page.next_marker().map(str::to_owned);
            if marker.is_none() {
                break;
            }
        }
        let ours = format!("{}-sdk-", crate::backend::clean_name(&self.options.prefix));
        let mut names = Vec::new();
        let mut marker = None;
        loop {
            let page = self
                .lambda
                .list_layers()
                .set_marker(marker)
                .send()
                .await
                .map_err(|e| aws_err("ListLayers", &e))?;
            names.extend(
                page.layers()
                    .iter()
                    .filter_map(|l| l.layer_name())
                    .filter(|n| n.starts_with(&ours))
                    .map(str::to_owned),
            );
            marker = page.next_marker().map(str::to_owned);
            if marker.is_none() {
                break;
            }
        }
        let mut removed = Vec::new();
        for name in names {
            let lock = self.lock_for(&name);
            let _guard = lock.lock().await;
            for v in self.layer_versions(&name).await? {
                let (Some(arn), Some(d)) = (v.layer_version_arn(), v.description()) else {
                    continue;
                };
                if parse_layer_description(&self.options.prefix, d).is_none() || used.contains(arn)
                {
                    continue;
                }
                match self
                    .lambda
                    .delete_layer_version()
                    .layer_name(&name)
                    .version_number(v.version())
                    .send()
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.as_service_error().is_some_and(is_not_found) => {}
                    Err(e) => return Err(aws_err(format!("DeleteLayerVersion {arn}"), &e)),
                }
                tracing::info!(layer = %arn, "deleted an unused SDK layer version");
                removed.push(arn.to_owned());
            }
        }
        Ok(removed)
    }

    /// Every version of the layer `name`, all pages; none when the layer does not exist.
    /// Whether version `version` of layer `name` holds the zip whose hex sha256 is `sha256`
    /// (Lambda's `CodeSha256` is the same digest in base64).
    async fn layer_content_is(
        &self,
        name: &str,
        version: i64,
        sha256: &str,
    ) -> Result<bool, Error> {
        let out = self
            .lambda
            .get_layer_version()
            .layer_name(name)
            .version_number(version)
            .send()
            .await
            .map_err(|e| aws_err(format!("GetLayerVersion {name}:{version}"), &e))?;
        let want = hex::decode(sha256)
            .map(|d| base64::engine::general_purpose::STANDARD.encode(d))
            .unwrap_or_default();
        Ok(out.content().and_then(|c| c.code_sha256()) == Some(want.as_str()))
    }

    async fn layer_versions(&self, name: &str) -> Result<Vec<LayerVersionsListItem>, Error> {
        let mut versions = Vec::new();
        let mut marker = None;
        loop {
            let page = match self
                .lambda
                .list_layer_versions()
                .layer_name(name)
                .set_marker(marker)
                .send()
                .await
            {
                Ok(p) => p,
                Err(e) if e.as_service_error().is_some_and(is_not_found) => break,
                Err(e) => return Err(aws_err(format!("ListLayerVersions {name}"), &e)),
            };
            versions.extend(page.layer_versions().iter().cloned());
            marker = page.next_marker().map(str::to_owned);
            if marker.is_none() {
                break;
            }
        }
        Ok(versions)
    }
}
