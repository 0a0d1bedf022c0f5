//! The one package intake: untrusted `.difypkg` bytes become a validated tree of regular files
//! on disk, and nothing downstream ever opens the raw zip again.
//!
//! Packages come from a marketplace, GitHub or any workspace user, and they are unpacked on the
//! machine that holds the API key, the signing keys and AWS credentials. So every entry is
//! checked from the central directory before a byte is decompressed (kinds, names, modes, sizes,
//! overlaps), and then decompressed as a stream whose size is *counted*, never taken from a
//! header: a declared size is neither trusted nor used to allocate. Only regular files and
//! directories are accepted; links, devices and FIFOs are refused by their zip attributes, so
//! the tree holds nothing a later walk could follow out of it. Names follow one grammar
//! (relative, no `..`, no backslash or NUL, no duplicates even after case folding, bounded
//! length and depth), and modes are normalised to 0644 or 0755.
//!
//! The zip is read with `rc-zip`, which keeps every central-directory record (the `zip` crate
//! silently collapses duplicate names, so its view and the Go daemon's could differ and with
//! them the checksum). The checksum is computed here, from the bytes actually written, exactly
//! as the daemon computes it.

use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rc_zip_sync::ReadZip;
use rc_zip_sync::rc_zip::parse::{EntryKind, Method, Mode};

use crate::Error;

/// The daemon's default `MAX_PLUGIN_PACKAGE_SIZE`.
pub const DEFAULT_MAX_PACKAGE_BYTES: usize = 50 * 1024 * 1024;

/// An entry may expand this many times over its compressed size (deflate's own maximum is
/// ~1032); entries under [`RATIO_FLOOR`] are not held to it.
pub const DEFAULT_MAX_RATIO: u64 = 200;
/// Entries that expand to at most this many bytes are never refused for their ratio (a file of
/// blank lines legitimately compresses a thousandfold).
pub const RATIO_FLOOR: u64 = 1024 * 1024;
/// Longest path of an entry, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Longest path component, in bytes (`NAME_MAX` on Linux).
pub const MAX_COMPONENT_BYTES: usize = 255;

/// What a package may expand to. The defaults are far above any real plugin (the largest
/// marketplace plugins hold a few thousand files and tens of MiB) and far below what would
/// hurt the host.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// Largest package accepted, in bytes (the daemon's variable and default).
    #[arg(long, env = "MAX_PLUGIN_PACKAGE_SIZE", default_value_t = DEFAULT_MAX_PACKAGE_BYTES)]
    pub max_package_bytes: usize,
    /// Most entries (files and directories) a package may hold.
    #[arg(long, env = "SRI_INTAKE_MAX_ENTRIES", default_value_t = 20_000)]
    pub max_entries: usize,
    /// Most bytes a package may expand to, counted while decompressing.
    #[arg(long, env = "SRI_INTAKE_MAX_UNPACKED_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub max_unpacked_bytes: u64,
    /// Most times one entry may expand over its compressed size (entries under 1 MiB exempt).
    #[arg(long, env = "SRI_INTAKE_MAX_RATIO", default_value_t = DEFAULT_MAX_RATIO)]
    pub max_ratio: u64,
    /// Deepest directory nesting of an entry.
    #[arg(long, env = "SRI_INTAKE_MAX_DEPTH", default_value_t = 32)]
    pub max_depth: usize,
    /// Packages unpacked at the same time (the rest wait their turn).
    #[arg(long, env = "SRI_INTAKE_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_package_bytes: DEFAULT_MAX_PACKAGE_BYTES,
            max_entries: 20_000,
            max_unpacked_bytes: 512 * 1024 * 1024,
            max_ratio: DEFAULT_MAX_RATIO,
            max_depth: 32,
            concurrency: 2,
        }
    }
}

/// A regular file of a validated tree.
#[derive(Debug, Clone)]
pub struct TreeFile {
    /// Its path in the package (`/`-separated, validated).
    pub path: String,
    /// Its size as written.
    pub size: u64,
    /// Whether the package marked it executable (it is then 0755, else 0644).
    pub executable: bool,
}

/// A package's validated contents on disk, removed when the last reference goes away.
pub struct Tree {
    dir: tempfile::TempDir,
    files: Vec<TreeFile>,
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tree")
            .field("dir", &self.dir.path())
            .field("files", &self.files.len())
            .finish()
    }
}

impl Tree {
    /// Where the files are.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Every regular file, sorted bytewise by path.
    pub fn files(&self) -> &[TreeFile] {
        &self.files
    }

    /// Whether the package holds a regular file at `path`.
    pub fn has(&self, path: &str) -> bool {
        self.files
            .binary_search_by(|f| f.path.as_bytes().cmp(path.as_bytes()))
            .is_ok()
    }

    /// The content of a small file, refused past `max` bytes.
    pub fn read_small(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, Error> {
        let Ok(i) = self
            .files
            .binary_search_by(|f| f.path.as_bytes().cmp(path.as_bytes()))
        else {
            return Ok(None);
        };
        if self.files[i].size > max {
            return Err(Error::Package(format!(
                "`{path}` has {} bytes, over the {max} bytes such a file may have",
                self.files[i].size
            )));
        }
        std::fs::read(self.root().join(path))
            .map(Some)
            .map_err(|e| Error::Package(format!("cannot read `{path}` back: {e}")))
    }

    /// Lays the tree out in `dest` (which must not exist yet): hard links to the tree's files
    /// where `dest` is on the same file system (the tree's files are already normalised and
    /// nothing writes to them), copies with normalised modes elsewhere. The tree holds only
    /// regular files and directories made here, so nothing is followed.
    pub fn copy_to(&self, dest: &Path) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let err = |p: &Path, e: std::io::Error| {
            Error::Package(format!("cannot unpack into {}: {e}", p.display()))
        };
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(parent, e))?;
        }
        std::fs::create_dir(dest).map_err(|e| err(dest, e))?;
        for f in &self.files {
            let to = dest.join(&f.path);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).map_err(|e| err(parent, e))?;
            }
            let from = self.root().join(&f.path);
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).map_err(|e| err(&to, e))?;
                let mode = if f.executable { 0o755 } else { 0o644 };
                std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| err(&to, e))?;
            }
        }
        Ok(())
    }
}

/// Where packages are unpacked, and how many at once; shared by every launch.
#[derive(Debug)]
pub struct Intake {
    limits: Limits,
    scratch: PathBuf,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Intake {
    /// An intake unpacking below `scratch` (created if missing).
    pub fn new(limits: Limits, scratch: PathBuf) -> Result<Self, Error> {
        std::fs::create_dir_all(&scratch).map_err(|e| {
            Error::Package(format!(
                "cannot create the unpack directory {}: {e}",
                scratch.display()
            ))
        })?;
        let permits = Arc::new(tokio::sync::Semaphore::new(limits.concurrency.max(1)));
        Ok(Self {
            limits,
            scratch,
            permits,
        })
    }

    /// Removes what an earlier process left in the scratch directory (it owns the directory:
    /// call this only on one made for the intake alone).
    pub fn sweep(&self) {
        if let Ok(rd) = std::fs::read_dir(&self.scratch) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads a package off the async workers, at most `concurrency` at a time.
    pub async fn read(&self, bytes: bytes::Bytes) -> Result<crate::package::Package, Error> {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Package("the connector is shutting down".into()))?;
        let (limits, scratch) = (self.limits.clone(), self.scratch.clone());
        tokio::task::spawn_blocking(move || {
            crate::package::Package::read_in(bytes, &limits, &scratch)
        })
        .await
        .map_err(|e| Error::Package(format!("unpacking stopped: {e}")))?
    }
}

/// What unpacking yields: the tree and the daemon's checksum of it.
#[derive(Debug)]
pub struct Unpacked {
    /// The validated files.
    pub tree: Tree,
    /// sha256 over `sha256(path) ‖ sha256(content)` of every file, sorted by path.
    pub checksum: String,
}

/// Unpacks `bytes` into a fresh directory below `scratch`, refusing anything outside the
/// rules. On error nothing is left behind.
pub fn unpack(bytes: &[u8], limits: &Limits, scratch: &Path) -> Result<Unpacked, Error> {
    if bytes.len() > limits.max_package_bytes {
        return Err(Error::Package(format!(
            "the package has {} bytes, over the limit of {} (MAX_PLUGIN_PACKAGE_SIZE)",
            bytes.len(),
            limits.max_package_bytes
        )));
    }
    // The central directory is parsed whole into memory: refuse an oversized one by its count
    // before that (rc-zip stays the authority on everything else).
    if let Some(n) = declared_entries(bytes)
        && n > limits.max_entries as u64
    {
        return Err(Error::Package(format!(
            "the package has {n} entries, over the limit of {} (SRI_INTAKE_MAX_ENTRIES)",
            limits.max_entries
        )));
    }
    let archive = bytes.read_zip().map_err(|e| {
        Error::Package(format!(
            "not a zip archive ({e}); upload the .difypkg made by `dify plugin package`"
        ))
    })?;
    let entries: Vec<_> = archive.entries().collect();
    if entries.len() > limits.max_entries {
        return Err(Error::Package(format!(
            "the package has {} entries, over the limit of {} (SRI_INTAKE_MAX_ENTRIES)",
            entries.len(),
            limits.max_entries
        )));
    }
    let utf8 = matches!(
        archive.encoding(),
        rc_zip_sync::rc_zip::encoding::Encoding::Utf8
    );
    refuse_special_files(bytes)?;
    let plan = plan(
        entries.iter().map(|e| &**e),
        utf8,
        bytes.len() as u64,
        limits,
    )?;

    let dir = tempfile::Builder::new()
        .prefix(".sri-intake-")
        .tempdir_in(scratch)
        .map_err(|e| {
            Error::Package(format!(
                "cannot make an unpack directory in {}: {e}",
                scratch.display()
            ))
        })?;
    let mut made: HashSet<String> = HashSet::new();
    let mut total = 0u64;
    let mut files = Vec::new();
    let mut sums: Vec<(String, [u8; 32])> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    for (entry, step) in entries.iter().zip(&plan) {
        let Step::File {
            path,
            executable,
            compressed,
        } = step
        else {
            if let Step::Dir { path } = step {
                make_dirs(dir.path(), path, true, &mut made)?;
            }
            continue;
        };
        make_dirs(dir.path(), path, false, &mut made)?;
        let to = dir.path().join(path);
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&to)
            .map_err(|e| Error::Package(format!("cannot write `{path}`: {e}")))?;
        let per_entry = compressed.saturating_mul(limits.max_ratio).max(RATIO_FLOOR);
        let mut reader = entry.reader();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(|e| {
                Error::Package(format!("zip entry `{path}` cannot be decompressed: {e}"))
            })?;
            if n == 0 {
                break;
            }
            size += n as u64;
            total += n as u64;
            if total > limits.max_unpacked_bytes {
                return Err(Error::Package(format!(
                    "the package expands to more than {} bytes (SRI_INTAKE_MAX_UNPACKED_BYTES); \
                     it was stopped while unpacking `{path}`",
                    limits.max_unpacked_bytes
                )));
            }
            if size > per_entry {
                return Err(Error::Package(format!(
                    "zip entry `{path}` expands more than {}× its {compressed} compressed bytes \
                     (a zip bomb?); SRI_INTAKE_MAX_RATIO sets the limit",
                    limits.max_ratio
                )));
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|e| Error::Package(format!("cannot write `{path}`: {e}")))?;
        }
        set_mode(&to, *executable)?;
        sums.push((path.clone(), hasher.finalize().into()));
        files.push(TreeFile {
            path: path.clone(),
            size,
            executable: *executable,
        });
    }
    files.sort_by(|a, b| a.path.as_bytes().cmp(b.path.as_bytes()));
    sums.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut outer = Sha256::new();
    for (path, content) in &sums {
        outer.update(Sha256::digest(path.as_bytes()));
        outer.update(content);
    }
    Ok(Unpacked {
        tree: Tree { dir, files },
        checksum: hex::encode(outer.finalize()),
    })
}

/// Refuses records whose Unix file type is anything but a regular file or a directory, read
/// from the raw external attributes: rc-zip folds a character device (`S_IFCHR`) and unknown
/// types into "regular file" when it maps modes, so its view alone would let them through.
fn refuse_special_files(bytes: &[u8]) -> Result<(), Error> {
    let Ok(mut zip) = zip::ZipArchive::new(std::io::Cursor::new(bytes)) else {
        // rc-zip says what is wrong with an archive; this pass only looks at modes.
        return Ok(());
    };
    for i in 0..zip.len() {
        let Ok(f) = zip.by_index_raw(i) else {
            continue;
        };
        let kind = match f.unix_mode().map(|m| m & 0o170_000) {
            None | Some(0) | Some(0o100_000) | Some(0o040_000) => continue,
            Some(0o120_000) => "a symbolic link",
            Some(0o020_000) => "a character device",
            Some(0o060_000) => "a device",
            Some(0o010_000) => "a named pipe (FIFO)",
            Some(0o140_000) => "a socket",
            Some(_) => "of an unknown file type",
        };
        return Err(Error::Package(format!(
            "zip entry `{}` is {kind}; packages may hold only regular files and directories",
            printable(f.name())
        )));
    }
    Ok(())
}

/// The record count the end of central directory declares (its zip64 form when the 16-bit
/// count is saturated), if the archive has one where it should be.
fn declared_entries(bytes: &[u8]) -> Option<u64> {
    const EOCD: &[u8] = b"PK\x05\x06";
    const LOCATOR: &[u8] = b"PK\x06\x07";
    const EOCD64: &[u8] = b"PK\x06\x06";
    let u16_at = |at: usize| Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?));
    let u64_at = |at: usize| Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
    // The record is 22 bytes plus a comment of at most 65,535.
    let from = bytes.len().saturating_sub(22 + 0xFFFF);
    let at = from + memchr::memmem::rfind(&bytes[from..], EOCD)?;
    let count = u16_at(at + 10)?;
    if count != 0xFFFF {
        return Some(count.into());
    }
    let loc = at.checked_sub(20)?;
    if bytes.get(loc..loc + 4)? != LOCATOR {
        return None;
    }
    let at64 = usize::try_from(u64_at(loc + 8)?).ok()?;
    if bytes.get(at64..at64 + 4)? != EOCD64 {
        return None;
    }
    u64_at(at64 + 32)
}

/// What to do with one central-directory record, decided before anything is decompressed.
enum Step {
    Dir {
        path: String,
    },
    File {
        path: String,
        executable: bool,
        compressed: u64,
    },
}

/// Checks every record (kinds, names, modes, methods, declared sizes, overlaps) and says what
/// to do with each. Declared sizes only refuse early; the real sizes are counted later.
fn plan<'a>(
    entries: impl Iterator<Item = &'a rc_zip_sync::rc_zip::parse::Entry>,
    utf8: bool,
    archive_len: u64,
    limits: &Limits,
) -> Result<Vec<Step>, Error> {
    let refuse =
        |name: &str, why: String| Error::Package(format!("zip entry `{}` {why}", printable(name)));
    let mut steps = Vec::new();
    let mut folded: HashMap<String, String> = HashMap::new();
    let mut file_paths: Vec<String> = Vec::new();
    let mut dir_paths: HashSet<String> = HashSet::new();
    let mut spans: Vec<(u64, u64, String)> = Vec::new();
    let mut declared = 0u64;
    for e in entries {
        let raw = e.name.as_str();
        if !utf8 && !raw.is_ascii() {
            return Err(refuse(
                raw,
                "has a name that is neither ASCII nor marked UTF-8; repack the plugin with \
                 `dify plugin package`"
                    .into(),
            ));
        }
        let kind = e.kind();
        let is_dir = kind == EntryKind::Directory || raw.ends_with('/');
        let name = if is_dir {
            raw.strip_suffix('/').unwrap_or(raw)
        } else {
            raw
        };
        if let Err(why) = check_name(name, limits.max_depth) {
            return Err(refuse(raw, why));
        }
        if kind == EntryKind::Symlink {
            return Err(refuse(
                raw,
                "is a symbolic link; packages may hold only regular files and directories".into(),
            ));
        }
        let special = [
            (Mode::DEVICE, "a device"),
            (Mode::CHAR_DEVICE, "a character device"),
            (Mode::NAMED_PIPE, "a named pipe (FIFO)"),
            (Mode::SOCKET, "a socket"),
            (Mode::IRREGULAR, "not a regular file"),
        ];
        if let Some((_, what)) = special.iter().find(|(m, _)| e.mode.has(*m)) {
            return Err(refuse(
                raw,
                format!("is {what}; packages may hold only regular files and directories"),
            ));
        }
        for (m, what) in [
            (Mode::SETUID, "setuid"),
            (Mode::SETGID, "setgid"),
            (Mode::STICKY, "sticky"),
        ] {
            if e.mode.has(m) {
                return Err(refuse(
                    raw,
                    format!("has the {what} bit; plugins never need it, repack without it"),
                ));
            }
        }
        if e.flags & 1 != 0 {
            return Err(refuse(raw, "is encrypted; packages must not be".into()));
        }
        let key = name.to_lowercase();
        if let Some(prev) = folded.insert(key.clone(), name.to_owned()) {
            let how = if prev == name {
                "appears twice"
            } else {
                "differs only in letter case from another entry"
            };
            return Err(refuse(
                raw,
                format!(
                    "{how} (`{}`); the daemon and the connector would read different files",
                    printable(&prev)
                ),
            ));
        }
        if is_dir {
            dir_paths.insert(key);
            steps.push(Step::Dir {
                path: name.to_owned(),
            });
            continue;
        }
        if !matches!(e.method, Method::Store | Method::Deflate) {
            return Err(refuse(
                raw,
                format!(
                    "uses compression {:?}; only stored and deflated entries are read",
                    e.method
                ),
            ));
        }
        declared = declared.saturating_add(e.uncompressed_size);
        if declared > limits.max_unpacked_bytes {
            return Err(refuse(
                raw,
                format!(
                    "brings the declared size of the package over {} bytes \
                     (SRI_INTAKE_MAX_UNPACKED_BYTES)",
                    limits.max_unpacked_bytes
                ),
            ));
        }
        if e.header_offset >= archive_len || e.compressed_size > archive_len - e.header_offset {
            return Err(refuse(
                raw,
                "has data outside the archive; the zip is corrupt".into(),
            ));
        }
        // 30 bytes of local header and the name come before the data.
        let start = e.header_offset;
        let end = start + 30 + e.name.len() as u64 + e.compressed_size;
        spans.push((start, end, name.to_owned()));
        file_paths.push(key);
        steps.push(Step::File {
            path: name.to_owned(),
            executable: e.mode.0 & 0o111 != 0,
            compressed: e.compressed_size,
        });
    }
    // Two records sharing their data are the zip form of a hard link, and the trick behind
    // overlapping-entry zip bombs.
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(refuse(
                &w[1].2,
                format!(
                    "shares its data with `{}` (a hard link or overlapping entries); \
                     packages hold each file once",
                    printable(&w[0].2)
                ),
            ));
        }
    }
    // A path cannot be both a file and a directory.
    for f in &file_paths {
        if dir_paths.contains(f) {
            return Err(refuse(f, "is both a file and a directory".into()));
        }
    }
    let files: HashSet<&str> = file_paths.iter().map(String::as_str).collect();
    for f in &file_paths {
        let mut parent = f.as_str();
        while let Some((p, _)) = parent.rsplit_once('/') {
            if files.contains(p) {
                return Err(refuse(f, format!("lies below `{p}`, which is a file")));
            }
            parent = p;
        }
    }
    Ok(steps)
}

/// The one grammar of a path inside a package: relative, `/`-separated, no empty, `.` or `..`
/// components, no backslashes, drive letters, NUL or control characters, bounded in length and
/// depth. Returns why a name is refused.
pub fn check_name(name: &str, max_depth: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("has an empty name".into());
    }
    if name.len() > MAX_PATH_BYTES {
        return Err(format!(
            "has a name of {} bytes, over {MAX_PATH_BYTES}",
            name.len()
        ));
    }
    if name.starts_with('/') {
        return Err("has an absolute path; entries must be relative to the package".into());
    }
    if name.contains('\\') {
        return Err("has a backslash in its name; paths are `/`-separated".into());
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("has a control character (or NUL) in its name".into());
    }
    if name.len() >= 2 && name.as_bytes()[1] == b':' && name.as_bytes()[0].is_ascii_alphabetic() {
        return Err("has a drive letter; entries must be relative to the package".into());
    }
    let mut depth = 0;
    for part in name.split('/') {
        match part {
            "" => return Err("has an empty path component (`//`)".into()),
            "." => return Err("has a `.` path component".into()),
            ".." => return Err("has a `..` path component (it points outside the package)".into()),
            p if p.len() > MAX_COMPONENT_BYTES => {
                return Err(format!(
                    "has a path component of {} bytes, over {MAX_COMPONENT_BYTES}",
                    p.len()
                ));
            }
            _ => depth += 1,
        }
    }
    if depth > max_depth {
        return Err(format!(
            "is nested {depth} levels deep, over {max_depth} (SRI_INTAKE_MAX_DEPTH)"
        ));
    }
    Ok(())
}

/// Creates the directories of `path` (and `path` itself when `is_dir`) below `root`, each once.
fn make_dirs(
    root: &Path,
    path: &str,
    is_dir: bool,
    made: &mut HashSet<String>,
) -> Result<(), Error> {
    let parts: Vec<&str> = path.split('/').collect();
    let n = if is_dir { parts.len() } else { parts.len() - 1 };
    for i in 1..=n {
        let dir = parts[..i].join("/");
        if made.contains(&dir) {
            continue;
        }
        // `create_dir`, not `create_dir_all`: every level is made here, so an existing one
        // would be something unexpected.
        std::fs::create_dir(root.join(&dir))
            .map_err(|e| Error::Package(format!("cannot create `{dir}`: {e}")))?;
        made.insert(dir);
    }
    Ok(())
}

fn set_mode(path: &Path, executable: bool) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if executable { 0o755 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::Package(format!("cannot set the mode of {}: {e}", path.display())))
}

/// A name as it may be shown: control characters escaped, at most 200 characters.
fn printable(name: &str) -> String {
    let s: String = name
        .chars()
        .flat_map(char::escape_debug)
        .take(200)
        .collect();
    if s.len() < name.len() && name.chars().count() > 200 {
        format!("{s}…")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_grammar() {
        for ok in [
            "main.py",
            "tools/a.yaml",
            "_assets/icon.svg",
            "a/b/c/d.py",
            "ünï/cödé.py",
        ] {
            check_name(ok, 32).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("", "empty name"),
            ("/etc/passwd", "absolute"),
            ("a/../b", "`..`"),
            ("..", "`..`"),
            ("./a", "`.`"),
            ("a//b", "empty path component"),
            ("a\\b", "backslash"),
            ("C:/x", "drive letter"),
            ("a\0b", "control character"),
            ("a\nb", "control character"),
        ] {
            let e = check_name(bad, 32).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        assert!(check_name("a/".repeat(33).trim_end_matches('/'), 32).is_err());
        assert!(
            check_name(&"n".repeat(256), 32)
                .unwrap_err()
                .contains("component")
        );
        assert!(
            check_name(&"n/".repeat(600), 1000)
                .unwrap_err()
                .contains("bytes")
        );
    }

    fn zip_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, content) in files {
            w.start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(content).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn counts_what_the_end_record_declares() {
        assert_eq!(
            declared_entries(&zip_of(&[("a", b"1"), ("b", b"2")])),
            Some(2)
        );
        assert_eq!(declared_entries(b"not a zip"), None);
    }

    #[test]
    fn unpacks_counts_and_cleans_up() {
        let scratch = tempfile::tempdir().unwrap();
        let bytes = zip_of(&[("a/b.py", b"x = 1\n"), ("c.txt", &[b'z'; 4096])]);
        let u = unpack(&bytes, &Limits::default(), scratch.path()).unwrap();
        let names: Vec<_> = u.tree.files().iter().map(|f| f.path.as_str()).collect();
        assert_eq!(names, ["a/b.py", "c.txt"]);
        assert_eq!(u.tree.files()[1].size, 4096);
        drop(u);
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);

        let tight = Limits {
            max_unpacked_bytes: 1000,
            ..Limits::default()
        };
        let e = unpack(&bytes, &tight, scratch.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("SRI_INTAKE_MAX_UNPACKED_BYTES"), "{e}");
        assert_eq!(std::fs::read_dir(scratch.path()).unwrap().count(), 0);
        let few = Limits {
            max_entries: 1,
            ..Limits::default()
        };
        let e = unpack(&bytes, &few, scratch.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("SRI_INTAKE_MAX_ENTRIES"), "{e}");
    }
}
