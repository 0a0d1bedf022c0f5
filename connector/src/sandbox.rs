//! The local backend's side of the plugin sandbox: which options each function's
//! `bootstrap serve` gets, and what the host allows, asked once of the bootstrap at start (it
//! owns the sandbox and its defaults; this side only passes the operator's settings on and
//! reports the result in the log, `/healthz` and `/metrics`).

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

use crate::Error;

/// `SRI_SANDBOX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Plugins are plain child processes.
    Off,
    /// Every mechanism the host allows (logged, and in `/healthz` and `/metrics`).
    Auto,
    /// Every mechanism, or the connector refuses to start and names the missing one.
    Required,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Auto => "auto",
            Mode::Required => "required",
        }
    }
}

/// The sandbox settings of the local backend; unset limits take the bootstrap's defaults
/// (see the README).
#[derive(Debug, Clone, Args)]
pub struct SandboxOptions {
    /// Sandbox each function's plugin: `off`, `auto` (every mechanism the host allows) or
    /// `required` (all of them, or refuse to start).
    #[arg(
        long = "sandbox",
        env = "SRI_SANDBOX",
        value_enum,
        default_value = "auto"
    )]
    pub sandbox_mode: Mode,
    /// Memory limit of every plugin in MiB, overriding its manifest's `resource.memory`.
    #[arg(long = "sandbox-memory-mb", env = "SRI_SANDBOX_MEMORY_MB")]
    pub sandbox_memory_mb: Option<u64>,
    /// Ceiling of a plugin's memory limit in MiB (default 8192).
    #[arg(long = "sandbox-memory-max-mb", env = "SRI_SANDBOX_MEMORY_MAX_MB")]
    pub sandbox_memory_max_mb: Option<u64>,
    /// Processes and threads a plugin may have (default 1024).
    #[arg(long = "sandbox-pids", env = "SRI_SANDBOX_PIDS")]
    pub sandbox_pids: Option<u64>,
    /// Files a plugin may have open (default 8192).
    #[arg(long = "sandbox-nofile", env = "SRI_SANDBOX_NOFILE")]
    pub sandbox_nofile: Option<u64>,
    /// Largest file a plugin may write, in MiB (default 4096).
    #[arg(long = "sandbox-fsize-mb", env = "SRI_SANDBOX_FSIZE_MB")]
    pub sandbox_fsize_mb: Option<u64>,
    /// Size of a plugin's private `/tmp`, in MiB (default 1024; counts toward its memory).
    #[arg(long = "sandbox-tmp-mb", env = "SRI_SANDBOX_TMP_MB")]
    pub sandbox_tmp_mb: Option<u64>,
}

impl SandboxOptions {
    /// The variables a function's bootstrap gets; `data_dir` is hidden from its plugin.
    pub fn env(&self, data_dir: &Path) -> Vec<(&'static str, String)> {
        let mut env = vec![("SRI_SANDBOX", self.sandbox_mode.as_str().to_owned())];
        if self.sandbox_mode == Mode::Off {
            return env;
        }
        for (name, value) in [
            ("SRI_SANDBOX_MEMORY_MB", self.sandbox_memory_mb),
            ("SRI_SANDBOX_MEMORY_MAX_MB", self.sandbox_memory_max_mb),
            ("SRI_SANDBOX_PIDS", self.sandbox_pids),
            ("SRI_SANDBOX_NOFILE", self.sandbox_nofile),
            ("SRI_SANDBOX_FSIZE_MB", self.sandbox_fsize_mb),
            ("SRI_SANDBOX_TMP_MB", self.sandbox_tmp_mb),
        ] {
            if let Some(v) = value {
                env.push((name, v.to_string()));
            }
        }
        let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
        env.push(("SRI_SANDBOX_HIDE", data.display().to_string()));
        env
    }
}

/// A mechanism the host does not allow.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Missing {
    /// Which one.
    pub mechanism: String,
    /// Why, and what the host must allow.
    pub why: String,
}

/// What the sandbox does on this host (`bootstrap sandbox-probe`'s answer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The mode asked for.
    pub mode: Mode,
    /// Mechanisms in use.
    pub active: Vec<String>,
    /// Mechanisms the host does not allow.
    pub missing: Vec<Missing>,
}

/// Every mechanism the bootstrap knows (the metric's closed label set).
pub const MECHANISMS: &[&str] = &[
    "memory-cgroup",
    "pids-cgroup",
    "user-namespace",
    "pid-namespace",
    "mount-namespace",
    "private-tmp",
    "rlimits",
    "no-new-privs",
    "unprivileged-uid",
];

/// Asks the bootstrap what the host allows; with `required`, a missing mechanism is an error
/// naming it.
pub async fn probe(
    bootstrap: &Path,
    opts: &SandboxOptions,
    data_dir: &Path,
) -> Result<Report, Error> {
    if opts.sandbox_mode == Mode::Off {
        return Ok(Report {
            mode: Mode::Off,
            active: Vec::new(),
            missing: Vec::new(),
        });
    }
    let mut cmd = tokio::process::Command::new(bootstrap);
    cmd.arg("sandbox-probe")
        .env_clear()
        .envs(opts.env(data_dir))
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .map_err(|_| {
            Error::Backend(
                "the sandbox probe (`bootstrap sandbox-probe`) did not answer within 30 s".into(),
            )
        })?
        .map_err(|e| {
            Error::Backend(format!(
                "cannot run `{} sandbox-probe`: {e}",
                bootstrap.display()
            ))
        })?;
    let report: Report = serde_json::from_slice(&out.stdout).map_err(|e| {
        Error::Backend(format!(
            "`{} sandbox-probe` answered no report ({e}; exit {}): is SRI_BOOTSTRAP_BIN a \
             bootstrap built with the `sandbox` feature? Or set SRI_SANDBOX=off",
            bootstrap.display(),
            out.status
        ))
    })?;
    let missing: Vec<String> = report
        .missing
        .iter()
        .map(|m| format!("{}: {}", m.mechanism, m.why))
        .collect();
    tracing::info!(
        mode = opts.sandbox_mode.as_str(),
        active = %report.active.join(","),
        missing = %missing.join("; "),
        "plugin sandbox"
    );
    if opts.sandbox_mode == Mode::Required && !missing.is_empty() {
        return Err(Error::Backend(format!(
            "SRI_SANDBOX=required, but this host does not allow {}; allow it, or set \
             SRI_SANDBOX=auto to run plugins with what the host allows",
            missing.join("; ")
        )));
    }
    Ok(report)
}
