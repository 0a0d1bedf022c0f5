//! Never be the plugin's parent as PID 1.
//!
//! The Python SDK kills itself when its parent PID is 1 (it takes that to mean its real parent
//! died). In a container the bootstrap may well be PID 1, so it then forks: the parent stays
//! PID 1 as a minimal init (forwards signals, reaps orphans, exits with the child's status)
//! and the child runs the bootstrap, so the plugin's parent is never PID 1.

use nix::sys::signal::{self, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid};
use std::sync::atomic::{AtomicI32, Ordering};

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0
        && let Ok(sig) = Signal::try_from(sig)
    {
        let _ = signal::kill(Pid::from_raw(child), sig);
    }
}

#[allow(non_camel_case_types)]
type libc_int = std::os::raw::c_int;

/// Returns in the process that should run the bootstrap. When this process is PID 1 it forks
/// first and never returns in the parent. Must be called before any thread is started.
pub fn become_child_of_init() -> std::io::Result<()> {
    if getpid().as_raw() != 1 {
        return Ok(());
    }
    // SAFETY: called from `main` before the async runtime or any other thread exists.
    match unsafe { fork() }.map_err(std::io::Error::from)? {
        ForkResult::Child => Ok(()),
        ForkResult::Parent { child } => {
            CHILD.store(child.as_raw(), Ordering::Relaxed);
            let action = SigAction::new(
                SigHandler::Handler(forward),
                SaFlags::SA_RESTART,
                SigSet::empty(),
            );
            for sig in [
                Signal::SIGTERM,
                Signal::SIGINT,
                Signal::SIGHUP,
                Signal::SIGQUIT,
                Signal::SIGUSR1,
                Signal::SIGUSR2,
            ] {
                // SAFETY: the handler only reads an atomic and calls kill(2), both
                // async-signal-safe.
                let _ = unsafe { signal::sigaction(sig, &action) };
            }
            reap(child)
        }
    }
}

fn reap(child: Pid) -> ! {
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == child => {
                std::process::exit(128 + sig as i32)
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => std::process::exit(1),
        }
    }
}
