//! The sessions in flight through this connector's gateway, as the relay checks them.
//!
//! The gateway registers each session it forwards (before it calls the function, which may
//! call back at once) and the registration ends when the daemon's stream ends. A session stays
//! known for the grace period after that, then as finished until its claim would have expired,
//! so that on this replica a finished session is refused even with a claim still valid. Memory
//! is bounded: sessions in flight are bounded by the gateway's connections, finished ones are
//! forgotten oldest first past [`MAX_FINISHED`] (the claim then still bounds them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Finished sessions remembered at most (≈ 100 bytes each).
pub const MAX_FINISHED: usize = 262_144;

/// What this replica knows of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// In flight, or finished within the grace period, for this function.
    Live(String),
    /// Finished longer than the grace period ago.
    Finished,
    /// Never seen here (or forgotten): only a claim can vouch for it.
    Unknown,
}

#[derive(Debug)]
struct Entry {
    function: String,
    in_flight: u32,
    finished: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<String, Entry>,
    last_sweep: Option<Instant>,
}

/// The registry.
#[derive(Debug)]
pub struct Sessions {
    grace: Duration,
    remember: Duration,
    inner: Mutex<Inner>,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(crate::relay::DEFAULT_GRACE_SECS),
            Duration::from_secs(crate::relay::DEFAULT_SESSION_TTL_SECS),
        )
    }
}

/// Holds a session registered; dropping it marks the session finished.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    /// `None` when the session belongs to another function (nothing was registered).
    session: Option<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let Some(session) = &self.session else { return };
        let mut inner = self.sessions.inner.lock().expect("sessions lock");
        if let Some(e) = inner.map.get_mut(session) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if e.in_flight == 0 {
                e.finished = Some(Instant::now());
            }
        }
    }
}

impl Sessions {
    /// A registry keeping finished sessions live for `grace`, and known as finished for
    /// `remember` (the claims' lifetime).
    pub fn new(grace: Duration, remember: Duration) -> Self {
        Self {
            grace,
            remember: remember.max(grace),
            inner: Mutex::default(),
        }
    }

    /// How long a finished session's calls are still accepted.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// How long a finished session is remembered: the lifetime of the claims issued for it.
    pub fn ttl(&self) -> Duration {
        self.remember
    }

    /// Registers `session` of `function` as in flight until the registration is dropped.
    pub fn register(self: &Arc<Self>, session: &str, function: &str) -> Registration {
        let now = Instant::now();
        let mut inner = self.inner.lock().expect("sessions lock");
        self.sweep(&mut inner, now);
        let e = inner.map.entry(session.to_owned()).or_insert(Entry {
            function: function.to_owned(),
            in_flight: 0,
            finished: None,
        });
        // The daemon's session ids are unique; a reuse by another function keeps the first
        // owner (the relay refuses the other's calls rather than switching owners).
        if e.function == function {
            e.in_flight += 1;
            e.finished = None;
        }
        let registered = e.function == function;
        drop(inner);
        Registration {
            sessions: self.clone(),
            session: registered.then(|| session.to_owned()),
        }
    }

    /// What is known of `session` now.
    pub fn lookup(&self, session: &str) -> Known {
        let inner = self.inner.lock().expect("sessions lock");
        match inner.map.get(session) {
            None => Known::Unknown,
            Some(e) => match e.finished {
                Some(at) if at.elapsed() > self.grace => Known::Finished,
                _ => Known::Live(e.function.clone()),
            },
        }
    }

    /// Forgets finished sessions whose claims have expired (at most once a second), and the
    /// oldest finished ones past [`MAX_FINISHED`].
    fn sweep(&self, inner: &mut Inner, now: Instant) {
        if inner
            .last_sweep
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
            && inner.map.len() < MAX_FINISHED
        {
            return;
        }
        inner.last_sweep = Some(now);
        let remember = self.remember;
        inner.map.retain(|_, e| {
            e.finished
                .is_none_or(|at| now.duration_since(at) <= remember)
        });
        if inner.map.len() >= MAX_FINISHED {
            let grace = self.grace;
            inner
                .map
                .retain(|_, e| e.finished.is_none_or(|at| now.duration_since(at) <= grace));
        }
    }

    /// Sessions known now (in flight or finished), for tests and metrics.
    pub fn len(&self) -> usize {
        self.inner.lock().expect("sessions lock").map.len()
    }

    /// Whether no session is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_live_while_registered_and_for_the_grace_period() {
        let s = Arc::new(Sessions::new(
            Duration::from_millis(50),
            Duration::from_secs(60),
        ));
        assert_eq!(s.lookup("a"), Known::Unknown);
        let r = s.register("a", "fn-a");
        let r2 = s.register("a", "fn-a");
        assert_eq!(s.lookup("a"), Known::Live("fn-a".into()));
        // Another function cannot take the session over.
        drop(s.register("a", "fn-b"));
        assert_eq!(s.lookup("a"), Known::Live("fn-a".into()));
        drop(r);
        assert_eq!(s.lookup("a"), Known::Live("fn-a".into()));
        drop(r2);
        assert_eq!(s.lookup("a"), Known::Live("fn-a".into()), "within grace");
        let deadline = Instant::now() + Duration::from_secs(5);
        while s.lookup("a") != Known::Finished {
            assert!(Instant::now() < deadline, "never finished");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn finished_sessions_are_forgotten_after_their_claims_expire() {
        let s = Arc::new(Sessions::new(Duration::ZERO, Duration::ZERO));
        drop(s.register("a", "f"));
        std::thread::sleep(Duration::from_millis(5));
        s.inner.lock().unwrap().last_sweep = None;
        let _b = s.register("b", "f");
        assert_eq!(s.lookup("a"), Known::Unknown);
        assert_eq!(s.len(), 1);
    }
}
