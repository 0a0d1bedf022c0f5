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

/// An incremental SSE decoder: feed it bytes, take items.
#[derive(Debug)]
pub struct Decoder {
    buf: BytesMut,
    /// How far `buf` has been searched for a line end.
    scanned: usize,
    max_line: usize,
    /// Bytes the event being assembled holds so far (field values and the joining newlines).
    pending: usize,
    event: Option<Bytes>,
    id: Option<Bytes>,
    data: Option<Bytes>,
    extra_data: Option<BytesMut>,
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
            max_line,
            pending: 0,
            event: None,
            id: None,
            data: None,
            extra_data: None,
            failed: false,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        // Grow geometrically. Once a line has been split off, the buffer is shared with it and
        // `BytesMut` then reallocates to the exact size asked, so a 1 MiB event arriving in
        // 200 KiB reads was copied again on every read (~3 times over); doubling copies each
        // byte at most once more.
        let spare = self.buf.capacity() - self.buf.len();
        if spare < bytes.len() {
            self.buf.reserve(bytes.len().max(self.buf.len()));
        }
        self.buf.extend_from_slice(bytes);
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
            self.scanned = 0;
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
            b"event" => self.event = Some(value),
            b"id" => self.id = Some(value),
            b"data" => match (&self.data, &mut self.extra_data) {
                (None, _) => self.data = Some(value),
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
