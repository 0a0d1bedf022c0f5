//! The launch upload (`connector::server::read_upload`): the multipart form the daemon posts
//! (the package, its filename, metadata and the `verified` flag).
//!
//! Properties: any body is read or refused with a failed `healthz` stage line, never a panic;
//! a well-formed form gives back exactly the parts it carried (the last of a repeated name).
#![no_main]

use arbitrary::Unstructured;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart};
use connector::server::{Upload, read_upload};
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{runtime, split};

/// The boundary of the raw bodies (seeds use it).
const RAW_BOUNDARY: &str = "sri-fuzz-boundary";

const NAMES: [&str; 5] = ["context", "verified", "metadata", "other", "context"];

fn read(boundary: &str, body: Vec<u8>) -> Option<Result<Upload, connector::launch::StageLine>> {
    let req = http::Request::builder()
        .method("POST")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(body))
        .ok()?;
    runtime().block_on(async {
        let form = Multipart::from_request(req, &()).await.ok()?;
        Some(read_upload(form).await)
    })
}

fuzz_target!(|data: &[u8]| {
    let (control, raw) = split(data);
    if control.flags & 1 == 0 {
        if let Some(Err(line)) = read(RAW_BOUNDARY, raw.to_vec()) {
            assert_eq!(
                (line.stage.as_str(), line.state.as_str()),
                ("healthz", "failed")
            );
        }
        return;
    }
    let token = |c: char| c.is_ascii_alphanumeric() || "@._-".contains(c);
    let mut u = Unstructured::new(raw);
    let (boundary, parts): (String, Vec<(u8, Option<String>, Vec<u8>)>) =
        u.arbitrary().unwrap_or_default();
    // `@` is a MIME tspecial: a boundary holding it must be quoted.
    let bchar = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    let boundary: String = boundary.chars().filter(|c| bchar(*c)).take(40).collect();
    let boundary = format!("sri{boundary}");
    let mut body = Vec::new();
    let mut want = Upload::default();
    for (kind, filename, content) in &parts {
        let name = NAMES[usize::from(*kind) % NAMES.len()];
        let filename: Option<String> = filename
            .as_ref()
            .map(|f| f.chars().filter(|c| token(*c)).take(60).collect());
        if content
            .windows(boundary.len() + 2)
            .any(|w| w[2..] == *boundary.as_bytes())
        {
            return; // content that holds the boundary is not a well-formed part
        }
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let disposition = match &filename {
            Some(f) => {
                format!("Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\n")
            }
            None => format!("Content-Disposition: form-data; name=\"{name}\"\r\n"),
        };
        body.extend_from_slice(disposition.as_bytes());
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
        match name {
            "context" => {
                want.context = Some(content.clone().into());
                want.filename = filename;
            }
            "verified" => want.verified = content == b"true",
            "metadata" => want.metadata = Some(String::from_utf8_lossy(content).into_owned()),
            _ => {}
        }
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let got = read(&boundary, body)
        .expect("a well-formed form")
        .expect("a well-formed form is read");
    assert_eq!(got.context, want.context);
    assert_eq!(got.filename, want.filename);
    assert_eq!(got.metadata, want.metadata);
    assert_eq!(got.verified, want.verified);
});
