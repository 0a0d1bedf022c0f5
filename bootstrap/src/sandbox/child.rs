//! The child's side of a sandboxed spawn: what runs between fork and exec ([`enter`]), and the
//! probe that runs the same steps in a child that exits instead ([`probe_once`]).
//!
//! The bootstrap is multi-threaded, so after the fork only async-signal-safe system calls are
//! allowed: no allocation, no locks, no `std` that may take either. Everything the steps need
//! is prepared in the parent, as a [`ChildPlan`] of C strings, fds and numbers (see `plan`);
//! paths built here are built on the stack, errors are a [`Step`] and an errno.

use nix::libc;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};

use super::Mechanism;
use super::relay::relay;
use super::syscall::{FdPath, check, errno, mount, read_only, write_file};

/// A directory bound back read-only.
pub(super) struct Keep {
    /// The directory, bound onto itself.
    pub(super) dst: CString,
    /// Directories to create first, on the tmpfs covering it.
    pub(super) mkdirs: Vec<CString>,
}

/// One spawn's sandbox, as the child applies it: prepared before the fork, since the child
/// may not allocate.
pub(super) struct ChildPlan {
    /// The `cgroup.procs` files to join, opened by the parent.
    pub(super) cgroup_procs: Vec<OwnedFd>,
    /// The user namespace's uid and gid maps, when there is one.
    pub(super) userns: Option<(Vec<u8>, Vec<u8>)>,
    /// PID (and mount) namespaces, a relay and a fresh `/proc`.
    pub(super) namespaces: bool,
    /// The file system read-only, `hides` covered, `keeps` bound back.
    pub(super) mount: bool,
    /// A private `/tmp` and `/dev/shm`.
    pub(super) tmp: bool,
    /// The mount options of `/tmp`'s tmpfs.
    pub(super) tmp_data: CString,
    /// The mount options of `/dev/shm`'s tmpfs.
    pub(super) shm_data: CString,
    /// Directories covered by an empty tmpfs (at most [`MAX_HIDES`]).
    pub(super) hides: Vec<CString>,
    /// Directories bound back read-only (at most [`MAX_KEEPS`]).
    pub(super) keeps: Vec<Keep>,
    /// Re-entered once the mounts are made.
    pub(super) plugin_dir: CString,
    /// Each resource's limit, soft and hard.
    pub(super) rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// `no_new_privs` and an empty capability bounding set.
    pub(super) nnp: bool,
    /// The uid and gid to become.
    pub(super) uid: Option<u32>,
}

/// Which step of [`enter`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Step {
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

    /// What the step does, for the error naming it.
    pub(super) fn what(self) -> &'static str {
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

    /// The mechanism lost when it fails.
    pub(super) fn mechanism(self) -> Mechanism {
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

pub(super) type StepResult = Result<(), (Step, i32)>;

/// Directories hidden at most (the operator's, and those the plugin's uid cannot traverse).
pub(super) const MAX_HIDES: usize = 16;

/// Directories bound back at most (the plugin, its venv, its interpreter, `PYTHONPATH`).
const MAX_KEEPS: usize = 16;

/// Applies the sandbox to the calling (forked) process; on success the caller execs the
/// plugin. With namespaces it forks once more and only the grandchild returns.
pub(super) fn enter(p: &ChildPlan) -> StepResult {
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
pub(super) fn probe_once(p: &ChildPlan) -> Result<(), (Step, i32)> {
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

    #[test]
    fn probe_steps_decode() {
        for s in Step::ALL {
            assert_eq!(Step::ALL.iter().find(|x| **x as i32 == s as i32), Some(&s));
        }
    }
}
