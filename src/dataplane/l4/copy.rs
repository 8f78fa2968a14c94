//! Copying a layer-4 connection both ways between the client and its upstream.
//!
//! Why not a bare `tokio::io::copy_bidirectional`: a proxied connection also needs an idle
//! timeout (a NAT or a crashed peer leaves sockets open forever) and byte counts that are
//! visible while a long connection is still running. The copy itself is tokio's, which
//! already gets half-close right: when one side ends its sending (EOF), the other side's
//! write half is shut down and the opposite direction keeps flowing until it ends too, so
//! request/response protocols that signal "done" with a half-close keep working. Its two
//! buffers (one per direction, [`BUF_SIZE`] each) live as long as the connection, reused
//! for every read.
//!
//! The upstream's reply time is reported once per connection, at its first byte: measured
//! from the first bytes written to the upstream (the client's first bytes, or a ClientHello
//! or PROXY header sent ahead of them), or from the start of the copy when the upstream
//! speaks first (a greeting, a banner). That is the layer-4 counterpart of an HTTP
//! response's time to headers: what the upstream took to answer, without the time a client
//! took to say something.
//!
//! The idle timeout fires only when neither direction has moved a byte for the whole
//! period: a download with a silent client, or an upload with a silent server, is busy,
//! not idle. Activity is one timestamp shared by both directions, refreshed on every read
//! and write that moved bytes.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// Bytes of buffer per direction and connection.
pub const BUF_SIZE: usize = 16 * 1024;

/// Bytes written to each side, added to as they are written, so readers (metrics, admin)
/// see progress of long connections. One value per connection or one shared by many
/// (totals per listener) both work: [`splice`] only ever adds.
#[derive(Debug, Default)]
pub struct ByteCounters {
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

impl ByteCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes written to upstreams so far, including any initial bytes.
    pub fn to_upstream(&self) -> u64 {
        self.to_upstream.load(Ordering::Relaxed)
    }

    /// Bytes written to clients so far.
    pub fn to_client(&self) -> u64 {
        self.to_client.load(Ordering::Relaxed)
    }
}

/// Writes `initial` to `upstream` (bytes the caller already read from the client, such as
/// a ClientHello, and/or a PROXY header for the upstream), then copies both ways until both
/// directions have ended. Returns the bytes written to the upstream (`initial` included)
/// and to the client. Fails with [`io::ErrorKind::TimedOut`] when no byte has moved either
/// way for `idle_timeout` (a timeout too large to represent never fires), or with the
/// first I/O error of either side; either way `counters` hold what was written until then.
/// `on_reply` is called once, when the upstream's first byte arrives, with the time it
/// took (see the module's doc); never when the upstream sends nothing.
pub async fn splice<C, U>(
    client: &mut C,
    upstream: &mut U,
    initial: &[u8],
    idle_timeout: Duration,
    counters: &ByteCounters,
    on_reply: &(dyn Fn(Duration) + Sync),
) -> io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    U: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let activity = Activity::new();
    let mut client = Metered {
        inner: client,
        activity: &activity,
        written: &counters.to_client,
        reply: None,
    };
    let mut upstream = Metered {
        inner: upstream,
        activity: &activity,
        written: &counters.to_upstream,
        reply: Some(ReplyClock {
            start: Instant::now(),
            sent: None,
            report: Some(on_reply),
        }),
    };
    let copy = async {
        if !initial.is_empty() {
            upstream.write_all(initial).await?;
            upstream.flush().await?;
        }
        let (up, down) = tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            BUF_SIZE,
            BUF_SIZE,
        )
        .await?;
        let initial = u64::try_from(initial.len()).unwrap_or(u64::MAX);
        Ok((up.saturating_add(initial), down))
    };
    tokio::select! {
        result = copy => result,
        () = activity.idle_for(idle_timeout) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("idle timeout: no bytes either way for {idle_timeout:?}"),
        )),
    }
}

/// When the connection last moved a byte, as milliseconds since it started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    /// Completes once nothing has moved for `idle`. Sleeps to the deadline computed from
    /// the last activity, and again if there was activity meanwhile, so it costs one
    /// timer wake-up per period, not one per byte.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = self
                .start
                .checked_add(last)
                .and_then(|t| t.checked_add(idle));
            let Some(deadline) = deadline else {
                return std::future::pending().await;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A stream that records activity and counts the bytes written to it.
struct Metered<'a, S: ?Sized> {
    inner: &'a mut S,
    activity: &'a Activity,
    written: &'a AtomicU64,
    /// The upstream side only: when it was first written to, and whom to tell how long its
    /// first byte took.
    reply: Option<ReplyClock<'a>>,
}

struct ReplyClock<'a> {
    start: Instant,
    sent: Option<Instant>,
    /// Taken when it has been called.
    report: Option<&'a (dyn Fn(Duration) + Sync)>,
}

impl ReplyClock<'_> {
    fn wrote(&mut self) {
        if self.sent.is_none() && self.report.is_some() {
            self.sent = Some(Instant::now());
        }
    }

    fn read(&mut self) {
        if let Some(report) = self.report.take() {
            report(self.sent.unwrap_or(self.start).elapsed());
        }
    }
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut *self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            if let Some(r) = self.reply.as_mut() {
                r.read();
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            if n > 0 {
                self.activity.touch();
                if let Some(r) = self.reply.as_mut() {
                    r.wrote();
                }
                self.written
                    .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
