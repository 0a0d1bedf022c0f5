//! `make bench`, intake part: what the one package intake costs. Writes its section of
//! `BENCHMARKS.md` (between `<!-- bench:intake:begin -->` and `<!-- bench:intake:end -->`) and
//! prints it.
//!
//! 1. Time: `Package::read_in` (the intake: rc-zip, streamed to disk, counted, checked) against
//!    the reader it replaced (the `zip` crate, every entry read whole into memory, then the same
//!    checksum) on the template's sample plugin and on a generated 40 MiB package of 5,000
//!    files; medians of interleaved runs, side by side in one run (ratios).
//! 2. Memory: a fresh process (this binary again, `--rss MODE FILE`) reads a package with one
//!    32 MiB entry among small ones; the growth of its peak RSS (VmHWM) over the moment the
//!    package bytes were already in memory, against 2× the largest entry.

use connector::intake::Limits;
use connector::package::Package;
use harness::benchmarks::{loadavg, median, run_lines, status_kib};
use harness::difypkg::{collect_dir, zip_files};
use harness::sri::TempDir;
use harness::{plugin_dir, root};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::io::Read;
use std::time::Instant;

/// Interleaved runs per package (`SRI_BENCH_INTAKE_RUNS` overrides).
const RUNS: usize = 15;

/// The reader the intake replaced, kept here only as the reference: the zip crate, entries read
/// whole into memory, then the daemon's checksum.
fn before(bytes: &[u8]) -> String {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).expect("zip");
    let mut entries: Vec<(String, Vec<u8>)> = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).expect("entry");
        if f.is_dir() {
            continue;
        }
        let name = f.name().to_owned();
        let mut content = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut content).expect("read");
        entries.push((name, content));
    }
    // The old extraction step wrote them out too.
    let dir = TempDir::new("bench-intake-before");
    for (name, content) in &entries {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut outer = Sha256::new();
    for (path, content) in &entries {
        outer.update(Sha256::digest(path.as_bytes()));
        outer.update(Sha256::digest(content));
    }
    hex::encode(outer.finalize())
}

fn after(bytes: &[u8], scratch: &std::path::Path) -> String {
    let pkg = Package::read_in(
        bytes::Bytes::copy_from_slice(bytes),
        &Limits::default(),
        scratch,
    )
    .expect("the intake reads it");
    // The tree is materialised where a backend puts it, as the old extraction did.
    let dest = TempDir::new("bench-intake-after");
    pkg.extract(&dest.path().join("plugin")).expect("extract");
    pkg.checksum
}

/// Pseudo-random, incompressible bytes (a xorshift stream), so the zip is as big as its files.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The sample plugin plus `files` files of `size` bytes (and one of `big` bytes when non-zero).
fn package(files: usize, size: usize, big: usize) -> Vec<u8> {
    let mut entries = collect_dir(&plugin_dir("sample"));
    for i in 0..files {
        entries.push((format!("data/{:02}/{i}.bin", i % 50), noise(i as u64, size)));
    }
    if big > 0 {
        entries.push(("data/big.bin".into(), noise(7, big)));
    }
    zip_files(&entries)
}

/// Child mode: read the package at `file` with `mode` and print the peak RSS growth in KiB.
fn rss_child(mode: &str, file: &str) {
    let bytes = std::fs::read(file).unwrap();
    let scratch = TempDir::new("bench-intake-rss");
    let base = status_kib("self", "VmHWM:").max(status_kib("self", "VmRSS:"));
    match mode {
        "after" => {
            let pkg = Package::read_in(bytes.into(), &Limits::default(), scratch.path()).unwrap();
            std::hint::black_box(&pkg.checksum);
        }
        _ => {
            std::hint::black_box(before(&bytes));
        }
    }
    println!("{}", status_kib("self", "VmHWM:").saturating_sub(base));
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--rss" {
        return rss_child(&args[2], &args[3]);
    }
    let started = Instant::now();
    let load_start = loadavg();
    let runs = harness::benchmarks::knob("SRI_BENCH_INTAKE_RUNS", RUNS);
    let scratch = TempDir::new("bench-intake");
    let sample = zip_files(&collect_dir(&plugin_dir("sample")));
    let large = package(5_000, 8 * 1024, 0);
    let mut rows = Vec::new();
    for (what, bytes) in [("sample plugin", &sample), ("5,000 files", &large)] {
        assert_eq!(before(bytes), after(bytes, scratch.path()), "same checksum");
        let (mut b, mut a) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let t = Instant::now();
            std::hint::black_box(before(bytes));
            b.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            std::hint::black_box(after(bytes, scratch.path()));
            a.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (mb, ma) = (median(&b), median(&a));
        rows.push(format!(
            "| {what} ({:.1} MiB zipped) | {mb:.1} ms | {ma:.1} ms | ×{:.2} |",
            bytes.len() as f64 / 1048576.0,
            ma / mb
        ));
    }

    let big = 32 * 1024 * 1024;
    let file = scratch.path().join("big.difypkg");
    std::fs::write(&file, package(200, 4096, big)).unwrap();
    let exe = std::env::current_exe().unwrap();
    let rss = |mode: &str| -> u64 {
        let out = std::process::Command::new(&exe)
            .args(["--rss", mode])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (rss_before, rss_after) = (rss("before"), rss("after"));

    let mut r = String::new();
    let _ = writeln!(
        r,
        "## Package intake\n\n{}",
        run_lines(
            "cargo run --release --locked -p sri-tests --example bench_intake",
            &harness::benchmarks::cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
                .unwrap_or_default(),
            started.elapsed(),
            &load_start,
            &loadavg()
        )
    );
    let _ = writeln!(
        r,
        "Reading a package and laying its files out on disk: **before** = the reader the intake \
         replaced (`zip` crate, every entry whole in memory, then written out), **after** = \
         `Package::read_in` (rc-zip, streamed to disk while counting and hashing, every check \
         on). Median of {runs} interleaved runs each; target: after ≤ ×1.10 of before.\n"
    );
    let _ = writeln!(
        r,
        "| package | before | after | after/before |\n|---|---:|---:|---:|"
    );
    for row in &rows {
        let _ = writeln!(r, "{row}");
    }
    let _ = writeln!(
        r,
        "\nPeak RSS growth of one read in a fresh process, package of 200 small files and one \
         32 MiB entry, over the package bytes already in memory; target: ≤ 2× the largest entry \
         ({} KiB):\n\n| reader | peak RSS growth |\n|---|---:|\n| before | {rss_before} KiB |\n| after | {rss_after} KiB |",
        2 * big / 1024
    );
    println!("{r}");
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "intake", &r).expect("write BENCHMARKS.md");
    println!("wrote the intake section of {}", out.display());
}
