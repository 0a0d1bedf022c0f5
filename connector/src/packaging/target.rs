//! What a function is built for: the CPU architecture, the managed Python runtime, the wheel
//! platform that follows from both, and the function's configuration (`template/function.json`).
//!
//! The wheel platform is the runtime's glibc, not a fixed `manylinux2014`: `python3.12` and
//! `python3.13` run on Amazon Linux 2023 (glibc 2.34), and pinning them to manylinux2014
//! (glibc 2.17) makes the resolver silently pick old releases of packages that stopped shipping
//! 2014 wheels (gevent ≥ 26 has only `manylinux_2_28`, which drags `dify_plugin` back to 0.8).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A Lambda instruction set architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Graviton (`aarch64`).
    Arm64,
    /// `x86_64`.
    X86_64,
}

impl Arch {
    /// Lambda's name (`Architectures` of CreateFunction).
    pub fn lambda_name(&self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::X86_64 => "x86_64",
        }
    }

    /// The baseline manylinux wheel tag every Lambda runtime accepts.
    pub fn manylinux(&self) -> &'static str {
        match self {
            Arch::Arm64 => "manylinux2014_aarch64",
            Arch::X86_64 => "manylinux2014_x86_64",
        }
    }

    /// The machine name in wheel tags and target triples.
    pub fn machine(&self) -> &'static str {
        match self {
            Arch::Arm64 => "aarch64",
            Arch::X86_64 => "x86_64",
        }
    }

    /// The ELF `e_machine` of binaries for this architecture.
    pub fn elf_machine(&self) -> u16 {
        match self {
            Arch::Arm64 => 0xB7,
            Arch::X86_64 => 0x3E,
        }
    }

    /// The other architecture (what to suggest when a wheel is missing for this one).
    pub fn other(&self) -> Arch {
        match self {
            Arch::Arm64 => Arch::X86_64,
            Arch::X86_64 => Arch::Arm64,
        }
    }
}

impl FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            "x86_64" | "x86-64" | "amd64" => Ok(Arch::X86_64),
            _ => Err(Error::Packaging(format!(
                "unknown architecture `{s}`: use arm64 or x86_64"
            ))),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.lambda_name())
    }
}

/// A Python version Lambda has a managed runtime for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PythonVersion {
    /// `python3.11` (Amazon Linux 2).
    #[serde(rename = "3.11")]
    Py311,
    /// `python3.12` (Amazon Linux 2023), what dify-plugin ≥ 0.9 needs.
    #[serde(rename = "3.12")]
    Py312,
    /// `python3.13` (Amazon Linux 2023).
    #[serde(rename = "3.13")]
    Py313,
}

impl PythonVersion {
    /// Lambda's runtime identifier.
    pub fn lambda_runtime(&self) -> &'static str {
        match self {
            PythonVersion::Py311 => "python3.11",
            PythonVersion::Py312 => "python3.12",
            PythonVersion::Py313 => "python3.13",
        }
    }

    /// `3.12`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PythonVersion::Py311 => "3.11",
            PythonVersion::Py312 => "3.12",
            PythonVersion::Py313 => "3.13",
        }
    }

    /// The minor version (`12`).
    pub fn minor(&self) -> u32 {
        match self {
            PythonVersion::Py311 => 11,
            PythonVersion::Py312 => 12,
            PythonVersion::Py313 => 13,
        }
    }

    /// The newest manylinux level the runtime's OS accepts (`2_34` for Amazon Linux 2023;
    /// Amazon Linux 2's glibc 2.26 has no uv platform of its own, so manylinux2014).
    fn manylinux_level(&self) -> &'static str {
        match self {
            PythonVersion::Py311 => "2014",
            PythonVersion::Py312 | PythonVersion::Py313 => "_2_34",
        }
    }
}

impl FromStr for PythonVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim_start_matches("python") {
            "3.11" => Ok(PythonVersion::Py311),
            "3.12" => Ok(PythonVersion::Py312),
            "3.13" => Ok(PythonVersion::Py313),
            _ => Err(Error::Packaging(format!(
                "unsupported Python version `{s}`: use 3.11, 3.12 or 3.13 (Lambda's managed runtimes)"
            ))),
        }
    }
}

impl fmt::Display for PythonVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An architecture and a Python runtime: what one function zip is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Target {
    /// CPU architecture.
    pub arch: Arch,
    /// Managed Python runtime.
    pub python: PythonVersion,
}

impl Target {
    /// uv's `--python-platform` (`aarch64-manylinux_2_34`).
    pub fn uv_platform(&self) -> String {
        format!(
            "{}-manylinux{}",
            self.arch.machine(),
            self.python.manylinux_level()
        )
    }

    /// The newest wheel platform tag this target accepts (`manylinux_2_34_aarch64`).
    pub fn wheel_platform(&self) -> String {
        format!(
            "manylinux{}_{}",
            self.python.manylinux_level(),
            self.arch.machine()
        )
    }

    /// The range of wheel platforms that fit, for messages
    /// (`manylinux2014_aarch64 … manylinux_2_34_aarch64`).
    pub fn platform_range(&self) -> String {
        let newest = self.wheel_platform();
        if newest == self.arch.manylinux() {
            newest
        } else {
            format!("{} … {newest}", self.arch.manylinux())
        }
    }

    /// A short name for file names (`arm64-py3.12`).
    pub fn slug(&self) -> String {
        format!("{}-py{}", self.arch, self.python)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.python.lambda_runtime(), self.arch)
    }
}

/// The template every function's configuration starts from.
pub const FUNCTION_TEMPLATE: &str = include_str!("../../../template/function.json");

/// A function's configuration, as CreateFunction needs it (written into the zip as
/// `sri-function.json`, so the artifact says how it must be deployed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionConfig {
    /// Managed runtime (`python3.12`).
    pub runtime: String,
    /// Handler; the bootstrap ignores it (it runs as `AWS_LAMBDA_EXEC_WRAPPER`).
    pub handler: String,
    /// `arm64` or `x86_64`.
    pub architecture: String,
    /// Memory in MB.
    pub memory_mb: u32,
    /// Timeout in seconds.
    pub timeout_s: u32,
    /// `/tmp` size in MB.
    pub ephemeral_storage_mb: u32,
    /// Environment (without secrets: the backend adds `SRI_SIGNING_KEYS` and the daemon URL).
    pub environment: BTreeMap<String, String>,
    /// The shared SDK layer the function needs (see [`super::layer`]); `None`: self-contained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<super::layer::LayerRef>,
}

impl FunctionConfig {
    /// `template/function.json` resolved for `target`.
    pub fn template(target: &Target) -> Self {
        let mut c: FunctionConfig =
            serde_json::from_str(FUNCTION_TEMPLATE).expect("template/function.json is valid");
        c.runtime = target.python.lambda_runtime().to_owned();
        c.architecture = target.arch.lambda_name().to_owned();
        c
    }

    /// With the memory the plugin's manifest declares (`resource.memory`, bytes), rounded up
    /// into Lambda's range; the template's size when it declares none.
    pub fn with_manifest_memory(mut self, bytes: Option<u64>) -> Self {
        if let Some(b) = bytes {
            self.memory_mb = lambda_memory_mb(b);
        }
        self
    }
}

/// Lambda's smallest and largest memory sizes, in MB.
pub const LAMBDA_MEMORY_MB: std::ops::RangeInclusive<u32> = 128..=10240;

/// `bytes` as a Lambda memory size: whole MiB, rounded up, within [`LAMBDA_MEMORY_MB`].
pub fn lambda_memory_mb(bytes: u64) -> u32 {
    let mb = bytes.div_ceil(1024 * 1024);
    mb.clamp(
        u64::from(*LAMBDA_MEMORY_MB.start()),
        u64::from(*LAMBDA_MEMORY_MB.end()),
    ) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_memory_rounds_up_into_lambdas_range() {
        assert_eq!(lambda_memory_mb(268_435_456), 256);
        assert_eq!(lambda_memory_mb(268_435_457), 257);
        assert_eq!(lambda_memory_mb(1), 128);
        assert_eq!(lambda_memory_mb(64 * 1024 * 1024 * 1024), 10240);
        let t = Target {
            arch: Arch::X86_64,
            python: PythonVersion::Py312,
        };
        assert_eq!(
            FunctionConfig::template(&t)
                .with_manifest_memory(Some(512 << 20))
                .memory_mb,
            512
        );
        assert_eq!(
            FunctionConfig::template(&t).with_manifest_memory(None),
            FunctionConfig::template(&t)
        );
    }

    #[test]
    fn names_parse_and_print() {
        for (s, a) in [
            ("arm64", Arch::Arm64),
            ("aarch64", Arch::Arm64),
            ("x86_64", Arch::X86_64),
            ("amd64", Arch::X86_64),
        ] {
            assert_eq!(s.parse::<Arch>().unwrap(), a);
        }
        assert!("sparc".parse::<Arch>().is_err());
        assert_eq!(Arch::X86_64.to_string(), "x86_64");
        assert_eq!(serde_json::to_string(&Arch::X86_64).unwrap(), "\"x86_64\"");
        assert_eq!(Arch::Arm64.manylinux(), "manylinux2014_aarch64");
        let p: PythonVersion = "3.12".parse().unwrap();
        assert_eq!(p.lambda_runtime(), "python3.12");
        assert_eq!(serde_json::to_string(&p).unwrap(), "\"3.12\"");
        assert!("3.9".parse::<PythonVersion>().is_err());
    }

    #[test]
    fn platforms_follow_the_runtime_os() {
        let t = Target {
            arch: Arch::Arm64,
            python: PythonVersion::Py312,
        };
        assert_eq!(t.uv_platform(), "aarch64-manylinux_2_34");
        assert_eq!(t.wheel_platform(), "manylinux_2_34_aarch64");
        assert!(t.platform_range().contains("manylinux2014_aarch64"));
        let t = Target {
            arch: Arch::X86_64,
            python: PythonVersion::Py311,
        };
        assert_eq!(t.uv_platform(), "x86_64-manylinux2014");
        assert_eq!(t.platform_range(), "manylinux2014_x86_64");
    }

    #[test]
    fn the_template_is_resolved_for_the_target() {
        let c = FunctionConfig::template(&Target {
            arch: Arch::X86_64,
            python: PythonVersion::Py313,
        });
        assert_eq!(c.runtime, "python3.13");
        assert_eq!(c.architecture, "x86_64");
        assert_eq!(
            c.environment["AWS_LAMBDA_EXEC_WRAPPER"],
            "/var/task/bin/bootstrap"
        );
        let budget: u32 = c.environment["PLUGIN_MAX_EXECUTION_TIMEOUT"]
            .parse()
            .unwrap();
        assert!(
            budget < c.timeout_s,
            "the plugin times out before Lambda does"
        );
    }
}
