//! The tcp and tls_passthrough listeners: each connection goes to the nearest healthy
//! endpoint of its cluster, picked like an HTTP request (zone slices, spillover, dials,
//! weights, affinity by source IP), and its bytes are copied both ways.
//!
//! A connect that fails is retried on another endpoint (another zone first) before any
//! client byte has gone upstream, so a dead zone costs a client nothing but the connect
//! timeout.
//!
//! Each connection gives its endpoint one latency sample, the counterpart of an HTTP
//! response's time to headers: the connect round trip plus the time the upstream took to
//! send its first byte (from the first bytes forwarded to it, or from the connect when it
//! speaks first; see [`l4::splice`]). A connection on which the upstream never sends a
//! byte gives the connect round trip alone, when it ends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::config::{Config, ListenerSpec, Protocol, ProxyVersion};
use crate::control::Control;
use crate::dataplane::l4::{self, sni};
use crate::routing::balancer;
use crate::routing::table::{ClusterTable, Reason};
use crate::state::InFlight;

/// Serves one tcp or tls_passthrough listener until `stop`, then drains its connections
/// (up to the drain timeout, after which the rest are closed).
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
    (limit, max): (Arc<Semaphore>, usize),
    name: String,
) {
    let mine = Arc::new(Semaphore::new(max));
    let (close_tx, _) = watch::channel(false);
    let accepted = control
        .metrics
        .l4
        .listener_connections
        .with_label_values(&[&name, protocol_of(&control.config.load(), &name)]);
    let name: Arc<str> = name.into();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!("listener {name}: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            control.metrics.too_many_connections.inc();
            continue;
        };
        let Ok(own) = mine.clone().try_acquire_owned() else {
            continue;
        };
        accepted.inc();
        control.metrics.connections_accepted.inc();
        control.metrics.connections_active.inc();
        let (control, name) = (control.clone(), name.clone());
        let mut close = close_tx.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection(stream, peer, &control, &name) => {}
                _ = close.changed() => {}
            }
            control.metrics.connections_active.dec();
            drop((permit, own));
        });
    }
    drop(listener);
    let drain = control.config.load().listener.drain_timeout;
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, mine.acquire_many(all))
        .await
        .is_err()
    {
        warn!("listener {name}: drain timeout ({drain:?}) reached; closing remaining connections");
        let _ = close_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(1), mine.acquire_many(all)).await;
    } else {
        info!("listener {name}: drained");
    }
}

fn protocol_of(config: &Config, name: &str) -> &'static str {
    config
        .listeners
        .iter()
        .find(|l| l.name == name)
        .map_or("tcp", |l| l.protocol.as_str())
}

/// One client connection, from the first byte to the last.
async fn connection(mut client: TcpStream, peer: SocketAddr, control: &Control, name: &str) {
    let config = control.config.load_full();
    // A listener just removed by a reload has no spec any more: nothing to serve with.
    let Some(spec) = config.listeners.iter().find(|l| l.name == name) else {
        return;
    };
    let l4m = &control.metrics.l4;
    let reject = |reason: &str| l4m.reject(name, reason).inc();
    let handshake = config.listener.header_read_timeout;
    let local = client.local_addr().unwrap_or(peer);
    let source = match l4::client_address(&mut client, peer, spec, handshake).await {
        Ok(a) => a,
        Err(reason) => {
            debug!(%peer, listener = name, "closed: {reason}");
            return reject(reason);
        }
    };
    let _ = client.set_nodelay(true);
    let (cluster_name, idle, hello) = match &spec.protocol {
        Protocol::Tcp {
            cluster,
            idle_timeout,
        } => (cluster.clone(), *idle_timeout, Vec::new()),
        Protocol::TlsPassthrough { idle_timeout, .. } => {
            let hello =
                match sni::read_client_hello(&mut client, sni::DEFAULT_MAX_CLIENT_HELLO, handshake)
                    .await
                {
                    Ok(h) => h,
                    Err(e) => {
                        debug!(%peer, listener = name, "closed: client hello: {e}");
                        return reject("client_hello");
                    }
                };
            let Some(cluster) = sni_cluster(spec, hello.server_name.as_deref()) else {
                debug!(%peer, listener = name, sni = ?hello.server_name, "closed: no sni match");
                return reject("no_sni_match");
            };
            (cluster, *idle_timeout, hello.buffered)
        }
        _ => return,
    };
    let table = control.table();
    let Some(cluster) = table.cluster(&cluster_name) else {
        return reject("no_cluster");
    };
    let Some((mut upstream, in_flight, why, connect_rtt)) =
        dial(cluster, source, name, control).await
    else {
        return reject("no_endpoint");
    };
    let ep = in_flight.endpoint().clone();
    l4m.connections
        .with_label_values(&[name, &cluster.name, &ep.region, &ep.zone])
        .inc();
    let _ = upstream.set_nodelay(true);
    let mut initial = match cluster.config.send_proxy_protocol {
        Some(ProxyVersion::V1) => l4::encode_v1(source, local),
        Some(ProxyVersion::V2) => l4::encode_v2(source, local),
        None => Vec::new(),
    };
    initial.extend_from_slice(&hello);
    let started = Instant::now();
    let counters = l4::ByteCounters::new();
    let replied = AtomicBool::new(false);
    let on_reply = |wait: Duration| {
        replied.store(true, Ordering::Relaxed);
        ep.observe(connect_rtt + wait, cluster.decay);
    };
    let result = l4::splice(
        &mut client,
        &mut upstream,
        &initial,
        idle,
        &counters,
        &on_reply,
    )
    .await;
    if !replied.load(Ordering::Relaxed) {
        ep.observe(connect_rtt, cluster.decay);
    }
    if let Err(e) = result {
        debug!(%peer, listener = name, endpoint = %ep.label, why, "connection ended: {e}");
    }
    l4m.bytes
        .with_label_values(&[name, "to_upstream"])
        .inc_by(counters.to_upstream());
    l4m.bytes
        .with_label_values(&[name, "to_client"])
        .inc_by(counters.to_client());
    l4m.duration(name).observe(started.elapsed().as_secs_f64());
    drop(in_flight);
}

/// The cluster a ClientHello's server name selects.
fn sni_cluster(spec: &ListenerSpec, server_name: Option<&str>) -> Option<String> {
    let Protocol::TlsPassthrough {
        sni,
        default_cluster,
        ..
    } = &spec.protocol
    else {
        return None;
    };
    let entries = sni
        .iter()
        .map(|r| {
            let host = match &r.host {
                crate::config::HostMatch::Exact(h) => h.clone(),
                crate::config::HostMatch::Suffix(s) => format!("*{s}"),
            };
            (host, r.cluster.clone())
        })
        .collect();
    // A few entries per listener: building the table per connection is cheaper than the
    // handshake it precedes.
    sni::SniTable::new(entries, default_cluster.clone())
        .lookup(server_name)
        .cloned()
}

/// The first pick for a connection from `client`: by source IP when the cluster asks for
/// affinity, else the nearest-healthy draw.
pub fn first_pick<'t, C>(
    cluster: &'t ClusterTable<C>,
    client: SocketAddr,
) -> Option<balancer::Pick<'t>> {
    let max = cluster.config.max_requests_per_endpoint;
    match cluster.config.affinity {
        crate::config::Affinity::SourceIp => match client.ip().to_canonical() {
            std::net::IpAddr::V4(a) => balancer::pick_affinity(cluster, &a.octets(), max),
            std::net::IpAddr::V6(a) => balancer::pick_affinity(cluster, &a.octets(), max),
        },
        _ => balancer::pick(cluster, max),
    }
}

/// Connects to the picked endpoint, and on failure to others (another zone first), up to
/// the cluster's retry attempts. Every failure counts against its endpoint. With the
/// connection, the reason of the pick and the connect round trip.
async fn dial(
    cluster: &ClusterTable<crate::control::UpstreamClient>,
    client: SocketAddr,
    listener: &str,
    control: &Control,
) -> Option<(TcpStream, InFlight, &'static str, Duration)> {
    let cfg = &cluster.config;
    let mut pick = first_pick(cluster, client)?;
    let mut reason = pick.reason;
    for attempt in 0..=cfg.retry.attempts {
        let ep = pick.endpoint.state.clone();
        let in_flight = InFlight::new(ep.clone());
        let started = Instant::now();
        match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => {
                ep.record_outcome(false, &cfg.outlier);
                return Some((s, in_flight, reason.as_str(), started.elapsed()));
            }
            Ok(Err(e)) => {
                debug!(listener, endpoint = %ep.label, attempt, "connect failed: {e}");
            }
            Err(_) => {
                debug!(listener, endpoint = %ep.label, attempt, "connect timed out");
                ep.observe(cfg.connect_timeout, cluster.decay);
            }
        }
        control
            .metrics
            .l4
            .connect_errors
            .with_label_values(&[&cluster.name, &ep.label])
            .inc();
        ep.record_outcome(true, &cfg.outlier);
        drop(in_flight);
        pick = balancer::pick_other(cluster, &ep, cfg.max_requests_per_endpoint, Reason::Retry)?;
        reason = Reason::Retry;
    }
    None
}
