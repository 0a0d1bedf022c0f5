//! `make bench`, third part: what packaging costs and what shipped bytecode buys. Writes its
//! section of `BENCHMARKS.md` (between `<!-- bench:packaging:begin -->` and
//! `<!-- bench:packaging:end -->`) and prints it.
//!
//! 1. `connector::packaging::build` of the template's sample plugin per architecture: cold
//!    (empty artifact cache *and* empty uv download cache, so it includes the downloads from
//!    PyPI), then warm (the same inputs again: a cache hit); zip sizes.
//! 2. Cold start of the packaged x86_64 function under `cargo lambda watch`: the zip unpacked as
//!    `$LAMBDA_TASK_ROOT`, its own `bin/bootstrap` started as the managed runtime would start the
//!    exec wrapper, the bare pyenv Python 3.12 as `SRI_PYTHON` (no venv: the SDK comes from
//!    `vendor/`), `PYTHONDONTWRITEBYTECODE=1` (Lambda's `/var/task` is read-only, so Python can
//!    never cache what it compiles there). With the zip's bytecode vs the same zip built with
//!    `--no-bytecode`; median of several fresh starts each, interleaved. Measured from spawning
//!    the bootstrap to the first `chunk` of an `echo` call that was pending when it first polled.
//!
//! 3. The shared SDK layer (`SRI_LAMBDA_SDK_LAYER`): the x86_64 function zip with and without
//!    it, the layer itself, the cold start of the trimmed zip with the layer unpacked as `/opt`
//!    (as 2.), and deploy time against `moto_server` (the artifact already cached, so this is
//!    the upload and the Lambda calls): without the layer, with it for a first plugin (which
//!    publishes the layer) and for a second one (which reuses it).
//!
//! The bootstraps come from `harness::cross` (debug cross builds, or `SRI_BOOTSTRAP_ARM64` /
//! `SRI_BOOTSTRAP_X86_64`, e.g. the `make lambda-bootstrap` dist builds).

use connector::packaging::{self, Arch, Artifact, Options, PythonVersion, Target};
use harness::benchmarks::{install_cleanup, knob, loadavg, median, ms, run_lines, track};
use harness::cross::lambda_bootstrap;
use harness::emulator::Emulator;
use harness::sri::TempDir;
use harness::*;
use serde_json::json;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Fresh starts per cold-start row (`SRI_BENCH_PACK_COLD` overrides).
const COLD_TRIALS: usize = 7;

async fn build(pkg: &connector::package::Package, opts: &Options) -> (Artifact, Duration) {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let t = Instant::now();
    let a = tokio::time::timeout(Duration::from_secs(900), packaging::build(pkg, opts, &tx))
        .await
        .expect("packaging within 900 s")
        .unwrap_or_else(|e| panic!("packaging failed: {e}"));
    (a, t.elapsed())
}

fn unzip_to(zip: &Path, dir: &Path) {
    let mut z = zip::ZipArchive::new(std::fs::File::open(zip).unwrap()).unwrap();
    z.extract(dir).unwrap();
    // zip's extract keeps modes; make sure the runtime is executable.
    use std::os::unix::fs::PermissionsExt;
    let boot = dir.join("bin/bootstrap");
    std::fs::set_permissions(&boot, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut head = [0u8; 4];
    std::fs::File::open(&boot)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"\x7fELF");
}

/// The bare interpreter of Python 3.12 (what `/var/lang/bin/python3` is on Lambda).
fn bare_python() -> PathBuf {
    std::fs::canonicalize(Py::Py312.python()).expect("py312 interpreter")
}

/// One cold start of the function unpacked at `task_root` (with `python_path` as
/// `SRI_PYTHONPATH` when it uses a layer): ms to the first chunk.
async fn cold_start(task_root: &Path, python_path: Option<&str>) -> f64 {
    let emu = Emulator::start();
    let t0 = Instant::now();
    let mut cmd = Command::new(task_root.join("bin/bootstrap"));
    // Without a layer the bootstrap finds `vendor/` itself, as on Lambda.
    match python_path {
        Some(p) => cmd.env("SRI_PYTHONPATH", p),
        None => cmd.env_remove("SRI_PYTHONPATH"),
    };
    let mut child = cmd
        // A managed runtime's command line, which the wrapper ignores.
        .args(["/var/runtime/bootstrap", "--handler", "x"])
        .env("AWS_LAMBDA_RUNTIME_API", emu.runtime_api())
        .env("LAMBDA_TASK_ROOT", task_root)
        .env("SRI_PYTHON", bare_python())
        .env("SRI_SIGNING_KEYS", keys_env(&[SECRET_A]))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("AWS_LAMBDA_LOG_FORMAT", "json")
        .env_remove("SRI_PLUGIN_DIR")
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the packaged bootstrap");
    track(child.id());
    let body = envelope(
        &session_id("pack-cold"),
        tool_data("sample", "echo", json!({"text": "bench"}), None),
    );
    let events = tokio::time::timeout(
        Duration::from_secs(60),
        invoke_stream(&emu.function_url(), body),
    )
    .await
    .expect("cold call within 60 s");
    let first_chunk = events
        .iter()
        .find(|(_, e)| e.kind == connector::protocol::events::EventKind::Chunk)
        .map(|_| t0.elapsed())
        .unwrap_or_else(|| panic!("no chunk: {:?}", kinds(&events)));
    stop(&mut child);
    drop(emu);
    ms(first_chunk)
}

fn main() {
    install_cleanup("bench_packaging");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let load_start = loadavg();
    let pkg = connector::cli::load(&plugin_dir("sample")).expect("sample plugin");
    let work = TempDir::new("bench-pack");
    let uv = root().join(".venv/tools/bin/uv");
    let mut rows = Vec::new();
    let mut zips = Vec::new();
    for arch in [Arch::Arm64, Arch::X86_64] {
        let mut o = Options::new(Target {
            arch,
            python: PythonVersion::Py312,
        });
        o.bootstrap = lambda_bootstrap(arch.lambda_name());
        o.cache_dir = work.path().join(format!("cache-{arch}"));
        o.uv = uv.clone();
        println!("bench: packaging for {arch}, cold…");
        let (a, cold) = rt.block_on(build(&pkg, &o));
        assert!(!a.cache_hit);
        println!("bench: packaging for {arch}, warm…");
        let (w, warm) = rt.block_on(build(&pkg, &o));
        assert!(w.cache_hit && w.code_sha256 == a.code_sha256);
        rows.push(format!(
            "| {arch} | {:.1} s | {:.0} ms | {} | {} | {} |",
            cold.as_secs_f64(),
            ms(warm),
            packaging::human(a.zipped_bytes),
            packaging::human(a.unzipped_bytes),
            a.bytecode.as_deref().unwrap_or("none"),
        ));
        zips.push((arch, o, a));
    }

    // The x86_64 function with and without bytecode.
    let (_, x86_opts, with) = zips.pop().expect("x86_64 artifact");
    let mut no_bc = x86_opts.clone();
    no_bc.bytecode = false;
    let (without, _) = rt.block_on(build(&pkg, &no_bc));
    assert!(without.bytecode.is_none());
    let dir_with = work.path().join("fn-bytecode");
    let dir_without = work.path().join("fn-source");
    unzip_to(&with.zip, &dir_with);
    unzip_to(&without.zip, &dir_without);
    // The same function with the shared SDK layer: the trimmed zip, the layer as `/opt`.
    let mut layered_opts = x86_opts.clone();
    layered_opts.sdk_layer = true;
    let (layered, _) = rt.block_on(build(&pkg, &layered_opts));
    let layer = layered
        .layer
        .clone()
        .expect("the sample plugin gets the SDK layer");
    let dir_layer = work.path().join("fn-layer");
    let dir_opt = work.path().join("opt");
    unzip_to(&layered.zip, &dir_layer);
    zip::ZipArchive::new(std::fs::File::open(&layer.zip).unwrap())
        .unwrap()
        .extract(&dir_opt)
        .unwrap();
    let layer_path = format!(
        "{}:{}",
        dir_layer.join("vendor").display(),
        dir_opt.join("python").display()
    );
    println!("bench: deploys against moto…");
    let deploys = rt.block_on(deploy_times(&x86_opts));
    let trials = knob("SRI_BENCH_PACK_COLD", COLD_TRIALS);
    let (mut cold_with, mut cold_without, mut cold_layer) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..trials {
        println!("bench: cold start round {}/{trials}…", i + 1);
        // Alternate the order so that neither row always runs on a just-warmed page cache.
        if i % 2 == 0 {
            cold_with.push(rt.block_on(cold_start(&dir_with, None)));
            cold_without.push(rt.block_on(cold_start(&dir_without, None)));
            cold_layer.push(rt.block_on(cold_start(&dir_layer, Some(&layer_path))));
        } else {
            cold_layer.push(rt.block_on(cold_start(&dir_layer, Some(&layer_path))));
            cold_without.push(rt.block_on(cold_start(&dir_without, None)));
            cold_with.push(rt.block_on(cold_start(&dir_with, None)));
        }
    }
    let range = |v: &[f64]| {
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(0.0, f64::max);
        format!("{:.0} ms ({lo:.0}–{hi:.0})", median(v))
    };

    let mut r = String::new();
    let _ = writeln!(r, "## Packaging (`sri package`)\n");
    let command = std::env::var("SRI_BENCH_COMMAND").unwrap_or_else(|_| {
        "cargo run --release --locked -p sri-tests --example bench_packaging".into()
    });
    let date =
        harness::benchmarks::cmd_out("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]).unwrap_or_default();
    let _ = writeln!(r, "Written by `tests/examples/bench_packaging.rs`.\n");
    r.push_str(&run_lines(
        &command,
        &date,
        started.elapsed(),
        &load_start,
        &loadavg(),
    ));
    let _ = writeln!(
        r,
        "- bootstraps: {}, {}\n",
        lambda_bootstrap("arm64").display(),
        lambda_bootstrap("x86_64").display(),
    );
    let _ = writeln!(
        r,
        "Sample plugin (`template/plugin`, dify_plugin 0.10.x and its ~40 dependencies), python3.12. \
         **cold** = empty artifact cache and empty uv download cache (includes the downloads from \
         PyPI, so it depends on the network); **warm** = the same inputs again (a cache hit: \
         hashing the bootstrap, probing the interpreter, reading the metadata).\n"
    );
    let _ = writeln!(
        r,
        "| arch | cold | warm | zipped | unzipped | bytecode by |\n|---|---:|---:|---:|---:|---|"
    );
    for row in &rows {
        let _ = writeln!(r, "{row}");
    }
    let _ = writeln!(
        r,
        "\nCold start of the packaged x86_64 function under `cargo lambda watch` (its own \
         `bin/bootstrap` as the exec wrapper, bare Python 3.12, `PYTHONDONTWRITEBYTECODE=1` as on \
         read-only `/var/task`), spawn → first `chunk` of a pending `echo` call; median of \
         {trials} fresh starts each (min–max):\n"
    );
    let _ = writeln!(
        r,
        "| zip | cold start |\n|---|---:|\n| with bytecode (`.pyc`, unchecked-hash) | {} |\n| without (`--no-bytecode`) | {} |",
        range(&cold_with),
        range(&cold_without)
    );
    let _ = writeln!(
        r,
        "\nThe shared SDK layer (`SRI_LAMBDA_SDK_LAYER=true`, the default), x86_64: the layer holds \
         dify_plugin {} and {} distributions; the plugin's zip keeps the plugin, the bootstrap and \
         what the layer does not hold at the same version. Cold start as above with the layer \
         unpacked as `/opt` (`SRI_PYTHONPATH=vendor:/opt/python`). Deploy = \
         `LambdaBackend::deploy` against `moto_server` on this host with the zip already built \
         (upload, CreateFunction, PublishVersion, alias, URL; and the layer's ListLayerVersions / \
         PublishLayerVersion), so it measures what is sent, not AWS's own latency.\n",
        layer.manifest.sdk_version,
        layer.manifest.distributions.len()
    );
    let _ = writeln!(
        r,
        "| | per-plugin zip | unzipped | shared layer zip | cold start | deploy |\n|---|---:|---:|---:|---:|---:|"
    );
    let _ = writeln!(
        r,
        "| without layer (self-contained) | {} | {} | — | {} | {:.0} ms |",
        packaging::human(with.zipped_bytes),
        packaging::human(with.unzipped_bytes),
        range(&cold_with),
        ms(deploys.without)
    );
    let _ = writeln!(
        r,
        "| with layer, first plugin (publishes the layer) | {} | {} | {} ({} unzipped) | {} | {:.0} ms |",
        packaging::human(layered.zipped_bytes),
        packaging::human(layered.unzipped_bytes),
        packaging::human(layer.zipped_bytes),
        packaging::human(layer.unzipped_bytes),
        range(&cold_layer),
        ms(deploys.first)
    );
    let _ = writeln!(
        r,
        "| with layer, next plugin (layer reused) | {} | {} | — | (same) | {:.0} ms |",
        packaging::human(layered.zipped_bytes),
        packaging::human(layered.unzipped_bytes),
        ms(deploys.next)
    );
    println!("{r}");
    let out = root().join("BENCHMARKS.md");
    harness::benchmarks::write_section(&out, "packaging", &r).expect("write BENCHMARKS.md");
    println!("wrote the packaging section of {}", out.display());
}

/// Deploy times against moto: without the layer, with it for a first and a second plugin.
struct Deploys {
    without: Duration,
    first: Duration,
    next: Duration,
}

async fn deploy_times(opts: &Options) -> Deploys {
    use connector::backend::Backend;
    use connector::backend::lambda::{LambdaBackend, LambdaContext, LambdaOptions, Transport};
    let moto = harness::moto::Moto::start().await;
    let role = moto.create_role("sri-bench-exec").await;
    let sdk = moto.sdk().await;
    let open = |prefix: &str, sdk_layer: bool| {
        let options = LambdaOptions {
            region: Some(harness::moto::REGION.into()),
            endpoint_url: Some(moto.url.clone()),
            role_arn: Some(role.clone()),
            prefix: prefix.into(),
            arch: opts.target.arch,
            python: opts.target.python,
            memory_mb: None,
            timeout_s: None,
            transport: Transport::FunctionUrl,
            route_ttl_ms: 1000,
            artifact_bucket: None,
            kms_key_arn: None,
            bootstrap_layer_arn: None,
            invoker_principal: None,
            snap_start: false,
            sdk_layer,
            capacity_provider_arn: None,
            max_concurrency: None,
            bootstrap: Some(opts.bootstrap.clone()),
            wheelhouse: None,
            offline: false,
            cache_dir: opts.cache_dir.clone(),
        };
        let context = LambdaContext {
            signing_keys: connector::secret::Secret(keys_env(&[SECRET_A])),
            backwards_env: Vec::new(),
            uv: opts.uv.clone(),
            index_url: None,
            install_timeout: Duration::from_secs(900),
        };
        LambdaBackend::open(&sdk, options, context)
    };
    let package = |name: &str| {
        let files = harness::difypkg::sample_as("bench", name, "0.1.0", true);
        let p = harness::difypkg::Package::from_files(&files);
        connector::package::Package::read(bytes::Bytes::from(p.bytes)).expect("package")
    };
    let timed = |b: std::sync::Arc<LambdaBackend>, p: connector::package::Package| async move {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Instant::now();
        b.deploy(&p, tx).await.expect("deploy on moto");
        t.elapsed()
    };
    let plain = open("bench-plain", false).await.expect("open on moto");
    let layered = open("bench-layer", true).await.expect("open on moto");
    // Warm the artifact caches (packaging is measured above, not here).
    for sdk_layer in [false, true] {
        let mut o = opts.clone();
        o.sdk_layer = sdk_layer;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        for n in ["bench_a", "bench_b"] {
            packaging::build(&package(n), &o, &tx).await.expect("build");
        }
    }
    let without = timed(plain, package("bench_a")).await;
    let first = timed(layered.clone(), package("bench_a")).await;
    let next = timed(layered, package("bench_b")).await;
    Deploys {
        without,
        first,
        next,
    }
}
