//! Buffers: taken from a per-thread cache only while a request is in flight, so idle
//! connections hold none; and the stream handed to hyper with the bytes already read.

use super::*;

/// A byte vector for a message head, reused per thread: heads are built for every request.
pub(super) struct Scratch(Vec<u8>);

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Scratch {
    pub(super) fn take() -> Scratch {
        Scratch(
            SCRATCH
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| Vec::with_capacity(1024)),
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() <= 4 * BUF_SIZE {
            v.clear();
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < BUF_CACHE {
                    s.push(v);
                }
            });
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

thread_local! {
    /// Buffers between requests, per thread: idle connections hold none, busy ones do not
    /// allocate one per request.
    pub(super) static BUFS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Buffers (and head vectors) kept per thread; beyond this they are freed. A buffer is held
/// only while a request is in flight, so this is about the requests in flight at once on a
/// thread; every one kept is 8 KiB of RSS that 10 000 idle connections would also carry.
pub(super) const BUF_CACHE: usize = 64;

pub(super) fn take_buf() -> BytesMut {
    BUFS.with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

pub(super) fn give_buf(mut buf: BytesMut) {
    buf.clear();
    // `advance` moved the start forward; with nothing left in the buffer, reserving takes
    // the whole allocation back (no new allocation) so the capacity check below sees it.
    buf.reserve(BUF_SIZE);
    // Only plain buffers of the usual size come back; grown or empty ones are freed.
    if buf.capacity() < BUF_SIZE || buf.capacity() > 4 * BUF_SIZE {
        return;
    }
    BUFS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < BUF_CACHE {
            b.push(buf);
        }
    });
}

/// A connection handed to hyper, with the bytes this path read replayed first.
pub struct Prefixed<S> {
    pub(super) prefix: BytesMut,
    pub(super) stream: S,
}

impl<S> Prefixed<S> {
    pub fn new(stream: S) -> Prefixed<S> {
        Prefixed {
            prefix: BytesMut::new(),
            stream,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
