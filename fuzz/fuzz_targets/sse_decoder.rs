//! The SSE decoder (`connector::protocol::sse`), which reads whatever a function sends.
//!
//! Properties: the items decoded do not depend on how the bytes were cut into pieces; with
//! `one_data_line`, nothing changes but that joined data refuses the stream; what the
//! encoder wrote decodes to the same events whatever the cuts; the decoder holds memory bounded
//! by its cap and the piece size, not by the stream's length.
#![no_main]

use arbitrary::Unstructured;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::sse::{self, Decoder, Item};
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{peak_during, pieces, split};

const KINDS: [EventKind; 6] = [
    EventKind::Start,
    EventKind::Chunk,
    EventKind::Log,
    EventKind::Error,
    EventKind::Usage,
    EventKind::End,
];

/// Every item up to the first error (the decoder is done after one), and that error.
fn decode(chunks: &[&[u8]], max_line: usize) -> (Vec<Item>, Option<String>) {
    decode_with(Decoder::new(max_line), chunks)
}

fn decode_with(mut d: Decoder, chunks: &[&[u8]]) -> (Vec<Item>, Option<String>) {
    let mut items = Vec::new();
    for c in chunks {
        d.push(c);
        loop {
            match d.next_item() {
                Ok(Some(i)) => items.push(i),
                Ok(None) => break,
                Err(e) => return (items, Some(e.to_string())),
            }
        }
    }
    (items, None)
}

fuzz_target!(|data: &[u8]| {
    let (control, raw) = split(data);
    let max_line = match control.cap {
        0 => 65536,
        n => usize::from(n),
    };
    let cut = pieces(raw, control.sizes);
    let whole = decode(&[raw], max_line);
    let split = decode(&cut, max_line);
    assert_eq!(whole, split, "the pieces changed what was decoded");

    // One data line (the gateway's client): the same items up to the first event whose data
    // was joined, where the stream is refused; a stream it does not refuse decodes the same.
    let (items, err) = decode_with(Decoder::new(max_line).one_data_line(), &cut);
    let joined = whole
        .0
        .iter()
        .position(|i| matches!(i, Item::Event(e) if e.data.contains(&b'\n')));
    assert_eq!(
        items[..],
        whole.0[..joined.unwrap_or(whole.0.len()).min(items.len())]
    );
    match (joined, &err) {
        (Some(_), Some(e)) => assert!(e.contains("several `data:` lines"), "{e}"),
        (Some(k), None) => panic!("event {k}'s data was joined, and not refused"),
        (None, None) => assert_eq!((&items, &err), (&whole.0, &whole.1)),
        (None, Some(_)) => {}
    }

    // Memory: O(cap + piece), never O(stream): the buffered line and the fields of one event
    // (each may pin a buffer of up to twice the cap plus a piece), whatever the stream's length.
    let largest = cut.iter().map(|c| c.len()).max().unwrap_or(0);
    let (_, peak) = peak_during(|| {
        let mut d = Decoder::new(max_line);
        for c in &cut {
            d.push(c);
            while let Ok(Some(item)) = d.next_item() {
                drop(item);
            }
        }
    });
    let bound = 16 * (max_line + largest) + 4096;
    assert!(peak <= bound, "decoder held {peak} bytes (bound {bound})");

    // Round trip: what `encode` writes (one-line data; a trailing CR would be a line end's).
    let events: Vec<(u8, Option<u64>, String)> =
        Unstructured::new(raw).arbitrary().unwrap_or_default();
    let events: Vec<Event> = events
        .iter()
        .map(|(k, id, data)| {
            let data: String = data.chars().filter(|c| *c != '\n').collect();
            let data = data.trim_end_matches('\r').to_owned();
            Event::new(KINDS[usize::from(*k) % KINDS.len()], *id, data)
        })
        .collect();
    let mut wire = Vec::new();
    for (i, e) in events.iter().enumerate() {
        wire.extend_from_slice(&sse::encode(e));
        if i % 2 == 0 {
            wire.extend_from_slice(sse::KEEPALIVE);
        }
    }
    let (items, err) = decode(&pieces(&wire, control.sizes), sse::DEFAULT_MAX_LINE);
    assert_eq!(err, None);
    let got: Vec<Event> = items
        .into_iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e),
            Item::Comment => None,
        })
        .collect();
    assert_eq!(got, events, "decode(encode(events)) != events");
});
