//! How packages map to Lambda functions, versions and connector-level names, and back.
//!
//! A Lambda function belongs to exactly one plugin: its name ends with a hash of the exact
//! `author/name` (cleaning alone maps `acme/foo_bar`, `acme/foo-bar` and `acme-foo/bar` to one
//! string), and its `sri:plugin` tag holds the exact `author/name`, which a deploy compares
//! before touching it. A deployment (one published version) is named after its function and
//! 128 bits of its checksum; the version description holds the full checksum.

use crate::Error;
use crate::backend::{CHECKSUM_HEX, IDENTITY_HEX, clean_name, identity_hash};
use crate::package::Package;

/// Lambda's limit on function names.
pub const MAX_LAMBDA_NAME: usize = 64;
/// Longest `SRI_LAMBDA_PREFIX` (leaves room for a readable plugin name).
pub const MAX_PREFIX: usize = 24;

/// The Lambda function name for a plugin: `{prefix}-{author}-{name}-{identity hash}`, only
/// `[a-z0-9-]`, at most 64 characters (the readable `{author}-{name}` part is cut to fit).
pub fn lambda_function_name(prefix: &str, author: &str, name: &str) -> String {
    let prefix = clean_name(prefix);
    let budget = MAX_LAMBDA_NAME.saturating_sub(prefix.len() + IDENTITY_HEX + 2);
    let mut human = format!("{}-{}", clean_name(author), clean_name(name));
    human.truncate(budget);
    format!("{prefix}-{human}-{}", identity_hash(author, name))
}

/// Refuses a prefix that would leave no room for the plugin's name or that Lambda (or the
/// connector's `{prefix}-*` IAM policy) cannot use as is.
pub fn check_prefix(prefix: &str) -> Result<(), Error> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Backend(format!(
            "SRI_LAMBDA_PREFIX `{prefix}` must be 1 to {MAX_PREFIX} lowercase letters, digits \
             or `-` (function names are `{{prefix}}-{{author}}-{{name}}-{{hash}}`, at most \
             {MAX_LAMBDA_NAME} characters)"
        )))
    }
}

/// Whether `aws_name` was made by [`lambda_function_name`] (ends with an identity hash), rather
/// than by a connector from before identities were hashed.
fn is_hashed(aws_name: &str) -> bool {
    aws_name.rsplit_once('-').is_some_and(|(_, h)| {
        h.len() == IDENTITY_HEX
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The connector-level name of one deployment (what the daemon's endpoint carries):
/// `{function}-{128 bits of the checksum}`, the shape [`crate::backend::is_function_name`]
/// accepts. Functions made before identities were hashed keep their old deployment names
/// (12 hex digits), so the daemon's endpoints for them still resolve.
pub fn deployment_name(aws_name: &str, checksum: &str) -> String {
    let n = if is_hashed(aws_name) {
        CHECKSUM_HEX
    } else {
        12
    };
    format!("{aws_name}-{}", &checksum[..checksum.len().min(n)])
}

/// The Lambda function a deployment name belongs to (the inverse of [`deployment_name`]).
pub fn function_of(name: &str) -> Option<&str> {
    if !crate::backend::is_function_name(name) {
        return None;
    }
    let (aws_name, _) = name.rsplit_once('-')?;
    (aws_name.len() <= MAX_LAMBDA_NAME).then_some(aws_name)
}

/// The version description: how a version is tied back to its package (the full checksum).
pub fn version_description(pkg: &Package) -> String {
    format!(
        "sri checksum={} id={}",
        pkg.checksum,
        pkg.unique_identifier()
    )
}

/// The checksum and identifier in a [`version_description`].
pub fn parse_description(d: &str) -> Option<(String, String)> {
    let rest = d.strip_prefix("sri checksum=")?;
    let (checksum, id) = rest.split_once(" id=")?;
    Some((checksum.to_owned(), id.to_owned()))
}

/// The Lambda layer name of the SDK layer for `sdk_version` on `target`:
/// `{prefix}-sdk-{version}-py{3xx}-{arch}`, only `[a-z0-9-]` (at most 24 + 5 + 64 + 12
/// characters, within Lambda's 140). Versions of one name differ only by build; the content
/// hash in the description tells them apart.
pub fn sdk_layer_name(
    prefix: &str,
    sdk_version: &str,
    target: &crate::packaging::Target,
) -> String {
    let mut version = clean_name(sdk_version);
    version.truncate(64);
    format!(
        "{}-sdk-{version}-py3{}-{}",
        clean_name(prefix),
        target.python.minor(),
        clean_name(target.arch.lambda_name())
    )
}

/// A layer version's description: who made it and the hex sha256 of its zip.
pub fn layer_description(prefix: &str, sdk_version: &str, sha256: &str) -> String {
    format!("sri prefix={prefix} dify_plugin={sdk_version} sha256={sha256}")
}

/// The zip hash in a [`layer_description`] made by the connector with `prefix`; `None` for any
/// other layer (another prefix, not ours).
pub fn parse_layer_description<'a>(prefix: &str, d: &'a str) -> Option<&'a str> {
    let rest = d.strip_prefix("sri prefix=")?;
    let (p, rest) = rest.split_once(' ')?;
    if p != prefix {
        return None;
    }
    let (_, sha) = rest.rsplit_once(" sha256=")?;
    crate::packaging::layer::is_sha256(sha).then_some(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_names_are_clean_bounded_and_never_shared() {
        let n = lambda_function_name("sri", "Lang Genius", "web_search");
        assert!(n.starts_with("sri-lang-genius-web-search-"), "{n}");
        assert_eq!(n.len(), "sri-lang-genius-web-search-".len() + IDENTITY_HEX);
        let long = lambda_function_name("sri", &"a".repeat(40), &"b".repeat(40));
        assert_eq!(long.len(), MAX_LAMBDA_NAME);
        assert!(long.starts_with("sri-aaaa"));
        assert_ne!(
            long,
            lambda_function_name("sri", &"a".repeat(40), &"b".repeat(41))
        );
        let a = lambda_function_name("sri", "acme", "foo_bar");
        let b = lambda_function_name("sri", "acme", "foo-bar");
        let c = lambda_function_name("sri", "acme-foo", "bar");
        assert!(a != b && b != c && a != c, "{a} {b} {c}");
        let long_prefix = lambda_function_name(&"p".repeat(MAX_PREFIX), &"x".repeat(99), "y");
        assert!(long_prefix.len() <= MAX_LAMBDA_NAME, "{long_prefix}");
        for aws in [&n, &long, &a, &b, &c, &long_prefix] {
            assert!(
                aws.bytes()
                    .all(|x| x.is_ascii_lowercase() || x.is_ascii_digit() || x == b'-'),
                "{aws}"
            );
            let d = deployment_name(aws, &"c".repeat(64));
            assert!(crate::backend::is_function_name(&d), "{d}");
            assert_eq!(function_of(&d), Some(aws.as_str()));
        }
        // A function from before identities were hashed keeps its deployment names.
        let old = deployment_name("sri-acme-foo-bar", &"0123456789ab".repeat(5));
        assert_eq!(old, "sri-acme-foo-bar-0123456789ab");
        assert_eq!(function_of(&old), Some("sri-acme-foo-bar"));
        assert_eq!(function_of("sri-acme,x"), None);
    }

    #[test]
    fn prefixes_are_checked() {
        for ok in ["sri", "t12345", "rs", "a-b"] {
            check_prefix(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "SRI", "a_b", "a,b", &"p".repeat(MAX_PREFIX + 1)] {
            assert!(check_prefix(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sdk_layer_names_and_descriptions() {
        use crate::packaging::{Arch, PythonVersion, Target};
        let t = Target {
            arch: Arch::X86_64,
            python: PythonVersion::Py312,
        };
        assert_eq!(
            sdk_layer_name("sri", "0.10.2", &t),
            "sri-sdk-0-10-2-py312-x86-64"
        );
        let long = sdk_layer_name(&"p".repeat(MAX_PREFIX), &"9".repeat(300), &t);
        assert!(long.len() <= 140, "{long}");
        let sha = "ab".repeat(32);
        let d = layer_description("sri", "0.10.2", &sha);
        assert!(d.len() <= 256, "Lambda's description limit");
        assert_eq!(parse_layer_description("sri", &d), Some(sha.as_str()));
        assert_eq!(
            parse_layer_description("sri-sdk", &d),
            None,
            "another prefix's"
        );
        assert_eq!(
            parse_layer_description("sri", "a layer of someone else"),
            None
        );
    }

    #[test]
    fn descriptions_round_trip() {
        assert_eq!(
            parse_description("sri checksum=abc id=a/b:1@abc"),
            Some(("abc".into(), "a/b:1@abc".into()))
        );
        assert_eq!(parse_description("something else"), None);
    }
}
