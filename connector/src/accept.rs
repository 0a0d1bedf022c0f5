//! The accept loop both HTTP servers share (`sri serve`'s gateway and control plane, and
//! `bootstrap serve`).
//!
//! Every connection gets TCP_NODELAY (small SSE and NDJSON writes must not wait for delayed
//! ACKs) and a task of its own. A failed accept (out of descriptors, typically) is logged and
//! retried after a pause, so the server neither stops nor spins, and the streams it holds keep
//! flowing. On shutdown it stops accepting, asks every connection to finish gracefully, and cuts
//! what is still open after the drain time.

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use std::future::Future;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// How long to pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves every connection accepted on `listener` with `serve` until `shutdown` completes, then
/// waits up to `drain` for open connections to finish.
pub async fn serve_until<C>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    mut serve: impl FnMut(TokioIo<TcpStream>) -> C,
) where
    C: GracefulConnection + Send + 'static,
    C::Error: std::fmt::Display,
{
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
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
                let conn = graceful.watch(serve(TokioIo::new(tcp)));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
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
