//! The sandbox of a function's plugin processes, decided once in the bootstrap: the memory
//! limit, the cgroups' parents, which directories are hidden and which bound back, the uid (or
//! the user namespace's maps) and the mechanisms the host allows. Each spawn turns it into a
//! `ChildPlan`: everything the child needs, allocated here, since the child may not allocate.

use nix::libc;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::process::Command;

use super::cgroup::{Cell, Cgroups};
use super::child::{ChildPlan, Keep, MAX_HIDES, enter};
use super::memory::{Memory, memory_limit};
use super::{MIB, Mechanism, Mode, Options, Report};
use crate::Error;
use crate::process::{Confine, Confined};

#[derive(Debug)]
pub struct Plan {
    mode: Mode,
    /// The mechanisms in use, one bit each (found by the probe).
    pub(super) active: u32,
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
    pub(super) report: Report,
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
    pub(super) fn child_plan(
        &self,
        generation: u64,
        cells: &mut Vec<PathBuf>,
    ) -> Result<ChildPlan, Error> {
        let c = |p: &Path| cstring(p.as_os_str().as_bytes());
        let cgroup_procs = if generation != u64::MAX {
            self.cgroups.make(
                generation,
                self.has(Mechanism::MemoryCgroup)
                    .then_some(self.memory.bytes),
                self.has(Mechanism::PidsCgroup).then_some(self.pids),
                cells,
            )?
        } else {
            Vec::new()
        };
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

fn cstring(b: &[u8]) -> CString {
    CString::new(b.to_vec()).unwrap_or_else(|_| CString::from(c"/nonexistent"))
}

impl Confine for Plan {
    fn confine(&self, cmd: &mut Command, generation: u64) -> Result<Box<dyn Confined>, Error> {
        let mut cell = Cell::new(self.memory.clone(), self.cgroups.v2);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_per_function_and_never_root() {
        assert_ne!(uid_for("a"), uid_for("b"));
        assert_eq!(uid_for("a"), uid_for("a"));
        assert!(uid_for("") >= UID_BASE);
    }
}
