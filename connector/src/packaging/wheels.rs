//! Installing a plugin's dependencies for the target platform with uv, and turning uv's resolver
//! failures into an error that names the package without a wheel and says how to fix it.
//!
//! What uv installs is the parsed list of [`crate::requirements`], never the package's file.
//!
//! Only wheels are accepted (`--only-binary :all:`): building an sdist here would compile for the
//! build machine, not for Lambda.

use std::path::Path;

use super::{Options, Target};
use crate::Error;
use crate::child;
use crate::requirements::Dependencies;

/// `uv pip install --target vendor …` of the parsed `deps` for `opts.target`. uv reads the
/// requirements file the connector writes from them (in `scratch`), never the package's own.
pub async fn install(
    opts: &Options,
    deps: &Dependencies,
    vendor: &Path,
    scratch: &Path,
) -> Result<(), Error> {
    let target = &opts.target;
    let reqs = scratch.join("sri-requirements.txt");
    std::fs::write(&reqs, deps.to_requirements_txt())
        .map_err(|e| Error::Packaging(format!("writing {}: {e}", reqs.display())))?;
    let mut cmd = child::command(&opts.uv);
    cmd.args(["pip", "install", "--target"])
        .arg(vendor)
        .args(["--python-platform", &target.uv_platform()])
        .args(["--python-version", target.python.as_str()])
        .args(["--only-binary", ":all:", "--no-progress"])
        .env("UV_CACHE_DIR", opts.cache_dir.join("uv"));
    if let Some(wh) = &opts.wheelhouse {
        cmd.arg("--find-links").arg(wh);
    }
    if opts.offline {
        // No index and no network: only the wheelhouse (and uv's cache of it).
        cmd.args(["--no-index", "--offline"]);
    } else if let Some(url) = &opts.index_url {
        child::index(&mut cmd, url);
    }
    cmd.arg("-r").arg(&reqs);
    let out = child::run(
        cmd,
        "uv pip install",
        opts.install_timeout,
        scratch,
        Error::Packaging,
    )
    .await?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Packaging(explain(&out.stderr, target, opts)))
}

/// The error message for a failed install: the package without a wheel when uv says which,
/// the fix, and uv's own words (trimmed).
pub fn explain(uv_stderr: &str, target: &Target, opts: &Options) -> String {
    let uv_text = trim_uv(&child::redact(uv_stderr));
    match missing_wheel(uv_stderr) {
        Some(name) => format!(
            "`{name}` has no wheel for {} ({}, Python {}; {} wheels fit). Fix: vendor a wheel \
             for it into the wheelhouse (--wheelhouse), or choose --arch {}.\nuv said:\n{uv_text}",
            target.wheel_platform(),
            target.arch,
            target.python,
            target.platform_range(),
            target.arch.other(),
        ),
        None if opts.offline => format!(
            "installing the dependencies offline from {} failed; add the missing wheels for {} \
             (Python {}) to the wheelhouse, or drop --offline.\nuv said:\n{uv_text}",
            opts.wheelhouse
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            target.wheel_platform(),
            target.python,
        ),
        None => format!(
            "installing the dependencies for {} (Python {}) failed; check requirements.txt and \
             the index (--index-url / UV_INDEX_URL).\nuv said:\n{uv_text}",
            target.wheel_platform(),
            target.python
        ),
    }
}

/// The package uv could not find a usable wheel for, from its resolver explanation.
pub fn missing_wheel(uv_stderr: &str) -> Option<String> {
    const CUES: [&str; 5] = [
        " has no wheels with a matching platform tag",
        " has no usable wheels",
        " has no wheels with a matching Python ABI tag",
        " has no wheels with a matching Python version tag",
        " has no wheels are available",
    ];
    for line in uv_stderr.lines() {
        for cue in CUES {
            if let Some(i) = line.find(cue) {
                let before = &line[..i];
                let subject = before.rsplit("Because ").next().unwrap_or(before);
                let subject = subject.rsplit("because ").next().unwrap_or(subject).trim();
                return Some(strip_specifier(subject));
            }
        }
        // `hint: Wheels are required for `gevent` because building from source is disabled`
        if let Some(rest) = line.split("Wheels are required for `").nth(1)
            && let Some(name) = rest.split('`').next()
        {
            return Some(name.to_owned());
        }
    }
    None
}

fn strip_specifier(s: &str) -> String {
    let end = s
        .find(['=', '<', '>', '!', '~', ' ', '['])
        .unwrap_or(s.len());
    s[..end].to_owned()
}

/// uv's stderr without the interpreter notice, at most 40 lines and
/// [`child::MESSAGE_BYTES`].
fn trim_uv(s: &str) -> String {
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.starts_with("Using CPython") && !l.trim().is_empty())
        .collect();
    let keep = lines.len().min(40);
    let text = lines[lines.len() - keep..].join("\n");
    match text.len().checked_sub(child::MESSAGE_BYTES) {
        Some(cut) if cut > 0 => {
            let start = (cut..text.len())
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(text.len());
            format!("…{}", &text[start..])
        }
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_package_in_uvs_explanations() {
        let platform = "error: No solution found when resolving dependencies\n  cause: Because sri-only-x86==0.1.0 has no wheels with a matching platform tag (e.g., `manylinux_2_34_aarch64`) and you require sri-only-x86==0.1.0, we can conclude that your requirements are unsatisfiable.";
        assert_eq!(missing_wheel(platform).as_deref(), Some("sri-only-x86"));
        let transitive = "  cause: Because gevent>=26.4.0 has no usable wheels and dify-plugin>=0.10.2 depends on gevent>=26.4.0, we can conclude …";
        assert_eq!(missing_wheel(transitive).as_deref(), Some("gevent"));
        let hint = "hint: Wheels are required for `numpy` because building from source is disabled";
        assert_eq!(missing_wheel(hint).as_deref(), Some("numpy"));
        assert_eq!(missing_wheel("error: Failed to fetch: network"), None);
    }

    #[test]
    fn trims_uvs_noise() {
        let t = trim_uv("Using CPython 3.11.7 interpreter at: /x\n\nerror: boom\n");
        assert_eq!(t, "error: boom");
    }
}
