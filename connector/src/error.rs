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
    /// A request failed SRI v1 authentication.
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] Rejection),
    /// An SSE stream could not be decoded.
    #[error("invalid SRI event stream: {0}")]
    Sse(String),
}
