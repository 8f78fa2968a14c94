//! Connections to upstream endpoints: the connector and pooled clients shared by the proxy
//! and the health probes of a cluster.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::ClusterConfig;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Builds the connector of a cluster: TCP with Nagle off and the cluster's connect timeout,
/// TLS when the cluster asks for it.
pub fn connector(cluster: &ClusterConfig) -> Result<Connector, String> {
    let tls = cluster.tls.as_ref().map(|t| crate::tls::UpstreamTls {
        sni: t.sni.clone(),
        ca: t.ca.clone(),
    });
    crate::tls::upstream_connector(tls.as_ref(), cluster.http2, cluster.connect_timeout)
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

/// Idle keep-alive connections to one endpoint, for the native HTTP/1.1 path
/// ([`crate::h1`]). Last in, first out: the warmest connection goes next, and the ones at
/// the bottom age out. One stack per pool shard (see [`set_pool_shard`]).
#[derive(Default)]
pub struct IdlePool {
    conns: std::sync::Mutex<Vec<Vec<(tokio::net::TcpStream, std::time::Instant)>>>,
}

thread_local! {
    static POOL_SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Puts the calling thread's idle upstream connections in their own shard. A thread that runs
/// its own runtime (thread-per-core data plane) calls this: a connection is registered with the
/// reactor of the runtime that opened it, so handing it to another runtime would route every
/// readiness event through that other thread. Threads of one multi-thread runtime share shard 0.
pub fn set_pool_shard(shard: usize) {
    POOL_SHARD.with(|s| s.set(shard));
}

/// Connections kept per endpoint, and for how long unused (hyper's pool used the same).
const POOL_MAX_IDLE: usize = 1024;
const POOL_IDLE_FOR: Duration = Duration::from_secs(90);

impl IdlePool {
    /// An idle connection that still looks open, if there is one.
    pub fn take(&self) -> Option<tokio::net::TcpStream> {
        loop {
            let shard = POOL_SHARD.with(|s| s.get());
            let (conn, since) = self
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(shard)?
                .pop()?;
            if since.elapsed() < POOL_IDLE_FOR && looks_open(&conn) {
                return Some(conn);
            }
        }
    }

    pub fn put(&self, conn: tokio::net::TcpStream) {
        let shard = POOL_SHARD.with(|s| s.get());
        let mut shards = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if shards.len() <= shard {
            shards.resize_with(shard + 1, Vec::new);
        }
        let conns = &mut shards[shard];
        if conns.len() < POOL_MAX_IDLE {
            conns.push((conn, std::time::Instant::now()));
        }
    }

    pub fn len(&self) -> usize {
        self.conns
            .lock()
            .map_or(0, |c| c.iter().map(Vec::len).sum())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Whether an idle upstream connection can take a request. An idle connection has nothing
/// to read, so readiness (known to the reactor, no system call) means the peer closed it or
/// sent something unasked; only then is a read tried to tell which.
fn looks_open(conn: &tokio::net::TcpStream) -> bool {
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
