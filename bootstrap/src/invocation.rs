//! The handler core shared by every mode: authenticate an SRI v1 request, run it as a session
//! of the plugin, and turn what the plugin writes into SRI events (streamed or buffered).

use bytes::Bytes;
use connector::protocol::envelope::Envelope;
use connector::protocol::events::{
    self, ErrorType, Event, EventKind, SessionError, StartInfo, Usage,
};
use connector::protocol::signing::{self, KeyRing, ReplayGuard};
use connector::protocol::{EVENT_STREAM, JSON, sse};
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use crate::Error;
use crate::process::{LineKind, PluginMsg, Session};
use crate::redact::Redactor;
use crate::supervisor::Supervisor;

/// One invocation as received, whatever the transport.
#[derive(Debug)]
pub struct Request {
    /// The `action` query parameter.
    pub action: Option<String>,
    /// Request headers (names are case-insensitive).
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The platform's request id.
    pub request_id: String,
    /// Lambda's deadline, Unix milliseconds.
    pub deadline_ms: Option<u64>,
}

/// The answer to an invocation.
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// The body.
    pub body: ReplyBody,
}

/// A reply body.
pub enum ReplyBody {
    /// All at once.
    Full(Bytes),
    /// Streamed frames.
    Stream(mpsc::Receiver<Frame>),
}

/// A piece of a streamed reply.
#[derive(Debug)]
pub enum Frame {
    /// Bytes to write.
    Data(Bytes),
    /// The stream ended with an error (after its `error` and `end` events); transports that
    /// can, report it out of band (Lambda's error trailers).
    Failed {
        /// `error_type`.
        error_type: String,
        /// `message`.
        message: String,
    },
}

impl Reply {
    /// A JSON error reply in the shape the daemon reads (`errorType`, `errorMessage`).
    pub fn error(status: StatusCode, error_type: &str, message: &str, request_id: &str) -> Self {
        Self {
            status,
            content_type: JSON,
            body: ReplyBody::Full(events::error_body(error_type, message, Some(request_id))),
        }
    }
}

/// Limits and timings of the handler.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body.
    pub max_request_bytes: usize,
    /// Longest invocation.
    pub max_execution: Duration,
    /// Kept before Lambda's deadline.
    pub deadline_margin: Duration,
    /// Silence before a keepalive comment.
    pub keepalive: Duration,
    /// Accepted clock difference, seconds.
    pub max_clock_skew_secs: u64,
    /// How long an invocation waits for a starting plugin.
    pub ready_timeout: Duration,
    /// Longest plugin output line (for messages).
    pub max_line_bytes: usize,
}

/// Runs invocations against the supervised plugin.
pub struct Handler {
    supervisor: Arc<Supervisor>,
    keys: KeyRing,
    replays: ReplayGuard,
    redactor: Arc<Redactor>,
    limits: Limits,
    identity: String,
    bootstrap_started: Instant,
    invocations: std::sync::atomic::AtomicU64,
}

impl Handler {
    /// A handler for the plugin `identity` (`author/name:version`).
    pub fn new(
        supervisor: Arc<Supervisor>,
        keys: KeyRing,
        redactor: Arc<Redactor>,
        limits: Limits,
        identity: String,
        bootstrap_started: Instant,
    ) -> Self {
        let replays = ReplayGuard::new(limits.max_clock_skew_secs * 2, 100_000);
        Self {
            supervisor,
            keys,
            replays,
            redactor,
            limits,
            identity,
            bootstrap_started,
            invocations: Default::default(),
        }
    }

    /// The supervisor (for shutdown).
    pub fn supervisor(&self) -> &Arc<Supervisor> {
        &self.supervisor
    }

    /// The `/health` answer: 200 when ready, 503 with the reason otherwise.
    pub fn health(&self) -> (StatusCode, Bytes) {
        let h = self.supervisor.health();
        let mut body = json!({
            "status": if h.ready { "ok" } else { "unavailable" },
            "plugin": self.identity,
            "ready": h.ready,
            "generation": h.generation,
            "invocations": self.invocations.load(std::sync::atomic::Ordering::Relaxed),
            "active_sessions": self.supervisor.current().active_sessions(),
            // Whether `bootstrap serve` also takes HTTP/2 with prior knowledge (the connector
            // multiplexes streams over it when it does).
            "h2c": cfg!(feature = "h2c"),
        });
        if let Some(reason) = h.reason {
            body["reason"] = Value::String(self.redactor.redact(&reason));
        }
        let status = if h.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, serde_json::to_vec(&body).expect("JSON").into())
    }

    /// Handles one invocation.
    pub async fn invoke(&self, req: Request) -> Reply {
        let rid = req.request_id.as_str();
        if req.body.len() > self.limits.max_request_bytes {
            return Reply::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorType::PayloadTooLarge.as_str(),
                &format!(
                    "the request body has {} bytes; this function accepts at most {} (MAX_SERVERLESS_REQUEST_BYTES)",
                    req.body.len(),
                    self.limits.max_request_bytes
                ),
                rid,
            );
        }
        let Some(action) = req.action.as_deref().filter(|a| !a.is_empty()) else {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                ErrorType::BadRequest.as_str(),
                "the `action` query parameter is missing: POST /invoke?action=<action>",
                rid,
            );
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let verified = match self.keys.verify(
            &req.headers,
            action,
            &req.body,
            now,
            self.limits.max_clock_skew_secs,
        ) {
            Ok(v) => v,
            Err(rejection) => return unauthorized(&rejection.to_string(), rid),
        };
        let envelope = match Envelope::parse(req.body.clone()) {
            Ok(e) => e,
            Err(e) => {
                return Reply::error(
                    StatusCode::BAD_REQUEST,
                    ErrorType::BadRequest.as_str(),
                    &e.to_string(),
                    rid,
                );
            }
        };
        if let Err(rejection) = signing::check_session(&verified, envelope.session_id()) {
            return unauthorized(&rejection.to_string(), rid);
        }
        if let Err(rejection) = self.replays.check(&verified, now) {
            return unauthorized(&rejection.to_string(), rid);
        }
        if let Some(inner) = envelope.action().filter(|a| *a != action) {
            return Reply::error(
                StatusCode::BAD_REQUEST,
                ErrorType::BadRequest.as_str(),
                &format!(
                    "the query action `{action}` differs from the envelope's `data.action` `{inner}`"
                ),
                rid,
            );
        }
        self.redactor.register(envelope.secrets());
        let buffered = wants_json(&req.headers);
        let process = match self.supervisor.wait_ready(self.limits.ready_timeout).await {
            Ok(p) => p,
            Err(e) => return not_ready(&self.redactor.redact(&e.to_string()), rid),
        };
        let session = match process.open_session(envelope.session_id()) {
            Ok(s) => s,
            Err(e @ Error::DuplicateSession(_)) => {
                return Reply::error(
                    StatusCode::CONFLICT,
                    ErrorType::BadRequest.as_str(),
                    &e.to_string(),
                    rid,
                );
            }
            Err(e) => return not_ready(&e.to_string(), rid),
        };
        self.invocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let start = StartInfo {
            session_id: envelope.session_id().to_owned(),
            request_id: req.request_id.clone(),
            cold_start: session.cold,
            init_ms: session.cold.then(|| self.init_ms(&session)),
        };
        let run = Run {
            supervisor: self.supervisor.clone(),
            limits: self.limits.clone(),
            deadline: self.deadline(req.deadline_ms),
        };
        let (events_tx, events_rx) = mpsc::channel(8);
        tokio::spawn(run.session(session, envelope, start, events_tx));
        if buffered {
            buffer(events_rx).await
        } else {
            let (tx, rx) = mpsc::channel(8);
            tokio::spawn(stream(events_rx, tx, self.limits.keepalive));
            Reply {
                status: StatusCode::OK,
                content_type: EVENT_STREAM,
                body: ReplyBody::Stream(rx),
            }
        }
    }

    fn init_ms(&self, session: &Session) -> u64 {
        let process_ms = match &*session.process.state().borrow() {
            crate::process::State::Ready { init_ms } => *init_ms,
            _ => 0,
        };
        // The first process also pays for the bootstrap's own start.
        if session.process.generation == 1 {
            (session.process.spawned_at - self.bootstrap_started).as_millis() as u64 + process_ms
        } else {
            process_ms
        }
    }

    fn deadline(&self, lambda_deadline_ms: Option<u64>) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let mut budget = self.limits.max_execution;
        if let Some(ms) = lambda_deadline_ms {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            // A deadline already past (as emulators send) means none.
            if ms > now_ms {
                let left =
                    Duration::from_millis(ms - now_ms).saturating_sub(self.limits.deadline_margin);
                budget = budget.min(left);
            }
        }
        now + budget
    }
}

fn unauthorized(message: &str, rid: &str) -> Reply {
    Reply::error(StatusCode::UNAUTHORIZED, "Sri.Unauthorized", message, rid)
}

fn not_ready(message: &str, rid: &str) -> Reply {
    Reply::error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorType::PluginNotReady.as_str(),
        message,
        rid,
    )
}

fn wants_json(headers: &HeaderMap) -> bool {
    let accept = headers
        .get_all(http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    accept.contains(JSON) && !accept.contains(EVENT_STREAM)
}

/// One running session.
struct Run {
    supervisor: Arc<Supervisor>,
    limits: Limits,
    deadline: tokio::time::Instant,
}

/// Numbers events and counts what was relayed.
struct Emitter {
    tx: mpsc::Sender<Event>,
    seq: u64,
    usage: Usage,
    started: Instant,
}

impl Emitter {
    async fn emit(&mut self, kind: EventKind, data: Bytes) -> Result<(), ()> {
        // Every event is numbered: SSE's last-event-id carries over to events without an
        // `id:`, so numbering only some would make decoders see repeated ids.
        self.seq += 1;
        let id = Some(self.seq);
        if kind == EventKind::Chunk {
            self.usage.chunks += 1;
            self.usage.bytes += data.len() as u64;
        }
        self.tx
            .send(Event::new(kind, id, data))
            .await
            .map_err(|_| ())
    }

    async fn finish(&mut self, session: &Session, end: Bytes) -> Result<(), ()> {
        self.usage.execution_time_ms = self.started.elapsed().as_millis() as u64;
        self.usage.memory_used_mb = session.process.peak_rss_mb();
        let usage = serde_json::to_vec(&self.usage).expect("JSON");
        self.emit(EventKind::Usage, usage.into()).await?;
        self.emit(EventKind::End, end).await
    }

    /// Ends the session with an error made by the runtime.
    async fn fail(
        &mut self,
        session: &Session,
        sid: &str,
        kind: ErrorType,
        message: String,
        args: Map<String, Value>,
    ) -> Result<(), ()> {
        let error = events::session_error(sid, kind.as_str(), &message, args);
        self.emit(EventKind::Error, error).await?;
        self.finish(session, events::session_end(sid)).await
    }
}

impl Run {
    async fn session(
        self,
        mut session: Session,
        envelope: Envelope,
        start: StartInfo,
        tx: mpsc::Sender<Event>,
    ) {
        let sid = envelope.session_id().to_owned();
        let mut out = Emitter {
            tx,
            seq: 0,
            usage: Usage {
                cold_start: start.cold_start,
                ..Usage::default()
            },
            started: Instant::now(),
        };
        let start = serde_json::to_vec(&start).expect("JSON");
        if out.emit(EventKind::Start, start.into()).await.is_err() {
            return;
        }
        let written = tokio::time::timeout_at(
            self.deadline,
            session.process.write_line(&envelope.to_line()),
        )
        .await;
        if let Ok(Err(e)) = written {
            // The process is going away; its exit arrives on the session channel.
            tracing::warn!(session_id = %sid, error = %e, "could not write the request to the plugin");
        }
        let _ = self.relay(&mut session, &sid, &mut out).await;
    }

    async fn relay(&self, session: &mut Session, sid: &str, out: &mut Emitter) -> Result<(), ()> {
        loop {
            let msg = tokio::select! {
                msg = session.rx.recv() => msg,
                _ = tokio::time::sleep_until(self.deadline) => {
                    let ms = out.started.elapsed().as_millis();
                    self.supervisor.recycle(&session.process, "an invocation timed out");
                    let mut args = Map::new();
                    args.insert("timeout_ms".into(), json!(ms as u64));
                    return out.fail(session, sid, ErrorType::PluginTimeout,
                        format!("the plugin did not finish within {ms} ms; the plugin process was replaced"), args).await;
                }
            };
            match msg {
                Some(PluginMsg::Line { kind, line, permit }) => {
                    let ev = match kind {
                        LineKind::Stream => EventKind::Chunk,
                        LineKind::Log => EventKind::Log,
                        LineKind::Error => EventKind::Error,
                        LineKind::End => {
                            drop(permit);
                            return out.finish(session, line).await;
                        }
                    };
                    out.emit(ev, line).await?;
                    drop(permit);
                }
                Some(PluginMsg::TooLarge(len)) => {
                    let mut args = Map::new();
                    args.insert("line_bytes".into(), json!(len));
                    args.insert("limit_bytes".into(), json!(self.limits.max_line_bytes));
                    return out.fail(session, sid, ErrorType::PluginOutputTooLarge, format!(
                        "the plugin wrote a line of {len} bytes; the limit is {} (PLUGIN_RUNTIME_MAX_BUFFER_SIZE). \
                         Send large results in smaller messages (blobs are chunked by the SDK)",
                        self.limits.max_line_bytes), args).await;
                }
                Some(PluginMsg::Protocol(text)) => {
                    let mut args = Map::new();
                    args.insert("output".into(), json!(text));
                    return out.fail(session, sid, ErrorType::PluginProtocolError, format!(
                        "the plugin wrote output that is not the Dify stdio protocol: {text:?} \
                         (print to stderr or use the SDK's logger, never to stdout)"), args).await;
                }
                Some(PluginMsg::Exited(exit)) => {
                    let mut args = Map::new();
                    args.insert("exit_status".into(), json!(exit.status));
                    args.insert("stderr_tail".into(), json!(exit.stderr_tail));
                    let tail = if exit.stderr_tail.is_empty() {
                        "nothing on stderr".to_owned()
                    } else {
                        format!("stderr ends with: {}", exit.stderr_tail)
                    };
                    return out
                        .fail(
                            session,
                            sid,
                            ErrorType::PluginProcessExited,
                            format!(
                                "the plugin process exited during the invocation ({}); {tail}",
                                exit.status
                            ),
                            args,
                        )
                        .await;
                }
                None => {
                    return out
                        .fail(
                            session,
                            sid,
                            ErrorType::PluginProcessExited,
                            "the plugin process went away during the invocation".into(),
                            Map::new(),
                        )
                        .await;
                }
            }
        }
    }
}

/// Encodes events as SSE, with keepalives, ending with [`Frame::Failed`] when the session failed.
async fn stream(mut events: mpsc::Receiver<Event>, out: mpsc::Sender<Frame>, keepalive: Duration) {
    let mut failure: Option<SessionError> = None;
    loop {
        let ev = match tokio::time::timeout(keepalive, events.recv()).await {
            Err(_) => {
                if out
                    .send(Frame::Data(Bytes::from_static(sse::KEEPALIVE)))
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            Ok(None) => break,
            Ok(Some(ev)) => ev,
        };
        if ev.kind == EventKind::Error && failure.is_none() {
            failure = SessionError::from_event_data(&ev.data);
        }
        let end = ev.kind == EventKind::End;
        if out.send(Frame::Data(sse::encode(&ev))).await.is_err() {
            return;
        }
        if end {
            break;
        }
    }
    if let Some(f) = failure {
        let _ = out
            .send(Frame::Failed {
                error_type: f.error_type,
                message: f.message,
            })
            .await;
    }
}

/// Collects a session into the buffered JSON reply.
async fn buffer(mut events: mpsc::Receiver<Event>) -> Reply {
    let mut data = Vec::new();
    let mut error: Option<SessionError> = None;
    let mut usage = Value::Null;
    while let Some(ev) = events.recv().await {
        match ev.kind {
            EventKind::Chunk => {
                if let Ok(v) = ev.json() {
                    data.push(
                        v.get("data")
                            .and_then(|d| d.get("data"))
                            .cloned()
                            .unwrap_or(Value::Null),
                    );
                }
            }
            EventKind::Error if error.is_none() => error = SessionError::from_event_data(&ev.data),
            EventKind::Usage => usage = ev.json().unwrap_or(Value::Null),
            EventKind::End => break,
            _ => {}
        }
    }
    let body = match error {
        None => json!({"status": "success", "data": data, "usage": usage}),
        Some(e) => json!({
            "status": "error",
            "error": {"type": e.error_type, "message": e.message, "code": events::http_status(&e.error_type)},
            "data": data,
            "usage": usage,
        }),
    };
    Reply {
        status: StatusCode::OK,
        content_type: JSON,
        body: ReplyBody::Full(serde_json::to_vec(&body).expect("JSON").into()),
    }
}
