//! The response body sent to the client: the upstream's stream, carrying the request's
//! completion (in-flight mark, bytes, access log) until its end.

use super::*;
use crate::dataplane::h1::streamed::UpstreamStream;

/// Response body to the client: the upstream's stream, carrying the request's in-flight mark
/// and access-log record until the last byte is sent (or the client goes away).
pub enum ResponseBody {
    Upstream {
        inner: UpstreamBody,
        done: Option<Box<Completion>>,
    },
    Full(Option<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ResponseBody::Upstream { inner, done } => {
                let r = Pin::new(&mut *inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(c)) = (f.data_ref(), done.as_mut()) {
                            c.sent(d.len() as u64);
                        }
                        // A body with a known length ends with its last frame: hyper may
                        // never poll again, so finish (and log it complete) now.
                        if inner.is_end_stream() {
                            if let Some(c) = done.as_mut() {
                                c.complete();
                            }
                            *done = None;
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(c) = done.as_mut() {
                            c.complete();
                        }
                        *done = None;
                    }
                    Poll::Ready(Some(Err(_))) => {
                        if let Some(c) = done.as_mut() {
                            c.upstream_broke();
                        }
                        *done = None;
                    }
                    Poll::Pending => {}
                }
                r
            }
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// Why an upstream response body broke off (boxed only when it does).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The upstream's response body: hyper's client's, or read by this engine's own
/// HTTP/1.1 leg ([`UpstreamStream`]).
pub enum UpstreamBody {
    Hyper(Incoming),
    H1(UpstreamStream),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H1(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::H1(b) => b.size_hint(),
        }
    }
}
