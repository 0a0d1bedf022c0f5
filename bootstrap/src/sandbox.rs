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

use clap::{Args, ValueEnum};
use nix::libc;
use serde::Serialize;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::process::Command;

use crate::Error;
use crate::process::{Confine, Confined};

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

/// The memory limit and where it came from.
#[derive(Debug, Clone)]
struct Memory {
    bytes: u64,
    source: String,
}

const MIB: u64 = 1024 * 1024;

/// The memory limit: the operator's override, else the manifest's `resource.memory`, never
/// above the ceiling; with where it came from, for the error of a plugin killed at it.
fn memory_limit(manifest: Option<u64>, o: &Options) -> Memory {
    let ceiling = o.memory_max_mb.saturating_mul(MIB);
    let (bytes, source) = match (o.memory_mb, manifest) {
        (Some(mb), _) => (mb.saturating_mul(MIB), "SRI_SANDBOX_MEMORY_MB".to_owned()),
        (None, Some(b)) => (b, "the manifest's resource.memory".to_owned()),
        (None, None) => (
            ceiling,
            "SRI_SANDBOX_MEMORY_MAX_MB (the manifest declares no resource.memory)".to_owned(),
        ),
    };
    if bytes > ceiling {
        return Memory {
            bytes: ceiling,
            source: format!(
                "the ceiling SRI_SANDBOX_MEMORY_MAX_MB ({source} asks for {} MiB)",
                bytes.div_ceil(MIB)
            ),
        };
    }
    Memory { bytes, source }
}

/// Where the plugin process's cgroups are made.
#[derive(Debug, Clone, Default)]
struct Cgroups {
    /// Parent of the memory cgroups.
    memory: Option<PathBuf>,
    /// Parent of the pids cgroups (the same as `memory` on cgroup v2).
    pids: Option<PathBuf>,
    v2: bool,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_DIR: &str = "sri-sandbox";

impl Cgroups {
    /// Finds (and creates) the parents, recording what is missing and why.
    fn detect(missing: &mut Vec<Missing>) -> Self {
        let root = Path::new(CGROUP_ROOT);
        let mut c = Cgroups::default();
        if root.join("cgroup.controllers").exists() {
            c.v2 = true;
            let base = root.join(CGROUP_DIR);
            let enabled = std::fs::create_dir_all(&base)
                .and_then(|()| writable(&base))
                .and_then(|()| std::fs::write(root.join("cgroup.subtree_control"), "+memory +pids"))
                .and_then(|()| std::fs::write(base.join("cgroup.subtree_control"), "+memory +pids"))
                .and_then(|()| std::fs::read_to_string(base.join("cgroup.subtree_control")));
            match enabled {
                Ok(controllers) => {
                    let has = |name: &str| controllers.split_whitespace().any(|c| c == name);
                    if has("memory") {
                        c.memory = Some(base.clone());
                    }
                    if has("pids") {
                        c.pids = Some(base.clone());
                    }
                }
                Err(e) => {
                    let why = format!(
                        "cannot enable the memory and pids controllers in {} ({e}): run the \
                         connector as root on the host, or in a container with its own writable \
                         cgroup (e.g. `--cgroupns=private` and a delegated cgroup)",
                        base.display()
                    );
                    for m in [Mechanism::MemoryCgroup, Mechanism::PidsCgroup] {
                        missing.push(Missing {
                            mechanism: m.name(),
                            why: why.clone(),
                        });
                    }
                    return c;
                }
            }
        } else {
            for (controller, slot) in [("memory", &mut c.memory), ("pids", &mut c.pids)] {
                let base = root.join(controller).join(CGROUP_DIR);
                match std::fs::create_dir_all(&base).and_then(|()| writable(&base)) {
                    Ok(()) => *slot = Some(base),
                    Err(e) => missing.push(Missing {
                        mechanism: if controller == "memory" {
                            Mechanism::MemoryCgroup.name()
                        } else {
                            Mechanism::PidsCgroup.name()
                        },
                        why: format!(
                            "cannot create the cgroup {} ({e}): the {controller} controller must \
                             be mounted (cgroup v1) and writable by the connector (run it as root)",
                            base.display()
                        ),
                    }),
                }
            }
        }
        for (m, slot) in [
            (Mechanism::MemoryCgroup, &c.memory),
            (Mechanism::PidsCgroup, &c.pids),
        ] {
            if slot.is_none() && !missing.iter().any(|x| x.mechanism == m.name()) {
                missing.push(Missing {
                    mechanism: m.name(),
                    why: format!(
                        "the cgroup v2 hierarchy at {CGROUP_ROOT} does not offer the controller: \
                         enable it in the parent's cgroup.subtree_control"
                    ),
                });
            }
        }
        c
    }
}

/// Whether this process may make cgroups in `dir`.
fn writable(dir: &Path) -> std::io::Result<()> {
    let path = CString::new(dir.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: a valid C string.
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Everything decided once for a function's plugin processes.
#[derive(Debug)]
pub struct Plan {
    mode: Mode,
    active: u32,
    memory: Memory,
    pids: u64,
    nofile: u64,
    fsize: u64,
    tmp_bytes: u64,
    plugin_dir: PathBuf,
    /// Bound back read-only, with the directories to create first.
    keeps: Vec<(PathBuf, Vec<PathBuf>)>,
    hides: Vec<PathBuf>,
    cgroups: Cgroups,
    /// The plugin's uid and gid, when this bootstrap is root.
    uid: Option<u32>,
    /// The user namespace's maps, when it is not.
    maps: Option<(String, String)>,
    report: Report,
}

/// What a plugin needs to see, read-only, besides the system.
#[derive(Debug, Clone, Default)]
pub struct Needs {
    /// The plugin directory.
    pub plugin_dir: PathBuf,
    /// The interpreter as configured (a venv's `bin/python`).
    pub python: PathBuf,
    /// Extra `PYTHONPATH` directories.
    pub python_path: Option<String>,
    /// The manifest's `resource.memory`.
    pub memory_bytes: Option<u64>,
    /// The function's name, which the plugin's uid is derived from.
    pub function: String,
}

/// First uid (and gid) given to plugins: far above any distribution's users and subuid ranges.
const UID_BASE: u32 = 1_000_000_000;
/// How many uids plugins are spread over.
const UID_SPAN: u32 = 1_000_000_000;

/// A stable uid for a function (FNV-1a of its name): each function its own, across restarts.
fn uid_for(function: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in function.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    UID_BASE + h % UID_SPAN
}

/// The directories the plugin reads, resolved: its own, its venv and its interpreter's prefix.
fn keeps_for(needs: &Needs) -> Vec<PathBuf> {
    let mut keeps = vec![needs.plugin_dir.clone()];
    let venv = needs.python.parent().and_then(Path::parent);
    if let Some(v) = venv.filter(|v| v.join("pyvenv.cfg").exists()) {
        keeps.push(v.to_path_buf());
    }
    let real = std::fs::canonicalize(&needs.python).ok();
    if let Some(prefix) = real
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::parent)
    {
        keeps.push(prefix.to_path_buf());
    }
    for p in needs.python_path.iter().flat_map(|p| p.split(':')) {
        if !p.is_empty() {
            keeps.push(PathBuf::from(p));
        }
    }
    keeps
        .into_iter()
        .filter_map(|k| std::fs::canonicalize(&k).ok())
        .filter(|k| k != Path::new("/"))
        .collect()
}

/// The first ancestor of `path` another user cannot traverse (`/root` for a pyenv Python).
fn closed_ancestor(path: &Path, hides: &[PathBuf]) -> Option<PathBuf> {
    for a in path
        .ancestors()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip(1)
    {
        if a == path || hides.iter().any(|h| a.starts_with(h)) {
            return None;
        }
        let mode = std::fs::metadata(a).ok()?.permissions().mode();
        if mode & 0o001 == 0 {
            return Some(a.to_path_buf());
        }
    }
    None
}

impl Plan {
    /// Decides the sandbox for a plugin, probing what the host allows; `None` when off.
    /// `required` with a mechanism missing is an error naming it.
    pub fn new(o: &Options, needs: &Needs) -> Result<Option<Arc<Self>>, Error> {
        if o.mode == Mode::Off {
            return Ok(None);
        }
        for (name, value) in [
            ("SRI_SANDBOX_PIDS", o.pids),
            ("SRI_SANDBOX_NOFILE", o.nofile),
            ("SRI_SANDBOX_FSIZE_MB", o.fsize_mb),
            ("SRI_SANDBOX_TMP_MB", o.tmp_mb),
            ("SRI_SANDBOX_MEMORY_MAX_MB", o.memory_max_mb),
        ] {
            if value == 0 {
                return Err(Error::Config(format!(
                    "{name} is 0: it must be a positive number (or leave it unset for its default)"
                )));
            }
        }
        if o.memory_mb == Some(0) {
            return Err(Error::Config(
                "SRI_SANDBOX_MEMORY_MB is 0: give a positive number of MiB, or unset it to use \
                 the manifest's resource.memory"
                    .into(),
            ));
        }
        // SAFETY: getters without side effects.
        let root = unsafe { libc::geteuid() } == 0;
        let mut missing = Vec::new();
        let cgroups = Cgroups::detect(&mut missing);
        let mut hides: Vec<PathBuf> = o
            .hide
            .iter()
            .filter(|h| !h.as_os_str().is_empty())
            .map(|h| std::fs::canonicalize(h).unwrap_or_else(|_| h.clone()))
            .collect();
        if hides.len() > MAX_HIDES / 2 {
            return Err(Error::Config(format!(
                "SRI_SANDBOX_HIDE names {} directories; at most {} are supported",
                hides.len(),
                MAX_HIDES / 2
            )));
        }
        let keeps = keeps_for(needs);
        if root {
            // Whatever the plugin's uid could not reach is hidden, and what it needs of it
            // bound back: e.g. `/root`, holding a pyenv interpreter.
            for k in &keeps {
                if let Some(a) = closed_ancestor(k, &hides) {
                    hides.push(a);
                }
            }
        }
        let mut covered = hides.clone();
        covered.push(PathBuf::from("/tmp"));
        let keeps = keeps
            .into_iter()
            .map(|k| {
                let cover = covered
                    .iter()
                    .filter(|h| k.starts_with(h))
                    .min_by_key(|h| h.as_os_str().len());
                let dirs = match cover {
                    Some(c) => k
                        .ancestors()
                        .take_while(|a| a != c)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .map(Path::to_path_buf)
                        .collect(),
                    None => Vec::new(),
                };
                (k, dirs)
            })
            .collect();
        let (uid, maps) = if root {
            (Some(uid_for(&needs.function)), None)
        } else {
            // SAFETY: getters without side effects.
            let (u, g) = unsafe { (libc::geteuid(), libc::getegid()) };
            (None, Some((format!("0 {u} 1\n"), format!("0 {g} 1\n"))))
        };
        let mut plan = Plan {
            mode: o.mode,
            active: 0,
            memory: memory_limit(needs.memory_bytes, o),
            pids: o.pids,
            nofile: o.nofile,
            fsize: o.fsize_mb.saturating_mul(MIB),
            tmp_bytes: o.tmp_mb.saturating_mul(MIB),
            plugin_dir: needs.plugin_dir.clone(),
            keeps,
            hides,
            cgroups,
            uid,
            maps,
            report: Report {
                mode: o.mode,
                active: Vec::new(),
                missing: Vec::new(),
            },
        };
        plan.probe(root, missing);
        let plan = Arc::new(plan);
        plan.log();
        if plan.mode == Mode::Required && !plan.report.missing.is_empty() {
            let names: Vec<String> = plan
                .report
                .missing
                .iter()
                .map(|m| format!("{}: {}", m.mechanism, m.why))
                .collect();
            return Err(Error::Config(format!(
                "SRI_SANDBOX=required, but this host does not allow {}; allow it, or set \
                 SRI_SANDBOX=auto to run with what the host allows",
                names.join("; ")
            )));
        }
        Ok(Some(plan))
    }

    /// What is active and what is missing.
    pub fn report(&self) -> &Report {
        &self.report
    }

    /// Finds what the host allows by running the setup in forked children, dropping each
    /// mechanism that fails until the rest succeeds.
    fn probe(&mut self, root: bool, mut missing: Vec<Missing>) {
        let mut want: u32 = Mechanism::ALL.iter().map(|m| m.bit()).fold(0, |a, b| a | b);
        if root {
            want &= !Mechanism::UserNamespace.bit();
        } else {
            // Without root there is no other uid to become: the plugin keeps this one (never
            // root), confined by the user namespace.
            want &= !Mechanism::UnprivilegedUid.bit();
        }
        for m in &missing {
            if let Some(x) = Mechanism::ALL.iter().find(|x| x.name() == m.mechanism) {
                want &= !x.bit();
            }
        }
        for _ in 0..Mechanism::ALL.len() {
            self.active = want;
            let child = match self.child_plan(u64::MAX, &mut Vec::new()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "sandbox probe could not prepare");
                    break;
                }
            };
            match probe_once(&child) {
                Ok(()) => break,
                Err((step, errno)) => {
                    let failed = step.mechanism();
                    // A namespace that cannot be made takes everything built in it along.
                    let mut lost = failed.bit();
                    if matches!(failed, Mechanism::UserNamespace | Mechanism::PidNamespace) {
                        lost |= Mechanism::PidNamespace.bit()
                            | Mechanism::MountNamespace.bit()
                            | Mechanism::PrivateTmp.bit();
                    }
                    if failed == Mechanism::MountNamespace {
                        lost |= Mechanism::PrivateTmp.bit();
                    }
                    let err = std::io::Error::from_raw_os_error(errno);
                    for m in Mechanism::ALL.iter().filter(|m| lost & m.bit() & want != 0) {
                        missing.push(Missing {
                            mechanism: m.name(),
                            why: format!(
                                "{} failed ({err}){}",
                                step.what(),
                                if root {
                                    ""
                                } else {
                                    ": as a user other than root, the host must allow \
                                     unprivileged user namespaces (kernel.unprivileged_userns_clone=1, \
                                     user.max_user_namespaces > 0; in a container, a seccomp \
                                     profile that allows unshare and mount)"
                                }
                            ),
                        });
                    }
                    want &= !lost;
                }
            }
        }
        self.active = want;
        self.report.active = Mechanism::ALL
            .iter()
            .filter(|m| want & m.bit() != 0)
            .map(|m| m.name())
            .collect();
        missing.retain(|m| {
            Mechanism::ALL
                .iter()
                .any(|x| x.name() == m.mechanism && want & x.bit() == 0)
        });
        self.report.missing = missing;
    }

    fn log(&self) {
        let missing: Vec<String> = self
            .report
            .missing
            .iter()
            .map(|m| format!("{} ({})", m.mechanism, m.why))
            .collect();
        tracing::info!(
            mode = ?self.mode,
            active = %self.report.active.join(","),
            missing = %missing.join("; "),
            memory_mb = self.memory.bytes.div_ceil(MIB),
            memory_source = %self.memory.source,
            uid = ?self.uid,
            "plugin sandbox"
        );
    }

    fn has(&self, m: Mechanism) -> bool {
        self.active & m.bit() != 0
    }

    /// The child's part, prepared here (it may not allocate after fork). `generation` names
    /// the cgroups (`u64::MAX`: a probe, none are made); `cells` receives the cgroups made.
    fn child_plan(&self, generation: u64, cells: &mut Vec<PathBuf>) -> Result<ChildPlan, Error> {
        let c = |p: &Path| cstring(p.as_os_str().as_bytes());
        let mut cgroup_procs = Vec::new();
        if generation != u64::MAX {
            let name = format!("b{}-g{generation}", std::process::id());
            let mut dirs: Vec<(PathBuf, bool, bool)> = Vec::new();
            let mem = self
                .has(Mechanism::MemoryCgroup)
                .then_some(self.cgroups.memory.as_ref())
                .flatten();
            let pids = self
                .has(Mechanism::PidsCgroup)
                .then_some(self.cgroups.pids.as_ref())
                .flatten();
            match (mem, pids) {
                (Some(m), Some(p)) if m == p => dirs.push((m.join(&name), true, true)),
                (m, p) => {
                    if let Some(m) = m {
                        dirs.push((m.join(&name), true, false));
                    }
                    if let Some(p) = p {
                        dirs.push((p.join(&name), false, true));
                    }
                }
            }
            for (dir, memory, pids) in dirs {
                let _ = std::fs::remove_dir(&dir);
                std::fs::create_dir(&dir).map_err(|e| cg_err(&dir, e))?;
                cells.push(dir.clone());
                let write = |file: &str, value: String| {
                    std::fs::write(dir.join(file), value).map_err(|e| cg_err(&dir.join(file), e))
                };
                if memory {
                    let bytes = self.memory.bytes.to_string();
                    if self.cgroups.v2 {
                        write("memory.max", bytes)?;
                        if dir.join("memory.swap.max").exists() {
                            write("memory.swap.max", "0".into())?;
                        }
                    } else {
                        write("memory.limit_in_bytes", bytes.clone())?;
                        // With swap accounting on, swap is bounded too (else the plugin swaps
                        // instead of being stopped).
                        if dir.join("memory.memsw.limit_in_bytes").exists() {
                            write("memory.memsw.limit_in_bytes", bytes)?;
                        }
                    }
                }
                if pids {
                    write("pids.max", self.pids.to_string())?;
                }
                let procs = dir.join("cgroup.procs");
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&procs)
                    .map_err(|e| cg_err(&procs, e))?;
                cgroup_procs.push(OwnedFd::from(f));
            }
        }
        let ns = self.has(Mechanism::PidNamespace);
        let mount = ns && self.has(Mechanism::MountNamespace);
        let mut keeps = Vec::new();
        if mount {
            for (k, dirs) in &self.keeps {
                keeps.push(Keep {
                    dst: c(k),
                    mkdirs: dirs.iter().map(|d| c(d)).collect(),
                });
            }
        }
        let mut rlimits = Vec::new();
        if self.has(Mechanism::Rlimits) {
            rlimits.push((libc::RLIMIT_NOFILE, self.nofile));
            rlimits.push((libc::RLIMIT_FSIZE, self.fsize));
            rlimits.push((libc::RLIMIT_CORE, 0));
        }
        let uid = self.uid.filter(|_| self.has(Mechanism::UnprivilegedUid));
        if uid.is_some() && !self.has(Mechanism::PidsCgroup) && self.has(Mechanism::Rlimits) {
            // Per uid, and the uid is the function's own: the pids cgroup's stand-in.
            rlimits.push((libc::RLIMIT_NPROC, self.pids));
        }
        let tmp = mount && self.has(Mechanism::PrivateTmp);
        let userns = self
            .maps
            .as_ref()
            .filter(|_| ns && self.has(Mechanism::UserNamespace))
            .map(|(u, g)| (u.clone().into_bytes(), g.clone().into_bytes()));
        Ok(ChildPlan {
            cgroup_procs,
            userns,
            namespaces: ns,
            mount,
            tmp,
            tmp_data: cstring(format!("size={},mode=1777", self.tmp_bytes).as_bytes()),
            shm_data: cstring(
                format!("size={},mode=1777", self.tmp_bytes.min(64 * MIB)).as_bytes(),
            ),
            // Under a private `/tmp`, hidden already.
            hides: if mount {
                self.hides
                    .iter()
                    .filter(|h| !(tmp && h.starts_with("/tmp")))
                    .map(|h| c(h))
                    .collect()
            } else {
                Vec::new()
            },
            keeps,
            plugin_dir: c(&self.plugin_dir),
            rlimits,
            nnp: self.has(Mechanism::NoNewPrivs),
            uid,
        })
    }
}

fn cg_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        context: format!("sandbox: cannot set up the cgroup {}", path.display()),
        source: e,
    }
}

fn cstring(b: &[u8]) -> CString {
    CString::new(b.to_vec()).unwrap_or_else(|_| CString::from(c"/nonexistent"))
}

impl Confine for Plan {
    fn confine(&self, cmd: &mut Command, generation: u64) -> Result<Box<dyn Confined>, Error> {
        let mut cell = Cell {
            dirs: Vec::new(),
            memory: self.memory.clone(),
            v2: self.cgroups.v2,
            memory_dir: None,
        };
        let child = self.child_plan(generation, &mut cell.dirs)?;
        cell.memory_dir = self
            .cgroups
            .memory
            .as_ref()
            .filter(|_| self.has(Mechanism::MemoryCgroup))
            .and_then(|base| cell.dirs.iter().find(|d| d.starts_with(base)).cloned());
        if child.tmp {
            // The user's home is not the plugin's (nor reachable by its uid).
            cmd.env("HOME", "/tmp").env("TMPDIR", "/tmp");
        }
        // SAFETY: `enter` makes only async-signal-safe system calls on data prepared before
        // the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                enter(&child).map_err(|(step, errno)| {
                    let msg = step.what();
                    let _ = libc::write(2, b"sri sandbox: ".as_ptr().cast(), 13);
                    let _ = libc::write(2, msg.as_ptr().cast(), msg.len());
                    let _ = libc::write(2, b" failed\n".as_ptr().cast(), 8);
                    std::io::Error::from_raw_os_error(errno)
                })
            });
        }
        Ok(Box::new(cell))
    }
}

/// A process's cgroups: read when it exits (was it the memory limit?), removed afterwards.
#[derive(Debug)]
struct Cell {
    dirs: Vec<PathBuf>,
    memory_dir: Option<PathBuf>,
    memory: Memory,
    v2: bool,
}

impl Confined for Cell {
    fn explain(&self, status: String) -> String {
        let Some(dir) = &self.memory_dir else {
            return status;
        };
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let kills = std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        if kills == 0 {
            return status;
        }
        format!(
            "{status}: out of memory: the plugin reached its sandbox's memory limit of {} MiB, \
             set by {}; declare more in the manifest's resource.memory, or raise \
             SRI_SANDBOX_MEMORY_MB / SRI_SANDBOX_MEMORY_MAX_MB",
            self.memory.bytes.div_ceil(MIB),
            self.memory.source
        )
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        let dirs = std::mem::take(&mut self.dirs);
        if dirs.is_empty() {
            return;
        }
        // The namespace's last processes may still be exiting: retried briefly, off the
        // async workers.
        std::thread::spawn(move || {
            for dir in dirs {
                for _ in 0..100 {
                    match std::fs::remove_dir(&dir) {
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(std::time::Duration::from_millis(20))
                        }
                        _ => break,
                    }
                }
            }
        });
    }
}

/// Prints what the host allows (`bootstrap sandbox-probe`): the connector's report.
pub fn probe_report(o: &Options) -> Report {
    let needs = Needs {
        plugin_dir: PathBuf::from("/"),
        function: "probe".into(),
        ..Needs::default()
    };
    let probe = Options {
        mode: Mode::Auto,
        ..o.clone()
    };
    match Plan::new(&probe, &needs) {
        Ok(Some(plan)) => Report {
            mode: o.mode,
            ..plan.report.clone()
        },
        _ => Report {
            mode: o.mode,
            active: Vec::new(),
            missing: Vec::new(),
        },
    }
}

// ---- The child's side: between fork and exec, system calls only. ----

/// A directory bound back read-only.
struct Keep {
    dst: CString,
    mkdirs: Vec<CString>,
}

struct ChildPlan {
    cgroup_procs: Vec<OwnedFd>,
    userns: Option<(Vec<u8>, Vec<u8>)>,
    namespaces: bool,
    mount: bool,
    tmp: bool,
    tmp_data: CString,
    shm_data: CString,
    hides: Vec<CString>,
    keeps: Vec<Keep>,
    plugin_dir: CString,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    nnp: bool,
    uid: Option<u32>,
}

/// Which step of [`enter`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Cgroup = 1,
    UserNs,
    Namespaces,
    Private,
    ReadOnly,
    Tmp,
    Hide,
    Keep,
    Proc,
    Chdir,
    Rlimit,
    Nnp,
    Identity,
    ParentDeath,
}

impl Step {
    const ALL: [Step; 14] = [
        Step::Cgroup,
        Step::UserNs,
        Step::Namespaces,
        Step::Private,
        Step::ReadOnly,
        Step::Tmp,
        Step::Hide,
        Step::Keep,
        Step::Proc,
        Step::Chdir,
        Step::Rlimit,
        Step::Nnp,
        Step::Identity,
        Step::ParentDeath,
    ];

    fn what(self) -> &'static str {
        match self {
            Step::Cgroup => "joining the cgroups",
            Step::UserNs => "creating a user namespace",
            Step::Namespaces => "creating PID and mount namespaces",
            Step::Private => "making the mounts private",
            Step::ReadOnly => "making the file system read-only (mount_setattr, Linux 5.12+)",
            Step::Tmp => "mounting a tmpfs on /tmp",
            Step::Hide => "hiding directories under tmpfs",
            Step::Keep => "binding the plugin, its venv and interpreter read-only",
            Step::Proc => "mounting /proc",
            Step::Chdir => "entering the plugin directory",
            Step::Rlimit => "setting rlimits",
            Step::Nnp => "setting no_new_privs",
            Step::Identity => "changing to the plugin's uid and gid",
            Step::ParentDeath => "tying the plugin's life to the bootstrap's",
        }
    }

    fn mechanism(self) -> Mechanism {
        match self {
            Step::Cgroup => Mechanism::MemoryCgroup,
            Step::UserNs => Mechanism::UserNamespace,
            Step::Namespaces | Step::Proc => Mechanism::PidNamespace,
            Step::Private | Step::ReadOnly | Step::Hide | Step::Keep | Step::Chdir => {
                Mechanism::MountNamespace
            }
            Step::Tmp => Mechanism::PrivateTmp,
            Step::Rlimit => Mechanism::Rlimits,
            Step::Nnp => Mechanism::NoNewPrivs,
            Step::Identity => Mechanism::UnprivilegedUid,
            Step::ParentDeath => Mechanism::PidNamespace,
        }
    }
}

type StepResult = Result<(), (Step, i32)>;

/// Directories hidden at most (the operator's, and those the plugin's uid cannot traverse).
const MAX_HIDES: usize = 16;

/// Directories bound back at most (the plugin, its venv, its interpreter, `PYTHONPATH`).
const MAX_KEEPS: usize = 16;

/// `/proc/self/fd/<fd>` as a C string, built on the stack (no allocation after fork).
struct FdPath([u8; 32]);

impl FdPath {
    fn new(fd: i32) -> Self {
        let mut buf = [0u8; 32];
        let prefix = b"/proc/self/fd/";
        buf[..prefix.len()].copy_from_slice(prefix);
        let mut digits = [0u8; 10];
        let (mut n, mut len) = (fd.max(0) as u32, 0);
        loop {
            digits[len] = b'0' + (n % 10) as u8;
            len += 1;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for i in 0..len {
            buf[prefix.len() + i] = digits[len - 1 - i];
        }
        Self(buf)
    }

    fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn check(rc: libc::c_long, step: Step) -> StepResult {
    if rc < 0 { Err((step, errno())) } else { Ok(()) }
}

/// `mount_setattr(2)`'s argument (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const AT_RECURSIVE: libc::c_uint = 0x8000;

/// Makes the mount at `path` (and, recursively, those under it) read-only and nosuid.
unsafe fn read_only(path: &std::ffi::CStr, step: Step) -> StepResult {
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a valid path and a properly sized attribute struct.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    check(rc, step)
}

unsafe fn write_file(path: &std::ffi::CStr, data: &[u8], step: Step) -> StepResult {
    // SAFETY: plain system calls on a valid path and buffer.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        check(fd as libc::c_long, step)?;
        let n = libc::write(fd, data.as_ptr().cast(), data.len());
        libc::close(fd);
        if n != data.len() as isize {
            return Err((step, errno()));
        }
    }
    Ok(())
}

unsafe fn mount(
    src: *const libc::c_char,
    dst: *const libc::c_char,
    fstype: *const libc::c_char,
    flags: libc::c_ulong,
    data: *const libc::c_char,
    step: Step,
) -> StepResult {
    // SAFETY: the caller passes valid C strings or nulls.
    let rc = unsafe { libc::mount(src, dst, fstype, flags, data.cast()) };
    check(rc as libc::c_long, step)
}

/// The plugin a relay waits for (see [`relay`]).
static RELAYED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The relay's SIGTERM handler: kills the plugin (and so its PID namespace), then ends the
/// relay by SIGTERM.
extern "C" fn end_plugin(_: libc::c_int) {
    // SAFETY: async-signal-safe system calls only.
    unsafe {
        let plugin = RELAYED.load(std::sync::atomic::Ordering::SeqCst);
        if plugin > 0 {
            libc::kill(plugin, libc::SIGKILL);
        }
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        libc::raise(libc::SIGTERM);
    }
}

/// The middle process of a sandboxed spawn: it stays outside the new PID namespace, closes
/// everything it inherited (so the spawn's exec-error pipe and the plugin's stdio end with the
/// plugin) and ends as the plugin ended.
fn relay(child: libc::pid_t, alive: i32) -> ! {
    // SAFETY: async-signal-safe system calls only; this never returns.
    unsafe {
        // All but `alive`, whose write end the plugin watches until its parent-death signal
        // is armed (the last step of `enter`).
        let alive = alive as u32;
        if alive > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, alive - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, alive + 1, u32::MAX, 0u32);
        // Never exec'd, it still has the bootstrap's handlers: back to the defaults.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // SIGTERM, and the bootstrap's death (the parent-death signal, armed since the spawn,
        // now SIGTERM), end the plugin first: as PID 1 it ignores SIGTERM, and the plugin's
        // code can disarm its own parent-death signal, but not this.
        RELAYED.store(child, std::sync::atomic::Ordering::SeqCst);
        libc::signal(
            libc::SIGTERM,
            end_plugin as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
        let mut status = 0;
        loop {
            let r = libc::waitpid(child, &mut status, 0);
            if r == child {
                break;
            }
            if r < 0 && errno() != libc::EINTR {
                libc::_exit(127);
            }
        }
        if libc::WIFEXITED(status) {
            libc::_exit(libc::WEXITSTATUS(status));
        }
        let sig = libc::WTERMSIG(status);
        libc::signal(sig, libc::SIG_DFL);
        libc::kill(libc::getpid(), sig);
        libc::_exit(128 + sig)
    }
}

/// Applies the sandbox to the calling (forked) process; on success the caller execs the
/// plugin. With namespaces it forks once more and only the grandchild returns.
fn enter(p: &ChildPlan) -> StepResult {
    // The read end of a pipe only the relay writes to: it hangs up when the relay is gone.
    let mut relay_alive = -1;
    // SAFETY: a plain system call.
    let bootstrap = unsafe { libc::getppid() };
    // SAFETY: system calls on data prepared before the fork; nothing allocates.
    unsafe {
        for fd in &p.cgroup_procs {
            if libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err((Step::Cgroup, errno()));
            }
        }
        if p.namespaces {
            if let Some((uid_map, gid_map)) = &p.userns {
                check(libc::unshare(libc::CLONE_NEWUSER) as _, Step::UserNs)?;
                // A non-dumpable process's /proc files belong to root: its own maps are
                // writable only while it is dumpable, which it is for these three writes.
                libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
                let maps = write_file(c"/proc/self/setgroups", b"deny", Step::UserNs)
                    .and_then(|()| write_file(c"/proc/self/uid_map", uid_map, Step::UserNs))
                    .and_then(|()| write_file(c"/proc/self/gid_map", gid_map, Step::UserNs));
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                maps?;
            }
            check(
                libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWPID) as _,
                Step::Namespaces,
            )?;
            let mut alive = [-1; 2];
            check(
                libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) as _,
                Step::Namespaces,
            )?;
            let pid = libc::fork();
            check(pid as _, Step::Namespaces)?;
            if pid > 0 {
                relay(pid, alive[1]);
            }
            libc::close(alive[1]);
            relay_alive = alive[0];
            let null = std::ptr::null();
            mount(
                null,
                c"/".as_ptr(),
                null,
                libc::MS_REC | libc::MS_PRIVATE,
                null,
                Step::Private,
            )?;
            if p.mount {
                // Held before anything is covered (and opened in this namespace: a mount of
                // another one cannot be bound here).
                let mut held = [-1; MAX_KEEPS];
                for (slot, k) in held.iter_mut().zip(&p.keeps) {
                    *slot = libc::open(k.dst.as_ptr(), libc::O_PATH | libc::O_CLOEXEC);
                    check(*slot as _, Step::Keep)?;
                }
                read_only(c"/", Step::ReadOnly)?;
                let mut covered = [false; MAX_HIDES];
                for (done, h) in covered.iter_mut().zip(&p.hides) {
                    if libc::access(h.as_ptr(), libc::F_OK) != 0 {
                        continue;
                    }
                    *done = true;
                    mount(
                        c"tmpfs".as_ptr(),
                        h.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c"size=1m,mode=755".as_ptr(),
                        Step::Hide,
                    )?;
                }
                if p.tmp {
                    let flags = libc::MS_NOSUID | libc::MS_NODEV;
                    mount(
                        c"tmpfs".as_ptr(),
                        c"/tmp".as_ptr(),
                        c"tmpfs".as_ptr(),
                        flags,
                        p.tmp_data.as_ptr(),
                        Step::Tmp,
                    )?;
                    if libc::access(c"/dev/shm".as_ptr(), libc::F_OK) == 0 {
                        mount(
                            c"tmpfs".as_ptr(),
                            c"/dev/shm".as_ptr(),
                            c"tmpfs".as_ptr(),
                            flags,
                            p.shm_data.as_ptr(),
                            Step::Tmp,
                        )?;
                    }
                }
                for (fd, k) in held.iter().zip(&p.keeps) {
                    for d in &k.mkdirs {
                        libc::mkdir(d.as_ptr(), 0o755);
                    }
                    let src = FdPath::new(*fd);
                    mount(
                        src.as_ptr(),
                        k.dst.as_ptr(),
                        null,
                        libc::MS_BIND | libc::MS_REC,
                        null,
                        Step::Keep,
                    )?;
                    read_only(&k.dst, Step::Keep)?;
                    libc::close(*fd);
                }
                // Only the tmpfs mounted above: a hidden directory under `/tmp` is now gone, or
                // a plain directory on the private `/tmp` leading to a bound one.
                for (done, h) in covered.iter().zip(&p.hides) {
                    if *done {
                        read_only(h, Step::Hide)?;
                    }
                }
            }
            mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                null,
                Step::Proc,
            )?;
            // The working directory was taken before the mounts: re-entered through them, or
            // `..` would lead under the hidden directories.
            check(libc::chdir(p.plugin_dir.as_ptr()) as _, Step::Chdir)?;
        }
        for (resource, value) in &p.rlimits {
            let lim = libc::rlimit {
                rlim_cur: *value,
                rlim_max: *value,
            };
            check(libc::setrlimit(*resource, &lim) as _, Step::Rlimit)?;
        }
        if p.nnp {
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _,
                Step::Nnp,
            )?;
            // Root (in any namespace) gains no capability by exec past an empty bounding set.
            for cap in 0..64 {
                libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
            }
        }
        if let Some(id) = p.uid {
            check(libc::setgroups(0, std::ptr::null()) as _, Step::Identity)?;
            check(libc::setresgid(id, id, id) as _, Step::Identity)?;
            check(libc::setresuid(id, id, id) as _, Step::Identity)?;
        }
        // The plugin dies with its parent: the bootstrap, or the relay, which dies with the
        // bootstrap (PID 1 of the new namespace takes the whole namespace along). Armed last:
        // a change of uid disarms it.
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) as _,
            Step::ParentDeath,
        )?;
        // The parent may have gone before it was armed: then nothing would ever end this.
        let gone = if relay_alive >= 0 {
            let mut fd = libc::pollfd {
                fd: relay_alive,
                events: libc::POLLIN,
                revents: 0,
            };
            let hung_up = libc::poll(&mut fd, 1, 0) > 0;
            libc::close(relay_alive);
            hung_up
        } else {
            libc::getppid() != bootstrap
        };
        if gone {
            return Err((Step::ParentDeath, libc::ESRCH));
        }
    }
    Ok(())
}

/// Runs [`enter`] in a forked child that exits instead of exec'ing: which step fails, if any.
fn probe_once(p: &ChildPlan) -> Result<(), (Step, i32)> {
    // SAFETY: the child makes only async-signal-safe calls and leaves by `_exit`.
    unsafe {
        // The failed step is the exit code; its errno comes through a pipe.
        let mut pipe = [-1; 2];
        check(
            libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) as _,
            Step::Namespaces,
        )?;
        let pid = libc::fork();
        if pid < 0 {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            return Err((Step::Namespaces, errno()));
        }
        if pid == 0 {
            let code = match enter(p) {
                Ok(()) => 0,
                Err((step, e)) => {
                    libc::write(pipe[1], e.to_ne_bytes().as_ptr().cast(), 4);
                    step as i32
                }
            };
            libc::_exit(code);
        }
        libc::close(pipe[1]);
        let mut status = 0;
        while libc::waitpid(pid, &mut status, 0) < 0 {
            if errno() != libc::EINTR {
                return Err((Step::Namespaces, errno()));
            }
        }
        let mut e = [0u8; 4];
        let got = libc::read(pipe[0], e.as_mut_ptr().cast(), 4);
        libc::close(pipe[0]);
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            return Ok(());
        }
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            0
        };
        let step = Step::ALL
            .iter()
            .copied()
            .find(|s| *s as i32 == code)
            .unwrap_or(Step::Namespaces);
        let e = if got == 4 {
            i32::from_ne_bytes(e)
        } else {
            libc::EIO
        };
        Err((step, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Options {
        Options {
            mode: Mode::Auto,
            memory_mb: None,
            memory_max_mb: 1024,
            pids: 10,
            nofile: 10,
            fsize_mb: 1,
            tmp_mb: 1,
            hide: Vec::new(),
        }
    }

    #[test]
    fn the_memory_limit_says_where_it_came_from() {
        let o = opts();
        let m = memory_limit(Some(256 * MIB), &o);
        assert_eq!(m.bytes, 256 * MIB);
        assert!(m.source.contains("resource.memory"), "{}", m.source);
        let m = memory_limit(Some(4096 * MIB), &o);
        assert_eq!(m.bytes, 1024 * MIB);
        assert!(m.source.contains("SRI_SANDBOX_MEMORY_MAX_MB") && m.source.contains("4096"));
        let m = memory_limit(
            Some(256 * MIB),
            &Options {
                memory_mb: Some(300),
                ..o.clone()
            },
        );
        assert_eq!(m.bytes, 300 * MIB);
        assert!(m.source.contains("SRI_SANDBOX_MEMORY_MB"));
        let m = memory_limit(None, &o);
        assert_eq!(m.bytes, 1024 * MIB);
        assert!(m.source.contains("declares no resource.memory"));
    }

    #[test]
    fn uids_are_per_function_and_never_root() {
        assert_ne!(uid_for("a"), uid_for("b"));
        assert_eq!(uid_for("a"), uid_for("a"));
        assert!(uid_for("") >= UID_BASE);
    }

    #[test]
    fn probe_steps_decode() {
        for s in Step::ALL {
            assert_eq!(Step::ALL.iter().find(|x| **x as i32 == s as i32), Some(&s));
        }
    }
}
