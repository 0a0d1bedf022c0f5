//! One running plugin process: spawning it, writing envelopes to its stdin, and routing each
//! line of its stdout to the session it belongs to.
//!
//! The SDK multiplexes sessions over one stdout by `session_id`. Heartbeats mark readiness,
//! `session`/`invoke` lines are backwards invocations (answered on stdin, never streamed), and
//! everything the protocol does not expect is attributed where possible and logged otherwise.
//!
//! The one stdout reader never waits on a session: each session's lines queue on their own,
//! counted against the session's buffer budget (`SRI_SESSION_BUFFER_BYTES`) and the process-
//! wide one (`SRI_MAX_BUFFERED_BYTES`). A session whose caller stops reading is cut when its
//! queue reaches its budget, while the other sessions, heartbeats and backwards calls go on.

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Notify, mpsc, watch};

use crate::Error;
use crate::backwards::Backwards;
use crate::lines::{Line, LineReader};
use crate::redact::Redactor;

/// Cut sessions remembered per process while their plugin still writes for them.
const MAX_CUT_REMEMBERED: usize = 4096;

/// `CAP_SYS_PTRACE` (linux/capability.h); the libc crate does not define the capabilities.
const CAP_SYS_PTRACE: nix::libc::c_ulong = 19;

/// How to start the plugin.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The interpreter.
    pub python: PathBuf,
    /// The module run with `-m`.
    pub entrypoint: String,
    /// The plugin directory (the process's cwd).
    pub plugin_dir: PathBuf,
    /// Prepended to `PYTHONPATH`.
    pub python_path: Option<String>,
    /// The plugin's whole environment (see [`crate::plugin_env`]): nothing else is inherited.
    pub env: Vec<(std::ffi::OsString, std::ffi::OsString)>,
    /// The sandbox it runs in, if any.
    pub confine: Option<Arc<dyn Confine>>,
}

/// Confines a plugin process (the bootstrap's sandbox, when built in); this module only
/// spawns through it.
pub trait Confine: Send + Sync + std::fmt::Debug {
    /// Adds the confinement to `cmd` for spawn `generation`; what it returns lives as long as
    /// the process.
    fn confine(&self, cmd: &mut Command, generation: u64) -> Result<Box<dyn Confined>, Error>;
}

/// A confined process's side of its sandbox.
pub trait Confined: Send + Sync {
    /// The process's exit status, with what the sandbox knows about it (e.g. its memory limit).
    fn explain(&self, status: String) -> String;
}

/// What every plugin process of a runtime shares.
#[derive(Debug)]
pub struct Shared {
    /// Secrets to keep out of logs.
    pub redactor: Arc<Redactor>,
    /// Bytes of plugin output held in memory now, across sessions and processes.
    pub buffered: Arc<AtomicUsize>,
    /// Bytes of plugin output that may be held in memory at once.
    pub max_buffered: usize,
    /// Bytes of plugin output one session may have queued for its caller.
    pub session_budget: usize,
    /// Longest output line.
    pub max_line: usize,
    /// Where `session`/`invoke` lines go.
    pub backwards: Arc<Backwards>,
}

/// Lifecycle of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Spawned, no heartbeat yet.
    Starting,
    /// Heartbeat seen; `init_ms` from spawn to the first heartbeat.
    Ready {
        /// Milliseconds from spawn to ready.
        init_ms: u64,
    },
    /// Could not start: why (the Python error text when there is one).
    Failed(String),
    /// Exited after being ready.
    Exited,
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// `exit status 3`, `killed by signal 9`, …
    pub status: String,
    /// The last lines of stderr, credentials redacted.
    pub stderr_tail: String,
    /// How many bytes of its stdin the process had read when it died (what it wrote to the
    /// pipe minus what was still in it); `None` when unknown.
    pub stdin_consumed: Option<u64>,
}

/// Which kind of session line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineKind {
    /// `session`/`stream`.
    Stream,
    /// `log` with this session's id.
    Log,
    /// `session`/`error`.
    Error,
    /// `session`/`end`.
    End,
}

/// Bytes of a queued line, counted against its session's and the process-wide budget until
/// dropped.
#[derive(Debug)]
pub struct Held {
    bytes: usize,
    session: Arc<SessionState>,
    total: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.session
            .buffered
            .fetch_sub(self.bytes, Ordering::AcqRel);
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Why a session was cut before its plugin finished it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    /// Bytes the session had queued for its caller.
    pub buffered: usize,
    /// The budget it reached.
    pub limit: usize,
    /// Whether the process-wide budget (`SRI_MAX_BUFFERED_BYTES`) was the one reached, rather
    /// than the session's own (`SRI_SESSION_BUFFER_BYTES`).
    pub total: bool,
}

/// What a session and the stdout reader share about it.
#[derive(Debug, Default)]
pub struct SessionState {
    buffered: AtomicUsize,
    cut: Mutex<Option<Cut>>,
    cut_notify: Notify,
    ended: AtomicBool,
}

impl SessionState {
    /// Whether the plugin has written the session's `end` (or `error`).
    pub fn plugin_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Completes when the session is cut, with why.
    pub async fn cut(&self) -> Cut {
        loop {
            let notified = self.cut_notify.notified();
            if let Some(c) = self.cut.lock().expect("cut lock").clone() {
                return c;
            }
            notified.await;
        }
    }
}

/// What a session receives from its process.
#[derive(Debug)]
pub enum PluginMsg {
    /// A line of the session, verbatim; `held` returns its bytes to the budgets when dropped.
    Line {
        /// The line's kind.
        kind: LineKind,
        /// The JSON line.
        line: Bytes,
        /// Budget held while the line is queued.
        held: Held,
    },
    /// The plugin wrote a line for this session over the limit (its length).
    TooLarge(usize),
    /// The plugin broke the protocol; what it wrote.
    Protocol(String),
    /// The process exited.
    Exited(Arc<Exit>),
}

struct Slot {
    tx: mpsc::UnboundedSender<PluginMsg>,
    state: Arc<SessionState>,
    deadline: tokio::time::Instant,
}

#[derive(Default)]
struct Sessions {
    map: HashMap<String, Slot>,
    /// Sessions cut while their plugin still writes: their output is dropped quietly (and
    /// counted, bytes).
    cut: HashMap<String, u64>,
    closed: bool,
}

/// A running plugin process.
pub struct PluginProcess {
    /// Which spawn this is (1, 2, …).
    pub generation: u64,
    /// OS process id (also its process group).
    pub pid: u32,
    /// When it was spawned.
    pub spawned_at: Instant,
    stdin: Arc<tokio::sync::Mutex<ChildStdin>>,
    /// Bytes written to stdin by [`PluginProcess::write_line`] so far.
    written: AtomicU64,
    sessions: Mutex<Sessions>,
    state: watch::Sender<State>,
    started_sessions: AtomicU64,
    peak_rss_kb: AtomicU64,
    retired: AtomicBool,
    tail: Arc<Mutex<Tail>>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PluginProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginProcess")
            .field("generation", &self.generation)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

/// A session registered with a process; unregisters itself when dropped.
pub struct Session {
    /// Messages for this session.
    pub rx: mpsc::UnboundedReceiver<PluginMsg>,
    /// The process it runs on.
    pub process: Arc<PluginProcess>,
    /// Whether it is the first session of its process.
    pub cold: bool,
    /// What the stdout reader tells it besides lines (cut, plugin finished).
    pub state: Arc<SessionState>,
    /// Where its request starts in the process's stdin (see [`Exit::stdin_consumed`]).
    pub request_at: Option<u64>,
    id: String,
}

impl Session {
    /// Whether the process died before reading a byte of this session's request: it did not
    /// start, so its process's replacement may run it.
    pub fn never_read(&self, exit: &Exit) -> bool {
        matches!((self.request_at, exit.stdin_consumed), (Some(at), Some(read)) if read <= at)
    }
}

impl Session {
    /// Drops whatever is queued, returning its bytes to the budgets at once.
    pub fn discard_queued(&mut self) {
        self.rx.close();
        while self.rx.try_recv().is_ok() {}
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let now_idle = {
            let mut s = self.process.sessions.lock().expect("sessions lock");
            // Only this session's entry: after a cut, the id may be running again. A cut
            // session stays known as cut until its plugin finishes it, so that what the plugin
            // still writes for it is dropped quietly.
            if s.map
                .get(&self.id)
                .is_some_and(|slot| Arc::ptr_eq(&slot.state, &self.state))
            {
                s.map.remove(&self.id);
            }
            s.map.is_empty()
        };
        if now_idle && self.process.retired.load(Ordering::Acquire) {
            self.process.kill();
        }
    }
}

impl PluginProcess {
    /// Spawns the plugin. `exited` receives the generation when the process is gone.
    pub fn spawn(
        spec: &Spec,
        generation: u64,
        shared: Arc<Shared>,
        exited: mpsc::UnboundedSender<u64>,
    ) -> Result<Arc<Self>, Error> {
        let mut cmd = Command::new(&spec.python);
        cmd.arg("-m")
            .arg(&spec.entrypoint)
            .current_dir(&spec.plugin_dir)
            // An allowlist: the plugin never inherits the signing keys, API keys, AWS
            // credentials or `AWS_LAMBDA_RUNTIME_API` (with which it could answer invocations).
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .env("INSTALL_METHOD", "local")
            .env("PYTHONUNBUFFERED", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own process group, so that recycling also ends whatever it started.
            .process_group(0);
        if let Some(extra) = &spec.python_path {
            let path = match spec.env.iter().find(|(k, _)| k == "PYTHONPATH") {
                Some((_, old)) if !old.is_empty() => format!("{extra}:{}", old.to_string_lossy()),
                _ => extra.clone(),
            };
            cmd.env("PYTHONPATH", path);
        }
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The plugin dies with the bootstrap, even a SIGKILLed one.
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("the bootstrap exited during spawn"));
                }
                // Run as root (a container), the plugin would keep CAP_SYS_PTRACE, which reads
                // the non-dumpable bootstrap's memory and environment all the same. Dropped
                // from the bounding set, exec cannot grant it; without the right to drop it
                // (not root) there is nothing to drop.
                let _ = nix::libc::prctl(nix::libc::PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0);
                Ok(())
            });
        }
        let confined = match &spec.confine {
            Some(c) => Some(c.confine(&mut cmd, generation)?),
            None => None,
        };
        let mut child = cmd.spawn().map_err(|e| Error::Spawn {
            python: spec.python.clone(),
            source: e,
        })?;
        let pid = child.id().unwrap_or_default();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (state, _) = watch::channel(State::Starting);
        let process = Arc::new(Self {
            generation,
            pid,
            spawned_at: Instant::now(),
            stdin: Arc::new(tokio::sync::Mutex::new(stdin)),
            written: AtomicU64::new(0),
            sessions: Mutex::new(Sessions::default()),
            state,
            started_sessions: AtomicU64::new(0),
            peak_rss_kb: AtomicU64::new(0),
            retired: AtomicBool::new(false),
            tail: Arc::new(Mutex::new(Tail::default())),
            shared,
        });
        tracing::info!(pid, generation, "plugin process started");
        let stderr_task = tokio::spawn(drain_stderr(
            stderr,
            pid,
            process.tail.clone(),
            process.shared.redactor.clone(),
        ));
        tokio::spawn(
            process
                .clone()
                .read_stdout(stdout, child, stderr_task, exited, confined),
        );
        Ok(process)
    }

    /// Watches the process's state.
    pub fn state(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    /// Marks the process as failed to start (e.g. no heartbeat in time) and kills it.
    pub fn fail(&self, why: String) {
        self.state.send_if_modified(|s| {
            if *s == State::Starting {
                *s = State::Failed(why);
                true
            } else {
                false
            }
        });
        self.kill();
    }

    /// Registers a session that must be done by `deadline`. Fails when the process is gone or
    /// the id is already running.
    pub fn open_session(
        self: &Arc<Self>,
        id: &str,
        deadline: tokio::time::Instant,
    ) -> Result<Session, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(SessionState::default());
        let mut s = self.sessions.lock().expect("sessions lock");
        if s.closed {
            return Err(Error::NotReady("the plugin process has exited".into()));
        }
        if s.map.contains_key(id) {
            return Err(Error::DuplicateSession(id.to_owned()));
        }
        s.cut.remove(id);
        s.map.insert(
            id.to_owned(),
            Slot {
                tx,
                state: state.clone(),
                deadline,
            },
        );
        let cold = self.started_sessions.fetch_add(1, Ordering::Relaxed) == 0;
        // Sampled now too, so a process that dies mid-session still has a figure.
        self.peak_rss_mb();
        Ok(Session {
            rx,
            process: self.clone(),
            cold,
            state,
            request_at: None,
            id: id.to_owned(),
        })
    }

    /// Writes one line (ending in `\n`) to the plugin's stdin; returns where it starts in
    /// the stream of everything written to it.
    pub async fn write_line(&self, line: &[u8]) -> std::io::Result<u64> {
        let mut stdin = self.stdin.lock().await;
        let at = self.written.load(Ordering::Acquire);
        // Counted before the write: bytes of a failed write may have reached the pipe.
        self.written.fetch_add(line.len() as u64, Ordering::AcqRel);
        stdin.write_all(line).await?;
        stdin.flush().await?;
        Ok(at)
    }

    /// Bytes written to stdin and not read by the process (the pipe's `FIONREAD`).
    fn stdin_unread(&self) -> Option<u64> {
        use std::os::fd::AsRawFd;
        let stdin = self.stdin.try_lock().ok()?;
        let mut unread: nix::libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer; the descriptor is the pipe's
        // write end, kept open by the locked `ChildStdin`.
        let rc = unsafe { nix::libc::ioctl(stdin.as_raw_fd(), nix::libc::FIONREAD, &mut unread) };
        (rc == 0 && unread >= 0).then_some(unread as u64)
    }

    /// Sessions in flight.
    pub fn active_sessions(&self) -> usize {
        self.sessions.lock().expect("sessions lock").map.len()
    }

    /// Peak resident memory of the plugin process, in MiB (Linux `VmHWM`; the highest value
    /// seen, since a process that has exited has none).
    pub fn peak_rss_mb(&self) -> u64 {
        let now = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        let kb = self.peak_rss_kb.fetch_max(now, Ordering::Relaxed).max(now);
        kb.div_ceil(1024)
    }

    /// Takes the process out of service: it is killed once its last session is done, or when
    /// the last of their deadlines passes, whichever is first.
    pub fn retire(self: &Arc<Self>) {
        self.retired.store(true, Ordering::Release);
        let last_deadline = {
            let s = self.sessions.lock().expect("sessions lock");
            s.map.values().map(|slot| slot.deadline).max()
        };
        match last_deadline {
            None => self.kill(),
            Some(at) => {
                let process = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(at).await;
                    if let Some(p) = process.upgrade().filter(|p| !p.exited()) {
                        tracing::warn!(
                            pid = p.pid,
                            generation = p.generation,
                            "killing the replaced plugin process at its last session's deadline"
                        );
                        p.kill();
                    }
                });
            }
        }
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        self.sessions.lock().expect("sessions lock").closed
    }

    /// Kills the process group at once.
    pub fn kill(&self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }

    /// Sends `sig` to the process group.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.pid > 0 {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// Asks the process to stop (SIGTERM), then kills it after `grace`.
    pub async fn terminate(&self, grace: Duration) {
        let mut state = self.state();
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let gone = tokio::time::timeout(
            grace,
            state.wait_for(|s| matches!(s, State::Exited | State::Failed(_))),
        )
        .await;
        if gone.is_err() {
            tracing::warn!(
                pid = self.pid,
                "the plugin did not stop after SIGTERM; killing it"
            );
        }
        // Whatever else is left of its process group goes too.
        self.kill();
    }

    async fn read_stdout(
        self: Arc<Self>,
        stdout: tokio::process::ChildStdout,
        mut child: Child,
        stderr_task: tokio::task::JoinHandle<()>,
        exited: mpsc::UnboundedSender<u64>,
        confined: Option<Box<dyn Confined>>,
    ) {
        let mut lines = LineReader::new(stdout, self.shared.max_line);
        loop {
            match lines.next_line().await {
                Ok(Some(Line::Full(line))) => self.route(line),
                Ok(Some(Line::TooLong { prefix, len })) => self.route_too_long(&prefix, len),
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(pid = self.pid, error = %e, "reading plugin stdout failed");
                    self.kill();
                    break;
                }
            }
        }
        // No new session may start on a process whose output has ended: callers wait for its
        // replacement instead of being handed a process that cannot answer.
        self.sessions.lock().expect("sessions lock").closed = true;
        self.state.send_if_modified(|st| {
            let ready = matches!(st, State::Ready { .. });
            if ready {
                *st = State::Exited;
            }
            ready
        });
        let status = child.wait().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), stderr_task).await;
        let stdin_consumed = self
            .stdin_unread()
            .map(|unread| self.written.load(Ordering::Acquire).saturating_sub(unread));
        let status = match &confined {
            Some(c) => c.explain(describe(status)),
            None => describe(status),
        };
        drop(confined);
        let exit = Arc::new(Exit {
            status,
            stderr_tail: self.tail.lock().expect("tail lock").text(),
            stdin_consumed,
        });
        tracing::warn!(pid = self.pid, generation = self.generation, status = %exit.status, "plugin process exited");
        let waiting = {
            let mut s = self.sessions.lock().expect("sessions lock");
            s.closed = true;
            self.state.send_modify(|st| {
                *st = match st {
                    State::Starting => State::Failed(format!(
                        "the plugin exited before it was ready ({}): {}",
                        exit.status,
                        if exit.stderr_tail.is_empty() {
                            "no output on stderr"
                        } else {
                            &exit.stderr_tail
                        }
                    )),
                    State::Failed(why) => State::Failed(std::mem::take(why)),
                    _ => State::Exited,
                }
            });
            s.cut.clear();
            s.map.drain().map(|(_, slot)| slot.tx).collect::<Vec<_>>()
        };
        if let State::Failed(why) = &*self.state.borrow() {
            tracing::error!(pid = self.pid, reason = %why, "the plugin failed to start");
        }
        for tx in waiting {
            let _ = tx.send(PluginMsg::Exited(exit.clone()));
        }
        let _ = exited.send(self.generation);
    }

    fn route(&self, mut line: Bytes) {
        if line.ends_with(b"\r") {
            line.truncate(line.len() - 1);
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let head: Head<'_> = match serde_json::from_slice(&line) {
            Ok(h) => h,
            Err(_) => return self.protocol_error(None, &line),
        };
        match head.event.as_deref() {
            Some("heartbeat") => {
                self.state.send_if_modified(|s| {
                    if *s == State::Starting {
                        let init_ms = self.spawned_at.elapsed().as_millis() as u64;
                        tracing::info!(pid = self.pid, init_ms, "plugin ready");
                        *s = State::Ready { init_ms };
                        true
                    } else {
                        false
                    }
                });
            }
            Some("session") => {
                let kind = head
                    .data
                    .and_then(|d| serde_json::from_str::<SessionHead<'_>>(d.get()).ok())
                    .map(|d| d.kind);
                let Some(sid) = head.session_id.as_deref() else {
                    return self.protocol_error(None, &line);
                };
                let kind = match kind.as_deref() {
                    Some("stream") => LineKind::Stream,
                    Some("end") => LineKind::End,
                    Some("error") => LineKind::Error,
                    Some("invoke") => {
                        let sid = sid.to_owned();
                        drop(head);
                        self.shared.backwards.spawn(sid, line, self.stdin.clone());
                        return;
                    }
                    _ => return self.protocol_error(Some(sid), &line),
                };
                let sid = sid.to_owned();
                drop(head);
                self.deliver_line(&sid, kind, line);
            }
            Some("log") => {
                if let Some(sid) = head.session_id.as_deref().filter(|s| self.has_session(s)) {
                    let sid = sid.to_owned();
                    drop(head);
                    self.deliver_line(&sid, LineKind::Log, line);
                } else {
                    self.log_plugin_message(head.data);
                }
            }
            Some("error") => {
                // The SDK's answer to a stdin line it could not handle.
                let text = self.shared.redactor.redact(&String::from_utf8_lossy(&line));
                match head.session_id.as_deref().filter(|s| self.has_session(s)) {
                    Some(sid) => {
                        let sid = sid.to_owned();
                        self.deliver(&sid, PluginMsg::Protocol(text));
                    }
                    None => {
                        tracing::warn!(pid = self.pid, plugin_error = %text, "plugin reported an error")
                    }
                }
            }
            // The first line is the plugin's declaration; other objects are ignored like the
            // daemon ignores them.
            _ => tracing::debug!(pid = self.pid, bytes = line.len(), "ignored plugin line"),
        }
    }

    fn has_session(&self, sid: &str) -> bool {
        self.sessions
            .lock()
            .expect("sessions lock")
            .map
            .contains_key(sid)
    }

    /// Queues a session line within the budgets, never waiting: over its session's budget the
    /// session is cut; over the process-wide budget the session holding the most is.
    fn deliver_line(&self, sid: &str, kind: LineKind, line: Bytes) {
        let n = line.len().max(1);
        let mut s = self.sessions.lock().expect("sessions lock");
        let Some(slot) = s.map.get(sid) else {
            if let Some(dropped) = s.cut.get_mut(sid) {
                *dropped += n as u64;
                if matches!(kind, LineKind::End | LineKind::Error) {
                    let dropped = s.cut.remove(sid).unwrap_or_default();
                    tracing::info!(
                        pid = self.pid,
                        session_id = sid,
                        dropped_bytes = dropped,
                        "the plugin finished a session cut at its buffer budget; its output after the cut was dropped"
                    );
                }
                return;
            }
            return self.undeliverable(&s, sid);
        };
        if matches!(kind, LineKind::End | LineKind::Error) {
            slot.state.ended.store(true, Ordering::Release);
        }
        let queued = slot.state.buffered.load(Ordering::Acquire);
        if queued + n > self.shared.session_budget {
            let cut = Cut {
                buffered: queued + n,
                limit: self.shared.session_budget,
                total: false,
            };
            return self.cut(&mut s, sid, cut);
        }
        let total = self.shared.buffered.load(Ordering::Acquire);
        if total + n > self.shared.max_buffered {
            // The cut session's bytes return as soon as its relay discards them; the line
            // that found the budget full is let through meanwhile, unless it is the cut one's.
            let largest = s
                .map
                .iter()
                .max_by_key(|(_, slot)| slot.state.buffered.load(Ordering::Acquire))
                .map(|(id, slot)| (id.clone(), slot.state.buffered.load(Ordering::Acquire)));
            if let Some((victim, bytes)) = largest {
                let cut = Cut {
                    buffered: bytes,
                    limit: self.shared.max_buffered,
                    total: true,
                };
                self.cut(&mut s, &victim, cut);
                if victim == sid {
                    return;
                }
            }
        }
        let Some(slot) = s.map.get(sid) else { return };
        slot.state.buffered.fetch_add(n, Ordering::AcqRel);
        self.shared.buffered.fetch_add(n, Ordering::AcqRel);
        let held = Held {
            bytes: n,
            session: slot.state.clone(),
            total: self.shared.buffered.clone(),
        };
        if slot.tx.send(PluginMsg::Line { kind, line, held }).is_err() {
            tracing::debug!(session_id = sid, "session gone; output dropped");
        }
    }

    /// Ends `sid`'s relay with `why`; its further output is dropped.
    fn cut(&self, s: &mut Sessions, sid: &str, why: Cut) {
        let Some(slot) = s.map.remove(sid) else {
            return;
        };
        tracing::warn!(
            pid = self.pid,
            session_id = sid,
            buffered = why.buffered,
            limit = why.limit,
            process_wide = why.total,
            "the session's caller is not reading: session cut at its buffer budget"
        );
        *slot.state.cut.lock().expect("cut lock") = Some(why);
        slot.state.cut_notify.notify_one();
        // Bounded: a plugin that never finishes its cut sessions cannot grow this for ever
        // (forgetting them only makes their late output logged as unexpected).
        if s.cut.len() >= MAX_CUT_REMEMBERED {
            s.cut.clear();
        }
        s.cut.insert(sid.to_owned(), 0);
    }

    fn undeliverable(&self, s: &Sessions, sid: &str) {
        if !s.cut.contains_key(sid) {
            tracing::warn!(
                pid = self.pid,
                session_id = sid,
                "output for a session not in flight dropped"
            );
        }
    }

    fn deliver(&self, sid: &str, msg: PluginMsg) {
        let s = self.sessions.lock().expect("sessions lock");
        match s.map.get(sid) {
            Some(slot) => {
                if slot.tx.send(msg).is_err() {
                    tracing::debug!(session_id = sid, "session gone; output dropped");
                }
            }
            None => self.undeliverable(&s, sid),
        }
    }

    /// Attributes a line that breaks the protocol: to `sid` when known, else to the only
    /// session in flight; with several in flight it cannot be attributed and is logged.
    fn protocol_error(&self, sid: Option<&str>, line: &[u8]) {
        let snippet = self.shared.redactor.redact(&snippet(line));
        let target = sid.map(str::to_owned).or_else(|| {
            let s = self.sessions.lock().expect("sessions lock");
            (s.map.len() == 1)
                .then(|| s.map.keys().next().cloned())
                .flatten()
        });
        match target {
            Some(sid) => {
                tracing::warn!(pid = self.pid, session_id = %sid, output = %snippet, "plugin broke the stdio protocol");
                self.deliver(&sid, PluginMsg::Protocol(snippet));
            }
            None => {
                tracing::warn!(pid = self.pid, output = %snippet, "plugin wrote a line that is not the Dify protocol")
            }
        }
    }

    fn route_too_long(&self, prefix: &[u8], len: usize) {
        let target = find_session_id(prefix)
            .filter(|s| self.has_session(s))
            .or_else(|| {
                let s = self.sessions.lock().expect("sessions lock");
                (s.map.len() == 1)
                    .then(|| s.map.keys().next().cloned())
                    .flatten()
            });
        tracing::warn!(pid = self.pid, bytes = len, limit = self.shared.max_line, session_id = ?target, "plugin output line over the limit dropped");
        if let Some(sid) = target {
            self.deliver(&sid, PluginMsg::TooLarge(len));
        }
    }

    fn log_plugin_message(&self, data: Option<&RawValue>) {
        #[derive(Deserialize)]
        struct LogData<'a> {
            #[serde(borrow)]
            level: Option<Cow<'a, str>>,
            #[serde(borrow)]
            message: Option<Cow<'a, str>>,
        }
        let Some(d) = data.and_then(|d| serde_json::from_str::<LogData<'_>>(d.get()).ok()) else {
            return;
        };
        let message = self
            .shared
            .redactor
            .redact(d.message.as_deref().unwrap_or_default());
        match d.level.as_deref().map(str::to_ascii_uppercase).as_deref() {
            Some("ERROR" | "CRITICAL" | "FATAL") => {
                tracing::error!(pid = self.pid, plugin_log = %message)
            }
            Some("WARNING" | "WARN") => tracing::warn!(pid = self.pid, plugin_log = %message),
            Some("DEBUG") => tracing::debug!(pid = self.pid, plugin_log = %message),
            _ => tracing::info!(pid = self.pid, plugin_log = %message),
        }
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(borrow, default)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    session_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct SessionHead<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

/// Finds `"session_id": "<id>"` in the first bytes of a line too long to parse.
fn find_session_id(prefix: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(prefix);
    let rest = &text[text.find("\"session_id\"")? + "\"session_id\"".len()..];
    let rest = rest
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let id = &rest[..rest.find('"')?];
    (!id.is_empty()).then(|| id.to_owned())
}

fn snippet(line: &[u8]) -> String {
    const MAX: usize = 200;
    let text = String::from_utf8_lossy(&line[..line.len().min(MAX)]);
    if line.len() > MAX {
        format!("{text}… ({} bytes)", line.len())
    } else {
        text.into_owned()
    }
}

fn describe(status: std::io::Result<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => {
                let name = nix::sys::signal::Signal::try_from(sig).map_or("?", |s| s.as_str());
                format!("killed by signal {sig} ({name})")
            }
            _ => "exited".into(),
        },
        Err(e) => format!("exit status unknown ({e})"),
    }
}

/// The last lines of stderr, bounded in lines and bytes.
#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    bytes: usize,
}

impl Tail {
    const MAX_LINES: usize = 40;
    const MAX_BYTES: usize = 4096;

    fn push(&mut self, line: String) {
        self.bytes += line.len();
        self.lines.push_back(line);
        while self.lines.len() > Self::MAX_LINES
            || (self.bytes > Self::MAX_BYTES && self.lines.len() > 1)
        {
            let old = self.lines.pop_front().expect("non-empty");
            self.bytes -= old.len();
        }
    }

    fn text(&self) -> String {
        let text = self
            .lines
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n");
        if text.len() > Self::MAX_BYTES {
            let cut = text.ceil_char_boundary(text.len() - Self::MAX_BYTES);
            text[cut..].to_owned()
        } else {
            text
        }
    }
}

async fn drain_stderr(
    stderr: tokio::process::ChildStderr,
    pid: u32,
    tail: Arc<Mutex<Tail>>,
    redactor: Arc<Redactor>,
) {
    let mut lines = LineReader::new(stderr, 64 * 1024);
    while let Ok(Some(line)) = lines.next_line().await {
        let text = match line {
            Line::Full(b) => String::from_utf8_lossy(&b).into_owned(),
            Line::TooLong { prefix, len } => {
                format!("{}… ({len} bytes)", String::from_utf8_lossy(&prefix))
            }
        };
        let text = redactor.redact(text.trim_end());
        if text.is_empty() {
            continue;
        }
        tracing::info!(pid, stderr = %text, "plugin stderr");
        tail.lock().expect("tail lock").push(text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_session_ids_in_prefixes() {
        assert_eq!(
            find_session_id(br#"{"event": "session", "session_id": "abc", "data": {"#).as_deref(),
            Some("abc")
        );
        assert_eq!(
            find_session_id(br#"{"session_id":"x"}"#).as_deref(),
            Some("x")
        );
        assert_eq!(find_session_id(br#"{"session_id": null}"#), None);
        assert_eq!(
            find_session_id(br#"{"event": "session", "session_id": "ab"#),
            None
        );
    }

    #[test]
    fn tail_keeps_the_end() {
        let mut t = Tail::default();
        for i in 0..100 {
            t.push(format!("line {i}"));
        }
        let text = t.text();
        assert!(
            text.ends_with("line 99") && !text.contains("line 10\n"),
            "{text}"
        );
        t.push("x".repeat(10_000));
        assert!(t.text().len() <= Tail::MAX_BYTES);
    }
}
