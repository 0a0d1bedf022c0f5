//! The crate's one error type.

use std::path::PathBuf;

/// Everything that stops the bootstrap or an invocation, with context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The interpreter could not be started.
    #[error(
        "cannot start the plugin with `{python}` (set SRI_PYTHON to a Python interpreter): {source}"
    )]
    Spawn {
        /// The interpreter tried.
        python: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The plugin cannot take invocations.
    #[error("{0}")]
    NotReady(String),
    /// An invocation with this session id is already running.
    #[error("session `{0}` is already running on this function")]
    DuplicateSession(String),
    /// The protocol layer refused something (key ring, envelope, signature).
    #[error(transparent)]
    Protocol(#[from] connector::Error),
    /// Listening or serving failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("{0}")]
    Config(String),
    /// The Lambda Runtime API failed.
    #[error("Lambda Runtime API: {0}")]
    RuntimeApi(String),
}
