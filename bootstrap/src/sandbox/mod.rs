//! A sandbox around the plugin's Python process (`bootstrap serve --sandbox`), so that on the
//! local backend a plugin is as confined as it is in Lambda's Firecracker VM.
//!
//! Only the plugin is inside: this bootstrap, which holds the signing keys, stays outside, and
//! the plugin's environment is the allowlist it always had. Built from Linux mechanisms
//! directly (the crates that wrap them either run the process themselves, without our stdio
//! pipes, or have no memory cgroup, let alone cgroup v1; see the README), applied between fork
//! and exec:
//!
//! - a memory and a pids cgroup per process (v1 or v2), joined before anything else runs;
//! - when not root, a user namespace mapping the caller's own uid (so the rest is allowed);
//! - PID and mount namespaces: a second fork makes the plugin PID 1 of its own namespace, with
//!   a fresh `/proc`; its parent only relays its exit status;
//! - the whole file system read-only, a private size-bounded tmpfs on `/tmp` (and
//!   `/dev/shm`), the operator's hidden directories (the connector's data dir) and every
//!   directory the plugin's uid could not traverse covered by empty tmpfs, with the plugin,
//!   its venv and its interpreter bound back read-only;
//! - rlimits (open files, file size, no core dumps), `no_new_privs`, an empty capability
//!   bounding set, and (as root) a uid and gid of its own that are not root's.
//!
//! `auto` probes which of these the host allows (a forked child runs the very same steps) and
//! uses those; `required` refuses to start when one is missing and names it.
//!
//! By job: `plan` decides once, in the bootstrap, what every spawn of a function gets (with
//! `memory` for the memory limit and `cgroup` for the cgroups); `probe` finds what the host
//! allows, for `auto` and `required`; `child` (with `syscall` and `relay`) is what runs in the
//! forked child between fork and exec, where only async-signal-safe system calls are allowed.

mod cgroup;
mod child;
mod memory;
mod plan;
mod probe;
mod relay;
mod syscall;

use clap::{Args, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

pub use plan::{Needs, Plan};
pub use probe::probe_report;

/// Whether and how strictly the plugin is sandboxed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No sandbox (the plugin is a plain child process).
    Off,
    /// Every mechanism the host allows; the missing ones are logged.
    Auto,
    /// Every mechanism, or the bootstrap refuses to start and names the missing one.
    Required,
}

/// The sandbox's options (`bootstrap serve`; the connector's local backend passes its own).
#[derive(Debug, Clone, Args)]
pub struct Options {
    /// `off`, `auto` (every mechanism the host allows) or `required` (all, or refuse to start).
    #[arg(
        long = "sandbox",
        env = "SRI_SANDBOX",
        value_enum,
        default_value = "off"
    )]
    pub mode: Mode,
    /// Memory limit in MiB, overriding the manifest's `resource.memory`.
    #[arg(long = "sandbox-memory-mb", env = "SRI_SANDBOX_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Ceiling of the memory limit in MiB, whatever the manifest asks for; also the limit of a
    /// manifest that declares none.
    #[arg(
        long = "sandbox-memory-max-mb",
        env = "SRI_SANDBOX_MEMORY_MAX_MB",
        default_value_t = 8192
    )]
    pub memory_max_mb: u64,
    /// Processes and threads the plugin may have at once.
    #[arg(
        long = "sandbox-pids",
        env = "SRI_SANDBOX_PIDS",
        default_value_t = 1024
    )]
    pub pids: u64,
    /// Files the plugin may have open at once (`RLIMIT_NOFILE`).
    #[arg(
        long = "sandbox-nofile",
        env = "SRI_SANDBOX_NOFILE",
        default_value_t = 8192
    )]
    pub nofile: u64,
    /// Largest file the plugin may write, in MiB (`RLIMIT_FSIZE`).
    #[arg(
        long = "sandbox-fsize-mb",
        env = "SRI_SANDBOX_FSIZE_MB",
        default_value_t = 4096
    )]
    pub fsize_mb: u64,
    /// Size of the plugin's private `/tmp` (and `/dev/shm`), in MiB; what it holds counts
    /// toward its memory.
    #[arg(
        long = "sandbox-tmp-mb",
        env = "SRI_SANDBOX_TMP_MB",
        default_value_t = 1024
    )]
    pub tmp_mb: u64,
    /// Directories the plugin must not see (comma-separated), e.g. the connector's data dir;
    /// its own plugin directory and venv stay visible, read-only.
    #[arg(long = "sandbox-hide", env = "SRI_SANDBOX_HIDE", value_delimiter = ',')]
    pub hide: Vec<PathBuf>,
}

/// One mechanism of the sandbox, as reported in logs, `/healthz` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// A memory cgroup bounding the plugin's memory.
    MemoryCgroup,
    /// A pids cgroup bounding its processes and threads.
    PidsCgroup,
    /// A user namespace (when the bootstrap is not root).
    UserNamespace,
    /// Its own PID namespace and `/proc`.
    PidNamespace,
    /// Its own mount namespace: the system read-only, other directories hidden.
    MountNamespace,
    /// A private, size-bounded `/tmp`.
    PrivateTmp,
    /// rlimits on open files, file size and core dumps.
    Rlimits,
    /// `no_new_privs` and an empty capability bounding set.
    NoNewPrivs,
    /// A uid and gid that are not root's.
    UnprivilegedUid,
}

impl Mechanism {
    /// Every mechanism, in the order they are applied.
    pub const ALL: [Mechanism; 9] = [
        Self::MemoryCgroup,
        Self::PidsCgroup,
        Self::UserNamespace,
        Self::PidNamespace,
        Self::MountNamespace,
        Self::PrivateTmp,
        Self::Rlimits,
        Self::NoNewPrivs,
        Self::UnprivilegedUid,
    ];

    /// Its name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Self::MemoryCgroup => "memory-cgroup",
            Self::PidsCgroup => "pids-cgroup",
            Self::UserNamespace => "user-namespace",
            Self::PidNamespace => "pid-namespace",
            Self::MountNamespace => "mount-namespace",
            Self::PrivateTmp => "private-tmp",
            Self::Rlimits => "rlimits",
            Self::NoNewPrivs => "no-new-privs",
            Self::UnprivilegedUid => "unprivileged-uid",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A mechanism the host does not allow, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    /// Which one.
    pub mechanism: &'static str,
    /// What failed, and what the host must allow.
    pub why: String,
}

/// What the host allows: printed by `bootstrap sandbox-probe` for the connector.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode asked for.
    pub mode: Mode,
    /// Mechanisms in use.
    pub active: Vec<&'static str>,
    /// Mechanisms the host does not allow.
    pub missing: Vec<Missing>,
}

/// A mebibyte, the unit of every size option.
const MIB: u64 = 1024 * 1024;
