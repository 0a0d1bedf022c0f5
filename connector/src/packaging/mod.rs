//! Packaging: a Dify plugin package (`.difypkg`) → an AWS Lambda zip for one architecture and
//! Python runtime.
//!
//! Lambda runs the plugin on a managed `python3.x` runtime with our `bootstrap` as
//! `AWS_LAMBDA_EXEC_WRAPPER`, so the zip must carry everything else: the plugin as Dify ships it,
//! its dependencies built for the target's CPU and glibc (never the build machine's), the
//! bootstrap for the right architecture, and bytecode compiled by the same Python minor version
//! (`/var/task` is read-only, so Python cannot cache its own). The layout is
//! `template/README.md`'s:
//!
//! ```text
//! plugin/             the package's files (junk such as __pycache__ left out)
//! vendor/             uv pip install --target, for the target platform, wheels only
//! bin/bootstrap       mode 0755
//! sri-function.json   the resolved FunctionConfig
//! sri-plugin.json     the validated manifest, as JSON (crate::manifest::RECORD_FILE): the
//!                     bootstrap's Lambda build reads it and carries no YAML parser
//! ```
//!
//! Zips are deterministic and cached by their inputs (see [`cache`]), so a redeploy of the
//! same package costs a lookup and yields the same `CodeSha256`.
//!
//! With [`Options::sdk_layer`], `dify_plugin` and the dependencies it shares with the plugin
//! go into a separate layer zip instead ([`layer`]), and `vendor/` keeps only the rest.

pub mod archive;
pub mod bytecode;
pub mod cache;
pub mod layer;
pub mod target;
pub mod wheels;

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use target::{Arch, FunctionConfig, PythonVersion, Target};

use crate::Error;
use crate::backend::Progress;
use crate::package::Package;
use crate::requirements::Dependencies;

/// Largest zip Lambda accepts by direct upload (`ZipFile`); larger ones go through S3.
pub const DIRECT_UPLOAD_LIMIT: u64 = 50 * 1024 * 1024;
/// Largest unzipped function (code + layers) Lambda accepts.
pub const UNZIPPED_LIMIT: u64 = 250 * 1024 * 1024;

/// How to build an artifact.
#[derive(Debug, Clone)]
pub struct Options {
    /// What to build for.
    pub target: Target,
    /// The bootstrap binary for `target.arch` (its ELF machine is checked).
    pub bootstrap: PathBuf,
    /// A directory of wheels searched first (`--find-links`).
    pub wheelhouse: Option<PathBuf>,
    /// No index at all, only the wheelhouse (air-gapped builds).
    pub offline: bool,
    /// The package index (`SRI_INDEX_URL`; default: uv's, i.e. `UV_INDEX_URL` or PyPI).
    pub index_url: Option<String>,
    /// How long installing the dependencies may take (`SRI_INSTALL_TIMEOUT_SECS`).
    pub install_timeout: Duration,
    /// Built zips, their metadata, and uv's download cache (`uv/`).
    pub cache_dir: PathBuf,
    /// The uv binary.
    pub uv: PathBuf,
    /// Ship bytecode when an interpreter of the target version is found (see [`bytecode`]).
    pub bytecode: bool,
    /// Put `dify_plugin` and its dependencies in a shared layer ([`layer`]) instead of every
    /// function zip (`SRI_LAMBDA_SDK_LAYER`).
    pub sdk_layer: bool,
}

impl Options {
    /// The same options with the paths that uv and Python are handed made absolute: they run
    /// in a scratch directory of their own, where a path relative to ours (`--cache-dir c`,
    /// `--uv .venv/tools/bin/uv`, the `.sri-cache` default) names nothing. A bare program name
    /// (`uv`) stays as it is, to be looked up on `PATH`.
    pub fn absolute(&self) -> Result<Self, Error> {
        let abs = |p: &Path| {
            std::path::absolute(p)
                .map_err(|e| Error::Packaging(format!("cannot make {} absolute: {e}", p.display())))
        };
        let mut o = self.clone();
        o.cache_dir = abs(&self.cache_dir)?;
        o.wheelhouse = self.wheelhouse.as_deref().map(abs).transpose()?;
        if self.uv.components().count() > 1 {
            o.uv = abs(&self.uv)?;
        }
        Ok(o)
    }

    /// Defaults for `target`: [`default_bootstrap`], [`default_cache_dir`], [`default_uv`],
    /// bytecode on, the default index, no wheelhouse.
    pub fn new(target: Target) -> Self {
        Self {
            target,
            bootstrap: default_bootstrap(target.arch),
            wheelhouse: None,
            offline: false,
            index_url: None,
            install_timeout: crate::child::DEFAULT_INSTALL_TIMEOUT,
            cache_dir: default_cache_dir(),
            uv: default_uv(),
            bytecode: true,
            sdk_layer: false,
        }
    }

    /// [`Options::new`] with what the environment says: `SRI_WHEELHOUSE`, `SRI_OFFLINE`
    /// (`1`/`true`), `SRI_CACHE_DIR`, `SRI_UV`, `SRI_BOOTSTRAP_<ARCH>`, `SRI_INDEX_URL` (else
    /// uv's own `UV_INDEX_URL`), `SRI_INSTALL_TIMEOUT_SECS`.
    pub fn from_env(target: Target) -> Self {
        let mut o = Self::new(target);
        o.wheelhouse = std::env::var_os("SRI_WHEELHOUSE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        o.offline = std::env::var("SRI_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "yes"))
            .unwrap_or(false);
        o.index_url = std::env::var("SRI_INDEX_URL")
            .ok()
            .filter(|v| !v.is_empty());
        if let Some(secs) = std::env::var("SRI_INSTALL_TIMEOUT_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            o.install_timeout = Duration::from_secs(secs);
        }
        o
    }
}

/// The bootstrap for `arch`: `SRI_BOOTSTRAP_ARM64` / `SRI_BOOTSTRAP_X86_64`, else what
/// `make lambda-bootstrap` builds (`target/lambda/<arch>/bootstrap`), looked up beside the
/// running binary's target directory first, then from the current directory.
pub fn default_bootstrap(arch: Arch) -> PathBuf {
    let var = format!("SRI_BOOTSTRAP_{}", arch.lambda_name().to_ascii_uppercase());
    if let Some(p) = std::env::var_os(&var).filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let rel = Path::new("lambda")
        .join(arch.lambda_name())
        .join("bootstrap");
    // `sri` runs from target/<profile>/sri: target/ is two levels up.
    if let Ok(exe) = std::env::current_exe()
        && let Some(target_dir) = exe.parent().and_then(Path::parent)
    {
        let p = target_dir.join(&rel);
        if p.is_file() {
            return p;
        }
    }
    Path::new("target").join(rel)
}

/// `SRI_CACHE_DIR`, else `$XDG_CACHE_HOME/sri`, else `~/.cache/sri`, else `.sri-cache`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("SRI_CACHE_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(p).join("sri");
    }
    match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        Some(h) => PathBuf::from(h).join(".cache/sri"),
        None => PathBuf::from(".sri-cache"),
    }
}

/// `SRI_UV`, else `uv` on `PATH`, else `.venv/tools/bin/uv` (what `make tools` installs).
pub fn default_uv() -> PathBuf {
    if let Some(p) = std::env::var_os("SRI_UV").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("uv"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(".venv/tools/bin/uv"))
}

/// A built function zip.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// The zip (in the cache directory: copy it, do not move it).
    pub zip: PathBuf,
    /// Base64 of the zip's sha256, as Lambda reports `CodeSha256`.
    pub code_sha256: String,
    /// Size of the zip.
    pub zipped_bytes: u64,
    /// Sum of the sizes of its files (Lambda's unzipped limit).
    pub unzipped_bytes: u64,
    /// The version of the interpreter that compiled the shipped bytecode; `None` when the zip
    /// has none.
    pub bytecode: Option<String>,
    /// Whether it came from the cache.
    pub cache_hit: bool,
    /// What it was built for.
    pub target: Target,
    /// How the function must be configured.
    pub config: FunctionConfig,
    /// The SDK layer the function needs (its zip was trimmed against it).
    pub layer: Option<layer::Layer>,
}

impl Artifact {
    /// Whether the zip is over the direct-upload limit, so that it must go through S3
    /// (`S3Bucket`/`S3Key` instead of `ZipFile`).
    pub fn needs_s3(&self) -> bool {
        self.zipped_bytes > DIRECT_UPLOAD_LIMIT
    }
}

/// Builds (or finds in the cache) the Lambda zip of `pkg` for `opts.target`, reporting stages
/// on `progress` (`package`, `dependencies`, `bytecode`, `archive`).
pub async fn build(pkg: &Package, opts: &Options, progress: &Progress) -> Result<Artifact, Error> {
    let opts = &opts.absolute()?;
    let started = Instant::now();
    let say = |stage: &'static str, msg: String| {
        let _ = progress.send((stage, msg));
    };
    let target = opts.target;
    if opts.offline && opts.wheelhouse.is_none() {
        return Err(Error::Packaging(
            "offline packaging needs a wheelhouse: pass --wheelhouse DIR (SRI_WHEELHOUSE) with \
             the wheels for the target, or drop --offline"
                .into(),
        ));
    }
    if let Some(wh) = &opts.wheelhouse
        && !wh.is_dir()
    {
        return Err(Error::Packaging(format!(
            "the wheelhouse {} is not a directory; pass a directory of .whl files",
            wh.display()
        )));
    }
    archive::check_elf(&opts.bootstrap, target.arch)?;
    let bootstrap_bytes =
        std::fs::read(&opts.bootstrap).map_err(|e| archive::io_err(&opts.bootstrap, e))?;
    let bootstrap_sha = hex::encode(Sha256::digest(&bootstrap_bytes));

    let interpreter = if opts.bytecode {
        match bytecode::find(target.python).await {
            Ok(py) => Some(py),
            Err(nf) => {
                let msg = format!(
                    "no Python {v} interpreter found; shipping without bytecode (cold starts will \
                     recompile); install python{v} or set {var} (tried: {})",
                    nf.tried.join(", "),
                    v = target.python,
                    var = bytecode::override_var(target.python),
                );
                tracing::warn!(python = %target.python, tried = ?nf.tried, "{msg}");
                say("bytecode", msg);
                None
            }
        }
    } else {
        None
    };

    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| archive::io_err(&opts.cache_dir, e))?;
    let key = cache::key(
        pkg,
        opts,
        &bootstrap_sha,
        interpreter.as_ref().map(|i| i.version.as_str()),
    )?;
    let _turn = cache::lock(&opts.cache_dir, &key).await?;
    if let Some(hit) = cache::load(&opts.cache_dir, &key) {
        tracing::info!(key = %key, zip = %hit.zip.display(), target = %target, "packaging cache hit");
        say(
            "archive",
            format!(
                "cached {} ({}){}",
                hit.zip.display(),
                human(hit.zipped_bytes),
                hit.layer.as_ref().map_or(String::new(), |l| format!(
                    ", with the SDK layer {} (dify_plugin {}, {})",
                    &l.sha256[..12],
                    l.manifest.sdk_version,
                    human(l.zipped_bytes)
                ))
            ),
        );
        return Ok(hit);
    }

    cache::sweep_tmp(&opts.cache_dir);
    // A private work directory in the cache's file system, so the final rename is atomic.
    let work = opts.cache_dir.join("tmp").join(format!(
        "{}-{}-{}",
        &key[..16],
        std::process::id(),
        started.elapsed().as_nanos() ^ rand::random::<u64>() as u128
    ));
    let result = build_in(
        pkg,
        opts,
        &work,
        &key,
        &bootstrap_bytes,
        interpreter,
        progress,
    )
    .await;
    let _ = std::fs::remove_dir_all(&work);
    let a = result?;
    tracing::info!(
        zip = %a.zip.display(), target = %target, zipped = a.zipped_bytes,
        unzipped = a.unzipped_bytes, bytecode = ?a.bytecode,
        elapsed_ms = started.elapsed().as_millis() as u64, "packaged"
    );
    Ok(a)
}

async fn build_in(
    pkg: &Package,
    opts: &Options,
    work: &Path,
    key: &str,
    bootstrap: &[u8],
    interpreter: Option<bytecode::Interpreter>,
    progress: &Progress,
) -> Result<Artifact, Error> {
    let say = |stage: &'static str, msg: String| {
        let _ = progress.send((stage, msg));
    };
    let target = opts.target;
    let root = work.join("root");
    let plugin = root.join("plugin");
    let vendor = root.join("vendor");
    std::fs::create_dir_all(&root).map_err(|e| archive::io_err(&root, e))?;

    say("package", format!("unpacking {}", pkg.unique_identifier()));
    // Disk writes stay off the async workers.
    let (p, dest) = (pkg.clone(), plugin.clone());
    tokio::task::spawn_blocking(move || {
        p.extract(&dest)?;
        archive::remove_junk(&dest)
    })
    .await
    .map_err(|e| Error::Packaging(format!("unpacking stopped: {e}")))??;

    std::fs::create_dir_all(&vendor).map_err(|e| archive::io_err(&vendor, e))?;
    // Parsed before any installer runs (the package's file never reaches uv), off the async
    // workers: a hostile file costs parsing time.
    let p = plugin.clone();
    let deps = tokio::task::spawn_blocking(move || Dependencies::read(&p))
        .await
        .map_err(|e| Error::Packaging(format!("dependency parsing task failed: {e}")))??;
    match deps {
        None => say(
            "dependencies",
            "no requirements.txt or pyproject.toml: nothing to install".into(),
        ),
        Some(deps) if deps.is_empty() => say(
            "dependencies",
            format!("{} lists no dependencies: nothing to install", deps.file),
        ),
        Some(deps) => {
            say(
                "dependencies",
                format!(
                    "installing {} requirements of {} for {} (Python {}){}",
                    deps.requirements.len(),
                    deps.file,
                    target.wheel_platform(),
                    target.python,
                    if opts.offline { ", offline" } else { "" }
                ),
            );
            let t = Instant::now();
            wheels::install(opts, &deps, &vendor, work).await?;
            say(
                "dependencies",
                format!("installed in {:.1} s", t.elapsed().as_secs_f64()),
            );
        }
    }
    // Console scripts name the build machine's interpreter in their shebang: useless on Lambda.
    let scripts = vendor.join("bin");
    if scripts.is_dir() {
        std::fs::remove_dir_all(&scripts).map_err(|e| archive::io_err(&scripts, e))?;
    }

    let sdk_layer = if opts.sdk_layer {
        with_layer(opts, &vendor, interpreter.as_ref(), progress).await?
    } else {
        None
    };

    let bytecode = match interpreter {
        Some(py) => {
            say(
                "bytecode",
                format!(
                    "compiling with Python {} ({})",
                    py.version,
                    py.path.display()
                ),
            );
            if let Some(failures) =
                bytecode::compile(&py, &root, &["plugin", "vendor"], "/var/task").await?
            {
                // Some files (Python 2 test data in a few packages) do not compile; the rest do.
                tracing::warn!(python = %py.version, output = %failures, "some files did not compile");
                say(
                    "bytecode",
                    format!("some files did not compile (shipped as source):\n{failures}"),
                );
            }
            Some(py.version)
        }
        None => None,
    };

    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).map_err(|e| archive::io_err(&bin, e))?;
    let dest = bin.join("bootstrap");
    std::fs::write(&dest, bootstrap).map_err(|e| archive::io_err(&dest, e))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| archive::io_err(&dest, e))?;
    }
    // The manifest's `resource.memory` sizes the function (`SRI_LAMBDA_MEMORY_MB` still
    // overrides it at deploy).
    let mut config =
        FunctionConfig::template(&target).with_manifest_memory(pkg.manifest.memory_bytes);
    if let Some(l) = &sdk_layer {
        config.layer = Some(l.reference());
        config
            .environment
            .insert("SRI_PYTHONPATH".into(), layer::PYTHONPATH.into());
    }
    let config_path = root.join("sri-function.json");
    std::fs::write(
        &config_path,
        serde_json::to_vec_pretty(&config).expect("config serializes"),
    )
    .map_err(|e| archive::io_err(&config_path, e))?;
    let record_path = root.join(crate::manifest::RECORD_FILE);
    std::fs::write(&record_path, pkg.manifest.record())
        .map_err(|e| archive::io_err(&record_path, e))?;

    let entries = archive::entries(&root)?;
    let unzipped_bytes: u64 = entries.iter().map(|e| e.size).sum();
    // Lambda's limit covers the function and its layers together.
    check_unzipped(unzipped_bytes + sdk_layer.as_ref().map_or(0, |l| l.unzipped_bytes))?;
    say(
        "archive",
        format!(
            "zipping {} files ({})",
            entries.len(),
            human(unzipped_bytes)
        ),
    );
    let tmp_zip = work.join("function.zip");
    let entries_for_zip = entries;
    let tmp = tmp_zip.clone();
    let (zipped_bytes, code_sha256) =
        tokio::task::spawn_blocking(move || archive::write_zip(&entries_for_zip, &tmp))
            .await
            .map_err(|e| Error::Packaging(format!("zip task failed: {e}")))??;
    let mut a = Artifact {
        zip: tmp_zip.clone(),
        code_sha256,
        zipped_bytes,
        unzipped_bytes,
        bytecode,
        cache_hit: false,
        target,
        config,
        layer: sdk_layer,
    };
    a.zip = cache::store(&opts.cache_dir, key, &tmp_zip, &a)?;
    say(
        "archive",
        format!(
            "wrote {} ({}{})",
            a.zip.display(),
            human(zipped_bytes),
            if a.needs_s3() {
                ", over the 50 MiB direct-upload limit: deploy through S3"
            } else {
                ""
            }
        ),
    );
    Ok(a)
}

/// The SDK layer for what was installed in `vendor` (none when the plugin's resolution has no
/// `dify_plugin`), built or found in the cache, and `vendor` trimmed against it.
async fn with_layer(
    opts: &Options,
    vendor: &Path,
    interpreter: Option<&bytecode::Interpreter>,
    progress: &Progress,
) -> Result<Option<layer::Layer>, Error> {
    let Some(sdk) = layer::sdk_version(vendor)? else {
        let _ = progress.send((
            "layer",
            "no dify_plugin among the dependencies: no SDK layer, the zip is self-contained".into(),
        ));
        return Ok(None);
    };
    let l = layer::build(opts, &sdk, interpreter, progress).await?;
    let (v, m) = (vendor.to_path_buf(), l.manifest.clone());
    let removed = tokio::task::spawn_blocking(move || layer::trim(&v, &m))
        .await
        .map_err(|e| Error::Packaging(format!("trimming stopped: {e}")))??;
    let kept = layer::installed(vendor)?;
    tracing::info!(sdk = %sdk, layer = %l.sha256, removed = removed.len(), kept = kept.len(), "trimmed vendor/ against the SDK layer");
    let _ = progress.send((
        "layer",
        format!(
            "SDK layer {} (dify_plugin {sdk}): {} distributions come from it, {} stay in the zip{}",
            &l.sha256[..12],
            removed.len(),
            kept.len(),
            if kept.is_empty() {
                String::new()
            } else {
                // At most a dozen names: a plugin may keep hundreds.
                format!(
                    " ({}{})",
                    kept.iter()
                        .take(12)
                        .map(|d| format!("{}=={}", d.name, d.version))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if kept.len() > 12 { ", …" } else { "" }
                )
            }
        ),
    ));
    Ok(Some(l))
}

/// Refuses a function over Lambda's unzipped limit, before anything is uploaded.
pub fn check_unzipped(unzipped_bytes: u64) -> Result<(), Error> {
    if unzipped_bytes > UNZIPPED_LIMIT {
        return Err(Error::Packaging(format!(
            "the function is {} unzipped, over Lambda's {} limit for zips; deploy it as a \
             container image instead (template/image/Dockerfile, see template/image/README.md), \
             or trim its dependencies",
            human(unzipped_bytes),
            human(UNZIPPED_LIMIT)
        )));
    }
    Ok(())
}

/// `12.3 MiB`.
pub fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Runs `cmd` (made by [`crate::child::command`]) to completion within `limit`, the way every
/// helper program runs (see [`crate::child`]), with its scratch directory in the system's temp
/// dir.
pub(crate) async fn run(
    cmd: tokio::process::Command,
    limit: Duration,
    what: &str,
) -> Result<crate::child::Output, Error> {
    crate::child::run(cmd, what, limit, &std::env::temp_dir(), Error::Packaging).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_paths_become_absolute_but_a_bare_program_name_does_not() {
        let mut o = Options::new(Target {
            arch: Arch::Arm64,
            python: PythonVersion::Py312,
        });
        o.cache_dir = PathBuf::from("c");
        o.wheelhouse = Some(PathBuf::from("wh"));
        o.uv = PathBuf::from("tools/uv");
        let a = o.absolute().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(a.cache_dir, cwd.join("c"));
        assert_eq!(a.wheelhouse, Some(cwd.join("wh")));
        assert_eq!(a.uv, cwd.join("tools/uv"));
        o.uv = PathBuf::from("uv");
        o.cache_dir = PathBuf::from("/var/cache/sri");
        let a = o.absolute().unwrap();
        assert_eq!(a.uv, PathBuf::from("uv"), "looked up on PATH");
        assert_eq!(a.cache_dir, PathBuf::from("/var/cache/sri"));
    }

    #[test]
    fn size_limits_say_what_to_do() {
        assert!(check_unzipped(UNZIPPED_LIMIT).is_ok());
        let e = check_unzipped(UNZIPPED_LIMIT + 1).unwrap_err().to_string();
        assert!(
            e.contains("250.0 MiB") && e.contains("template/image/Dockerfile"),
            "{e}"
        );
        let mut a = Artifact {
            zip: PathBuf::from("f.zip"),
            code_sha256: String::new(),
            zipped_bytes: DIRECT_UPLOAD_LIMIT,
            unzipped_bytes: 0,
            bytecode: None,
            cache_hit: false,
            target: Target {
                arch: Arch::Arm64,
                python: PythonVersion::Py312,
            },
            config: FunctionConfig::template(&Target {
                arch: Arch::Arm64,
                python: PythonVersion::Py312,
            }),
            layer: None,
        };
        assert!(!a.needs_s3());
        a.zipped_bytes += 1;
        assert!(a.needs_s3(), "over 50 MiB goes through S3");
    }
}
