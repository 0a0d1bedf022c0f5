//! The function zip itself: deterministic (sorted entries, fixed timestamps and modes) so that
//! the same inputs give the same `CodeSha256` and Lambda sees no change on a redeploy; and the
//! checks on what goes into it (the bootstrap's architecture, junk left out).

use base64::Engine;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::Arch;
use crate::Error;

/// Checks that `path` is an ELF executable for `arch` (the wrong architecture would only fail
/// on Lambda, as `Runtime.InvalidEntrypoint` / exec format error).
pub fn check_elf(path: &Path, arch: Arch) -> Result<(), Error> {
    let mut head = [0u8; 20];
    let mut f = std::fs::File::open(path).map_err(|e| {
        Error::Packaging(format!(
            "cannot read the bootstrap {}: {e}; build it with `make lambda-bootstrap` or pass \
             --bootstrap (SRI_BOOTSTRAP_{})",
            path.display(),
            arch.lambda_name().to_ascii_uppercase()
        ))
    })?;
    f.read_exact(&mut head)
        .ok()
        .filter(|_| head[..4] == *b"\x7fELF")
        .ok_or_else(|| {
            Error::Packaging(format!(
                "the bootstrap {} is not an ELF executable; pass the Linux build from \
                 `cargo lambda build --{}`",
                path.display(),
                if arch == Arch::Arm64 {
                    "arm64"
                } else {
                    "x86-64"
                }
            ))
        })?;
    // e_machine is at offset 18 in both ELF classes; EI_DATA (offset 5) says its byte order.
    let machine = if head[5] == 2 {
        u16::from_be_bytes([head[18], head[19]])
    } else {
        u16::from_le_bytes([head[18], head[19]])
    };
    if machine != arch.elf_machine() {
        let is = match machine {
            0xB7 => "aarch64 (arm64)".to_owned(),
            0x3E => "x86_64".to_owned(),
            m => format!("e_machine {m:#x}"),
        };
        return Err(Error::Packaging(format!(
            "the bootstrap {} is built for {is}, but the target is {}; pass the {} build \
             (`make lambda-bootstrap`, SRI_BOOTSTRAP_{})",
            path.display(),
            arch.machine(),
            arch.lambda_name(),
            arch.lambda_name().to_ascii_uppercase()
        )));
    }
    Ok(())
}

/// Names never shipped from a plugin package: caches and tooling that only cost bytes.
pub fn is_junk(name: &str) -> bool {
    matches!(
        name,
        "__pycache__"
            | ".git"
            | ".venv"
            | ".DS_Store"
            | ".idea"
            | ".vscode"
            | ".mypy_cache"
            | ".pytest_cache"
            | ".ruff_cache"
            | ".env"
    ) || name.ends_with(".pyc")
        || name.ends_with(".pyo")
}

/// Removes junk below `dir` (the unpacked package, before we compile anything ourselves).
pub fn remove_junk(dir: &Path) -> Result<(), Error> {
    for entry in read_dir(dir)? {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_junk(&name) {
            let r = if is_dir {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            r.map_err(|e| io_err(&path, e))?;
        } else if is_dir {
            remove_junk(&path)?;
        }
    }
    Ok(())
}

/// A file to put in the zip.
#[derive(Debug)]
pub struct Entry {
    /// Path in the zip (`/`-separated).
    pub name: String,
    /// Where it is on disk.
    pub path: PathBuf,
    /// Whether it is executable (mode 0755 instead of 0644).
    pub executable: bool,
    /// Its size.
    pub size: u64,
}

/// Every file below `root`, sorted by zip name. Links are never followed (the package's tree
/// holds none; one that an installer made would point wherever it likes), only reported.
pub fn entries(root: &Path) -> Result<Vec<Entry>, Error> {
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Entry>) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    for entry in read_dir(dir)? {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path).map_err(|e| io_err(&path, e))?;
        if meta.file_type().is_symlink() {
            tracing::warn!(path = %path.display(), "link left out of the function zip");
        } else if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let name = path
                .strip_prefix(root)
                .expect("below root")
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(Entry {
                name,
                executable: meta.permissions().mode() & 0o111 != 0,
                size: meta.len(),
                path,
            });
        }
    }
    Ok(())
}

/// Writes `entries` to `zip_path` deterministically; returns the zip's size and its
/// `CodeSha256` (base64 of the sha256 of the zip).
pub fn write_zip(entries: &[Entry], zip_path: &Path) -> Result<(u64, String), Error> {
    let file = std::fs::File::create(zip_path).map_err(|e| io_err(zip_path, e))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let base = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .compression_level(Some(6))
        // 1980-01-01, the zip epoch: builds of the same inputs are byte-identical.
        .last_modified_time(zip::DateTime::default())
        .large_file(false);
    let mut buf = Vec::new();
    for e in entries {
        let opts = base.unix_permissions(if e.executable { 0o755 } else { 0o644 });
        buf.clear();
        std::fs::File::open(&e.path)
            .and_then(|mut f| f.read_to_end(&mut buf))
            .map_err(|err| io_err(&e.path, err))?;
        zip.start_file(e.name.as_str(), opts)
            .and_then(|_| zip.write_all(&buf).map_err(Into::into))
            .map_err(|err| Error::Packaging(format!("writing {}: {err}", zip_path.display())))?;
    }
    let mut w = zip
        .finish()
        .map_err(|err| Error::Packaging(format!("writing {}: {err}", zip_path.display())))?;
    w.flush().map_err(|e| io_err(zip_path, e))?;
    w.get_ref().sync_all().map_err(|e| io_err(zip_path, e))?;
    drop(w);
    code_sha256(zip_path)
}

/// The zip's size and Lambda's `CodeSha256` of it.
pub fn code_sha256(zip_path: &Path) -> Result<(u64, String), Error> {
    let mut f = std::fs::File::open(zip_path).map_err(|e| io_err(zip_path, e))?;
    let mut h = Sha256::new();
    let n = std::io::copy(&mut f, &mut h).map_err(|e| io_err(zip_path, e))?;
    Ok((
        n,
        base64::engine::general_purpose::STANDARD.encode(h.finalize()),
    ))
}

fn read_dir(dir: &Path) -> Result<Vec<std::fs::DirEntry>, Error> {
    std::fs::read_dir(dir)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .map_err(|e| io_err(dir, e))
}

pub(super) fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Packaging(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_architecture_is_checked() {
        let dir = std::env::temp_dir().join(format!("sri-elf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut elf = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0];
        elf.resize(18, 0);
        elf.extend_from_slice(&0x3Eu16.to_le_bytes());
        let x86 = dir.join("x86");
        std::fs::write(&x86, &elf).unwrap();
        assert!(check_elf(&x86, Arch::X86_64).is_ok());
        let err = check_elf(&x86, Arch::Arm64).unwrap_err().to_string();
        assert!(
            err.contains("built for x86_64") && err.contains("SRI_BOOTSTRAP_ARM64"),
            "{err}"
        );
        let script = dir.join("script");
        std::fs::write(&script, "#!/bin/sh\necho hi there, not an elf\n").unwrap();
        let err = check_elf(&script, Arch::Arm64).unwrap_err().to_string();
        assert!(err.contains("not an ELF"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn zips_are_deterministic() {
        let dir = std::env::temp_dir().join(format!("sri-zip-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("b")).unwrap();
        std::fs::write(src.join("b/x.py"), "x = 1\n").unwrap();
        std::fs::write(src.join("a.txt"), "a").unwrap();
        let one = write_zip(&entries(&src).unwrap(), &dir.join("1.zip")).unwrap();
        // Different mtimes, same contents: same zip.
        std::fs::write(src.join("a.txt"), "a").unwrap();
        let two = write_zip(&entries(&src).unwrap(), &dir.join("2.zip")).unwrap();
        assert_eq!(one, two);
        let names: Vec<String> = entries(&src).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["a.txt", "b/x.py"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
