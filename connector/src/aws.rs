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
    // Credentials given in the environment were taken out of it at start (see
    // `crate::harden`), so that no child inherits them: they are handed over here.
    if let (Some(id), Some(key)) = (
        crate::harden::secret("AWS_ACCESS_KEY_ID"),
        crate::harden::secret("AWS_SECRET_ACCESS_KEY"),
    ) {
        let token = crate::harden::secret("AWS_SESSION_TOKEN")
            .or_else(|| crate::harden::secret("AWS_SECURITY_TOKEN"))
            .map(str::to_owned);
        loader = loader.credentials_provider(aws_credential_types::Credentials::new(
            id,
            key,
            token,
            None,
            "environment",
        ));
    }
    loader.load().await
}

/// The configuration of calls to emulated functions (the emulator backend): its region and
/// fixed placeholder credentials, so the `function-url` transport signs as it does for AWS and
/// no real credentials ever reach the emulator.
pub fn emulator_config(region: &str) -> SdkConfig {
    let credentials = aws_credential_types::Credentials::new(
        "SRIEMULATOR",
        "not-a-secret-the-emulator-checks-nothing",
        None,
        None,
        "sri-emulator",
    );
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region.to_owned()))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(credentials),
        )
        .build()
}

/// Reads the SRI key ring from a Secrets Manager secret, in one of three shapes:
/// - JSON `{"kid":"k1","secret":"<base64>","verify":"k0:<base64>,…"}` — what infra/'s stack
///   generates (`GenerateSecretString` makes 64 letters and digits: valid base64 of 48 bytes);
///   `verify` optionally lists keys that still verify during a rotation;
/// - a ring already (`kid:base64secret,…`);
/// - a single generated string of at least 32 characters, which becomes `default:<base64 of it>`.
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
    use crate::protocol::signing::KeyRing;
    let valid = |ring: String| ring.parse::<KeyRing>().is_ok().then_some(ring);
    if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let mut ring = format!("{}:{}", v["kid"].as_str()?, v["secret"].as_str()?);
        if let Some(verify) = v["verify"].as_str().filter(|s| !s.trim().is_empty()) {
            ring.push(',');
            ring.push_str(verify.trim());
        }
        return valid(ring);
    }
    if let Some(ring) = valid(text.to_owned()) {
        return Some(ring);
    }
    (text.len() >= 32 && !text.contains([',', ':'])).then(|| {
        format!(
            "default:{}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::ring_from_secret_text;

    #[test]
    fn secrets_of_every_documented_shape_become_rings() {
        let generated = "Zq8vJ2mT4xR7nB1cW5yH9kL3pD6fG0sAZq8vJ2mT4xR7nB1cW5yH9kL3pD6fG0sA";
        assert_eq!(
            ring_from_secret_text(&format!(r#"{{"kid":"k1","secret":"{generated}"}}"#)).as_deref(),
            Some(format!("k1:{generated}").as_str())
        );
        let old = format!("k0:{}", "A".repeat(44));
        assert_eq!(
            ring_from_secret_text(&format!(
                r#"{{"kid":"k1","secret":"{generated}","verify":"{old}"}}"#
            )),
            Some(format!("k1:{generated},{old}"))
        );
        assert_eq!(ring_from_secret_text(&old), Some(old.clone()));
        assert!(
            ring_from_secret_text(&generated[..32])
                .unwrap()
                .starts_with("default:")
        );
        assert_eq!(ring_from_secret_text("short"), None);
        assert_eq!(
            ring_from_secret_text(r#"{"kid":"k1","secret":"c2hvcnQ="}"#),
            None
        );
    }
}
