//! Stand-in for the packaging module while it is written on its own branch: the same public
//! API, building a zip of the plugin and the bootstrap only (no dependencies, no bytecode).

use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use crate::Error;
use crate::backend::Progress;
use crate::package::Package;

/// A Lambda instruction set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Graviton.
    Arm64,
    /// Intel/AMD.
    X86_64,
}

impl Arch {
    /// The name Lambda uses.
    pub fn lambda_name(&self) -> &'static str {
        match self {
            Self::Arm64 => "arm64",
            Self::X86_64 => "x86_64",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "arm64" | "aarch64" => Ok(Self::Arm64),
            "x86_64" | "amd64" => Ok(Self::X86_64),
            _ => Err(format!("unknown architecture `{s}`: use arm64 or x86_64")),
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.lambda_name())
    }
}

/// A managed Python runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PythonVersion {
    /// python3.11
    Py311,
    /// python3.12
    Py312,
    /// python3.13
    Py313,
}

impl PythonVersion {
    /// The Lambda runtime identifier.
    pub fn lambda_runtime(&self) -> &'static str {
        match self {
            Self::Py311 => "python3.11",
            Self::Py312 => "python3.12",
            Self::Py313 => "python3.13",
        }
    }
}

impl std::str::FromStr for PythonVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "3.11" => Ok(Self::Py311),
            "3.12" => Ok(Self::Py312),
            "3.13" => Ok(Self::Py313),
            _ => Err(format!("unsupported Python `{s}`: use 3.11, 3.12 or 3.13")),
        }
    }
}

/// What a zip is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Architecture.
    pub arch: Arch,
    /// Python version.
    pub python: PythonVersion,
}

/// How to package.
#[derive(Debug, Clone)]
pub struct Options {
    /// Target.
    pub target: Target,
    /// The bootstrap for the target's architecture.
    pub bootstrap: PathBuf,
    /// Extra wheels.
    pub wheelhouse: Option<PathBuf>,
    /// No index.
    pub offline: bool,
    /// Index URL.
    pub index_url: Option<String>,
    /// Cache.
    pub cache_dir: PathBuf,
    /// uv.
    pub uv: PathBuf,
    /// Ship bytecode.
    pub bytecode: bool,
}

/// Direct upload limit (zipped).
pub const DIRECT_UPLOAD_LIMIT: u64 = 50 * 1024 * 1024;
/// Unzipped limit.
pub const UNZIPPED_LIMIT: u64 = 250 * 1024 * 1024;

/// Function settings from `template/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionConfig {
    /// `python3.x`.
    pub runtime: String,
    /// Ignored by the bootstrap.
    pub handler: String,
    /// `arm64` | `x86_64`.
    pub architecture: String,
    /// MB.
    pub memory_mb: i32,
    /// Seconds.
    pub timeout_s: i32,
    /// MB.
    pub ephemeral_storage_mb: i32,
    /// Non-secret environment.
    pub environment: BTreeMap<String, String>,
}

impl FunctionConfig {
    /// The template's settings for `target`.
    pub fn template(target: &Target) -> Self {
        let environment = [
            ("AWS_LAMBDA_EXEC_WRAPPER", "/var/task/bin/bootstrap"),
            ("SRI_PYTHON", "/var/lang/bin/python3"),
            ("AWS_LAMBDA_LOG_FORMAT", "JSON"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Self {
            runtime: target.python.lambda_runtime().into(),
            handler: "sri.bootstrap".into(),
            architecture: target.arch.lambda_name().into(),
            memory_mb: 1024,
            timeout_s: 900,
            ephemeral_storage_mb: 512,
            environment,
        }
    }
}

/// A built zip.
#[derive(Debug, Clone)]
pub struct Artifact {
    /// Where.
    pub zip: PathBuf,
    /// base64 sha256.
    pub code_sha256: String,
    /// Zipped size.
    pub zipped_bytes: u64,
    /// Unzipped size.
    pub unzipped_bytes: u64,
    /// Interpreter version.
    pub bytecode: Option<String>,
    /// From the cache.
    pub cache_hit: bool,
    /// Target.
    pub target: Target,
    /// Config.
    pub config: FunctionConfig,
}

impl Artifact {
    /// Over the direct upload limit.
    pub fn needs_s3(&self) -> bool {
        self.zipped_bytes > DIRECT_UPLOAD_LIMIT
    }
}

/// Builds the zip.
pub async fn build(pkg: &Package, opts: &Options, _progress: &Progress) -> Result<Artifact, Error> {
    let err = |e: &dyn std::fmt::Display| Error::Packaging(e.to_string());
    let bootstrap = std::fs::read(&opts.bootstrap).map_err(|e| err(&e))?;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut unzipped = bootstrap.len() as u64;
    let exec = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    zip.start_file("bin/bootstrap", exec).map_err(|e| err(&e))?;
    zip.write_all(&bootstrap).map_err(|e| err(&e))?;
    let mut src =
        zip::ZipArchive::new(std::io::Cursor::new(pkg.bytes.clone())).map_err(|e| err(&e))?;
    for i in 0..src.len() {
        let mut f = src.by_index(i).map_err(|e| err(&e))?;
        if f.is_dir() {
            continue;
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut data).map_err(|e| err(&e))?;
        unzipped += data.len() as u64;
        zip.start_file(
            format!("plugin/{}", f.name()),
            zip::write::SimpleFileOptions::default(),
        )
        .map_err(|e| err(&e))?;
        zip.write_all(&data).map_err(|e| err(&e))?;
    }
    let bytes = zip.finish().map_err(|e| err(&e))?.into_inner();
    std::fs::create_dir_all(&opts.cache_dir).map_err(|e| err(&e))?;
    let path = opts.cache_dir.join(format!("{}.zip", pkg.checksum));
    std::fs::write(&path, &bytes).map_err(|e| err(&e))?;
    Ok(Artifact {
        zip: path,
        code_sha256: base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&bytes)),
        zipped_bytes: bytes.len() as u64,
        unzipped_bytes: unzipped,
        bytecode: None,
        cache_hit: false,
        target: opts.target,
        config: FunctionConfig::template(&opts.target),
    })
}

/// Where `make lambda-bootstrap` puts the bootstrap for `arch`.
pub fn default_bootstrap(arch: Arch) -> PathBuf {
    PathBuf::from(format!("target/lambda/{arch}/bootstrap/bootstrap"))
}
