//! Keeps one plugin process in service: starts it, waits for it to be ready, restarts it when it
//! dies (with backoff when it keeps dying), and replaces it when an invocation hangs.
//!
//! A replaced process is retired rather than killed outright, so sessions still running on it
//! finish; it is killed when the last one ends or the last of their deadlines passes. Stopping
//! ends every process it started, retired ones included, with their process groups.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use crate::Error;
use crate::process::{PluginProcess, Shared, Spec, State};

/// A process that lived at least this long is healthy: its death restarts it at once.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// Longest wait between restarts of a plugin that keeps dying.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What `/health` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Whether invocations can run now.
    pub ready: bool,
    /// Why not, when not ready.
    pub reason: Option<String>,
    /// The current process's generation.
    pub generation: u64,
}

/// Owns the plugin process.
#[derive(Debug)]
pub struct Supervisor {
    spec: Spec,
    shared: Arc<Shared>,
    ready_timeout: Duration,
    current: Mutex<Arc<PluginProcess>>,
    /// Every process started and not yet reaped (retired ones too), for shutdown.
    all: Mutex<Vec<std::sync::Weak<PluginProcess>>>,
    changed: watch::Sender<u64>,
    generation: AtomicU64,
    exits: mpsc::UnboundedSender<u64>,
    stopping: AtomicBool,
    /// Why the last process failed to start, kept while a replacement starts.
    last_failure: Mutex<Option<String>>,
}

impl Supervisor {
    /// What makes the plugin's backwards invocations (it keeps the sessions' relay claims).
    pub fn backwards(&self) -> &Arc<crate::backwards::Backwards> {
        &self.shared.backwards
    }

    /// Spawns the plugin and starts supervising it. Fails only when it cannot be spawned at all.
    pub fn start(
        spec: Spec,
        shared: Arc<Shared>,
        ready_timeout: Duration,
    ) -> Result<Arc<Self>, Error> {
        let (exits, exits_rx) = mpsc::unbounded_channel();
        let first = PluginProcess::spawn(&spec, 1, shared.clone(), exits.clone())?;
        let (changed, _) = watch::channel(1);
        let this = Arc::new(Self {
            spec,
            shared,
            ready_timeout,
            current: Mutex::new(first.clone()),
            all: Mutex::new(vec![Arc::downgrade(&first)]),
            changed,
            generation: AtomicU64::new(1),
            exits,
            stopping: AtomicBool::new(false),
            last_failure: Mutex::new(None),
        });
        this.watch_start(&first);
        tokio::spawn(Self::restart_loop(Arc::downgrade(&this), exits_rx));
        Ok(this)
    }

    /// The process in service.
    pub fn current(&self) -> Arc<PluginProcess> {
        self.current.lock().expect("current lock").clone()
    }

    /// Waits (at most `timeout`) for a ready process. A plugin that failed to start answers at
    /// once with the reason.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Arc<PluginProcess>, Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = self.changed.subscribe();
        loop {
            let process = self.current();
            changed.borrow_and_update();
            let mut state = process.state();
            let outcome = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    s = state.wait_for(|s| *s != State::Starting) => Some(s.map(|s| s.clone()).unwrap_or(State::Exited)),
                    _ = changed.changed() => None,
                }
            })
            .await;
            match outcome {
                Err(_) => {
                    return Err(Error::NotReady(format!(
                        "the plugin did not become ready within {} s",
                        timeout.as_secs()
                    )));
                }
                Ok(None) => continue,
                Ok(Some(State::Ready { .. })) => return Ok(process),
                Ok(Some(State::Failed(why))) => return Err(Error::NotReady(why)),
                Ok(Some(_)) => {
                    // Exited: a replacement is on its way.
                    if self.stopping.load(Ordering::Acquire) {
                        return Err(Error::NotReady("the runtime is shutting down".into()));
                    }
                    if tokio::time::timeout_at(deadline, changed.changed())
                        .await
                        .is_err()
                    {
                        return Err(Error::NotReady(
                            "the plugin exited and has not been restarted yet".into(),
                        ));
                    }
                }
            }
        }
    }

    /// The state `/health` reports.
    pub fn health(&self) -> Health {
        let process = self.current();
        let state = process.state().borrow().clone();
        let (ready, reason) = match state {
            State::Ready { .. } => (true, None),
            State::Starting => match self.last_failure.lock().expect("failure lock").clone() {
                Some(why) => (
                    false,
                    Some(format!(
                        "the plugin is being restarted after it failed to start: {why}"
                    )),
                ),
                None => (false, Some("the plugin is starting".to_owned())),
            },
            State::Failed(why) => (false, Some(why)),
            State::Exited => (
                false,
                Some("the plugin exited and is being restarted".to_owned()),
            ),
        };
        Health {
            ready,
            reason,
            generation: process.generation,
        }
    }

    /// Replaces `process` (e.g. it hung) with a fresh one; it is killed once its sessions end.
    pub fn recycle(&self, process: &Arc<PluginProcess>, why: &str) {
        tracing::warn!(
            pid = process.pid,
            generation = process.generation,
            why,
            "recycling the plugin process"
        );
        if self.current().generation == process.generation
            && let Err(e) = self.respawn()
        {
            tracing::error!(error = %e, "could not start a replacement plugin process");
        }
        process.retire();
    }

    /// Stops every plugin process it started (retired ones too): SIGTERM to each process
    /// group, then SIGKILL after `grace`.
    pub async fn shutdown(&self, grace: Duration) {
        self.stopping.store(true, Ordering::Release);
        let all: Vec<Arc<PluginProcess>> = self
            .all
            .lock()
            .expect("all lock")
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        futures_util::future::join_all(all.iter().map(|p| p.terminate(grace))).await;
    }

    fn respawn(&self) -> Result<Arc<PluginProcess>, Error> {
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let process = PluginProcess::spawn(
            &self.spec,
            generation,
            self.shared.clone(),
            self.exits.clone(),
        )?;
        *self.current.lock().expect("current lock") = process.clone();
        {
            let mut all = self.all.lock().expect("all lock");
            all.retain(|p| p.upgrade().is_some_and(|p| !p.exited()));
            all.push(Arc::downgrade(&process));
        }
        self.changed.send_replace(generation);
        self.watch_start(&process);
        Ok(process)
    }

    /// Fails a process that sends no heartbeat within the ready timeout.
    fn watch_start(&self, process: &Arc<PluginProcess>) {
        let process = process.clone();
        let timeout = self.ready_timeout;
        tokio::spawn(async move {
            let mut state = process.state();
            if tokio::time::timeout(timeout, state.wait_for(|s| *s != State::Starting))
                .await
                .is_err()
            {
                process.fail(format!(
                    "the plugin sent no heartbeat within {} s (SRI_READY_TIMEOUT_SECS)",
                    timeout.as_secs()
                ));
            }
        });
    }

    async fn restart_loop(this: std::sync::Weak<Self>, mut exits: mpsc::UnboundedReceiver<u64>) {
        let mut failures: u32 = 0;
        let mut spawn_failed = false;
        while let Some(generation) = exits.recv().await {
            let Some(sup) = this.upgrade() else { return };
            let current = sup.current();
            if current.generation != generation || sup.stopping.load(Ordering::Acquire) {
                continue;
            }
            if let State::Failed(why) = &*current.state().borrow() {
                *sup.last_failure.lock().expect("failure lock") = Some(why.clone());
            }
            let healthy = !spawn_failed
                && current.spawned_at.elapsed() >= HEALTHY_RUN
                && !matches!(*current.state().borrow(), State::Failed(_));
            failures = if healthy {
                0
            } else {
                failures.saturating_add(1)
            };
            drop(current);
            drop(sup);
            if failures > 0 {
                let delay = Duration::from_millis(250)
                    .saturating_mul(1 << (failures - 1).min(10))
                    .min(MAX_BACKOFF);
                tracing::info!(
                    delay_ms = delay.as_millis() as u64,
                    failures,
                    "restarting the plugin after a delay"
                );
                tokio::time::sleep(delay).await;
            }
            let Some(sup) = this.upgrade() else { return };
            if sup.stopping.load(Ordering::Acquire) || sup.current().generation != generation {
                continue;
            }
            let started = Instant::now();
            let outcome = sup.respawn();
            spawn_failed = outcome.is_err();
            match outcome {
                Ok(p) => tracing::info!(
                    pid = p.pid,
                    generation = p.generation,
                    spawn_ms = started.elapsed().as_millis() as u64,
                    "plugin restarted"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "could not restart the plugin; retrying");
                    let _ = sup.exits.send(generation);
                }
            }
        }
    }
}
