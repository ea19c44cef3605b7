//! The HTTP accept loop: connection cap, timeouts, graceful drain.
//!
//! Each connection is served by hyper on its own task. At most [`MAX_CONNECTIONS`]
//! plus `max_watchers` are open at once (change feed watchers each hold one, and can
//! never take the slots other clients and peers need): past that the loop stops accepting and the kernel's backlog holds
//! new clients until a slot frees. On shutdown the listener closes, open connections
//! finish their in-flight request (keep-alive is turned off), and the loop waits for
//! them for at most [`DRAIN_TIMEOUT`].

use crate::api;
use crate::node::App;
use crate::shutdown::Shutdown;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Most connections open at once besides `max_watchers` (see [`connection_cap`]).
pub const MAX_CONNECTIONS: usize = 1024;
/// File descriptors a node needs besides its connections (fjall's files, calls to
/// peers), asked for at start with the connection cap.
pub const OTHER_FILES: usize = 1024;

/// The connection cap of a node with `max_watchers`.
pub fn connection_cap(max_watchers: usize) -> usize {
    MAX_CONNECTIONS + max_watchers
}
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for in-flight requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's own buffer limit. Requests with headers between [`api::MAX_HEADER_BYTES`]
/// and this get a JSON 431 from the API; beyond it hyper answers 431 itself.
const HYPER_MAX_BUF: usize = 64 * 1024;

/// Serves `listener` until `shutdown` fires, then drains.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut shutdown: Shutdown) {
    let slots = Arc::new(Semaphore::new(connection_cap(app.config.max_watchers)));
    let mut connections = JoinSet::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(HYPER_MAX_BUF).max_headers(128);
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s { Ok(s) => s, Err(_) => break },
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Usually out of file descriptors: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let conn_shutdown = shutdown.clone();
        let http = http.clone();
        connections.spawn(async move {
            let _slot = slot;
            match app.tls.clone() {
                None => serve_connection(&http, TokioIo::new(stream), app, peer, None, conn_shutdown).await,
                Some(tls) => {
                    let mut stop = conn_shutdown.clone();
                    let handshake = tls_handshake(&tls, stream, peer);
                    let stream = tokio::select! {
                        s = handshake => s,
                        _ = stop.wait() => None,
                    };
                    let Some(stream) = stream else { return };
                    // A certificate was presented, so the CA verified it.
                    let verified = stream.get_ref().1.peer_certificates().is_some();
                    let tls_state = Some((verified, tls.reloads()));
                    serve_connection(&http, TokioIo::new(stream), app, peer, tls_state, conn_shutdown).await
                }
            }
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(open = connections.len(), "drain timed out; closing remaining connections");
        connections.abort_all();
    }
}

/// Serves one connection, plain (`tls: None`) or TLS: whether it presented a client
/// certificate from the CA (node-to-node routes need one with `tls_client_auth`), and
/// the reload signal that closes it.
async fn serve_connection<I>(
    http: &http1::Builder,
    io: I,
    app: Arc<App>,
    peer: std::net::SocketAddr,
    tls: Option<(bool, tokio::sync::watch::Receiver<u64>)>,
    shutdown: Shutdown,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (verified, reloads) = match tls {
        Some((v, r)) => (v, Some(r)),
        None => (false, None),
    };
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let app = app.clone();
        if verified {
            req.extensions_mut().insert(crate::tls::VerifiedClient);
        }
        async move { Ok::<_, Infallible>(api::handle(app, req, peer).await) }
    });
    serve_until_shutdown(http.serve_connection(io, service), shutdown, reloads, peer).await;
}

/// The TLS handshake of a new connection: the first bytes and the whole handshake
/// within one [`HEADER_READ_TIMEOUT`] from the accept. A client speaking plain HTTP to
/// the TLS port gets a JSON 400 saying so, then the connection closes; a failed
/// handshake is logged at debug level.
async fn tls_handshake(
    tls: &crate::tls::Tls,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = tokio::time::Instant::now() + HEADER_READ_TIMEOUT;
    let mut first = [0u8; 3];
    let n = tokio::time::timeout_at(deadline, stream.peek(&mut first)).await.ok()?.ok()?;
    if n == 0 {
        return None;
    }
    if crate::tls::looks_like_plain_http(&first[..n]) {
        let mut stream = stream;
        let _ = tokio::time::timeout_at(deadline, stream.write_all(&crate::tls::plain_http_answer())).await;
        let _ = stream.shutdown().await;
        // Read what the client sent before closing: closing with unread bytes makes
        // the kernel reset the connection, and the client may never see the answer.
        let mut sink = [0u8; 4096];
        let drain = async { while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(std::time::Duration::from_millis(200), drain).await;
        return None;
    }
    match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}

/// Serves a connection until it ends, or until shutdown or (TLS) a certificate reload:
/// then it finishes the request in flight and closes, so the client reconnects (and is
/// verified again, against the new files).
async fn serve_until_shutdown<I, S>(
    conn: http1::Connection<I, S>,
    mut shutdown: Shutdown,
    mut reloaded: Option<tokio::sync::watch::Receiver<u64>>,
    peer: std::net::SocketAddr,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = crate::api::ResponseBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    let reload = async {
        match reloaded.as_mut() {
            Some(r) => {
                if r.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = shutdown.wait() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = reload => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
