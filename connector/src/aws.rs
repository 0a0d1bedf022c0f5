//! One place that turns the connector's AWS settings into an SDK configuration, so the Lambda
//! backend, the S3 upload, the secret lookup and the SigV4 transports all agree on region,
//! credentials and endpoint (a `moto_server` URL in tests, `AWS_ENDPOINT_URL` in general).

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Loads the SDK configuration from the usual chain (env, profile, IMDS, …), with the region and
/// endpoint overridden when given.
pub async fn sdk_config(region: Option<&str>, endpoint_url: Option<&str>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_owned()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// Reads the SRI v1 key ring from a Secrets Manager secret: either a ring already
/// (`kid:base64secret,…`), or a single generated secret string (what CloudFormation's
/// `GenerateSecretString` makes), which becomes the ring `default:<base64 of it>`.
pub async fn signing_keys_from_secret(
    sdk: &SdkConfig,
    secret_id: &str,
) -> Result<crate::secret::Secret, crate::Error> {
    let out = aws_sdk_secretsmanager::Client::new(sdk)
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|e| crate::Error::Aws {
            operation: format!("GetSecretValue {secret_id}"),
            detail: format!(
                "{}; the connector needs secretsmanager:GetSecretValue (and kms:Decrypt) on it",
                aws_sdk_secretsmanager::error::DisplayErrorContext(&e)
            ),
        })?;
    let text = out.secret_string().unwrap_or_default().trim();
    ring_from_secret_text(text)
        .map(crate::secret::Secret)
        .ok_or_else(|| {
            crate::Error::KeyRing(format!(
                "secret {secret_id} is neither a key ring (`kid:base64secret,…`) nor a generated \
             secret of at least 32 characters"
            ))
        })
}

/// The ring a secret's text stands for (see [`signing_keys_from_secret`]).
pub fn ring_from_secret_text(text: &str) -> Option<String> {
    if text.parse::<crate::protocol::signing::KeyRing>().is_ok() {
        return Some(text.to_owned());
    }
    (text.len() >= 32 && !text.contains([',', ':'])).then(|| {
        format!(
            "default:{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text)
        )
    })
}
