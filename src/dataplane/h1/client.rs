//! The client's stream: plain TCP or TLS over it. The engine is written once against
//! [`Client`]; what differs between the two is how an idle connection waits for its next
//! request without holding a buffer, and that a TLS stream keeps encrypted bytes of its own
//! that only a flush pushes out.

use super::*;
use std::future::Future;
use tokio_rustls::server::TlsStream;

/// A stream the native engine serves.
pub trait Client: AsyncRead + AsyncWrite + Unpin + Send {
    /// Resolves when the client may have sent more bytes (or closed). Holds no buffer while
    /// it waits: an idle keep-alive connection costs its socket, its task and (for TLS) its
    /// session, nothing more.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// The address the client connected to (for PROXY headers sent upstream).
    fn local_addr(&self) -> io::Result<SocketAddr>;
}

impl Client for TcpStream {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        TcpStream::local_addr(self)
    }
}

impl Client for TlsStream<TcpStream> {
    async fn readable(&mut self) -> io::Result<()> {
        let (tcp, session) = self.get_mut();
        // A pipelined request may already be decrypted and waiting in the session (a TLS
        // record can hold more than one read of the engine takes): then the socket may
        // never become readable again, and the request is there now.
        match session.reader().into_first_chunk() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.readable().await,
            _ => Ok(()),
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.get_ref().0.local_addr()
    }
}

/// Writes all of `bytes` and flushes them (TLS: out of the session's buffer to the socket,
/// in as few records as the size allows), bounded: a client that does not read for
/// `timeout` is cut off.
pub(super) async fn write_all<C: Client>(
    s: &mut C,
    bytes: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    let mut write = std::pin::pin!(async {
        s.write_all(bytes).await?;
        s.flush().await
    });
    // Usually the socket takes it all at once: no timer, no clock read.
    if let Poll::Ready(r) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        return r;
    }
    match tokio::time::timeout(timeout, write).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// Closes the connection: for TLS a close_notify first, bounded like a write.
pub(super) async fn close<C: Client>(s: &mut C, timeout: Duration) {
    let _ = tokio::time::timeout(timeout, s.shutdown()).await;
}
