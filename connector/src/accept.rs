//! The accept loop both HTTP servers share (`sri serve`'s gateway and control plane, and
//! `bootstrap serve`).
//!
//! Every connection gets TCP_NODELAY (small SSE and NDJSON writes must not wait for delayed
//! ACKs) and a task of its own. A failed accept (out of descriptors, typically) is logged and
//! retried after a pause, so the server neither stops nor spins, and the streams it holds keep
//! flowing. On shutdown it stops accepting, asks every connection to finish gracefully, and cuts
//! what is still open after the drain time.
//!
//! Two bounds hold for every listener ([`Limits`]): at most `max_connections` connections are
//! open at once (the next ones wait in the kernel's backlog), and a connection must send its
//! first bytes (enough to tell HTTP/1.1 from an h2c preface) within `first_bytes_timeout`, or it
//! is closed: the HTTP/1 and HTTP/2 layers' own deadlines only start once they know which one
//! they are. After that the connection is never timed out here: an idle stream is not idle work.

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The bounds every connection of a listener gets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its first [`FIRST_BYTES`] bytes.
    pub first_bytes_timeout: Duration,
}

/// What a connection must send before the first-bytes deadline: the length of the h2c preface,
/// which is what tells the protocols apart.
pub const FIRST_BYTES: usize = 24;

/// How long to pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A connection as the HTTP layers see it.
pub type Io = TokioIo<FirstBytes<TcpStream>>;

/// Serves every connection accepted on `listener` with `serve` until `shutdown` completes, then
/// waits up to `drain` for open connections to finish.
pub async fn serve_until<C>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    limits: Limits,
    mut serve: impl FnMut(Io) -> C,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    let mut at_cap = false;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => {
                at_cap = false;
                slot
            }
            Err(_) => {
                // Once per episode, not once per connection that waits.
                if !at_cap {
                    at_cap = true;
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached; new connections wait until one closes"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => slot.expect("never closed"),
                    _ = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let io = FirstBytes::new(tcp, limits.first_bytes_timeout);
                let conn = graceful.watch(serve(TokioIo::new(io)));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(slot);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "streams still open {} s after shutdown; closing them",
            drain.as_secs()
        );
    }
}

/// A connection that fails its reads when its first [`FIRST_BYTES`] bytes do not arrive in
/// time, and is a plain pass-through afterwards.
pub struct FirstBytes<I> {
    inner: I,
    left: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> FirstBytes<I> {
    /// `inner`, with `within` to send its first bytes.
    pub fn new(inner: I, within: Duration) -> Self {
        Self {
            inner,
            left: FIRST_BYTES,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.deadline.is_some() {
                    let n = buf.filled().len() - before;
                    this.left = this.left.saturating_sub(n);
                    if this.left == 0 || n == 0 {
                        this.deadline = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if !expired {
                    return Poll::Pending;
                }
                this.deadline = None;
                Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection did not send its first bytes in time",
                )))
            }
            ready => ready,
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(tcp: &mut TcpStream) -> String {
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Serves `body` to every request on a loopback port under `limits`, over an HTTP/1
    /// builder `tweak`ed from hyper's defaults; returns the address.
    async fn start(
        limits: Limits,
        body: &'static str,
        tweak: fn(&mut hyper::server::conn::http1::Builder),
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_until(
            listener,
            std::future::pending(),
            Duration::ZERO,
            limits,
            move |io| {
                let service = hyper::service::service_fn(move |_| async move {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(String::from(body)))
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                tweak(&mut builder);
                builder.serve_connection(io, service)
            },
        ));
        addr
    }

    /// Past the cap, a new connection waits (served by nobody) until an open one closes.
    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_free_slot() {
        let limits = Limits {
            max_connections: 2,
            first_bytes_timeout: Duration::from_secs(10),
        };
        let addr = start(limits, "hi", |_| {}).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut first).await.starts_with("HTTP/1.1 200"));
        assert!(get(&mut second).await.starts_with("HTTP/1.1 200"));
        let mut third = TcpStream::connect(addr).await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(500), get(&mut third)).await;
        assert!(
            waiting.is_err(),
            "a third connection was served: {waiting:?}"
        );
        drop(first);
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut buf))
            .await
            .expect("served once a slot was free")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }

    /// A connection that sends nothing is closed at the first-bytes deadline.
    #[tokio::test]
    async fn a_silent_connection_is_closed_at_the_first_bytes_deadline() {
        let limits = Limits {
            max_connections: 10,
            first_bytes_timeout: Duration::from_millis(300),
        };
        // No header-read timeout here: the first-bytes deadline alone must close it.
        let addr = start(limits, "", |b| {
            b.header_read_timeout(None);
        })
        .await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("closed within 10 s")
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
}
