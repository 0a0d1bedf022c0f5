//! What the fuzz targets share: a counting allocator (so a target can assert a memory bound,
//! not only the absence of panics), a way to cut an input into the arbitrary pieces a network
//! delivers, and a current-thread runtime for the async readers.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting live bytes and their peak.
pub struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        p
    }
}

fn grow(n: usize) {
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it held live at once on top of what was
/// live before (single-threaded targets: nothing else allocates meanwhile).
pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// How many bytes at the front of an input steer a target (cap, flags, piece sizes) rather
/// than being parsed, so that seeds are real wire bytes behind a fixed-size header.
pub const CONTROL: usize = 16;

/// The steering part of an input.
#[derive(Debug, Clone, Copy)]
pub struct Control<'a> {
    /// A cap for the target to use (`0` means the target's large default).
    pub cap: u16,
    /// Target-specific switches.
    pub flags: u8,
    /// Piece sizes for [`pieces`].
    pub sizes: &'a [u8],
}

/// Splits an input into its [`Control`] header (zeros when the input is shorter) and the bytes
/// to parse.
pub fn split(data: &[u8]) -> (Control<'_>, &[u8]) {
    static ZEROS: [u8; CONTROL] = [0; CONTROL];
    let (head, rest) = if data.len() >= CONTROL {
        data.split_at(CONTROL)
    } else {
        (&ZEROS[..], data)
    };
    let control = Control {
        cap: u16::from_le_bytes([head[0], head[1]]),
        flags: head[2],
        sizes: &head[3..],
    };
    (control, rest)
}

/// Cuts `data` into pieces whose sizes come from `sizes` (cycled; a zero means 255 bytes), as a
/// network would deliver it.
pub fn pieces<'a>(data: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(255);
        let n = usize::from(if n == 0 { 255 } else { n }).min(rest.len());
        let (head, tail) = rest.split_at(n);
        out.push(head);
        rest = tail;
        i += 1;
    }
    out
}

/// A current-thread runtime with I/O and time, for one target's process.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}
