//! The relay's daemon side: an admitted call is sent to the daemon's private address and its
//! answer passed back as it arrives (status, `Content-Type`, `Content-Encoding`, bytes), so
//! `\n\n`-framed lines, heartbeats and gzip reach the bootstrap unchanged. Failures to reach
//! the daemon become 502s saying what happened, never its address (that stays in the log).

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;

use super::{HEADER_DAEMON_SESSION, Refusal, Relay, RelayMetrics};

/// The longest error body of the daemon passed on.
const MAX_ERROR_BODY: usize = 4096;

impl Relay {
    pub(super) async fn forward(
        &self,
        kind: &'static str,
        session: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let Some(url) = self.daemon.as_deref() else {
            return self.refused(
                kind,
                Refusal(
                    "daemon_unreachable",
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the connector has no DIFY_PLUGIN_DAEMON_URL: set it to the daemon's private \
                     address (e.g. http://plugin_daemon:5002)"
                        .into(),
                ),
            );
        };
        let mut req = self
            .client
            .post(url)
            .header(HEADER_DAEMON_SESSION, session)
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(self.timeout)
            .body(body);
        if let Some(enc) = headers.get(http::header::ACCEPT_ENCODING) {
            req = req.header(http::header::ACCEPT_ENCODING, enc.clone());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let (outcome, what) = if e.is_timeout() {
                    ("daemon_timeout", "did not answer in time")
                } else {
                    ("daemon_unreachable", "cannot be reached")
                };
                // The daemon's private address stays in the connector's log.
                tracing::warn!(r#type = kind, daemon = %url, error = %crate::error::chain(&e), "backwards call: daemon {what}");
                return self.refused(
                    kind,
                    Refusal(
                        outcome,
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "the Dify daemon {what} from the connector's relay (check \
                             DIFY_PLUGIN_DAEMON_URL on the connector and the daemon's health)"
                        ),
                    ),
                );
            }
        };
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp, MAX_ERROR_BODY).await;
            self.metrics.count(kind, "daemon_error");
            tracing::info!(r#type = kind, %status, "backwards call: the daemon refused it");
            return (status, [("content-type", "application/json")], body).into_response();
        }
        let mut out = Response::builder().status(status);
        for name in [http::header::CONTENT_TYPE, http::header::CONTENT_ENCODING] {
            if let Some(v) = resp.headers().get(&name) {
                out = out.header(name, v.clone());
            }
        }
        out = out.header(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-cache"),
        );
        // Counted once the answer has been passed on whole, or when it broke off.
        struct Done(RelayMetrics, &'static str, &'static str);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.count(self.1, self.2);
            }
        }
        let mut done = Done(self.metrics.clone(), kind, "ok");
        let stream = resp.bytes_stream().map(move |r| {
            // The whole guard lives in the closure (not just the field written here).
            let done = &mut done;
            if r.is_err() {
                done.2 = "broken";
            }
            r
        });
        out.body(Body::from_stream(stream)).expect("response")
    }
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Bytes {
    let mut out = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        let room = cap - out.len();
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    out.into()
}
