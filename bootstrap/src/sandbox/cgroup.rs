//! The plugin's memory and pids cgroups, v1 or v2: found (and their parents made) once, one
//! pair made per spawn and joined by the child before anything else runs, read when the
//! process exits (was it the memory limit?) and removed afterwards.

use nix::libc;
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::memory::Memory;
use super::{MIB, Mechanism, Missing};
use crate::Error;
use crate::process::Confined;

/// Where the plugin process's cgroups are made.
#[derive(Debug, Clone, Default)]
pub(super) struct Cgroups {
    /// Parent of the memory cgroups.
    pub(super) memory: Option<PathBuf>,
    /// Parent of the pids cgroups (the same as `memory` on cgroup v2).
    pids: Option<PathBuf>,
    pub(super) v2: bool,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_DIR: &str = "sri-sandbox";

impl Cgroups {
    /// Finds (and creates) the parents, recording what is missing and why.
    pub(super) fn detect(missing: &mut Vec<Missing>) -> Self {
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

impl Cgroups {
    /// Makes spawn `generation`'s cgroups, with a memory limit of `memory` bytes and at most
    /// `pids` processes (`None`: that mechanism is not active), and opens their `cgroup.procs`
    /// for the child to join; `cells` receives the cgroups made.
    pub(super) fn make(
        &self,
        generation: u64,
        memory: Option<u64>,
        pids: Option<u64>,
        cells: &mut Vec<PathBuf>,
    ) -> Result<Vec<OwnedFd>, Error> {
        let mut cgroup_procs = Vec::new();
        let name = format!("b{}-g{generation}", std::process::id());
        let mut dirs: Vec<(PathBuf, Option<u64>, Option<u64>)> = Vec::new();
        let mem = memory.and(self.memory.as_ref());
        let pid = pids.and(self.pids.as_ref());
        match (mem, pid) {
            (Some(m), Some(p)) if m == p => dirs.push((m.join(&name), memory, pids)),
            (m, p) => {
                if let Some(m) = m {
                    dirs.push((m.join(&name), memory, None));
                }
                if let Some(p) = p {
                    dirs.push((p.join(&name), None, pids));
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
            if let Some(bytes) = memory {
                let bytes = bytes.to_string();
                if self.v2 {
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
            if let Some(max) = pids {
                write("pids.max", max.to_string())?;
            }
            let procs = dir.join("cgroup.procs");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&procs)
                .map_err(|e| cg_err(&procs, e))?;
            cgroup_procs.push(OwnedFd::from(f));
        }
        Ok(cgroup_procs)
    }
}

fn cg_err(path: &Path, e: std::io::Error) -> Error {
    Error::Io {
        context: format!("sandbox: cannot set up the cgroup {}", path.display()),
        source: e,
    }
}

/// A process's cgroups: read when it exits (was it the memory limit?), removed afterwards.
#[derive(Debug)]
pub(super) struct Cell {
    /// The cgroups made, removed when the process is gone.
    pub(super) dirs: Vec<PathBuf>,
    /// The one whose memory events tell whether the limit killed the process.
    pub(super) memory_dir: Option<PathBuf>,
    memory: Memory,
    v2: bool,
}

impl Cell {
    /// No cgroups yet, for a process limited to `memory` on cgroup v2 or not.
    pub(super) fn new(memory: Memory, v2: bool) -> Self {
        Self {
            dirs: Vec::new(),
            memory_dir: None,
            memory,
            v2,
        }
    }
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
