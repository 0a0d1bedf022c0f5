//! The SSE decoder (`connector::protocol::sse`), which reads whatever a function sends.
//!
//! Properties: the items decoded do not depend on how the bytes were cut into pieces; decoded
//! with their data in pieces (the gateway's path), the same items, each piece a view of the
//! bytes pushed or a join of short ones, and few of them; with
//! `one_data_line`, nothing changes but that joined data refuses the stream; what the
//! encoder wrote decodes to the same events whatever the cuts; the decoder holds memory bounded
//! by its cap and the piece size, not by the stream's length.
#![no_main]

use arbitrary::Unstructured;
use bytes::Bytes;
use connector::protocol::events::{Event, EventKind};
use connector::protocol::sse::{self, Decoder, Item, PiecedEvent};
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

/// [`decode_with`] through `push_bytes` and `next_pieced`, on views of `wire`, cut by `sizes`.
fn decode_pieced(
    wire: &Bytes,
    sizes: &[u8],
    max_line: usize,
) -> (Vec<Item<PiecedEvent>>, Option<String>) {
    let mut d = Decoder::new(max_line);
    let mut items = Vec::new();
    for c in pieces(wire, sizes) {
        d.push_bytes(wire.slice_ref(c));
        loop {
            match d.next_pieced() {
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

    // In pieces: the same items; a piece is a view of what was pushed unless short pieces were
    // joined; a line's pieces are bounded by the cap, not by the number of reads.
    let wire = Bytes::copy_from_slice(raw);
    let (pieced, err) = decode_pieced(&wire, control.sizes, max_line);
    let min_piece = 4096.min(max_line / 16).max(1);
    for item in &pieced {
        let Item::Event(e) = item else { continue };
        let parts = e.data.parts();
        assert!(parts.iter().all(|p| !p.is_empty()), "an empty piece");
        assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), e.data.len());
        assert!(
            parts.len() <= 2 * e.data.len() / min_piece + 2,
            "{} pieces for {} bytes (shortest kept {min_piece})",
            parts.len(),
            e.data.len()
        );
        let within = |p: &Bytes| {
            let start = wire.as_ptr() as usize;
            (start..start + wire.len()).contains(&(p.as_ptr() as usize))
        };
        let copied = parts.iter().filter(|p| !within(p)).count();
        assert!(
            copied <= parts.len().div_ceil(2),
            "{copied} of {} pieces copied",
            parts.len()
        );
    }
    let pieced: Vec<Item> = pieced.into_iter().map(Item::joined).collect();
    assert_eq!((pieced, err), split, "pieced decoding differs");

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
