//! `sri package`: a plugin directory or `.difypkg` → the Lambda zip (or the `.difypkg` the
//! daemon would upload), from a terminal.

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

use super::load;
use crate::packaging::{self, Arch, PythonVersion, Target};

/// Options of `sri package`.
#[derive(Debug, Args)]
pub struct PackageOptions {
    /// A plugin directory or a `.difypkg`.
    pub path: PathBuf,
    /// Where to write the zip (default: `<author>-<name>-<version>-<arch>-py<version>.zip`), or
    /// with `--difypkg` the package (default: `<author>@<name>@<version>@<checksum>.difypkg`).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Only check the plugin and write the `.difypkg` (no Lambda zip).
    #[arg(long)]
    pub difypkg: bool,
    /// Lambda architecture: `arm64` or `x86_64`.
    #[arg(long, env = "SRI_LAMBDA_ARCH", default_value = "arm64")]
    pub arch: Arch,
    /// Lambda Python runtime: `3.11`, `3.12` or `3.13`.
    #[arg(long, env = "SRI_LAMBDA_PYTHON", default_value = "3.12")]
    pub python: PythonVersion,
    /// A directory of wheels searched before the index (`--find-links`).
    #[arg(long, env = "SRI_WHEELHOUSE")]
    pub wheelhouse: Option<PathBuf>,
    /// Install only from `--wheelhouse`, never from an index (air-gapped builds).
    #[arg(long, env = "SRI_OFFLINE")]
    pub offline: bool,
    /// The package index (default: uv's own, `UV_INDEX_URL` or PyPI).
    #[arg(long, env = "SRI_INDEX_URL")]
    pub index_url: Option<String>,
    /// Seconds installing the dependencies may take before uv is killed.
    #[arg(long, env = "SRI_INSTALL_TIMEOUT_SECS", default_value_t = 900)]
    pub install_timeout_secs: u64,
    /// Put `dify_plugin` and its dependencies in a shared layer zip, written beside the function
    /// zip (`<zip stem>.sdk-layer.zip`); `false` builds one self-contained zip.
    #[arg(long, env = "SRI_LAMBDA_SDK_LAYER", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub sdk_layer: bool,
    /// Ship no bytecode even when a matching interpreter is found.
    #[arg(long)]
    pub no_bytecode: bool,
    /// The bootstrap binary for `--arch` (default: `SRI_BOOTSTRAP_ARM64` / `SRI_BOOTSTRAP_X86_64`,
    /// else `target/lambda/<arch>/bootstrap` from `make lambda-bootstrap`).
    #[arg(long)]
    pub bootstrap: Option<PathBuf>,
    /// Built zips and uv's download cache (default: `$XDG_CACHE_HOME/sri` or `~/.cache/sri`).
    #[arg(long, env = "SRI_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The uv binary (default: `uv` on PATH, else `.venv/tools/bin/uv`).
    #[arg(long, env = "SRI_UV")]
    pub uv: Option<PathBuf>,
}

pub(super) async fn package(o: PackageOptions) -> anyhow::Result<()> {
    let pkg = load(&o.path)?;
    if o.difypkg {
        let out = o.output.unwrap_or_else(|| PathBuf::from(pkg.filename()));
        std::fs::write(&out, &pkg.bytes)?;
        println!(
            "{}\n  checksum {}\n  wrote {}",
            pkg.unique_identifier(),
            pkg.checksum,
            out.display()
        );
        return Ok(());
    }
    let target = Target {
        arch: o.arch,
        python: o.python,
    };
    let mut opts = packaging::Options::new(target);
    if let Some(b) = o.bootstrap {
        opts.bootstrap = b;
    }
    if let Some(c) = o.cache_dir {
        opts.cache_dir = c;
    }
    if let Some(uv) = o.uv {
        opts.uv = uv;
    }
    opts.wheelhouse = o.wheelhouse;
    opts.offline = o.offline;
    opts.index_url = o.index_url;
    opts.install_timeout = Duration::from_secs(o.install_timeout_secs);
    opts.bytecode = !o.no_bytecode;
    opts.sdk_layer = o.sdk_layer;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let printer = tokio::spawn(async move {
        while let Some((stage, msg)) = rx.recv().await {
            eprintln!("[{stage}] {msg}");
        }
    });
    let result = packaging::build(&pkg, &opts, &tx).await;
    drop(tx);
    let _ = printer.await;
    let a = result?;
    let m = &pkg.manifest;
    let out = o.output.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}-{}-{}.zip",
            m.author,
            m.name,
            m.version,
            target.slug()
        ))
    });
    // A copy: the cached zip stays for the next build.
    std::fs::copy(&a.zip, &out)?;
    let layer = match &a.layer {
        Some(l) => {
            let dest = out.with_extension("sdk-layer.zip");
            std::fs::copy(&l.zip, &dest)?;
            format!(
                "\n  sdk layer    {} (dify_plugin {}, {}, sha256 {}; mount at /opt)",
                dest.display(),
                l.manifest.sdk_version,
                packaging::human(l.zipped_bytes),
                l.sha256
            )
        }
        None => String::new(),
    };
    println!(
        "{} for {target}\n  zip          {}\n  code sha256  {}\n  zipped       {}{}\n  unzipped     {} (limit {})\n  bytecode     {}\n  cache        {}{layer}",
        pkg.unique_identifier(),
        out.display(),
        a.code_sha256,
        packaging::human(a.zipped_bytes),
        if a.needs_s3() {
            " (over 50 MiB: the backend uploads it through S3)"
        } else {
            ""
        },
        packaging::human(a.unzipped_bytes),
        packaging::human(packaging::UNZIPPED_LIMIT),
        a.bytecode
            .as_deref()
            .map_or("none".to_owned(), |v| format!("Python {v}")),
        if a.cache_hit { "hit" } else { "miss" },
    );
    Ok(())
}
