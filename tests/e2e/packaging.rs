//! `.difypkg` → Lambda zip, with real uv and PyPI: platform wheels per architecture, the
//! bootstrap's architecture and mode, the missing-wheel error, offline installs from a
//! wheelhouse, shipped bytecode, and the artifact cache.
//!
//! Each test has its own artifact cache; uv's download cache is shared (a symlink) so that only
//! the first test downloads.

use connector::packaging::{self, Arch, Artifact, Options, PythonVersion, Target};
use harness::cross::{elf_machine, fresh_sri, lambda_bootstrap};
use harness::sri::TempDir;
use harness::{plugin_dir, root};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A fresh artifact cache sharing uv's downloads with the other tests.
fn cache_in(dir: &TempDir) -> PathBuf {
    let shared = root().join("target/sri-test-uv-cache");
    std::fs::create_dir_all(&shared).unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::os::unix::fs::symlink(&shared, cache.join("uv")).unwrap();
    cache
}

fn uv() -> PathBuf {
    root().join(".venv/tools/bin/uv")
}

fn options(arch: Arch, cache: PathBuf) -> Options {
    let mut o = Options::new(Target {
        arch,
        python: PythonVersion::Py312,
    });
    o.bootstrap = lambda_bootstrap(arch.lambda_name());
    o.cache_dir = cache;
    o.uv = uv();
    o
}

/// Builds with the library, collecting progress lines.
async fn build(
    pkg: &connector::package::Package,
    opts: &Options,
) -> (Result<Artifact, String>, Vec<String>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = tokio::time::timeout(Duration::from_secs(600), packaging::build(pkg, opts, &tx))
        .await
        .expect("packaging finished within 600 s")
        .map_err(|e| e.to_string());
    drop(tx);
    let mut lines = Vec::new();
    while let Some((stage, msg)) = rx.recv().await {
        lines.push(format!("[{stage}] {msg}"));
    }
    (r, lines)
}

/// The zip's files: name → (unix mode, content).
fn unzip(path: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let mut out = BTreeMap::new();
    for i in 0..z.len() {
        let mut f = z.by_index(i).unwrap();
        let mode = f.unix_mode().unwrap_or(0);
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).unwrap();
        out.insert(f.name().to_owned(), (mode, buf));
    }
    out
}

fn sample() -> connector::package::Package {
    connector::cli::load(&plugin_dir("sample")).unwrap()
}

/// Runs `sri package …` with `env`, returning (success, stdout, stderr).
fn sri_package<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    sri_package_in(None, args, env)
}

/// [`sri_package`] run from `cwd` (else this process's directory).
fn sri_package_in<S: AsRef<std::ffi::OsStr>>(
    cwd: Option<&Path>,
    args: &[S],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut cmd = Command::new(fresh_sri());
    cmd.arg("package").args(args);
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run sri package");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a function zip build names: the plugin, the architecture, the bootstrap, the cache, uv
/// and the output; then `extra`.
fn zip_args(
    plugin: &Path,
    arch: &str,
    bootstrap: &Path,
    cache: &Path,
    uv: &Path,
    out: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args = vec![plugin.display().to_string(), "--arch".into(), arch.into()];
    for (flag, path) in [
        ("--bootstrap", bootstrap),
        ("--cache-dir", cache),
        ("--uv", uv),
        ("-o", out),
    ] {
        args.extend([flag.to_owned(), path.display().to_string()]);
    }
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

fn check_sample_zip(a: &Artifact, arch: Arch) {
    let files = unzip(&a.zip);
    let (mode, boot) = &files["bin/bootstrap"];
    assert_eq!(mode & 0o777, 0o755, "bin/bootstrap mode {mode:o}");
    assert_eq!(elf_machine(boot), arch_machine(arch));
    assert!(files.contains_key("plugin/manifest.yaml"));
    assert!(files.contains_key("plugin/main.py"));
    // The SDK the sample needs on 3.12, not an old release picked for lack of wheels.
    assert!(
        files
            .keys()
            .any(|n| n.starts_with("vendor/dify_plugin-0.10.")),
        "dify_plugin 0.10.x is vendored"
    );
    // Native code for the target: pydantic_core's extension and its wheel tags.
    let (so_name, (_, so)) = files
        .iter()
        .find(|(n, _)| n.starts_with("vendor/pydantic_core/_pydantic_core") && n.ends_with(".so"))
        .expect("pydantic_core's extension is vendored");
    assert_eq!(elf_machine(so), arch_machine(arch), "{so_name}");
    let (_, (_, wheel)) = files
        .iter()
        .find(|(n, _)| n.starts_with("vendor/pydantic_core-") && n.ends_with(".dist-info/WHEEL"))
        .expect("pydantic_core's WHEEL");
    let tags = String::from_utf8_lossy(wheel);
    let machine = if arch == Arch::Arm64 {
        "aarch64"
    } else {
        "x86_64"
    };
    assert!(
        tags.lines()
            .filter(|l| l.starts_with("Tag:"))
            .all(|l| l.contains("manylinux") && l.ends_with(machine)),
        "{tags}"
    );
    // No console scripts pointing at the build machine's Python.
    assert!(!files.keys().any(|n| n.starts_with("vendor/bin/")));
    let config: Value = serde_json::from_slice(&files["sri-function.json"].1).unwrap();
    assert_eq!(config["runtime"], "python3.12");
    assert_eq!(config["architecture"], arch.lambda_name());
    assert_eq!(
        config["environment"]["AWS_LAMBDA_EXEC_WRAPPER"],
        "/var/task/bin/bootstrap"
    );
    assert_eq!(config["environment"]["SRI_PYTHON"], "/var/lang/bin/python3");
    assert_eq!(serde_json::to_value(&a.config).unwrap(), config);
    // The manifest as the intake validated it, which the Lambda bootstrap reads instead of YAML.
    let record: connector::manifest::Manifest =
        serde_json::from_slice(&files[connector::manifest::RECORD_FILE].1).unwrap();
    assert_eq!(record, sample().manifest);
    // Sizes as Lambda counts them.
    let unzipped: u64 = files.values().map(|(_, c)| c.len() as u64).sum();
    assert_eq!(a.unzipped_bytes, unzipped);
    assert_eq!(a.zipped_bytes, std::fs::metadata(&a.zip).unwrap().len());
    assert!(!a.needs_s3(), "{} bytes", a.zipped_bytes);
    // Bytecode from the target's minor version, when this machine has one (it does here).
    if let Some(v) = &a.bytecode {
        assert!(v.starts_with("3.12."), "{v}");
        assert!(files.contains_key("plugin/__pycache__/main.cpython-312.pyc"));
        assert!(
            files
                .keys()
                .any(|n| n.starts_with("vendor/dify_plugin/") && n.ends_with(".cpython-312.pyc"))
        );
    }
}

fn arch_machine(arch: Arch) -> u16 {
    match arch {
        Arch::Arm64 => 0xB7,
        Arch::X86_64 => 0x3E,
    }
}

#[tokio::test]
async fn arm64_zip_has_aarch64_wheels_and_a_warm_rebuild_is_a_cache_hit() {
    let dir = TempDir::new("pack-arm");
    let opts = options(Arch::Arm64, cache_in(&dir));
    let pkg = sample();
    // Two builds of one key at once (two installs of a plugin): one builds, the other waits
    // for it and finds its zip, never one's zip under the other's metadata.
    let ((a, lines), (twin, _)) = tokio::join!(build(&pkg, &opts), build(&pkg, &opts));
    let a = a.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    let twin = twin.unwrap();
    let (a, twin) = if a.cache_hit { (twin, a) } else { (a, twin) };
    assert!(
        !a.cache_hit && twin.cache_hit,
        "exactly one of the two built"
    );
    assert_eq!((&twin.zip, &twin.code_sha256), (&a.zip, &a.code_sha256));
    check_sample_zip(&a, Arch::Arm64);
    // The template README promises bytecode where the interpreter exists; pyenv has 3.12 here.
    assert!(a.bytecode.is_some(), "{}", lines.join("\n"));

    let started = Instant::now();
    let (again, _) = build(&pkg, &opts).await;
    let again = again.unwrap();
    let warm = started.elapsed();
    assert!(again.cache_hit);
    assert_eq!(again.code_sha256, a.code_sha256);
    assert_eq!(again.zip, a.zip);
    assert!(warm < Duration::from_secs(3), "warm build took {warm:?}");
}

#[tokio::test]
async fn x86_64_zip_has_x86_64_wheels_and_is_deterministic() {
    let dir = TempDir::new("pack-x86");
    let opts = options(Arch::X86_64, cache_in(&dir));
    let pkg = sample();
    let (a, lines) = build(&pkg, &opts).await;
    let a = a.unwrap_or_else(|e| panic!("{e}\n{}", lines.join("\n")));
    check_sample_zip(&a, Arch::X86_64);
    // A rebuild from scratch (another cache) gives the same bytes.
    let dir2 = TempDir::new("pack-x86b");
    let (b, _) = build(&pkg, &options(Arch::X86_64, cache_in(&dir2))).await;
    let b = b.unwrap();
    assert!(!b.cache_hit);
    assert_eq!(b.code_sha256, a.code_sha256, "same inputs, same CodeSha256");
}

/// A wheel for a made-up package, tagged for manylinux2014_x86_64 only.
fn x86_only_wheel(wheelhouse: &Path) {
    std::fs::create_dir_all(wheelhouse).unwrap();
    let path = wheelhouse.join("sri_only_x86-0.1.0-py3-none-manylinux2014_x86_64.whl");
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let o = zip::write::SimpleFileOptions::default();
    for (name, body) in [
        ("sri_only_x86/__init__.py", "VALUE = 1\n"),
        (
            "sri_only_x86-0.1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: sri-only-x86\nVersion: 0.1.0\n",
        ),
        (
            "sri_only_x86-0.1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: sri-tests\nRoot-Is-Purelib: false\nTag: py3-none-manylinux2014_x86_64\n",
        ),
        ("sri_only_x86-0.1.0.dist-info/RECORD", ""),
    ] {
        w.start_file(name, o).unwrap();
        w.write_all(body.as_bytes()).unwrap();
    }
    w.finish().unwrap();
}

/// A minimal plugin that requires only `requirements`.
fn tiny_plugin(dir: &Path, requirements: &str) {
    std::fs::create_dir_all(dir.join("__pycache__")).unwrap();
    std::fs::write(
        dir.join("manifest.yaml"),
        "version: 0.1.0\nauthor: sri\nname: tiny\nmeta:\n  runner:\n    language: python\n    version: \"3.12\"\n    entrypoint: main\n",
    )
    .unwrap();
    std::fs::write(dir.join("main.py"), "import sri_only_x86\n").unwrap();
    std::fs::write(dir.join("requirements.txt"), requirements).unwrap();
    // Junk a plugin author leaves around: never shipped.
    std::fs::write(dir.join("__pycache__/main.cpython-311.pyc"), "stale").unwrap();
}

#[test]
fn a_dependency_without_a_wheel_for_the_target_is_named_with_the_fix() {
    let dir = TempDir::new("pack-nowheel");
    let wh = dir.path().join("wheelhouse");
    x86_only_wheel(&wh);
    let plugin = dir.path().join("plugin");
    tiny_plugin(&plugin, "sri-only-x86==0.1.0\n");
    let cache = cache_in(&dir);
    let (arm, x86) = (lambda_bootstrap("arm64"), lambda_bootstrap("x86_64"));
    let out = dir.path().join("out.zip");
    let wheelhouse = ["--offline", "--wheelhouse", wh.to_str().unwrap()];
    let args =
        |arch: &str, boot: &Path| zip_args(&plugin, arch, boot, &cache, &uv(), &out, &wheelhouse);
    let (ok, _, err) = sri_package(&args("arm64", &arm), &[]);
    assert!(!ok, "arm64 has no wheel: {err}");
    for needle in [
        "`sri-only-x86` has no wheel",
        "manylinux2014_aarch64",
        "Python 3.12",
        "--wheelhouse",
        "--arch x86_64",
        "uv said:",
    ] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    assert!(!out.exists(), "no zip on failure");
    // Nothing half-built is left in the cache.
    let leftovers: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".zip"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let (ok, stdout, err) = sri_package(&args("x86_64", &x86), &[]);
    assert!(ok, "x86_64 has the wheel: {err}");
    assert!(stdout.contains("cache        miss"), "{stdout}");
    let files = unzip(&out);
    assert!(files.contains_key("vendor/sri_only_x86/__init__.py"));
    assert!(
        !files.contains_key("plugin/__pycache__/main.cpython-311.pyc"),
        "the package's own bytecode is junk"
    );
}

#[test]
fn without_an_interpreter_of_the_target_version_it_ships_no_bytecode_and_says_so() {
    let dir = TempDir::new("pack-nopy");
    let wh = dir.path().join("wheelhouse");
    x86_only_wheel(&wh);
    let plugin = dir.path().join("plugin");
    tiny_plugin(&plugin, "sri-only-x86==0.1.0\n");
    let cache = cache_in(&dir);
    let x86 = lambda_bootstrap("x86_64");
    let wheelhouse = ["--offline", "--wheelhouse", wh.to_str().unwrap()];
    let run = |out: &Path, env: &[(&str, &str)]| {
        sri_package(
            &zip_args(&plugin, "x86_64", &x86, &cache, &uv(), out, &wheelhouse),
            env,
        )
    };
    let missing = dir.path().join("missing.zip");
    let (ok, stdout, err) = run(&missing, &[("SRI_PYTHON_3_12", "/nonexistent/python3.12")]);
    assert!(ok, "{err}");
    assert!(
        err.contains("no Python 3.12 interpreter found; shipping without bytecode")
            && err.contains("SRI_PYTHON_3_12"),
        "{err}"
    );
    assert!(stdout.contains("bytecode     none"), "{stdout}");
    assert!(!unzip(&missing).keys().any(|n| n.ends_with(".pyc")));

    let with = dir.path().join("with.zip");
    let (ok, stdout, err) = run(&with, &[]);
    assert!(ok, "{err}");
    assert!(stdout.contains("bytecode     Python 3.12."), "{stdout}");
    let files = unzip(&with);
    assert!(files.contains_key("plugin/__pycache__/main.cpython-312.pyc"));
    assert!(files.contains_key("vendor/sri_only_x86/__pycache__/__init__.cpython-312.pyc"));
    // unchecked-hash pycs: flags word (bytes 4..8) is 0b01 (hash-based, unchecked).
    let pyc = &files["plugin/__pycache__/main.cpython-312.pyc"].1;
    assert_eq!(u32::from_le_bytes(pyc[4..8].try_into().unwrap()), 0b01);
}

#[test]
fn offline_installs_come_from_the_wheelhouse_alone() {
    let dir = TempDir::new("pack-offline");
    let wh = dir.path().join("wheelhouse");
    // The wheelhouse an air-gapped site would prepare on a connected machine.
    let pip = root().join(".venv/py312/bin/pip");
    let out = Command::new(&pip)
        .args([
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
        ])
        .args([
            "--platform",
            "manylinux_2_34_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
        ])
        .args([
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.12",
            "-d",
        ])
        .arg(&wh)
        .arg("-r")
        .arg(plugin_dir("sample").join("requirements.txt"))
        .output()
        .expect("run pip download");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An own uv cache (no shared downloads) and an index that refuses connections.
    let cache = dir.path().join("cache");
    let zip = dir.path().join("offline.zip");
    let x86 = lambda_bootstrap("x86_64");
    let (ok, stdout, err) = sri_package(
        &zip_args(
            &plugin_dir("sample"),
            "x86_64",
            &x86,
            &cache,
            &uv(),
            &zip,
            &[
                "--offline",
                "--wheelhouse",
                wh.to_str().unwrap(),
                "--no-bytecode",
            ],
        ),
        &[
            ("UV_INDEX_URL", "http://127.0.0.1:9/"),
            ("UV_DEFAULT_INDEX", "http://127.0.0.1:9/"),
            ("PIP_INDEX_URL", "http://127.0.0.1:9/"),
        ],
    );
    assert!(ok, "{err}");
    assert!(err.contains("offline"), "{err}");
    assert!(stdout.contains("bytecode     none"), "{stdout}");
    let files = unzip(&zip);
    // The SDK layer (on by default) is built from the wheelhouse alone too.
    let layer = unzip(&dir.path().join("offline.sdk-layer.zip"));
    assert!(layer.keys().any(|n| n.starts_with("python/dify_plugin/")));
    assert!(layer.keys().any(|n| n.starts_with("python/pydantic_core/")));
    assert!(
        !files
            .keys()
            .chain(layer.keys())
            .any(|n| n.ends_with(".pyc")),
        "--no-bytecode"
    );
}

#[tokio::test]
async fn bad_inputs_are_refused_with_the_fix() {
    let dir = TempDir::new("pack-bad");
    let pkg = sample();
    let cache = cache_in(&dir);
    // Offline without a wheelhouse.
    let mut o = options(Arch::X86_64, cache.clone());
    o.offline = true;
    let (r, _) = build(&pkg, &o).await;
    let e = r.unwrap_err();
    assert!(e.contains("--wheelhouse") && e.contains("offline"), "{e}");
    // A bootstrap of the wrong architecture.
    let mut o = options(Arch::X86_64, cache);
    o.bootstrap = lambda_bootstrap("arm64");
    let (r, _) = build(&pkg, &o).await;
    let e = r.unwrap_err();
    assert!(
        e.contains("built for aarch64") && e.contains("SRI_BOOTSTRAP_X86_64"),
        "{e}"
    );
    // The old behaviour stays behind --difypkg.
    let out = dir.path().join("sample.difypkg");
    let (ok, stdout, err) = sri_package(
        &[
            plugin_dir("sample").to_str().unwrap(),
            "--difypkg",
            "-o",
            out.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(stdout.contains(&pkg.checksum), "{stdout}");
    let back = connector::cli::load(&out).unwrap();
    assert_eq!(back.checksum, pkg.checksum);
}

/// `sri package` parses the dependency list before uv runs: `-r /proc/self/environ` (and a
/// `git+` reference) exit non-zero naming the file, the line and the rule, with uv never
/// started. A good plugin is installed from the list the connector writes, by a uv (spied on
/// through `--uv`) whose environment holds none of `sri`'s, and a canary in that environment
/// reaches neither uv nor the zip.
#[test]
fn dependency_files_are_parsed_before_uv_and_uv_sees_none_of_the_environment() {
    let dir = TempDir::new("pack-reqs");
    let canary = format!("sri-pack-canary-{}", std::process::id());
    let (spy, calls) = harness::sri::uv_spy(dir.path());
    let cache = cache_in(&dir);
    let x86 = lambda_bootstrap("x86_64");
    let out = dir.path().join("out.zip");
    let plugin = dir.path().join("plugin");
    let package = |requirements: &str| {
        let _ = std::fs::remove_dir_all(&plugin);
        for (p, bytes) in harness::difypkg::collect_dir(&plugin_dir("sample")) {
            let path = plugin.join(&p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        std::fs::write(plugin.join("requirements.txt"), requirements).unwrap();
        let args = zip_args(
            &plugin,
            "x86_64",
            &x86,
            &cache,
            &spy,
            &out,
            &["--no-bytecode"],
        );
        sri_package(&args, &[("SRI_TEST_CANARY", canary.as_str())])
    };
    for (requirements, words) in [
        (
            "-r /proc/self/environ\n",
            &["requirements.txt line 1:", "`-r`", "another file"][..],
        ),
        (
            "dify_plugin>=0.7.4,<0.11\nsdk @ git+https://github.com/x/y.git\n",
            &["requirements.txt line 2:", "VCS reference"],
        ),
    ] {
        let (ok, _, err) = package(requirements);
        assert!(!ok, "{requirements:?} was packaged");
        for w in words {
            assert!(err.contains(w), "{w:?} missing from:\n{err}");
        }
        assert!(!err.contains(&canary), "{err}");
        assert!(!calls.exists(), "uv ran for {requirements:?}");
        assert!(!out.exists());
    }

    let (ok, _, err) = package(
        "# the sample's dependency\ndify_plugin>=0.7.4,<0.11 \\\n  ; python_version >= '3.8'\n",
    );
    assert!(ok, "{err}");
    let spied = std::fs::read_to_string(&calls).expect("uv ran");
    assert!(
        spied.contains("[-r] [") && spied.contains("sri-requirements.txt]"),
        "uv reads the connector's list:\n{spied}"
    );
    assert!(!spied.contains(&plugin.join("requirements.txt").display().to_string()));
    assert!(!spied.contains(&canary), "the canary reached uv:\n{spied}");
    assert!(
        spied.contains("\nHOME=") && spied.contains(".home-"),
        "{spied}"
    );
    let mut zip = unzip(&out);
    // The SDK went into the layer beside it (on by default), installed the same way.
    let layer = unzip(&out.with_extension("sdk-layer.zip"));
    assert!(layer.keys().any(|k| k.starts_with("python/dify_plugin/")));
    zip.extend(layer);
    for (name, (_, bytes)) in &zip {
        assert!(
            !bytes.windows(canary.len()).any(|w| w == canary.as_bytes()),
            "the canary reached {name}"
        );
    }
}

#[test]
fn sri_package_writes_the_sdk_layer_beside_a_trimmed_zip() {
    let dir = TempDir::new("pack-layer");
    let cache = cache_in(&dir);
    let x86 = lambda_bootstrap("x86_64");
    let sample = plugin_dir("sample");
    let run = |out: &Path, layer: &str| {
        sri_package(
            &zip_args(
                &sample,
                "x86_64",
                &x86,
                &cache,
                &uv(),
                out,
                &["--sdk-layer", layer],
            ),
            &[],
        )
    };
    let out = dir.path().join("fn.zip");
    let (ok, stdout, err) = run(&out, "true");
    assert!(ok, "{err}");
    let layer_zip = dir.path().join("fn.sdk-layer.zip");
    assert!(
        stdout.contains("sdk layer") && stdout.contains(layer_zip.to_str().unwrap()),
        "{stdout}"
    );
    let layer = unzip(&layer_zip);
    assert!(
        layer.contains_key("python/dify_plugin/__init__.py"),
        "the SDK is in the layer"
    );
    assert!(
        layer.contains_key("python/dify_plugin/__pycache__/__init__.cpython-312.pyc"),
        "with bytecode"
    );
    let manifest: Value = serde_json::from_slice(&layer["sri-layer.json"].1).unwrap();
    let sdk = manifest["sdk_version"].as_str().unwrap().to_owned();
    assert_eq!(
        manifest["distributions"]["dify-plugin"]["version"],
        sdk.as_str()
    );
    assert!(
        manifest["distributions"]["pydantic"].is_object(),
        "{manifest}"
    );

    let files = unzip(&out);
    assert!(
        !files
            .keys()
            .any(|n| n.starts_with("vendor/dify_plugin") || n.starts_with("vendor/pydantic/")),
        "the function zip does not carry what the layer holds: {:?}",
        files
            .keys()
            .filter(|n| n.starts_with("vendor/"))
            .take(20)
            .collect::<Vec<_>>()
    );
    let config: Value = serde_json::from_slice(&files["sri-function.json"].1).unwrap();
    let mut h = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut h, std::fs::read(&layer_zip).unwrap());
    assert_eq!(
        config["layer"]["sha256"],
        hex::encode(sha2::Digest::finalize(h)).as_str(),
        "the function names its layer by content hash"
    );
    assert_eq!(config["layer"]["sdk_version"], sdk.as_str());
    assert_eq!(
        config["environment"]["SRI_PYTHONPATH"],
        "/var/task/vendor:/opt/python"
    );

    // Off: one self-contained zip, as before the layer existed.
    let whole = dir.path().join("whole.zip");
    let (ok, stdout, err) = run(&whole, "false");
    assert!(ok, "{err}");
    assert!(!stdout.contains("sdk layer"), "{stdout}");
    assert!(!dir.path().join("whole.sdk-layer.zip").exists());
    let files = unzip(&whole);
    assert!(files.contains_key("vendor/dify_plugin/__init__.py"));
    let config: Value = serde_json::from_slice(&files["sri-function.json"].1).unwrap();
    assert!(config.get("layer").is_none(), "{config}");
    assert!(std::fs::metadata(&whole).unwrap().len() > std::fs::metadata(&out).unwrap().len());
}

#[test]
fn relative_paths_are_taken_from_where_sri_runs() {
    // uv and Python run in a scratch directory of their own: `--cache-dir c` and
    // `--uv tools/uv` must still name the operator's.
    let dir = TempDir::new("pack-relative");
    cache_in(&dir);
    std::fs::create_dir_all(dir.path().join("tools")).unwrap();
    std::os::unix::fs::symlink(uv(), dir.path().join("tools/uv")).unwrap();
    let x86 = lambda_bootstrap("x86_64");
    let sample = plugin_dir("sample");
    let args = zip_args(
        &sample,
        "x86_64",
        &x86,
        Path::new("cache"),
        Path::new("tools/uv"),
        Path::new("fn.zip"),
        &["--sdk-layer", "false"],
    );
    let (ok, _, err) = sri_package_in(Some(dir.path()), &args, &[]);
    assert!(ok, "{err}");
    let files = unzip(&dir.path().join("fn.zip"));
    assert!(
        files
            .keys()
            .any(|n| n.starts_with("vendor/dify_plugin/__pycache__/")),
        "dependencies installed and compiled"
    );
    assert!(
        std::fs::read_dir(dir.path().join("cache")).unwrap().count() > 1,
        "the relative cache was used"
    );
}
