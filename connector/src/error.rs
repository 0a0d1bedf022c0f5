//! The crate's one error type.

use crate::protocol::signing::Rejection;

/// Everything that can go wrong in this crate, with enough context to act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `SRI_SIGNING_KEYS` (or another key ring source) could not be used.
    #[error("invalid signing key ring: {0}")]
    KeyRing(String),
    /// A request body is not a Dify request envelope.
    #[error("invalid request envelope: {0}")]
    Envelope(String),
    /// A request failed SRI authentication.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] Rejection),
    /// A plugin manifest is unusable.
    #[error("plugin manifest {path}: {reason}")]
    Manifest {
        /// Where it was read from.
        path: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A plugin package is unusable.
    #[error("invalid plugin package: {0}")]
    Package(String),
    /// A backend could not do what was asked.
    #[error("{0}")]
    Backend(String),
    /// A package could not be turned into a function artifact (dependencies, size, bytecode).
    #[error("packaging failed: {0}")]
    Packaging(String),
    /// An AWS API call failed.
    #[error("AWS {operation} failed: {detail}")]
    Aws {
        /// The API operation (`CreateFunction`, …) and its subject.
        operation: String,
        /// What AWS said, with the fix when we know it.
        detail: String,
    },
    /// An SSE stream could not be decoded.
    #[error("invalid SRI event stream: {0}")]
    Sse(String),
    /// A function name from a caller does not follow the grammar ([`crate::names`]).
    #[error("{0}")]
    InvalidName(String),
    /// A setting cannot be used (the message names the variable and the fix).
    #[error("{0}")]
    Config(String),
}

/// `e` with all its sources, `outer: inner: innermost` (what reqwest and hyper errors need to
/// say anything useful).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
