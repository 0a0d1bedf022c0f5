//! Keeps a runtime's secrets out of reach of the code it runs (plugins run as the same user).
//!
//! Both binaries call [`seal`] first thing in `main`: the process becomes non-dumpable, so no
//! other process of its user can read its memory (`/proc/<pid>/mem`), its environment
//! (`/proc/<pid>/environ`) or ptrace it; and the secret variables' values are wiped from the
//! initial environment block. That wipe matters because `/proc/<pid>/environ` shows that block
//! (the memory between the kernel's `env_start` and `env_end`), not the live environment:
//! `remove_var` alone takes a variable out of the process's environment but leaves its bytes
//! readable there. After the options are parsed, [`forget`] removes the variables, so no child
//! ever inherits them; the values stay available to the process through [`secret`].
//!
//! Root with `CAP_SYS_PTRACE` reads non-dumpable processes all the same: the bootstrap drops
//! that capability from the plugin's bounding set when it starts it.

use std::collections::HashMap;
use std::ffi::{CStr, c_char};
use std::sync::OnceLock;

/// The variables that hold secrets: signing keys, the connector's API key, AWS credentials.
pub const SECRET_ENV: &[&str] = &[
    "SRI_SIGNING_KEYS",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "SRI_ENDPOINT_SECRET",
];

static TAKEN: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
static EXTRA: OnceLock<&'static [&'static str]> = OnceLock::new();

/// Makes the process non-dumpable and wipes the values of the secret variables ([`SECRET_ENV`]
/// and `extra`, e.g. the bootstrap's `AWS_LAMBDA_RUNTIME_API`) from the initial environment
/// block, keeping them in the environment (as fresh copies) until [`forget`], so that option
/// parsing still finds them.
///
/// # Safety
/// Must be called before any other thread exists (first thing in `main`): it changes the
/// environment, which another thread reading it at the same time could see freed.
pub unsafe fn seal(extra: &'static [&'static str]) -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(false).map_err(std::io::Error::from)?;
    let _ = EXTRA.set(extra);
    let mut taken = HashMap::new();
    for name in SECRET_ENV.iter().chain(extra) {
        if let Some(value) = std::env::var_os(name) {
            taken.insert(*name, value.to_string_lossy().into_owned());
        }
    }
    // SAFETY: single-threaded (the caller's contract); see `wipe_values`.
    unsafe { wipe_values(SECRET_ENV) };
    unsafe { wipe_values(extra) };
    for (name, value) in &taken {
        // SAFETY: single-threaded (the caller's contract). The new copy lives on the heap,
        // outside the block `/proc/<pid>/environ` shows; non-dumpable keeps the heap private.
        unsafe { std::env::set_var(name, value) };
    }
    let _ = TAKEN.set(taken);
    Ok(())
}

/// Removes the secret variables from the environment: nothing started from now on inherits
/// them. Their values stay available through [`secret`].
///
/// # Safety
/// Must be called before any other thread exists (see [`seal`]).
pub unsafe fn forget() {
    for name in SECRET_ENV
        .iter()
        .chain(EXTRA.get().copied().unwrap_or_default())
    {
        // SAFETY: single-threaded (the caller's contract).
        unsafe { std::env::remove_var(name) };
    }
}

/// A secret variable's value as it was when [`seal`] ran.
pub fn secret(name: &str) -> Option<&'static str> {
    TAKEN.get()?.get(name).map(String::as_str)
}

/// Overwrites with NUL bytes the values of `names` where the environment holds them now (at
/// start, the initial block on the stack).
///
/// # Safety
/// No other thread may use the environment meanwhile.
unsafe fn wipe_values(names: &[&str]) {
    unsafe extern "C" {
        static mut environ: *mut *mut c_char;
    }
    // SAFETY: `environ` is libc's NULL-terminated array of NUL-terminated `NAME=VALUE`
    // strings, all writable (the initial ones live on the process's stack); nothing else
    // touches it meanwhile (the caller's contract). Only bytes before each NUL are written.
    unsafe {
        let mut entry = environ;
        if entry.is_null() {
            return;
        }
        while !(*entry).is_null() {
            let text = CStr::from_ptr(*entry).to_bytes();
            if let Some(eq) = text.iter().position(|&b| b == b'=')
                && names.iter().any(|n| n.as_bytes() == &text[..eq])
            {
                let len = text.len();
                std::ptr::write_bytes((*entry).add(eq + 1), 0, len - eq - 1);
            }
            entry = entry.add(1);
        }
    }
}
