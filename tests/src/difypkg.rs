//! `.difypkg` packages as the Dify daemon makes and names them, for driving the connector.
//!
//! A package is a zip of the plugin directory. The daemon identifies it by a **checksum that is
//! not the file's sha256**: for every zip entry, sorted bytewise by path, `sha256(path) ‖
//! sha256(content)`, all hashed again with sha256 (dify-wire.md, "Filename/identifier";
//! daemon `pkg/plugin_packager/decoder/checksum.go`). A zip holding directory entries (what
//! `zip -r` makes) cannot be checksummed by the daemon at all ("is a directory"), so the packages
//! built here hold files only.

use sha2::{Digest, Sha256};
use std::io::{Cursor, Read, Write};
use std::path::Path;

/// Directory names never packed (bytecode caches, virtual environments, VCS metadata).
pub const SKIPPED_DIRS: &[&str] = &["__pycache__", ".venv", ".git"];

/// A built package with the identity the daemon derives from it.
#[derive(Debug, Clone)]
pub struct Package {
    /// The `.difypkg` bytes.
    pub bytes: Vec<u8>,
    /// `author` from `manifest.yaml`.
    pub author: String,
    /// `name` from `manifest.yaml`.
    pub name: String,
    /// `version` from `manifest.yaml`.
    pub version: String,
    /// The daemon's checksum ([`daemon_checksum`]); for bytes that are not a zip the daemon can
    /// read, the plain sha256 of the bytes (the daemon itself would never send such a package;
    /// the tests do, to check the connector copes).
    pub checksum: String,
}

impl Package {
    /// Packs a plugin directory (see [`collect_dir`]) and reads its identity from its
    /// `manifest.yaml`.
    pub fn from_dir(dir: &Path) -> Self {
        let files = collect_dir(dir);
        Self::from_files(&files)
    }

    /// Packs these `(path, content)` entries. The identity comes from the `manifest.yaml` entry;
    /// without one it is `sri/unnamed:0.0.0`.
    pub fn from_files(files: &[(String, Vec<u8>)]) -> Self {
        let manifest = files
            .iter()
            .find(|(p, _)| p == "manifest.yaml")
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .unwrap_or_default();
        let field = |k: &str, default: &str| {
            manifest_field(&manifest, k).unwrap_or_else(|| default.to_owned())
        };
        Self::from_zip(
            zip_files(files),
            &field("author", "sri"),
            &field("name", "unnamed"),
            &field("version", "0.0.0"),
        )
    }

    /// Wraps arbitrary bytes (possibly not a zip) under the given identity.
    pub fn from_zip(bytes: Vec<u8>, author: &str, name: &str, version: &str) -> Self {
        let checksum =
            daemon_checksum(&bytes).unwrap_or_else(|_| hex::encode(Sha256::digest(&bytes)));
        Self {
            bytes,
            author: author.into(),
            name: name.into(),
            version: version.into(),
            checksum,
        }
    }

    /// `<author>@<name>@<version>@<checksum>.difypkg`: the `context` part's filename and the
    /// `filename` query of `/v1/runner/instances` (daemon `getFunctionFilename`).
    pub fn filename(&self) -> String {
        format!(
            "{}@{}@{}@{}.difypkg",
            self.author, self.name, self.version, self.checksum
        )
    }

    /// `author/name:version@checksum`: the `plugin_unique_identifier` of the launch `metadata`.
    pub fn unique_identifier(&self) -> String {
        format!(
            "{}/{}:{}@{}",
            self.author, self.name, self.version, self.checksum
        )
    }
}

/// A top-level `key: value` of a YAML document (enough for `manifest.yaml`'s author, name and
/// version), quotes removed.
pub fn manifest_field(yaml: &str, key: &str) -> Option<String> {
    yaml.lines().find_map(|line| {
        if line.starts_with([' ', '\t', '#', '-']) {
            return None;
        }
        let (k, v) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let v = v.split(" #").next().unwrap_or("").trim();
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(v);
        Some(v.to_owned())
    })
}

/// Every file under `dir` as `(relative path with '/', content)`, sorted by path, skipping
/// [`SKIPPED_DIRS`] and `*.pyc`.
pub fn collect_dir(dir: &Path) -> Vec<(String, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
            .map(|e| e.expect("directory entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let ty = entry.file_type().expect("file type");
            if ty.is_dir() {
                if !SKIPPED_DIRS.contains(&name.as_str()) {
                    walk(root, &path, out);
                }
            } else if !name.ends_with(".pyc") {
                let rel = path
                    .strip_prefix(root)
                    .expect("under root")
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let content =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
                out.push((rel, content));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    out
}

/// A deflated zip of these entries, files only (no directory entries), fixed timestamps.
pub fn zip_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default())
        .unix_permissions(0o644);
    for (path, content) in files {
        assert!(
            !path.ends_with('/'),
            "{path}: directory entries break the daemon's checksum"
        );
        w.start_file(path.as_str(), opts).expect("zip entry");
        w.write_all(content).expect("zip write");
    }
    w.finish().expect("zip finish").into_inner()
}

/// The entries of a zip as `(name, content)`, in archive order.
pub fn unzip(bytes: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("zip: {e}"))?;
    let mut out = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let mut f = archive
            .by_index(i)
            .map_err(|e| format!("zip entry {i}: {e}"))?;
        let name = f.name().to_owned();
        let mut content = Vec::new();
        if !f.is_dir() {
            f.read_to_end(&mut content)
                .map_err(|e| format!("zip entry {name}: {e}"))?;
        }
        out.push((name, content));
    }
    Ok(out)
}

/// The daemon's checksum of a package (`decoder.CalculateChecksum` over a `ZipPluginDecoder`):
/// for every entry, key = `path.Join(dir, file)` (the cleaned name) → sha256(content); keys
/// sorted bytewise (Go `slices.Sort` on strings); sha256 of the concatenated
/// `sha256(key) ‖ sha256(content)`; lowercase hex. A directory entry fails as in the daemon
/// (`ReadFile` of a directory: "is a directory"), and so does a name `fs.ValidPath` rejects.
pub fn daemon_checksum(zip_bytes: &[u8]) -> Result<String, String> {
    let mut files = std::collections::BTreeMap::<Vec<u8>, [u8; 32]>::new();
    for (name, content) in unzip(zip_bytes)? {
        if name.ends_with('/') {
            return Err(format!(
                "read {}: is a directory",
                name.trim_end_matches('/')
            ));
        }
        let key = go_clean(&name);
        if key.starts_with('/') || key.split('/').any(|s| s == "..") || key == "." {
            return Err(format!("open {name}: invalid argument"));
        }
        // A later entry with the same cleaned path overwrites (Go map assignment).
        files.insert(key.into_bytes(), Sha256::digest(&content).into());
    }
    let mut data = Vec::with_capacity(files.len() * 64);
    for (key, digest) in &files {
        data.extend_from_slice(&Sha256::digest(key));
        data.extend_from_slice(digest);
    }
    Ok(hex::encode(Sha256::digest(&data)))
}

/// Go's `path.Clean` for the relative names found in zips.
fn go_clean(name: &str) -> String {
    let rooted = name.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in name.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// The sample plugin's files as plugin `author/name` at `version`, its `stream` tool answering
/// `"{author}/{name} {i}"` by default (so a call shows which plugin answered). With
/// `dependencies: false` its `requirements.txt` is empty (packaging tests that check the
/// deployment, not the installs).
pub fn sample_as(
    author: &str,
    name: &str,
    version: &str,
    dependencies: bool,
) -> Vec<(String, Vec<u8>)> {
    collect_dir(&crate::plugin_dir("sample"))
        .into_iter()
        .map(|(path, content)| {
            let text = || String::from_utf8(content.clone()).expect("utf-8 source");
            match path.as_str() {
                "requirements.txt" if !dependencies => (path, Vec::new()),
                "manifest.yaml" => {
                    let t = text()
                        .replacen("version: 0.1.0\n", &format!("version: {version}\n"), 1)
                        .replacen("\nauthor: sri\n", &format!("\nauthor: {author}\n"), 1)
                        .replacen("\nname: sample\n", &format!("\nname: {name}\n"), 1);
                    assert!(
                        t.contains(&format!("\nname: {name}\n")),
                        "the sample manifest changed shape: {t}"
                    );
                    (path, t.into_bytes())
                }
                "tools/stream.py" => {
                    let t = text();
                    let default = r#"or "chunk""#;
                    assert!(t.contains(default), "stream.py changed shape: {t}");
                    let t = t.replacen(default, &format!(r#"or "{author}/{name}""#), 1);
                    (path, t.into_bytes())
                }
                _ => (path, content),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> Vec<u8> {
        Sha256::digest(b).to_vec()
    }

    #[test]
    fn checksum_matches_a_hand_computed_example() {
        // Archive order differs from the sorted order; "B.txt" < "a.txt" < "dir/c.txt" bytewise.
        let zip = zip_files(&[
            ("dir/c.txt".into(), b"C".to_vec()),
            ("a.txt".into(), b"A".to_vec()),
            ("B.txt".into(), b"".to_vec()),
        ]);
        let mut data = Vec::new();
        for (k, v) in [("B.txt", &b""[..]), ("a.txt", b"A"), ("dir/c.txt", b"C")] {
            data.extend(sha(k.as_bytes()));
            data.extend(sha(v));
        }
        let want = hex::encode(sha(&data));
        // The same value computed independently in Python (see `known_vector_single_file`).
        assert_eq!(
            want,
            "575b8a2aeb05e5cefdf9b8b589fea3efc1eb8d7bf07a024ee8a4e647d26a4b30"
        );
        assert_eq!(daemon_checksum(&zip).unwrap(), want);
        // Not the file's sha256.
        assert_ne!(want, hex::encode(sha(&zip)));
        // Deterministic: the same entries give the same bytes and checksum.
        let again = zip_files(&[
            ("a.txt".into(), b"A".to_vec()),
            ("B.txt".into(), b"".to_vec()),
            ("dir/c.txt".into(), b"C".to_vec()),
        ]);
        assert_eq!(daemon_checksum(&again).unwrap(), want);
    }

    #[test]
    fn known_vector_single_file() {
        // sha256(sha256("manifest.yaml") ‖ sha256("x")), computed independently with
        // `python3 -c 'import hashlib as h; d=lambda b:h.sha256(b).digest();
        //  print(h.sha256(d(b"manifest.yaml")+d(b"x")).hexdigest())'`.
        let zip = zip_files(&[("manifest.yaml".into(), b"x".to_vec())]);
        assert_eq!(
            daemon_checksum(&zip).unwrap(),
            "757391c76e565f32fcf0f65f716273a423c5e1924f41b14a2742b8068fcc97c1"
        );
    }

    #[test]
    fn directory_entries_cannot_be_checksummed() {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        w.add_directory("tools/", opts).unwrap();
        w.start_file("tools/a.py", opts).unwrap();
        w.write_all(b"pass").unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let err = daemon_checksum(&bytes).unwrap_err();
        assert!(err.contains("is a directory"), "{err}");
        assert!(daemon_checksum(b"not a zip").is_err());
    }

    #[test]
    fn identity_and_names() {
        let files = vec![
            (
                "manifest.yaml".to_string(),
                b"version: 0.1.0\ntype: plugin\nauthor: \"sri\"\nname: sample # the name\nmeta:\n  version: 0.0.1\n".to_vec(),
            ),
            ("main.py".to_string(), b"print()".to_vec()),
        ];
        let p = Package::from_files(&files);
        assert_eq!(
            (p.author.as_str(), p.name.as_str(), p.version.as_str()),
            ("sri", "sample", "0.1.0")
        );
        assert_eq!(p.checksum.len(), 64);
        assert_eq!(
            p.filename(),
            format!("sri@sample@0.1.0@{}.difypkg", p.checksum)
        );
        assert_eq!(
            p.unique_identifier(),
            format!("sri/sample:0.1.0@{}", p.checksum)
        );
        let names: Vec<String> = unzip(&p.bytes).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["manifest.yaml", "main.py"]);
    }

    #[test]
    fn sample_plugin_packs_without_caches() {
        let dir = crate::plugin_dir("sample");
        let p = Package::from_dir(&dir);
        assert_eq!(
            p.unique_identifier().split('@').next().unwrap(),
            "sri/sample:0.1.0"
        );
        let names: Vec<String> = unzip(&p.bytes).unwrap().into_iter().map(|e| e.0).collect();
        assert!(names.contains(&"manifest.yaml".to_string()), "{names:?}");
        assert!(names.contains(&"tools/echo.py".to_string()), "{names:?}");
        assert!(
            names
                .iter()
                .all(|n| !n.contains("__pycache__") && !n.ends_with('/')),
            "{names:?}"
        );
        assert_eq!(daemon_checksum(&p.bytes).unwrap(), p.checksum);
    }

    #[test]
    fn go_clean_names() {
        assert_eq!(go_clean("a//b/./c"), "a/b/c");
        assert_eq!(go_clean("a/../b"), "b");
        assert_eq!(go_clean("../x"), "../x");
        assert_eq!(go_clean("/x/"), "/x");
    }
}
