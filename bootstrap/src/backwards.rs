//! Backwards invocations: a plugin calling Dify while a request runs.
//!
//! Over stdio the SDK writes a `session`/`invoke` line and waits for `backwards_response`
//! lines on stdin. The invoke stream to the caller is half duplex, so the runtime makes the
//! call itself: it POSTs the line to the daemon's `/backwards-invocation/transaction` and
//! writes every line of the answer to the plugin's stdin. Any failure becomes a
//! `backwards_response` error for that request, so the plugin raises instead of hanging.

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;
use tokio::sync::Mutex;

use crate::redact::Redactor;

/// The path the daemon serves backwards invocations on.
pub const TRANSACTION_PATH: &str = "/backwards-invocation/transaction";

/// Makes backwards invocations for plugin processes.
#[derive(Debug)]
pub struct Backwards {
    client: reqwest::Client,
    url: Option<String>,
    timeout: Duration,
    max_line: usize,
    redactor: Arc<Redactor>,
}

impl Backwards {
    /// A client for the daemon at `daemon_url` (none: every call fails with a clear error).
    pub fn new(
        daemon_url: Option<&str>,
        timeout: Duration,
        max_line: usize,
        redactor: Arc<Redactor>,
    ) -> Self {
        let url = daemon_url.map(|u| format!("{}{TRANSACTION_PATH}", u.trim_end_matches('/')));
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()
            .expect("HTTP client builds");
        Self {
            client,
            url,
            timeout,
            max_line,
            redactor,
        }
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
        let url = self.url.as_deref().ok_or(
            "DIFY_PLUGIN_DAEMON_URL is not set on this function; set it to the daemon's address",
        )?;
        let resp = self
            .client
            .post(url)
            .header("Dify-Plugin-Session-ID", session_id)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(line)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "cannot reach the Dify daemon at {url}: {}",
                    connector::error::chain(&e)
                )
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            let body = String::from_utf8_lossy(&body[..body.len().min(4096)]).into_owned();
            return Err(format!(
                "the Dify daemon answered HTTP {status}: {}",
                body.trim()
            ));
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
