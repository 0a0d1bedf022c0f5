//! `BENCHMARKS.md` is shared by the benchmarks (`tests/examples/bench*.rs`): each one rewrites
//! only its own section, the text between `<!-- bench:NAME:begin -->` and
//! `<!-- bench:NAME:end -->`, and leaves everything else in the file as it was.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::root;
use std::path::Path;

fn markers(name: &str) -> (String, String) {
    (
        format!("<!-- bench:{name}:begin -->"),
        format!("<!-- bench:{name}:end -->"),
    )
}

/// `doc` with section `name` set to `body`. A section that is absent is appended at the end;
/// a section with only one of its markers, or with them out of order, is an error (nothing is
/// guessed).
pub fn replace_section(doc: &str, name: &str, body: &str) -> Result<String, String> {
    let (begin, end) = markers(name);
    // Blank lines around the body: the markers are HTML blocks of their own in Markdown.
    let section = format!("{begin}\n\n{}\n\n{end}", body.trim_matches('\n'));
    match (doc.find(&begin), doc.find(&end)) {
        (Some(b), Some(e)) if b < e => {
            Ok(format!("{}{section}{}", &doc[..b], &doc[e + end.len()..]))
        }
        (None, None) => {
            let mut out = doc.trim_end().to_owned();
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(&section);
            out.push('\n');
            Ok(out)
        }
        _ => Err(format!(
            "the markers of section `{name}` are broken (want `{begin}` … `{end}`, once each, in \
             this order); fix them by hand"
        )),
    }
}

/// Rewrites section `name` of the file at `path` (created when missing), atomically.
pub fn write_section(path: &Path, name: &str, body: &str) -> std::io::Result<()> {
    let doc = match std::fs::read_to_string(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let new = replace_section(&doc, name, body)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    let tmp = path.with_extension(format!("md.tmp-{}", std::process::id()));
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, path)
}

// Helpers both benches use.

/// Shared by the benches.
pub fn cmd_out(prog: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Option<String> {
    let out = Command::new(prog).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !text.is_empty()).then_some(text)
}

/// Shared by the benches.
pub fn dify_plugin_version() -> String {
    let lib = root().join(".venv/py312/lib");
    std::fs::read_dir(&lib)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|py| std::fs::read_dir(py.ok()?.path().join("site-packages")).ok())
        .and_then(|entries| {
            entries.filter_map(Result::ok).find_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix("dify_plugin-")?
                    .strip_suffix(".dist-info")
                    .map(str::to_owned)
            })
        })
        .unwrap_or_else(|| "?".into())
}

/// Shared by the benches.
pub fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Shared by the benches.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The lines every bench's section starts with: the command, when, on what, under what load.
pub fn run_lines(
    command: &str,
    date: &str,
    elapsed: Duration,
    load_start: &str,
    load_end: &str,
) -> String {
    format!(
        "- command: `{command}`\n- date: {date}; whole run {:.0} s\n- machine: {}\n\
         - load average (1/5/15 min): {load_start} at start, {load_end} at end\n",
        elapsed.as_secs_f64(),
        machine().join(", ")
    )
}

/// Shared by the benches.
pub fn machine() -> Vec<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map_or("?".into(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    vec![
        format!("nproc {nproc}"),
        format!("CPU {cpu}"),
        format!("RAM {mem}"),
        format!("Linux {kernel}"),
    ]
}

/// Shared by the benches.
pub fn median(v: &[f64]) -> f64 {
    pct(v, 0.5)
}

/// Shared by the benches.
pub fn mib(kib: Option<u64>) -> String {
    kib.map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// Shared by the benches.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of `v` (sorted here).
pub fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Shared by the benches.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None; // exited, not reaped yet
    }
    fields.get(19)?.parse().ok() // field 22 of stat: starttime
}

/// `field` (`"VmRSS:"`, `"VmHWM:"`…) of process `pid` (or `"self"`), in KiB, from
/// `/proc/PID/status`; panics naming what is missing.
pub fn status_kib(pid: impl std::fmt::Display, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    s.lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Shared by the benches.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// `target/release/bootstrap`, which `make bench` builds before running the benches.
pub fn release_bootstrap() -> PathBuf {
    let release = target_dir().join("release/bootstrap");
    assert!(
        release.exists(),
        "{} is missing: `make bench` builds it (cargo build --release -p sri-bootstrap)",
        release.display()
    );
    release
}

/// Shared by the benches.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(8)
        .build()
        .expect("client")
}

/// Processes a bench started, by pid and start time.
static LIVE: std::sync::Mutex<Vec<(u32, u64)>> = std::sync::Mutex::new(Vec::new());

/// Remembers a started process, to be stopped if the bench fails.
pub fn track(pid: u32) {
    if let Some(t) = start_time(pid) {
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((pid, t));
    }
}

/// Installs a panic hook that stops every tracked process (SIGTERM, then SIGKILL after 3 s).
pub fn install_cleanup(bench: &'static str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        let pids = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ours = |(pid, t): &(u32, u64)| start_time(*pid) == Some(*t);
        let live: Vec<_> = pids.iter().filter(|p| ours(p)).collect();
        eprintln!(
            "{bench} failed: stopping the {} processes it started",
            live.len()
        );
        for (pid, _) in &live {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && live.iter().any(|p| ours(p)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        for p in live.iter().filter(|p| ours(p)) {
            let _ = kill(Pid::from_raw(p.0 as i32), Signal::SIGKILL);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_created_then_replaced_alone() {
        let doc = replace_section("", "a", "# A\n\nfirst").unwrap();
        assert_eq!(
            doc,
            "<!-- bench:a:begin -->\n\n# A\n\nfirst\n\n<!-- bench:a:end -->\n"
        );
        let doc = replace_section(&doc, "b", "## B\n").unwrap();
        let doc = replace_section(&doc, "a", "# A\n\nsecond\n").unwrap();
        assert_eq!(
            doc,
            "<!-- bench:a:begin -->\n\n# A\n\nsecond\n\n<!-- bench:a:end -->\n\n\
             <!-- bench:b:begin -->\n\n## B\n\n<!-- bench:b:end -->\n"
        );
        // Text outside the markers is kept as it is.
        let framed = format!("intro\n{doc}outro\n");
        let out = replace_section(&framed, "b", "## B2").unwrap();
        assert!(out.starts_with("intro\n<!-- bench:a:begin -->"));
        assert!(out.ends_with("## B2\n\n<!-- bench:b:end -->\noutro\n"));
        assert!(out.contains("second"));
    }

    #[test]
    fn broken_markers_are_refused() {
        assert!(replace_section("<!-- bench:a:end -->\n<!-- bench:a:begin -->", "a", "x").is_err());
        assert!(replace_section("<!-- bench:a:begin -->\n", "a", "x").is_err());
    }
}
