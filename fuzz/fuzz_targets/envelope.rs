//! The daemon's request envelope (`connector::protocol::envelope`), parsed by the gateway and
//! by every function.
//!
//! Properties: an accepted envelope keeps its bytes; its plugin line is exactly one line that
//! is the same JSON; the fields it read are the JSON's own.
#![no_main]

use bytes::Bytes;
use connector::protocol::envelope::Envelope;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::parse(Bytes::copy_from_slice(data)) else {
        return;
    };
    assert_eq!(env.bytes().as_ref(), data);
    let line = env.to_line();
    assert_eq!(line.last(), Some(&b'\n'));
    assert!(
        !line[..line.len() - 1]
            .iter()
            .any(|b| *b == b'\n' || *b == b'\r'),
        "the plugin line holds a line break"
    );
    assert!(
        std::str::from_utf8(data).is_ok(),
        "an accepted envelope is not UTF-8"
    );
    // JSON that serde_json's `Value` refuses (a lone surrogate escape) is compared no further.
    let Ok(raw) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let flat: Value = serde_json::from_slice(&line).expect("its line is JSON");
    assert_eq!(raw, flat, "flattening changed the JSON");
    assert!(!env.session_id().is_empty());
    assert_eq!(raw["session_id"].as_str(), Some(env.session_id()));
    assert_eq!(raw["event"].as_str(), Some(env.event()));
    assert_eq!(raw["data"]["action"].as_str(), env.action());
    for s in env.secrets() {
        let creds = raw["data"]["credentials"]
            .as_object()
            .expect("secrets come from credentials");
        assert!(creds.values().any(|v| v.as_str() == Some(s)));
    }
});
