//! The event-stream frame decoder under the `invoke-stream` transport: AWS's
//! `aws-smithy-eventstream`, which the Lambda SDK uses to split `InvokeWithResponseStream`
//! responses (prelude, headers, CRCs) into the payload chunks the transport reads.
//!
//! Properties: frames decode the same whatever the pieces the bytes arrive in; what the encoder
//! writes decodes to the same message.
#![no_main]

use arbitrary::Unstructured;
use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder, write_message_to};
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{pieces, split};

/// Every message decoded until the first error or the end.
fn decode(chunks: &[&[u8]]) -> (Vec<Message>, bool) {
    let mut d = MessageFrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        loop {
            match d.decode_frame(&mut buf) {
                Ok(DecodedFrame::Complete(m)) => out.push(m),
                Ok(DecodedFrame::Incomplete) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fuzz_target!(|data: &[u8]| {
    let (control, raw) = split(data);
    let whole = decode(&[raw]);
    let cut = decode(&pieces(raw, control.sizes));
    assert_eq!(whole, cut, "the pieces changed what was decoded");

    let mut u = Unstructured::new(raw);
    let (headers, payload): (Vec<(String, u8, Vec<u8>)>, Vec<u8>) =
        u.arbitrary().unwrap_or_default();
    let headers: Vec<Header> = headers
        .iter()
        .take(8)
        .filter(|(name, _, _)| !name.is_empty() && name.len() < 128)
        .map(|(name, kind, v)| {
            let value = match kind % 3 {
                0 => HeaderValue::ByteArray(v.clone().into()),
                1 => HeaderValue::String(String::from_utf8_lossy(v).into_owned().into()),
                _ => HeaderValue::Bool(v.first().is_some_and(|b| b & 1 == 1)),
            };
            Header::new(name.clone(), value)
        })
        .collect();
    let message = Message::new_from_parts(headers, payload);
    let mut wire = Vec::new();
    if write_message_to(&message, &mut wire).is_err() {
        return;
    }
    let (got, failed) = decode(&pieces(&wire, control.sizes));
    assert!(!failed, "own frame refused");
    assert_eq!(got, vec![message], "round trip");
});
