//! The data-plane listeners: accept, limit, terminate TLS, hand each connection to an engine
//! (the native HTTP/1.1 path, or hyper for h2 and what the native path hands over), and drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{error, info, warn};

use crate::config;
use crate::control::{Control, ProxyState};
use crate::dataplane::{h1, hyper as proxy, watchdog as conn};
use crate::upstream::tls::ReloadableServerTls;

/// One thread per listener for [`DataPlane::PerCore`], each running `serve_data` on its own
/// current-thread runtime until the router drains.
pub fn spawn_data_threads(
    first: TcpListener,
    more: Vec<TcpListener>,
    router: &Arc<Control>,
    shutdown: &watch::Sender<bool>,
    tls: Option<Arc<ReloadableServerTls>>,
    limit: (Arc<Semaphore>, usize),
    id: u64,
) -> Result<Vec<std::thread::JoinHandle<()>>, String> {
    let mut threads = Vec::new();
    for (i, l) in std::iter::once(first).chain(more).enumerate() {
        // Registered again with the reactor of the thread that serves it.
        let l = l.into_std().map_err(|e| format!("listener: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a data-plane runtime: {e}"))?;
        let (router, tls, limit) = (router.clone(), tls.clone(), limit.clone());
        let shutdown = shutdown.subscribe();
        let t = std::thread::Builder::new()
            .name(format!("edge-data-{i}"))
            .spawn(move || {
                // Idle upstream connections stay with the thread (the reactor) that opened them.
                crate::upstream::set_pool_shard(i + 1);
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => serve_data(l, router, shutdown, tls, limit, id).await,
                        Err(e) => error!("data-plane thread {i}: listener: {e}"),
                    }
                });
            })
            .map_err(|e| format!("cannot start a data-plane thread: {e}"))?;
        threads.push(t);
    }
    Ok(threads)
}

/// Binds a listening socket; the error names the config key.
pub async fn bind(addr: SocketAddr, key: &str, reuseport: bool) -> Result<TcpListener, String> {
    if let Some(l) = super::inherited::take(key, addr, reuseport) {
        return l
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(l))
            .map_err(|e| format!("{key} {addr}: inherited socket: {e}"));
    }
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("{key} {addr}: {e}"))?;
    // Lets a restarted router bind while old connections sit in TIME_WAIT.
    let _ = socket.set_reuseaddr(true);
    if reuseport {
        socket
            .set_reuseport(true)
            .map_err(|e| format!("{key} {addr}: SO_REUSEPORT: {e}"))?;
    }
    socket
        .bind(addr)
        .map_err(|e| format!("{key} {addr}: cannot bind: {e}"))?;
    socket
        .listen(4096)
        .map_err(|e| format!("{key} {addr}: cannot listen: {e}"))
}

/// Serves one HTTP listener socket until shutdown, then drains its connections. `limit`
/// is the process-wide connection cap; `id` the listener's [`config::listener_id`].
pub async fn serve_data(
    listener: TcpListener,
    router: Arc<Control>,
    mut shutdown: watch::Receiver<bool>,
    tls: Option<Arc<ReloadableServerTls>>,
    (limit, max): (Arc<Semaphore>, usize),
    id: u64,
) {
    // This listener's own connections, so a listener removed by a reload drains only them.
    let mine = Arc::new(Semaphore::new(max));
    let accepted = {
        let cfg = router.config.load();
        let spec = cfg.listeners.iter().find(|l| l.id() == id);
        router.metrics.l4.listener_connections.with_label_values(&[
            spec.map_or("", |s| s.name.as_str()),
            spec.map_or("http", |s| s.protocol.as_str()),
        ])
    };
    let cfg = router.config.load_full();
    let l = &cfg.listener;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own HTTP/1 header timer would also close every idle keep-alive connection at
    // the header timeout and never covers a connection's first bytes: crate::dataplane::watchdog keeps
    // both timers instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(l.max_header_bytes)
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .max_header_list_size(l.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let (signal_tx, _) = watch::channel(conn::Signal::Run);
    let timeouts = (l.header_read_timeout, l.idle_timeout);
    // HTTP/1.1, plain or over TLS, goes the native path unless the config asks for hyper
    // throughout.
    let native = (l.http1_engine == config::Http1Engine::Native).then_some(h1::Limits {
        header_timeout: l.header_read_timeout,
        idle_timeout: l.idle_timeout,
        max_header_bytes: l.max_header_bytes,
        listener: id,
        https: tls.is_some(),
    });
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Over max_connections: close at once rather than queue without bound.
            router.metrics.too_many_connections.inc();
            drop(stream);
            continue;
        };
        // Never short: it has as many permits as the process-wide limit.
        let Ok(own) = mine.clone().try_acquire_owned() else {
            continue;
        };
        router.metrics.connections_accepted.inc();
        accepted.inc();
        router.metrics.connections_active.inc();
        let _ = stream.set_nodelay(true);
        let state = router.proxy.clone();
        let metrics = router.metrics.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let signal = signal_tx.subscribe();
        // Only a listener that takes PROXY headers needs its spec on the connection.
        let spec = router
            .config
            .load()
            .listeners
            .iter()
            .find(|l| l.id() == id && l.proxy_protocol.is_some())
            .cloned();
        let handshake = timeouts.0;
        tokio::spawn(async move {
            let mut stream = stream;
            let peer = match &spec {
                Some(spec) => {
                    match crate::dataplane::l4::client_address(&mut stream, peer, spec, handshake)
                        .await
                    {
                        Ok(client) => client,
                        Err(reason) => {
                            metrics.l4.reject(&spec.name, reason).inc();
                            tracing::debug!(%peer, "closed: {reason}");
                            metrics.connections_active.dec();
                            drop((permit, own));
                            return;
                        }
                    }
                }
                None => peer,
            };
            let end = serve_connection(
                stream, peer, state, builder, tls, signal, timeouts, native, id,
            )
            .await;
            if end == conn::End::SlowHead {
                metrics
                    .errors
                    .with_label_values(&["", "header_timeout"])
                    .inc();
                tracing::debug!(%peer, "request headers too slow: connection closed");
            }
            metrics.connections_active.dec();
            drop((permit, own));
        });
    }
    drop(listener);
    let _ = signal_tx.send(conn::Signal::Drain);
    let drain = router.config.load().listener.drain_timeout;
    // Every connection holds a permit of `mine` until it ends: all of them back means all
    // drained. Not the process-wide `limit`: waiting on it would take the permits other
    // listeners' accept loops, not yet stopped, need for the connections they accept.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(drain, mine.acquire_many(all)).await;
    match drained {
        Ok(_) => info!("drained: all connections closed"),
        Err(_) => {
            warn!("drain timeout ({drain:?}) reached; closing remaining connections");
            let _ = signal_tx.send(conn::Signal::Close);
            // Give the connection tasks a moment to close their sockets.
            let _ = tokio::time::timeout(Duration::from_secs(1), mine.acquire_many(all)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<Arc<ReloadableServerTls>>,
    mut signal: watch::Receiver<conn::Signal>,
    timeouts: (Duration, Duration),
    native: Option<h1::Limits>,
    listener: u64,
) -> conn::End {
    // The address the client connected to, for PROXY headers sent upstream.
    let local = stream.local_addr().unwrap_or(peer);
    let Some(tls) = tls else {
        let stream = match native {
            Some(limits) => match h1::serve(stream, peer, &state, &mut signal, limits).await {
                h1::Served::Ended(end) => return end,
                h1::Served::Hyper(prefixed) => prefixed,
            },
            None => h1::Prefixed::new(stream),
        };
        // Boxed: hyper's connection state is only needed by connections the native path
        // hands over, so it must not size every connection's task.
        let c = (peer, local, state, builder, false, listener);
        return Box::pin(serve_hyper(stream, c, signal, timeouts)).await;
    };
    // Boxed: a TLS connection's state (rustls session inline) is larger than a plain
    // one's, and unboxed it would size every plain connection's task too.
    Box::pin(async move {
        let acceptor = tls.acceptor();
        // The handshake is bounded like a slow header: a client that stalls is cut off.
        let stream = match tokio::time::timeout(timeouts.0, acceptor.accept(stream)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, "tls handshake failed: {e}");
                return conn::End::Closed;
            }
            Err(_) => {
                tracing::debug!(%peer, "tls handshake timed out");
                return conn::End::SlowHead;
            }
        };
        // ALPN h2 is hyper's; http/1.1, or no ALPN at all, is HTTP/1.1 for the native path.
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
        let stream = match native.filter(|_| !h2) {
            Some(limits) => match h1::serve(stream, peer, &state, &mut signal, limits).await {
                h1::Served::Ended(end) => return end,
                h1::Served::Hyper(prefixed) => prefixed,
            },
            None => h1::Prefixed::new(stream),
        };
        // Boxed again: an idle TLS connection of the native path must not carry hyper's
        // connection state in its task.
        let c = (peer, local, state, builder, true, listener);
        Box::pin(serve_hyper(stream, c, signal, timeouts)).await
    })
    .await
}

/// The client's address, the address it connected to, the proxy state, hyper's builder,
/// whether the listener terminates TLS, and the listener's id.
type HyperConn = (
    SocketAddr,
    SocketAddr,
    Arc<ProxyState>,
    Arc<auto::Builder<TokioExecutor>>,
    bool,
    u64,
);

/// Serves the rest of a connection with hyper (HTTP/1.1 or h2, upgrades included).
async fn serve_hyper<S>(
    stream: h1::Prefixed<S>,
    (peer, local, state, builder, https, listener): HyperConn,
    signal: watch::Receiver<conn::Signal>,
    (header_timeout, idle_timeout): (Duration, Duration),
) -> conn::End
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = conn::Activity::new();
    let act = activity.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = act.begin(req.version());
        // Boxed: the request's state is large and hyper moves the service future (into the
        // stream, into the runtime's task); moving a pointer costs nothing.
        let fut = Box::pin(proxy::handle(
            state.clone(),
            req,
            (peer, local),
            https,
            listener,
        ));
        async move {
            let resp = fut.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|b| conn::GuardedBody::new(b, guard)))
        }
    });
    let io = TokioIo::new(conn::Tracked::new(stream, activity.clone()));
    let c = builder.serve_connection_with_upgrades(io, svc);
    conn::drive(c, activity, signal, header_timeout, idle_timeout).await
}
