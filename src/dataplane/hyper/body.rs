//! The response body sent to the client: the upstream's stream, carrying the request's
//! completion (in-flight mark, bytes, access log) until its end.

use super::*;

/// Response body to the client: the upstream's stream, carrying the request's in-flight mark
/// and access-log record until the last byte is sent (or the client goes away).
pub enum ResponseBody {
    Upstream {
        inner: Incoming,
        done: Option<Box<Completion>>,
    },
    Full(Option<Bytes>),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
