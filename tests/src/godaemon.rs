//! A client that drives a serverless connector exactly as the Go Dify plugin daemon does
//! (`PLATFORM=serverless`): the control plane (`/ping`, `/v1/runner/instances`, `/v1/launch`)
//! and the data plane (`{endpoint}/invoke?action=…`).
//!
//! Every rule here is the daemon's, as written down in `shared/docs/dify-wire.md` (cited as
//! "wire: <section>") and checked against the daemon's code (`internal/core/serverless_connector`,
//! `internal/core/serverless_runtime/io.go`, `pkg/utils/http_requests`,
//! `pkg/entities/plugin_entities/event.go`, `internal/core/io_tunnel/generic.go`). Where the daemon
//! is lenient the client is too, but it records what a careful connector should not rely on
//! (`LaunchOutcome::lint`, `LaunchOutcome::skipped`, `EndState::Invented`) so that tests can
//! assert on it.
//!
//! Nothing here panics on a protocol violation: each call returns what the daemon would have
//! concluded, plus everything it saw. Every wait is bounded.

use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use std::fmt;
use std::io::Write;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// `DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT` default: the launch stream's absolute
/// deadline, counted from the response headers (wire: Control plane, 3).
pub const DEFAULT_LAUNCH_TIMEOUT: Duration = Duration::from_secs(240);
/// `PLUGIN_MAX_EXECUTION_TIMEOUT` default: one invocation, retries included (wire: Data plane).
pub const DEFAULT_EXECUTION_TIMEOUT: Duration = Duration::from_secs(600);
/// `RequestAndParse`'s default read timeout for `/ping` and `/v1/runner/instances`: the body is
/// closed 60 s after the headers (`pkg/utils/http_requests/http_warpper.go`).
pub const CONTROL_READ_TIMEOUT: Duration = Duration::from_secs(60);
/// `PLUGIN_RUNTIME_MAX_BUFFER_SIZE`: the invoke response's line cap (wire: Data plane, "5 MiB max line").
pub const MAX_RESPONSE_LINE: usize = 5 * 1024 * 1024;
/// `LineBasedChunking`'s cap for the launch stream (30 MiB).
pub const LAUNCH_MAX_LINE: usize = 30 * 1024 * 1024;
/// How much of a non-2xx invoke response the daemon reads (wire: Data plane, "reads ≤ 4 KiB").
pub const ERROR_BODY_LIMIT: usize = 4 * 1024;
/// `MAX_SERVERLESS_RETRY_TIMES`: attempts in total (wire: Data plane, "retries").
pub const MAX_ATTEMPTS: u32 = 3;
/// `MAX_SERVERLESS_REQUEST_BYTES`: envelopes above are refused before sending.
pub const MAX_REQUEST_BYTES: usize = 5 * 1024 * 1024;
/// Our own bound on waiting for response headers. The daemon waits without limit (wire:
/// "Details that bite": "the daemon waits for headers without limit"); a test must not.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------------------------
// Go `encoding/json` semantics
// ---------------------------------------------------------------------------------------------

/// Go's field lookup when decoding into a struct: an exact key match is preferred, otherwise a
/// case-insensitive one (`Items` and `items` both fill `Items`; wire: Control plane, 2).
/// Returns the key actually used.
pub fn go_field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<(&'a str, &'a Value)> {
    obj.get_key_value(name)
        .or_else(|| obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
        .map(|(k, v)| (k.as_str(), v))
}

/// A Go `string` field: absent or `null` leave it empty (`None`); a string fills it; any other
/// JSON type is an `UnmarshalTypeError`.
pub fn go_str(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, String> {
    match go_field(obj, name) {
        None | Some((_, Value::Null)) => Ok(None),
        Some((_, Value::String(s))) => Ok(Some(s.clone())),
        Some((k, v)) => Err(format!(
            "json: cannot unmarshal {} into Go struct field .{k} of type string",
            json_kind(v)
        )),
    }
}

/// A JSON value decoded into a Go struct: an object, or `null` (a no-op: every field stays
/// empty); anything else is an `UnmarshalTypeError`.
fn go_struct<'a>(v: &'a Value, ty: &str) -> Result<Option<&'a Map<String, Value>>, String> {
    match v {
        Value::Object(o) => Ok(Some(o)),
        Value::Null => Ok(None),
        other => Err(format!(
            "json: cannot unmarshal {} into Go value of type {ty}",
            json_kind(other)
        )),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The first JSON value of a body, as `json.NewDecoder(body).Decode` reads it (trailing bytes
/// after the first value are ignored).
pub fn decode_first(body: &[u8]) -> Result<Value, String> {
    match serde_json::Deserializer::from_slice(body)
        .into_iter::<Value>()
        .next()
    {
        None => Err("EOF".into()),
        Some(r) => r.map_err(|e| e.to_string()),
    }
}

// ---------------------------------------------------------------------------------------------
// URLs, query strings, multipart
// ---------------------------------------------------------------------------------------------

/// Go's `url.JoinPath(base, elem)`: the joined path is cleaned (`path.Join`), a trailing slash of
/// `elem` is kept, the query of `base` is kept. Used for every call: `JoinPath(base, "/ping")`,
/// and `JoinPath(function_url, "invoke")` (wire: Data plane, "URL = join(function_url,"invoke")").
pub fn join_path(base: &str, elem: &str) -> String {
    let mut url = reqwest::Url::parse(base).unwrap_or_else(|e| panic!("bad URL {base:?}: {e}"));
    let mut parts: Vec<String> = Vec::new();
    for seg in url.path().split('/').chain(elem.split('/')) {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s.to_owned()),
        }
    }
    let mut p = format!("/{}", parts.join("/"));
    if elem.ends_with('/') && !p.ends_with('/') {
        p.push('/');
    }
    url.set_path(&p);
    url.set_fragment(None);
    url.to_string()
}

/// Go's `url.QueryEscape` (what `url.Values.Encode` applies): unreserved bytes stay, space
/// becomes `+`, everything else `%XX` (so `@` is sent as `%40`).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// A boundary like Go's `multipart.Writer`: 30 random bytes in hex.
fn random_boundary() -> String {
    use sha2::{Digest, Sha256};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = format!(
        "{}-{}-{:?}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        std::time::SystemTime::now()
    );
    hex::encode(&Sha256::digest(seed.as_bytes())[..30])
}

/// Go's `escapeQuotes` for `Content-Disposition` parameters.
fn escape_quotes(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// A `multipart/form-data` body byte for byte as Go's `multipart.Writer` writes it: file parts
/// (`CreateFormFile`: `Content-Disposition: form-data; name="…"; filename="…"` and
/// `Content-Type: application/octet-stream`) then fields (`WriteField`), `\r\n` line ends, the
/// closing delimiter `\r\n--B--\r\n`. The daemon writes `context` first, then `verified` and
/// `metadata` in Go map order (random); callers choose the order.
pub fn multipart_body(
    boundary: &str,
    files: &[(&str, &str, &[u8])],
    fields: &[(&str, &str)],
) -> Vec<u8> {
    let mut out = Vec::new();
    let mut first = true;
    let mut delimiter = |out: &mut Vec<u8>| {
        if first {
            first = false;
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        } else {
            out.extend_from_slice(format!("\r\n--{boundary}\r\n").as_bytes());
        }
    };
    for (name, filename, content) in files {
        delimiter(&mut out);
        out.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
                escape_quotes(name),
                escape_quotes(filename)
            )
            .as_bytes(),
        );
        out.extend_from_slice(content);
    }
    for (name, value) in fields {
        delimiter(&mut out);
        out.extend_from_slice(
            format!(
                "Content-Disposition: form-data; name=\"{}\"\r\n\r\n",
                escape_quotes(name)
            )
            .as_bytes(),
        );
        out.extend_from_slice(value.as_bytes());
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// A request body sent the way Go sends a body it cannot measure: `Transfer-Encoding: chunked`,
/// no `Content-Length` (wire: "Details that bite": launch and invoke bodies are chunked).
fn chunked_body(bytes: Vec<u8>) -> reqwest::Body {
    let bytes = Bytes::from(bytes);
    let chunks: Vec<Result<Bytes, std::io::Error>> = if bytes.is_empty() {
        Vec::new()
    } else {
        (0..bytes.len())
            .step_by(32 * 1024)
            .map(|i| Ok(bytes.slice(i..(i + 32 * 1024).min(bytes.len()))))
            .collect()
    };
    reqwest::Body::wrap_stream(futures_util::stream::iter(chunks))
}

// ---------------------------------------------------------------------------------------------
// Line scanning (bufio.Scanner + ScanLines)
// ---------------------------------------------------------------------------------------------

/// Go's `bufio.Scanner` with `ScanLines` and a maximum token size, fed incrementally.
///
/// Lines end at `\n`; one trailing `\r` is dropped (so `\r\n` is fine); a last line without `\n`
/// is still delivered at EOF. The buffer holds at most `max` bytes, and a line is found only
/// once its `\n` is in the buffer: a line fails ("token too long") when its bytes plus the `\n`
/// exceed `max`, or when `max` bytes are buffered without a `\n`.
pub struct LineScanner {
    buf: Vec<u8>,
    scanned: usize,
    max: usize,
}

impl LineScanner {
    /// A scanner with this maximum token size.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            max,
        }
    }

    /// Feeds bytes; returns the complete lines, and an error once a line is too long (lines
    /// before it are still returned, as `Scan` would deliver them first).
    pub fn push(&mut self, data: &[u8]) -> (Vec<Vec<u8>>, Option<String>) {
        self.buf.extend_from_slice(data);
        let mut lines = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start.max(self.scanned)..]
            .iter()
            .position(|b| *b == b'\n')
            .map(|p| p + start.max(self.scanned))
        {
            if pos - start + 1 > self.max {
                return (lines, Some(self.too_long()));
            }
            let mut line = self.buf[start..pos].to_vec();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            lines.push(line);
            start = pos + 1;
            self.scanned = start;
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() >= self.max {
            return (lines, Some(self.too_long()));
        }
        (lines, None)
    }

    /// At EOF: the last, unterminated line, if any.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let mut line = std::mem::take(&mut self.buf);
        self.scanned = 0;
        if line.is_empty() {
            return None;
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Some(line)
    }

    fn too_long(&self) -> String {
        format!("bufio.Scanner: token too long (max {} bytes)", self.max)
    }
}

// ---------------------------------------------------------------------------------------------
// Response bodies (gzip-aware, as Go's transport)
// ---------------------------------------------------------------------------------------------

type ByteStream = Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A response body read chunk by chunk. Go's transport sends `Accept-Encoding: gzip` and
/// decodes a gzip answer transparently (wire: "Details that bite"), so this does too.
struct Body {
    stream: ByteStream,
    gzip: Option<flate2::write::GzDecoder<Vec<u8>>>,
}

impl Body {
    fn new(resp: reqwest::Response) -> Self {
        let gzip = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
            .then(|| flate2::write::GzDecoder::new(Vec::new()));
        Self {
            stream: Box::pin(resp.bytes_stream()),
            gzip,
        }
    }

    /// The next decoded bytes; `None` at EOF.
    async fn next(&mut self) -> Option<Result<Vec<u8>, String>> {
        loop {
            match self.stream.next().await {
                Some(Ok(b)) => match &mut self.gzip {
                    None => return Some(Ok(b.to_vec())),
                    Some(dec) => {
                        if let Err(e) = dec.write_all(&b) {
                            return Some(Err(format!("gzip: {e}")));
                        }
                        let out = std::mem::take(dec.get_mut());
                        if !out.is_empty() {
                            return Some(Ok(out));
                        }
                    }
                },
                Some(Err(e)) => return Some(Err(error_chain(&e))),
                None => {
                    let mut dec = self.gzip.take()?;
                    if let Err(e) = dec.try_finish() {
                        return Some(Err(format!("gzip: {e}")));
                    }
                    let out = std::mem::take(dec.get_mut());
                    return (!out.is_empty()).then_some(Ok(out));
                }
            }
        }
    }

    /// Reads up to `limit` bytes (or to EOF) before `deadline`.
    async fn read_limited(
        &mut self,
        limit: usize,
        deadline: tokio::time::Instant,
    ) -> (Vec<u8>, Option<String>) {
        let mut out = Vec::new();
        while out.len() < limit {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Err(_) => return (out, Some("context deadline exceeded".into())),
                Ok(None) => break,
                Ok(Some(Err(e))) => return (out, Some(e)),
                Ok(Some(Ok(b))) => out.extend_from_slice(&b),
            }
        }
        out.truncate(limit);
        (out, None)
    }
}

/// An error with its sources (reqwest's top-level message alone hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

fn status_text(s: reqwest::StatusCode) -> String {
    format!("{} {}", s.as_u16(), s.canonical_reason().unwrap_or(""))
        .trim_end()
        .to_owned()
}

// ---------------------------------------------------------------------------------------------
// Control plane types
// ---------------------------------------------------------------------------------------------

/// One item of `/v1/runner/instances` (`RunnerInstance`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    /// `ID`.
    pub id: String,
    /// `Name`: the daemon stores it as the function name.
    pub name: String,
    /// `Endpoint`: the daemon stores it as the function URL.
    pub endpoint: String,
    /// `ResourceName`.
    pub resource_name: String,
    /// `Status.State` (not checked by the daemon).
    pub state: String,
}

/// The `Message` of `run`/`success`, as the daemon's naive parser reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalStage {
    /// `endpoint=`.
    pub endpoint: String,
    /// `name=`.
    pub name: String,
    /// `id=`.
    pub id: String,
}

/// `parser.ParserCommaSeparatedValues[LaunchFunctionFinalStageMessage]`: an empty message gives
/// empty fields; otherwise the message is split on **every** `,`, each piece on **every** `=`,
/// and a piece that does not split into exactly two is an error. So no value may contain `,` or
/// `=` (wire: Control plane, 3: "no query strings"). Keys and values are trimmed; unknown keys
/// are ignored; a repeated key keeps its last value.
pub fn parse_final_stage(message: &str) -> Result<FinalStage, String> {
    let mut out = FinalStage::default();
    if message.is_empty() {
        return Ok(out);
    }
    let mut values = std::collections::HashMap::new();
    for pair in message.split(',') {
        let kv: Vec<&str> = pair.split('=').collect();
        if kv.len() != 2 {
            return Err(format!("invalid key-value pair: {pair}"));
        }
        values.insert(kv[0].trim().to_owned(), kv[1].trim().to_owned());
    }
    if let Some(v) = values.remove("endpoint") {
        out.endpoint = v;
    }
    if let Some(v) = values.remove("name") {
        out.name = v;
    }
    if let Some(v) = values.remove("id") {
        out.id = v;
    }
    Ok(out)
}

/// One decoded launch line (`LaunchFunctionResponseChunk`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchChunk {
    /// `Stage`: `healthz|start|build|run|end`.
    pub stage: String,
    /// `State`: `running|success|failed`.
    pub state: String,
    /// `Obj`.
    pub obj: String,
    /// `Message`.
    pub message: String,
}

/// What the daemon turns launch chunks into (`LaunchFunctionResponse` events of `SetupFunction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchEvent {
    /// A `failed` chunk, a `run`/`success` message that does not parse, or a stream error.
    Error(String),
    /// `start`/`build` ("Building plugin...") or `run` not `success` ("Launching plugin...").
    Info(String),
    /// The function name from `run`/`success`.
    Function(String),
    /// The function URL from `run`/`success`.
    FunctionUrl(String),
    /// `end` (not `failed`).
    Done,
}

/// Everything a launch showed, and what the daemon concluded.
#[derive(Debug, Clone, Default)]
pub struct LaunchOutcome {
    /// HTTP status (always 200 here: anything else is an `Err` of [`GoDaemon::launch`]).
    pub status: u16,
    /// Time from sending to the response headers.
    pub headers_after: Duration,
    /// Every scanned line, verbatim (lossy UTF-8), with its arrival time since the headers.
    pub lines: Vec<(Duration, String)>,
    /// The chunks the daemon decoded, in order.
    pub chunks: Vec<LaunchChunk>,
    /// Lines the daemon skipped (did not decode), with the reason.
    pub skipped: Vec<(String, String)>,
    /// Things Go tolerates that a connector should not rely on: a missing or `null` chunk field,
    /// a key that matched only case-insensitively.
    pub lint: Vec<String>,
    /// The daemon's events, in order.
    pub events: Vec<LaunchEvent>,
    /// The last successfully parsed `run`/`success` message.
    pub function: Option<FinalStage>,
    /// Whether an `end` (not `failed`) chunk was seen.
    pub done: bool,
    /// What the installer stores when it sees `Done`: name and URL of the `Function` /
    /// `FunctionUrl` events seen before it (both must be non-empty).
    pub installed: Option<(String, String)>,
    /// What the installer reports as errors.
    pub install_errors: Vec<String>,
    /// The deadline closed the stream.
    pub deadline_hit: bool,
    /// A read error (including the deadline and "token too long").
    pub stream_error: Option<String>,
    /// When the first `end` chunk arrived (since the headers).
    pub end_at: Option<Duration>,
    /// When the body ended (since the headers); `None` if it never did.
    pub eof_at: Option<Duration>,
    /// Lines read after the first `end` chunk.
    pub lines_after_end: usize,
    /// Total time of the call.
    pub elapsed: Duration,
}

impl LaunchOutcome {
    /// The `Message`s of `failed` chunks.
    pub fn failures(&self) -> Vec<&str> {
        self.chunks
            .iter()
            .filter(|c| c.state == "failed")
            .map(|c| c.message.as_str())
            .collect()
    }

    /// A one-line-per-chunk rendering for assertion messages.
    pub fn transcript(&self) -> String {
        self.lines
            .iter()
            .map(|(t, l)| format!("  +{:>7.3}s {l}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Applies the daemon's launch-stream rules line by line (pure: no I/O).
#[derive(Default)]
pub struct LaunchReader {
    /// What has been seen so far.
    pub outcome: LaunchOutcome,
    function_name: String,
    function_url: String,
}

impl LaunchReader {
    /// One line of the body, as `bufio.ScanLines` delivered it, read `at` after the headers.
    pub fn line(&mut self, raw: &[u8], at: Duration) {
        let o = &mut self.outcome;
        o.lines
            .push((at, String::from_utf8_lossy(raw).into_owned()));
        if o.end_at.is_some() && !raw.trim_ascii().is_empty() {
            o.lines_after_end += 1;
        }
        // `RequestAndParseStream` (wire: Control plane, 3): blank lines ignored; a leading
        // `data:` stripped (once, no space needed); `event:` lines ignored; then trimmed.
        if raw.is_empty() {
            return;
        }
        let mut data = raw;
        if let Some(rest) = data.strip_prefix(b"data:") {
            data = rest;
        }
        if data.starts_with(b"event:") {
            return;
        }
        let data = data.trim_ascii();
        // `parser.UnmarshalJsonBytes[LaunchFunctionResponseChunk]`; a line that does not decode is
        // skipped with a warning (raiseErrorWhenStreamDataNotMatch is false).
        let chunk = match self.decode(data) {
            Ok(c) => c,
            Err(reason) => {
                self.outcome
                    .skipped
                    .push((String::from_utf8_lossy(raw).into_owned(), reason));
                return;
            }
        };
        self.outcome.chunks.push(chunk.clone());
        if chunk.stage == "end" && self.outcome.end_at.is_none() {
            self.outcome.end_at = Some(at);
        }
        self.process(chunk);
    }

    fn decode(&mut self, data: &[u8]) -> Result<LaunchChunk, String> {
        let v: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        let Some(obj) = go_struct(&v, "serverless.LaunchFunctionResponseChunk")? else {
            self.outcome
                .lint
                .push("a `null` chunk (Go decodes it as all-empty)".into());
            return Ok(LaunchChunk::default());
        };
        // All four fields must be JSON strings when present (wire: "Details that bite":
        // `"Obj":{}` makes the daemon skip the chunk).
        let mut get = |name: &str| -> Result<String, String> {
            match go_field(obj, name) {
                None => self
                    .outcome
                    .lint
                    .push(format!("chunk without `{name}`: {v}")),
                Some((k, _)) if k != name => self.outcome.lint.push(format!(
                    "chunk key `{k}` matches `{name}` only case-insensitively"
                )),
                Some((_, Value::Null)) => {
                    self.outcome.lint.push(format!("chunk with `{name}: null`"))
                }
                _ => {}
            }
            Ok(go_str(obj, name)?.unwrap_or_default())
        };
        Ok(LaunchChunk {
            stage: get("Stage")?,
            obj: get("Obj")?,
            state: get("State")?,
            message: get("Message")?,
        })
    }

    /// `SetupFunction`'s callback, then the installer's handling of the events.
    fn process(&mut self, chunk: LaunchChunk) {
        let mut events = Vec::new();
        if chunk.state == "failed" {
            // Any `failed` is an error event, but reading goes on (wire: "A `failed` chunk does
            // not stop the install"). `end`+`failed` therefore gives no `Done`.
            events.push(LaunchEvent::Error(chunk.message.clone()));
        } else {
            match chunk.stage.as_str() {
                "start" | "build" => events.push(LaunchEvent::Info("Building plugin...".into())),
                "run" if chunk.state == "success" => match parse_final_stage(&chunk.message) {
                    Ok(f) => {
                        events.push(LaunchEvent::Function(f.name.clone()));
                        events.push(LaunchEvent::FunctionUrl(f.endpoint.clone()));
                        self.outcome.function = Some(f);
                    }
                    Err(e) => events.push(LaunchEvent::Error(e)),
                },
                "run" => events.push(LaunchEvent::Info("Launching plugin...".into())),
                "end" => events.push(LaunchEvent::Done),
                _ => {} // `healthz` and anything else: nothing.
            }
        }
        for e in events {
            self.event(e);
        }
    }

    /// The installer (`plugin_manager/installer.go`): `Function`/`FunctionUrl` remember the
    /// values; `Done` needs both non-empty; `Error` is reported.
    fn event(&mut self, e: LaunchEvent) {
        let o = &mut self.outcome;
        match &e {
            LaunchEvent::Function(n) => self.function_name = n.clone(),
            LaunchEvent::FunctionUrl(u) => self.function_url = u.clone(),
            LaunchEvent::Done => {
                o.done = true;
                if self.function_url.is_empty() || self.function_name.is_empty() {
                    o.install_errors.push(
                        "Internal server error, failed to get serverless function url or function name"
                            .into(),
                    );
                } else if o.installed.is_none() {
                    o.installed = Some((self.function_name.clone(), self.function_url.clone()));
                }
            }
            LaunchEvent::Error(m) => o.install_errors.push(m.clone()),
            LaunchEvent::Info(_) => {}
        }
        o.events.push(e);
    }

    /// The stream failed (read error, deadline, token too long): one more `Error` event.
    pub fn stream_error(&mut self, err: String) {
        self.outcome.stream_error = Some(err.clone());
        self.event(LaunchEvent::Error(err));
    }
}

// ---------------------------------------------------------------------------------------------
// Data plane types
// ---------------------------------------------------------------------------------------------

/// A Dify error (`plugin_entities.ErrorResponse`).
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonError {
    /// `error_type`.
    pub error_type: String,
    /// `message`.
    pub message: String,
    /// `args` (an object or `null`).
    pub args: Value,
}

impl DaemonError {
    fn new(error_type: &str, message: impl Into<String>) -> Self {
        Self {
            error_type: error_type.into(),
            message: message.into(),
            args: Value::Null,
        }
    }

    /// As the daemon marshals it.
    pub fn to_value(&self) -> Value {
        json!({"message": self.message, "error_type": self.error_type, "args": self.args})
    }
}

impl fmt::Display for DaemonError {
    /// `PluginRuntimeError: <errorType>[: <errorMessage>]` for runtime errors (wire: Data plane,
    /// "non-2xx"), `<error_type>: <message>` otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = self
            .message
            .strip_prefix("Plugin runtime request failed: ")
            .unwrap_or(&self.message);
        write!(f, "{}: {}", self.error_type, msg)
    }
}

/// A session message delivered to the daemon's session listener.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionMessage {
    /// `type`: `stream`, `error`, `end`, `invoke`, ….
    pub kind: String,
    /// `data`.
    pub data: Value,
    /// Made by the daemon itself (its runtime error, or the `end` it invents), not read from
    /// the response.
    pub from_daemon: bool,
}

/// How the session's `end` came about.
#[derive(Debug, Clone, PartialEq)]
pub enum EndState {
    /// The response carried a `session`/`end` (its `data`).
    Received(Value),
    /// The body ended without one and the daemon **invented** it (wire: Data plane: "a cut-off
    /// stream looks like success"). A correct connector never relies on this.
    Invented,
    /// No `end`: the daemon sent an error instead.
    NotSent,
}

/// What the runtime needs to know of the response to build its errors.
#[derive(Debug, Clone, Default)]
pub struct RespInfo {
    /// Status code.
    pub status: u16,
    /// Go's `response.Status`, e.g. `401 Unauthorized`.
    pub status_text: String,
    /// `x-amzn-ErrorType`.
    pub amzn_error_type: Option<String>,
    /// `x-amzn-RequestId`.
    pub amzn_request_id: Option<String>,
}

/// `buildServerlessRuntimeError`: `errorType`/`errorMessage`/`requestId` from the body (Go
/// `json.Unmarshal`, keys case-insensitive, errors ignored), overridden by the `x-amzn-ErrorType`
/// / `x-amzn-RequestId` headers; without an error type, `fallback` (the status text for a non-2xx
/// answer), else `HTTP <code>` (wire: Data plane, "non-2xx").
pub fn runtime_error(resp: &RespInfo, body: Option<&[u8]>, fallback: &str) -> DaemonError {
    let parsed = body
        .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let s = |k: &str| go_str(&parsed, k).ok().flatten().unwrap_or_default();
    let (mut error_type, error_message, mut request_id) =
        (s("errorType"), s("errorMessage"), s("requestId"));
    if let Some(t) = resp.amzn_error_type.as_deref().filter(|t| !t.is_empty()) {
        error_type = t.to_owned();
    }
    if let Some(r) = resp.amzn_request_id.as_deref().filter(|r| !r.is_empty()) {
        request_id = r.to_owned();
    }
    if error_type.is_empty() {
        error_type = fallback.to_owned();
    }
    if error_type.is_empty() {
        error_type = format!("HTTP {}", resp.status);
    }
    let mut args = json!({"status_code": resp.status});
    if !request_id.is_empty() {
        args["request_id"] = json!(request_id);
    }
    let mut message = format!("Plugin runtime request failed: {error_type}");
    if !error_message.is_empty() {
        message.push_str(": ");
        message.push_str(&error_message);
    }
    DaemonError {
        error_type: "PluginRuntimeError".into(),
        message,
        args,
    }
}

/// Applies the daemon's invoke-response rules line by line (pure: no I/O); `WriteContext` of
/// `internal/core/serverless_runtime/io.go`.
pub struct NdjsonReader {
    resp: RespInfo,
    /// Every line that parsed as JSON, verbatim, in order.
    pub lines: Vec<Value>,
    /// What the session listener received, in order (the daemon's own error or `end` last).
    pub delivered: Vec<SessionMessage>,
    /// `log` events.
    pub logs: Vec<Value>,
    /// `heartbeat` events (ignored by the daemon).
    pub heartbeats: usize,
    /// Objects with an empty or unknown `event` (ignored by the daemon).
    pub ignored: Vec<Value>,
    send_end: bool,
    has_session_event: bool,
    received_end: Option<Value>,
    error: Option<DaemonError>,
}

impl NdjsonReader {
    /// A reader for a 2xx response.
    pub fn new(resp: RespInfo) -> Self {
        Self {
            resp,
            lines: Vec::new(),
            delivered: Vec::new(),
            logs: Vec::new(),
            heartbeats: 0,
            ignored: Vec::new(),
            send_end: true,
            has_session_event: false,
            received_end: None,
            error: None,
        }
    }

    /// `sendError`: only the first error is sent, and it replaces the `end`.
    fn send_error(&mut self, e: DaemonError) {
        if !self.send_end {
            return;
        }
        self.send_end = false;
        self.delivered.push(SessionMessage {
            kind: "error".into(),
            data: e.to_value(),
            from_daemon: true,
        });
        self.error = Some(e);
    }

    fn inner_error(&mut self, message: String) {
        self.send_error(DaemonError::new("PluginDaemonInnerError", message));
    }

    /// Whether the daemon is still reading.
    pub fn reading(&self) -> bool {
        self.send_end && self.received_end.is_none()
    }

    /// One scanned line; returns whether the daemon keeps reading.
    pub fn line(&mut self, line: &[u8]) -> bool {
        if !self.reading() {
            return false;
        }
        // Blank lines (and `\r\n` ends, dropped by the scanner) are fine (wire: "Details that bite").
        if line.is_empty() {
            return true;
        }
        let parsed = serde_json::from_slice::<Value>(line);
        // An object with a non-empty `errorType` is a Lambda error payload: runtime error, stop.
        if let Ok(Value::Object(o)) = &parsed
            && let Ok(Some(t)) = go_str(o, "errorType")
            && !t.is_empty()
        {
            let e = runtime_error(&self.resp, Some(line), "Lambda runtime error");
            self.send_error(e);
            return false;
        }
        // `ParsePluginUniversalEvent`: a line that is not JSON (a whitespace-only line, an SSE
        // comment, a `data:` line …) fails the session (wire: "Details that bite").
        let shown = || {
            let s = String::from_utf8_lossy(line);
            if line.len() > 1024 {
                format!("{}...", String::from_utf8_lossy(&line[..1024]))
            } else {
                s.into_owned()
            }
        };
        let v = match parsed {
            Ok(v) => v,
            Err(e) => {
                let msg = format!(
                    "encountered an error: {e} status: {} original response: {}",
                    self.resp.status_text,
                    shown()
                );
                self.inner_error(msg);
                return false;
            }
        };
        self.lines.push(v.clone());
        let decoded = go_struct(&v, "plugin_entities.PluginUniversalEvent").and_then(|o| {
            let Some(o) = o else {
                return Ok((None, None));
            };
            go_str(o, "session_id")?;
            Ok((
                go_str(o, "event")?,
                go_field(o, "data").map(|(_, d)| d.clone()),
            ))
        });
        let (event, data) = match decoded {
            Ok(x) => x,
            Err(e) => {
                let msg = format!(
                    "encountered an error: {e} status: {} original response: {}",
                    self.resp.status_text,
                    shown()
                );
                self.inner_error(msg);
                return false;
            }
        };
        match event.as_deref() {
            Some("session") => self.session(line, data),
            Some("log") => {
                // Logged by the daemon; a log that does not decode is only logged as such.
                self.logs.push(data.unwrap_or(Value::Null));
                true
            }
            Some("error") => {
                // A top-level `error` fails the call (wire: Data plane).
                let raw = data.map(|d| d.to_string()).unwrap_or_default();
                self.inner_error(format!("encountered an error: {raw}"));
                false
            }
            Some("heartbeat") => {
                self.heartbeats += 1;
                true
            }
            // An object with no known `event` is ignored (wire: "Details that bite").
            _ => {
                self.ignored.push(v);
                true
            }
        }
    }

    /// A `session` event: `SessionMessage` needs a non-empty `type` and a `data` member (`null`
    /// is fine) (wire: "Details that bite"); `end` stops reading; others are forwarded.
    fn session(&mut self, line: &[u8], data: Option<Value>) -> bool {
        let parsed = (|| -> Result<(String, Value), String> {
            let data = data.ok_or("unexpected end of JSON input")?;
            let obj = go_struct(&data, "plugin_entities.SessionMessage")?;
            let empty = Map::new();
            let obj = obj.unwrap_or(&empty);
            let kind = go_str(obj, "type")?.unwrap_or_default();
            let inner = go_field(obj, "data").map(|(_, d)| d.clone());
            if kind.is_empty() {
                return Err("Key: 'SessionMessage.Type' Error:Field validation for 'Type' failed on the 'required' tag".into());
            }
            let inner = inner.ok_or(
                "Key: 'SessionMessage.Data' Error:Field validation for 'Data' failed on the 'required' tag",
            )?;
            Ok((kind, inner))
        })();
        match parsed {
            Err(e) => {
                let msg = format!(
                    "failed to parse session message {}, err: {e}",
                    String::from_utf8_lossy(line)
                );
                self.inner_error(msg);
                false
            }
            Ok((kind, inner)) => {
                self.has_session_event = true;
                if kind == "end" {
                    self.received_end = Some(inner);
                    return false;
                }
                self.delivered.push(SessionMessage {
                    kind,
                    data: inner,
                    from_daemon: false,
                });
                true
            }
        }
    }

    /// The body ended (or failed with `read_error`); returns what the listener got in the end.
    pub fn finish(mut self, read_error: Option<String>) -> InvokeOutcome {
        if let Some(e) = read_error {
            self.inner_error(format!("failed to read response body: {e}"));
        }
        if !self.has_session_event && self.send_end {
            let e = runtime_error(&self.resp, None, "no valid session response");
            self.send_error(e);
        }
        let end = if !self.send_end {
            EndState::NotSent
        } else if let Some(d) = self.received_end.clone() {
            EndState::Received(d)
        } else {
            EndState::Invented
        };
        if self.send_end {
            // The deferred `end`: the received one's data, or an invented one with no data.
            self.delivered.push(SessionMessage {
                kind: "end".into(),
                data: self.received_end.clone().unwrap_or(Value::Null),
                from_daemon: self.received_end.is_none(),
            });
        }
        InvokeOutcome {
            status: Some(self.resp.status),
            lines: self.lines,
            delivered: self.delivered,
            logs: self.logs,
            heartbeats: self.heartbeats,
            ignored: self.ignored,
            end,
            error: self.error,
            ..InvokeOutcome::default()
        }
    }
}

/// Everything an invocation showed, and what the daemon concluded.
#[derive(Debug, Clone)]
pub struct InvokeOutcome {
    /// HTTP attempts made (retries on 502 and transport errors).
    pub attempts: u32,
    /// Status of the answer used (`None`: no answer).
    pub status: Option<u16>,
    /// Response headers of the answer used (lowercase names).
    pub headers: Vec<(String, String)>,
    /// Every JSON line of the body, verbatim.
    pub lines: Vec<Value>,
    /// What the session listener received, in order.
    pub delivered: Vec<SessionMessage>,
    /// `log` events.
    pub logs: Vec<Value>,
    /// `heartbeat` events.
    pub heartbeats: usize,
    /// Ignored objects (unknown `event`).
    pub ignored: Vec<Value>,
    /// How the `end` came about.
    pub end: EndState,
    /// The error the daemon itself produced (runtime error, inner error), if any.
    pub error: Option<DaemonError>,
    /// Time to the response headers.
    pub headers_after: Option<Duration>,
    /// Total time.
    pub elapsed: Duration,
}

impl Default for InvokeOutcome {
    fn default() -> Self {
        Self {
            attempts: 0,
            status: None,
            headers: Vec::new(),
            lines: Vec::new(),
            delivered: Vec::new(),
            logs: Vec::new(),
            heartbeats: 0,
            ignored: Vec::new(),
            end: EndState::NotSent,
            error: None,
            headers_after: None,
            elapsed: Duration::ZERO,
        }
    }
}

impl InvokeOutcome {
    fn failed_before_response(e: DaemonError, attempts: u32) -> Self {
        Self {
            attempts,
            delivered: vec![SessionMessage {
                kind: "error".into(),
                data: e.to_value(),
                from_daemon: true,
            }],
            error: Some(e),
            ..Self::default()
        }
    }

    /// What the caller of the plugin sees (`invokePluginOnce`'s `onChunk` in
    /// `internal/core/io_tunnel/generic.go`): `stream` data in order until `end`; `invoke` is
    /// rejected in serverless (wire: Data plane); an `error` fails the call — unless its data
    /// does not decode or its `args` has more than 10 keys, in which case it is silently dropped
    /// (wire: "Details that bite"); an unknown type fails the call.
    pub fn result(&self) -> Result<Vec<Value>, DaemonError> {
        let mut out = Vec::new();
        for m in &self.delivered {
            match m.kind.as_str() {
                "stream" => out.push(m.data.clone()),
                "invoke" => {
                    return Err(DaemonError::new(
                        "serverless_event_not_supported",
                        "serverless event is not supported by full duplex",
                    ));
                }
                "end" => return Ok(out),
                "error" => {
                    if let Some(e) = decode_error_response(&m.data) {
                        return Err(e);
                    }
                }
                other => {
                    return Err(DaemonError::new(
                        "unknown_stream_message_type",
                        format!("unknown stream message type: {other}"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// `data` of the `stream` messages the function sent.
    pub fn stream_data(&self) -> Vec<&Value> {
        self.delivered
            .iter()
            .filter(|m| m.kind == "stream" && !m.from_daemon)
            .map(|m| &m.data)
            .collect()
    }

    /// `message.text` of the function's text stream messages.
    pub fn texts(&self) -> Vec<String> {
        self.stream_data()
            .into_iter()
            .filter_map(|d| d["message"]["text"].as_str().map(str::to_owned))
            .collect()
    }

    /// `data` of the `error` session messages the function sent.
    pub fn function_errors(&self) -> Vec<&Value> {
        self.delivered
            .iter()
            .filter(|m| m.kind == "error" && !m.from_daemon)
            .map(|m| &m.data)
            .collect()
    }

    /// The response's `session` objects, verbatim.
    pub fn session_lines(&self) -> Vec<&Value> {
        self.lines
            .iter()
            .filter(|l| l["event"] == "session")
            .collect()
    }

    /// Whether the daemon had to invent the `end`.
    pub fn end_invented(&self) -> bool {
        self.end == EndState::Invented
    }

    /// Whether the response itself carried `end`.
    pub fn end_received(&self) -> bool {
        matches!(self.end, EndState::Received(_))
    }

    /// A compact rendering for assertion messages.
    pub fn transcript(&self) -> String {
        let mut s = format!(
            "attempts={} status={:?} end={:?} error={:?}\n",
            self.attempts,
            self.status,
            self.end,
            self.error.as_ref().map(|e| e.to_string())
        );
        for l in &self.lines {
            let mut t = l.to_string();
            if t.len() > 600 {
                let mut cut = 600;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
                t.push('…');
            }
            s.push_str("  ");
            s.push_str(&t);
            s.push('\n');
        }
        s
    }
}

/// `parser.UnmarshalJsonBytes[plugin_entities.ErrorResponse]`: `message` and `error_type`
/// strings, `args` an object of at most 10 keys (or absent/`null`); `None` when it does not
/// decode or validate.
pub fn decode_error_response(data: &Value) -> Option<DaemonError> {
    let obj = go_struct(data, "plugin_entities.ErrorResponse").ok()?;
    let empty = Map::new();
    let obj = obj.unwrap_or(&empty);
    let message = go_str(obj, "message").ok()?.unwrap_or_default();
    let error_type = go_str(obj, "error_type").ok()?.unwrap_or_default();
    let args = match go_field(obj, "args") {
        None | Some((_, Value::Null)) => Value::Null,
        Some((_, Value::Object(m))) if m.len() <= 10 => Value::Object(m.clone()),
        Some(_) => return None,
    };
    Some(DaemonError {
        error_type,
        message,
        args,
    })
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

/// The daemon, pointed at a connector (`DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL`).
#[derive(Clone)]
pub struct GoDaemon {
    base: String,
    api_key: Option<String>,
    /// `DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT`.
    pub launch_timeout: Duration,
    /// `PLUGIN_MAX_EXECUTION_TIMEOUT`.
    pub execution_timeout: Duration,
    /// `MAX_SERVERLESS_RETRY_TIMES`.
    pub max_attempts: u32,
    /// Our bound on waiting for headers (the daemon has none).
    pub header_timeout: Duration,
    client: reqwest::Client,
    order: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl GoDaemon {
    /// A daemon using `api_key` as `DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY` (`None`: no
    /// `Authorization` header at all).
    pub fn new(base: &str, api_key: Option<&str>) -> Self {
        let client = reqwest::Client::builder()
            // Go's canonical header names on the wire (`Dify-Plugin-Session-Id`, wire: "Details
            // that bite").
            .http1_title_case_headers()
            // The daemon's dialer: 5 s connect timeout, 120 s idle connections.
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(120))
            .user_agent("Go-http-client/1.1")
            .build()
            .expect("HTTP client");
        Self {
            base: base.trim_end_matches('/').to_owned(),
            api_key: api_key.map(str::to_owned),
            launch_timeout: DEFAULT_LAUNCH_TIMEOUT,
            execution_timeout: DEFAULT_EXECUTION_TIMEOUT,
            max_attempts: MAX_ATTEMPTS,
            header_timeout: HEADER_TIMEOUT,
            client,
            order: Default::default(),
        }
    }

    /// Sets the launch deadline.
    pub fn with_launch_timeout(mut self, d: Duration) -> Self {
        self.launch_timeout = d;
        self
    }

    /// Sets the invocation deadline.
    pub fn with_execution_timeout(mut self, d: Duration) -> Self {
        self.execution_timeout = d;
        self
    }

    /// The connector base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A control-plane request with the daemon's headers: `Authorization: <raw key>` (no
    /// `Bearer`; wire: Control plane) and `Accept-Encoding: gzip`.
    /// `path` may carry a query (`/v1/runner/instances?filename=…`), sent as is.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut url = match path.split_once('?') {
            Some((p, q)) => format!("{}?{q}", join_path(&self.base, p)),
            None => join_path(&self.base, path),
        };
        if url.ends_with('?') {
            url.pop();
        }
        let mut rb = self
            .client
            .request(method, url)
            .header("Accept-Encoding", "gzip");
        if let Some(k) = &self.api_key {
            rb = rb.header("Authorization", k.as_str());
        }
        rb
    }

    /// `RequestAndParse`: headers (bounded by us), then the first JSON value of the body, read
    /// within 60 s. The status is **not** checked (wire: "ping and instances do not check the
    /// HTTP status").
    async fn control_json(&self, rb: reqwest::RequestBuilder) -> Result<Value, String> {
        let resp = tokio::time::timeout(self.header_timeout, rb.send())
            .await
            .map_err(|_| format!("no response headers within {:?}", self.header_timeout))?
            .map_err(|e| error_chain(&e))?;
        let status = resp.status();
        let deadline = tokio::time::Instant::now() + CONTROL_READ_TIMEOUT;
        let (body, err) = Body::new(resp).read_limited(16 << 20, deadline).await;
        if let Some(e) = err {
            return Err(format!("reading the body (HTTP {status}): {e}"));
        }
        decode_first(&body).map_err(|e| {
            format!(
                "{e} (HTTP {status}, body {:?})",
                String::from_utf8_lossy(&body[..body.len().min(512)])
            )
        })
    }

    /// `POST /ping` with an empty body; the answer must JSON-decode to the string `"pong"`
    /// (wire: Control plane, 1). The daemon panics at start when this fails.
    pub async fn ping(&self) -> Result<(), String> {
        let v = self
            .control_json(
                self.request(reqwest::Method::POST, "/ping")
                    .body(Vec::<u8>::new()),
            )
            .await?;
        match v {
            Value::String(s) if s == "pong" => Ok(()),
            Value::String(s) => Err(format!(
                "unexpected response from serverless connector: {s}"
            )),
            Value::Null => Err("unexpected response from serverless connector: ".into()),
            other => Err(format!(
                "json: cannot unmarshal {} into Go value of type string ({other})",
                json_kind(&other)
            )),
        }
    }

    /// `GET /v1/runner/instances[?filename=…]` decoded as `RunnerInstances` (keys
    /// case-insensitive, `Items` may be `null`); a non-empty `error` is a failure (wire: Control
    /// plane, 2). Without `filename` (not something the daemon sends) the connector lists all.
    pub async fn list_instances(&self, filename: Option<&str>) -> Result<Vec<Instance>, String> {
        // `HttpParams`: `url.Values.Encode()` as the raw query.
        let path = match filename {
            Some(f) => format!("/v1/runner/instances?filename={}", query_escape(f)),
            None => "/v1/runner/instances".to_owned(),
        };
        let v = self
            .control_json(self.request(reqwest::Method::GET, &path))
            .await?;
        decode_instances(&v)
    }

    /// `FetchFunction`: `Items[0]` of `/v1/runner/instances?filename=…`, or `None` when empty.
    pub async fn instances(&self, filename: &str) -> Result<Option<Instance>, String> {
        Ok(self
            .list_instances(Some(filename))
            .await?
            .into_iter()
            .next())
    }

    /// `SetupFunction`: `POST /v1/launch`, multipart parts `context` (the package, as a file named
    /// `filename`), `verified`, `metadata` (`{"plugin_unique_identifier":…}`), sent chunked. The
    /// answer must be exactly HTTP 200 (else `Err` with the daemon's message); the body is read
    /// line by line under an absolute deadline counted from the headers (wire: Control plane, 3).
    pub async fn launch(
        &self,
        pkg: &[u8],
        filename: &str,
        verified: bool,
        unique_identifier: &str,
    ) -> Result<LaunchOutcome, String> {
        let started = Instant::now();
        let boundary = random_boundary();
        let metadata =
            serde_json::to_string(&json!({"plugin_unique_identifier": unique_identifier}))
                .expect("JSON");
        let verified = if verified { "true" } else { "false" };
        // Go map order is random: alternate between the two orders, deterministically.
        let fields: [(&str, &str); 2] = if self
            .order
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
        {
            [("verified", verified), ("metadata", &metadata)]
        } else {
            [("metadata", &metadata), ("verified", verified)]
        };
        let body = multipart_body(&boundary, &[("context", filename, pkg)], &fields);
        let rb = self
            .request(reqwest::Method::POST, "/v1/launch")
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(chunked_body(body));
        let resp = tokio::time::timeout(self.header_timeout, rb.send())
            .await
            .map_err(|_| {
                format!(
                    "no launch response headers within {:?} (the daemon would wait forever)",
                    self.header_timeout
                )
            })?
            .map_err(|e| error_chain(&e))?;
        let headers_at = Instant::now();
        let status = resp.status();
        if status.as_u16() != 200 {
            let deadline = tokio::time::Instant::now() + CONTROL_READ_TIMEOUT;
            let (b, _) = Body::new(resp).read_limited(1 << 20, deadline).await;
            return Err(format!(
                "request failed with status code: {} and respond with: {}",
                status.as_u16(),
                String::from_utf8_lossy(&b)
            ));
        }
        let mut reader = LaunchReader::default();
        reader.outcome.status = 200;
        reader.outcome.headers_after = headers_at - started;
        // `HttpReadTimeout`: `time.AfterFunc(timeout, body.Close)` armed when the headers arrive.
        let deadline = tokio::time::Instant::from_std(headers_at + self.launch_timeout);
        let mut body = Body::new(resp);
        let mut scanner = LineScanner::new(LAUNCH_MAX_LINE);
        loop {
            match tokio::time::timeout_at(deadline, body.next()).await {
                Err(_) => {
                    reader.outcome.deadline_hit = true;
                    reader.stream_error(format!(
                        "read on closed response body (launch deadline {:?} reached)",
                        self.launch_timeout
                    ));
                    break;
                }
                Ok(None) => {
                    if let Some(l) = scanner.finish() {
                        reader.line(&l, headers_at.elapsed());
                    }
                    reader.outcome.eof_at = Some(headers_at.elapsed());
                    break;
                }
                Ok(Some(Err(e))) => {
                    reader.stream_error(e);
                    break;
                }
                Ok(Some(Ok(b))) => {
                    let (lines, err) = scanner.push(&b);
                    let at = headers_at.elapsed();
                    for l in lines {
                        reader.line(&l, at);
                    }
                    if let Some(e) = err {
                        reader.stream_error(e);
                        break;
                    }
                }
            }
        }
        reader.outcome.elapsed = started.elapsed();
        Ok(reader.outcome)
    }

    /// [`GoDaemon::launch`] of a package under its own name and identifier.
    pub async fn launch_package(
        &self,
        pkg: &crate::difypkg::Package,
        verified: bool,
    ) -> Result<LaunchOutcome, String> {
        self.launch(
            &pkg.bytes,
            &pkg.filename(),
            verified,
            &pkg.unique_identifier(),
        )
        .await
    }

    /// `ServerlessPluginRuntime.WriteContext`: `POST join(endpoint,"invoke")?action=<action>`
    /// with `Content-Type: application/json`, `Accept: text/event-stream`,
    /// `Dify-Plugin-Session-Id`, the envelope as a chunked body; retries (fresh request, whole
    /// body) on HTTP 502 and transport errors only, `max_attempts` in total, backoff
    /// 500 ms·2^(n-1) (wire: Data plane, "retries"); then reads the NDJSON answer
    /// ([`NdjsonReader`]) under the execution deadline.
    pub async fn invoke(
        &self,
        endpoint: &str,
        action: &str,
        envelope: &[u8],
        session_id: &str,
    ) -> InvokeOutcome {
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + self.execution_timeout);
        // Envelopes over MAX_SERVERLESS_REQUEST_BYTES are refused before sending.
        if envelope.len() > MAX_REQUEST_BYTES {
            let e = DaemonError::new(
                "ServerlessPayloadTooLarge",
                format!(
                    "ServerlessPayloadTooLarge: action={action} payload_bytes={} max_request_bytes={MAX_REQUEST_BYTES}",
                    envelope.len()
                ),
            );
            return InvokeOutcome::failed_before_response(e, 0);
        }
        let url = format!("{}?action={action}", join_path(endpoint, "invoke"));
        let max = self.max_attempts.max(1);
        let mut last_err = String::new();
        let mut attempts = 0;
        let mut response = None;
        for attempt in 0..max {
            if attempt > 0 {
                let backoff =
                    Duration::from_millis(500u64 << (attempt - 1)).min(Duration::from_secs(30));
                if tokio::time::timeout_at(deadline, tokio::time::sleep(backoff))
                    .await
                    .is_err()
                {
                    last_err = "context deadline exceeded".into();
                    break;
                }
            }
            attempts += 1;
            let rb = self
                .client
                .post(&url)
                .header("Content-Type", "application/json")
                .header("Accept", "text/event-stream")
                .header("Dify-Plugin-Session-Id", session_id)
                .header("Accept-Encoding", "gzip")
                .body(chunked_body(envelope.to_vec()));
            let header_deadline = deadline.min(tokio::time::Instant::now() + self.header_timeout);
            match tokio::time::timeout_at(header_deadline, rb.send()).await {
                Err(_) => {
                    last_err = format!(
                        "attempt {}/{max} failed: no response headers (deadline)",
                        attempt + 1
                    );
                    break;
                }
                Ok(Err(e)) => {
                    last_err = format!("attempt {}/{max} failed: {}", attempt + 1, error_chain(&e));
                }
                Ok(Ok(r)) if r.status().is_success() => {
                    response = Some(r);
                    break;
                }
                Ok(Ok(r)) if r.status().as_u16() == 502 => {
                    last_err =
                        format!("attempt {}/{max} failed with status code: 502", attempt + 1);
                }
                Ok(Ok(r)) => {
                    response = Some(r);
                    break;
                }
            }
        }
        let Some(resp) = response else {
            let e = DaemonError::new(
                "PluginDaemonInnerError",
                format!(
                    "Error sending request to serverless: all {max} attempts failed, last error: {last_err}"
                ),
            );
            let mut o = InvokeOutcome::failed_before_response(e, attempts);
            o.elapsed = started.elapsed();
            return o;
        };
        let headers_after = started.elapsed();
        let header = |n: &str| {
            resp.headers()
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let info = RespInfo {
            status: resp.status().as_u16(),
            status_text: status_text(resp.status()),
            amzn_error_type: header("x-amzn-ErrorType"),
            amzn_request_id: header("x-amzn-RequestId"),
        };
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let success = resp.status().is_success();
        let mut body = Body::new(resp);
        let mut outcome = if !success
            || info
                .amzn_error_type
                .as_deref()
                .is_some_and(|t| !t.is_empty())
        {
            // Non-2xx (or Lambda error headers on a 2xx): ≤ 4 KiB read, a runtime error.
            let (b, _) = body.read_limited(ERROR_BODY_LIMIT, deadline).await;
            let fallback = if success {
                "Lambda runtime error".to_owned()
            } else {
                info.status_text.clone()
            };
            let e = runtime_error(&info, Some(&b), &fallback);
            let mut o = InvokeOutcome::failed_before_response(e, attempts);
            o.status = Some(info.status);
            o
        } else {
            let mut reader = NdjsonReader::new(info);
            let mut scanner = LineScanner::new(MAX_RESPONSE_LINE);
            let mut read_error = None;
            'read: while reader.reading() {
                match tokio::time::timeout_at(deadline, body.next()).await {
                    Err(_) => {
                        read_error = Some("context deadline exceeded".to_owned());
                        break;
                    }
                    Ok(None) => {
                        if let Some(l) = scanner.finish() {
                            reader.line(&l);
                        }
                        break;
                    }
                    Ok(Some(Err(e))) => {
                        read_error = Some(e);
                        break;
                    }
                    Ok(Some(Ok(b))) => {
                        let (lines, err) = scanner.push(&b);
                        for l in lines {
                            if !reader.line(&l) {
                                break 'read;
                            }
                        }
                        if err.is_some() {
                            read_error = err;
                            break;
                        }
                    }
                }
            }
            reader.finish(read_error)
        };
        outcome.attempts = attempts;
        outcome.headers = headers;
        outcome.headers_after = Some(headers_after);
        outcome.elapsed = started.elapsed();
        outcome
    }
}

/// `RunnerInstances` as Go decodes it (keys case-insensitive; `error` non-empty = failure).
pub fn decode_instances(v: &Value) -> Result<Vec<Instance>, String> {
    let Some(obj) = go_struct(v, "serverless.RunnerInstances")? else {
        return Ok(Vec::new());
    };
    if let Some(e) = go_str(obj, "error")?.filter(|e| !e.is_empty()) {
        return Err(format!("unexpected response from plugin controller: {e}"));
    }
    let items = match go_field(obj, "Items") {
        None | Some((_, Value::Null)) => return Ok(Vec::new()),
        Some((_, Value::Array(a))) => a,
        Some((_, other)) => {
            return Err(format!(
                "json: cannot unmarshal {} into Go struct field RunnerInstances.Items of type []serverless.RunnerInstance",
                json_kind(other)
            ));
        }
    };
    items
        .iter()
        .map(|item| {
            let Some(o) = go_struct(item, "serverless.RunnerInstance")? else {
                return Ok(Instance::default());
            };
            let state = match go_field(o, "Status") {
                None | Some((_, Value::Null)) => String::new(),
                Some((_, s)) => match go_struct(s, "struct { State string }")? {
                    Some(so) => go_str(so, "State")?.unwrap_or_default(),
                    None => String::new(),
                },
            };
            Ok(Instance {
                id: go_str(o, "ID")?.unwrap_or_default(),
                name: go_str(o, "Name")?.unwrap_or_default(),
                endpoint: go_str(o, "Endpoint")?.unwrap_or_default(),
                resource_name: go_str(o, "ResourceName")?.unwrap_or_default(),
                state,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // --- the naive run/success parser ---------------------------------------------------------

    #[test]
    fn final_stage_parses_the_three_fields() {
        let f = parse_final_stage("endpoint=http://127.0.0.1:5004/v1/functions/sri-sample-1a2b, name=sri-sample-1a2b ,id=abc").unwrap();
        assert_eq!(
            f.endpoint,
            "http://127.0.0.1:5004/v1/functions/sri-sample-1a2b"
        );
        assert_eq!(f.name, "sri-sample-1a2b");
        assert_eq!(f.id, "abc");
        // Unknown keys are ignored, a repeated key keeps the last value, empty gives empties.
        let f = parse_final_stage("name=a,extra=1,name=b").unwrap();
        assert_eq!((f.name.as_str(), f.endpoint.as_str()), ("b", ""));
        assert_eq!(parse_final_stage("").unwrap(), FinalStage::default());
    }

    #[test]
    fn final_stage_breaks_on_commas_and_equals_in_values() {
        // A query string (`=`) or a comma in a value breaks the daemon's parser.
        let e = parse_final_stage("endpoint=http://h/f?x=1,name=n,id=i").unwrap_err();
        assert_eq!(e, "invalid key-value pair: endpoint=http://h/f?x=1");
        let e = parse_final_stage("endpoint=http://h/f,name=a,b,id=i").unwrap_err();
        assert_eq!(e, "invalid key-value pair: b");
        assert!(
            parse_final_stage("endpoint=http://h/f,").is_err(),
            "trailing comma"
        );
    }

    // --- line scanning ------------------------------------------------------------------------

    #[test]
    fn scanner_splits_like_scan_lines() {
        let mut s = LineScanner::new(1024);
        let (l, e) = s.push(b"a\r\nb\n\npar");
        assert!(e.is_none());
        assert_eq!(l, vec![b"a".to_vec(), b"b".to_vec(), b"".to_vec()]);
        let (l, e) = s.push(b"tial\r\n\r\nlast");
        assert!(e.is_none());
        assert_eq!(l, vec![b"partial".to_vec(), b"".to_vec()]);
        assert_eq!(s.finish(), Some(b"last".to_vec()));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn scanner_enforces_the_max_token_size() {
        // A line fits when its bytes plus the '\n' fit in `max`.
        let mut s = LineScanner::new(8);
        let (l, e) = s.push(b"1234567\n");
        assert_eq!((l.len(), e), (1, None));
        let mut s = LineScanner::new(8);
        let (l, e) = s.push(b"ok\n12345678\n");
        assert_eq!(
            l,
            vec![b"ok".to_vec()],
            "lines before the long one are delivered"
        );
        assert!(e.unwrap().contains("token too long"));
        // Buffered without a newline up to max: too long, even before the newline arrives.
        let mut s = LineScanner::new(8);
        assert!(s.push(b"1234").1.is_none());
        assert!(s.push(b"5678").1.is_some());
        // Many small pushes of one long line are fine below the cap.
        let mut s = LineScanner::new(MAX_RESPONSE_LINE);
        for _ in 0..100 {
            assert!(s.push(&[b'x'; 1000]).1.is_none());
        }
        let (l, e) = s.push(b"\n");
        assert!(e.is_none());
        assert_eq!(l[0].len(), 100_000);
    }

    // --- the launch stream --------------------------------------------------------------------

    fn feed(lines: &[&str]) -> LaunchOutcome {
        let mut r = LaunchReader::default();
        for l in lines {
            r.line(l.as_bytes(), Duration::ZERO);
        }
        r.outcome
    }

    #[test]
    fn launch_stream_happy_path() {
        let o = feed(&[
            r#"data: {"Stage":"start","State":"running","Obj":"","Message":"received"}"#,
            "",
            r#"event: message"#,
            r#"data:{"Stage":"build","State":"running","Obj":"","Message":"installing dependencies"}"#,
            r#"  {"Stage":"run","State":"success","Obj":"","Message":"endpoint=http://127.0.0.1:9/v1/functions/f1,name=f1,id=x"}  "#,
            r#"data: {"Stage":"end","State":"success","Obj":"","Message":"done"}"#,
        ]);
        assert!(o.skipped.is_empty() && o.lint.is_empty(), "{o:?}");
        assert_eq!(o.chunks.len(), 4);
        assert!(o.done);
        assert_eq!(
            o.installed,
            Some(("f1".into(), "http://127.0.0.1:9/v1/functions/f1".into()))
        );
        assert!(o.install_errors.is_empty());
        assert_eq!(o.function.unwrap().id, "x");
    }

    #[test]
    fn launch_stream_skips_what_go_cannot_decode() {
        let o = feed(&[
            ": keepalive",
            "id: 3",
            "not json",
            r#"data: {"Stage":"build","State":"running","Obj":{},"Message":"x"}"#,
            r#"data: {"Stage":"build","State":"running","Obj":"","Message":5}"#,
            r#"data: ["Stage"]"#,
        ]);
        assert!(o.chunks.is_empty(), "{:?}", o.chunks);
        assert_eq!(o.skipped.len(), 6, "{:?}", o.skipped);
        assert!(!o.done);
    }

    #[test]
    fn launch_stream_lint_for_lenient_decoding() {
        // Go accepts missing fields, `null` and case-insensitive keys; we note them.
        let o = feed(&[r#"{"stage":"end","State":null,"Message":"m"}"#]);
        assert_eq!(o.chunks.len(), 1);
        assert!(o.done);
        assert_eq!(o.lint.len(), 3, "{:?}", o.lint);
        // Done without a run/success: the installer cannot store the function.
        assert!(o.installed.is_none());
        assert_eq!(o.install_errors.len(), 1);
    }

    #[test]
    fn launch_stream_failures_do_not_stop_reading() {
        let o = feed(&[
            r#"data: {"Stage":"build","State":"failed","Obj":"","Message":"first try failed"}"#,
            r#"data: {"Stage":"run","State":"success","Obj":"","Message":"endpoint=http://h/f,name=f,id=i"}"#,
            r#"data: {"Stage":"end","State":"success","Obj":"","Message":""}"#,
        ]);
        assert_eq!(o.failures(), ["first try failed"]);
        assert!(o.done);
        assert!(
            o.installed.is_some(),
            "a later run/success + end still installs"
        );

        let o = feed(&[
            r#"data: {"Stage":"build","State":"failed","Obj":"","Message":"manifest.yaml missing"}"#,
            r#"data: {"Stage":"end","State":"failed","Obj":"","Message":"launch failed"}"#,
        ]);
        assert!(!o.done, "end+failed gives no Done");
        assert_eq!(o.install_errors.len(), 2);

        let o = feed(&[
            r#"data: {"Stage":"run","State":"success","Obj":"","Message":"endpoint=http://h/f?a=b,name=f,id=i"}"#,
            r#"data: {"Stage":"end","State":"success","Obj":"","Message":""}"#,
        ]);
        assert!(o.done && o.installed.is_none());
        assert!(
            o.install_errors[0].starts_with("invalid key-value pair"),
            "{o:?}"
        );
    }

    // --- the invoke stream --------------------------------------------------------------------

    fn info() -> RespInfo {
        RespInfo {
            status: 200,
            status_text: "200 OK".into(),
            ..RespInfo::default()
        }
    }

    fn read(body: &str) -> InvokeOutcome {
        let mut s = LineScanner::new(MAX_RESPONSE_LINE);
        let mut r = NdjsonReader::new(info());
        let (lines, err) = s.push(body.as_bytes());
        assert!(err.is_none());
        for l in lines.into_iter().chain(s.finish()) {
            if !r.line(&l) {
                break;
            }
        }
        r.finish(None)
    }

    const STREAM: &str = r#"{"event":"session","session_id":"s","data":{"type":"stream","data":{"type":"text","message":{"text":"hi"},"meta":null}}}"#;
    const END: &str = r#"{"event":"session","session_id":"s","data":{"type":"end","data":{}}}"#;

    #[test]
    fn ndjson_well_formed() {
        let o = read(&format!(
            "{STREAM}\n\n{{\"event\":\"heartbeat\",\"session_id\":null,\"data\":{{}}}}\r\n\r\n{{\"event\":\"log\",\"data\":{{\"level\":\"INFO\",\"message\":\"m\",\"timestamp\":1}}}}\n\n{END}\n\n"
        ));
        assert_eq!(o.texts(), ["hi"]);
        assert!(o.end_received() && !o.end_invented());
        assert_eq!((o.heartbeats, o.logs.len()), (1, 1));
        assert_eq!(o.result().unwrap().len(), 1);
        assert!(o.error.is_none());
    }

    #[test]
    fn ndjson_stops_at_end() {
        let o = read(&format!("{END}\n\nthis is never read\n"));
        assert!(o.end_received());
        assert!(o.error.is_none());
    }

    #[test]
    fn ndjson_invalid_lines_kill_the_session() {
        for bad in [
            "   ",
            "\t",
            ": keepalive",
            &format!("data: {STREAM}"),
            "not json",
            "[1]",
            "42",
        ] {
            let o = read(&format!("{STREAM}\n\n{bad}\n\n{END}\n\n"));
            let e = o
                .error
                .clone()
                .unwrap_or_else(|| panic!("{bad:?} accepted: {o:?}"));
            assert_eq!(e.error_type, "PluginDaemonInnerError", "{bad:?}");
            assert_eq!(o.end, EndState::NotSent, "{bad:?}");
            assert_eq!(o.result().unwrap_err().error_type, "PluginDaemonInnerError");
        }
        // `null` decodes into an empty struct: an unknown event, ignored.
        let o = read(&format!("null\n{STREAM}\n{END}\n"));
        assert!(o.error.is_none(), "{o:?}");
    }

    #[test]
    fn ndjson_error_type_is_a_runtime_error() {
        let o = read(&format!(
            "{STREAM}\n{{\"errorType\":\"Runtime.ExitError\",\"errorMessage\":\"boom\",\"requestId\":\"r1\"}}\n{END}\n"
        ));
        let e = o.error.clone().unwrap();
        assert_eq!(e.to_string(), "PluginRuntimeError: Runtime.ExitError: boom");
        assert_eq!(e.args["request_id"], "r1");
        assert_eq!(e.args["status_code"], 200);
        // Case-insensitive key, as Go decodes it.
        let o = read("{\"ERRORTYPE\":\"X\"}\n");
        assert_eq!(o.error.unwrap().to_string(), "PluginRuntimeError: X");
    }

    #[test]
    fn ndjson_top_level_error_fails() {
        let o = read(&format!(
            "{STREAM}\n{{\"event\":\"error\",\"session_id\":null,\"data\":{{\"error\":\"bad\"}}}}\n{END}\n"
        ));
        let e = o.error.unwrap();
        assert_eq!(e.error_type, "PluginDaemonInnerError");
        assert!(e.message.contains("bad"), "{e}");
    }

    #[test]
    fn ndjson_missing_end_is_invented() {
        let o = read(&format!("{STREAM}\n\n"));
        assert!(o.end_invented());
        assert!(o.delivered.last().unwrap().from_daemon);
        assert!(
            o.result().is_ok(),
            "a cut-off stream looks like success to the daemon"
        );
    }

    #[test]
    fn ndjson_empty_body_is_no_valid_session_response() {
        let o = read("\n\n");
        assert_eq!(
            o.error.unwrap().to_string(),
            "PluginRuntimeError: no valid session response"
        );
    }

    #[test]
    fn ndjson_session_rules() {
        // invoke is rejected by the caller in serverless.
        let o = read(&format!(
            "{{\"event\":\"session\",\"session_id\":\"s\",\"data\":{{\"type\":\"invoke\",\"data\":{{}}}}}}\n{END}\n"
        ));
        assert_eq!(
            o.result().unwrap_err().error_type,
            "serverless_event_not_supported"
        );
        // A session message without data, or with an empty type, fails.
        for bad in [
            r#"{"event":"session","session_id":"s","data":{"type":"stream"}}"#,
            r#"{"event":"session","session_id":"s","data":{"type":"","data":{}}}"#,
            r#"{"event":"session","session_id":"s"}"#,
            r#"{"event":"session","session_id":5,"data":{"type":"end","data":{}}}"#,
        ] {
            let o = read(&format!("{bad}\n{END}\n"));
            assert_eq!(
                o.error.unwrap().error_type,
                "PluginDaemonInnerError",
                "{bad}"
            );
        }
        // `data: null` is fine.
        let o = read(r#"{"event":"session","session_id":"s","data":{"type":"end","data":null}}"#);
        assert!(o.end_received() && o.error.is_none());
        // A plugin error fails the call, and the end is still the plugin's.
        let err = r#"{"event":"session","session_id":"s","data":{"type":"error","data":{"error_type":"ToolProviderCredentialValidationError","message":"invalid api_key","args":{}}}}"#;
        let o = read(&format!("{err}\n\n{END}\n\n"));
        assert!(o.end_received());
        assert_eq!(o.function_errors().len(), 1);
        let e = o.result().unwrap_err();
        assert_eq!(e.error_type, "ToolProviderCredentialValidationError");
        // An error with more than 10 args is silently dropped: the call "succeeds".
        let args: Map<String, Value> = (0..11).map(|i| (format!("k{i}"), json!(i))).collect();
        let big = json!({"event":"session","session_id":"s","data":{"type":"error","data":{"error_type":"E","message":"m","args":args}}});
        let o = read(&format!("{big}\n{END}\n"));
        assert!(o.result().is_ok());
        // Unknown events and unknown-case event names are ignored.
        let o = read(&format!(
            "{{\"event\":\"Session\",\"data\":{{}}}}\n{{\"event\":\"usage\"}}\n{END}\n"
        ));
        assert_eq!(o.ignored.len(), 2);
        assert!(o.error.is_none());
    }

    #[test]
    fn runtime_error_sources() {
        let mut i = RespInfo {
            status: 401,
            status_text: "401 Unauthorized".into(),
            ..RespInfo::default()
        };
        let e = runtime_error(
            &i,
            Some(br#"{"errorType":"Sri.Unauthorized","errorMessage":"bad signature"}"#),
            "401 Unauthorized",
        );
        assert_eq!(
            e.to_string(),
            "PluginRuntimeError: Sri.Unauthorized: bad signature"
        );
        let e = runtime_error(&i, Some(b"<html>nope</html>"), "401 Unauthorized");
        assert_eq!(e.to_string(), "PluginRuntimeError: 401 Unauthorized");
        i.amzn_error_type = Some("Function.ResponseSizeTooLarge".into());
        i.amzn_request_id = Some("rid".into());
        let e = runtime_error(
            &i,
            Some(br#"{"errorType":"ignored","errorMessage":"kept"}"#),
            "x",
        );
        assert_eq!(
            e.to_string(),
            "PluginRuntimeError: Function.ResponseSizeTooLarge: kept"
        );
        assert_eq!(e.args, json!({"status_code": 401, "request_id": "rid"}));
    }

    // --- URLs, query, multipart, instances -----------------------------------------------------

    #[test]
    fn join_path_like_go() {
        assert_eq!(
            join_path("http://127.0.0.1:5004", "/ping"),
            "http://127.0.0.1:5004/ping"
        );
        assert_eq!(
            join_path("http://h:1/v1/functions/f", "invoke"),
            "http://h:1/v1/functions/f/invoke"
        );
        assert_eq!(
            join_path("http://h:1/v1/functions/f/", "invoke"),
            "http://h:1/v1/functions/f/invoke"
        );
        assert_eq!(join_path("http://h:1/a//b/", "/c/"), "http://h:1/a/b/c/");
    }

    #[test]
    fn request_keeps_the_query() {
        let d = GoDaemon::new("http://127.0.0.1:9", Some("k"));
        let r = d
            .request(reqwest::Method::GET, "/v1/runner/instances?filename=a%40b")
            .build()
            .unwrap();
        assert_eq!(
            r.url().as_str(),
            "http://127.0.0.1:9/v1/runner/instances?filename=a%40b"
        );
        assert_eq!(r.headers()["authorization"], "k");
    }

    #[test]
    fn query_escape_like_go() {
        assert_eq!(
            query_escape("sri@sample@0.1.0@ab12.difypkg"),
            "sri%40sample%400.1.0%40ab12.difypkg"
        );
        assert_eq!(query_escape("a b/c+d~"), "a+b%2Fc%2Bd~");
    }

    #[test]
    fn multipart_like_go() {
        let body = multipart_body(
            "B",
            &[("context", "a@b\"c.difypkg", b"PK\x03\x04")],
            &[("verified", "false"), ("metadata", "{}")],
        );
        let want = "--B\r\nContent-Disposition: form-data; name=\"context\"; filename=\"a@b\\\"c.difypkg\"\r\nContent-Type: application/octet-stream\r\n\r\nPK\x03\x04\r\n--B\r\nContent-Disposition: form-data; name=\"verified\"\r\n\r\nfalse\r\n--B\r\nContent-Disposition: form-data; name=\"metadata\"\r\n\r\n{}\r\n--B--\r\n";
        assert_eq!(String::from_utf8_lossy(&body), want);
        assert_eq!(random_boundary().len(), 60);
    }

    #[test]
    fn instances_decode_like_go() {
        let v = json!({"error":"","Items":[{"ID":"1","Name":"n","Endpoint":"http://e","ResourceName":"r","Status":{"State":"running"}}]});
        let i = decode_instances(&v).unwrap();
        assert_eq!(i[0].name, "n");
        assert_eq!(i[0].state, "running");
        let v = json!({"items":[{"name":"n2","endpoint":"http://e2"}]});
        assert_eq!(decode_instances(&v).unwrap()[0].endpoint, "http://e2");
        assert!(decode_instances(&json!({"Items":null})).unwrap().is_empty());
        assert!(decode_instances(&json!({"error":"boom","Items":[]})).is_err());
        assert!(decode_instances(&json!({"Items":[{"Name":5}]})).is_err());
        assert!(decode_instances(&json!([])).is_err());
    }

    // --- against a local server ---------------------------------------------------------------

    use axum::http::{HeaderMap, StatusCode};
    use std::sync::{Arc, Mutex};

    async fn serve(app: axum::Router) -> String {
        format!("http://{}", crate::serve_loopback(app).await.0)
    }

    #[tokio::test]
    async fn invoke_retries_only_502_and_sends_chunked() {
        let seen: Arc<Mutex<Vec<HeaderMap>>> = Default::default();
        let s = seen.clone();
        let app = axum::Router::new().route(
            "/fn/invoke",
            axum::routing::post(move |h: HeaderMap, body: axum::body::Bytes| {
                let s = s.clone();
                async move {
                    let n = {
                        let mut v = s.lock().unwrap();
                        v.push(h);
                        v.len()
                    };
                    assert_eq!(&body[..], b"{\"x\":1}");
                    if n < 3 {
                        (StatusCode::BAD_GATEWAY, String::new())
                    } else {
                        (StatusCode::OK, format!("{END}\n\n"))
                    }
                }
            }),
        );
        let base = serve(app).await;
        let d = GoDaemon::new(&base, None);
        let t = Instant::now();
        let o = d
            .invoke(&format!("{base}/fn"), "invoke_tool", b"{\"x\":1}", "sid-1")
            .await;
        assert_eq!(o.attempts, 3, "{}", o.transcript());
        assert!(o.end_received(), "{}", o.transcript());
        assert!(
            t.elapsed() >= Duration::from_millis(1500),
            "backoff 500 ms + 1 s"
        );
        let seen = seen.lock().unwrap();
        let h = &seen[0];
        assert_eq!(h["transfer-encoding"], "chunked");
        assert!(h.get("content-length").is_none());
        assert_eq!(h["dify-plugin-session-id"], "sid-1");
        assert_eq!(h["accept"], "text/event-stream");
        assert_eq!(h["content-type"], "application/json");
    }

    #[tokio::test]
    async fn invoke_decodes_a_gzip_answer_like_go() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(format!("{STREAM}\n\n{END}\n\n").as_bytes())
            .unwrap();
        let body = gz.finish().unwrap();
        let app = axum::Router::new().route(
            "/f/invoke",
            axum::routing::post(move |h: HeaderMap| {
                let body = body.clone();
                async move {
                    assert_eq!(h["accept-encoding"], "gzip");
                    ([("content-encoding", "gzip")], body)
                }
            }),
        );
        let base = serve(app).await;
        let o = GoDaemon::new(&base, None)
            .invoke(&format!("{base}/f"), "invoke_tool", b"{}", "s")
            .await;
        assert!(o.end_received(), "{}", o.transcript());
        assert_eq!(o.texts(), ["hi"]);
    }

    #[tokio::test]
    async fn invoke_gives_up_after_three_502() {
        let app = axum::Router::new().route(
            "/f/invoke",
            axum::routing::post(|| async { StatusCode::BAD_GATEWAY }),
        );
        let base = serve(app).await;
        let o = GoDaemon::new(&base, None)
            .invoke(&format!("{base}/f"), "invoke_tool", b"{}", "s")
            .await;
        assert_eq!(o.attempts, 3);
        let e = o.error.unwrap();
        assert_eq!(e.error_type, "PluginDaemonInnerError");
        assert!(e.message.contains("all 3 attempts failed"), "{e}");
    }

    #[tokio::test]
    async fn invoke_non_2xx_is_a_runtime_error_without_retry() {
        let app = axum::Router::new().route(
            "/f/invoke",
            axum::routing::post(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    r#"{"errorType":"Sri.Unauthorized","errorMessage":"bad signature"}"#,
                )
            }),
        );
        let base = serve(app).await;
        let o = GoDaemon::new(&base, None)
            .invoke(&format!("{base}/f"), "invoke_tool", b"{}", "s")
            .await;
        assert_eq!((o.attempts, o.status), (1, Some(401)));
        assert_eq!(
            o.error.unwrap().to_string(),
            "PluginRuntimeError: Sri.Unauthorized: bad signature"
        );
    }

    #[tokio::test]
    async fn launch_sends_multipart_chunked_and_reads_the_stream() {
        type Seen = Arc<Mutex<Option<(HeaderMap, Vec<u8>)>>>;
        let seen: Seen = Default::default();
        let s = seen.clone();
        let app = axum::Router::new()
            .route(
                "/v1/launch",
                axum::routing::post(move |h: HeaderMap, body: axum::body::Bytes| {
                    let s = s.clone();
                    async move {
                        *s.lock().unwrap() = Some((h, body.to_vec()));
                        concat!(
                            "data: {\"Stage\":\"start\",\"State\":\"running\",\"Obj\":\"\",\"Message\":\"ok\"}\n\n",
                            "data: {\"Stage\":\"run\",\"State\":\"success\",\"Obj\":\"\",\"Message\":\"endpoint=http://x/v1/functions/f,name=f,id=1\"}\n\n",
                            "data: {\"Stage\":\"end\",\"State\":\"success\",\"Obj\":\"\",\"Message\":\"\"}\n\n",
                        )
                    }
                }),
            )
            .route(
                "/ping",
                axum::routing::post(|h: HeaderMap| async move {
                    if h.get("authorization").is_some_and(|v| v == "k") {
                        (StatusCode::OK, "\"pong\"")
                    } else {
                        (StatusCode::UNAUTHORIZED, "{\"error\":\"no\"}")
                    }
                }),
            );
        let base = serve(app).await;
        let d = GoDaemon::new(&base, Some("k"));
        d.ping().await.unwrap();
        assert!(GoDaemon::new(&base, Some("bad")).ping().await.is_err());
        let o = d
            .launch(b"PKZIP", "a@b@1@c.difypkg", false, "a/b:1@c")
            .await
            .unwrap();
        assert_eq!(
            o.installed,
            Some(("f".into(), "http://x/v1/functions/f".into()))
        );
        assert!(o.eof_at.is_some() && o.lines_after_end == 0, "{o:?}");
        let (h, body) = seen.lock().unwrap().clone().unwrap();
        assert_eq!(h["authorization"], "k");
        assert_eq!(h["transfer-encoding"], "chunked");
        assert!(h.get("content-length").is_none());
        let ct = h["content-type"].to_str().unwrap();
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let body = String::from_utf8_lossy(&body);
        assert!(body.starts_with(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"context\"; filename=\"a@b@1@c.difypkg\"\r\n")), "{body}");
        assert!(
            body.contains(
                "name=\"metadata\"\r\n\r\n{\"plugin_unique_identifier\":\"a/b:1@c\"}\r\n"
            ),
            "{body}"
        );
        assert!(
            body.contains("name=\"verified\"\r\n\r\nfalse\r\n"),
            "{body}"
        );
    }
}
