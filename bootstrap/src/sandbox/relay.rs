//! The relay: with a PID namespace, the forked child forks once more and stays outside the
//! namespace, as the plugin's parent, only to pass its exit status on and to end it with the
//! bootstrap. It never execs, so, like the rest of the child's side, it makes async-signal-safe
//! system calls only (its SIGTERM handler too).

use nix::libc;

use super::syscall::errno;

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
pub(super) fn relay(child: libc::pid_t, alive: i32) -> ! {
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
