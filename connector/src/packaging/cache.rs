//! The artifact cache: a built zip is kept under `cache_dir/<key>.zip` with its metadata in
//! `<key>.json`, so deploying the same package for the same target again costs a file lookup
//! instead of a dependency install.
//!
//! The key covers every input that changes the zip. Both files are written to a temporary name
//! and renamed into place, the metadata last: an interrupted build leaves no entry, never a
//! truncated one. Builds of one key take turns ([`lock`]): two at once (two installs of a
//! plugin, or two plugins wanting the same SDK layer) could otherwise leave one's zip under the
//! other's metadata.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use super::archive::io_err;
use super::{Artifact, FunctionConfig, Options, Target};
use crate::Error;
use crate::package::Package;

/// Bumped whenever the packager changes what it writes for the same inputs.
const LAYOUT_VERSION: &str = "sri-packaging/1";

/// The cache key (hex sha256) for building `pkg` with `opts`, given the bytecode interpreter
/// version that would be used (`None`: no bytecode).
pub fn key(
    pkg: &Package,
    opts: &Options,
    bootstrap_sha256: &str,
    bytecode: Option<&str>,
) -> Result<String, Error> {
    let mut h = Sha256::new();
    let mut field = |name: &str, value: &str| {
        // Length-prefixed, so that no two field sequences hash alike.
        h.update(name.as_bytes());
        h.update((value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    };
    field("layout", LAYOUT_VERSION);
    field("packager", env!("CARGO_PKG_VERSION"));
    field("package", &pkg.checksum);
    field("arch", opts.target.arch.lambda_name());
    field("python", opts.target.python.as_str());
    field("platform", &opts.target.uv_platform());
    field("bootstrap", bootstrap_sha256);
    field("template", super::target::FUNCTION_TEMPLATE);
    field("offline", if opts.offline { "1" } else { "0" });
    field("bytecode", bytecode.unwrap_or("none"));
    field("index", opts.index_url.as_deref().unwrap_or(""));
    field("sdk-layer", if opts.sdk_layer { "1" } else { "0" });
    field(
        "wheelhouse",
        &match &opts.wheelhouse {
            Some(dir) => wheelhouse_listing(dir)?,
            None => String::new(),
        },
    );
    Ok(hex::encode(h.finalize()))
}

/// `name size` of every file in the wheelhouse, sorted: a new or replaced wheel changes it.
pub(super) fn wheelhouse_listing(dir: &Path) -> Result<String, Error> {
    let mut lines = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::Packaging(format!(
            "the wheelhouse {} is unreadable: {e}; pass an existing directory of wheels",
            dir.display()
        ))
    })?;
    for e in entries.flatten() {
        if let Ok(m) = e.metadata()
            && m.is_file()
        {
            lines.push(format!("{} {}", e.file_name().to_string_lossy(), m.len()));
        }
    }
    lines.sort();
    Ok(lines.join("\n"))
}

/// What is stored beside a cached zip.
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    code_sha256: String,
    zipped_bytes: u64,
    unzipped_bytes: u64,
    bytecode: Option<String>,
    target: Target,
    config: FunctionConfig,
    /// The cache key of the SDK layer the zip was trimmed against.
    #[serde(default)]
    layer: Option<String>,
}

/// Held while a cache entry is looked up and, if missing, built and stored; released on drop.
#[derive(Debug)]
pub struct KeyLock {
    _file: std::fs::File,
}

/// Waits for the turn to build `key` in `cache_dir` (an advisory lock on `<key>.lock`, so other
/// connector processes sharing the cache take turns too). Whoever comes second then finds the
/// first one's entry instead of building it again.
pub async fn lock(cache_dir: &Path, key: &str) -> Result<KeyLock, Error> {
    let path = cache_dir.join(format!("{key}.lock"));
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        file.lock().map_err(|e| io_err(&path, e))?;
        Ok(KeyLock { _file: file })
    })
    .await
    .map_err(|e| Error::Packaging(format!("waiting for the packaging cache lock: {e}")))?
}

/// The paths of a cache entry.
pub fn paths(cache_dir: &Path, key: &str) -> (PathBuf, PathBuf) {
    (
        cache_dir.join(format!("{key}.zip")),
        cache_dir.join(format!("{key}.json")),
    )
}

/// The cached artifact for `key`, if a complete one exists.
pub fn load(cache_dir: &Path, key: &str) -> Option<Artifact> {
    let (zip, json) = paths(cache_dir, key);
    let meta: Meta = serde_json::from_slice(&std::fs::read(&json).ok()?).ok()?;
    // A zip of another size is not the one the metadata describes: rebuild.
    let len = std::fs::metadata(&zip).ok()?.len();
    if len != meta.zipped_bytes {
        tracing::warn!(zip = %zip.display(), "cached zip does not match its metadata; rebuilding");
        return None;
    }
    // A zip trimmed against a layer is only usable with that very layer (same content).
    let layer = match &meta.layer {
        Some(k) => {
            let l = super::layer::load(cache_dir, k)?;
            let named = meta.config.layer.as_ref().map(|r| r.sha256.as_str());
            if named != Some(l.sha256.as_str()) {
                tracing::warn!(zip = %zip.display(), "cached zip was trimmed against another build of its SDK layer; rebuilding");
                return None;
            }
            Some(l)
        }
        None => None,
    };
    Some(Artifact {
        zip,
        code_sha256: meta.code_sha256,
        zipped_bytes: meta.zipped_bytes,
        unzipped_bytes: meta.unzipped_bytes,
        bytecode: meta.bytecode,
        cache_hit: true,
        target: meta.target,
        config: meta.config,
        layer,
    })
}

/// Moves a finished zip (on the same file system) into the cache and records its metadata.
pub fn store(cache_dir: &Path, key: &str, built: &Path, a: &Artifact) -> Result<PathBuf, Error> {
    let (zip, json) = paths(cache_dir, key);
    std::fs::rename(built, &zip).map_err(|e| io_err(&zip, e))?;
    let meta = Meta {
        code_sha256: a.code_sha256.clone(),
        zipped_bytes: a.zipped_bytes,
        unzipped_bytes: a.unzipped_bytes,
        bytecode: a.bytecode.clone(),
        target: a.target,
        config: a.config.clone(),
        layer: a.layer.as_ref().map(|l| l.key.clone()),
    };
    let tmp = json.with_extension(format!("json.tmp{}", std::process::id()));
    let text = serde_json::to_vec_pretty(&meta).expect("metadata serializes");
    std::fs::write(&tmp, text).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, &json).map_err(|e| io_err(&json, e))?;
    Ok(zip)
}

/// Removes work directories of builds that were interrupted (killed) more than a day ago; a
/// build in progress is never that old.
pub fn sweep_tmp(cache_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(cache_dir.join("tmp")) else {
        return;
    };
    let day = std::time::Duration::from_secs(24 * 3600);
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > day);
        if stale {
            tracing::info!(dir = %e.path().display(), "removing an interrupted build's work directory");
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builds_of_one_key_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let first = lock(dir.path(), "k").await.unwrap();
        let other = lock(dir.path(), "other").await.unwrap();
        let second = tokio::spawn({
            let dir = dir.path().to_owned();
            async move { lock(&dir, "k").await.unwrap() }
        });
        // A lock on the same key is not granted while the first is held...
        let path = dir.path().join("k.lock");
        let probe = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(probe.try_lock().is_err(), "the first holder has it");
        drop(first);
        // ...and is once it is released.
        let held = tokio::time::timeout(std::time::Duration::from_secs(10), second)
            .await
            .expect("the second build got its turn within 10 s")
            .unwrap();
        assert!(probe.try_lock().is_err(), "now the second holder has it");
        drop((held, other));
        assert!(probe.try_lock().is_ok());
    }
}
