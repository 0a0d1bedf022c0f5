//! Which function and version a call goes to, from what AWS says rather than from what this
//! replica last did: another connector replica behind the same load balancer may have deployed
//! a version this one has never seen, or moved `live` since.
//!
//! A deployment is always callable by its exact version (versions are immutable and were read
//! back with their checksum), so that is the fallback for everything not confirmed. The
//! Function URL follows `live`, which any replica may move, so it is used only while AWS said
//! within `SRI_LAMBDA_ROUTE_TTL_MS` that `live` runs exactly the deployment's version. A call
//! for a deployment this replica does not know re-reads its function from AWS (rate limited).

use aws_sdk_lambda::types::FunctionConfiguration;
use std::time::{Duration, Instant};

use super::errors::{aws_err, is_not_found};
use super::naming::{deployment_name, function_of, parse_description};
use super::{Deployed, LIVE_ALIAS, LambdaBackend, MANAGED_BY, TAG_MANAGED_BY, Transport};
use crate::Error;
use crate::backend::Function;
use crate::transport::Target;

/// How often calls for one unknown deployment name may make us look it up in AWS.
const MISS_INTERVAL: Duration = Duration::from_secs(1);
/// How many lookups of unknown names may happen per [`MISS_INTERVAL`] in all (the gateway is
/// reachable without the API key, so junk names must not turn into unbounded AWS calls).
const MISS_BUDGET: u32 = 20;
/// How many names the limiter remembers (then it forgets them all).
const MISS_MEMORY: usize = 4096;

/// Rate limit of lookups for deployment names this replica does not know.
#[derive(Debug, Default)]
pub(super) struct Misses {
    by_name: std::collections::HashMap<String, Instant>,
    window: Option<Instant>,
    in_window: u32,
}

impl Misses {
    /// Whether `name` may be looked up now (and counts it if so).
    fn allow(&mut self, name: &str, now: Instant) -> bool {
        if self
            .by_name
            .get(name)
            .is_some_and(|t| now.saturating_duration_since(*t) < MISS_INTERVAL)
        {
            return false;
        }
        match self.window {
            Some(w) if now.saturating_duration_since(w) < MISS_INTERVAL => {
                if self.in_window >= MISS_BUDGET {
                    return false;
                }
                self.in_window += 1;
            }
            _ => {
                self.window = Some(now);
                self.in_window = 1;
            }
        }
        if self.by_name.len() >= MISS_MEMORY {
            self.by_name.clear();
        }
        self.by_name.insert(name.to_owned(), now);
        true
    }
}
/// Longest a call waits for AWS to confirm `live` before it goes by exact version instead.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);

/// What AWS last said about one Lambda function's `live` alias, and when it was asked.
#[derive(Debug, Clone)]
pub(super) struct LiveState {
    /// The version `live` points at.
    pub(super) version: Option<String>,
    /// The Function URL on `live`.
    pub(super) url: Option<String>,
    /// When AWS was asked (before the request went out, so the age is never understated).
    pub(super) asked: Instant,
}

impl LiveState {
    fn fresh(&self, ttl: Duration) -> bool {
        self.asked.elapsed() <= ttl
    }
}

impl LambdaBackend {
    /// Re-reads one function's versions, alias and URL into memory; returns the versions.
    pub(super) async fn refresh(
        &self,
        aws_name: &str,
    ) -> Result<Vec<FunctionConfiguration>, Error> {
        let asked = Instant::now();
        let versions = self.versions(aws_name).await?;
        let live_version = match self
            .lambda
            .get_alias()
            .function_name(aws_name)
            .name(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(a) => a.function_version().map(str::to_owned),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => None,
            Err(e) => return Err(aws_err(format!("GetAlias {aws_name}:{LIVE_ALIAS}"), &e)),
        };
        let url = self.alias_url(aws_name).await?;
        let mut deployed = self.deployed.lock().expect("lock");
        // Versions only grow: one numbered above everything listed was published after the
        // listing (by a deploy on this replica meanwhile) and stays.
        let listed_max = versions
            .iter()
            .filter_map(|v| v.version()?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        deployed.retain(|_, d| {
            d.aws_name != aws_name || d.version.parse::<u64>().unwrap_or(0) > listed_max
        });
        for v in &versions {
            let (Some(version), Some((checksum, identifier))) =
                (v.version(), v.description().and_then(parse_description))
            else {
                continue;
            };
            if !is_checksum(&checksum) {
                continue;
            }
            let name = deployment_name(aws_name, &checksum);
            // A checksum republished (new signing keys) has several versions: the newest counts.
            let newer = |d: &Deployed| {
                version.parse::<u64>().unwrap_or(0) > d.version.parse::<u64>().unwrap_or(0)
            };
            if deployed.get(&name).is_some_and(|d| !newer(d)) {
                continue;
            }
            deployed.insert(
                name.clone(),
                Deployed {
                    function: Function {
                        name,
                        identifier,
                        checksum,
                    },
                    aws_name: aws_name.to_owned(),
                    version: version.to_owned(),
                },
            );
        }
        drop(deployed);
        self.remember_live(
            aws_name,
            LiveState {
                version: live_version,
                url,
                asked,
            },
        );
        Ok(versions)
    }

    /// Keeps `state` unless what is known was asked later (an answer that took longer must not
    /// overwrite a newer one, e.g. the alias this replica just moved).
    pub(super) fn remember_live(&self, aws_name: &str, state: LiveState) {
        keep_newer(&mut self.live.lock().expect("lock"), aws_name, state);
    }

    fn ttl(&self) -> Duration {
        Duration::from_millis(self.options.route_ttl_ms)
    }

    pub(super) fn known(&self, name: &str) -> Option<Deployed> {
        self.deployed.lock().expect("lock").get(name).cloned()
    }

    /// Where a call for `name` goes with what this replica knows now (no AWS call): by exact
    /// version unless `live` was confirmed within the TTL.
    pub(super) fn route_known(&self, name: &str) -> Option<Target> {
        let d = self.known(name)?;
        let live = self
            .live
            .lock()
            .expect("lock")
            .get(&d.aws_name)
            .filter(|l| l.fresh(self.ttl()))
            .cloned();
        Some(route(
            self.options.transport,
            &d,
            live.as_ref(),
            &self.region,
        ))
    }

    /// Where a call for `name` goes, asking AWS what this replica does not know or no longer
    /// trusts: an unknown deployment re-reads its function, and a Function URL call first
    /// confirms that `live` still runs the deployment's version.
    pub(super) async fn resolve(&self, name: &str, within: Duration) -> Option<Target> {
        let d = match self.known(name) {
            Some(d) => d,
            None => {
                self.refresh_unknown(name).await;
                self.known(name)?
            }
        };
        if self.options.transport != Transport::FunctionUrl {
            return Some(route(self.options.transport, &d, None, &self.region));
        }
        let wait = within.clamp(Duration::from_millis(100), CONFIRM_TIMEOUT);
        let live = match tokio::time::timeout(wait, self.confirm_live(&d.aws_name)).await {
            Ok(Ok(live)) => Some(live),
            Ok(Err(e)) => {
                tracing::warn!(function = %d.aws_name, error = %e, "cannot confirm the live alias; calling the exact version");
                None
            }
            Err(_) => {
                tracing::warn!(function = %d.aws_name, "confirming the live alias timed out; calling the exact version");
                None
            }
        };
        Some(route(
            self.options.transport,
            &d,
            live.as_ref(),
            &self.region,
        ))
    }

    /// What `live` runs, from memory when AWS said so within the TTL, else asked again (one
    /// request per function at a time; calls arriving meanwhile share its answer).
    async fn confirm_live(&self, aws_name: &str) -> Result<LiveState, Error> {
        let ttl = self.ttl();
        let cached = |this: &Self| {
            this.live
                .lock()
                .expect("lock")
                .get(aws_name)
                .filter(|l| l.fresh(ttl))
                .cloned()
        };
        if let Some(l) = cached(self) {
            return Ok(l);
        }
        let gate = self
            .refreshing
            .lock()
            .expect("lock")
            .entry(aws_name.to_owned())
            .or_default()
            .clone();
        let started = Instant::now();
        let _turn = gate.lock().await;
        // Someone asked while we waited: their answer is as new as ours would be.
        if let Some(l) = self
            .live
            .lock()
            .expect("lock")
            .get(aws_name)
            .filter(|l| l.asked >= started)
            .cloned()
        {
            return Ok(l);
        }
        let asked = Instant::now();
        let known_url = self
            .live
            .lock()
            .expect("lock")
            .get(aws_name)
            .and_then(|l| l.url.clone());
        // A failure is remembered as "not confirmed" for the TTL too, so a throttled or
        // failing AWS is not asked again by every call (they go by exact version meanwhile).
        let unconfirmed = |url: Option<String>| LiveState {
            version: None,
            url,
            asked,
        };
        // GetFunction on the alias names the version it points at, and (unlike GetAlias) is
        // outside Lambda's 15 requests/s control-plane quota.
        let version = match self
            .lambda
            .get_function()
            .function_name(aws_name)
            .qualifier(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(f) => f
                .configuration()
                .and_then(|c| c.version())
                .map(str::to_owned),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => None,
            Err(e) => {
                self.remember_live(aws_name, unconfirmed(known_url));
                return Err(aws_err(format!("GetFunction {aws_name}:{LIVE_ALIAS}"), &e));
            }
        };
        // The URL belongs to the alias, not to a version: it only changes when the function is
        // made anew, so it is read once.
        let url = match known_url {
            Some(u) => Some(u),
            None => match self.alias_url(aws_name).await {
                Ok(url) => url,
                Err(e) => {
                    self.remember_live(aws_name, unconfirmed(None));
                    return Err(e);
                }
            },
        };
        let state = LiveState {
            version,
            url,
            asked,
        };
        self.remember_live(aws_name, state.clone());
        Ok(state)
    }

    /// The Function URL of the `live` alias, `None` when it has none.
    async fn alias_url(&self, aws_name: &str) -> Result<Option<String>, Error> {
        match self
            .lambda
            .get_function_url_config()
            .function_name(aws_name)
            .qualifier(LIVE_ALIAS)
            .send()
            .await
        {
            Ok(u) => Ok(Some(u.function_url().to_owned())),
            Err(e) if e.as_service_error().is_some_and(is_not_found) => Ok(None),
            Err(e) => Err(aws_err(format!("GetFunctionUrlConfig {aws_name}"), &e)),
        }
    }

    /// A call named a deployment this replica does not know: another replica may have made
    /// it. Re-reads its function from AWS when the name is one of ours and the function
    /// carries our ownership tag, at most once per [`MISS_INTERVAL`] per function.
    async fn refresh_unknown(&self, name: &str) {
        let Some(aws_name) = function_of(name) else {
            return;
        };
        if !aws_name.starts_with(&format!("{}-", self.options.prefix)) {
            return;
        }
        if !self
            .missed
            .lock()
            .expect("lock")
            .allow(name, Instant::now())
        {
            return;
        }
        let owned = match self
            .lambda
            .get_function()
            .function_name(aws_name)
            .send()
            .await
        {
            Ok(f) => f
                .tags()
                .and_then(|t| t.get(TAG_MANAGED_BY))
                .is_some_and(|v| v == MANAGED_BY),
            Err(e) => {
                if !e.as_service_error().is_some_and(is_not_found) {
                    tracing::warn!(function = aws_name, error = %aws_err(format!("GetFunction {aws_name}"), &e), "cannot look up an unknown deployment");
                }
                return;
            }
        };
        if !owned {
            return;
        }
        if let Err(e) = self.refresh(aws_name).await {
            tracing::warn!(function = aws_name, error = %e, "cannot look up an unknown deployment");
        }
    }
}

/// Stores `state` for `aws_name` unless the known state was asked later.
fn keep_newer(
    live: &mut std::collections::HashMap<String, LiveState>,
    aws_name: &str,
    state: LiveState,
) {
    match live.get(aws_name) {
        Some(known) if known.asked > state.asked => {}
        _ => {
            live.insert(aws_name.to_owned(), state);
        }
    }
}

/// A full sha256 checksum (what version descriptions carry; anything else is not ours).
fn is_checksum(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How one deployment is called: through the Function URL when that is the configured transport
/// and `live` (as confirmed recently; the caller passes `None` otherwise) runs exactly its
/// version; anything else (an older version the daemon still has installed, `live` not
/// confirmed, or `invoke-stream`) by its exact version with `InvokeWithResponseStream` — a
/// Function URL can only point at an alias, and `live` may already run other code.
pub(super) fn route(
    transport: Transport,
    d: &Deployed,
    live: Option<&LiveState>,
    region: &str,
) -> Target {
    match (transport, live) {
        (
            Transport::FunctionUrl,
            Some(LiveState {
                version: Some(v),
                url: Some(url),
                ..
            }),
        ) if *v == d.version => Target::FunctionUrl {
            url: url.clone(),
            region: region.to_owned(),
            function: d.aws_name.clone(),
        },
        _ => Target::InvokeStream {
            function: d.aws_name.clone(),
            qualifier: d.version.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_confirmed_live_version_goes_through_the_function_url() {
        let deployed = |version: &str| Deployed {
            function: Function {
                name: format!("sri-a-b-{version}"),
                identifier: "a/b:1@x".into(),
                checksum: "x".into(),
            },
            aws_name: "sri-a-b".into(),
            version: version.into(),
        };
        let live = LiveState {
            version: Some("2".into()),
            url: Some("https://u.lambda-url.eu-west-1.on.aws/".into()),
            asked: Instant::now(),
        };
        let url = Target::FunctionUrl {
            url: "https://u.lambda-url.eu-west-1.on.aws/".into(),
            region: "eu-west-1".into(),
            function: "sri-a-b".into(),
        };
        let by_version = |v: &str| Target::InvokeStream {
            function: "sri-a-b".into(),
            qualifier: v.into(),
        };
        let t = Transport::FunctionUrl;
        assert_eq!(route(t, &deployed("2"), Some(&live), "eu-west-1"), url);
        assert_eq!(
            route(t, &deployed("1"), Some(&live), "eu-west-1"),
            by_version("1")
        );
        let no_url = LiveState {
            url: None,
            ..live.clone()
        };
        assert_eq!(
            route(t, &deployed("2"), Some(&no_url), "eu-west-1"),
            by_version("2")
        );
        assert_eq!(route(t, &deployed("2"), None, "eu-west-1"), by_version("2"));
        let t = Transport::InvokeStream;
        assert_eq!(
            route(t, &deployed("2"), Some(&live), "eu-west-1"),
            by_version("2")
        );
    }

    #[test]
    fn what_aws_said_is_trusted_for_the_ttl_only() {
        let asked = Instant::now() - Duration::from_millis(1500);
        let l = LiveState {
            version: Some("2".into()),
            url: None,
            asked,
        };
        assert!(l.fresh(Duration::from_secs(2)));
        assert!(!l.fresh(Duration::from_secs(1)));
        assert!(!l.fresh(Duration::ZERO));
    }

    #[test]
    fn a_slow_answer_never_overwrites_a_newer_one() {
        let t0 = Instant::now();
        let state = |v: &str, asked| LiveState {
            version: Some(v.into()),
            url: None,
            asked,
        };
        let mut live = std::collections::HashMap::new();
        keep_newer(&mut live, "f", state("2", t0 + Duration::from_millis(5)));
        keep_newer(&mut live, "f", state("1", t0));
        assert_eq!(live["f"].version.as_deref(), Some("2"));
        keep_newer(&mut live, "f", state("3", t0 + Duration::from_millis(9)));
        assert_eq!(live["f"].version.as_deref(), Some("3"));
    }

    #[test]
    fn lookups_of_unknown_names_are_rate_limited() {
        let mut m = Misses::default();
        let t0 = Instant::now();
        assert!(m.allow("a", t0));
        assert!(
            !m.allow("a", t0 + Duration::from_millis(10)),
            "same name again"
        );
        assert!(m.allow("a", t0 + MISS_INTERVAL), "again after the interval");
        let mut m = Misses::default();
        let allowed = (0..100).filter(|i| m.allow(&format!("n{i}"), t0)).count();
        assert_eq!(
            allowed, MISS_BUDGET as usize,
            "the budget bounds distinct names"
        );
        assert!(m.allow("later", t0 + MISS_INTERVAL));
    }

    #[test]
    fn only_full_checksums_name_deployments() {
        assert!(is_checksum(&"0a".repeat(32)));
        assert!(!is_checksum(&"0A".repeat(32)));
        assert!(!is_checksum("abc"));
        assert!(!is_checksum(&"0a".repeat(33)));
    }
}
