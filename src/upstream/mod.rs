//! Connections to upstream endpoints: the connector and pooled clients shared by the proxy
//! and the health probes of a cluster.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::ClusterConfig;

pub mod body;
pub mod proxied;
pub mod tls;

pub use body::RequestBody;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The pooled hyper client of a cluster (TLS, h2, hedged routes and upgrades; plain
/// HTTP/1.1 attempts of both engines use [`IdlePool`]).
pub type UpstreamClient = Client<Connector, RequestBody>;

/// Builds the connector of a cluster: TCP with Nagle off and the cluster's connect timeout,
/// TLS when the cluster asks for it.
pub fn connector(cluster: &ClusterConfig) -> Result<Connector, String> {
    let tls = cluster
        .tls
        .as_ref()
        .map(|t| crate::upstream::tls::UpstreamTls {
            sni: t.sni.clone(),
            ca: t.ca.clone(),
        });
    crate::upstream::tls::upstream_connector(tls.as_ref(), cluster.http2, cluster.connect_timeout)
}

/// The pooled keep-alive client the proxy uses for a cluster.
pub fn proxy_client<B>(connector: Connector, cluster: &ClusterConfig) -> Client<Connector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .http1_writev(false)
        .http2_only(cluster.http2)
        .build(connector)
}

/// A small client for health probes: its own pool, so probes measure the endpoint and not a
/// queue behind proxied requests.
pub fn probe_client(connector: Connector, http2: bool) -> Client<Connector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build(connector)
}

/// An error and its sources on one line: hyper's top-level message alone ("client error
/// (Connect)") does not say what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}

/// The TLS problem behind a failed upstream request, if TLS was the cause: rustls' own
/// words ("invalid peer certificate: UnknownIssuer"), found in the error's sources (or
/// inside the io::Error tokio-rustls wraps it in, which hides it from `source()`).
pub fn tls_problem(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<rustls::Error>() {
            return Some(t.to_string());
        }
        // io::Error::source() skips the error it wraps; look inside it instead.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// One line for the log about a failed upstream request; TLS failures say so first, with
/// what to check, because "client error (Connect)" alone sends people looking at the network.
pub fn describe_failure(e: &(dyn std::error::Error + 'static)) -> String {
    match tls_problem(e) {
        Some(p) => format!(
            "TLS handshake with upstream failed: {p} (check the cluster's tls.ca and tls.sni); {}",
            error_chain(e)
        ),
        None => error_chain(e),
    }
}

/// Idle keep-alive connections to one endpoint, for plain HTTP/1.1 upstream attempts (the
/// native engine's, and the hyper engine's own leg). Last in, first out: the warmest connection goes next, and the ones at
/// the bottom age out. One stack (and one connect cap) per pool shard: see [`set_pool_shard`].
pub struct IdlePool {
    shards: Box<[Shard]>,
}

#[derive(Default)]
struct Shard {
    conns: std::sync::Mutex<Vec<(tokio::net::TcpStream, std::time::Instant)>>,
    /// Connects under way to this endpoint from this shard.
    dialing: std::sync::atomic::AtomicUsize,
    /// Signalled when a connection comes back or a connect ends.
    freed: tokio::sync::Notify,
}

impl Default for IdlePool {
    fn default() -> IdlePool {
        IdlePool {
            shards: (0..POOL_SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

/// Shards per pool; threads beyond this share them (correct, only less local).
const POOL_SHARDS: usize = 16;

thread_local! {
    static POOL_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Puts the calling thread's idle upstream connections in their own shard. A thread that runs
/// its own runtime (thread-per-core data plane) calls this: a connection is registered with the
/// reactor of the runtime that opened it, so handing it to another runtime would route every
/// readiness event through that other thread. Threads of one multi-thread runtime share shard 0.
pub fn set_pool_shard(shard: usize) {
    POOL_SHARD.with(|s| s.set(shard % POOL_SHARDS));
}

/// Connects under way to one endpoint at a time (per shard), at most. A burst of new clients
/// would otherwise open one upstream connection each at the same instant; past the
/// upstream's listen backlog the kernel drops the SYNs and those connects stall for a second
/// (the SYN retransmit). Requests beyond the cap take the first connection that comes back
/// or the next free connect slot, whichever is first.
const MAX_DIALS: usize = 16;

/// Connections kept per endpoint, and for how long unused (hyper's pool used the same).
const POOL_MAX_IDLE: usize = 1024;
const POOL_IDLE_FOR: Duration = Duration::from_secs(90);

impl IdlePool {
    fn shard(&self) -> &Shard {
        &self.shards[POOL_SHARD.with(|s| s.get())]
    }

    /// An idle connection of this thread's shard that still looks open, if there is one.
    pub fn take(&self) -> Option<tokio::net::TcpStream> {
        let shard = self.shard();
        loop {
            let (conn, since) = shard
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()?;
            if since.elapsed() < POOL_IDLE_FOR && looks_open(&conn) {
                return Some(conn);
            }
        }
    }

    pub fn put(&self, conn: tokio::net::TcpStream) {
        let shard = self.shard();
        {
            let mut conns = shard.conns.lock().unwrap_or_else(|e| e.into_inner());
            if conns.len() < POOL_MAX_IDLE {
                conns.push((conn, std::time::Instant::now()));
            }
        }
        shard.freed.notify_one();
    }

    /// A connection to `addr`: an idle one (`true`: reused), or a new one with Nagle off.
    /// Waits its turn when [`MAX_DIALS`] connects are under way; the caller bounds the wait.
    pub async fn acquire(
        &self,
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
    ) -> std::io::Result<(tokio::net::TcpStream, bool)> {
        loop {
            if let Some(c) = self.take() {
                return Ok((c, true));
            }
            if let Some(_turn) = self.try_turn() {
                return dial(addr, connect_timeout).await.map(|c| (c, false));
            }
            // A connection returned or a connect ended between the checks above and this
            // wait left a permit in `freed`: no wake-up is lost.
            self.shard().freed.notified().await;
        }
    }

    /// Runs `connect` in a turn of the connect cap, for connections that never come from
    /// the pool (they start with a PROXY header naming one client): they load the endpoint
    /// like any other connect.
    pub async fn in_dial_turn<T>(&self, connect: impl std::future::Future<Output = T>) -> T {
        loop {
            if let Some(_turn) = self.try_turn() {
                return connect.await;
            }
            self.shard().freed.notified().await;
        }
    }

    /// One of this shard's [`MAX_DIALS`] connect turns, if one is free.
    fn try_turn(&self) -> Option<DialSlot<'_>> {
        use std::sync::atomic::Ordering;
        let shard = self.shard();
        if shard.dialing.fetch_add(1, Ordering::AcqRel) < MAX_DIALS {
            Some(DialSlot(shard))
        } else {
            shard.dialing.fetch_sub(1, Ordering::AcqRel);
            None
        }
    }

    /// A new connection to `addr`, not counted against the connect cap: for a pooled
    /// connection found closed, whose request already holds its turn.
    pub async fn dial(
        addr: std::net::SocketAddr,
        connect_timeout: Duration,
    ) -> std::io::Result<tokio::net::TcpStream> {
        dial(addr, connect_timeout).await
    }

    /// Drops connections idle too long or closed by the upstream, in every shard. The
    /// endpoint's prober calls this each probe, so an endpoint that gets no traffic does not
    /// keep sockets the upstream closed (CLOSE_WAIT) until someone takes them.
    pub fn expire(&self) {
        for shard in self.shards.iter() {
            let mut conns = shard.conns.lock().unwrap_or_else(|e| e.into_inner());
            conns.retain(|(c, since)| since.elapsed() < POOL_IDLE_FOR && looks_open(c));
        }
    }

    /// Drops every idle connection (the endpoint failed a probe: they are likely dead too).
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            shard
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.conns.lock().map_or(0, |c| c.len()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Gives a connect slot back, however the connect ended (or was dropped on a timeout).
struct DialSlot<'a>(&'a Shard);

impl Drop for DialSlot<'_> {
    fn drop(&mut self) {
        self.0
            .dialing
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

async fn dial(
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

/// Whether an idle upstream connection can take a request. An idle connection has nothing
/// to read, so readiness (known to the reactor, no system call) means the peer closed it or
/// sent something unasked; only then is a read tried to tell which.
pub fn looks_open(conn: &tokio::net::TcpStream) -> bool {
    let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
    match conn.poll_read_ready(&mut cx) {
        std::task::Poll::Pending => true,
        std::task::Poll::Ready(Err(_)) => false,
        std::task::Poll::Ready(Ok(())) => {
            let mut b = [0u8; 1];
            matches!(conn.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connects that never come from the pool wait their turn like the pool's own: with
    /// every turn taken, one more starts only when one ends.
    #[tokio::test]
    async fn connects_outside_the_pool_share_the_connect_cap() {
        let pool = std::sync::Arc::new(IdlePool::default());
        let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut release = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..MAX_DIALS + 1 {
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            release.push(tx);
            let (pool, started) = (pool.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                pool.in_dial_turn(async {
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = rx.await;
                })
                .await
            }));
        }
        let count = || started.load(std::sync::atomic::Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while count() < MAX_DIALS && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(count(), MAX_DIALS, "one beyond the cap started");
        // One ends: the waiting one starts.
        drop(release.remove(0));
        while count() < MAX_DIALS + 1 && tokio::time::Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
        assert_eq!(count(), MAX_DIALS + 1);
        drop(release);
        for t in tasks {
            t.await.expect("task");
        }
    }

    /// A pooled connection the upstream closed is not handed out, and the prober's sweep
    /// drops it even when nobody asks for one.
    #[tokio::test]
    async fn closed_idle_connections_are_neither_taken_nor_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = IdlePool::default();
        let mut server_side = Vec::new();
        for _ in 0..3 {
            let c = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (s, _) = listener.accept().await.expect("accept");
            server_side.push(s);
            pool.put(c);
        }
        assert_eq!(pool.len(), 3);
        // The upstream closes two of them; the reactor learns of it when it next polls.
        drop(server_side.remove(0));
        drop(server_side.remove(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            pool.expire();
            if pool.len() == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{} left", pool.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pool.take().is_some(), "the open one is handed out");
        assert!(pool.take().is_none());
    }
}
