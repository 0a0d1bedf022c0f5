//! Shipping `.pyc` files compiled by the target's Python minor version.
//!
//! Lambda's `/var/task` is read-only, so a function without bytecode recompiles every module it
//! imports on every cold start. Bytecode is only valid for the minor version that wrote it, so it
//! is compiled by an interpreter of exactly that version, found on this machine:
//!
//! 1. `SRI_PYTHON_3_12` (for 3.12; `SRI_PYTHON_3_11`, `SRI_PYTHON_3_13` likewise): this
//!    interpreter and no other (set it to `none` to ship no bytecode);
//! 2. `python3.12` on `PATH` (pyenv shims that cannot run are skipped);
//! 3. `$PYENV_ROOT/versions/3.12*/bin/python3` (`PYENV_ROOT` defaults to `~/.pyenv`).
//!
//! The files use `--invalidation-mode unchecked-hash`: zip timestamps are fixed (deterministic
//! zips) and the directory is read-only, so the interpreter must trust them without checking
//! sources.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::{PythonVersion, run};
use crate::Error;

const PROBE_TIMEOUT: Duration = Duration::from_secs(15);
const COMPILE_TIMEOUT: Duration = Duration::from_secs(600);

/// An interpreter of the target's minor version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interpreter {
    /// Its path.
    pub path: PathBuf,
    /// Its full version (`3.12.1`).
    pub version: String,
}

/// Why no interpreter was found (for the warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotFound {
    /// The places that were tried, in order.
    pub tried: Vec<String>,
}

/// The override variable for `version` (`SRI_PYTHON_3_12`).
pub fn override_var(version: PythonVersion) -> String {
    format!("SRI_PYTHON_{}", version.as_str().replace('.', "_"))
}

/// Candidate interpreters, in order, from the environment `env` (injected for tests);
/// `None` when the override says to ship no bytecode.
pub fn candidates(
    version: PythonVersion,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Vec<PathBuf>> {
    if let Some(v) = env(&override_var(version)).filter(|v| !v.is_empty()) {
        if v.eq_ignore_ascii_case("none") {
            return None;
        }
        return Some(vec![PathBuf::from(v)]);
    }
    let mut out = Vec::new();
    let exe = format!("python{}", version.as_str());
    if let Some(path) = env("PATH") {
        out.extend(
            std::env::split_paths(&path)
                .map(|d| d.join(&exe))
                .filter(|p| p.is_file()),
        );
    }
    let pyenv = env("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(root) = pyenv
        && let Ok(entries) = std::fs::read_dir(root.join("versions"))
    {
        let prefix = format!("{}.", version.as_str());
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path().join("bin/python3"))
            .filter(|p| p.is_file())
            .collect();
        // Newest patch release first.
        found.sort_by_key(|p| std::cmp::Reverse(patch_of(p)));
        out.extend(found);
    }
    Some(out)
}

fn patch_of(p: &Path) -> u32 {
    p.ancestors()
        .nth(2)
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.rsplit('.').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The first candidate that runs and is of `version`'s minor version.
pub async fn find(version: PythonVersion) -> Result<Interpreter, NotFound> {
    let env = |k: &str| std::env::var(k).ok();
    let list = match candidates(version, &env) {
        Some(l) => l,
        None => {
            return Err(NotFound {
                tried: vec![format!("{}=none", override_var(version))],
            });
        }
    };
    let mut tried = Vec::new();
    for path in list {
        match probe(&path).await {
            Some(v) if v.starts_with(&format!("{}.", version.as_str())) => {
                return Ok(Interpreter { path, version: v });
            }
            Some(v) => tried.push(format!("{} (is {v})", path.display())),
            None => tried.push(format!("{} (does not run)", path.display())),
        }
    }
    if tried.is_empty() {
        tried.push(format!(
            "python{} on PATH, $PYENV_ROOT/versions/{}*",
            version.as_str(),
            version.as_str()
        ));
    }
    Err(NotFound { tried })
}

async fn probe(path: &Path) -> Option<String> {
    let mut cmd = crate::child::command(path);
    cmd.args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"]);
    let out = run(cmd, PROBE_TIMEOUT, "python --version").await.ok()?;
    out.status.success().then(|| out.stdout.trim().to_owned())
}

/// `.py` files per compiling process. Fixed, not derived from this machine's cores, so that a
/// tree always splits the same way (see [`compile`]).
const FILES_PER_PROCESS: usize = 128;

/// Compiles every `.py` below `dirs` (relative to `root`) with paths recorded as they will be
/// on Lambda (`root` replaced by `on_lambda`: `/var/task` for a function, `/opt` for a layer).
/// Files that do not compile (e.g. Python 2 test data in some packages) are left without
/// bytecode; that is reported, not fatal.
///
/// The bytes of a `.pyc` depend on what its process compiled before: marshal flags an object
/// for back-reference by its reference count, which earlier compiles raise (a frozenset constant
/// shared by two functions is enough). `compileall -j0` hands files to workers as they free up,
/// so its output changed from build to build and so did the zip's `CodeSha256`. Here the sorted
/// file list is cut into fixed runs of [`FILES_PER_PROCESS`], each compiled in order by a fresh
/// interpreter: the same tree gives the same bytes on any machine, still on every core.
pub async fn compile(
    py: &Interpreter,
    root: &Path,
    dirs: &[&str],
    on_lambda: &str,
) -> Result<Option<String>, Error> {
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
    compile_with(py, root, dirs, on_lambda, parallel).await
}

async fn compile_with(
    py: &Interpreter,
    root: &Path,
    dirs: &[&str],
    on_lambda: &str,
    parallel: usize,
) -> Result<Option<String>, Error> {
    let mut sources = Vec::new();
    for dir in dirs.iter().map(|d| root.join(d)).filter(|d| d.is_dir()) {
        sources.extend(
            super::archive::entries(&dir)?
                .into_iter()
                .filter(|e| e.name.ends_with(".py") && !e.name.contains("__pycache__/"))
                .map(|e| e.path),
        );
    }
    let deadline = Instant::now() + COMPILE_TIMEOUT;
    let commands: Vec<_> = sources
        .chunks(FILES_PER_PROCESS)
        .map(|files| {
            let mut cmd = crate::child::command(&py.path);
            cmd.args([
                "-m",
                "compileall",
                "-q",
                "--invalidation-mode",
                "unchecked-hash",
                "-s",
            ])
            .arg(root)
            .args(["-p", on_lambda])
            // Names come from the package and the wheels: never read as options.
            .arg("--")
            .args(files)
            .current_dir(root)
            // Never let a user's environment redirect or disable what we write.
            .env_remove("PYTHONPYCACHEPREFIX")
            .env_remove("PYTHONDONTWRITEBYTECODE")
            .env_remove("PYTHONPATH")
            // Set constants are written in hash order.
            .env("PYTHONHASHSEED", "0");
            cmd
        })
        .collect();
    let runs = commands.into_iter().map(|cmd| async move {
        let left = deadline.saturating_duration_since(Instant::now());
        run(cmd, left, "python -m compileall").await
    });
    let outputs: Vec<_> = futures_util::stream::iter(runs)
        .buffered(parallel.max(1))
        .collect()
        .await;
    let mut text = String::new();
    for out in outputs {
        let out = out?;
        if !out.status.success() {
            text.push_str(&out.stdout);
            text.push_str(&out.stderr);
        }
    }
    if text.is_empty() {
        return Ok(None);
    }
    let text = crate::child::redact(&text);
    let tail: Vec<&str> = text.lines().rev().take(10).collect();
    Ok(Some(tail.into_iter().rev().collect::<Vec<_>>().join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_override_wins_and_none_disables() {
        let env = |k: &str| (k == "SRI_PYTHON_3_12").then(|| "/opt/py/bin/python3".to_owned());
        assert_eq!(
            candidates(PythonVersion::Py312, &env).unwrap(),
            [PathBuf::from("/opt/py/bin/python3")]
        );
        let none = |k: &str| (k == "SRI_PYTHON_3_12").then(|| "none".to_owned());
        assert!(candidates(PythonVersion::Py312, &none).is_none());
        assert_eq!(override_var(PythonVersion::Py313), "SRI_PYTHON_3_13");
    }

    #[test]
    fn pyenv_versions_are_found_newest_first() {
        let root = std::env::temp_dir().join(format!("sri-pyenv-{}", std::process::id()));
        for v in ["3.12.1", "3.12.10", "3.11.7"] {
            let bin = root.join("versions").join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            std::fs::write(bin.join("python3"), "").unwrap();
        }
        let r = root.display().to_string();
        let env = |k: &str| (k == "PYENV_ROOT").then(|| r.clone());
        let got = candidates(PythonVersion::Py312, &env).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].to_string_lossy().contains("3.12.10"), "{got:?}");
    }

    /// A module whose bytecode differs when its process compiled it (or anything interning
    /// `SRI_K23`) before: the marshal flag of a shared frozenset follows reference counts.
    const SENSITIVE: &str = "def f(k, v):
    if k in {'SRI_K33', 'SRI_K23'}:
        return ('SRI_K9', None, 'SRI_K33')
    return {'SRI_K23': k}.get('SRI_K9', v)

def g(k, v):
    if k in {'SRI_K33', 'SRI_K23'}:
        return ('SRI_K10', None, 'SRI_K33')
    return {'SRI_K23': k}.get('SRI_K10', v)
";

    /// Every `.pyc` below `root`: path relative to it → bytes.
    fn pycs(root: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
        super::super::archive::entries(root)
            .unwrap()
            .into_iter()
            .filter(|e| e.name.ends_with(".pyc"))
            .map(|e| (e.name, std::fs::read(&e.path).unwrap()))
            .collect()
    }

    #[tokio::test]
    async fn the_same_tree_compiles_to_the_same_bytes_on_any_number_of_cores() {
        let py = find(PythonVersion::Py312)
            .await
            .unwrap_or_else(|e| panic!("this test needs Python 3.12 (tried {:?})", e.tried));
        let tmp = tempfile::tempdir().unwrap();
        let mut trees = Vec::new();
        for parallel in [1, 2, 5] {
            let root = tmp.path().join(format!("cores{parallel}"));
            let pkg = root.join("vendor/pkg");
            std::fs::create_dir_all(&pkg).unwrap();
            for i in 0..3 * FILES_PER_PROCESS + 7 {
                std::fs::write(pkg.join(format!("m{i:04}.py")), SENSITIVE).unwrap();
            }
            std::fs::write(root.join("vendor/broken.py"), "def (:\n").unwrap();
            std::fs::write(root.join("vendor/--version.py"), "X = 1\n").unwrap();
            let failures = compile_with(&py, &root, &["plugin", "vendor"], "/var/task", parallel)
                .await
                .unwrap();
            assert!(
                failures.as_deref().is_some_and(|f| f.contains("broken.py")),
                "{failures:?}"
            );
            trees.push(pycs(&root));
        }
        assert_eq!(trees[0].len(), 3 * FILES_PER_PROCESS + 8);
        assert!(trees[0].contains_key("vendor/__pycache__/--version.cpython-312.pyc"));
        for pair in trees.windows(2) {
            let differ: Vec<_> = pair[0]
                .iter()
                .filter(|(name, bytes)| pair[1].get(*name) != Some(bytes))
                .map(|(name, _)| name)
                .collect();
            assert!(
                differ.is_empty(),
                "{} .pyc differ: {differ:?}",
                differ.len()
            );
        }
        // Paths are recorded as they will be on Lambda.
        let one = &trees[0]["vendor/pkg/__pycache__/m0000.cpython-312.pyc"];
        assert!(one.windows(16).any(|w| w == b"/var/task/vendor"));
    }
}
