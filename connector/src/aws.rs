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
