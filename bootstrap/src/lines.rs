//! Reads a plugin's output line by line with a hard bound on line length.
//!
//! A line over the limit is not buffered: its first bytes are kept (to find its session) and
//! the rest is counted and dropped, so one runaway line cannot exhaust memory.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// How much of an over-long line is kept to identify it.
pub const PREFIX_BYTES: usize = 4096;

/// One line, without its `\n`.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A line within the limit.
    Full(Bytes),
    /// A line over the limit: its first [`PREFIX_BYTES`] and its total length.
    TooLong {
        /// The line's first bytes.
        prefix: Bytes,
        /// The line's length.
        len: usize,
    },
}

/// A line reader with a length limit.
pub struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    /// Reads lines of at most `max` bytes from `inner`.
    pub fn new(inner: R, max: usize) -> Self {
        Self {
            inner: BufReader::with_capacity(64 * 1024, inner),
            max,
        }
    }

    /// The next line; `None` at the end of input. A last line without `\n` is returned too.
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        let mut buf = BytesMut::new();
        let mut dropped: Option<(Bytes, usize)> = None;
        loop {
            let avail = self.inner.fill_buf().await?;
            if avail.is_empty() {
                return Ok(match dropped {
                    Some((prefix, len)) => Some(Line::TooLong { prefix, len }),
                    None if buf.is_empty() => None,
                    None => Some(Line::Full(buf.freeze())),
                });
            }
            let (take, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            match &mut dropped {
                Some((_, len)) => *len += take,
                None if buf.len() + take > self.max => {
                    buf.extend_from_slice(&avail[..take.min(PREFIX_BYTES)]);
                    let len = buf.len() + take - take.min(PREFIX_BYTES);
                    buf.truncate(PREFIX_BYTES);
                    let prefix = std::mem::take(&mut buf).freeze();
                    dropped = Some((prefix, len.max(self.max + 1)));
                }
                None => buf.extend_from_slice(&avail[..take]),
            }
            self.inner.consume(take + usize::from(done));
            if done {
                return Ok(Some(match dropped {
                    Some((prefix, len)) => Line::TooLong { prefix, len },
                    None => Line::Full(buf.freeze()),
                }));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: Vec<u8>, max: usize) -> Vec<Line> {
        let mut r = LineReader::new(std::io::Cursor::new(input), max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.unwrap() {
            out.push(l);
        }
        out
    }

    #[tokio::test]
    async fn splits_and_bounds_lines() {
        let mut input = b"a\n\nbcd\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 200_000));
        input.extend(b"\nlast");
        let lines = read_all(input, 100_000).await;
        assert_eq!(lines[0], Line::Full(Bytes::from_static(b"a")));
        assert_eq!(lines[1], Line::Full(Bytes::new()));
        assert_eq!(lines[2], Line::Full(Bytes::from_static(b"bcd")));
        match &lines[3] {
            Line::TooLong { prefix, len } => {
                assert_eq!(prefix.len(), PREFIX_BYTES);
                assert_eq!(*len, 200_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(lines[4], Line::Full(Bytes::from_static(b"last")));
        assert_eq!(lines.len(), 5);
    }

    #[tokio::test]
    async fn a_line_at_the_limit_is_kept() {
        let lines = read_all([vec![b'y'; 10], b"\n".to_vec()].concat(), 10).await;
        assert_eq!(lines, vec![Line::Full(Bytes::from(vec![b'y'; 10]))]);
        let lines = read_all(vec![b'y'; 11], 10).await;
        assert!(matches!(lines[0], Line::TooLong { len: 11, .. }));
    }
}
