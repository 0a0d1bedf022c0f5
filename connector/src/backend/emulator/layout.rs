//! A function's directory as Lambda lays one out: the zip unpacked into a read-only task root,
//! a writable `tmp/` of its own (Lambda's `/tmp`), and the one-binary Cargo manifest
//! `cargo lambda watch` needs to route the function's name.
//!
//! ```text
//! {data}/emulator/{name}/meta.json   the function (written last: a complete build)
//!                       task/        the zip, unpacked (LAMBDA_TASK_ROOT), read-only
//!                       tmp/         TMPDIR, emptied at every start
//!                       cargo/       Cargo.toml + src/main.rs, cargo lambda's working dir
//! {data}/emulator/layers/{sha256}/       an SDK layer, unpacked once, read-only: the stand-in
//!                                        for Lambda's `/opt` (cargo lambda cannot mount it)
//! ```

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::Error;

/// The task root inside a function directory.
pub fn task(dir: &Path) -> PathBuf {
    dir.join("task")
}

/// The function's writable scratch directory (Lambda's `/tmp`).
pub fn tmp(dir: &Path) -> PathBuf {
    dir.join("tmp")
}

/// cargo lambda's working directory.
pub fn cargo(dir: &Path) -> PathBuf {
    dir.join("cargo")
}

/// The directory an SDK layer is unpacked into (`{data}/emulator/layers/{sha256}`).
pub fn layer(emulator: &Path, sha256: &str) -> PathBuf {
    emulator.join("layers").join(sha256)
}

/// Unpacks `zip` into `dir/task`, refusing entries that would land outside it and stopping at
/// Lambda's unzipped limit, then makes the tree read-only. Blocking: run it off the async
/// workers.
pub fn unpack(zip: &Path, dir: &Path) -> Result<u64, Error> {
    unpack_into(zip, &task(dir))
}

/// [`unpack`] into `root` itself.
pub fn unpack_into(zip: &Path, root: &Path) -> Result<u64, Error> {
    let file = std::fs::File::open(zip).map_err(|e| io(format!("opening {}", zip.display()), e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::Backend(format!("reading {}: {e}", zip.display())))?;
    let root = root.to_path_buf();
    std::fs::create_dir_all(&root).map_err(|e| io(format!("creating {}", root.display()), e))?;
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| Error::Backend(format!("reading {}: {e}", zip.display())))?;
        // Our own zip, but a path is never joined unchecked.
        let rel = entry
            .enclosed_name()
            .filter(|p| p.components().all(|c| matches!(c, Component::Normal(_))));
        let Some(rel) = rel else {
            return Err(Error::Backend(format!(
                "{} holds an entry outside its root: {}",
                zip.display(),
                entry.name()
            )));
        };
        let out = root.join(rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&out)
                .map_err(|e| io(format!("creating {}", out.display()), e))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| io(format!("creating {}", parent.display()), e))?;
        }
        let mut f = std::fs::File::create(&out)
            .map_err(|e| io(format!("creating {}", out.display()), e))?;
        let limit =
            crate::packaging::UNZIPPED_LIMIT + 1 - total.min(crate::packaging::UNZIPPED_LIMIT);
        let n = std::io::copy(&mut (&mut entry).take(limit), &mut f)
            .map_err(|e| io(format!("writing {}", out.display()), e))?;
        total += n;
        crate::packaging::check_unzipped(total)?;
        let mode = entry.unix_mode().unwrap_or(0o644) & 0o555;
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode | 0o444))
            .map_err(|e| io(format!("setting the mode of {}", out.display()), e))?;
    }
    set_tree_writable(&root, false)?;
    Ok(total)
}

/// Makes every directory under `root` (itself included) writable by its owner or not. Files
/// were made read-only as they were written; a read-only directory is what keeps new files
/// out for a user that is not root (for root, see `readonly`).
pub fn set_tree_writable(root: &Path, writable: bool) -> Result<(), Error> {
    let mode = if writable { 0o755 } else { 0o555 };
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let meta = match std::fs::symlink_metadata(&d) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("reading {}", d.display()), e)),
        };
        if !meta.is_dir() {
            continue;
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))
            .map_err(|e| io(format!("setting the mode of {}", d.display()), e))?;
        let entries =
            std::fs::read_dir(&d).map_err(|e| io(format!("reading {}", d.display()), e))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
    }
    Ok(())
}

/// How long a freshly unpacked SDK layer is kept by gc even when no function names it yet: a
/// launch unpacks the layer before the function that will use it.
pub const LAYER_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Removes the unpacked SDK layers under `emulator/layers` that no function directory (complete
/// or being built) names in its `sri-function.json`, unless unpacked within `grace`; returns
/// `sdk-layer-{sha256}` of each. Blocking.
pub fn remove_unused_layers(emulator: &Path, grace: std::time::Duration) -> Vec<String> {
    let mut used = std::collections::HashSet::new();
    for entry in std::fs::read_dir(emulator).into_iter().flatten().flatten() {
        let config = task(&entry.path()).join("sri-function.json");
        let layer = std::fs::read(&config)
            .ok()
            .and_then(|t| serde_json::from_slice::<crate::packaging::FunctionConfig>(&t).ok())
            .and_then(|c| c.layer);
        if let Some(l) = layer {
            used.insert(l.sha256);
        }
    }
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(emulator.join("layers"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let young = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < grace);
        if used.contains(&name) || young {
            continue;
        }
        let path = entry.path();
        let _ = set_tree_writable(&path, true);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push(format!("sdk-layer-{name}")),
            Err(e) => {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove an unused SDK layer")
            }
        }
    }
    removed
}

/// Removes a function directory, read-only task root included.
pub fn remove(dir: &Path) -> Result<(), Error> {
    set_tree_writable(&task(dir), true)?;
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing {}", dir.display()), e)),
    }
}

/// Writes the Cargo manifest whose one binary is named `name`: `cargo lambda watch` only routes
/// function names that are binaries of the workspace it runs in (it never builds this one: the
/// function is started by the backend, `--only-lambda-apis`).
pub fn write_cargo_shim(dir: &Path, name: &str) -> Result<(), Error> {
    let cargo = cargo(dir);
    let src = cargo.join("src");
    std::fs::create_dir_all(&src).map_err(|e| io(format!("creating {}", src.display()), e))?;
    let manifest = format!(
        "# Written by sri: lets `cargo lambda watch` route the function `{name}`.\n\
         [package]\nname = \"sri-emulated-function\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[[bin]]\nname = \"{name}\"\npath = \"src/main.rs\"\n\n[workspace]\n"
    );
    let path = cargo.join("Cargo.toml");
    std::fs::write(&path, manifest).map_err(|e| io(format!("writing {}", path.display()), e))?;
    let main = src.join("main.rs");
    std::fs::write(&main, "fn main() {}\n")
        .map_err(|e| io(format!("writing {}", main.display()), e))
}

/// Empties (or creates) the function's `tmp/`: like Lambda's `/tmp`, it starts empty with
/// every new sandbox.
pub fn fresh_tmp(dir: &Path) -> Result<PathBuf, Error> {
    let t = tmp(dir);
    let _ = std::fs::remove_dir_all(&t);
    std::fs::create_dir_all(&t).map_err(|e| io(format!("creating {}", t.display()), e))?;
    Ok(t)
}

fn io(context: String, e: std::io::Error) -> Error {
    Error::Backend(format!("{context}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_zip_unpacks_read_only_and_removes_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let zip_path = dir.path().join("f.zip");
        {
            let f = std::fs::File::create(&zip_path).unwrap();
            let mut w = zip::ZipWriter::new(f);
            let o = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
            w.start_file("bin/bootstrap", o).unwrap();
            w.write_all(b"#!/bin/sh\n").unwrap();
            w.start_file("plugin/main.py", o.unix_permissions(0o644))
                .unwrap();
            w.write_all(b"print(1)\n").unwrap();
            w.finish().unwrap();
        }
        let f = dir.path().join("fn");
        assert_eq!(unpack(&zip_path, &f).unwrap(), 19);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&task(&f).join("bin/bootstrap")), 0o555);
        assert_eq!(mode(&task(&f).join("plugin/main.py")), 0o444);
        assert_eq!(mode(&task(&f).join("plugin")), 0o555);
        write_cargo_shim(
            &f,
            "sri-a-b-0123456789abcdef-0123456789abcdef0123456789abcdef",
        )
        .unwrap();
        let toml = std::fs::read_to_string(cargo(&f).join("Cargo.toml")).unwrap();
        assert!(toml.contains("name = \"sri-a-b-0123456789abcdef"), "{toml}");
        remove(&f).unwrap();
        assert!(!f.exists());
    }
}
