//! The SSE codec for SRI events.
//!
//! Encoding is a few writes into a buffer; decoding uses `eventsource-stream`, which follows
//! the WHATWG parsing rules (CRLF, comments, multi-line data).

use bytes::{BufMut, Bytes, BytesMut};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};

use super::events::{Event, EventKind};
use crate::Error;

/// The keepalive comment sent after a period of silence.
pub const KEEPALIVE: &[u8] = b": keepalive\n\n";

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

/// Decodes an SSE byte stream into SRI events. Comments (keepalives) are skipped; an unknown
/// event name or a malformed stream is an error.
pub fn decode<S, B, E>(stream: S) -> impl Stream<Item = Result<Event, Error>>
where
    S: Stream<Item = Result<B, E>> + Unpin,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    stream.eventsource().map(|item| {
        let ev = item.map_err(|e| Error::Sse(e.to_string()))?;
        let kind: EventKind = ev.event.parse().map_err(Error::Sse)?;
        let id = if ev.id.is_empty() {
            None
        } else {
            Some(
                ev.id
                    .parse()
                    .map_err(|_| Error::Sse(format!("event id `{}` is not a number", ev.id)))?,
            )
        };
        Ok(Event::new(kind, id, ev.data))
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
    }

    #[tokio::test]
    async fn rejects_unknown_events() {
        let err = decode_all(b"event: bogus\ndata: {}\n\n").await.unwrap_err();
        assert!(err.to_string().contains("bogus"));
    }
}
