//! The bootstrap's Function URL event parsing (`bootstrap::lambda::parse_event`): on Lambda the
//! event is whatever the invoker sent.
//!
//! Properties: any bytes are parsed or refused with a message, never a panic; every event the
//! connector's `invoke-stream` transport writes (any action, headers and body) is one the
//! bootstrap parses.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &[u8]| {
    if let Err(e) = bootstrap::lambda::parse_event(raw) {
        assert!(e.contains("Function URL"), "{e}");
    }
    {
        let mut u = arbitrary::Unstructured::new(raw);
        let (action, pairs, envelope): (String, Vec<(String, Vec<u8>)>, Vec<u8>) =
            u.arbitrary().unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        for (k, v) in &pairs {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::try_from(k.as_str()),
                http::HeaderValue::from_bytes(v),
            ) {
                headers.append(k, v);
            }
        }
        let event = connector::transport::wire::request_event(&action, &headers, &envelope);
        bootstrap::lambda::parse_event(&event).expect("the connector's own event parses");
    }
});
