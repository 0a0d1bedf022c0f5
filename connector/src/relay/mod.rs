//! The relay: the one route a function may reach to call Dify back, on a listener of its own.
//!
//! A plugin's backwards invocation (LLM, tool, app, storage, …) must reach the daemon's
//! `/backwards-invocation/transaction`, but the daemon's port serves its whole API, so it is
//! never exposed. Instead `sri serve` listens on `SRI_RELAY_LISTEN` (expose this alone, behind
//! TLS) and serves nothing there but [`TRANSACTION_PATH`]. A call is forwarded to the daemon's
//! private address (`DIFY_PLUGIN_DAEMON_URL`) only when
//! 1. its SRI v2 signature (the ring's key, [`ACTION`], bound to the function named in
//!    [`HEADER_FUNCTION`], the session and the body) is valid and fresh, and its nonce new;
//! 2. the session is one of that function's, in flight through this connector's gateway or
//!    finished within the grace period ([`sessions`]) — or, for a session this replica never
//!    saw, vouched for by an unexpired claim another replica's gateway issued ([`claim`]).
//!
//! Anything else gets 401/403 with the reason, and the daemon is never called. The daemon's
//! answer is passed through as it arrives (status, `Content-Type`, `Content-Encoding`, bytes):
//! `\n\n`-framed lines, heartbeats and gzip reach the bootstrap unchanged, and the bootstrap
//! bounds the line length. Bodies are never logged (they carry prompts and credentials), and
//! metrics count calls by type and outcome from closed sets.

pub mod claim;
mod forward;
pub mod sessions;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::metrics::{BackwardsLabel, Metrics};
use crate::protocol::events;
pub use crate::protocol::relay::{
    ACTION, HEADER_CLAIM, HEADER_DAEMON_SESSION, HEADER_FUNCTION, TRANSACTION_PATH,
};
use crate::protocol::signing::{Expected, KeyRing, ReplayGuard};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use sessions::{Known, Sessions};

/// Default seconds a finished session's calls are still accepted.
pub const DEFAULT_GRACE_SECS: u64 = 30;
/// Default lifetime of a session claim, in seconds: above the daemon's
/// `PLUGIN_MAX_EXECUTION_TIMEOUT` (600 s) plus the grace period.
pub const DEFAULT_SESSION_TTL_SECS: u64 = 900;
/// Nonces remembered by the replay guard at most.
const REPLAY_CAPACITY: usize = 1 << 20;

/// How functions reach the daemon for backwards invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackwardsMode {
    /// Through this connector's relay (`SRI_RELAY_PUBLIC_URL`); the daemon stays private.
    Relay,
    /// Straight to `DIFY_PLUGIN_DAEMON_URL`: only when the functions share a private network
    /// with the daemon.
    Direct,
}

/// The relay's options (part of `sri serve`'s).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayOptions {
    /// How functions make backwards invocations: `relay` (through the connector) or `direct`
    /// (to `DIFY_PLUGIN_DAEMON_URL`, which the functions must then reach).
    #[arg(long, env = "SRI_BACKWARDS", value_enum, default_value = "relay")]
    pub backwards: BackwardsMode,
    /// Address of the relay's own listener (default: an ephemeral loopback port, enough for
    /// the local backend).
    #[arg(long, env = "SRI_RELAY_LISTEN", default_value = "127.0.0.1:0")]
    pub relay_listen: SocketAddr,
    /// The URL functions reach the relay at (e.g. `https://relay.example.com`, TLS in front).
    /// Default: the listener's loopback address.
    #[arg(long, env = "SRI_RELAY_PUBLIC_URL")]
    pub relay_public_url: Option<String>,
    /// Seconds after an invocation ends during which its backwards calls are still accepted.
    #[arg(long, env = "SRI_RELAY_GRACE_SECS", default_value_t = DEFAULT_GRACE_SECS)]
    pub relay_grace_secs: u64,
    /// Lifetime of the session claims the gateway sends functions, in seconds (what other
    /// replicas accept a session by); above the daemon's `PLUGIN_MAX_EXECUTION_TIMEOUT`.
    #[arg(long, env = "SRI_RELAY_SESSION_TTL_SECS", default_value_t = DEFAULT_SESSION_TTL_SECS)]
    pub relay_session_ttl_secs: u64,
    /// Accepted difference between a backwards call's signing time and this clock, in seconds.
    #[arg(long, env = "SRI_RELAY_MAX_SKEW_SECS", default_value_t = 300)]
    pub relay_max_skew_secs: u64,
    /// Largest backwards-call body accepted, in bytes.
    #[arg(long, env = "SRI_RELAY_MAX_BODY_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub relay_max_body_bytes: usize,
    /// Bytes of request bodies read at once across every relay connection, before their
    /// signatures are checked; a call past it gets a retryable 503.
    #[arg(long, env = "SRI_RELAY_MAX_PENDING_BODY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub relay_max_pending_body_bytes: usize,
    /// Seconds a forwarded call may take as a whole (the SDK gives up after its
    /// `MAX_INVOCATION_TIMEOUT`, 250 s).
    #[arg(long, env = "SRI_RELAY_TIMEOUT_SECS", default_value_t = 300)]
    pub relay_timeout_secs: u64,
}

/// What the relay needs.
pub struct Relay {
    keys: KeyRing,
    sessions: Arc<Sessions>,
    replays: ReplayGuard,
    daemon: Option<String>,
    client: reqwest::Client,
    max_skew_secs: u64,
    max_body: usize,
    /// Body bytes (in KiB permits) that may be held unverified at once.
    pending: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
    body_read_timeout: Duration,
    metrics: RelayMetrics,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay verifying with `keys`, checking sessions against `sessions`, forwarding to
    /// `daemon_url` (none: every accepted call gets a 503 naming the variable).
    pub fn new(
        keys: KeyRing,
        sessions: Arc<Sessions>,
        daemon_url: Option<&str>,
        o: &RelayOptions,
        body_read_timeout: Duration,
        metrics: RelayMetrics,
    ) -> Self {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            // The answer's encoding is the bootstrap's business: pass gzip through untouched.
            .no_gzip()
            .build()
            .expect("HTTP client builds");
        Self {
            keys,
            sessions,
            replays: ReplayGuard::new(o.relay_max_skew_secs, REPLAY_CAPACITY),
            daemon: daemon_url.map(|u| format!("{}{TRANSACTION_PATH}", u.trim_end_matches('/'))),
            client,
            max_skew_secs: o.relay_max_skew_secs,
            max_body: o.relay_max_body_bytes,
            pending: Arc::new(tokio::sync::Semaphore::new(
                o.relay_max_pending_body_bytes
                    .div_ceil(1024)
                    .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            )),
            timeout: Duration::from_secs(o.relay_timeout_secs),
            body_read_timeout,
            metrics,
        }
    }
}

/// The relay's router: [`TRANSACTION_PATH`] and nothing else (everything else is 404).
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route(TRANSACTION_PATH, post(transaction))
        .fallback(|| async {
            refuse_plain(
                StatusCode::NOT_FOUND,
                "NotFound",
                "the relay serves only POST /backwards-invocation/transaction",
            )
        })
        .with_state(relay)
}

fn refuse_plain(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        events::error_body(kind, message, None),
    )
        .into_response()
}

/// Why a call was not forwarded (the outcome label, the status, the message).
struct Refusal(&'static str, StatusCode, String);

impl Refusal {
    fn unauthorized(m: impl ToString) -> Self {
        Self("unauthorized", StatusCode::UNAUTHORIZED, m.to_string())
    }
    fn forbidden(m: impl ToString) -> Self {
        Self("forbidden", StatusCode::FORBIDDEN, m.to_string())
    }
}

async fn transaction(State(relay): State<Arc<Relay>>, headers: HeaderMap, body: Body) -> Response {
    let too_large = || {
        Refusal(
            "bad_request",
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the backwards call's body is over {} bytes (SRI_RELAY_MAX_BODY_BYTES on the connector)",
                relay.max_body
            ),
        )
    };
    // Bodies are read whole before their signatures can be checked: what all callers may have
    // in memory at once is bounded (the declared length, else the largest body, is reserved).
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > relay.max_body) {
        return relay.refused(OTHER_TYPE, too_large());
    }
    let reserve = declared.unwrap_or(relay.max_body);
    let permits = u32::try_from(reserve.div_ceil(1024).max(1)).unwrap_or(u32::MAX);
    let Ok(pending) = relay.pending.clone().try_acquire_many_owned(permits) else {
        return relay.refused(
            OTHER_TYPE,
            Refusal(
                "busy",
                StatusCode::SERVICE_UNAVAILABLE,
                "the relay is reading too many request bodies at once \
                 (SRI_RELAY_MAX_PENDING_BODY_BYTES); retry shortly"
                    .into(),
            ),
        );
    };
    let read = axum::body::to_bytes(body, relay.max_body + 1);
    let body = match tokio::time::timeout(relay.body_read_timeout, read).await {
        Ok(Ok(b)) if b.len() <= relay.max_body => b,
        Ok(Ok(_)) => {
            return relay.refused(OTHER_TYPE, too_large());
        }
        Ok(Err(e)) => {
            return relay.refused(
                OTHER_TYPE,
                Refusal(
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    format!("could not read the request body: {e}"),
                ),
            );
        }
        Err(_) => {
            return relay.refused(
                OTHER_TYPE,
                Refusal(
                    "bad_request",
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s",
                        relay.body_read_timeout.as_secs()
                    ),
                ),
            );
        }
    };
    let kind = invocation_type(&body);
    let session = match relay.admit(&headers, &body) {
        Ok(s) => s,
        Err(r) => return relay.refused(kind, r),
    };
    // Verified: its bytes no longer count against what unverified callers may hold.
    drop(pending);
    relay.forward(kind, session, headers, body).await
}

/// The backwards call's type (`data.data.type`), from a closed set, for metrics.
fn invocation_type(body: &[u8]) -> &'static str {
    #[derive(serde::Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        data: Option<Mid<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Mid<'a> {
        #[serde(borrow)]
        data: Option<Inner<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Inner<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let kind = serde_json::from_slice::<Outer<'_>>(body)
        .ok()
        .and_then(|o| o.data?.data?.kind);
    match kind {
        Some(k) => TYPES
            .iter()
            .find(|t| **t == k.as_ref())
            .copied()
            .unwrap_or(OTHER_TYPE),
        None => OTHER_TYPE,
    }
}

/// Backwards invocation types (the SDK's `InvokeType`), the metric's closed label set.
pub const TYPES: &[&str] = &[
    "tool",
    "llm",
    "llm_structured_output",
    "text_embedding",
    "multimodal_embedding",
    "rerank",
    "multimodal_rerank",
    "tts",
    "speech2text",
    "moderation",
    "node_parameter_extractor",
    "node_question_classifier",
    "app",
    "storage",
    "upload_file",
    "system_summary",
    "fetch_app",
];
const OTHER_TYPE: &str = crate::metrics::OTHER;

impl Relay {
    /// Checks signature, freshness, nonce and session; the verified session id.
    fn admit(&self, headers: &HeaderMap, body: &Bytes) -> Result<String, Refusal> {
        let function = headers
            .get(HEADER_FUNCTION)
            .ok_or_else(|| {
                Refusal::unauthorized(format!(
                    "missing header `{HEADER_FUNCTION}`: backwards calls must be signed by the \
                     function's bootstrap (SRI_BACKWARDS=relay)"
                ))
            })?
            .to_str()
            .map_err(|_| {
                Refusal::unauthorized(format!(
                    "malformed header `{HEADER_FUNCTION}`: not visible ASCII"
                ))
            })?;
        let now = unix_now();
        let expected = Expected {
            function,
            action: ACTION,
            body,
            accept_v1: false,
        };
        let verified = self
            .keys
            .verify(headers, &expected, now, self.max_skew_secs)
            .map_err(Refusal::unauthorized)?;
        let session = verified.session_id.clone();
        self.replays
            .check(&verified)
            .map_err(Refusal::unauthorized)?;
        match self.sessions.lookup(&session) {
            Known::Live(owner) if owner == function => {}
            Known::Live(_) => {
                return Err(Refusal::forbidden(
                    "the session belongs to another function: a function may call back only \
                     for its own invocations",
                ));
            }
            Known::Finished => {
                return Err(Refusal::forbidden(format!(
                    "the session is no longer in flight (it ended more than the grace period \
                     ago, SRI_RELAY_GRACE_SECS={} s)",
                    self.sessions_grace_secs()
                )));
            }
            Known::Unknown => {
                let claim = headers.get(HEADER_CLAIM).and_then(|v| v.to_str().ok());
                claim::verify(&self.keys, claim, function, &session, now)
                    .map_err(Refusal::forbidden)?;
            }
        }
        // The daemon takes the session from its header: the signed one is the only one sent,
        // and a body naming another session is refused rather than forwarded.
        if let Some(inner) = body_session(body)
            && inner != session
        {
            return Err(Refusal(
                "bad_request",
                StatusCode::BAD_REQUEST,
                "the body's session_id differs from the signed session".into(),
            ));
        }
        self.replays
            .record(&verified, now)
            .map_err(Refusal::unauthorized)?;
        Ok(session)
    }

    fn sessions_grace_secs(&self) -> u64 {
        self.sessions.grace().as_secs()
    }

    fn refused(&self, kind: &'static str, Refusal(outcome, status, message): Refusal) -> Response {
        self.metrics.count(kind, outcome);
        tracing::info!(r#type = kind, outcome, %status, reason = %message, "backwards call refused");
        let kind_name = match outcome {
            "unauthorized" => "Unauthorized",
            "forbidden" => "Forbidden",
            "busy" => "Busy",
            "daemon_unreachable" => "DaemonUnreachable",
            "daemon_timeout" => "DaemonTimeout",
            _ => "BadRequest",
        };
        refuse_plain(status, kind_name, &message)
    }
}

fn body_session(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct S {
        session_id: Option<String>,
    }
    serde_json::from_slice::<S>(body).ok()?.session_id
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The environment that tells a function how to make backwards calls: through the relay at
/// `relay_url`, or (direct mode) to the daemon at `daemon_url`.
pub fn function_env(
    mode: BackwardsMode,
    relay_url: &str,
    daemon_url: Option<&str>,
) -> Vec<(String, String)> {
    let mut env = Vec::new();
    match mode {
        BackwardsMode::Relay => {
            env.push(("SRI_BACKWARDS".into(), "relay".into()));
            env.push(("SRI_RELAY_URL".into(), relay_url.into()));
        }
        BackwardsMode::Direct => {
            env.push(("SRI_BACKWARDS".into(), "direct".into()));
            if let Some(d) = daemon_url {
                env.push(("DIFY_PLUGIN_DAEMON_URL".into(), d.into()));
            }
        }
    }
    env
}

/// The claim the gateway sends with an invocation of `session` on `function`.
pub fn claim_for(keys: &KeyRing, sessions: &Sessions, function: &str, session: &str) -> String {
    claim::issue(
        keys,
        function,
        session,
        unix_now() + sessions.ttl().as_secs(),
    )
}

/// Backwards calls by type and outcome (both closed sets; never a session id): a handle on
/// the connector's `sri_backwards_calls_total`.
#[derive(Debug, Clone, Default)]
pub struct RelayMetrics(Family<BackwardsLabel, Counter>);

impl RelayMetrics {
    /// Counts into `metrics`' family.
    pub fn of(metrics: &Metrics) -> Self {
        Self(metrics.backwards.clone())
    }

    fn count(&self, kind: &'static str, outcome: &'static str) {
        self.0
            .get_or_create(&BackwardsLabel {
                r#type: kind,
                outcome,
            })
            .inc();
    }
}

/// Serves the relay on `listener` until `shutdown` completes.
pub async fn serve(
    relay: Arc<Relay>,
    listener: tokio::net::TcpListener,
    limits: crate::server::Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::TokioTimer;
    if let Ok(local) = listener.local_addr() {
        tracing::info!(listen = %local, "relay listening");
    }
    let app = router(relay);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let accept = crate::accept::Limits {
        max_connections: limits.max_connections,
        first_bytes_timeout: limits.header_read_timeout,
    };
    crate::accept::serve_until(listener, shutdown, Duration::from_secs(30), accept, |io| {
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        http.serve_connection(io, service)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn options(max_body: usize, max_pending: usize) -> RelayOptions {
        RelayOptions {
            backwards: BackwardsMode::Relay,
            relay_listen: "127.0.0.1:0".parse().unwrap(),
            relay_public_url: None,
            relay_grace_secs: 30,
            relay_session_ttl_secs: 900,
            relay_max_skew_secs: 300,
            relay_max_body_bytes: max_body,
            relay_max_pending_body_bytes: max_pending,
            relay_timeout_secs: 5,
        }
    }

    async fn start(o: &RelayOptions) -> (String, Metrics) {
        let s = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        let keys: KeyRing = format!("k1:{s}").parse().unwrap();
        let metrics = Metrics::default();
        let relay = Relay::new(
            keys,
            Arc::new(Sessions::default()),
            None,
            o,
            Duration::from_secs(5),
            RelayMetrics::of(&metrics),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, router(Arc::new(relay))).await });
        (url, metrics)
    }

    #[tokio::test]
    async fn bodies_are_bounded_before_any_signature_is_checked() {
        let (url, metrics) = start(&options(4096, 2048)).await;
        let post = |n: usize| {
            reqwest::Client::new()
                .post(format!("{url}{TRANSACTION_PATH}"))
                .body(vec![b'x'; n])
                .send()
        };
        // Over the largest body: refused from its declared length.
        let r = post(8192).await.unwrap();
        assert_eq!(r.status(), 413);
        assert!(r.text().await.unwrap().contains("SRI_RELAY_MAX_BODY_BYTES"));
        // Within it, but over what may be held unverified at once: retry later.
        let r = post(3000).await.unwrap();
        assert_eq!(r.status(), 503);
        assert!(
            r.text()
                .await
                .unwrap()
                .contains("SRI_RELAY_MAX_PENDING_BODY_BYTES")
        );
        // Small, unsigned: read, then refused for the signature (never forwarded).
        let r = post(100).await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(r.text().await.unwrap().contains(HEADER_FUNCTION));
        let text = metrics.render();
        for outcome in ["bad_request", "busy", "unauthorized"] {
            let series =
                format!("sri_backwards_calls_total{{type=\"other\",outcome=\"{outcome}\"}} 1");
            assert!(text.contains(&series), "{series}:\n{text}");
        }
        // Anything but the one route is 404.
        let r = reqwest::get(format!("{url}/healthz")).await.unwrap();
        assert_eq!(r.status(), 404);
    }

    #[test]
    fn the_call_type_comes_from_a_closed_set() {
        let body = |t: &str| format!(r#"{{"data":{{"data":{{"type":"{t}"}}}}}}"#);
        assert_eq!(invocation_type(body("llm").as_bytes()), "llm");
        assert_eq!(invocation_type(body("storage").as_bytes()), "storage");
        assert_eq!(invocation_type(body("sess-1234").as_bytes()), OTHER_TYPE);
        assert_eq!(invocation_type(b"not json"), OTHER_TYPE);
    }
}
