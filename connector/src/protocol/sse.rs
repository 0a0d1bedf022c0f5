//! The SSE codec for SRI events.
//!
//! Decoding is written here rather than taken from `eventsource-stream`: that crate re-parses
//! a partial line from its start on every network read, which is quadratic in the line length
//! (48 MB/s relaying 1 MiB events, measured in `BENCHMARKS.md`), buffers lines without bound,
//! and hides comments — which carry the keepalives that must reset an idle timeout. This
//! decoder is linear, bounded, reports comments, and copies no long line: data that spanned
//! several reads is handed on as views of those reads ([`Pieces`]).
//!
//! Lines end in `\n` or `\r\n` (what every SRI producer writes; a lone `\r` is not a line end).
//! Both a line and a whole event (whose `data:` lines are joined) are bounded by the same cap, so
//! that an endless event of short lines is refused as surely as one endless line.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use std::collections::VecDeque;

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

/// What the decoder yields: by default events with their data in one buffer ([`Event`]); from
/// [`Decoder::next_pieced`], events with their data in the pieces it arrived in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<E = Event> {
    /// A complete event.
    Event(E),
    /// A comment line (e.g. a keepalive): proof of life, no data.
    Comment,
}

impl Item<PiecedEvent> {
    /// The same item with its event's data in one buffer.
    pub fn joined(self) -> Item {
        match self {
            Self::Event(e) => Item::Event(e.into_event()),
            Self::Comment => Item::Comment,
        }
    }
}

/// An [`Event`] whose data is still in the pieces it arrived in: what the gateway writes on to
/// the daemon, piece by piece, without joining a long object into one buffer first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PiecedEvent {
    /// What the event is.
    pub kind: EventKind,
    /// Sequence number (1, 2, … within a stream).
    pub id: Option<u64>,
    /// One line of JSON text, in pieces.
    pub data: Pieces,
}

impl PiecedEvent {
    /// The event with its data in one buffer (a copy only if it came in several pieces).
    pub fn into_event(self) -> Event {
        Event::new(self.kind, self.id, self.data.into_bytes())
    }
}

/// Bytes in the pieces they arrived in, in order: views of the reads themselves, except that
/// pieces shorter than the decoder's minimum are joined by copying (so that a peer trickling
/// bytes cannot make the list long, nor pin a large read buffer with a few bytes). No piece is
/// empty. Equal when the bytes are, however they are cut.
#[derive(Clone, Debug, Default)]
pub struct Pieces {
    parts: Vec<Bytes>,
    len: usize,
}

impl Pieces {
    /// How many bytes the pieces hold together.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// The pieces, in order, to write on as they are.
    pub fn into_parts(self) -> Vec<Bytes> {
        self.parts
    }

    /// The bytes in one buffer: the only piece itself, or a copy of several joined.
    pub fn into_bytes(mut self) -> Bytes {
        if self.parts.len() <= 1 {
            return self.parts.pop().unwrap_or_default();
        }
        self.to_bytes()
    }

    /// The bytes in one buffer, leaving the pieces as they are.
    pub fn to_bytes(&self) -> Bytes {
        match &self.parts[..] {
            [] => Bytes::new(),
            [one] => one.clone(),
            parts => {
                let mut joined = Vec::with_capacity(self.len);
                for p in parts {
                    joined.extend_from_slice(p);
                }
                joined.into()
            }
        }
    }

    fn push(&mut self, piece: Bytes) {
        if !piece.is_empty() {
            self.len += piece.len();
            self.parts.push(piece);
        }
    }

    /// Drops the first `n` bytes, which lie in the first piece.
    fn skip(&mut self, n: usize) {
        let first = &mut self.parts[0];
        debug_assert!(n <= first.len());
        first.advance(n);
        self.len -= n;
        if first.is_empty() {
            self.parts.remove(0);
        }
    }

    /// Drops a `\r` at the end (the `\r` of a `\r\n` line end).
    fn strip_cr(&mut self) {
        if let Some(last) = self.parts.last_mut()
            && last.last() == Some(&b'\r')
        {
            last.truncate(last.len() - 1);
            self.len -= 1;
            if last.is_empty() {
                self.parts.pop();
            }
        }
    }
}

impl From<Bytes> for Pieces {
    fn from(bytes: Bytes) -> Self {
        let mut p = Self::default();
        p.push(bytes);
        p
    }
}

impl PartialEq for Pieces {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len
            && self
                .parts
                .iter()
                .flat_map(|p| p.iter())
                .eq(other.parts.iter().flat_map(|p| p.iter()))
    }
}

impl Eq for Pieces {}

/// Pieces of a line shorter than this (or than a sixteenth of the cap, if less) are copied
/// together rather than kept as views: it bounds the pieces of a line at about 2 × cap / this,
/// and a few bytes do not hold a read's whole buffer. The sixteenth of the cap is what lets a
/// fuzzer, with its small inputs and caps, reach the path of several pieces.
const MIN_PIECE: usize = 4096;

/// An incremental SSE decoder: feed it bytes, take items.
///
/// It copies no long line: a line that arrives over several reads is kept as views of those
/// reads ([`Pieces`]) until its end arrives. (Joining them into one buffer, as this decoder did
/// before, copied every byte of a long object once more: 15% of the gateway's CPU time relaying
/// ~1 MiB objects.)
#[derive(Debug)]
pub struct Decoder {
    /// Bytes pushed and not yet searched for a line end, in order.
    input: VecDeque<Bytes>,
    /// The line being received, as far as it has arrived (no piece holds a line end)...
    partial: Pieces,
    /// ...followed by its latest short pieces, copied together.
    tail: BytesMut,
    max_line: usize,
    /// Bytes the event being assembled holds so far (field values and the joining newlines).
    pending: usize,
    event: Option<Bytes>,
    id: Option<Bytes>,
    data: Option<Pieces>,
    extra_data: Option<BytesMut>,
    /// Set by [`Decoder::one_data_line`].
    one_data_line: bool,
    /// Set by the first error: the stream is refused, and nothing after it is kept (a caller
    /// that went on pushing would otherwise make the buffer as long as the stream).
    failed: bool,
}

impl Decoder {
    /// A decoder refusing lines, and events, over `max_line` bytes.
    pub fn new(max_line: usize) -> Self {
        Self {
            input: VecDeque::new(),
            partial: Pieces::default(),
            tail: BytesMut::new(),
            max_line,
            pending: 0,
            event: None,
            id: None,
            data: None,
            extra_data: None,
            failed: false,
            one_data_line: false,
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

    /// Adds received bytes (copied; see [`Decoder::push_bytes`]).
    pub fn push(&mut self, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.push_bytes(Bytes::copy_from_slice(bytes));
        }
    }

    /// Adds received bytes without copying them: events, comments and lines refer to them.
    pub fn push_bytes(&mut self, bytes: Bytes) {
        if !self.failed && !bytes.is_empty() {
            self.input.push_back(bytes);
        }
    }

    fn min_piece(&self) -> usize {
        MIN_PIECE.min(self.max_line / 16).max(1)
    }

    fn partial_len(&self) -> usize {
        self.partial.len() + self.tail.len()
    }

    /// The next complete item, if the bytes so far hold one, with its data in one buffer.
    /// After an error the decoder is done: every later call says so, and what is pushed is
    /// dropped.
    pub fn next_item(&mut self) -> Result<Option<Item>, Error> {
        Ok(self.next_pieced()?.map(Item::joined))
    }

    /// [`Decoder::next_item`], with the event's data in the pieces it arrived in.
    pub fn next_pieced(&mut self) -> Result<Option<Item<PiecedEvent>>, Error> {
        if self.failed {
            return Err(Error::Sse(
                "the stream was refused earlier; nothing after that is read".into(),
            ));
        }
        let item = self.scan();
        if item.is_err() {
            self.failed = true;
            self.input = VecDeque::new();
            self.partial = Pieces::default();
            self.tail = BytesMut::new();
            self.event = None;
            self.id = None;
            self.data = None;
            self.extra_data = None;
        }
        item
    }

    fn scan(&mut self) -> Result<Option<Item<PiecedEvent>>, Error> {
        while let Some(mut read) = self.input.pop_front() {
            let Some(pos) = memchr::memchr(b'\n', &read) else {
                self.keep(read);
                if self.partial_len() > self.max_line {
                    return Err(Error::Sse(format!(
                        "a line is over {} bytes",
                        self.max_line
                    )));
                }
                continue;
            };
            // The same bound as for a partial line above, so that whether a line is refused
            // never depends on the read its `\n` arrived in.
            if self.partial_len() + pos > self.max_line {
                return Err(Error::Sse(format!(
                    "a line is over {} bytes",
                    self.max_line
                )));
            }
            let mut head = read.split_to(pos + 1);
            if !read.is_empty() {
                self.input.push_front(read);
            }
            head.truncate(pos);
            let mut line = self.take_line(head);
            line.strip_cr();
            if let Some(item) = self.line(line)? {
                return Ok(Some(item));
            }
        }
        Ok(None)
    }

    /// Adds a read with no line end to the partial line.
    fn keep(&mut self, piece: Bytes) {
        if piece.len() < self.min_piece() {
            self.tail.extend_from_slice(&piece);
            return;
        }
        if !self.tail.is_empty() {
            self.partial.push(self.tail.split().freeze());
        }
        self.partial.push(piece);
    }

    /// The partial line completed by `head`, the read's bytes up to its line end.
    fn take_line(&mut self, head: Bytes) -> Pieces {
        if self.partial.is_empty() && self.tail.is_empty() {
            return Pieces::from(head);
        }
        let mut line = std::mem::take(&mut self.partial);
        if !self.tail.is_empty() {
            if head.len() < self.min_piece() {
                self.tail.extend_from_slice(&head);
                line.push(self.tail.split().freeze());
                return line;
            }
            line.push(self.tail.split().freeze());
        }
        line.push(head);
        line
    }

    fn line(&mut self, mut line: Pieces) -> Result<Option<Item<PiecedEvent>>, Error> {
        let Some(first) = line.parts.first() else {
            return self.dispatch();
        };
        if first[0] == b':' {
            return Ok(Some(Item::Comment));
        }
        // A field's name, its colon and the space after it are read from the first piece. If a
        // read ended among them, the line is joined first: a copy, but a rare one, since reads
        // are long and names short.
        if line.parts.len() > 1 && memchr::memchr(b':', first).is_none_or(|i| i + 1 >= first.len())
        {
            line = Pieces::from(line.to_bytes());
        }
        let first = &line.parts[0];
        let (name, value) = match memchr::memchr(b':', first) {
            Some(i) => {
                let skip = usize::from(first.get(i + 1) == Some(&b' '));
                let name = first.slice(..i);
                line.skip(i + 1 + skip);
                (name, line)
            }
            None => (line.into_bytes(), Pieces::default()),
        };
        self.pending += value.len() + 1;
        if self.pending > self.max_line {
            return Err(Error::Sse(format!(
                "an event is over {} bytes (its `data:` lines add up past the cap)",
                self.max_line
            )));
        }
        match name.as_ref() {
            // Copied, not kept as views: a field waiting for its event's end would otherwise
            // hold the whole read its line came in (and a hostile stream could spread its
            // fields over several), for the sake of a few bytes.
            b"event" => self.event = Some(Bytes::copy_from_slice(&value.to_bytes())),
            b"id" => self.id = Some(Bytes::copy_from_slice(&value.to_bytes())),
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
                    let buf = extra.get_or_insert_with(|| BytesMut::from(&first.to_bytes()[..]));
                    buf.put_u8(b'\n');
                    for p in value.parts() {
                        buf.put_slice(p);
                    }
                }
            },
            _ => {}
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Result<Option<Item<PiecedEvent>>, Error> {
        self.pending = 0;
        let event = self.event.take();
        let id = self.id.take();
        let data = match (self.data.take(), self.extra_data.take()) {
            (_, Some(joined)) => Pieces::from(joined.freeze()),
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
        Ok(Some(Item::Event(PiecedEvent { kind, id, data })))
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
        assert!(
            d.input.is_empty() && d.tail.capacity() < 1024,
            "{} reads kept",
            d.input.len()
        );
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

    /// The gateway's path: a ~1 MiB object arriving in ~200 KB reads comes out as views of
    /// those reads (no byte copied), a piece per read; joined, it is the object.
    #[test]
    fn a_long_line_over_several_reads_is_handed_on_as_those_reads() {
        let data: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        let event = encode(&Event::new(EventKind::Chunk, Some(1), data.clone()));
        let wire = Bytes::from(event.repeat(5));
        let within = |p: &Bytes| {
            let (start, end) = (wire.as_ptr() as usize, wire.as_ptr() as usize + wire.len());
            (start..end).contains(&(p.as_ptr() as usize))
        };
        let mut d = Decoder::new(DEFAULT_MAX_LINE).one_data_line();
        let mut events = 0;
        let mut offset = 0;
        while offset < wire.len() {
            // Reads of an odd size, so that events and reads never line up.
            let end = (offset + 200_003).min(wire.len());
            d.push_bytes(wire.slice(offset..end));
            offset = end;
            while let Some(item) = d.next_pieced().unwrap() {
                let Item::Event(e) = item else {
                    panic!("no comments were sent")
                };
                assert_eq!(e.data.len(), data.len());
                assert!(e.data.parts().len() <= 7, "{} pieces", e.data.parts().len());
                assert!(e.data.parts().iter().all(within), "a piece was copied");
                assert_eq!(e.into_event().data, data[..]);
                events += 1;
            }
        }
        assert_eq!(events, 5);
    }

    /// A peer trickling bytes: short reads are copied together, so a line's pieces stay few
    /// whatever the reads' sizes, and its bytes are the same.
    #[test]
    fn short_reads_are_joined_so_pieces_stay_few() {
        let max = 1 << 20;
        let data = vec![b'x'; 256 * 1024];
        let wire = encode(&Event::new(EventKind::Chunk, None, data.clone()));
        for sizes in [
            &[1usize][..],
            &[1, MIN_PIECE],
            &[MIN_PIECE - 1, 1],
            &[7, 70_000],
        ] {
            let mut d = Decoder::new(max);
            let mut got = Vec::new();
            let (mut offset, mut turn) = (0, 0);
            while offset < wire.len() {
                let end = (offset + sizes[turn % sizes.len()]).min(wire.len());
                d.push(&wire[offset..end]);
                (offset, turn) = (end, turn + 1);
                while let Some(Item::Event(e)) = d.next_pieced().unwrap() {
                    got.push(e);
                }
            }
            assert_eq!(got.len(), 1, "{sizes:?}");
            let pieces = got[0].data.parts().len();
            assert!(
                pieces <= 2 * data.len() / MIN_PIECE + 2,
                "{sizes:?}: {pieces} pieces"
            );
            assert_eq!(got[0].data.to_bytes(), data[..], "{sizes:?}");
        }
        // A `\r\n` line end cut between two reads: the `\r` is not data.
        let mut d = Decoder::new(max);
        d.push_bytes(Bytes::from(
            [b"event: log\ndata: ".as_slice(), &[b'y'; MIN_PIECE], b"\r"].concat(),
        ));
        d.push_bytes(Bytes::from_static(b"\n\n"));
        let Ok(Some(Item::Event(e))) = d.next_pieced() else {
            panic!("no event")
        };
        assert_eq!(e.data.to_bytes(), vec![b'y'; MIN_PIECE]);
    }

    #[test]
    fn pieces_are_equal_when_their_bytes_are() {
        let mut a = Pieces::from(Bytes::from_static(b"ab"));
        a.push(Bytes::from_static(b"c"));
        assert_eq!(a, Pieces::from(Bytes::from_static(b"abc")));
        assert_ne!(a, Pieces::from(Bytes::from_static(b"abd")));
        assert_ne!(a, Pieces::from(Bytes::from_static(b"ab")));
        assert_eq!(Pieces::default().into_bytes(), Bytes::new());
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
