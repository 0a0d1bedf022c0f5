//! Hostile callers against the real binaries: `sri serve` (local backend, the sample plugin on
//! the real SDK) and `bootstrap serve`. Whoever reaches the port without the daemon's
//! capability endpoint or API key gets nothing, learns nothing, and cannot hold connections,
//! memory or metrics series; and stopping `sri serve` leaves no process of it behind.

use harness::benchmarks::status_kib;
use harness::godaemon::GoDaemon;
use harness::sri::{API_KEY, Connector, ConnectorOptions, TempDir, sri_bin};
use harness::{
    Bootstrap, Options, SECRET_A, envelope, invoke_stream, keys_env, plugin_dir, session_id,
    signer, tool_data,
};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Per-launch budget (the daemon's own default is 240 s).
const LAUNCH_BUDGET: Duration = Duration::from_secs(180);
/// The demo key the sample plugin accepts.
const DEMO_KEY: &str = "sri-demo-key";
/// Slow connections opened against each listener.
const SLOW_CONNECTIONS: usize = 2000;

fn daemon(c: &Connector) -> GoDaemon {
    c.daemon()
        .with_launch_timeout(LAUNCH_BUDGET)
        .with_execution_timeout(Duration::from_secs(120))
}

/// Launches the sample plugin as the daemon does: its function name and endpoint.
async fn launch_sample(c: &Connector, d: &GoDaemon) -> (String, String) {
    let pkg = harness::difypkg::Package::from_dir(&plugin_dir("sample"));
    let o = d
        .launch_package(&pkg, false)
        .await
        .unwrap_or_else(|e| panic!("launch refused: {e}\n{}", c.log_tail(40)));
    o.installed.clone().unwrap_or_else(|| {
        panic!(
            "not installed: {:?}\n{}\n{}",
            o.install_errors,
            o.transcript(),
            c.log_tail(40)
        )
    })
}

/// An `echo` call through `endpoint` as the daemon makes it; whether it ended well.
async fn echo(d: &GoDaemon, endpoint: &str, text: &str) -> Result<(), String> {
    let sid = session_id("echo");
    let data = tool_data("sample", "echo", json!({"text": text}), Some(DEMO_KEY));
    let o = d
        .invoke(endpoint, "invoke_tool", &envelope(&sid, data), &sid)
        .await;
    if o.status == Some(200) && o.end_received() && o.texts().iter().any(|t| t.contains(text)) {
        Ok(())
    } else {
        Err(o.transcript())
    }
}

/// The listen address `bootstrap serve` of function `name` logged.
fn bootstrap_addr(c: &Connector, name: &str) -> String {
    let log = std::fs::read_to_string(
        c.data_dir()
            .join("functions")
            .join(name)
            .join("bootstrap.log"),
    )
    .expect("bootstrap.log");
    log.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "serving SRI v1")
        .find_map(|v| v["listen"].as_str().map(str::to_owned))
        .expect("a listen line in bootstrap.log")
}

/// Invocations the function itself has seen (its bootstrap's health).
async fn invocations(addr: &str) -> u64 {
    let h: Value = reqwest::get(format!("http://{addr}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    h["invocations"].as_u64().expect("invocations in health")
}

/// Sends `request` as written (no URL normalization) and reads the answer to its end.
async fn raw(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut out))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    (status, text)
}

fn post(addr: SocketAddr, path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn the_gateway_runs_nothing_for_callers_without_the_token() {
    let c = Connector::start();
    let d = daemon(&c);
    let (name, endpoint) = launch_sample(&c, &d).await;
    let boot = bootstrap_addr(&c, &name);
    let token = endpoint.rsplit('/').next().unwrap().to_owned();
    let before = invocations(&boot).await;
    // Tokens for other names made with the connector's own key, and a guess.
    let caps = connector::capability::Capabilities::from_ring(&signer("k1", SECRET_A));
    let other = caps.token("sri-other-plugin-0123456789ab");
    let sid = session_id("hostile");
    let body = String::from_utf8(
        envelope(
            &sid,
            tool_data("sample", "echo", json!({"text": "x"}), Some(DEMO_KEY)),
        )
        .to_vec(),
    )
    .unwrap();
    let mut answers = Vec::new();
    for path in [
        format!("/v1/functions/{name}/invoke"),
        format!("/v1/functions/{name}/{}/invoke", "A".repeat(token.len())),
        format!("/v1/functions/{name}/{other}/invoke"),
        format!("/v1/functions/sri-guessed-plugin-0123456789ab/{token}/invoke"),
        format!("/v1/functions/sri-other-plugin-0123456789ab/{other}/invoke"),
    ] {
        let (status, text) = raw(
            c.addr,
            &post(c.addr, &format!("{path}?action=invoke_tool"), &body),
        )
        .await;
        assert_eq!(status, 404, "{path}: {text}");
        answers.push(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned());
    }
    answers.dedup();
    assert_eq!(answers.len(), 1, "the refusals differ: {answers:?}");
    assert_eq!(
        invocations(&boot).await,
        before,
        "the function was called by a caller without its token"
    );
    assert!(
        c.logs().iter().any(|l| l.contains("token-less endpoint")),
        "the operator is told about calls to a deployed function's pre-token endpoint:\n{}",
        c.log_tail(20)
    );
    // The daemon, with the endpoint it was given, is served.
    echo(&d, &endpoint, "through the capability endpoint")
        .await
        .unwrap_or_else(|t| panic!("{t}\n{}", c.log_tail(30)));
    assert_eq!(invocations(&boot).await, before + 1);
}

/// Runs `sri serve` with `api_key` and returns its exit and stderr (it must exit by itself).
fn serve_with_key(api_key: Option<&str>) -> (std::process::ExitStatus, String) {
    let data = TempDir::new("api-key");
    let mut cmd = std::process::Command::new(sri_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0"])
        .env("SRI_SIGNING_KEYS", keys_env(&[SECRET_A]))
        .env("SRI_DATA_DIR", data.path())
        .env("SRI_BOOTSTRAP_BIN", harness::bootstrap_bin())
        .env_remove("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(k) = api_key {
        cmd.env("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", k);
    }
    let mut child = cmd.spawn().expect("spawn sri");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("sri serve started with API key {api_key:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

#[test]
fn empty_and_short_api_keys_refuse_to_start() {
    for key in [None, Some(""), Some("short-key"), Some("fifteen-bytes!!")] {
        let (status, err) = serve_with_key(key);
        assert!(!status.success(), "{key:?}: {status}");
        assert!(
            err.contains("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY")
                && err.contains("openssl rand -hex 32"),
            "{key:?}: the refusal names the variable and how to make a key: {err}"
        );
        if let Some(k) = key.filter(|k| !k.is_empty()) {
            assert!(!err.contains(k), "the refusal shows the key: {err}");
        }
    }
}

#[tokio::test]
async fn traversal_names_get_400_and_delete_nothing() {
    let c = Connector::start();
    let sentinel = TempDir::new("sentinel");
    std::fs::write(sentinel.path().join("keep"), "x").unwrap();
    let base = sentinel
        .path()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let abs = sentinel.path().to_str().unwrap().replace('/', "%2F");
    for name in [
        "..".to_owned(),
        "%2E%2E".to_owned(),
        format!("..%2F..%2F{base}"),
        format!("%2E%2E%2F%2E%2E%2F{base}"),
        abs,
        "functions%2F..".to_owned(),
    ] {
        let req = format!(
            "DELETE /v1/functions/{name} HTTP/1.1\r\nhost: x\r\nauthorization: {API_KEY}\r\n\
             connection: close\r\n\r\n"
        );
        let (status, text) = raw(c.addr, &req).await;
        assert_eq!(status, 400, "{name}: {text}");
        assert!(text.contains("not a function name"), "{name}: {text}");
    }
    // The gateway's name parameter is checked the same way.
    let (status, text) = raw(
        c.addr,
        &post(
            c.addr,
            "/v1/functions/..%2Fx/tok/invoke?action=invoke_tool",
            "{}",
        ),
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        sentinel.path().join("keep").exists(),
        "the sentinel was deleted"
    );
    assert!(
        c.data_dir().join("functions").is_dir(),
        "the data dir was deleted"
    );
    // The CLI refuses such a name before sending it.
    let out = std::process::Command::new(sri_bin())
        .args(["remove", "../x"])
        .env("SRI_URL", c.url())
        .env("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", API_KEY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a function name"),
        "{err}"
    );
}

#[tokio::test]
async fn junk_actions_keep_the_metrics_bounded_and_rss_flat() {
    let c = Connector::start();
    let d = daemon(&c);
    let (_, endpoint) = launch_sample(&c, &d).await;
    let http = reqwest::Client::new();
    let sid = session_id("junk");
    let body = envelope(
        &sid,
        tool_data("sample", "echo", json!({"text": "x"}), Some(DEMO_KEY)),
    );
    let pid = c.pid().unwrap();
    let mut rss_after_warmup = 0;
    let started = Instant::now();
    for round in 0..10 {
        let calls = (0..1000).map(|i| {
            let (http, endpoint, body) = (http.clone(), endpoint.clone(), body.clone());
            async move {
                let resp = http
                    .post(format!("{endpoint}/invoke?action=junk_{round}_{i}"))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                // Whatever the plugin makes of it, the answer is read to its end.
                let status = resp.status();
                let _ = resp.bytes().await;
                status
            }
        });
        use futures_util::StreamExt;
        let statuses: Vec<_> = futures_util::stream::iter(calls)
            .buffer_unordered(32)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| s.as_u16() != 404), "{statuses:?}");
        if round == 0 {
            rss_after_warmup = status_kib(pid, "VmRSS:");
        }
    }
    eprintln!(
        "10,000 junk calls in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let text = reqwest::get(format!("{}/metrics", c.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .count();
    assert!(series < 100, "{series} series:\n{text}");
    assert!(
        text.contains(r#"sri_invocations_total{action="other"} 10000"#),
        "{text}"
    );
    let grown = status_kib(pid, "VmRSS:").saturating_sub(rss_after_warmup);
    eprintln!("sri RSS {rss_after_warmup} KiB after 1,000 calls, +{grown} KiB after 10,000");
    assert!(
        grown < 16 * 1024,
        "sri's RSS grew by {grown} KiB over 9,000 junk calls"
    );
}

/// How a slow connection ended.
#[derive(Debug)]
enum Cut {
    /// Closed or answered after this long.
    After(Duration),
    /// Still open when the test gave up.
    Never,
}

/// Opens a connection, sends `head`, then one byte of `drip` every 100 ms until the server
/// answers or closes it (or 30 s pass).
async fn trickle(addr: SocketAddr, head: Vec<u8>, drip: &'static [u8]) -> Cut {
    let tcp = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(t) => break t,
            // A full backlog under the storm: try again.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let started = Instant::now();
    let (mut r, mut w) = tcp.into_split();
    let writer = async move {
        if w.write_all(&head).await.is_err() {
            return;
        }
        if drip.is_empty() {
            // Silent, but open: dropping the write half would send a FIN.
            std::future::pending::<()>().await;
        }
        for b in drip.iter().cycle() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if w.write_all(std::slice::from_ref(b)).await.is_err() {
                return;
            }
        }
    };
    let reader = async move {
        let mut buf = [0u8; 512];
        // Any answer (a 408) or the end of the connection.
        let _ = r.read(&mut buf).await;
    };
    tokio::pin!(writer, reader);
    let cut = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            _ = &mut reader => {}
            _ = &mut writer => reader.await,
        }
    })
    .await;
    match cut {
        Ok(()) => Cut::After(started.elapsed()),
        Err(_) => Cut::Never,
    }
}

/// Runs `slow` connections while `well_behaved` keeps calling; every slow one must be cut
/// between `at_least` and `at_most`, and every well-behaved call must succeed.
async fn slowloris<F, Fut>(
    slow: Vec<(SocketAddr, Vec<u8>, &'static [u8])>,
    at_least: Duration,
    at_most: Duration,
    well_behaved: F,
) where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let total = slow.len();
    let tasks: Vec<_> = slow
        .into_iter()
        .enumerate()
        .map(|(i, (addr, head, drip))| {
            tokio::spawn(async move {
                // 100 new connections every 50 ms: a burst of thousands would overflow the
                // listen backlog, and a silent client whose handshake the server dropped would
                // look like a connection the server never cut.
                tokio::time::sleep(Duration::from_millis(50 * (i / 100) as u64)).await;
                trickle(addr, head, drip).await
            })
        })
        .collect();
    let all = futures_util::future::join_all(tasks);
    tokio::pin!(all);
    let mut calls = 0;
    let results = loop {
        tokio::select! {
            r = &mut all => break r,
            r = well_behaved(calls) => {
                r.unwrap_or_else(|e| panic!("a well-behaved call failed during the storm: {e}"));
                calls += 1;
            }
        }
    };
    // And after it.
    well_behaved(calls).await.unwrap();
    let mut slowest = Duration::ZERO;
    for (i, r) in results.into_iter().enumerate() {
        match r.expect("task") {
            Cut::After(t) => {
                assert!(
                    t >= at_least && t <= at_most,
                    "slow connection #{i} was cut after {t:?} (deadline window {at_least:?}..{at_most:?})"
                );
                slowest = slowest.max(t);
            }
            Cut::Never => panic!("slow connection #{i} was still open after 30 s"),
        }
    }
    eprintln!(
        "{total} slow connections cut (the last after {:.2} s); {calls} well-behaved calls meanwhile",
        slowest.as_secs_f64()
    );
    assert!(
        calls >= 1,
        "no well-behaved call completed during the storm"
    );
}

#[tokio::test]
async fn slow_clients_of_sri_serve_are_cut_while_the_daemon_is_served() {
    let c = Connector::start_with(
        ConnectorOptions::default()
            .env("SRI_HEADER_READ_TIMEOUT_SECS", "2")
            .env("SRI_BODY_READ_TIMEOUT_SECS", "2")
            .env("SRI_UPLOAD_TIMEOUT_SECS", "2"),
    );
    let d = daemon(&c);
    let (_, endpoint) = launch_sample(&c, &d).await;
    let path = endpoint
        .split_once("/v1/")
        .map(|(_, p)| format!("/v1/{p}/invoke?action=invoke_tool"))
        .unwrap();
    let addr = c.addr;
    let mut slow = Vec::new();
    for i in 0..SLOW_CONNECTIONS {
        let (head, drip): (String, &'static [u8]) = match i % 4 {
            // A request head that never ends.
            0 => (format!("POST {path} HTTP/1.1\r\nhost: x\r\nx-slow: "), b"a"),
            // Not even a request line.
            1 => (String::new(), b"P"),
            // A body that never arrives whole.
            2 => (
                format!(
                    "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                     content-length: 1000000\r\n\r\n{{"
                ),
                b" ",
            ),
            // A launch upload that never arrives whole.
            _ => (
                format!(
                    "POST /v1/launch HTTP/1.1\r\nhost: x\r\nauthorization: {API_KEY}\r\n\
                     content-type: multipart/form-data; boundary=b\r\n\
                     content-length: 50000000\r\n\r\n--b\r\ncontent-disposition: form-data; \
                     name=\"context\"; filename=\"p.difypkg\"\r\n\r\n"
                ),
                b"z",
            ),
        };
        slow.push((addr, head.into_bytes(), drip));
    }
    let d2 = d.clone();
    slowloris(
        slow,
        Duration::from_millis(1500),
        Duration::from_secs(20),
        |i| {
            let (d, endpoint) = (d2.clone(), endpoint.clone());
            async move { echo(&d, &endpoint, &format!("call {i}")).await }
        },
    )
    .await;
    // The upload's deadline is a clear launch failure.
    let req = format!(
        "POST /v1/launch HTTP/1.1\r\nhost: x\r\nauthorization: {API_KEY}\r\n\
         content-type: multipart/form-data; boundary=b\r\ncontent-length: 50000000\r\n\r\n--b\r\n"
    );
    let (status, text) = raw(addr, &req).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("SRI_UPLOAD_TIMEOUT_SECS"), "{text}");
}

#[tokio::test]
async fn slow_clients_of_bootstrap_serve_are_cut_while_calls_are_served() {
    let b = Bootstrap::start(
        Options::new("sample")
            .env("SRI_HEADER_READ_TIMEOUT_SECS", "2")
            .env("SRI_BODY_READ_TIMEOUT_SECS", "2")
            // The deadlines are under test here: room for every trickling body's declared
            // size, so none is refused by the unverified-body budget instead (it has its own
            // test below).
            .env("SRI_MAX_PENDING_BODY_BYTES", (2u64 << 30).to_string()),
    );
    b.wait_ready().await;
    let addr: SocketAddr = b.url().trim_start_matches("http://").parse().unwrap();
    let mut slow = Vec::new();
    for i in 0..SLOW_CONNECTIONS {
        let (head, drip): (Vec<u8>, &'static [u8]) = match i % 4 {
            0 => (b"POST /invoke?action=invoke_tool HTTP/1.1\r\nhost: x\r\nx-slow: ".to_vec(), b"a"),
            // Nothing but the first bytes of an h2c preface, slowly.
            1 => (Vec::new(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            2 => (
                b"POST /invoke?action=invoke_tool HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n{"
                    .to_vec(),
                b" ",
            ),
            // A silent connection.
            _ => (Vec::new(), b""),
        };
        slow.push((addr, head, drip));
    }
    let url = b.url();
    slowloris(
        slow,
        Duration::from_millis(1500),
        Duration::from_secs(20),
        |i| {
            let url = url.clone();
            async move {
                let sid = session_id("well-behaved");
                let data = tool_data(
                    "sample",
                    "echo",
                    json!({"text": format!("call {i}")}),
                    Some(DEMO_KEY),
                );
                let ev = invoke_stream(&url, envelope(&sid, data)).await;
                let texts = harness::texts(&ev);
                if texts.iter().any(|t| t.contains(&format!("call {i}"))) {
                    Ok(())
                } else {
                    Err(format!("{ev:?}"))
                }
            }
        },
    )
    .await;
}

/// Processes whose command line or working directory is under `dir`.
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let dir = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if cmdline.contains(&dir) || cwd.contains(&dir) || environ.contains(&dir) {
            found.push((pid, cmdline));
        }
    }
    found
}

#[tokio::test]
async fn after_sri_serve_stops_no_bootstrap_or_plugin_is_left() {
    let mut c = Connector::start();
    let d = daemon(&c);
    let (_, endpoint) = launch_sample(&c, &d).await;
    echo(&d, &endpoint, "before the stop").await.unwrap();
    let sri_pid = c.pid().unwrap();
    let running: Vec<_> = processes_under(c.data_dir())
        .into_iter()
        .filter(|(pid, _)| *pid != sri_pid)
        .collect();
    assert!(
        running.len() >= 2,
        "a bootstrap and its plugin run under the data dir: {running:?}"
    );
    let report = c.stop();
    assert!(
        report.graceful,
        "no clean exit on SIGTERM: {report:?}\n{}",
        c.log_tail(30)
    );
    // Without a reaper a zombie would remain: give exits a bounded moment to be reaped.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_under(c.data_dir());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after sri serve stopped: {left:?}\n{}",
            c.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stopping `sri serve` lets a bootstrap finish its drain: a stream in flight on the function
/// (here called directly, past the gateway's own drain) completes with every chunk and `end`,
/// and no process is left afterwards.
#[tokio::test]
async fn stopping_sri_serve_waits_for_a_bootstraps_drain() {
    let mut c = Connector::start();
    let d = daemon(&c);
    let (name, _) = launch_sample(&c, &d).await;
    let boot = bootstrap_addr(&c, &name);
    let sid = session_id("draining");
    // 12 chunks 500 ms apart: ~5.5 s, past the 3 s after which a bootstrap used to be killed.
    let data = tool_data("sample", "stream", json!({"n": 12, "delay_ms": 500}), None);
    let url = format!("http://{boot}");
    let function = name.clone();
    let stream = tokio::spawn(async move {
        harness::invoke_stream_as(&url, &function, envelope(&sid, data)).await
    });
    // Stop once the session runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h: Value = reqwest::get(format!("http://{boot}/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if h["active_sessions"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the session never started: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let data_dir = c.data_dir().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        let report = c.stop();
        (report, c)
    });
    let events = stream.await.expect("stream task");
    let (report, c) = report.await.unwrap();
    assert!(
        report.graceful,
        "no clean exit on SIGTERM: {report:?}\n{}",
        c.log_tail(30)
    );
    let texts = harness::texts(&events);
    assert_eq!(texts.len(), 12, "the stream was cut: {texts:?}");
    assert_eq!(
        events.last().map(|(_, e)| e.kind),
        Some(connector::protocol::events::EventKind::End)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_under(&data_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left behind: {:?}",
            processes_under(&data_dir)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Bodies held before their signature is checked share one budget: of two callers without a
/// key who each start a 3 KiB body and never finish it, under a 4 KiB budget exactly one is
/// admitted and the other is refused at once (a retryable 503 naming the setting); the budget
/// comes back when they go away.
#[tokio::test]
async fn unverified_bodies_share_one_budget() {
    let b = Bootstrap::start(Options::new("sample").env("SRI_MAX_PENDING_BODY_BYTES", "4096"));
    b.wait_ready().await;
    let addr: SocketAddr = b.url().trim_start_matches("http://").parse().unwrap();
    let head =
        b"POST /invoke?action=invoke_tool HTTP/1.1\r\nhost: x\r\ncontent-length: 3000\r\n\r\n{";
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    first.write_all(head).await.unwrap();
    second.write_all(head).await.unwrap();
    // Whichever is read second finds the budget taken and is answered; the other waits for
    // its body.
    let (mut a, mut b_buf) = ([0u8; 512], [0u8; 512]);
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            n = first.read(&mut a) => String::from_utf8_lossy(&a[..n.unwrap()]).into_owned(),
            n = second.read(&mut b_buf) => String::from_utf8_lossy(&b_buf[..n.unwrap()]).into_owned(),
        }
    })
    .await
    .unwrap_or_else(|_| panic!("neither caller was refused; bootstrap logs:\n{}", b.logs().join("\n")));
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("SRI_MAX_PENDING_BODY_BYTES"),
        "{answer}"
    );
    drop((first, second));
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(2000));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, text) = raw(addr, &post(addr, "/invoke?action=invoke_tool", &body)).await;
        if status == 401 {
            break;
        }
        assert_eq!(status, 503, "{text}");
        assert!(
            Instant::now() < deadline,
            "the budget did not come back after the callers left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
