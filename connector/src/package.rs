//! `.difypkg` packages: reading them, checking their manifest, and identifying them exactly as
//! the Dify daemon does.
//!
//! The daemon's checksum is not the file's sha256: it is sha256 over, for every zip entry sorted
//! bytewise by path, `sha256(path) ‖ sha256(content)` (`checksum.go`). Signing a package does not
//! change it, and it is what the daemon's filenames and identifiers carry.

use sha2::{Digest, Sha256};
use std::io::{Cursor, Read};
use std::path::Path;

use crate::Error;
use crate::manifest::Manifest;

/// The daemon's default `MAX_PLUGIN_PACKAGE_SIZE`.
pub const DEFAULT_MAX_PACKAGE_BYTES: usize = 50 * 1024 * 1024;

/// A checked plugin package.
#[derive(Debug, Clone)]
pub struct Package {
    /// The package bytes (a zip).
    pub bytes: bytes::Bytes,
    /// Its manifest.
    pub manifest: Manifest,
    /// The daemon's checksum (hex).
    pub checksum: String,
}

impl Package {
    /// Reads and checks a package: size, zip, manifest (python runner, entrypoint present).
    pub fn read(bytes: bytes::Bytes, max_bytes: usize) -> Result<Self, Error> {
        if bytes.len() > max_bytes {
            return Err(Error::Package(format!(
                "the package has {} bytes, over the limit of {max_bytes} (MAX_PLUGIN_PACKAGE_SIZE)",
                bytes.len()
            )));
        }
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes.clone())).map_err(|e| {
            Error::Package(format!(
                "not a zip archive ({e}); upload the .difypkg made by `dify plugin package`"
            ))
        })?;
        let mut entries: Vec<(String, Vec<u8>)> = Vec::with_capacity(zip.len());
        for i in 0..zip.len() {
            let mut f = zip
                .by_index(i)
                .map_err(|e| Error::Package(format!("zip entry {i} is unreadable: {e}")))?;
            if f.is_dir() {
                continue;
            }
            let name = f.name().to_owned();
            if f.enclosed_name().is_none() {
                return Err(Error::Package(format!(
                    "zip entry `{name}` points outside the package"
                )));
            }
            let mut content = Vec::with_capacity(f.size() as usize);
            f.read_to_end(&mut content)
                .map_err(|e| Error::Package(format!("zip entry `{name}` is unreadable: {e}")))?;
            entries.push((name, content));
        }
        let manifest_text = entries
            .iter()
            .find(|(n, _)| n == "manifest.yaml")
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .ok_or_else(|| Error::Package("manifest.yaml is missing at the package root".into()))?;
        let manifest = Manifest::parse(&manifest_text).map_err(|reason| Error::Manifest {
            path: "manifest.yaml".into(),
            reason,
        })?;
        let module = manifest.entrypoint.replace('.', "/");
        let has_entry = entries
            .iter()
            .any(|(n, _)| *n == format!("{module}.py") || *n == format!("{module}/__init__.py"));
        if !has_entry {
            return Err(Error::Package(format!(
                "the entrypoint `{}` (meta.runner.entrypoint) has no `{module}.py` in the package",
                manifest.entrypoint
            )));
        }
        let checksum = checksum(&mut entries);
        Ok(Self {
            bytes,
            manifest,
            checksum,
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

    /// Unpacks the package into `dir` (which must not exist yet).
    pub fn extract(&self, dir: &Path) -> Result<(), Error> {
        let mut zip = zip::ZipArchive::new(Cursor::new(self.bytes.clone()))
            .map_err(|e| Error::Package(e.to_string()))?;
        zip.extract(dir)
            .map_err(|e| Error::Package(format!("cannot unpack into {}: {e}", dir.display())))
    }
}

/// The daemon's package checksum over `(path, content)` entries (sorted here).
pub fn checksum(entries: &mut [(String, Vec<u8>)]) -> String {
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut outer = Sha256::new();
    for (path, content) in entries.iter() {
        outer.update(Sha256::digest(path.as_bytes()));
        outer.update(Sha256::digest(content));
    }
    hex::encode(outer.finalize())
}

/// Parses the daemon's `filename` query (`author@name@version@checksum.difypkg`) into its
/// checksum.
pub fn checksum_of_filename(filename: &str) -> Option<&str> {
    let stem = filename.strip_suffix(".difypkg")?;
    let checksum = stem.rsplit('@').next()?;
    (checksum.len() == 64 && checksum.bytes().all(|b| b.is_ascii_hexdigit())).then_some(checksum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn zip_of(files: &[(&str, &str)]) -> bytes::Bytes {
        let mut buf = Cursor::new(Vec::new());
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
        let pkg = Package::read(
            zip_of(&[("manifest.yaml", MANIFEST), ("main.py", "print(1)")]),
            1 << 20,
        )
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
            let err = Package::read(bytes, 1 << 20).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = Package::read(zip_of(&[("manifest.yaml", MANIFEST)]), 10)
            .unwrap_err()
            .to_string();
        assert!(err.contains("MAX_PLUGIN_PACKAGE_SIZE"), "{err}");
    }
}
