//! The udp listener: datagrams from one client address (address and port) form a flow,
//! pinned to the endpoint picked for its first datagram, with a connected socket of its own
//! towards that endpoint. Replies go back from the listener's socket. A flow ends when it
//! has been idle (no datagram either way) for `flow_idle_timeout`; a datagram for a flow
//! whose endpoint is no longer available picks again.
//!
//! A flow's latency sample, the counterpart of a tcp connection's, is the time from its
//! first datagram to the endpoint's first reply; a flow that gets no reply gives none.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::config::Protocol;
use crate::control::Control;
use crate::dataplane::l4::tcp::first_pick;
use crate::dataplane::l4::udp_flows::{FlowTable, FlowTableFull};
use crate::state::EndpointState;

/// The largest datagram relayed (the UDP maximum).
const MAX_DATAGRAM: usize = 65_535;

struct Flow {
    upstream: Arc<UdpSocket>,
    endpoint: Arc<EndpointState>,
    replies: JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

type Flows = Arc<Mutex<FlowTable<Flow>>>;

/// Serves one udp listener until `stop`.
pub async fn serve(
    socket: UdpSocket,
    control: Arc<Control>,
    mut stop: watch::Receiver<bool>,
    name: String,
) {
    let socket = Arc::new(socket);
    let settings = |c: &crate::config::Config| {
        c.listeners
            .iter()
            .find(|l| l.name == name)
            .and_then(|l| match &l.protocol {
                Protocol::Udp {
                    cluster,
                    flow_idle_timeout,
                    max_flows,
                } => Some((cluster.clone(), *flow_idle_timeout, *max_flows)),
                _ => None,
            })
    };
    let Some((_, _, max_flows)) = settings(&control.config.load()) else {
        return;
    };
    let flows: Flows = Arc::new(Mutex::new(FlowTable::new(max_flows)));
    let m = &control.metrics.l4;
    let active = m.flows_active.with_label_values(&[&name]);
    let opened = m.listener_connections.with_label_values(&[&name, "udp"]);
    let up = m.datagrams.with_label_values(&[&name, "to_upstream"]);
    let full = m.dropped.with_label_values(&[&name, "flow_limit"]);
    let no_endpoint = m.dropped.with_label_values(&[&name, "no_endpoint"]);
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    loop {
        let (n, client) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors of earlier sends surface here on some systems.
                    debug!("listener {name}: recv: {e}");
                    continue;
                }
            },
            _ = sweep.tick() => {
                let idle = settings(&control.config.load()).map_or(Duration::from_secs(30), |s| s.1);
                let expired = match flows.lock() {
                    Ok(mut f) => {
                        let gone = f.expire(Instant::now(), idle);
                        active.set(f.len() as i64);
                        gone
                    }
                    Err(_) => Vec::new(),
                };
                drop(expired);
                continue;
            }
            _ = stop.changed() => break,
        };
        let data = &buf[..n];
        let now = Instant::now();
        // The flow's socket, when it has one whose endpoint is still available.
        let existing = match flows.lock() {
            Ok(mut f) => f
                .touch(&client, now)
                .filter(|flow| flow.endpoint.is_available())
                .map(|flow| flow.upstream.clone()),
            Err(_) => None,
        };
        let upstream = match existing {
            Some(u) => u,
            None => {
                let Some((cluster, _, _)) = settings(&control.config.load()) else {
                    continue;
                };
                match open_flow(&control, &socket, &flows, client, &cluster, &name).await {
                    Ok(Some(u)) => {
                        opened.inc();
                        u
                    }
                    Ok(None) => {
                        no_endpoint.inc();
                        continue;
                    }
                    Err(()) => {
                        full.inc();
                        continue;
                    }
                }
            }
        };
        if let Ok(mut f) = flows.lock() {
            active.set(f.len() as i64);
            let _ = f.touch(&client, now);
        }
        match upstream.send(data).await {
            Ok(_) => up.inc(),
            Err(e) => debug!("listener {name}: send to upstream: {e}"),
        }
    }
    if let Ok(mut f) = flows.lock() {
        f.retain(|_, _| false);
    }
    active.set(0);
}

/// Picks an endpoint, connects a socket to it and starts relaying its replies. `Ok(None)`:
/// no endpoint could take the flow; `Err(())`: the flow table is full.
async fn open_flow(
    control: &Arc<Control>,
    listener: &Arc<UdpSocket>,
    flows: &Flows,
    client: SocketAddr,
    cluster_name: &str,
    name: &str,
) -> Result<Option<Arc<UdpSocket>>, ()> {
    // Refuse early, before a socket is made, when a new client could not be admitted.
    if let Ok(f) = flows.lock() {
        if f.get(&client).is_none() && f.len() >= f.max_flows() {
            return Err(());
        }
    }
    let table = control.table();
    let Some(cluster) = table.cluster(cluster_name) else {
        return Ok(None);
    };
    let Some(pick) = first_pick(cluster, client) else {
        return Ok(None);
    };
    let ep = pick.endpoint.state.clone();
    let bind: SocketAddr = if ep.addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let upstream = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            warn!("listener {name}: cannot open a flow socket: {e}");
            return Ok(None);
        }
    };
    if let Err(e) = upstream.connect(ep.addr).await {
        debug!("listener {name}: connect {}: {e}", ep.label);
        return Ok(None);
    }
    let upstream = Arc::new(upstream);
    let m = &control.metrics.l4;
    m.connections
        .with_label_values(&[name, &cluster.name, &ep.region, &ep.zone])
        .inc();
    let replies = tokio::spawn(relay_replies(
        upstream.clone(),
        listener.clone(),
        flows.clone(),
        client,
        m.datagrams.with_label_values(&[name, "to_client"]),
        (ep.clone(), cluster.decay),
    ));
    let flow = Flow {
        upstream: upstream.clone(),
        endpoint: ep.clone(),
        replies,
    };
    let inserted = match flows.lock() {
        Ok(mut f) => f.insert(client, flow, Instant::now()),
        Err(_) => return Ok(None),
    };
    match inserted {
        Ok(_) => Ok(Some(upstream)),
        Err(FlowTableFull(flow)) => {
            drop(flow);
            Err(())
        }
    }
}

/// Sends the endpoint's datagrams back to the client, from the listener's own address.
async fn relay_replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    flows: Flows,
    client: SocketAddr,
    count: prometheus::IntCounter,
    (endpoint, decay): (Arc<EndpointState>, crate::config::Decay),
) {
    // The flow's first datagram leaves right after this task starts.
    let sent = Instant::now();
    let mut first = true;
    loop {
        // A waiting flow holds no buffer: with up to `max_flows` of them, 64 KiB each would
        // be hundreds of MiB. A datagram is read into the thread's buffer once it is there.
        if upstream.readable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let relayed = REPLY_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let n = upstream.try_recv(&mut buf[..])?;
            // Sent at once when the socket has room; else copied out and awaited below.
            match listener.try_send_to(&buf[..n], client) {
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Some(buf[..n].to_vec())),
                Err(e) => Err(e),
            }
        });
        let sent_now = match relayed {
            Ok(None) => true,
            Ok(Some(datagram)) => listener.send_to(&datagram, client).await.is_ok(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            // A refused send (ICMP port unreachable) surfaces here; the flow stays until it
            // idles out or its endpoint leaves the table.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if first {
            first = false;
            endpoint.observe(sent.elapsed(), decay);
        }
        if let Ok(mut f) = flows.lock() {
            let _ = f.touch(&client, Instant::now());
        }
        if sent_now {
            count.inc();
        }
    }
}

thread_local! {
    /// The datagram buffer of every flow's reply task on this thread (they read in turn).
    static REPLY_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; MAX_DATAGRAM].into_boxed_slice());
}
