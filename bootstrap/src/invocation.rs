//! The handler core shared by every mode: authenticate an SRI request, run it as a session of
//! the plugin, and turn what the plugin writes into SRI events (streamed or buffered).
//!
//! A session never holds up anything but itself: its relay races every wait on its caller
//! against its deadline and its buffer budget, and gives its process back (so a replaced
//! process can be killed) before it waits to deliver its final error.

use bytes::Bytes;
use connector::protocol::envelope::Envelope;
use connector::protocol::events::{
    self, ErrorType, Event, EventKind, SessionError, StartInfo, Usage,
};
use connector::protocol::signing::{self, Expected, KeyRing, ReplayGuard};
use connector::protocol::{EVENT_STREAM, JSON, sse};
use http::{HeaderMap, StatusCode};
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

use crate::Error;
use crate::process::{Cut, LineKind, PluginMsg, Session};
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

/// How long a session that ended at its deadline may still take to hand its caller the error.
const FINAL_GRACE: Duration = Duration::from_secs(5);

/// Who may invoke this function.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The key ring.
    pub keys: KeyRing,
    /// This function's name, bound by SRI v2 signatures (`SRI_FUNCTION_NAME`).
    pub function: String,
    /// Whether SRI v1 signatures are still accepted (`SRI_ACCEPT_V1`).
    pub accept_v1: bool,
}

/// Runs invocations against the supervised plugin.
pub struct Handler {
    supervisor: Arc<Supervisor>,
    auth: Auth,
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
        auth: Auth,
        redactor: Arc<Redactor>,
        limits: Limits,
        identity: String,
        bootstrap_started: Instant,
    ) -> Self {
        let replays = ReplayGuard::new(limits.max_clock_skew_secs * 2, 100_000);
        Self {
            supervisor,
            auth,
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
        let expected = Expected {
            function: &self.auth.function,
            action,
            body: &req.body,
            accept_v1: self.auth.accept_v1,
        };
        let verified = match self.auth.keys.verify(
            &req.headers,
            &expected,
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
        // Checked here, recorded only once the request is accepted below: a refused attempt
        // (plugin not ready) does not make the caller's retry a replay.
        if let Err(rejection) = self.replays.check(&verified) {
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
        let claim = req
            .headers
            .get(connector::protocol::relay::HEADER_CLAIM)
            .and_then(|v| v.to_str().ok());
        self.supervisor
            .backwards()
            .admit(envelope.session_id(), claim);
        let buffered = wants_json(&req.headers);
        let line = envelope.to_line();
        let mut accept = || {
            // Recorded once the request is about to run; a concurrent copy accepted first
            // makes this one a replay.
            self.replays.record(&verified, now)
        };
        let session = match start_session(
            &self.supervisor,
            envelope.session_id(),
            &line,
            self.limits.ready_timeout,
            || self.deadline(req.deadline_ms),
            &mut accept,
        )
        .await
        {
            Ok(s) => s,
            Err(Refused::Rejected(rejection)) => {
                return unauthorized(&rejection.to_string(), rid);
            }
            Err(Refused::Failed(e @ Error::DuplicateSession(_))) => {
                return Reply::error(
                    StatusCode::CONFLICT,
                    ErrorType::BadRequest.as_str(),
                    &e.to_string(),
                    rid,
                );
            }
            Err(Refused::Failed(e)) => {
                return not_ready(&self.redactor.redact(&e.to_string()), rid);
            }
        };
        let deadline = session.deadline;
        self.invocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let start = StartInfo {
            session_id: envelope.session_id().to_owned(),
            request_id: req.request_id.clone(),
            cold_start: session.session.cold,
            init_ms: session.session.cold.then(|| self.init_ms(&session.session)),
        };
        let run = Run {
            supervisor: self.supervisor.clone(),
            limits: self.limits.clone(),
            deadline,
            line,
        };
        let (events_tx, events_rx) = mpsc::channel(8);
        tokio::spawn(run.session(
            session.session,
            envelope.session_id().to_owned(),
            start,
            events_tx,
        ));
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

/// Why a session could not be started.
enum Refused {
    /// The plugin cannot take it (not ready, duplicate session).
    Failed(Error),
    /// The request was refused on acceptance (a replay).
    Rejected(signing::Rejection),
}

/// A session started: its request written to the plugin.
struct Started {
    session: Session,
    deadline: tokio::time::Instant,
}

/// Opens session `sid` on a ready process and writes the request `line` to it. A process found
/// gone before it read the request is waited out, and its replacement takes the request.
/// `deadline` gives the session's deadline once a process is ready; `accept` runs once, right
/// before the request is first written.
async fn start_session(
    supervisor: &Supervisor,
    sid: &str,
    line: &[u8],
    ready_timeout: Duration,
    deadline: impl Fn() -> tokio::time::Instant,
    accept: &mut (dyn FnMut() -> Result<(), signing::Rejection> + Send),
) -> Result<Started, Refused> {
    let ready_by = tokio::time::Instant::now() + ready_timeout;
    let mut accepted = false;
    loop {
        let left = ready_by.saturating_duration_since(tokio::time::Instant::now());
        let process = supervisor.wait_ready(left).await.map_err(Refused::Failed)?;
        // The execution time starts once a process is ready for it.
        let deadline = deadline();
        let mut session = match process.open_session(sid, deadline) {
            Ok(s) => s,
            // It exited just now: its replacement takes the request.
            Err(_) if process.exited() => continue,
            Err(e) => return Err(Refused::Failed(e)),
        };
        if !accepted {
            accept().map_err(Refused::Rejected)?;
            accepted = true;
        }
        match tokio::time::timeout_at(deadline, process.write_line(line)).await {
            Ok(Ok(at)) => session.request_at = Some(at),
            // A broken pipe: the process is gone and never read the request.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::info!(
                    session_id = sid,
                    pid = process.pid,
                    "the plugin process exited before reading the request; waiting for its replacement"
                );
                continue;
            }
            // The process is going away; its exit arrives on the session channel.
            Ok(Err(e)) => {
                tracing::warn!(session_id = sid, error = %e, "could not write the request to the plugin")
            }
            // Past the deadline: the session times out at once.
            Err(_) => {}
        }
        return Ok(Started { session, deadline });
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
    /// The request, for a replacement process when the first died before reading it.
    line: Bytes,
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
        // Counted once sent: a send given up (the session cut meanwhile) leaves no gap.
        let id = self.seq + 1;
        let bytes = data.len() as u64;
        self.tx
            .send(Event::new(kind, Some(id), data))
            .await
            .map_err(|_| ())?;
        self.seq = id;
        if kind == EventKind::Chunk {
            self.usage.chunks += 1;
            self.usage.bytes += bytes;
        }
        Ok(())
    }

    async fn finish(&mut self, memory_used_mb: u64, end: Bytes) -> Result<(), ()> {
        self.usage.execution_time_ms = self.started.elapsed().as_millis() as u64;
        self.usage.memory_used_mb = memory_used_mb;
        let usage = serde_json::to_vec(&self.usage).expect("JSON");
        self.emit(EventKind::Usage, usage.into()).await?;
        self.emit(EventKind::End, end).await
    }
}

/// How a session's relay ended.
enum Ending {
    /// The plugin ended it with this `end` line.
    Finished(Bytes),
    /// The runtime ends it with an error.
    Failed {
        kind: ErrorType,
        message: String,
        args: Map<String, Value>,
    },
    /// The caller went away: nothing more to say.
    CallerGone,
    /// The process died before reading the request (nothing ran): run it on the replacement.
    NeverRead(Arc<crate::process::Exit>),
}

impl Ending {
    fn failed(kind: ErrorType, message: String, args: Map<String, Value>) -> Self {
        Self::Failed {
            kind,
            message,
            args,
        }
    }
}

/// What interrupted a wait on the caller.
enum Interrupt {
    Cut(Cut),
    Deadline,
}

impl Run {
    async fn session(
        self,
        mut session: Session,
        sid: String,
        start: StartInfo,
        tx: mpsc::Sender<Event>,
    ) {
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
        let mut ending = self.relay(&mut session, &mut out).await;
        while let Ending::NeverRead(exit) = &ending {
            tracing::info!(session_id = %sid, status = %exit.status, "the plugin process died before reading the request; running it on its replacement");
            let left = self
                .deadline
                .saturating_duration_since(tokio::time::Instant::now());
            let deadline = self.deadline;
            match start_session(
                &self.supervisor,
                &sid,
                &self.line,
                left.min(self.limits.ready_timeout),
                || deadline,
                &mut || Ok(()),
            )
            .await
            {
                Ok(started) => {
                    session = started.session;
                    ending = self.relay(&mut session, &mut out).await;
                }
                Err(why) => {
                    let why = match why {
                        Refused::Failed(e) => e.to_string(),
                        Refused::Rejected(r) => r.to_string(),
                    };
                    let mut args = Map::new();
                    args.insert("exit_status".into(), json!(exit.status));
                    ending = Ending::failed(
                        ErrorType::PluginNotReady,
                        format!(
                            "the plugin process exited ({}) before reading the request, and its replacement could not take it: {why}",
                            exit.status
                        ),
                        args,
                    );
                }
            }
        }
        let memory_used_mb = session.process.peak_rss_mb();
        // The process is given back before the caller is waited on: a replaced process is
        // killed once its last session is done, whether or not its caller still reads.
        session.discard_queued();
        drop(session);
        let finish = async {
            match ending {
                Ending::CallerGone | Ending::NeverRead(_) => Ok(()),
                Ending::Finished(end) => out.finish(memory_used_mb, end).await,
                Ending::Failed {
                    kind,
                    message,
                    args,
                } => {
                    let error = events::session_error(&sid, kind.as_str(), &message, args);
                    out.emit(EventKind::Error, error).await?;
                    out.finish(memory_used_mb, events::session_end(&sid)).await
                }
            }
        };
        // A caller that does not read gets until its deadline (plus a grace after it) to take
        // the last events; then the stream is dropped, which callers read as a failure.
        let until = self.deadline.max(tokio::time::Instant::now()) + FINAL_GRACE;
        if tokio::time::timeout_at(until, finish).await.is_err() {
            tracing::warn!(session_id = %sid, "the caller did not read the end of the stream; dropped");
        }
    }

    fn interrupted(&self, session: &Session, out: &Emitter, why: Interrupt) -> Ending {
        match why {
            Interrupt::Cut(cut) => {
                let mut args = Map::new();
                args.insert("buffered_bytes".into(), json!(cut.buffered));
                args.insert("limit_bytes".into(), json!(cut.limit));
                let (variable, scope) = if cut.total {
                    ("SRI_MAX_BUFFERED_BYTES", "all sessions of this function")
                } else {
                    ("SRI_SESSION_BUFFER_BYTES", "one session")
                };
                Ending::failed(
                    ErrorType::PluginOutputTooLarge,
                    format!(
                        "the caller stopped reading this stream and {} bytes of plugin output queued up; \
                         {scope} may queue at most {} ({variable}). Read the stream as it arrives, or raise {variable}",
                        cut.buffered, cut.limit
                    ),
                    args,
                )
            }
            Interrupt::Deadline => {
                let ms = out.started.elapsed().as_millis() as u64;
                let mut args = Map::new();
                args.insert("timeout_ms".into(), json!(ms));
                if session.state.plugin_ended() {
                    // The plugin was done; its caller did not read in time.
                    Ending::failed(
                        ErrorType::PluginTimeout,
                        format!(
                            "the caller did not read the stream within {ms} ms (the invocation deadline)"
                        ),
                        args,
                    )
                } else {
                    self.supervisor
                        .recycle(&session.process, "an invocation timed out");
                    Ending::failed(
                        ErrorType::PluginTimeout,
                        format!(
                            "the plugin did not finish within {ms} ms; the plugin process was replaced"
                        ),
                        args,
                    )
                }
            }
        }
    }

    async fn relay(&self, session: &mut Session, out: &mut Emitter) -> Ending {
        loop {
            let state = session.state.clone();
            let msg = tokio::select! {
                biased;
                cut = state.cut() => return self.interrupted(session, out, Interrupt::Cut(cut)),
                _ = tokio::time::sleep_until(self.deadline) => {
                    return self.interrupted(session, out, Interrupt::Deadline);
                }
                msg = session.rx.recv() => msg,
            };
            match msg {
                Some(PluginMsg::Line { kind, line, held }) => {
                    let ev = match kind {
                        LineKind::Stream => EventKind::Chunk,
                        LineKind::Log => EventKind::Log,
                        LineKind::Error => EventKind::Error,
                        LineKind::End => {
                            drop(held);
                            return Ending::Finished(line);
                        }
                    };
                    // The wait on the caller is raced against the session's own limits only.
                    let sent = tokio::select! {
                        biased;
                        cut = state.cut() => Err(Interrupt::Cut(cut)),
                        _ = tokio::time::sleep_until(self.deadline) => Err(Interrupt::Deadline),
                        v = out.emit(ev, line) => Ok(v),
                    };
                    drop(held);
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(())) => return Ending::CallerGone,
                        Err(why) => return self.interrupted(session, out, why),
                    }
                }
                Some(PluginMsg::TooLarge(len)) => {
                    let mut args = Map::new();
                    args.insert("line_bytes".into(), json!(len));
                    args.insert("limit_bytes".into(), json!(self.limits.max_line_bytes));
                    return Ending::failed(
                        ErrorType::PluginOutputTooLarge,
                        format!(
                            "the plugin wrote a line of {len} bytes; the limit is {} (PLUGIN_RUNTIME_MAX_BUFFER_SIZE). \
                         Send large results in smaller messages (blobs are chunked by the SDK)",
                            self.limits.max_line_bytes
                        ),
                        args,
                    );
                }
                Some(PluginMsg::Protocol(text)) => {
                    let mut args = Map::new();
                    args.insert("output".into(), json!(text));
                    return Ending::failed(
                        ErrorType::PluginProtocolError,
                        format!(
                            "the plugin wrote output that is not the Dify stdio protocol: {text:?} \
                         (print to stderr or use the SDK's logger, never to stdout)"
                        ),
                        args,
                    );
                }
                Some(PluginMsg::Exited(exit)) => {
                    // Nothing ran: the caller has had only `start`.
                    if out.seq == 1 && session.never_read(&exit) {
                        return Ending::NeverRead(exit);
                    }
                    let mut args = Map::new();
                    args.insert("exit_status".into(), json!(exit.status));
                    args.insert("stderr_tail".into(), json!(exit.stderr_tail));
                    let tail = if exit.stderr_tail.is_empty() {
                        "nothing on stderr".to_owned()
                    } else {
                        format!("stderr ends with: {}", exit.stderr_tail)
                    };
                    return Ending::failed(
                        ErrorType::PluginProcessExited,
                        format!(
                            "the plugin process exited during the invocation ({}); {tail}",
                            exit.status
                        ),
                        args,
                    );
                }
                None => {
                    return Ending::failed(
                        ErrorType::PluginProcessExited,
                        "the plugin process went away during the invocation".into(),
                        Map::new(),
                    );
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
