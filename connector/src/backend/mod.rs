//! Where functions run. One trait, so the control plane and the gateway do not care whether a
//! plugin is a local process or a cloud function.

#[cfg(feature = "lambda")]
pub mod lambda;
pub mod local;

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use crate::Error;
use crate::package::Package;
use crate::transport::Target;

/// A deployed function.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Function {
    /// Function name (no `,` or `=`: the daemon's launch parser splits on them).
    pub name: String,
    /// `author/name:version@checksum`.
    pub identifier: String,
    /// The package checksum.
    pub checksum: String,
}

/// Progress of a deployment: a stage (`build`, `run`, …) and a human message.
pub type Progress = mpsc::UnboundedSender<(&'static str, String)>;

/// A place functions are deployed to.
pub trait Backend: Send + Sync + 'static {
    /// Deploys `pkg` (idempotent: an existing function is returned as is).
    fn deploy<'a>(
        &'a self,
        pkg: &'a Package,
        progress: Progress,
    ) -> BoxFuture<'a, Result<Function, Error>>;
    /// The function built from the package with this checksum, if any.
    fn find(&self, checksum: &str) -> Option<Function>;
    /// Every function.
    fn list(&self) -> Vec<Function>;
    /// Where the gateway sends calls for `name` (SRI v1), if it is running.
    fn target(&self, name: &str) -> Option<Target>;
    /// Like [`Backend::target`], but waits up to `within` for a known function that is
    /// (re)starting, so that a call right after a restart is served rather than refused.
    fn wait_target<'a>(
        &'a self,
        name: &'a str,
        within: std::time::Duration,
    ) -> BoxFuture<'a, Option<Target>> {
        let _ = within;
        Box::pin(async move { self.target(name) })
    }
    /// Deletes a function and everything it owns.
    fn remove<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), Error>>;
    /// Deletes leftovers and functions superseded by newer versions of the same plugin,
    /// keeping the `keep` newest per plugin. Returns what was removed.
    fn gc(&self, keep: usize) -> BoxFuture<'_, Result<Vec<String>, Error>>;
    /// Stops what the backend runs (connector shutdown).
    fn shutdown(&self) -> BoxFuture<'_, ()>;
}

/// `s` with only lowercase letters, digits and `-` (safe in function names of every backend).
pub fn clean_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// The function name for a package: lowercase letters, digits and `-` only.
pub fn function_name(pkg: &Package) -> String {
    let clean = clean_name;
    let m = &pkg.manifest;
    let mut base = format!("{}-{}", clean(&m.author), clean(&m.name));
    base.truncate(40);
    format!("sri-{base}-{}", &pkg.checksum[..12])
}
