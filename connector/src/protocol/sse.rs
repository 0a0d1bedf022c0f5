//! The SSE codec for SRI events.
//!
//! Decoding is written here rather than taken from `eventsource-stream`: that crate re-parses
//! a partial line from its start on every network read, which is quadratic in the line length
//! (48 MB/s relaying 1 MiB events, measured in `BENCHMARKS.md`), buffers lines without bound,
//! and hides comments — which carry the keepalives that must reset an idle timeout. This
//! decoder is linear, zero-copy for single-line data, bounded, and reports comments.
//!
//! Lines end in `\n` or `\r\n` (what every SRI producer writes; a lone `\r` is not a line end).
//! Both a line and a whole event (whose `data:` lines are joined) are bounded by the same cap, so
//! that an endless event of short lines is refused as surely as one endless line.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use super::events::{Event, EventKind};
use crate::Error;

/// The keepalive comment sent after a period of silence.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

/// The longest line the decoder accepts by default: the daemon's 5 MiB line plus framing.
pub const DEFAULT_MAX_LINE: usize = 8 * 1024 * 1024;

/// Encodes one event as SSE. `event.data` must be a single line (JSON text always is).
pub fn encode(event: &Event) -> Bytes {
    debug_assert!(!event.data.contains(&b'\n'), "SSE data must be one line");
    let mut buf = BytesMut::with_capacity(event.data.len() + 40);
    buf.put_slice(b"event: ");
    buf.put_slice(event.kind.as_str().as_bytes());
    buf.put_u8(b'\n');
    if let Some(id) = event.id {
        buf.put_slice(b"id: ");
        buf.put_slice(id.to_string().as_bytes());
        buf.put_u8(b'\n');
    }
    buf.put_slice(b"data: ");
    buf.put_slice(&event.data);
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// What the decoder yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete event.
    Event(Event),
    /// A comment line (e.g. a keepalive): proof of life, no data.
    Comment,
}

/// Lines from this length (or a quarter of the cap, if less) on start in a buffer of their
/// own, sized for them (shorter ones are copied on by the gateway and dropped at once, so their
/// buffer is reused in place). The quarter of the cap is what lets a fuzzer, with its small
/// inputs and caps, reach this path.
const LONG_LINE: usize = 64 * 1024;

/// Buffers kept for reuse besides the one in use: while one long event is decoded, the one
/// before may still be being written on.
const SPARES: usize = 2;

/// Spares are kept only while buffers are at most this large: past a few MiB a new allocation
/// costs little beside the line it holds, and a stream of such lines should not hold three.
const MAX_SPARE: usize = 4 * 1024 * 1024;

/// An incremental SSE decoder: feed it bytes, take items.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    /// How far `buf` has been searched for a line end.
    scanned: usize,
    /// The longest line (with its line end) of the last event: what a new buffer is sized
    /// for, since the events of one stream are alike (a plugin's blob chunks are all of one
    /// size), so that a long line is copied into it once instead of once per growth.
    expect: usize,
    /// The longest line of the event being assembled.
    longest: usize,
    /// The size `buf`'s allocation was made with (its views only show what is left of it).
    buf_size: usize,
    /// Earlier buffers (empty) and their allocations' sizes, taken back once the lines split
    /// off them are dropped, while the stream's events are long (see [`Decoder::switch`]).
    spares: Vec<(BytesMut, usize)>,
    max_line: usize,
    /// Bytes the event being assembled holds so far (field values and the joining newlines).
    pending: usize,
    event: Option<Bytes>,
    id: Option<Bytes>,
    data: Option<Bytes>,
    extra_data: Option<BytesMut>,
    /// Set by [`Decoder::one_data_line`].
    one_data_line: bool,
    /// Buffers allocated (tests count them).
    #[cfg(test)]
    allocations: usize,
    /// Set by the first error: the stream is refused, and nothing after it is kept (a caller
    /// that went on pushing would otherwise make the buffer as long as the stream).
    failed: bool,
}

impl Decoder {
    /// A decoder refusing lines, and events, over `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            scanned: 0,
            expect: 0,
            longest: 0,
            buf_size: 0,
            spares: Vec::new(),
            max_line,
            pending: 0,
            event: None,
            id: None,
            data: None,
            extra_data: None,
            failed: false,
            one_data_line: false,
            #[cfg(test)]
            allocations: 0,
        }
    }

    /// Refuses an event whose data spans several `data:` lines, as it reads the second: SRI
    /// data is one JSON line, and joined lines would reach the daemon as lines of their own.
    /// (Checked here rather than by searching each event's data for a line break afterwards:
    /// on 1 MiB objects that search was ~9% of the gateway's time.)
    pub fn one_data_line(mut self) -> Self {
        self.one_data_line = true;
        self
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.buf.capacity() - self.buf.len() < bytes.len() {
            self.make_room(bytes.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    fn long_line(&self) -> usize {
        LONG_LINE.min(self.max_line / 4)
    }

    /// Makes room for `incoming` more bytes after the partial line `buf` holds: in place if
    /// every line split off the buffer is gone, else in another buffer sized for the longest
    /// line of the last event and half again, or for double the partial line (so that an
    /// unexpectedly long line still costs linear time).
    fn make_room(&mut self, incoming: usize) {
        let partial = self.buf.len();
        if self.expect < self.long_line() && partial < self.long_line() {
            // Short lines are copied on and dropped at once, so `reserve` finds the buffer
            // unshared and reuses it in place, doubling it when too small: after a few events
            // it no longer allocates. (Sized as below instead, it allocated on most reads, and
            // relaying the SDK's 11 KB objects was ~15% slower.) Its allocation is no longer
            // known, so it is never kept as a spare.
            self.buf.reserve(incoming.max(partial));
            self.buf_size = 0;
            return;
        }
        let want = (partial + incoming)
            .max(self.expect + self.expect / 2)
            .max(2 * partial);
        if !self.buf.try_reclaim(want - partial) {
            self.switch(want);
        }
    }

    /// Moves the partial line to a buffer of at least `want` bytes: a spare whose lines are
    /// all gone, or a new one.
    ///
    /// The lines split off a buffer share its allocation until their consumer drops them, and
    /// the gateway holds a relayed line until it has been written on, so a buffer that long
    /// lines went through is seldom free again by the time the next line needs room. Left to
    /// `BytesMut::reserve`, that meant a new allocation (and its page faults) per event, and
    /// copying the partial line again whenever it outgrew one. Kept as spares, two earlier
    /// buffers are usually free again when needed.
    fn switch(&mut self, want: usize) {
        let free = self
            .spares
            .iter_mut()
            .position(|(b, _)| b.try_reclaim(want));
        let (mut next, size) = match free {
            Some(i) => self.spares.swap_remove(i),
            None => {
                #[cfg(test)]
                {
                    self.allocations += 1;
                }
                let fresh = BytesMut::with_capacity(want);
                let size = fresh.capacity();
                (fresh, size)
            }
        };
        next.extend_from_slice(&self.buf);
        let mut previous = std::mem::replace(&mut self.buf, next);
        let previous_size = std::mem::replace(&mut self.buf_size, size);
        previous.clear();
        if want > MAX_SPARE {
            self.spares.clear();
        } else if previous_size > 0 && previous_size <= MAX_SPARE {
            if self.spares.len() == SPARES {
                self.spares.remove(0);
            }
            self.spares.push((previous, previous_size));
        }
    }

    /// The next complete item, if the bytes so far hold one. After an error the decoder is
    /// done: every later call says so, and what is pushed is dropped.
    pub fn next_item(&mut self) -> Result<Option<Item>, Error> {
        if self.failed {
            return Err(Error::Sse(
                "the stream was refused earlier; nothing after that is read".into(),
            ));
        }
        let item = self.scan();
        if item.is_err() {
            self.failed = true;
            self.buf = BytesMut::new();
            self.spares = Vec::new();
            self.buf_size = 0;
            self.event = None;
            self.id = None;
            self.data = None;
            self.extra_data = None;
        }
        item
    }

    fn scan(&mut self) -> Result<Option<Item>, Error> {
        loop {
            let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]) else {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line {
                    return Err(Error::Sse(format!(
                        "a line is over {} bytes",
                        self.max_line
                    )));
                }
                return Ok(None);
            };
            let end = self.scanned + pos;
            // The same bound as for a partial line above, so that whether a line is refused
            // never depends on the read its `\n` arrived in.
            if end > self.max_line {
                return Err(Error::Sse(format!(
                    "a line is over {} bytes",
                    self.max_line
                )));
            }
            let mut line = self.buf.split_to(end + 1).freeze();
            self.longest = self.longest.max(line.len());
            self.scanned = 0;
            let room = line.len() + line.len() / 2;
            if line.len() >= self.long_line()
                && self.buf.len() <= line.len() / 2
                && self.buf.capacity() < room
            {
                // Start the next long line at the head of a buffer that can hold it whole,
                // moving only what the read that ended this one brought of it (at most half a
                // line, so the copying stays linear however the bytes arrive).
                self.switch(room);
            }
            line.truncate(line.len() - 1);
            if line.last() == Some(&b'\r') {
                line.truncate(line.len() - 1);
            }
            if let Some(item) = self.line(line)? {
                return Ok(Some(item));
            }
        }
    }

    fn line(&mut self, line: Bytes) -> Result<Option<Item>, Error> {
        if line.is_empty() {
            return self.dispatch();
        }
        if line[0] == b':' {
            // A keepalive: the stream is idle, and need not hold spare buffers through it.
            self.spares.clear();
            return Ok(Some(Item::Comment));
        }
        let (name, value) = match memchr::memchr(b':', &line) {
            Some(i) => {
                let skip = usize::from(line.get(i + 1) == Some(&b' '));
                (line.slice(..i), line.slice(i + 1 + skip..))
            }
            None => (line.clone(), Bytes::new()),
        };
        self.pending += value.len() + 1;
        if self.pending > self.max_line {
            return Err(Error::Sse(format!(
                "an event is over {} bytes (its `data:` lines add up past the cap)",
                self.max_line
            )));
        }
        match name.as_ref() {
            // Copied, not sliced: a field waiting for its event's end would otherwise hold the
            // whole buffer its line came in (and a hostile stream could spread its fields over
            // several), for the sake of a few bytes.
            b"event" => self.event = Some(Bytes::copy_from_slice(&value)),
            b"id" => self.id = Some(Bytes::copy_from_slice(&value)),
            b"data" => match (&self.data, &mut self.extra_data) {
                (None, _) => self.data = Some(value),
                (Some(_), _) if self.one_data_line => {
                    // Named only if it is an SRI event: the name is the function's text, and
                    // goes on to the daemon and the logs.
                    let kind = self
                        .event
                        .as_deref()
                        .and_then(|k| std::str::from_utf8(k).ok())
                        .and_then(|k| k.parse::<EventKind>().ok())
                        .map_or("an".to_owned(), |k| format!("a `{k}`"));
                    return Err(Error::Sse(format!(
                        "{kind} event's data spans several `data:` lines; SRI data is one JSON \
                         line"
                    )));
                }
                (Some(first), extra) => {
                    let buf = extra.get_or_insert_with(|| BytesMut::from(first.as_ref()));
                    buf.put_u8(b'\n');
                    buf.put_slice(&value);
                }
            },
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Result<Option<Item>, Error> {
        self.pending = 0;
        self.expect = std::mem::take(&mut self.longest);
        if self.expect < self.long_line() {
            // Short lines are copied on and dropped at once: their buffer is reclaimed in place.
            self.spares.clear();
        }
        let event = self.event.take();
        let id = self.id.take();
        let data = match (self.data.take(), self.extra_data.take()) {
            (_, Some(joined)) => joined.freeze(),
            (Some(d), None) => d,
            (None, None) => return Ok(None),
        };
        let name = event.unwrap_or_else(|| Bytes::from_static(b"message"));
        let name =
            std::str::from_utf8(&name).map_err(|_| Error::Sse("event name is not UTF-8".into()))?;
        let kind: EventKind = name.parse().map_err(Error::Sse)?;
        let id = match id {
            None => None,
            Some(id) => Some(
                std::str::from_utf8(&id)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        Error::Sse(format!(
                            "event id `{}` is not a number",
                            String::from_utf8_lossy(&id)
                        ))
                    })?,
            ),
        };
        Ok(Some(Item::Event(Event::new(kind, id, data))))
    }
}

/// Decodes an SSE byte stream into items (events and comments).
pub fn decode_items<S, B, E>(
    stream: S,
    max_line: usize,
) -> impl Stream<Item = Result<Item, Error>> + Unpin
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    Box::pin(futures_util::stream::unfold(
        Some((stream, Decoder::new(max_line))),
        |state| async move {
            let (mut stream, mut decoder) = state?;
            loop {
                match decoder.next_item() {
                    Ok(Some(item)) => return Some((Ok(item), Some((stream, decoder)))),
                    Ok(None) => {}
                    Err(e) => return Some((Err(e), None)),
                }
                match stream.next().await {
                    Some(Ok(chunk)) => decoder.push(chunk.as_ref()),
                    Some(Err(e)) => return Some((Err(Error::Sse(e.to_string())), None)),
                    None => return None,
                }
            }
        },
    ))
}

/// Decodes an SSE byte stream into SRI events; comments (keepalives) are skipped; an unknown
/// event name or a malformed stream is an error.
pub fn decode<S, B, E>(stream: S) -> impl Stream<Item = Result<Event, Error>> + Unpin
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    decode_items(stream, DEFAULT_MAX_LINE).filter_map(|item| {
        std::future::ready(match item {
            Ok(Item::Event(e)) => Some(Ok(e)),
            Ok(Item::Comment) => None,
            Err(e) => Some(Err(e)),
        })
    })
}

/// Decodes a whole SSE body (tests, buffered consumers).
pub async fn decode_all(body: &[u8]) -> Result<Vec<Event>, Error> {
    let chunks = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(body.to_vec())]);
    decode(chunks)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trips_with_keepalives_and_split_chunks() {
        let events = vec![
            Event::new(EventKind::Start, None, r#"{"session_id":"s"}"#),
            Event::new(EventKind::Chunk, Some(1), r#"{"a":"x: y"}"#),
            Event::new(EventKind::End, Some(2), "{}"),
        ];
        let mut wire = Vec::new();
        for (i, e) in events.iter().enumerate() {
            wire.extend_from_slice(&encode(e));
            if i == 0 {
                wire.extend_from_slice(KEEPALIVE);
            }
        }
        assert_eq!(decode_all(&wire).await.unwrap(), events);
        // Byte-at-a-time delivery decodes the same.
        let bytes = futures_util::stream::iter(
            wire.iter()
                .map(|b| Ok::<_, std::convert::Infallible>(vec![*b])),
        );
        let got: Vec<_> = decode(bytes).map(Result::unwrap).collect().await;
        assert_eq!(got, events);
        // Comments are items of their own when asked for.
        let items: Vec<_> = decode_items(
            futures_util::stream::iter([Ok::<_, std::convert::Infallible>(wire)]),
            1024,
        )
        .map(Result::unwrap)
        .collect()
        .await;
        assert_eq!(items.iter().filter(|i| **i == Item::Comment).count(), 1);
    }

    /// Found by `make fuzz` (sse_decoder's memory property, 3.5 min): pushed on after an error,
    /// the decoder kept every byte, as long as the stream.
    #[test]
    fn after_an_error_nothing_is_kept() {
        let mut d = Decoder::new(10);
        d.push(b"data: 0123456789abcdef\n");
        assert!(d.next_item().is_err());
        for _ in 0..1024 {
            d.push(&[b'x'; 1024]);
        }
        assert!(d.buf.capacity() < 1024, "{} bytes kept", d.buf.capacity());
        let again = d.next_item().unwrap_err().to_string();
        assert!(again.contains("refused earlier"), "{again}");
    }

    #[tokio::test]
    async fn follows_the_sse_field_rules() {
        let wire = b"event:chunk\r\nid: 7\r\ndata: a\r\ndata:b\r\nretry: 5\r\nunknown: x\r\n\r\n\n\nevent: end\ndata\n\n";
        let got = decode_all(wire).await.unwrap();
        assert_eq!(got[0], Event::new(EventKind::Chunk, Some(7), "a\nb"));
        assert_eq!(got[1], Event::new(EventKind::End, None, ""));
        assert_eq!(got.len(), 2, "blank lines without data dispatch nothing");
    }

    #[test]
    fn one_data_line_refuses_joined_data_as_it_reads_it() {
        let wire = b"event: chunk\ndata: a\ndata: b\n\n";
        let mut joined = Decoder::new(1024);
        joined.push(wire);
        let Ok(Some(Item::Event(e))) = joined.next_item() else {
            panic!("plain SSE joins data lines")
        };
        assert_eq!(e.data.as_ref(), b"a\nb");
        let mut one = Decoder::new(1024).one_data_line();
        one.push(&wire[..wire.len() - 1]);
        let err = one.next_item().unwrap_err().to_string();
        assert!(
            err.contains("a `chunk` event's data spans several"),
            "{err}"
        );
        // A name that is no SRI event is not echoed (it is the function's text).
        let mut one = Decoder::new(1 << 20).one_data_line();
        one.push(format!("event: {}\ndata: a\ndata: b\n", "x".repeat(1000)).as_bytes());
        let err = one.next_item().unwrap_err().to_string();
        assert!(err.contains(": an event's data spans several"), "{err}");
        assert!(!err.contains("xxx"), "{err}");
    }

    #[tokio::test]
    async fn rejects_unknown_events_and_long_lines() {
        let err = decode_all(b"event: bogus\ndata: {}\n\n").await.unwrap_err();
        assert!(err.to_string().contains("bogus"));
        let mut d = Decoder::new(10);
        d.push(b"data: 0123456789");
        assert!(
            d.next_item()
                .unwrap_err()
                .to_string()
                .contains("over 10 bytes")
        );
    }

    #[test]
    fn an_event_of_many_short_lines_is_bounded_too() {
        let mut d = Decoder::new(1000);
        d.push(b"event: chunk\n");
        let mut err = None;
        for _ in 0..1000 {
            d.push(b"data: 0123456789\n");
            match d.next_item() {
                Ok(None) => {}
                Ok(Some(item)) => panic!("no event was complete: {item:?}"),
                Err(e) => {
                    err = Some(e.to_string());
                    break;
                }
            }
        }
        let err = err.expect("the event grew past the cap without an error");
        assert!(err.contains("an event is over 1000 bytes"), "{err}");
        // Events under the cap, one after another, are fine: the count restarts per event.
        let mut d = Decoder::new(1000);
        for _ in 0..100 {
            d.push(b"event: chunk\ndata: 0123456789\ndata: 0123456789\n\n");
            assert!(matches!(d.next_item(), Ok(Some(Item::Event(_)))));
        }
    }

    /// Found by `fuzz/fuzz_targets/sse_decoder.rs`: a line over the cap was refused when it
    /// arrived in pieces but accepted when its `\n` came in the same read (a comment or an
    /// ignored field adds nothing to the event's count), so the outcome hung on TCP segmentation.
    #[test]
    fn a_long_line_is_refused_however_it_arrives() {
        for line in [
            &b": a comment of twenty bytes"[..],
            b"retry-or-some-unknown-field",
        ] {
            let wire = [line, b"\n\n"].concat();
            let mut whole = Decoder::new(10);
            whole.push(&wire);
            let mut pieces = Decoder::new(10);
            pieces.push(&wire[..12]);
            let first = pieces.next_item();
            let err = whole.next_item().map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("a line is over 10 bytes"), "{err}");
            assert_eq!(first.map(|_| ()).unwrap_err().to_string(), err);
        }
        // A `\r` before the `\n` counts (a piece may end with it), the `\n` does not.
        let mut d = Decoder::new(10);
        d.push(b"id: 12345\r\n");
        assert_eq!(d.next_item().unwrap(), None);
        let mut d = Decoder::new(10);
        d.push(b"id: 123456\r\n");
        assert!(d.next_item().is_err());
    }

    /// A relayed event lives until it has been written on, so the gateway holds each one while
    /// the next arrives. Decoding such a stream of ~1 MiB events must not allocate (and copy
    /// into) a new buffer per event, let alone per read.
    #[test]
    fn a_stream_of_long_events_reuses_its_buffers() {
        let data = vec![b'x'; 1 << 20];
        let event = encode(&Event::new(EventKind::Chunk, Some(1), data.clone()));
        let wire = event.repeat(256);
        let mut d = Decoder::new(DEFAULT_MAX_LINE);
        let mut held: Option<Event> = None;
        let mut events = 0;
        // Reads of an odd size, so that events and reads never line up.
        for piece in wire.chunks(200_003) {
            d.push(piece);
            while let Some(item) = d.next_item().unwrap() {
                let Item::Event(e) = item else {
                    panic!("no comments were sent")
                };
                assert_eq!(e.data.len(), data.len());
                events += 1;
                // The previous event has been "written on": drop it now, as the gateway does.
                held = Some(e);
            }
        }
        drop(held);
        assert_eq!(events, 256);
        // The first event grows by doubling; from then on three buffers take turns.
        assert!(
            d.allocations <= 8,
            "{} allocations for 256 events",
            d.allocations
        );
    }

    #[test]
    fn spare_buffers_go_once_the_events_are_short_again() {
        let mut d = Decoder::new(DEFAULT_MAX_LINE);
        let long = encode(&Event::new(EventKind::Chunk, None, vec![b'x'; 100_000]));
        let mut held = Vec::new();
        for piece in long.repeat(4).chunks(30_001) {
            d.push(piece);
            while let Some(item) = d.next_item().unwrap() {
                held.push(item);
            }
        }
        assert_eq!(held.len(), 4);
        assert!(!d.spares.is_empty(), "long events keep spares");
        d.push(&encode(&Event::new(EventKind::End, None, "{}")));
        assert!(matches!(d.next_item(), Ok(Some(Item::Event(_)))));
        assert!(d.spares.is_empty(), "{} spare buffers", d.spares.len());
    }

    #[test]
    fn lines_of_megabytes_keep_no_spares() {
        let mut d = Decoder::new(DEFAULT_MAX_LINE);
        let event = encode(&Event::new(EventKind::Chunk, None, vec![b'x'; 3 << 20]));
        let mut held = Vec::new();
        for piece in event.repeat(4).chunks(1 << 20) {
            d.push(piece);
            while let Some(item) = d.next_item().unwrap() {
                held.push(item);
            }
        }
        assert_eq!(held.len(), 4);
        assert!(d.spares.is_empty(), "{} spare buffers", d.spares.len());
    }

    #[test]
    fn long_lines_arriving_in_pieces_cost_linear_time() {
        // 8 MiB line in 4 KiB pieces: quadratic rescanning would take minutes.
        let mut d = Decoder::new(DEFAULT_MAX_LINE + 64);
        let started = std::time::Instant::now();
        d.push(b"event: chunk\ndata: ");
        let piece = vec![b'x'; 4096];
        for _ in 0..2048 {
            d.push(&piece);
            assert_eq!(d.next_item().unwrap(), None);
        }
        d.push(b"\n\n");
        let Some(Item::Event(e)) = d.next_item().unwrap() else {
            panic!("no event")
        };
        assert_eq!(e.data.len(), 8 * 1024 * 1024);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
