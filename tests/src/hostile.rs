//! Hostile `.difypkg` packages, generated at test time (no binary blobs in the repository).
//!
//! Each case is the sample plugin with one thing wrong, plus the words the refusal must carry.
//! The zips are written byte by byte here because the hostile ones are exactly what a zip
//! library refuses to write: duplicate names, two records sharing one local header (a hard
//! link), sizes that lie, a zip64 record declaring 2^62 bytes, links, FIFOs and setuid modes.

use flate2::{Compress, Compression, FlushCompress};

use crate::difypkg::collect_dir;

/// One record of a raw zip.
#[derive(Debug, Clone)]
pub struct RawEntry {
    /// Name bytes, as they go in the headers.
    pub name: Vec<u8>,
    /// The stored bytes (already deflated when `deflated`).
    pub data: Vec<u8>,
    /// Method 8 (deflate) rather than 0 (store).
    pub deflated: bool,
    /// The uncompressed size the headers declare (need not be true).
    pub declared: u64,
    /// The CRC the headers declare.
    pub crc: u32,
    /// Unix mode, file type bits included (external attributes' high half).
    pub mode: u32,
    /// Write no local header: point at the local header of this earlier entry (a hard link).
    pub shares: Option<usize>,
}

impl RawEntry {
    /// A stored regular file, 0644, honest sizes.
    pub fn file(name: &str, data: &[u8]) -> Self {
        Self {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
            deflated: false,
            declared: data.len() as u64,
            crc: crc32fast::hash(data),
            mode: 0o100644,
            shares: None,
        }
    }

    /// The same with another mode.
    pub fn with_mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }
}

/// Writes a zip from raw records; a declared size of 4 GiB or more gets a zip64 extra field.
pub fn raw_zip(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut offsets = Vec::with_capacity(entries.len());
    let put16 = |o: &mut Vec<u8>, v: u16| o.extend_from_slice(&v.to_le_bytes());
    let put32 = |o: &mut Vec<u8>, v: u32| o.extend_from_slice(&v.to_le_bytes());
    let zip64 = |e: &RawEntry| e.declared >= u32::MAX as u64;
    let extra = |e: &RawEntry| -> Vec<u8> {
        if !zip64(e) {
            return Vec::new();
        }
        let mut x = Vec::new();
        x.extend_from_slice(&1u16.to_le_bytes());
        x.extend_from_slice(&16u16.to_le_bytes());
        x.extend_from_slice(&e.declared.to_le_bytes());
        x.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
        x
    };
    for e in entries {
        if let Some(i) = e.shares {
            offsets.push(offsets[i]);
            continue;
        }
        offsets.push(out.len() as u32);
        let x = extra(e);
        put32(&mut out, 0x0403_4b50);
        put16(&mut out, if zip64(e) { 45 } else { 20 });
        put16(&mut out, 0x0800);
        put16(&mut out, if e.deflated { 8 } else { 0 });
        put16(&mut out, 0);
        put16(&mut out, 0x21);
        put32(&mut out, e.crc);
        let (c, u) = if zip64(e) {
            (u32::MAX, u32::MAX)
        } else {
            (e.data.len() as u32, e.declared as u32)
        };
        put32(&mut out, c);
        put32(&mut out, u);
        put16(&mut out, e.name.len() as u16);
        put16(&mut out, x.len() as u16);
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&x);
        out.extend_from_slice(&e.data);
    }
    let cd_start = out.len() as u32;
    for (e, off) in entries.iter().zip(&offsets) {
        let src = e.shares.map_or(e, |i| &entries[i]);
        let x = extra(src);
        put32(&mut out, 0x0201_4b50);
        put16(&mut out, (3 << 8) | 45);
        put16(&mut out, if zip64(src) { 45 } else { 20 });
        put16(&mut out, 0x0800);
        put16(&mut out, if src.deflated { 8 } else { 0 });
        put16(&mut out, 0);
        put16(&mut out, 0x21);
        put32(&mut out, src.crc);
        let (c, u) = if zip64(src) {
            (u32::MAX, u32::MAX)
        } else {
            (src.data.len() as u32, src.declared as u32)
        };
        put32(&mut out, c);
        put32(&mut out, u);
        put16(&mut out, e.name.len() as u16);
        put16(&mut out, x.len() as u16);
        put16(&mut out, 0);
        put16(&mut out, 0);
        put16(&mut out, 0);
        put32(&mut out, e.mode << 16);
        put32(&mut out, *off);
        out.extend_from_slice(&e.name);
        out.extend_from_slice(&x);
    }
    let cd_len = out.len() as u32 - cd_start;
    let count = entries.len();
    if count >= 0xFFFF {
        // More records than the 16-bit counts hold: a zip64 end record and its locator.
        let at = out.len() as u64;
        put32(&mut out, 0x0606_4b50);
        out.extend_from_slice(&44u64.to_le_bytes());
        put16(&mut out, 45);
        put16(&mut out, 45);
        put32(&mut out, 0);
        put32(&mut out, 0);
        out.extend_from_slice(&(count as u64).to_le_bytes());
        out.extend_from_slice(&(count as u64).to_le_bytes());
        out.extend_from_slice(&(cd_len as u64).to_le_bytes());
        out.extend_from_slice(&(cd_start as u64).to_le_bytes());
        put32(&mut out, 0x0706_4b50);
        put32(&mut out, 0);
        out.extend_from_slice(&at.to_le_bytes());
        put32(&mut out, 1);
    }
    put32(&mut out, 0x0605_4b50);
    put16(&mut out, 0);
    put16(&mut out, 0);
    put16(&mut out, count.min(0xFFFF) as u16);
    put16(&mut out, count.min(0xFFFF) as u16);
    put32(&mut out, cd_len);
    put32(&mut out, cd_start);
    put16(&mut out, 0);
    out
}

/// A deflate stream of `gib` GiB of zeros that costs a few MiB: one fully flushed block of
/// 1 MiB of zeros, repeated (every back reference lands on zeros, so each copy decodes), then
/// an empty final block.
pub fn zeros_bomb(gib: u64) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut c = Compress::new(Compression::best(), false);
    let mut block = Vec::with_capacity(8 << 10);
    c.compress_vec(&zeros, &mut block, FlushCompress::Full)
        .expect("deflate");
    let mut out = Vec::with_capacity(block.len() * (gib as usize) * 1024 + 2);
    for _ in 0..gib * 1024 {
        out.extend_from_slice(&block);
    }
    let mut end = Vec::with_capacity(16);
    Compress::new(Compression::best(), false)
        .compress_vec(&[], &mut end, FlushCompress::Finish)
        .expect("deflate end");
    out.extend_from_slice(&end);
    out
}

/// A hostile package and what its refusal must say.
pub struct Case {
    /// What is wrong, for messages.
    pub what: &'static str,
    /// The `.difypkg` bytes.
    pub bytes: Vec<u8>,
    /// Words (lowercase) the `failed` line or the error must all contain.
    pub words: Vec<&'static str>,
}

/// The sample plugin's files as raw records, with `edit` applied to the manifest text.
pub fn sample_entries(edit: impl Fn(String) -> String) -> Vec<RawEntry> {
    collect_dir(&crate::plugin_dir("sample"))
        .into_iter()
        .map(|(p, c)| {
            if p == "manifest.yaml" {
                let m = edit(String::from_utf8(c).expect("manifest text"));
                RawEntry::file(&p, m.as_bytes())
            } else {
                RawEntry::file(&p, &c)
            }
        })
        .collect()
}

fn with(mut base: Vec<RawEntry>, extra: Vec<RawEntry>) -> Vec<u8> {
    base.extend(extra);
    raw_zip(&base)
}

fn sample_with(extra: Vec<RawEntry>) -> Vec<u8> {
    with(sample_entries(|m| m), extra)
}

/// The sample plugin with its `requirements.txt` replaced.
fn requirements(text: &str) -> Vec<u8> {
    let mut e: Vec<RawEntry> = sample_entries(|m| m)
        .into_iter()
        .filter(|e| e.name != b"requirements.txt")
        .collect();
    e.push(RawEntry::file("requirements.txt", text.as_bytes()));
    raw_zip(&e)
}

/// The whole corpus. `bomb_gib` sizes the deflate bomb (the issue asks for more than 10).
pub fn corpus(bomb_gib: u64) -> Vec<Case> {
    let case = |what, bytes, words: &[&'static str]| Case {
        what,
        bytes,
        words: words.to_vec(),
    };
    let link = |name: &str, to: &str| RawEntry::file(name, to.as_bytes()).with_mode(0o120777);
    let main_py = sample_entries(|m| m)
        .into_iter()
        .find(|e| e.name == b"main.py")
        .expect("sample main.py");
    let n = sample_entries(|m| m).len();

    let bomb = {
        let data = zeros_bomb(bomb_gib);
        RawEntry {
            name: b"data/zeros.bin".to_vec(),
            // The header claims a harmless kilobyte: only counting finds the truth.
            declared: 1024,
            crc: 0,
            deflated: true,
            data,
            mode: 0o100644,
            shares: None,
        }
    };
    let zip64 = RawEntry {
        name: b"data/huge.bin".to_vec(),
        data: b"tiny".to_vec(),
        deflated: false,
        declared: 1 << 62,
        crc: crc32fast::hash(b"tiny"),
        mode: 0o100644,
        shares: None,
    };
    let many: Vec<RawEntry> = (0..100_000)
        .map(|i| RawEntry::file(&format!("many/{i}.txt"), b""))
        .collect();
    let deep = format!("{}x.py", "d/".repeat(40));

    vec![
        case(
            "symlink to a file outside",
            sample_with(vec![link("leak", "/proc/self/environ")]),
            &["leak", "symbolic link"],
        ),
        case(
            "symlink loop",
            sample_with(vec![link("a", "."), link("b", ".")]),
            &["symbolic link"],
        ),
        case(
            "hard link (two records, one local header)",
            sample_with(vec![RawEntry {
                name: b"alias.py".to_vec(),
                shares: Some(
                    sample_entries(|m| m)
                        .iter()
                        .position(|e| e.name == b"main.py")
                        .expect("main.py"),
                ),
                ..main_py.clone()
            }]),
            &["shares its data"],
        ),
        case(
            "absolute path",
            sample_with(vec![RawEntry::file("/etc/cron.d/sri", b"* * * * * root id\n")]),
            &["absolute"],
        ),
        case(
            "`..` path",
            sample_with(vec![RawEntry::file("../../escape.py", b"x = 1\n")]),
            &["`..`"],
        ),
        case(
            "backslash path",
            sample_with(vec![RawEntry::file("..\\..\\escape.py", b"x = 1\n")]),
            &["backslash"],
        ),
        case(
            "NUL in a name",
            sample_with(vec![RawEntry::file("main.py\0.txt", b"x = 1\n")]),
            &["control character"],
        ),
        case(
            "duplicate name",
            sample_with(vec![RawEntry::file("main.py", b"import os\n")]),
            &["main.py", "appears twice"],
        ),
        case(
            "duplicate name after case folding",
            sample_with(vec![RawEntry::file("MAIN.py", b"import os\n")]),
            &["letter case"],
        ),
        case(
            "nested 41 levels deep",
            sample_with(vec![RawEntry::file(&deep, b"")]),
            &["levels deep", "sri_intake_max_depth"],
        ),
        case(
            "deflate bomb",
            sample_with(vec![bomb]),
            &["zeros.bin", "expand"],
        ),
        case(
            "zip64 entry declaring 2^62 bytes",
            sample_with(vec![zip64]),
            &["huge.bin", "declared size"],
        ),
        case(
            "100,000 entries",
            sample_with(many),
            &["entries", "sri_intake_max_entries"],
        ),
        case(
            "setuid file",
            sample_with(vec![RawEntry::file("tool.sh", b"#!/bin/sh\n").with_mode(0o104755)]),
            &["tool.sh", "setuid"],
        ),
        case(
            "setgid directory",
            sample_with(vec![RawEntry::file("shared/", b"").with_mode(0o042777)]),
            &["setgid"],
        ),
        case(
            "named pipe",
            sample_with(vec![RawEntry::file("fifo", b"").with_mode(0o010644)]),
            &["fifo", "named pipe"],
        ),
        case(
            "character device",
            sample_with(vec![RawEntry::file("tty", b"").with_mode(0o020644)]),
            &["tty", "character device"],
        ),
        case(
            "block device",
            sample_with(vec![RawEntry::file("disk", b"").with_mode(0o060644)]),
            &["disk", "device"],
        ),
        case(
            "requirements: -r /proc/self/environ",
            requirements("-r /proc/self/environ\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: --index-url",
            requirements("dify_plugin>=0.7.4,<0.11\n--index-url http://127.0.0.1:9/simple\n"),
            &["requirements.txt", "line 2"],
        ),
        case(
            "requirements: --find-links",
            requirements("--find-links=/etc\ndify_plugin>=0.7.4,<0.11\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: --target",
            requirements("dify_plugin>=0.7.4,<0.11 --target=/tmp/sri-escape\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: -e .",
            requirements("-e .\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: -c constraints",
            requirements("-c /etc/passwd\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: a path",
            requirements("./vendor/evil-1.0.tar.gz\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: a URL",
            requirements("evil @ http://127.0.0.1:9/evil-1.0.tar.gz\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "requirements: a VCS ref",
            requirements("git+https://127.0.0.1:9/evil.git#egg=evil\n"),
            &["requirements.txt", "line 1"],
        ),
        case(
            "pyproject dependencies with options",
            {
                let mut e: Vec<RawEntry> = sample_entries(|m| m)
                    .into_iter()
                    .filter(|e| e.name != b"requirements.txt")
                    .collect();
                e.push(RawEntry::file(
                    "pyproject.toml",
                    b"[project]\nname = \"sample\"\nversion = \"0.1.0\"\ndependencies = [\n  \"dify_plugin>=0.7.4,<0.11\",\n  \"--index-url=http://127.0.0.1:9/simple\",\n]\n",
                ));
                raw_zip(&e)
            },
            &["pyproject.toml"],
        ),
        case(
            "author outside the daemon's pattern",
            with(sample_entries(|m| m.replace("author: sri", "author: Evil/../sri")), vec![]),
            &["`author`"],
        ),
        case(
            "name outside the daemon's pattern",
            with(sample_entries(|m| m.replace("name: sample", "name: sample.evil")), vec![]),
            &["`name`"],
        ),
        case(
            "version outside the daemon's pattern",
            with(sample_entries(|m| m.replace("version: 0.1.0\ntype", "version: \"1\"\ntype")), vec![]),
            &["`version`"],
        ),
    ]
    .into_iter()
    .inspect(|c| assert!(c.bytes.len() > n, "{}: generated", c.what))
    .collect()
}
