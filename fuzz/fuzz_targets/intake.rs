//! The package intake (`connector::intake::unpack`): zip bytes from anyone become a tree on
//! the connector's disk, with the limits on (set low here so the fuzzer reaches them).
//!
//! Properties: a refused package leaves nothing behind; an accepted one is exactly the regular
//! files and directories it lists, with valid names, normalised modes, within every limit, and
//! is gone once dropped.
#![no_main]

use connector::intake::{Limits, check_name, unpack};
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("scratch dir"))
        .path()
}

fn limits() -> Limits {
    Limits {
        max_package_bytes: 1024 * 1024,
        max_entries: 64,
        max_unpacked_bytes: 4 * 1024 * 1024,
        max_depth: 6,
        ..Limits::default()
    }
}

fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).expect("scratch").next().is_none()
}

/// Every regular file below `root` (by relative path) with its size and mode; panics on
/// anything that is neither a file nor a directory.
fn walk(root: &Path, rel: &str, out: &mut BTreeMap<String, (u64, u32)>) {
    for e in std::fs::read_dir(root.join(rel)).expect("tree dir") {
        let e = e.unwrap();
        let name = e.file_name().into_string().expect("UTF-8 name");
        let path = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let meta = std::fs::symlink_metadata(e.path()).unwrap();
        if meta.is_dir() {
            walk(root, &path, out);
        } else {
            assert!(meta.is_file(), "`{path}` is neither a file nor a directory");
            out.insert(path, (meta.len(), meta.permissions().mode() & 0o7777));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = limits();
    match unpack(data, &limits, scratch()) {
        Err(_) => assert!(empty(scratch()), "a refused package left files behind"),
        Ok(u) => {
            let files = u.tree.files();
            assert!(files.len() <= limits.max_entries);
            let total: u64 = files.iter().map(|f| f.size).sum();
            assert!(total <= limits.max_unpacked_bytes);
            let mut on_disk = BTreeMap::new();
            walk(u.tree.root(), "", &mut on_disk);
            let listed: BTreeMap<String, (u64, u32)> = files
                .iter()
                .map(|f| {
                    (
                        f.path.clone(),
                        (f.size, if f.executable { 0o755 } else { 0o644 }),
                    )
                })
                .collect();
            assert_eq!(on_disk, listed, "the tree on disk is not the list");
            for f in files {
                check_name(&f.path, limits.max_depth).expect("accepted names follow the grammar");
                assert!(u.tree.has(&f.path));
            }
            drop(u);
            assert!(empty(scratch()), "a dropped tree left files behind");
        }
    }
});
