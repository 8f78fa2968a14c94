//! Per-connection guards of the data listener: the request header read timeout, the
//! keep-alive idle timeout and the drain on shutdown.
//!
//! hyper 1's own HTTP/1 `header_read_timeout` is armed again whenever a keep-alive connection
//! goes idle (proto/h1/conn.rs `poll_read_head`), so it would also be the idle timeout of
//! every HTTP/1 connection, and it never covers the first bytes of a connection (hyper-util's
//! auto builder reads them to tell HTTP/1 from HTTP/2 with no timer). Both timers therefore
//! live here instead, in one watchdog per connection that shares the connection's task:
//!
//! - a connection waits for a request head from the moment it is accepted, and again from the
//!   first byte read after an HTTP/1 request ended; a head not complete within
//!   `header_read_timeout` closes the connection at once (slow clients are cut off);
//! - a connection with no request in flight for `idle_timeout` is shut down gracefully
//!   (HTTP/1 closes, HTTP/2 sends GOAWAY); a request in flight is never cut by either timer;
//! - on drain every connection is shut down gracefully, and closed when the drain times out.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};

use crate::clock::now_ms;

/// What the listener asks of its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    Run = 0,
    /// Finish what is in flight, take nothing new.
    Drain = 1,
    /// The drain timed out: close now.
    Close = 2,
}

/// What the watchdog knows about one connection. Written by the IO wrapper (reads), the
/// request guard (begin/end) and read by the watchdog; all atomics.
pub struct Activity {
    /// `now_ms()` (at least 1) since when a request head is awaited; 0 when none is.
    head_since: AtomicU64,
    /// `now_ms()` when the last request ended, or the connection was accepted.
    idle_since: AtomicU64,
    in_flight: AtomicU32,
    /// HTTP/2 reads frames (pings, window updates) between requests: no head timer then.
    h2: AtomicBool,
    /// Wakes the watchdog when its deadline may have moved earlier.
    wake: Notify,
    /// When the watchdog will look next (`now_ms()`), 0 while it is deciding or not running:
    /// a deadline later than this needs no wake-up, so a busy keep-alive connection does
    /// not wake its watchdog (and re-arm a timer) twice per request.
    wake_at: AtomicU64,
    /// The header and idle timeouts in ms, set by the watchdog (0 until it runs).
    header_ms: AtomicU64,
    idle_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        let now = now_ms().max(1);
        Arc::new(Activity {
            head_since: AtomicU64::new(now),
            idle_since: AtomicU64::new(now),
            in_flight: AtomicU32::new(0),
            h2: AtomicBool::new(false),
            wake: Notify::new(),
            wake_at: AtomicU64::new(0),
            header_ms: AtomicU64::new(0),
            idle_ms: AtomicU64::new(0),
        })
    }

    /// Wakes the watchdog unless it already looks at or before `now + after_ms`.
    fn wake_for(&self, now: u64, after_ms: &AtomicU64) {
        let after = after_ms.load(Ordering::Relaxed);
        let at = self.wake_at.load(Ordering::SeqCst);
        if after == 0 || at == 0 || at > now + after {
            self.wake.notify_one();
        }
    }

    fn on_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            let now = now_ms().max(1);
            self.head_since.store(now, Ordering::SeqCst);
            self.wake_for(now, &self.header_ms);
        }
    }

    /// A request head arrived: the connection is busy until the guard is dropped (when the
    /// response body has been sent, or the request was abandoned).
    pub fn begin(self: &Arc<Self>, version: http::Version) -> RequestGuard {
        if version == http::Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// The watchdog's verdict at `now` (ms).
    pub fn check(&self, now: u64, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        let header = header_timeout.as_millis() as u64;
        let idle = idle_timeout.as_millis() as u64;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            // Woken when it ends; this is only a backstop.
            return Verdict::Wait(now + header.min(idle).max(1));
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 {
            let due = head + header;
            return if now >= due {
                Verdict::SlowHead
            } else {
                Verdict::Wait(due)
            };
        }
        let due = self.idle_since.load(Ordering::Relaxed) + idle;
        if now >= due {
            Verdict::Idle
        } else {
            Verdict::Wait(due)
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do before this `now_ms()`.
    Wait(u64),
    /// No request in flight for the idle timeout.
    Idle,
    /// A request head did not arrive within the header read timeout.
    SlowHead,
}

/// Marks one request in flight on its connection.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = now_ms().max(1);
            self.0.idle_since.store(now, Ordering::SeqCst);
            self.0.wake_for(now, &self.0.idle_ms);
        }
    }
}

/// A response body that keeps its request's guard until hyper has sent it all (or dropped it).
pub struct GuardedBody<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> GuardedBody<B> {
    pub fn new(inner: B, guard: RequestGuard) -> GuardedBody<B> {
        GuardedBody {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for GuardedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream, telling [`Activity`] when bytes arrive.
pub struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Tracked<T> {
        Tracked { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How a connection ended, for metrics and logs.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client or the protocol closed it.
    Closed,
    /// Idle for `idle_timeout`: shut down gracefully.
    Idle,
    /// Headers too slow: cut off.
    SlowHead,
    /// Drained on shutdown (gracefully, or cut when the drain timed out).
    Drained,
}

/// Drives one connection to its end under the header, idle and drain rules.
pub async fn drive<C: GracefulConnection>(
    conn: C,
    activity: Arc<Activity>,
    mut signal: watch::Receiver<Signal>,
    header_timeout: Duration,
    idle_timeout: Duration,
) -> End {
    tokio::pin!(conn);
    // Set once the connection was asked to shut down gracefully, and why.
    let mut asked: Option<End> = None;
    // How long a connection asked to shut down may take once nothing is in flight (an
    // HTTP/2 client that ignores GOAWAY) before it is closed.
    let grace = header_timeout.max(Duration::from_secs(1)).as_millis() as u64;
    let mut listener_gone = false;
    let ms = |d: Duration| (d.as_millis() as u64).max(1);
    activity
        .header_ms
        .store(ms(header_timeout), Ordering::Relaxed);
    activity.idle_ms.store(ms(idle_timeout), Ordering::Relaxed);
    loop {
        // Deciding: any change from now on wakes this loop again (see `wake_for`).
        activity.wake_at.store(0, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        let sig = if listener_gone {
            Signal::Drain
        } else {
            *signal.borrow_and_update()
        };
        match sig {
            Signal::Close => return End::Drained,
            Signal::Drain if asked != Some(End::Drained) => {
                conn.as_mut().graceful_shutdown();
                asked = Some(End::Drained);
            }
            _ => {}
        }
        let now = now_ms();
        let wake_at = match activity.check(now, header_timeout, idle_timeout) {
            Verdict::SlowHead => return End::SlowHead,
            Verdict::Idle => {
                let due = activity.idle_since.load(Ordering::Relaxed)
                    + idle_timeout.as_millis() as u64
                    + grace;
                match asked {
                    None => {
                        conn.as_mut().graceful_shutdown();
                        asked = Some(End::Idle);
                        due.max(now + 1)
                    }
                    Some(_) if now >= due => return asked.unwrap_or(End::Idle),
                    Some(_) => due,
                }
            }
            Verdict::Wait(at) => at,
        };
        activity.wake_at.store(wake_at.max(1), Ordering::SeqCst);
        let sleep = tokio::time::sleep(Duration::from_millis(wake_at.saturating_sub(now)));
        tokio::select! {
            biased;
            _ = conn.as_mut() => return asked.unwrap_or(End::Closed),
            _ = sleep => {}
            _ = activity.wake.notified() => {}
            changed = signal.changed(), if !listener_gone => {
                listener_gone = changed.is_err();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_millis(500);
    const I: Duration = Duration::from_millis(2000);

    #[test]
    fn a_new_connection_waits_for_a_head_then_goes_idle_between_requests() {
        let a = Activity::new();
        let t0 = a.head_since.load(Ordering::Relaxed);
        assert_eq!(a.check(t0, H, I), Verdict::Wait(t0 + 500));
        assert_eq!(a.check(t0 + 500, H, I), Verdict::SlowHead);
        let g = a.begin(http::Version::HTTP_11);
        assert!(matches!(a.check(t0 + 10_000, H, I), Verdict::Wait(_)));
        drop(g);
        let idle = a.idle_since.load(Ordering::Relaxed);
        // Between requests: the idle timer, not the head timer.
        assert_eq!(a.check(idle + 600, H, I), Verdict::Wait(idle + 2000));
        assert_eq!(a.check(idle + 2000, H, I), Verdict::Idle);
        // A byte of the next head starts the head timer.
        a.on_read();
        let head = a.head_since.load(Ordering::Relaxed);
        assert_ne!(head, 0);
        assert_eq!(a.check(head + 500, H, I), Verdict::SlowHead);
    }

    #[test]
    fn the_watchdog_is_woken_only_when_a_deadline_moves_earlier() {
        use futures_util::FutureExt;
        let a = Activity::new();
        let woken = |a: &Activity| a.wake.notified().now_or_never().is_some();
        // Watchdog not running yet (timeouts unknown): always wake.
        drop(a.begin(http::Version::HTTP_11));
        assert!(woken(&a));
        a.header_ms.store(500, Ordering::Relaxed);
        a.idle_ms.store(2000, Ordering::Relaxed);
        // The watchdog looks again before the idle deadline of the request that just ended:
        // no wake-up.
        a.wake_at.store(now_ms() + 400, Ordering::SeqCst);
        drop(a.begin(http::Version::HTTP_11));
        assert!(!woken(&a));
        // It sleeps until after the head deadline of the next request's first byte: wake.
        a.wake_at.store(now_ms() + 60_000, Ordering::SeqCst);
        a.on_read();
        assert!(woken(&a));
        // While the watchdog decides (wake_at 0), every change wakes it.
        drop(a.begin(http::Version::HTTP_11));
        a.wake_at.store(0, Ordering::SeqCst);
        a.on_read();
        assert!(woken(&a));
    }

    #[test]
    fn http2_frames_between_requests_are_not_a_head() {
        let a = Activity::new();
        drop(a.begin(http::Version::HTTP_2));
        a.on_read();
        assert_eq!(a.head_since.load(Ordering::Relaxed), 0);
        let idle = a.idle_since.load(Ordering::Relaxed);
        assert_eq!(a.check(idle + 2000, H, I), Verdict::Idle);
    }
}
