//! SigV4 for Lambda Function URLs with `AuthType: AWS_IAM`.
//!
//! Such a URL refuses any request that is not signed for service `lambda` in the function's
//! region, so the connector signs every attempt of an SRI v1 call on top of the SRI signature.
//! The signing itself is `aws-sigv4`'s; this module decides what is signed and keeps resolved
//! credentials, because `SdkConfig`'s provider chain does no caching of its own (the SDK clients
//! cache in their runtime, which a plain HTTP request does not go through).
//!
//! What is signed matches botocore's `SigV4Auth(credentials, "lambda", region)` byte for byte
//! (the tests check it): every header the caller passes except those proxies and tracing
//! middleware may rewrite ([`UNSIGNED_HEADERS`], e.g. `traceparent`), plus `host` and
//! `x-amz-date`, the session token (`x-amz-security-token`) when the credentials have one, and the SHA-256 of the
//! body (no `x-amz-content-sha256` header: botocore's `SigV4Auth` does not add one; only S3
//! needs it).

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use aws_smithy_types::error::display::DisplayErrorContext;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::{Duration, SystemTime};

use crate::Error;

/// The SigV4 service name of Lambda (Function URLs included).
pub const SERVICE: &str = "lambda";

/// Headers never signed: botocore 1.44's `SIGNED_HEADERS_BLACKLIST` (hop-by-hop headers and
/// tracing headers that a proxy or tracer may change in flight, which would break the signature).
pub const UNSIGNED_HEADERS: &[&str] = &[
    "authorization",
    "baggage",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "traceparent",
    "tracestate",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

/// Credentials that expire sooner than this are fetched anew before signing: a request signed
/// with them could still be in flight (or retried) when they lapse.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// Signs a request to a Function URL: returns the headers to add (`authorization`,
/// `x-amz-date`, and `x-amz-security-token` when the credentials carry a session token).
///
/// `url` must be in its final, encoded form (what is sent); every header of `headers` but
/// [`UNSIGNED_HEADERS`] is signed, so pass only the ones the request will carry unchanged (not
/// `content-length`, which the HTTP client owns). `time` is the signing time (`SystemTime::now()` outside tests).
pub fn sign(
    method: &http::Method,
    url: &str,
    headers: &HeaderMap,
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
) -> Result<HeaderMap, Error> {
    let failed = |detail: String| Error::Aws {
        operation: "SigV4 signing".into(),
        detail,
    };
    let mut pairs = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        if UNSIGNED_HEADERS.contains(&name.as_str()) {
            continue;
        }
        let value = value.to_str().map_err(|_| {
            failed(format!(
                "header `{name}` is not visible ASCII and cannot be signed"
            ))
        })?;
        pairs.push((name.as_str(), value));
    }
    let request = SignableRequest::new(
        method.as_str(),
        url,
        pairs.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| failed(format!("`{url}`: {}", DisplayErrorContext(&e))))?;
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| failed(e.to_string()))?
        .into();
    let (instructions, _signature) = aws_sigv4::http_request::sign(request, &params)
        .map_err(|e| failed(DisplayErrorContext(&e).to_string()))?
        .into_parts();
    let (new_headers, _params) = instructions.into_parts();
    let mut out = HeaderMap::with_capacity(new_headers.len());
    for header in new_headers {
        let mut value = HeaderValue::from_str(header.value())
            .map_err(|_| failed(format!("`{}` is not a header value", header.name())))?;
        // Keeps the signature and the token out of any `Debug` print of the request.
        value.set_sensitive(header.sensitive() || header.name() != "x-amz-date");
        out.insert(HeaderName::from_static(header.name()), value);
    }
    Ok(out)
}

/// Signs Function URL requests with the credentials of an `SdkConfig`, resolving them once and
/// again only when they near their expiry.
#[derive(Clone)]
pub struct Signer {
    provider: Option<SharedCredentialsProvider>,
    cached: std::sync::Arc<tokio::sync::Mutex<Option<Credentials>>>,
}

/// Prints no credential, not even the access key id.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("has_provider", &self.provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer drawing on `provider` (`SdkConfig::credentials_provider()`); `None` makes every
    /// signing fail with a message saying how to configure credentials.
    pub fn new(provider: Option<SharedCredentialsProvider>) -> Self {
        Self {
            provider,
            cached: Default::default(),
        }
    }

    /// The current credentials, fetched from the provider when none are cached or the cached
    /// ones are about to expire. One caller refreshes at a time; the others wait for its result.
    pub async fn credentials(&self) -> Result<Credentials, Error> {
        let mut slot = self.cached.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| fresh(c, SystemTime::now())) {
            return Ok(c.clone());
        }
        let provider = self.provider.as_ref().ok_or_else(|| Error::Aws {
            operation: "loading credentials".into(),
            detail: "the AWS configuration has no credentials provider: set AWS_PROFILE, \
                     AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run with an IAM role"
                .into(),
        })?;
        let creds = provider
            .provide_credentials()
            .await
            .map_err(|e| Error::Aws {
                operation: "loading credentials".into(),
                detail: DisplayErrorContext(&e).to_string(),
            })?;
        *slot = Some(creds.clone());
        Ok(creds)
    }

    /// [`sign`] with the current credentials and the current time.
    pub async fn sign_now(
        &self,
        method: &http::Method,
        url: &str,
        headers: &HeaderMap,
        body: &[u8],
        region: &str,
    ) -> Result<HeaderMap, Error> {
        let credentials = self.credentials().await?;
        sign(
            method,
            url,
            headers,
            body,
            &credentials,
            region,
            SystemTime::now(),
        )
    }
}

fn fresh(credentials: &Credentials, now: SystemTime) -> bool {
    credentials
        .expiry()
        .is_none_or(|expiry| expiry > now + REFRESH_BEFORE_EXPIRY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    /// Fixed inputs, expected values computed independently with botocore 1.44.5
    /// (`SigV4Auth(Credentials(...), "lambda", "eu-west-1")`, clock patched to the same time).
    #[test]
    fn signs_like_botocore_with_fixed_inputs() {
        let creds = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            None,
            None,
            "test",
        );
        let out = sign(
            &http::Method::POST,
            "https://abc.lambda-url.eu-west-1.on.aws/invoke?action=invoke_tool",
            &headers(&[
                ("content-type", "application/json"),
                ("accept", "text/event-stream"),
                // Not signed (botocore neither): tracers may rewrite it.
                (
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ]),
            br#"{"session_id":"s"}"#,
            &creds,
            "eu-west-1",
            at(1_700_000_000),
        )
        .unwrap();
        assert_eq!(out["x-amz-date"], "20231114T221320Z");
        assert_eq!(
            out["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/eu-west-1/lambda/aws4_request, \
             SignedHeaders=accept;content-type;host;x-amz-date, \
             Signature=f8970459a5cc5012a1bd7ef46c5157fa86e34af466e538aa5665a395bc57ac90"
        );
        assert!(out.get("x-amz-security-token").is_none());
        assert!(out.get("x-amz-content-sha256").is_none());
        assert!(out["authorization"].is_sensitive());

        let with_token = Credentials::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("session/token+with=chars".into()),
            None,
            "test",
        );
        let out = sign(
            &http::Method::POST,
            "https://abc.lambda-url.eu-west-1.on.aws/invoke?action=invoke_tool",
            &headers(&[("content-type", "application/json")]),
            "café".as_bytes(),
            &with_token,
            "eu-west-1",
            at(1_700_000_000),
        )
        .unwrap();
        assert_eq!(out["x-amz-security-token"], "session/token+with=chars");
        assert_eq!(
            out["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20231114/eu-west-1/lambda/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, \
             Signature=afdb7e125e0eb0fd9fd81e93510e272d48f5e900d326d42704169177afda9052"
        );
    }

    #[test]
    fn refuses_unsignable_headers_without_echoing_secrets() {
        let creds = Credentials::new("AKID", "SECRETSECRET", None, None, "test");
        let mut h = HeaderMap::new();
        h.insert("x-bad", HeaderValue::from_bytes("é".as_bytes()).unwrap());
        let err = sign(
            &http::Method::POST,
            "https://h/invoke",
            &h,
            b"",
            &creds,
            "us-east-1",
            at(0),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("x-bad"), "{err}");
        assert!(!err.contains("SECRETSECRET"), "{err}");
    }

    #[test]
    fn credentials_are_refreshed_before_they_expire() {
        let now = at(1_000_000);
        let expiring = |secs| Credentials::new("A", "S", None, Some(at(secs)), "test");
        assert!(fresh(&Credentials::new("A", "S", None, None, "t"), now));
        assert!(fresh(&expiring(1_000_000 + 3600), now));
        assert!(!fresh(&expiring(1_000_000 + 60), now));
    }

    #[tokio::test]
    async fn missing_provider_says_how_to_configure_credentials() {
        let err = Signer::new(None)
            .credentials()
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    }
}
