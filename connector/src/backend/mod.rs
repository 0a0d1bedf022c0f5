//! Where functions run. One trait, so the control plane and the gateway do not care whether a
//! plugin is a local process or a cloud function.

#[cfg(feature = "lambda")]
pub mod emulator;
#[cfg(feature = "lambda")]
pub mod lambda;
pub mod local;
pub mod record;
#[cfg(feature = "lambda")]
pub mod settings;

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
    /// Where the gateway sends calls for `name` (SRI), if it is running.
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
    /// What the plugin sandbox does here, for backends that sandbox plugins themselves.
    fn sandbox(&self) -> Option<crate::sandbox::Report> {
        None
    }
}

/// `s` with only lowercase letters, digits and `-` (safe in function names of every backend).
/// Lossy (`foo_bar` and `foo-bar` clean alike): names also carry [`identity_hash`].
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

/// Hex digits of the exact `author/name` hash in a name (64 bits: telling plugins apart is
/// also checked against the stored identity, so this only has to keep honest names apart).
pub const IDENTITY_HEX: usize = 16;
/// Hex digits of the checksum in a name (128 bits; the full checksum is compared with the
/// stored metadata before anything is reused).
pub const CHECKSUM_HEX: usize = 32;
/// Hex digits of the checksum in names made before identities were hashed (still addressable).
const LEGACY_CHECKSUM_HEX: usize = 12;
/// Longest function name (the daemon stores it and puts it in the endpoint URL).
pub const MAX_FUNCTION_NAME: usize = 127;
/// Longest human-readable part of a local function name.
const LOCAL_HUMAN: usize = 40;

/// The first [`IDENTITY_HEX`] hex digits of sha256 of the exact `author/name`: what keeps
/// plugins whose names clean alike (`acme/foo_bar`, `acme/foo-bar`, `acme-foo/bar`) apart.
pub fn identity_hash(author: &str, name: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{author}/{name}").as_bytes());
    hex::encode(digest)[..IDENTITY_HEX].to_owned()
}

/// `{human}-{identity hash}-{checksum prefix}`: the one shape of every new function name (the
/// local backend's, and the Lambda backend's deployment names, whose `{human}` starts with the
/// Lambda function's own name). See [`is_function_name`].
pub fn compose_name(human: &str, identity: &str, checksum: &str) -> String {
    let checksum = &checksum[..checksum.len().min(CHECKSUM_HEX)];
    format!("{human}-{identity}-{checksum}")
}

/// The function name for a package on the local backend:
/// `sri-{author}-{name}-{identity hash}-{checksum prefix}`, lowercase letters, digits and `-`.
pub fn function_name(pkg: &Package) -> String {
    let m = &pkg.manifest;
    local_function_name(&m.author, &m.name, &pkg.checksum)
}

/// [`function_name`] from the parts of a package's identity.
pub fn local_function_name(author: &str, name: &str, checksum: &str) -> String {
    let mut human = format!("sri-{}-{}", clean_name(author), clean_name(name));
    human.truncate(LOCAL_HUMAN);
    compose_name(&human, &identity_hash(author, name), checksum)
}

/// Whether `s` is a function name: what [`function_name`] and the Lambda backend's deployment
/// names make (`{human}-{16 hex}-{32 hex}`), or what they made before identities were hashed
/// (`{human}-{12 hex}`, so functions launched then stay addressable). This is the one grammar
/// every check of a function name uses.
pub fn is_function_name(s: &str) -> bool {
    let hex = |t: &str, n: usize| {
        t.len() == n
            && t.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let human = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if s.len() > MAX_FUNCTION_NAME {
        return false;
    }
    let Some((head, tail)) = s.rsplit_once('-') else {
        return false;
    };
    if hex(tail, LEGACY_CHECKSUM_HEX) {
        return human(head);
    }
    if !hex(tail, CHECKSUM_HEX) {
        return false;
    }
    match head.rsplit_once('-') {
        Some((human_part, identity)) => hex(identity, IDENTITY_HEX) && human(human_part),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_clean_alike_stay_apart_and_parse() {
        let checksum = "ab".repeat(32);
        let a = local_function_name("acme", "foo_bar", &checksum);
        let b = local_function_name("acme", "foo-bar", &checksum);
        let c = local_function_name("acme-foo", "bar", &checksum);
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        for n in [&a, &b, &c] {
            assert!(n.starts_with("sri-acme-foo-bar-"), "{n}");
            assert!(is_function_name(n), "{n}");
            assert!(n.ends_with(&checksum[..CHECKSUM_HEX]), "{n}");
        }
        let long = local_function_name(&"A_".repeat(200), &"é".repeat(100), &checksum);
        assert!(is_function_name(&long), "{long}");
        // Names launched before identities were hashed stay addressable.
        assert!(is_function_name("sri-langgenius-openai-0123456789ab"));
        assert!(is_function_name("t123-sri-sample-0123456789ab"));
        for bad in [
            "",
            "sri",
            "sri-0123456789ab-",
            "-0123456789ab",
            "sri-Acme-0123456789ab",
            "sri-acme-0123456789AB",
            "sri-acme-0123456789a",
            "sri-acme-0123456789abc",
            "sri-acme,x=1-0123456789ab",
            "sri-acme-0123456789abcdef-0123456789abcdef0123456789abcde",
            "sri-acme-0123456789abcde-0123456789abcdef0123456789abcdef",
            "sri-acme/../x-0123456789ab",
            "sri-acme%2f-0123456789ab",
        ] {
            assert!(!is_function_name(bad), "accepted {bad:?}");
        }
        let long = format!("{}-0123456789ab", "a".repeat(MAX_FUNCTION_NAME));
        assert!(!is_function_name(&long));
    }
}
