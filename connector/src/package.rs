//! `.difypkg` packages: read through the [intake](crate::intake), their manifest checked, and
//! identified exactly as the Dify daemon does.
//!
//! The daemon's checksum is not the file's sha256: it is sha256 over, for every zip entry sorted
//! bytewise by path, `sha256(path) ‖ sha256(content)` (`checksum.go`). Signing a package does not
//! change it, and it is what the daemon's filenames and identifiers carry. What the daemon says
//! about a package (its filename, its metadata) is checked against what we computed.

use std::path::Path;
use std::sync::Arc;

use crate::Error;
use crate::intake::{self, Limits, Tree};
use crate::manifest::Manifest;

pub use crate::intake::DEFAULT_MAX_PACKAGE_BYTES;

/// Largest `manifest.yaml` read (real ones are a few KiB).
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

/// A checked plugin package.
#[derive(Debug, Clone)]
pub struct Package {
    /// The package bytes as received: only ever sent on (`sri deploy`), never read as a zip
    /// again.
    pub bytes: bytes::Bytes,
    /// Its manifest.
    pub manifest: Manifest,
    /// The daemon's checksum (hex).
    pub checksum: String,
    /// Its validated files.
    pub tree: Arc<Tree>,
}

impl Package {
    /// Reads and checks a package with the default limits, unpacking it in the system's
    /// temporary directory (the CLI's way; `sri serve` goes through an [`intake::Intake`]).
    /// Blocking.
    pub fn read(bytes: bytes::Bytes) -> Result<Self, Error> {
        Self::read_in(bytes, &Limits::default(), &std::env::temp_dir())
    }

    /// Reads and checks a package: the intake's rules, then the manifest (python runner,
    /// identity as the daemon checks it, entrypoint present). Blocking.
    pub fn read_in(bytes: bytes::Bytes, limits: &Limits, scratch: &Path) -> Result<Self, Error> {
        let unpacked = intake::unpack(&bytes, limits, scratch)?;
        let tree = unpacked.tree;
        let manifest_bytes = tree
            .read_small("manifest.yaml", MAX_MANIFEST_BYTES)?
            .ok_or_else(|| Error::Package("manifest.yaml is missing at the package root".into()))?;
        let manifest_text = String::from_utf8(manifest_bytes).map_err(|_| Error::Manifest {
            path: "manifest.yaml".into(),
            reason: "it is not UTF-8 text".into(),
        })?;
        let manifest = Manifest::parse(&manifest_text).map_err(|reason| Error::Manifest {
            path: "manifest.yaml".into(),
            reason,
        })?;
        let module = manifest.entrypoint.replace('.', "/");
        if !tree.has(&format!("{module}.py")) && !tree.has(&format!("{module}/__init__.py")) {
            return Err(Error::Package(format!(
                "the entrypoint `{}` (meta.runner.entrypoint) has no `{module}.py` in the package",
                manifest.entrypoint
            )));
        }
        Ok(Self {
            bytes,
            manifest,
            checksum: unpacked.checksum,
            tree: Arc::new(tree),
        })
    }

    /// `author/name:version@checksum`, Dify's `plugin_unique_identifier`.
    pub fn unique_identifier(&self) -> String {
        format!("{}@{}", self.manifest.identity(), self.checksum)
    }

    /// `author@name@version@checksum.difypkg`, the filename the daemon uses.
    pub fn filename(&self) -> String {
        let m = &self.manifest;
        format!(
            "{}@{}@{}@{}.difypkg",
            m.author, m.name, m.version, self.checksum
        )
    }

    /// Unpacks the package into `dir` (which must not exist yet): the validated files with
    /// normalised modes. Blocking.
    pub fn extract(&self, dir: &Path) -> Result<(), Error> {
        self.tree.copy_to(dir)
    }

    /// Checks what the daemon says about the package against what it is: the upload's
    /// filename and `metadata.plugin_unique_identifier`, when given, must carry our checksum
    /// and identity.
    pub fn check_claims(
        &self,
        filename: Option<&str>,
        metadata: Option<&str>,
    ) -> Result<(), Error> {
        if let Some(f) = filename {
            let shown: String = f.chars().take(200).collect();
            match checksum_of_filename(f) {
                Some(c) if c == self.checksum => {}
                Some(c) => {
                    return Err(Error::Package(format!(
                        "the upload's filename `{shown}` carries the checksum {c}, but the \
                         package's checksum is {}; the package changed after it was named",
                        self.checksum
                    )));
                }
                None => {
                    return Err(Error::Package(format!(
                        "the upload's filename `{shown}` is not \
                         `author@name@version@checksum.difypkg`"
                    )));
                }
            }
        }
        if let Some(m) = metadata {
            let claimed = serde_json::from_str::<serde_json::Value>(m)
                .ok()
                .and_then(|v| {
                    v.get("plugin_unique_identifier")?
                        .as_str()
                        .map(str::to_owned)
                });
            let ours = self.unique_identifier();
            match claimed {
                Some(c) if c == ours => {}
                Some(c) => {
                    return Err(Error::Package(format!(
                        "metadata.plugin_unique_identifier is `{}`, but the package is `{ours}`",
                        c.chars().take(300).collect::<String>()
                    )));
                }
                None => {
                    return Err(Error::Package(
                        "the `metadata` part is not `{\"plugin_unique_identifier\":\"…\"}`".into(),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads a `.difypkg`, or packs a plugin directory the way the daemon can checksum it (files
/// only, no directory entries; `__pycache__`, `.venv` and `.git` left out), then reads that
/// through the intake like any package. A directory is the operator's own input: a link inside
/// it is followed only when it stays inside the directory, and each directory is visited once.
pub fn load(path: &Path) -> Result<Package, Error> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Package(format!("cannot read {}: {e}", path.display())))?;
    let bytes = if meta.is_dir() {
        pack_dir(path)?
    } else {
        let len = meta.len();
        if len > DEFAULT_MAX_PACKAGE_BYTES as u64 {
            return Err(Error::Package(format!(
                "{} has {len} bytes, over the limit of {DEFAULT_MAX_PACKAGE_BYTES} \
                 (MAX_PLUGIN_PACKAGE_SIZE)",
                path.display()
            )));
        }
        std::fs::read(path)
            .map_err(|e| Error::Package(format!("cannot read {}: {e}", path.display())))?
    };
    Package::read(bytes::Bytes::from(bytes))
}

fn pack_dir(dir: &Path) -> Result<Vec<u8>, Error> {
    use std::io::Write;
    let root = dir
        .canonicalize()
        .map_err(|e| Error::Package(format!("{}: {e}", dir.display())))?;
    let mut files = Vec::new();
    let mut seen = std::collections::HashSet::new();
    collect(&root, &root, "", &mut seen, &mut files)?;
    files.sort();
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut buf);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut total = 0u64;
    for (rel, real) in files {
        let content = std::fs::read(&real).map_err(|e| Error::Package(format!("{rel}: {e}")))?;
        total += content.len() as u64;
        if total > Limits::default().max_unpacked_bytes {
            return Err(Error::Package(format!(
                "{} holds more than {} bytes; is it the plugin's directory?",
                dir.display(),
                Limits::default().max_unpacked_bytes
            )));
        }
        zip.start_file(rel.as_str(), opts)
            .map_err(|e| Error::Package(e.to_string()))?;
        zip.write_all(&content)
            .map_err(|e| Error::Package(e.to_string()))?;
    }
    zip.finish().map_err(|e| Error::Package(e.to_string()))?;
    Ok(buf.into_inner())
}

/// Collects `(path in the package, real path)` of every file below `dir` (already resolved,
/// inside `root`).
fn collect(
    root: &Path,
    dir: &Path,
    prefix: &str,
    seen: &mut std::collections::HashSet<std::path::PathBuf>,
    out: &mut Vec<(String, std::path::PathBuf)>,
) -> Result<(), Error> {
    if !seen.insert(dir.to_path_buf()) {
        return Err(Error::Package(format!(
            "{} is reached twice through links (a link loop?); remove the link",
            dir.display()
        )));
    }
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::Package(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if matches!(name.as_str(), "__pycache__" | ".venv" | ".git") {
            continue;
        }
        let rel = format!("{prefix}{name}");
        let path = entry.path();
        // Links resolve to where they point, which must be inside the plugin's directory.
        let real = path
            .canonicalize()
            .map_err(|e| Error::Package(format!("{}: {e}", path.display())))?;
        if !real.starts_with(root) {
            return Err(Error::Package(format!(
                "{} is a link to {}, outside the plugin's directory; copy the file in instead",
                path.display(),
                real.display()
            )));
        }
        let meta = std::fs::metadata(&real)
            .map_err(|e| Error::Package(format!("{}: {e}", real.display())))?;
        if meta.is_dir() {
            collect(root, &real, &format!("{rel}/"), seen, out)?;
        } else if meta.is_file() {
            out.push((rel, real));
        } else {
            return Err(Error::Package(format!(
                "{} is neither a file nor a directory; remove it",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Parses the daemon's `filename` query (`author@name@version@checksum.difypkg`) into its
/// checksum (lowercase hex, as the daemon writes it).
pub fn checksum_of_filename(filename: &str) -> Option<&str> {
    let stem = filename.strip_suffix(".difypkg")?;
    let checksum = stem.rsplit('@').next()?;
    (checksum.len() == 64
        && checksum
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(checksum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    pub(crate) fn zip_of(files: &[(&str, &str)]) -> bytes::Bytes {
        let mut buf = std::io::Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        for (name, content) in files {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(content.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        buf.into_inner().into()
    }

    const MANIFEST: &str = "version: 0.1.0\nauthor: a\nname: p\nmeta:\n  runner:\n    language: python\n    version: \"3.12\"\n    entrypoint: main\n";

    #[test]
    fn identifies_like_the_daemon() {
        let pkg = Package::read(zip_of(&[
            ("manifest.yaml", MANIFEST),
            ("main.py", "print(1)"),
        ]))
        .unwrap();
        // sha256(sha256("main.py") ‖ sha256("print(1)") ‖ sha256("manifest.yaml") ‖ sha256(MANIFEST))
        let mut h = Sha256::new();
        for part in ["main.py", "print(1)", "manifest.yaml", MANIFEST] {
            h.update(Sha256::digest(part.as_bytes()));
        }
        assert_eq!(pkg.checksum, hex::encode(h.finalize()));
        assert_eq!(
            pkg.unique_identifier(),
            format!("a/p:0.1.0@{}", pkg.checksum)
        );
        assert_eq!(
            checksum_of_filename(&pkg.filename()),
            Some(pkg.checksum.as_str())
        );
        pkg.check_claims(
            Some(&pkg.filename()),
            Some(&format!(
                "{{\"plugin_unique_identifier\":\"{}\"}}",
                pkg.unique_identifier()
            )),
        )
        .unwrap();
        let other = "0".repeat(64);
        let err = pkg
            .check_claims(Some(&format!("a@p@0.1.0@{other}.difypkg")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&other) && err.contains(&pkg.checksum), "{err}");
        let err = pkg
            .check_claims(
                None,
                Some(&format!(
                    "{{\"plugin_unique_identifier\":\"a/p:0.1.0@{other}\"}}"
                )),
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("metadata.plugin_unique_identifier"), "{err}");
    }

    #[test]
    fn broken_packages_say_what_is_wrong() {
        let cases = [
            (bytes::Bytes::from_static(b"not a zip"), "not a zip"),
            (zip_of(&[("main.py", "")]), "manifest.yaml is missing"),
            (
                zip_of(&[
                    ("manifest.yaml", &MANIFEST.replace("python", "go")),
                    ("main.py", ""),
                ]),
                "only `python`",
            ),
            (zip_of(&[("manifest.yaml", MANIFEST)]), "has no `main.py`"),
        ];
        for (bytes, needle) in cases {
            let err = Package::read(bytes).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let limits = Limits {
            max_package_bytes: 10,
            ..Limits::default()
        };
        let err = Package::read_in(
            zip_of(&[("manifest.yaml", MANIFEST)]),
            &limits,
            &std::env::temp_dir(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("MAX_PLUGIN_PACKAGE_SIZE"), "{err}");
    }
}
