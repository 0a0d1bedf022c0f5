//! Thin wrappers over the raw system calls [`enter`](super::child::enter) makes, some with no
//! wrapper in `libc` (`mount_setattr`). They run between fork and exec: async-signal-safe
//! calls only, no allocation (a path is built on the stack), errors as a step and an errno.

use nix::libc;

use super::child::{Step, StepResult};

/// `/proc/self/fd/<fd>` as a C string, built on the stack (no allocation after fork).
pub(super) struct FdPath([u8; 32]);

impl FdPath {
    pub(super) fn new(fd: i32) -> Self {
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

    pub(super) fn as_ptr(&self) -> *const libc::c_char {
        self.0.as_ptr().cast()
    }
}

/// The calling thread's errno (read without allocating).
pub(super) fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// A system call's negative return as `step`'s failure.
pub(super) fn check(rc: libc::c_long, step: Step) -> StepResult {
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
pub(super) unsafe fn read_only(path: &std::ffi::CStr, step: Step) -> StepResult {
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

/// Writes `data` to the file at `path` in one `write`, as `/proc` files want.
pub(super) unsafe fn write_file(path: &std::ffi::CStr, data: &[u8], step: Step) -> StepResult {
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

/// `mount(2)`, its failure as `step`'s.
pub(super) unsafe fn mount(
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
