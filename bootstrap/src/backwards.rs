//! Backwards invocations: a plugin calling Dify while a request runs.
//!
//! Over stdio the SDK writes a `session`/`invoke` line and waits for `backwards_response`
//! lines on stdin. The invoke stream to the caller is half duplex, so the runtime makes the
//! call itself: it POSTs the line to `/backwards-invocation/transaction` — of the connector's
//! relay (`SRI_BACKWARDS=relay`, the default: signed with SRI v2 for this function and the
//! session, with the gateway's session claim), or of the daemon itself (`direct`) — and writes
//! every line of the answer to the plugin's stdin as it arrives. Any failure becomes a
//! `backwards_response` error for that request, so the plugin raises instead of hanging.

use bytes::{Bytes, BytesMut};
use connector::protocol::relay::{
    ACTION, HEADER_CLAIM, HEADER_DAEMON_SESSION, HEADER_FUNCTION, TRANSACTION_PATH,
};
use connector::protocol::signing::KeyRing;
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::Mutex;

use crate::config::BackwardsMode;
use crate::redact::Redactor;

/// Session claims kept at most (one per session in flight; expired ones go first).
const MAX_CLAIMS: usize = 65_536;

/// Where backwards calls go, and how they are authenticated.
#[derive(Debug)]
pub enum Route {
    /// The connector's relay (`{SRI_RELAY_URL}/backwards-invocation/transaction`), signed.
    Relay {
        /// The transaction URL.
        url: String,
        /// The ring that signs.
        keys: KeyRing,
        /// This function's name, bound by the signature.
        function: String,
    },
    /// The daemon (`{DIFY_PLUGIN_DAEMON_URL}/backwards-invocation/transaction`), unsigned.
    Direct {
        /// The transaction URL.
        url: String,
    },
    /// Not configured: every call fails with this message.
    Missing(&'static str),
}

impl Route {
    /// The route `mode` selects from the configured URLs.
    pub fn new(
        mode: BackwardsMode,
        relay_url: Option<&str>,
        daemon_url: Option<&str>,
        keys: KeyRing,
        function: String,
    ) -> Self {
        let join = |u: &str| format!("{}{TRANSACTION_PATH}", u.trim_end_matches('/'));
        match (mode, relay_url, daemon_url) {
            (BackwardsMode::Relay, Some(u), _) => Self::Relay {
                url: join(u),
                keys,
                function,
            },
            (BackwardsMode::Relay, None, _) => Self::Missing(
                "SRI_RELAY_URL is not set on this function (SRI_BACKWARDS=relay): set it to the \
                 connector's relay (the connector does when it deploys the function), or set \
                 SRI_BACKWARDS=direct and DIFY_PLUGIN_DAEMON_URL",
            ),
            (BackwardsMode::Direct, _, Some(u)) => Self::Direct { url: join(u) },
            (BackwardsMode::Direct, _, None) => Self::Missing(
                "DIFY_PLUGIN_DAEMON_URL is not set on this function (SRI_BACKWARDS=direct); set it \
                 to the daemon's address",
            ),
        }
    }
}

/// Makes backwards invocations for plugin processes.
#[derive(Debug)]
pub struct Backwards {
    /// Built on first use ([`Backwards::client`]): loading the system's root certificates
    /// takes ~10 ms, which would otherwise sit on every cold start before the plugin's spawn,
    /// for functions that may never call back.
    client: tokio::sync::OnceCell<reqwest::Client>,
    route: Route,
    timeout: Duration,
    max_line: usize,
    redactor: Arc<Redactor>,
    /// The gateway's session claims, by session id, with their expiry (Unix seconds).
    claims: std::sync::Mutex<HashMap<String, (String, u64)>>,
}

impl Backwards {
    /// A client for `route`.
    pub fn new(route: Route, timeout: Duration, max_line: usize, redactor: Arc<Redactor>) -> Self {
        Self {
            client: tokio::sync::OnceCell::new(),
            route,
            timeout,
            max_line,
            redactor,
            claims: Default::default(),
        }
    }

    /// The HTTP client, built once (off the async workers: it reads certificate files); calls
    /// that arrive while it is being built wait for that one build.
    pub async fn client(&self) -> Result<&reqwest::Client, String> {
        self.client
            .get_or_try_init(|| async {
                tokio::task::spawn_blocking(|| {
                    reqwest::Client::builder()
                        .connect_timeout(Duration::from_secs(10))
                        .tcp_nodelay(true)
                        .build()
                        .map_err(|e| format!("cannot build the HTTP client: {e}"))
                })
                .await
                .map_err(|e| format!("building the HTTP client stopped: {e}"))?
            })
            .await
    }

    /// Keeps the gateway's claim for `session` (the invocation's `x-sri-relay-claim`), which
    /// its backwards calls present to the relay.
    pub fn admit(&self, session: &str, claim: Option<&str>) {
        let Some(claim) = claim else { return };
        let Some(expiry) = connector::protocol::relay::claim_expiry(claim) else {
            return;
        };
        let mut claims = self.claims.lock().expect("claims lock");
        if claims.len() >= MAX_CLAIMS {
            let now = unix_now();
            claims.retain(|_, (_, exp)| *exp >= now);
            if claims.len() >= MAX_CLAIMS {
                tracing::warn!(
                    "too many session claims held; this session's backwards calls will be refused by other relay replicas"
                );
                return;
            }
        }
        claims.insert(session.to_owned(), (claim.to_owned(), expiry));
    }

    fn claim(&self, session: &str) -> Option<String> {
        let claims = self.claims.lock().expect("claims lock");
        claims.get(session).map(|(c, _)| c.clone())
    }

    /// Handles one `session`/`invoke` line in the background.
    pub fn spawn(self: &Arc<Self>, session_id: String, line: Bytes, stdin: Arc<Mutex<ChildStdin>>) {
        let this = self.clone();
        tokio::spawn(async move {
            let request_id = request_id(&line);
            let Some(request_id) = request_id else {
                tracing::warn!(
                    session_id,
                    "backwards invocation without backwards_request_id ignored"
                );
                return;
            };
            let outcome =
                tokio::time::timeout(this.timeout, this.call(&session_id, line, &stdin)).await;
            let error = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e,
                Err(_) => format!(
                    "the Dify daemon did not finish answering within {} s",
                    this.timeout.as_secs()
                ),
            };
            let error = this.redactor.redact(&error);
            tracing::warn!(session_id, backwards_request_id = %request_id, error = %error, "backwards invocation failed");
            let line = response_line(
                &session_id,
                &request_id,
                "error",
                &format!("backwards invocation failed: {error}"),
            );
            let mut stdin = stdin.lock().await;
            let _ = stdin.write_all(&line).await;
        });
    }

    async fn call(
        &self,
        session_id: &str,
        line: Bytes,
        stdin: &Mutex<ChildStdin>,
    ) -> Result<(), String> {
        let (url, who) = match &self.route {
            Route::Missing(why) => return Err((*why).to_owned()),
            Route::Direct { url } => (url, "the Dify daemon"),
            Route::Relay { url, .. } => (url, "the connector's relay"),
        };
        let mut req = self
            .client()
            .await?
            .post(url)
            .header(HEADER_DAEMON_SESSION, session_id)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Route::Relay { keys, function, .. } = &self.route {
            let nonce = uuid::Uuid::new_v4().simple().to_string();
            let mut headers = http::HeaderMap::new();
            keys.sign_v2(unix_now(), &nonce, function, session_id, ACTION, &line)
                .apply(&mut headers)
                .map_err(|e| e.to_string())?;
            if let Ok(f) = http::HeaderValue::from_str(function) {
                headers.insert(HEADER_FUNCTION, f);
            }
            if let Some(c) = self
                .claim(session_id)
                .and_then(|c| http::HeaderValue::from_str(&c).ok())
            {
                headers.insert(HEADER_CLAIM, c);
            }
            req = req.headers(headers);
        }
        let resp = req.body(line).send().await.map_err(|e| {
            format!(
                "cannot reach {who} at {url}: {}",
                connector::error::chain(&e)
            )
        })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let body = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
            return Err(format!("{who} answered HTTP {status}: {}", body.trim()));
        }
        let mut body = resp.bytes_stream();
        let mut buf = BytesMut::new();
        let mut ended = false;
        loop {
            let chunk = body.next().await;
            let eof = chunk.is_none();
            match chunk {
                Some(Ok(c)) => buf.extend_from_slice(&c),
                Some(Err(e)) => {
                    return Err(format!(
                        "the daemon's answer broke off: {}",
                        connector::error::chain(&e)
                    ));
                }
                None => buf.extend_from_slice(b"\n"),
            }
            while let Some(i) = memchr::memchr(b'\n', &buf) {
                let line = buf.split_to(i + 1);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                ended |= is_end(&line);
                let mut stdin = stdin.lock().await;
                stdin
                    .write_all(&line)
                    .await
                    .map_err(|e| format!("plugin stdin closed: {e}"))?;
            }
            if buf.len() > self.max_line {
                return Err(format!(
                    "the daemon sent a line over {} bytes",
                    self.max_line
                ));
            }
            if eof {
                break;
            }
        }
        if ended {
            Ok(())
        } else {
            Err("the daemon's answer ended without an `end` event".into())
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn request_id(line: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(line).ok()?;
    Some(
        v.get("data")?
            .get("data")?
            .get("backwards_request_id")?
            .as_str()?
            .to_owned(),
    )
}

fn is_end(line: &[u8]) -> bool {
    serde_json::from_slice::<Value>(line).ok().is_some_and(|v| {
        let e = v
            .get("data")
            .and_then(|d| d.get("event"))
            .and_then(Value::as_str);
        matches!(e, Some("end" | "error"))
    })
}

/// A `backwards_response` line, as the daemon would write it to a plugin's stdin.
pub fn response_line(session_id: &str, request_id: &str, event: &str, message: &str) -> Vec<u8> {
    let mut line = serde_json::to_vec(&json!({
        "session_id": session_id,
        "event": "backwards_response",
        "data": {"backwards_request_id": request_id, "event": event, "message": message, "data": null},
    }))
    .expect("JSON serializes");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring() -> KeyRing {
        "k1:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
            .parse()
            .unwrap()
    }

    #[test]
    fn the_mode_picks_the_url_and_a_missing_one_names_its_variable() {
        let route = |mode, relay, daemon| Route::new(mode, relay, daemon, ring(), "f".into());
        assert!(matches!(
            route(BackwardsMode::Relay, Some("https://r/"), Some("http://d")),
            Route::Relay { url, .. } if url == "https://r/backwards-invocation/transaction"
        ));
        assert!(matches!(
            route(BackwardsMode::Direct, Some("https://r"), Some("http://d")),
            Route::Direct { url } if url == "http://d/backwards-invocation/transaction"
        ));
        // Relay mode never falls back to the daemon, and direct mode never to the relay.
        assert!(matches!(
            route(BackwardsMode::Relay, None, Some("http://d")),
            Route::Missing(m) if m.contains("SRI_RELAY_URL")
        ));
        assert!(matches!(
            route(BackwardsMode::Direct, Some("https://r"), None),
            Route::Missing(m) if m.contains("DIFY_PLUGIN_DAEMON_URL")
        ));
    }

    #[test]
    fn claims_are_kept_per_session_and_bounded() {
        let b = Backwards::new(
            Route::Missing("x"),
            Duration::from_secs(1),
            1024,
            Arc::new(Redactor::default()),
        );
        b.admit("s1", Some("v1.99999999999.k1.00"));
        b.admit("s2", Some("not a claim"));
        b.admit("s3", None);
        assert_eq!(b.claim("s1").as_deref(), Some("v1.99999999999.k1.00"));
        assert_eq!(b.claim("s2"), None);
        assert_eq!(b.claim("s3"), None);
        // Full of expired claims: they make room.
        for i in 0..MAX_CLAIMS {
            b.claims
                .lock()
                .unwrap()
                .insert(format!("old{i}"), ("v1.1.k1.00".into(), 1));
        }
        b.admit("s4", Some("v1.99999999999.k1.00"));
        assert!(b.claim("s4").is_some());
        assert!(b.claims.lock().unwrap().len() < MAX_CLAIMS);
    }
}
