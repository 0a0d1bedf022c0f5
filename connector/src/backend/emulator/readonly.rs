//! The task root mounted read-only for the function, as `/var/task` is on Lambda, so a plugin
//! that writes into its own directory fails here with Lambda's own error (`[Errno 30]
//! Read-only file system`), whatever user the connector runs as (file modes do not stop root).
//!
//! The function's process gets a mount namespace of its own (a user namespace too when the
//! connector is not root) in which the task root is a read-only bind mount of itself. Hosts
//! that allow neither fall back to read-only file modes, and the writes fail with `Permission
//! denied` instead ([`available`] says which applies).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statvfs::{FsFlags, statvfs};

/// What the child needs, prepared before `fork` (nothing is allocated after it).
pub struct Prepared {
    task: CString,
    layer: Option<CString>,
    root: bool,
    uid_map: CString,
    gid_map: CString,
}

impl Prepared {
    /// For the task root `task`.
    pub fn new(task: &Path) -> Self {
        let uid = nix::unistd::geteuid();
        let gid = nix::unistd::getegid();
        Self {
            task: CString::new(task.as_os_str().as_bytes()).unwrap_or_default(),
            layer: None,
            root: uid.is_root(),
            uid_map: CString::new(format!("{uid} {uid} 1")).expect("no NUL"),
            gid_map: CString::new(format!("{gid} {gid} 1")).expect("no NUL"),
        }
    }

    /// The SDK layer directory (shared by every function of that layer) read-only too.
    pub fn with_layer(mut self, layer: Option<&Path>) -> Self {
        self.layer = layer.and_then(|l| CString::new(l.as_os_str().as_bytes()).ok());
        self
    }

    /// Enters a new mount namespace where the task root (and the layer) is read-only. Runs in the child
    /// between `fork` and `exec` (only system calls, nothing allocated).
    pub fn enter(&self) -> std::io::Result<()> {
        let err = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
        if self.root {
            unshare(CloneFlags::CLONE_NEWNS).map_err(err)?;
        } else {
            unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(err)?;
            write(c"/proc/self/setgroups", c"deny")?;
            write(c"/proc/self/uid_map", &self.uid_map)?;
            write(c"/proc/self/gid_map", &self.gid_map)?;
        }
        // Nothing done here may propagate back to the host's mounts.
        mount(
            None::<&std::ffi::CStr>,
            c"/",
            None::<&std::ffi::CStr>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&std::ffi::CStr>,
        )
        .map_err(err)?;
        bind_readonly(self.task.as_c_str())?;
        if let Some(layer) = &self.layer {
            bind_readonly(layer.as_c_str())?;
        }
        Ok(())
    }
}

/// Bind-mounts `dir` onto itself read-only (in the current mount namespace).
fn bind_readonly(dir: &std::ffi::CStr) -> std::io::Result<()> {
    let err = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    mount(
        Some(dir),
        dir,
        None::<&std::ffi::CStr>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&std::ffi::CStr>,
    )
    .map_err(err)?;
    // A remount must keep the flags the mount is locked with (in a user namespace).
    let have = statvfs(dir).map_err(err)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (fs, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(fs) {
            flags |= ms;
        }
    }
    mount(
        None::<&std::ffi::CStr>,
        dir,
        None::<&std::ffi::CStr>,
        flags,
        None::<&std::ffi::CStr>,
    )
    .map_err(err)
}

fn write(path: &std::ffi::CStr, text: &std::ffi::CStr) -> std::io::Result<()> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode;
    let err = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let fd = open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty()).map_err(err)?;
    nix::unistd::write(&fd, text.to_bytes()).map_err(err)?;
    Ok(())
}

/// Whether this host lets a child mount its task root read-only: tried once, on a scratch
/// directory, with a child that writes into it (it must fail with `EROFS`).
pub async fn available(scratch: &Path) -> bool {
    let dir = scratch.join(".readonly-probe");
    let _ = std::fs::create_dir_all(&dir);
    let prepared = Prepared::new(&dir);
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        "echo x > \"$1/probe\" 2>/dev/null && exit 3; exit 0",
        "sh",
    ])
    .arg(&dir)
    .env_clear()
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    // SAFETY: `enter` makes system calls only, with what was prepared before the fork.
    unsafe {
        cmd.pre_exec(move || prepared.enter());
    }
    let ok = matches!(cmd.status().await, Ok(s) if s.success());
    let _ = std::fs::remove_dir_all(&dir);
    ok
}
