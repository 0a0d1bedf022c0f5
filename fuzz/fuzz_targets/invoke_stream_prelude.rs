//! The response prelude of `InvokeWithResponseStream` payloads
//! (`connector::transport::wire::split_prelude`): JSON and 8 NUL bytes that a function
//! writes before its SSE, read by the connector.
//!
//! Properties: the answer never changes once given, however many more bytes arrive; the body
//! starts inside what was received; what the bootstrap writes (its status and headers, then the
//! separator) is read back with that status, the body starting right after the separator.
#![no_main]

use arbitrary::Unstructured;
use connector::transport::wire::{Head, MAX_PRELUDE_BYTES, split_prelude};
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{pieces, split};

/// The answer once decided, feeding `data` in pieces (`None`: still undecided at the end).
fn feed(data: &[u8], sizes: &[u8]) -> Option<Result<Head, String>> {
    let mut seen = 0;
    for p in pieces(data, sizes) {
        seen += p.len();
        match split_prelude(&data[..seen]) {
            Ok(Head::NeedMore) => {}
            decided => return Some(decided),
        }
    }
    None
}

fuzz_target!(|data: &[u8]| {
    let (control, raw) = split(data);
    if let Some(first) = feed(raw, control.sizes) {
        let last = split_prelude(raw);
        match (&first, &last) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "the answer changed with more bytes"),
            (Err(_), Err(_)) => {}
            _ => panic!("decided {first:?}, then {last:?}"),
        }
        if let Ok(Head::Prelude { body_start, .. }) = first {
            assert!(body_start <= raw.len() && body_start <= MAX_PRELUDE_BYTES + 8);
        }
    }

    let mut u = Unstructured::new(raw);
    let (status, headers, body): (u16, Vec<(String, String)>, Vec<u8>) =
        u.arbitrary().unwrap_or_default();
    let status = 100 + status % 500;
    let headers: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into()))
        .collect();
    let prelude =
        serde_json::to_vec(&serde_json::json!({"statusCode": status, "headers": headers}))
            .expect("JSON");
    if prelude.len() > MAX_PRELUDE_BYTES {
        return;
    }
    let mut wire = prelude.clone();
    wire.extend_from_slice(&[0; 8]);
    wire.extend_from_slice(&body);
    let got = feed(&wire, control.sizes).expect("a whole prelude is decided");
    assert_eq!(
        got,
        Ok(Head::Prelude {
            status,
            body_start: prelude.len() + 8
        })
    );
});
