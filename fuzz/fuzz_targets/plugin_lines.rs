//! The plugin stdout line reader (`bootstrap::lines`): a plugin writes what it likes.
//!
//! Oracle: splitting the whole input at `\n` by hand. Lines within the cap come out whole;
//! longer ones as their first bytes and true length; no line returned exceeds the cap; memory
//! stays within the cap plus the read buffer, whatever the input's length.
#![no_main]

use bootstrap::lines::{Line, LineReader, PREFIX_BYTES};
use libfuzzer_sys::fuzz_target;
use sri_fuzz::{peak_during, pieces, runtime, split};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

struct Input<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
}

/// Hands out its pieces one read at a time, as a pipe would.
struct Pieces(Vec<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(p) = self.0.first_mut() {
            let n = p.len().min(buf.remaining());
            buf.put_slice(&p[..n]);
            p.drain(..n);
            if p.is_empty() {
                self.0.remove(0);
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn read_all(input: &Input<'_>, max: usize, keep: bool) -> Vec<Line> {
    let cut: Vec<Vec<u8>> = pieces(input.data, input.sizes)
        .into_iter()
        .map(<[u8]>::to_vec)
        .collect();
    runtime().block_on(async {
        let mut r = LineReader::new(Pieces(cut), max);
        let mut out = Vec::new();
        while let Some(l) = r.next_line().await.expect("reading memory cannot fail") {
            if keep {
                out.push(l);
            }
        }
        out
    })
}

fuzz_target!(|data: &[u8]| {
    let (control, data) = split(data);
    let input = Input {
        data,
        sizes: control.sizes,
    };
    let max = match control.cap {
        0 => 8192,
        n => usize::from(n),
    };
    let got = read_all(&input, max, true);
    let mut want: Vec<&[u8]> = input.data.split(|b| *b == b'\n').collect();
    if input.data.last() == Some(&b'\n') || input.data.is_empty() {
        want.pop();
    }
    assert_eq!(got.len(), want.len(), "line count");
    for (g, w) in got.iter().zip(&want) {
        match g {
            Line::Full(b) => {
                assert!(
                    w.len() <= max,
                    "a line of {} bytes passed a cap of {max}",
                    w.len()
                );
                assert_eq!(b.as_ref(), *w);
            }
            Line::TooLong { prefix, len } => {
                assert!(
                    w.len() > max,
                    "a line of {} bytes refused under a cap of {max}",
                    w.len()
                );
                assert_eq!(*len, w.len(), "reported length");
                assert!(prefix.len() <= PREFIX_BYTES && w.starts_with(prefix));
                assert!(
                    prefix.len() >= PREFIX_BYTES.min(max + 1),
                    "prefix too short to route"
                );
            }
        }
    }
    // The reader's 64 KiB buffer, one line under the cap (up to three times it while the buffer
    // grows: old and doubled copies), and this harness's own copy of the input (a `Vec` per
    // piece, up to one per byte): nothing that grows with the length of a line past the cap.
    let (_, peak) = peak_during(|| read_all(&input, max, false));
    let bound = 64 * 1024 + 4 * max + PREFIX_BYTES + 32 * data.len() + 32 * 1024;
    assert!(
        peak <= bound,
        "line reader held {peak} bytes (bound {bound})"
    );
});
