//! The SRI client (signs v2): `invoke(endpoint, envelope) -> Stream<Event>`, usable inside any Rust
//! daemon.
//!
//! It signs each attempt, pools connections, and bounds every wait (connect, first byte, idle
//! between events — the function sends keepalives). It retries with jittered backoff only when
//! nothing can have run (connection errors, 429, 503), never after the function was reached
//! with a call it may have acted on (a 502 from a function is often a crash mid-call), and
//! cancels the call when the caller drops the stream.
//!
//! One request path serves every [`Target`]: plain HTTP and Lambda Function URLs share it (a
//! Function URL attempt only adds SigV4 headers, freshly dated), and `InvokeWithResponseStream`
//! shares the retry loop and the SSE decoding, differing only in how an attempt is made
//! ([`crate::transport::invoke_stream`]). Every stream ends with the function's `end` event or
//! with an error: a stream that stops without `end` is never a silent success.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, HeaderValue};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::envelope::Envelope;
use crate::protocol::events::{Event, EventKind};
use crate::protocol::signing::KeyRing;
use crate::protocol::{EVENT_STREAM, INVOKE_PATH, JSON, sse};
use crate::transport::{Target, aws_hint, invoke_query};
#[cfg(feature = "lambda")]
use crate::transport::{invoke_stream, sigv4};

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
    /// Concurrent invocations of one [`Target::H2c`] function that each get a connection of
    /// their own (HTTP/1.1); further ones share an h2c connection. See [`Lanes`].
    pub dedicated_streams: usize,
    /// The largest SSE line, and event, accepted from a function.
    pub max_event_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            first_byte_timeout: Duration::from_secs(90),
            idle_timeout: Duration::from_secs(60),
            attempts: 3,
            backoff: Duration::from_millis(200),
            dedicated_streams: DEFAULT_DEDICATED_STREAMS,
            max_event_bytes: MAX_EVENT_BYTES,
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

/// The bytes of an SRI event stream as a transport delivers them, failures already worded.
pub(crate) type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, InvokeError>> + Send>>;

/// How one attempt failed: worth another attempt (nothing ran, or the platform said "later"), or
/// final.
pub(crate) enum Failure {
    /// Retry after a backoff, if attempts remain.
    Retry(InvokeError),
    /// Give up with this error.
    Fatal(InvokeError),
}

impl Failure {
    /// A function's refusal: retried when its status is 429 or 503 (the platform's or the
    /// bootstrap's "later", before anything ran), final otherwise. A 502 or 504 is final: it
    /// can come from a function that crashed or timed out mid-call, and a call that may have
    /// had effects is never resent.
    pub(crate) fn refused(err: InvokeError) -> Self {
        match &err {
            InvokeError::Rejected {
                status: 429 | 503, ..
            } => Self::Retry(err),
            _ => Self::Fatal(err),
        }
    }
}

/// An SRI client.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// HTTP/2 with prior knowledge, for [`Target::H2c`].
    h2c: reqwest::Client,
    lanes: std::sync::Arc<Lanes>,
    keys: KeyRing,
    options: ClientOptions,
    #[cfg(feature = "lambda")]
    aws: Option<std::sync::Arc<AwsClients>>,
}

/// What the AWS transports need: a Lambda client for `InvokeWithResponseStream` and a SigV4
/// signer for Function URLs, both from one `SdkConfig`.
#[cfg(feature = "lambda")]
#[derive(Debug)]
struct AwsClients {
    lambda: aws_sdk_lambda::Client,
    signer: sigv4::Signer,
}

/// How an HTTP attempt authenticates to the platform, on top of the SRI signature.
enum PlatformAuth {
    /// Nothing more (`bootstrap serve`).
    None,
    /// SigV4 (service `lambda`) in `region`: a Function URL with `AuthType: AWS_IAM`.
    #[cfg(feature = "lambda")]
    SigV4 {
        signer: sigv4::Signer,
        region: String,
    },
}

impl Client {
    /// A client signing with `keys`.
    pub fn new(keys: KeyRing, options: ClientOptions) -> Self {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(options.connect_timeout)
                .tcp_nodelay(true)
                // Under `bootstrap serve`'s idle deadline (its header-read timeout, 30 s by
                // default), so that a pooled connection is dropped here before it is closed
                // there, rather than raced.
                .pool_idle_timeout(POOL_IDLE)
                // The bootstrap turns reqwest's gzip on for the whole workspace: the connector
                // must not ask for it (SSE is streamed as it comes, and every header it sends to a
                // Function URL is one SigV4 signed).
                .no_gzip()
        };
        let http = builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("HTTP client builds");
        let h2c = builder()
            // Plain HTTP only: no need to load the system's root certificates (disk I/O).
            .tls_built_in_root_certs(false)
            .http2_prior_knowledge()
            // Streams share the connection's flow-control window: a few daemons reading slowly
            // must not stall every other stream to the function, so the connection window is
            // the largest there is and each stream is bounded by its own window instead.
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_max_frame_size(H2_MAX_FRAME)
            .build()
            .expect("HTTP client builds");
        Self {
            http,
            h2c,
            lanes: std::sync::Arc::new(Lanes::new(options.dedicated_streams)),
            keys,
            options,
            #[cfg(feature = "lambda")]
            aws: None,
        }
    }

    /// The same client, able to reach [`Target::FunctionUrl`] and [`Target::InvokeStream`] with
    /// the region, credentials and endpoint of `config` (see [`crate::aws::sdk_config`]).
    ///
    /// The Lambda client it keeps does not retry and has no stalled-stream protection: this
    /// client retries itself, only before the first byte, and its idle timeout (the function
    /// sends keepalives) is what bounds a silent stream.
    #[cfg(feature = "lambda")]
    pub fn with_aws(mut self, config: &aws_config::SdkConfig) -> Self {
        use aws_sdk_lambda::config::retry::RetryConfig;
        use aws_sdk_lambda::config::timeout::TimeoutConfig;
        let lambda = aws_sdk_lambda::config::Builder::from(config)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(self.options.connect_timeout)
                    .build(),
            )
            .stalled_stream_protection(
                aws_sdk_lambda::config::StalledStreamProtectionConfig::disabled(),
            )
            .build();
        self.aws = Some(std::sync::Arc::new(AwsClients {
            lambda: aws_sdk_lambda::Client::from_conf(lambda),
            signer: sigv4::Signer::new(config.credentials_provider()),
        }));
        self
    }

    /// Invokes `action` on `target` with the envelope bytes, by the target's transport, signed
    /// for the function name the target itself carries (a Lambda function's name; empty for a
    /// `bootstrap serve` run without `SRI_FUNCTION_NAME`). See [`Client::invoke_function`].
    pub async fn invoke_target(
        &self,
        target: &Target,
        action: &str,
        envelope: Bytes,
        traceparent: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        self.invoke_function("", target, action, envelope, traceparent)
            .await
    }

    /// The key ring this client signs with.
    pub fn keys(&self) -> &KeyRing {
        &self.keys
    }

    /// Invokes `action` on the function `function` (its name at the gateway) at `target`. The
    /// SRI v2 signature binds the name the function knows itself by: the Lambda function name
    /// for Lambda targets, `function` for a `bootstrap serve` (the local backend passes it as
    /// `SRI_FUNCTION_NAME`).
    pub async fn invoke_function(
        &self,
        function: &str,
        target: &Target,
        action: &str,
        envelope: Bytes,
        traceparent: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        let parsed =
            Envelope::parse(envelope).map_err(|e| InvokeError::BadEnvelope(e.to_string()))?;
        self.invoke_envelope(function, target, action, &parsed, traceparent, None)
            .await
    }

    /// [`Client::invoke_function`] with an envelope the caller has already parsed (the
    /// gateway needs its session id too, and parses it once), also sending the relay's session
    /// claim (see [`crate::relay::claim`]) when there is one.
    pub async fn invoke_envelope(
        &self,
        function: &str,
        target: &Target,
        action: &str,
        parsed: &Envelope,
        traceparent: Option<&str>,
        claim: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        crate::transport::check_request_size(target, parsed.bytes().len()).map_err(|message| {
            InvokeError::Rejected {
                status: 413,
                error_type: "RequestTooLargeException".into(),
                message,
            }
        })?;
        let call = Call {
            function: target.signed_name().unwrap_or(function),
            session_id: parsed.session_id(),
            action,
            envelope: parsed.bytes(),
            traceparent,
            claim,
        };
        match target {
            Target::Http { url } | Target::H2c { url } => {
                self.invoke_http(target, url, PlatformAuth::None, &call)
                    .await
            }
            #[cfg(feature = "lambda")]
            Target::FunctionUrl { url, region, .. } => {
                let auth = PlatformAuth::SigV4 {
                    signer: self.aws(target)?.signer.clone(),
                    region: region.clone(),
                };
                self.invoke_http(target, url, auth, &call).await
            }
            #[cfg(feature = "lambda")]
            Target::InvokeStream {
                function,
                qualifier,
            } => {
                let aws = self.aws(target)?;
                let call = &call;
                self.with_retries(target, move || async move {
                    let payload = invoke_stream::request_event(
                        call.action,
                        &self.headers(call).map_err(Failure::Fatal)?,
                        call.envelope,
                    );
                    invoke_stream::start(&aws.lambda, target, function, qualifier, payload).await
                })
                .await
            }
            #[cfg(not(feature = "lambda"))]
            other => Err(InvokeError::Unreachable(format!(
                "{other}: this connector was built without the `lambda` feature"
            ))),
        }
    }

    /// Invokes `action` on the function at `endpoint` (its base URL, plain HTTP) with the
    /// envelope bytes.
    pub async fn invoke(
        &self,
        endpoint: &str,
        action: &str,
        envelope: Bytes,
        traceparent: Option<&str>,
    ) -> Result<EventStream, InvokeError> {
        self.invoke_target(&Target::http(endpoint), action, envelope, traceparent)
            .await
    }

    #[cfg(feature = "lambda")]
    fn aws(&self, target: &Target) -> Result<&AwsClients, InvokeError> {
        self.aws.as_deref().ok_or_else(|| {
            InvokeError::Unreachable(format!(
                "{target}: the client has no AWS configuration (build it with `Client::with_aws`)"
            ))
        })
    }

    /// `POST {base}/invoke?action=…` over HTTP(S), as often as the retry policy allows.
    async fn invoke_http(
        &self,
        target: &Target,
        base: &str,
        auth: PlatformAuth,
        call: &Call<'_>,
    ) -> Result<EventStream, InvokeError> {
        let url = format!(
            "{}{INVOKE_PATH}?{}",
            base.trim_end_matches('/'),
            invoke_query(call.action)
        );
        let (url, auth) = (&url, &auth);
        self.with_retries(target, move || async move {
            #[cfg_attr(not(feature = "lambda"), allow(unused_mut))]
            let mut headers = self.headers(call).map_err(Failure::Fatal)?;
            match auth {
                PlatformAuth::None => {}
                #[cfg(feature = "lambda")]
                PlatformAuth::SigV4 { signer, region } => {
                    // Signed per attempt: each retry gets a fresh date and signature.
                    let sigv4 = signer
                        .sign_now(&http::Method::POST, url, &headers, call.envelope, region)
                        .await
                        .map_err(|e| Failure::Fatal(InvokeError::Unreachable(e.to_string())))?;
                    headers.extend(sigv4);
                }
            }
            let (http, lane) = match target {
                Target::H2c { url } => match self.lanes.dedicated(url) {
                    Some(lane) => (&self.http, Some(lane)),
                    None => (&self.h2c, None),
                },
                _ => (&self.http, None),
            };
            let resp = http
                .post(url)
                .headers(headers)
                .body(call.envelope.clone())
                .send()
                .await
                .map_err(|e| Failure::Retry(InvokeError::Unreachable(crate::error::chain(&e))))?;
            let status = resp.status().as_u16();
            if resp.status().is_success() {
                let bytes = resp.bytes_stream().map(move |r| {
                    // The lane is the stream's for as long as the stream lives.
                    let _held = &lane;
                    r.map_err(|e| InvokeError::Broken(crate::error::chain(&e)))
                });
                return Ok(Box::pin(bytes) as ByteStream);
            }
            let amzn_type = resp
                .headers()
                .get("x-amzn-errortype")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = read_capped(resp, MAX_ERROR_BODY).await;
            Err(Failure::refused(rejection(
                status,
                amzn_type.as_deref(),
                &body,
                target,
            )))
        })
        .await
    }

    /// The headers of an SRI v2 request, signed now with a fresh nonce (one per attempt, so a
    /// retry is never taken for a replay).
    fn headers(&self, call: &Call<'_>) -> Result<HeaderMap, InvokeError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let mut headers = HeaderMap::new();
        self.keys
            .sign_v2(
                now,
                &nonce,
                call.function,
                call.session_id,
                call.action,
                call.envelope,
            )
            .apply(&mut headers)
            .map_err(|e| InvokeError::BadEnvelope(e.to_string()))?;
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(JSON));
        headers.insert(http::header::ACCEPT, HeaderValue::from_static(EVENT_STREAM));
        if let Some(claim) = call.claim.and_then(|c| HeaderValue::from_str(c).ok()) {
            headers.insert(crate::protocol::relay::HEADER_CLAIM, claim);
        }
        if let Some(tp) = call.traceparent {
            match HeaderValue::from_str(tp) {
                Ok(v) => {
                    headers.insert("traceparent", v);
                }
                Err(_) => tracing::debug!("dropping a traceparent that is not a header value"),
            }
        }
        Ok(headers)
    }

    /// Runs `attempt` until it yields a stream, fails for good, or the attempts run out, each
    /// attempt bounded by the first-byte timeout and followed by a jittered exponential backoff.
    /// Once an attempt returns a stream there is no retry: the function has started.
    async fn with_retries<F, Fut>(
        &self,
        target: &Target,
        mut attempt: F,
    ) -> Result<EventStream, InvokeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<ByteStream, Failure>>,
    {
        let mut n = 0;
        loop {
            n += 1;
            let retryable =
                match tokio::time::timeout(self.options.first_byte_timeout, attempt()).await {
                    Ok(Ok(bytes)) => return Ok(self.events(bytes)),
                    Ok(Err(Failure::Fatal(e))) => return Err(e),
                    Ok(Err(Failure::Retry(e))) => e,
                    Err(_) => InvokeError::Unreachable(format!(
                        "no response within {} s",
                        self.options.first_byte_timeout.as_secs()
                    )),
                };
            if n >= self.options.attempts {
                return Err(retryable);
            }
            let base = self.options.backoff.saturating_mul(1 << (n - 1).min(8));
            let jitter = rand::random_range(0.5..1.5);
            tracing::debug!(%target, attempt = n, error = %retryable, "retrying before the first byte");
            tokio::time::sleep(base.mul_f64(jitter)).await;
        }
    }

    /// Decodes SSE from `bytes` into events, up to and including `end`.
    ///
    /// Uses the incremental [`sse::Decoder`] directly rather than `sse::decode_items`, which
    /// would reword a transport's error as an SSE syntax error. The idle timeout restarts with
    /// every item, comments (keepalives) included; the decoder bounds the line length, so a
    /// function cannot make the caller hold an arbitrarily long line.
    fn events(&self, bytes: ByteStream) -> EventStream {
        let idle = self.options.idle_timeout;
        // SRI data is one JSON line: an event of several `data:` lines breaks the stream.
        let decoder = sse::Decoder::new(self.options.max_event_bytes).one_data_line();
        let stream =
            futures_util::stream::unfold(Some((bytes, decoder)), move |state| async move {
                let (mut bytes, mut decoder) = state?;
                let mut deadline = tokio::time::Instant::now() + idle;
                loop {
                    match decoder.next_item() {
                        Ok(Some(sse::Item::Comment)) => {
                            deadline = tokio::time::Instant::now() + idle;
                            continue;
                        }
                        Ok(Some(sse::Item::Event(ev))) => {
                            // Nothing after `end` is read: the stream is complete.
                            let rest = (ev.kind != EventKind::End).then_some((bytes, decoder));
                            return Some((Ok(ev), rest));
                        }
                        Ok(None) => {}
                        Err(e) => return Some((Err(InvokeError::Broken(e.to_string())), None)),
                    }
                    let failed = match tokio::time::timeout_at(deadline, bytes.next()).await {
                        Ok(Some(Ok(chunk))) => {
                            decoder.push(&chunk);
                            continue;
                        }
                        Ok(Some(Err(e))) => e,
                        Ok(None) => {
                            InvokeError::Broken("the stream ended without an `end` event".into())
                        }
                        Err(_) => InvokeError::Broken(format!(
                            "no event or keepalive for {} s",
                            idle.as_secs()
                        )),
                    };
                    return Some((Err(failed), None));
                }
            });
        Box::pin(stream)
    }
}

/// The default of [`ClientOptions::dedicated_streams`].
pub const DEFAULT_DEDICATED_STREAMS: usize = 64;

/// Which connection an invocation of a `bootstrap serve` ([`Target::H2c`]) takes.
///
/// A connection per invocation (HTTP/1.1) is the fastest path: measured, it adds ~0.2 ms less
/// per call than a stream on a shared h2c connection, whose frames pass through more tasks on
/// each side. But each such connection costs the gateway ~16 KiB and a descriptor for as long as
/// the invocation streams, and a gateway holding thousands of long, mostly idle streams (the
/// daemon's SSE sessions) pays that per stream. So the first `limit` concurrent invocations of a
/// function get connections of their own, and the rest share h2c, where a stream costs ~1 KiB.
#[derive(Debug)]
struct Lanes {
    limit: usize,
    open: std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<AtomicUsize>>>,
}

/// A dedicated connection's place, given back when dropped.
struct Lane(std::sync::Arc<AtomicUsize>);

impl Drop for Lane {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Lanes {
    fn new(limit: usize) -> Self {
        Self {
            limit,
            open: Default::default(),
        }
    }

    /// A dedicated place for a call to `url`, if fewer than the limit are taken.
    fn dedicated(&self, url: &str) -> Option<Lane> {
        if self.limit == 0 {
            return None;
        }
        let count = {
            let mut open = self.open.lock().expect("lanes lock");
            match open.get(url) {
                Some(n) => n.clone(),
                None => {
                    if open.len() >= 1024 {
                        // Functions come and go (a restarted one gets a new port): forget idle
                        // ones.
                        open.retain(|_, n| n.load(Ordering::Acquire) > 0);
                    }
                    open.entry(url.to_owned()).or_default().clone()
                }
            }
        };
        if count.fetch_add(1, Ordering::AcqRel) < self.limit {
            Some(Lane(count))
        } else {
            count.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }
}

/// One invocation's inputs, shared by its attempts.
struct Call<'a> {
    /// The function name the SRI v2 signature binds.
    function: &'a str,
    session_id: &'a str,
    action: &'a str,
    envelope: &'a Bytes,
    traceparent: Option<&'a str>,
    /// The relay's session claim, passed to the function (not signed: it carries its own MAC).
    claim: Option<&'a str>,
}

/// The longest SSE line (and event) the client accepts by default (the daemon's 5 MiB line plus
/// framing).
pub const MAX_EVENT_BYTES: usize = sse::DEFAULT_MAX_LINE;

/// The h2c connection's receive window: the largest allowed (2³¹ − 1), see [`Client::new`].
const H2_CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Each h2c stream's receive window: what a function may send ahead of a slow reader.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;

/// The largest h2c frame accepted: plugin objects run to megabytes, and 16 KiB frames (the
/// default) would cut them into hundreds of pieces.
const H2_MAX_FRAME: u32 = 256 * 1024;

/// How long an idle pooled connection to a function is kept.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// How much of an error answer is read to word the error.
const MAX_ERROR_BODY: usize = 4096;

/// Reads at most about `cap` bytes of a body (an error answer need not be read whole).
async fn read_capped(resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunks = resp.bytes_stream();
    while body.len() < cap {
        match chunks.next().await {
            Some(Ok(b)) => body.extend_from_slice(&b),
            _ => break,
        }
    }
    body.truncate(cap);
    body
}

/// A non-2xx answer as an error, in the words of whoever gave it: the bootstrap
/// (`{"errorType","errorMessage"}`), or the platform in front of it (AWS's `x-amzn-ErrorType`
/// and `{"Message"}`), in which case the message also says what to fix.
pub(crate) fn rejection(
    status: u16,
    amzn_type: Option<&str>,
    body: &[u8],
    target: &Target,
) -> InvokeError {
    let body = &body[..body.len().min(MAX_ERROR_BODY)];
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let from_function = v["errorType"].is_string();
    let error_type = v["errorType"]
        .as_str()
        // `AccessDeniedException:http://internal.amazon.com/…` on some answers.
        .or_else(|| amzn_type.and_then(|t| t.split(':').next()))
        .map(str::to_owned)
        .unwrap_or_else(|| {
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("Error")
                .to_owned()
        });
    let mut message = ["errorMessage", "Message", "message"]
        .iter()
        .find_map(|k| v[k].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    if !from_function && let Some(hint) = aws_hint(status, target) {
        message = if message.is_empty() {
            hint
        } else {
            format!("{message} — {hint}")
        };
    }
    InvokeError::Rejected {
        status,
        error_type,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::signing::Key;

    /// Found by `fuzz/fuzz_targets/gateway_ndjson.rs`: an event of two `data:` lines reached the
    /// daemon's NDJSON as two lines.
    #[tokio::test]
    async fn an_event_of_several_data_lines_breaks_the_stream() {
        let ring = KeyRing::new(vec![Key::new("k1", vec![7u8; 32]).unwrap()]).unwrap();
        let client = Client::new(ring, ClientOptions::default());
        let wire = Bytes::from_static(
            b"event: chunk\ndata: {\"a\":1}\n\nevent: chunk\ndata: a\ndata: b\n\n",
        );
        let bytes: ByteStream = Box::pin(futures_util::stream::iter([Ok(wire)]));
        let got: Vec<_> = client.events(bytes).collect().await;
        assert!(matches!(&got[0], Ok(ev) if ev.data.as_ref() == b"{\"a\":1}"));
        match &got[1] {
            Err(InvokeError::Broken(why)) => {
                assert!(why.contains("several `data:` lines"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(got.len(), 2);
    }
}
