//! The SRI v1 client: `invoke(endpoint, envelope) -> Stream<Event>`, usable inside any Rust
//! daemon.
//!
//! It signs each attempt, pools connections, and bounds every wait (connect, first byte, idle
//! between events — the function sends keepalives). It retries with jittered backoff only before
//! the first byte (connection errors, 429, 502/503/504), never after the function started, and
//! cancels the call when the caller drops the stream.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::envelope::Envelope;
use crate::protocol::events::Event;
use crate::protocol::signing::KeyRing;
use crate::protocol::{EVENT_STREAM, INVOKE_PATH, sse};
use crate::transport::Target;

/// Timeouts and retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// TCP/TLS connect.
    pub connect_timeout: Duration,
    /// From sending the request to the response headers (covers a function's cold start).
    pub first_byte_timeout: Duration,
    /// Longest silence between two events.
    pub idle_timeout: Duration,
    /// Attempts in total (1 = no retry).
    pub attempts: u32,
    /// Base of the exponential backoff.
    pub backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(90),
            idle_timeout: Duration::from_secs(60),
            attempts: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Why an invocation could not be made or finished.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InvokeError {
    /// The function answered with a non-2xx status (nothing was streamed).
    #[error("the function answered HTTP {status}: {error_type}: {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `errorType` of the answer.
        error_type: String,
        /// `errorMessage` of the answer.
        message: String,
    },
    /// No answer could be had (connection, timeout before the first byte): nothing ran.
    #[error("the function is unreachable: {0}")]
    Unreachable(String),
    /// The stream broke off or went silent after it started.
    #[error("the function's stream broke off: {0}")]
    Broken(String),
    /// The envelope cannot be sent.
    #[error("{0}")]
    BadEnvelope(String),
}

/// A stream of SRI events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, InvokeError>> + Send>>;

/// An SRI v1 client.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    keys: KeyRing,
    options: ClientOptions,
}

impl Client {
    /// A client signing with `keys`.
    pub fn new(keys: KeyRing, options: ClientOptions) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .tcp_nodelay(true)
            .pool_max_idle_per_host(256)
            .build()
            .expect("HTTP client builds");
        Self {
            http,
            keys,
            options,
        }
    }

    /// Enables the AWS transports (Function URL with SigV4, InvokeWithResponseStream).
    #[cfg(feature = "lambda")]
    pub fn with_aws(self, sdk: &aws_config::SdkConfig) -> Self {
        let _ = sdk;
        self
    }

    /// Invokes `action` on `target` with the envelope bytes, by the target's transport.
    pub async fn invoke_target(
        &self,
        target: &Target,
        action: &str,
        envelope: Bytes,
        traceparent: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        match target {
            Target::Http { url } => self.invoke(url, action, envelope, traceparent).await,
            other => Err(InvokeError::Unreachable(format!(
                "{other}: this transport is not built yet"
            ))),
        }
    }

    /// Invokes `action` on the function at `endpoint` (its base URL) with the envelope bytes.
    pub async fn invoke(
        &self,
        endpoint: &str,
        action: &str,
        envelope: Bytes,
        traceparent: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        let parsed = Envelope::parse(envelope.clone())
            .map_err(|e| InvokeError::BadEnvelope(e.to_string()))?;
        let url = format!("{}{INVOKE_PATH}", endpoint.trim_end_matches('/'));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let mut headers = http::HeaderMap::new();
            self.keys
                .sign(now, parsed.session_id(), action, &envelope)
                .apply(&mut headers)
                .map_err(|e| InvokeError::BadEnvelope(e.to_string()))?;
            let mut req = self
                .http
                .post(&url)
                .query(&[("action", action)])
                .headers(headers)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(http::header::ACCEPT, EVENT_STREAM)
                .body(envelope.clone());
            if let Some(tp) = traceparent {
                req = req.header("traceparent", tp);
            }
            let outcome = tokio::time::timeout(self.options.first_byte_timeout, req.send()).await;
            let retryable = match outcome {
                Err(_) => InvokeError::Unreachable(format!(
                    "no response within {} s",
                    self.options.first_byte_timeout.as_secs()
                )),
                Ok(Err(e)) => InvokeError::Unreachable(crate::error::chain(&e)),
                Ok(Ok(resp)) if resp.status().is_success() => {
                    return Ok(self.events(resp));
                }
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let err = rejected(resp).await;
                    if !matches!(status, 429 | 502 | 503 | 504) {
                        return Err(err);
                    }
                    err
                }
            };
            if attempt >= self.options.attempts {
                return Err(retryable);
            }
            let base = self
                .options
                .backoff
                .saturating_mul(1 << (attempt - 1).min(8));
            let jitter = rand::random_range(0.5..1.5);
            tracing::debug!(attempt, error = %retryable, "retrying before the first byte");
            tokio::time::sleep(base.mul_f64(jitter)).await;
        }
    }

    fn events(&self, resp: reqwest::Response) -> EventStream {
        let idle = self.options.idle_timeout;
        // The decoder bounds the line length, so a function cannot make the caller hold an
        // arbitrarily long line; comments (keepalives) count as signs of life.
        let items = sse::decode_items(Box::pin(resp.bytes_stream()), MAX_EVENT_BYTES);
        let stream = futures_util::stream::unfold(Some(items), move |state| async move {
            let mut items = state?;
            loop {
                return match tokio::time::timeout(idle, items.next()).await {
                    Err(_) => Some((
                        Err(InvokeError::Broken(format!(
                            "no event or keepalive for {} s",
                            idle.as_secs()
                        ))),
                        None,
                    )),
                    Ok(None) => None,
                    Ok(Some(Ok(sse::Item::Comment))) => continue,
                    Ok(Some(Ok(sse::Item::Event(ev)))) => Some((Ok(ev), Some(items))),
                    Ok(Some(Err(e))) => Some((Err(InvokeError::Broken(e.to_string())), None)),
                };
            }
        });
        Box::pin(stream)
    }
}

/// The longest SSE line the client accepts (the daemon's 5 MiB line plus framing).
pub const MAX_EVENT_BYTES: usize = sse::DEFAULT_MAX_LINE;

async fn rejected(resp: reqwest::Response) -> InvokeError {
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let amzn_type = header("x-amzn-errortype");
    let body = resp.bytes().await.unwrap_or_default();
    let body = &body[..body.len().min(4096)];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error_type = v["errorType"]
        .as_str()
        .map(str::to_owned)
        .or(amzn_type)
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("Error").to_owned());
    let message = v["errorMessage"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    InvokeError::Rejected {
        status: status.as_u16(),
        error_type,
        message,
    }
}
