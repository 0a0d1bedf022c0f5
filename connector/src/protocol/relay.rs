//! The wire between a function's bootstrap and the connector's relay (backwards invocations).
//!
//! A plugin's backwards call (`session`/`invoke`) is POSTed by its bootstrap to
//! `{SRI_RELAY_URL}`[`TRANSACTION_PATH`] — the daemon's own path, so the relay and the daemon
//! take the same request — signed with SRI v2 (action [`ACTION`], bound to the function's name,
//! the session id and the body), naming the function in [`HEADER_FUNCTION`] and carrying the
//! gateway's session claim ([`HEADER_CLAIM`]) back unchanged. Both ends use these names, so
//! they exist once.

/// The daemon's (and the relay's) backwards-invocation path.
pub const TRANSACTION_PATH: &str = "/backwards-invocation/transaction";
/// The `action` an SRI signature of a backwards call binds.
pub const ACTION: &str = "backwards_invocation";
/// The function a backwards call comes from (the name its SRI signature binds).
pub const HEADER_FUNCTION: &str = "x-dify-plugin-function";
/// The gateway's claim that a session of a function is in flight (see `connector::relay`):
/// sent by the gateway with each invocation, presented back by the bootstrap.
pub const HEADER_CLAIM: &str = "x-sri-relay-claim";
/// The daemon's session header on a backwards call.
pub const HEADER_DAEMON_SESSION: &str = "dify-plugin-session-id";

/// A session claim's expiry (Unix seconds): claims are `v1.{expiry}.{kid}.{hex mac}`, made and
/// checked by the connector (`connector::relay::claim`); the bootstrap only keeps them, and
/// forgets them once expired.
pub fn claim_expiry(claim: &str) -> Option<u64> {
    claim.strip_prefix("v1.")?.split('.').next()?.parse().ok()
}
