//! Running a helper program on a package's behalf (uv, pip, an interpreter probe, compileall),
//! the one way both the local backend and the Lambda packaging do it.
//!
//! Why one place: such a program reads input the package controls, may run package code (an
//! sdist's build), and prints text that ends up in the daemon's launch stream. So every run
//!
//! - starts from a cleared environment plus an allowlist ([`ALLOWED`]: `PATH`, locale, proxy, CA,
//!   and the installers' own `UV_*` / `PIP_*` settings), with a scratch `HOME` and working
//!   directory of its own: the connector's secrets (API key, signing keys, AWS credentials)
//!   are never in a child's environment, and no user or project configuration of the
//!   connector's account or working directory is picked up by accident;
//! - runs in its own process group, killed as a whole when the run ends, times out, or its
//!   future is dropped (a cancelled launch leaves no orphans behind);
//! - has its output captured bounded (the last [`CAPTURE_BYTES`] of each stream) and, for
//!   messages, trimmed to [`MESSAGE_BYTES`] and redacted ([`redact`]).

use std::ffi::{OsStr, OsString};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

use crate::Error;

/// The default limit on one dependency install (a cold install of a large plugin downloads a
/// lot; 15 minutes is far above what real plugins need).
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);

/// How much of each output stream is kept (the tail).
pub const CAPTURE_BYTES: usize = 64 * 1024;

/// How much output a message carries at most (the tail).
pub const MESSAGE_BYTES: usize = 4 * 1024;

/// Variables a child inherits from the connector (exact names); `LC_*`, `UV_*` and `PIP_*` are
/// inherited too: they are the operator's installer configuration.
pub const ALLOWED: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    // Proxies.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    // CA bundles.
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    // Index credentials the operator keeps out of URLs.
    "NETRC",
];

fn allowed(name: &str) -> bool {
    ALLOWED.contains(&name)
        || name.starts_with("LC_")
        || name.starts_with("UV_")
        || name.starts_with("PIP_")
}

/// A command for `program` with the environment already reduced to the allowlist; add
/// arguments and variables, then [`run`] it. uv's and pip's download caches default to the
/// connector account's usual ones (shared across builds, as before), since `HOME` will be a
/// scratch directory.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(allowed) {
            cmd.env(k, v);
        }
    }
    if let Some(cache) = user_cache_dir() {
        if std::env::var_os("UV_CACHE_DIR").is_none() {
            cmd.env("UV_CACHE_DIR", cache.join("uv"));
        }
        if std::env::var_os("PIP_CACHE_DIR").is_none() {
            cmd.env("PIP_CACHE_DIR", cache.join("pip"));
        }
    }
    cmd
}

/// Variables of the connector's environment that a function's own processes (its bootstrap,
/// the emulator) inherit, with `LC_*`: never the connector's secrets.
pub const FUNCTION_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "TZ",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "RUST_LOG",
];

/// A command for one of a function's processes, its environment reduced to [`FUNCTION_ENV`]
/// and the names in `extra`.
pub fn function_command(program: impl AsRef<OsStr>, extra: &[&str]) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear();
    for (k, v) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if FUNCTION_ENV.contains(&name.as_ref())
            || extra.contains(&name.as_ref())
            || name.starts_with("LC_")
        {
            cmd.env(&k, v);
        }
    }
    cmd
}

/// Points uv or pip at the operator's package index (`SRI_INDEX_URL`). Through their variables
/// rather than arguments, so that credentials in the URL are not on a command line every local
/// user can read; `UV_DEFAULT_INDEX` too, since it wins over `UV_INDEX_URL`.
pub fn index(cmd: &mut Command, url: &str) {
    for var in ["UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"] {
        cmd.env(var, url);
    }
}

/// `$XDG_CACHE_HOME`, else `$HOME/.cache`.
fn user_cache_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })
}

/// What a finished child left.
#[derive(Debug)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// The tail of its stdout (at most [`CAPTURE_BYTES`]), not redacted.
    pub stdout: String,
    /// The tail of its stderr (at most [`CAPTURE_BYTES`]), not redacted.
    pub stderr: String,
}

impl Output {
    /// The end of what it printed (stderr, else stdout), redacted, at most [`MESSAGE_BYTES`]:
    /// what may go into an error the daemon sees.
    pub fn message(&self) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        tail(&redact(text), MESSAGE_BYTES).trim().to_owned()
    }
}

/// Runs `cmd` (made by [`command`]) to completion within `limit`: stdin closed, a scratch `HOME`
/// (and working directory, unless `cmd` has one) created under `scratch`, removed afterwards, in a process group of its
/// own that is killed once it exits, times out, or this future is dropped. `fail` makes the
/// error (the caller's variant); `what` names the step in it.
pub async fn run(
    mut cmd: Command,
    what: &str,
    limit: Duration,
    scratch: &Path,
    fail: fn(String) -> Error,
) -> Result<Output, Error> {
    let home = Scratch::new(scratch).map_err(|e| {
        fail(format!(
            "{what}: cannot create a scratch directory in {}: {e}",
            scratch.display()
        ))
    })?;
    cmd.env("HOME", &home.0);
    if cmd.as_std().get_current_dir().is_none() {
        // Never the connector's own directory: no project configuration is found by accident.
        cmd.current_dir(&home.0);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("{what}: cannot run {program}: {e}")))?;
    let group = Group(child.id().map(|p| p as i32));
    let out = tokio::spawn(read_tail(child.stdout.take().expect("piped")));
    let err = tokio::spawn(read_tail(child.stderr.take().expect("piped")));
    let waited = tokio::time::timeout(limit, child.wait()).await;
    // Whatever happened, nothing it started outlives it (and holds its pipes open).
    drop(group);
    let status = match waited {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(fail(format!("{what}: waiting for {program}: {e}"))),
        Err(_) => {
            return Err(fail(format!(
                "{what} did not finish within {} s and was stopped (for installs, raise \
                 SRI_INSTALL_TIMEOUT_SECS)",
                limit.as_secs()
            )));
        }
    };
    let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
        // A process that left the group could keep a pipe open: bounded.
        match tokio::time::timeout(Duration::from_secs(5), h).await {
            Ok(Ok(b)) => String::from_utf8_lossy(&b).into_owned(),
            _ => String::new(),
        }
    };
    let (stdout, stderr) = tokio::join!(collect(out), collect(err));
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// A failed run's error: `what failed (status): output`.
pub fn failure(what: &str, out: &Output) -> String {
    let status = match out.status.code() {
        Some(c) => format!("exit status {c}"),
        None => format!("signal {}", out.status.signal().unwrap_or_default()),
    };
    format!("{what} failed ({status}): {}", out.message())
}

/// Kills a process group when dropped.
struct Group(Option<i32>);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A private directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(parent: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(parent)?;
        let dir = parent.join(format!(
            ".home-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads `r` to its end, keeping the last [`CAPTURE_BYTES`].
async fn read_tail(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > 2 * CAPTURE_BYTES {
            kept.drain(..kept.len() - CAPTURE_BYTES);
        }
    }
    if kept.len() > CAPTURE_BYTES {
        kept.drain(..kept.len() - CAPTURE_BYTES);
    }
    kept
}

/// The last `max` bytes of `s` (on a character boundary), marked when cut.
fn tail(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// Variables whose values are plain paths or settings, left readable in messages.
const NOT_SECRET: &[&str] = &[
    "PATH",
    "HOME",
    "PWD",
    "OLDPWD",
    "TMPDIR",
    "SHELL",
    "TERM",
    "USER",
    "LOGNAME",
    "LANG",
    "TZ",
    "SRI_PYTHON",
    "SRI_UV",
    "SRI_DATA_DIR",
    "SRI_CACHE_DIR",
    "SRI_WHEELHOUSE",
    "SRI_BOOTSTRAP_BIN",
];

/// `text` with every value of the connector's environment (but plain paths and short values)
/// and the credentials of URLs (`scheme://user:pass@host`) replaced by `[redacted]`.
pub fn redact(text: &str) -> String {
    let mut out = redact_userinfo(text);
    let mut values: Vec<OsString> = std::env::vars_os()
        .filter(|(k, v)| {
            let k = k.to_string_lossy();
            v.len() >= 6
                && !NOT_SECRET.contains(&k.as_ref())
                && !k.starts_with("LC_")
                && !k.starts_with("XDG_")
        })
        .map(|(_, v)| v)
        .collect();
    // Longest first, so a value containing another is replaced whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    for v in values {
        if let Some(v) = v.to_str()
            && out.contains(v)
        {
            out = out.replace(v, "[redacted]");
        }
    }
    out
}

fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c.is_whitespace() || c == '/' || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..end].rfind('@') {
            Some(at) => {
                out.push_str("[redacted]");
                out.push_str(&tail[at..end]);
            }
            None => out.push_str(&tail[..end]),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> PathBuf {
        std::env::temp_dir().join(format!("sri-child-test-{}", std::process::id()))
    }

    fn sh(script: &str) -> Command {
        let mut c = command("/bin/sh");
        c.args(["-c", script]);
        c
    }

    fn err(s: String) -> Error {
        Error::Backend(s)
    }

    /// The child sees the allowlist, a scratch HOME and working directory, nothing else of the
    /// connector's environment (cargo sets CARGO_* variables for the test process).
    #[tokio::test]
    async fn children_get_a_cleared_environment_and_a_scratch_home() {
        assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
        let mut cmd = sh("env; echo cwd=$(pwd)");
        index(&mut cmd, "https://idx.example/simple");
        let out = run(cmd, "env", Duration::from_secs(30), &scratch(), err)
            .await
            .unwrap();
        assert!(out.status.success());
        let home = out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("HOME="))
            .expect("HOME set")
            .to_owned();
        assert!(home.contains(".home-"), "{home}");
        assert!(
            out.stdout.contains(&format!("cwd={home}")),
            "{}",
            out.stdout
        );
        for line in out.stdout.lines().filter(|l| !l.starts_with("cwd=")) {
            let name = line.split('=').next().unwrap();
            assert!(
                allowed(name)
                    || ["HOME", "PWD", "SHLVL", "_", "UV_CACHE_DIR", "PIP_CACHE_DIR"]
                        .contains(&name),
                "{name} leaked into the child: {line}"
            );
        }
        assert!(!Path::new(&home).exists(), "scratch HOME removed");
        for var in ["UV_DEFAULT_INDEX", "UV_INDEX_URL", "PIP_INDEX_URL"] {
            assert!(
                out.stdout
                    .contains(&format!("{var}=https://idx.example/simple\n")),
                "{var}: {}",
                out.stdout
            );
        }
    }

    /// A timeout kills the whole group: a grandchild in the background dies too.
    #[tokio::test]
    async fn a_timeout_kills_the_whole_process_group() {
        let pidfile = scratch().join("grandchild.pid");
        std::fs::create_dir_all(scratch()).unwrap();
        let script = format!("sleep 300 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let e = run(
            sh(&script),
            "sleeping",
            Duration::from_secs(2),
            &scratch(),
            err,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("did not finish within 2 s"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_gone(pid, |stat| {
            format!("the grandchild {pid} outlived the timeout: {stat}")
        })
        .await;
    }

    /// Waits up to 10 s for `pid` to be dead (or a zombie about to be reaped by init: kill(0)
    /// succeeds on one, /proc says `Z`); past that, fails with `outlived(its stat)`.
    async fn wait_gone(pid: i32, outlived: impl Fn(&str) -> String) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit(')').next().unwrap_or("").trim().chars().next();
            if stat.is_empty() || state == Some('Z') {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{}", outlived(&stat));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Dropping the run (a cancelled launch) kills the group as well.
    #[tokio::test]
    async fn cancelling_a_run_kills_the_group() {
        std::fs::create_dir_all(scratch()).unwrap();
        let pidfile = scratch().join("cancel.pid");
        let script = format!("echo $$ > {}; sleep 300", pidfile.display());
        let dir = scratch();
        let fut = run(sh(&script), "sleeping", Duration::from_secs(300), &dir, err);
        let pid_path = pidfile.clone();
        let waited = tokio::time::timeout(Duration::from_secs(10), async move {
            tokio::pin!(fut);
            loop {
                tokio::select! {
                    _ = &mut fut => panic!("finished"),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {
                        if std::fs::read_to_string(&pid_path).is_ok_and(|s| s.ends_with('\n')) {
                            return;
                        }
                    }
                }
            }
        })
        .await;
        assert!(waited.is_ok(), "the child never started");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        wait_gone(pid, |_| format!("{pid} outlived the dropped run")).await;
    }

    #[tokio::test]
    async fn output_is_bounded_and_messages_are_redacted() {
        let out = run(
            sh("head -c 1000000 /dev/zero | tr '\\0' x; echo; echo 'see https://user:tok3n@idx.example/simple' >&2; exit 3"),
            "printing",
            Duration::from_secs(30),
            &scratch(),
            err,
        )
        .await
        .unwrap();
        assert!(out.stdout.len() <= CAPTURE_BYTES, "{}", out.stdout.len());
        let m = failure("printing", &out);
        assert!(m.starts_with("printing failed (exit status 3): "), "{m}");
        assert!(m.contains("https://[redacted]@idx.example/simple"), "{m}");
        assert!(!m.contains("tok3n"), "{m}");
        let only_stdout = Output {
            status: out.status,
            stdout: out.stdout.clone(),
            stderr: String::new(),
        };
        assert!(only_stdout.message().len() <= MESSAGE_BYTES + 4);
        // A value of the connector's environment (cargo's, here) never reaches a message.
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        assert!(!redact(&format!("at {dir}/x")).contains(&dir));
    }
}
