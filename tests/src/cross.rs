//! Linux builds of the `bootstrap` for each Lambda architecture (cross-compiled with
//! `cargo lambda build`, which bundles zig), built once per test run, and a check that `sri` is
//! current.
//!
//! The packaging tests put these binaries into function zips, so they must exist and match the
//! sources: a stale `sri` would test an old command line. Builds are debug (fast, incremental)
//! with debug info stripped (a 90 MiB binary would dominate every zip). The first cross build
//! takes minutes; later ones only relink.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::emulator::cargo_lambda;
use crate::root;

/// One build at a time: they share the target directory's lock anyway.
static BUILD: Mutex<()> = Mutex::new(());

/// A cargo command without the variables cargo sets for the running test (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_DIR`, …): build scripts that track them would otherwise see a different
/// environment than a build from a shell, and rebuild (and again on the next shell build).
fn clean_cargo_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let keep = matches!(k.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR")
            || k.starts_with("CARGO_NET_")
            || k.starts_with("CARGO_HTTP_")
            || k.starts_with("CARGO_REGISTRIES_");
        if (k.starts_with("CARGO_") && !keep) || matches!(k.as_ref(), "OUT_DIR" | "RUSTC_WRAPPER") {
            cmd.env_remove(k.as_ref());
        }
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The bootstrap for `arch` (`arm64` or `x86_64`): `SRI_BOOTSTRAP_ARM64` / `SRI_BOOTSTRAP_X86_64`
/// when set, else a debug cross build made now (once per process).
pub fn lambda_bootstrap(arch: &str) -> PathBuf {
    static ARM: OnceLock<PathBuf> = OnceLock::new();
    static X86: OnceLock<PathBuf> = OnceLock::new();
    let (cell, flag) = match arch {
        "arm64" => (&ARM, "--arm64"),
        "x86_64" => (&X86, "--x86-64"),
        other => panic!("unknown arch {other}"),
    };
    cell.get_or_init(|| {
        let var = format!("SRI_BOOTSTRAP_{}", arch.to_ascii_uppercase());
        if let Some(p) = std::env::var_os(&var) {
            return PathBuf::from(p);
        }
        // On an x86_64 Linux host the workspace's own debug build already is an x86_64 Linux
        // bootstrap; a second, cross build of every dependency would add minutes to the suite
        // for the same ELF machine. (Shipped zips use `make lambda-bootstrap`'s builds, linked
        // by zig against Lambda's glibc.)
        if arch == "x86_64" && cfg!(all(target_arch = "x86_64", target_os = "linux")) {
            return crate::stripped_bootstrap();
        }
        let dir = target_dir().join("lambda-debug").join(arch);
        let _one = BUILD.lock().unwrap_or_else(|e| e.into_inner());
        let tools = root().join(".venv/tools/bin");
        let path = std::env::join_paths(std::iter::once(tools).chain(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        )))
        .expect("PATH");
        let mut cmd = Command::new(cargo_lambda());
        clean_cargo_env(&mut cmd);
        let out = cmd
            .args([
                "lambda",
                "build",
                "-p",
                "sri-bootstrap",
                // As shipped: Lambda builds leave out `bootstrap serve`'s h2c.
                "--no-default-features",
                "--bin",
                "bootstrap",
                flag,
            ])
            .arg("--lambda-dir")
            .arg(&dir)
            .env("CARGO_PROFILE_DEV_STRIP", "debuginfo")
            .env("PATH", path)
            .current_dir(root())
            .output()
            .expect("run cargo lambda build");
        assert!(
            out.status.success(),
            "cargo lambda build {flag} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bin = dir.join("bootstrap").join("bootstrap");
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
    .clone()
}

/// The `sri` binary (`cargo build -p sri-connector`, or `SRI_CONNECTOR_BIN`), checked to have the
/// packaging command line: a stale binary would test an old `sri package`.
///
/// It is not rebuilt from here: a cargo started by a test runs with the toolchain's own
/// `cargo`/`rustc` rather than rustup's proxies, which cargo sees as another compiler, and the
/// shell's next build then recompiles every dependency again.
pub fn fresh_sri() -> PathBuf {
    static SRI: OnceLock<PathBuf> = OnceLock::new();
    SRI.get_or_init(|| {
        let sri = crate::sri::sri_bin();
        let help = Command::new(&sri)
            .args(["package", "--help"])
            .output()
            .expect("run sri package --help");
        assert!(
            String::from_utf8_lossy(&help.stdout).contains("--difypkg"),
            "{} predates `sri package --arch`: run `cargo build -p sri-connector` (`make build`)",
            sri.display()
        );
        sri
    })
    .clone()
}

/// The ELF `e_machine` of `bytes` (0xB7 aarch64, 0x3E x86_64).
pub fn elf_machine(bytes: &[u8]) -> u16 {
    assert!(
        bytes.len() > 20 && bytes[..4] == *b"\x7fELF",
        "not an ELF file"
    );
    u16::from_le_bytes([bytes[18], bytes[19]])
}
