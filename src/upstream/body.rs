//! The request body sent upstream: the client's stream (counted), or nothing (retries).
//!
//! Two things only this wrapper can know: whether a body error came from the client (an
//! aborted upload is the client's doing, never the endpoint's), and whether the body was
//! ever read. A body dropped unread (the connect failed) goes back to the sender, so a
//! request with a body can be retried on another endpoint like any other.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::sync::oneshot;

/// The client's body stream broke (it went away mid-upload, or sent bad framing).
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl std::fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "client request body: {}", self.0)
    }
}

impl ClientBodyError {
    /// Whether the client sent bad framing (it is still there to be told) rather than
    /// going away mid-upload.
    pub fn malformed(&self) -> bool {
        let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(&self.0);
        while let Some(i) = inner {
            if let Some(io) = i.downcast_ref::<std::io::Error>() {
                return matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
                );
            }
            inner = i.source();
        }
        self.0.is_parse()
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

pub enum RequestBody {
    Stream {
        inner: Option<Incoming>,
        bytes: prometheus::IntCounter,
        /// Where the body goes back if it is dropped unread.
        unread: Option<oneshot::Sender<Incoming>>,
        /// Set when the client's stream broke: whatever the upstream does next (it may
        /// break off its answer too) is then the client's doing.
        client_broke: Arc<AtomicBool>,
    },
    Empty,
}

impl RequestBody {
    pub fn stream(
        inner: Incoming,
        bytes: prometheus::IntCounter,
        unread: oneshot::Sender<Incoming>,
        client_broke: Arc<AtomicBool>,
    ) -> RequestBody {
        RequestBody::Stream {
            inner: Some(inner),
            bytes,
            unread: Some(unread),
            client_broke,
        }
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        if let RequestBody::Stream { inner, unread, .. } = self {
            if let (Some(tx), Some(b)) = (unread.take(), inner.take()) {
                let _ = tx.send(b);
            }
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = ClientBodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientBodyError>>> {
        match self.get_mut() {
            RequestBody::Stream {
                inner: Some(inner),
                bytes,
                unread,
                client_broke,
            } => {
                // Read once: it can no longer be handed back whole.
                *unread = None;
                match Pin::new(inner).poll_frame(cx) {
                    Poll::Ready(Some(Ok(f))) => {
                        if let Some(d) = f.data_ref() {
                            bytes.inc_by(d.len() as u64);
                        }
                        Poll::Ready(Some(Ok(f)))
                    }
                    Poll::Ready(Some(Err(e))) => {
                        client_broke.store(true, Ordering::Relaxed);
                        Poll::Ready(Some(Err(ClientBodyError(e))))
                    }
                    Poll::Ready(None) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            }
            _ => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream { inner: Some(i), .. } => i.is_end_stream(),
            _ => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream { inner: Some(i), .. } => i.size_hint(),
            _ => SizeHint::with_exact(0),
        }
    }
}
