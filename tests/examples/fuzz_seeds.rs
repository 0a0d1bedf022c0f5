//! Writes the fuzz targets' seed corpora (`fuzz/corpus/<target>/`) from the code that makes the
//! real inputs: the encoders, the sample plugin, the hostile-package generator. Nothing of it
//! is committed; `make fuzz` and `make fuzz-ci` run this first.
//!
//! Inputs of the targets that take a control header (`fuzz/src/lib.rs`) start with 16 zero
//! bytes: the targets' default cap, whole 255-byte pieces.

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use connector::protocol::events::{Event, EventKind};
use connector::protocol::sse;
use harness::hostile;
use std::path::{Path, PathBuf};

const CONTROL: [u8; 16] = [0; 16];
/// Seeds larger than this are left out: the corpus stays small and fast to replay.
const MAX_SEED: usize = 256 * 1024;

fn write(dir: &Path, target: &str, seeds: &[Vec<u8>]) {
    let d = dir.join(target);
    std::fs::create_dir_all(&d).expect("corpus dir");
    for (i, s) in seeds.iter().filter(|s| s.len() <= MAX_SEED).enumerate() {
        std::fs::write(d.join(format!("seed-{i:03}")), s).expect("seed");
    }
}

fn ctl(bytes: &[u8]) -> Vec<u8> {
    [&CONTROL[..], bytes].concat()
}

const OBJ: &str = r#"{"event":"session","session_id":"s1","data":{"type":"stream","data":{"type":"text","message":{"text":"hi"}}}}"#;
const END: &str = r#"{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}"#;
const ENVELOPE: &str = r#"{"session_id":"s1","conversation_id":null,"message_id":null,"app_id":null,"endpoint_id":null,"context":{},"event":"request","data":{"action":"invoke_tool","credential_type":"api-key","credentials":{"api_key":"k-123"},"provider":"p","tool":"t","tool_parameters":{"q":"x"},"type":"tool","user_id":"u","x_unknown":[1,2]}}"#;

fn sse_streams() -> Vec<Vec<u8>> {
    let session = Event::new(
        EventKind::Start,
        None,
        r#"{"session_id":"s1","request_id":"r","cold_start":false}"#,
    );
    let full: Vec<u8> = [
        sse::encode(&session).to_vec(),
        sse::KEEPALIVE.to_vec(),
        sse::encode(&Event::new(EventKind::Chunk, Some(1), OBJ)).to_vec(),
        sse::encode(&Event::new(EventKind::Log, Some(2), OBJ)).to_vec(),
        sse::encode(&Event::new(EventKind::Usage, None, r#"{"chunks":1}"#)).to_vec(),
        sse::encode(&Event::new(EventKind::End, Some(3), END)).to_vec(),
    ]
    .concat();
    let cut = full[..full.len() / 2].to_vec();
    vec![
        full,
        cut,
        b"event:chunk\r\nid: 7\r\ndata: a\r\ndata:b\r\nretry: 5\r\nunknown: x\r\n\r\n\n\nevent: end\ndata\n\n"
            .to_vec(),
        b"event: error\ndata: {\"event\":\"session\",\"session_id\":\"s1\",\"data\":{\"type\":\"error\",\"data\":{\"error_type\":\"E\",\"message\":\"m\",\"args\":{}}}}\n\n".to_vec(),
    ]
}

fn frame(headers: Vec<Header>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_message_to(
        &Message::new_from_parts(headers, payload.to_vec()),
        &mut out,
    )
    .expect("frame");
    out
}

fn event_stream() -> Vec<Vec<u8>> {
    let h = |k: &'static str, v: &'static str| Header::new(k, HeaderValue::String(v.into()));
    let chunk = frame(
        vec![
            h(":event-type", "PayloadChunk"),
            h(":message-type", "event"),
            h(":content-type", "application/octet-stream"),
        ],
        b"data: x\n\n",
    );
    let done = frame(
        vec![
            h(":event-type", "InvokeComplete"),
            h(":message-type", "event"),
        ],
        b"{}",
    );
    let failed = frame(
        vec![
            h(":event-type", "InvokeComplete"),
            h(":message-type", "event"),
        ],
        br#"{"ErrorCode":"Unhandled","ErrorDetails":"boom"}"#,
    );
    vec![[chunk.clone(), done].concat(), [chunk, failed].concat()]
}

fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, file, content) in parts {
        b.extend_from_slice(b"--sri-fuzz-boundary\r\n");
        match file {
            Some(f) => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
                    .as_bytes(),
            ),
            None => b.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n").as_bytes(),
            ),
        }
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(content);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(b"--sri-fuzz-boundary--\r\n");
    b
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let streams = sse_streams();
    write(
        &dir,
        "sse_decoder",
        &streams.iter().map(|s| ctl(s)).collect::<Vec<_>>(),
    );
    write(
        &dir,
        "gateway_ndjson",
        &streams.iter().map(|s| ctl(s)).collect::<Vec<_>>(),
    );
    let lines = format!("{OBJ}\n{END}\nnot json\n\n{OBJ}");
    write(&dir, "plugin_lines", &[ctl(lines.as_bytes())]);
    write(
        &dir,
        "eventstream_frames",
        &event_stream().iter().map(|s| ctl(s)).collect::<Vec<_>>(),
    );
    let prelude = br#"{"statusCode":200,"headers":{"content-type":"text/event-stream"}}"#;
    write(
        &dir,
        "invoke_stream_prelude",
        &[
            ctl(&[&prelude[..], &[0; 8], &streams[0]].concat()),
            ctl(br#"{"statusCode":403}"#),
            ctl(&streams[0]),
        ],
    );
    let mut headers = http::HeaderMap::new();
    headers.insert("x-dify-plugin-session", "s1".parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    write(
        &dir,
        "function_url_event",
        &[
            connector::transport::wire::request_event("invoke_tool", &headers, ENVELOPE.as_bytes()),
            connector::transport::wire::request_event("invoke_tool", &headers, &[0xff, 0xfe]),
        ],
    );
    write(
        &dir,
        "envelope",
        &[
            ENVELOPE.as_bytes().to_vec(),
            br#"{"session_id":"s","event":"request","data":{}}"#.to_vec(),
        ],
    );
    let sample = hostile::raw_zip(&hostile::sample_entries(|m| m));
    let manifest = std::fs::read(harness::plugin_dir("sample").join("manifest.yaml"))
        .expect("sample manifest");
    write(&dir, "manifest", &[manifest]);
    let reqs =
        std::fs::read(harness::plugin_dir("sample").join("requirements.txt")).unwrap_or_default();
    write(
        &dir,
        "requirements",
        &[
            [&[0u8][..], &reqs].concat(),
            b"\x00requests[socks]>=2.31 ; python_version >= \"3.11\" \\\n    --hash=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n-r other.txt\n".to_vec(),
            b"\x01[project]\nname = \"p\"\ndependencies = [\"dify_plugin>=0.4,<0.8\", \"httpx[http2]; sys_platform == 'linux'\"]\n".to_vec(),
        ],
    );
    let mut packages: Vec<Vec<u8>> = hostile::corpus(1).into_iter().map(|c| c.bytes).collect();
    packages.push(sample.clone());
    write(&dir, "intake", &packages);
    write(
        &dir,
        "launch_multipart",
        &[ctl(&multipart(&[
            ("context", Some("a@b@0.0.1@x.difypkg"), &sample),
            ("verified", None, b"true"),
            (
                "metadata",
                None,
                br#"{"plugin_unique_identifier":"a/b:0.0.1@x"}"#,
            ),
        ]))],
    );
    println!("seeds written to {}", dir.display());
}
