//! Installing a plugin's dependencies for the target platform with uv, and turning uv's resolver
//! failures into an error that names the package without a wheel and says how to fix it.
//!
//! Only wheels are accepted (`--only-binary :all:`): building an sdist here would compile for the
//! build machine, not for Lambda.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Options, Target, run};
use crate::Error;

/// How long one dependency install may take (a cold install of a large plugin downloads a lot).
const INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// Where a plugin declares its dependencies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirements {
    /// `requirements.txt` (what `dify plugin init` writes).
    Txt(PathBuf),
    /// `pyproject.toml` `[project] dependencies`.
    Pyproject(PathBuf),
    /// Neither: nothing to install.
    None,
}

impl Requirements {
    /// Looks in the unpacked plugin directory.
    pub fn find(plugin: &Path) -> Self {
        let txt = plugin.join("requirements.txt");
        let pyproject = plugin.join("pyproject.toml");
        if txt.is_file() {
            Requirements::Txt(txt)
        } else if pyproject.is_file() {
            Requirements::Pyproject(pyproject)
        } else {
            Requirements::None
        }
    }
}

/// `uv pip install --target vendor …` for `opts.target`.
pub async fn install(opts: &Options, reqs: &Path, vendor: &Path) -> Result<(), Error> {
    let target = &opts.target;
    let mut cmd = tokio::process::Command::new(&opts.uv);
    cmd.args(["pip", "install", "--target"])
        .arg(vendor)
        .args(["--python-platform", &target.uv_platform()])
        .args(["--python-version", target.python.as_str()])
        .args(["--only-binary", ":all:", "--no-progress", "-r"])
        .arg(reqs)
        .env("UV_CACHE_DIR", opts.cache_dir.join("uv"));
    if let Some(wh) = &opts.wheelhouse {
        cmd.arg("--find-links").arg(wh);
    }
    if opts.offline {
        // No index and no network: only the wheelhouse (and uv's cache of it).
        cmd.args(["--no-index", "--offline"]);
    } else if let Some(url) = &opts.index_url {
        cmd.args(["--index-url", url]);
    }
    let out = run(cmd, INSTALL_TIMEOUT, "uv pip install").await?;
    if out.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&out.stderr);
    Err(Error::Packaging(explain(&text, target, opts)))
}

/// The error message for a failed install: the package without a wheel when uv says which,
/// the fix, and uv's own words (trimmed).
pub fn explain(uv_stderr: &str, target: &Target, opts: &Options) -> String {
    let uv_text = trim_uv(uv_stderr);
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

/// uv's stderr without the interpreter notice, at most 40 lines.
fn trim_uv(s: &str) -> String {
    let lines: Vec<&str> = s
        .lines()
        .filter(|l| !l.starts_with("Using CPython") && !l.trim().is_empty())
        .collect();
    let keep = lines.len().min(40);
    lines[lines.len() - keep..].join("\n")
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
