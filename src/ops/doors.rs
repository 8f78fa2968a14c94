//! The running listeners ("doors"): bound at start, added and removed by a reload, stopped
//! and drained on shutdown. Each listener has its own socket, task and stop signal; the
//! connection limit is shared by all of them.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{self, Config, ListenerSpec, Protocol};
use crate::control::Control;
use crate::dataplane::listener::{self, bind, spawn_data_threads};
use crate::upstream::tls::{CertPair, ReloadableServerTls};

use super::router::DataPlane;

/// One running listener.
pub struct Door {
    pub spec: ListenerSpec,
    /// Where it really listens (port 0 in config picks a free one).
    pub local: SocketAddr,
    /// Its certificates when it terminates TLS; a reload re-reads them.
    pub tls: Option<Arc<ReloadableServerTls>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Door {
    /// Stops accepting; the task drains its connections and ends.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    pub fn into_task(self) -> JoinHandle<()> {
        self.task
    }
}

/// The config key of a listener setting, as errors name it: `listener.tls` in the
/// one-listener short form, `listener "web": tls` otherwise.
pub fn key(config: &Config, spec: &ListenerSpec, k: &str) -> String {
    if config.listeners.len() == 1 && spec.name == config::DEFAULT_LISTENER_NAME {
        format!("listener.{k}")
    } else {
        format!("listener {:?}: {k}", spec.name)
    }
}

/// A bound listener not yet serving: binding every new socket before starting any lets a
/// reload fail as a whole when one address is taken.
pub struct Bound {
    spec: ListenerSpec,
    socket: Socket,
    local: SocketAddr,
    tls: Option<Arc<ReloadableServerTls>>,
}

enum Socket {
    Tcp(TcpListener),
    /// SO_REUSEPORT sockets, one per data-plane thread.
    PerCore(TcpListener, Vec<TcpListener>),
    /// tcp and tls_passthrough.
    L4(TcpListener),
    Udp(tokio::net::UdpSocket),
}

pub fn tls_pairs(t: &config::ListenerTls) -> Vec<CertPair> {
    t.certificates
        .iter()
        .map(|c| CertPair {
            cert: c.cert.clone(),
            key: c.key.clone(),
        })
        .collect()
}

/// Binds one listener's socket(s) and loads its certificates.
pub async fn bind_door(
    config: &Config,
    spec: &ListenerSpec,
    plane: DataPlane,
) -> Result<Bound, String> {
    let k = key(config, spec, "address");
    let tls = match &spec.protocol {
        Protocol::Https(t) => Some(Arc::new(
            ReloadableServerTls::new(&tls_pairs(t))
                .map_err(|e| format!("{}: {e}", key(config, spec, "tls")))?,
        )),
        _ => None,
    };
    let socket = match (&spec.protocol, plane) {
        (Protocol::Udp { .. }, _) => Socket::Udp(
            tokio::net::UdpSocket::bind(spec.address)
                .await
                .map_err(|e| format!("{k} {}: cannot bind: {e}", spec.address))?,
        ),
        (Protocol::Tcp { .. } | Protocol::TlsPassthrough { .. }, _) => {
            Socket::L4(bind(spec.address, &k, false).await?)
        }
        (Protocol::Http | Protocol::Https(_), DataPlane::PerCore(n)) if n > 1 => {
            // A plain bind first: it fails while anything holds the address, another
            // router's SO_REUSEPORT sockets included, which the sockets below would otherwise
            // silently join (and share its traffic). It also settles the port when the
            // config says 0.
            let addr = bind(spec.address, &k, false)
                .await?
                .local_addr()
                .map_err(|e| format!("{k}: {e}"))?;
            let first = bind(addr, &k, true).await?;
            let mut more = Vec::new();
            for _ in 1..n {
                more.push(bind(addr, &k, true).await?);
            }
            Socket::PerCore(first, more)
        }
        (Protocol::Http | Protocol::Https(_), _) => {
            Socket::Tcp(bind(spec.address, &k, false).await?)
        }
    };
    let local = match &socket {
        Socket::Tcp(l) | Socket::PerCore(l, _) | Socket::L4(l) => l.local_addr(),
        Socket::Udp(u) => u.local_addr(),
    }
    .map_err(|e| format!("{k}: {e}"))?;
    Ok(Bound {
        spec: spec.clone(),
        socket,
        local,
        tls,
    })
}

impl Bound {
    /// Keeps this listener's sockets for a binary upgrade (SIGUSR2), under the key its
    /// bind used, so the new process's bind finds them. UDP sockets are not handed over:
    /// an upgrade with a udp listener fails at the new process's bind and the old one
    /// keeps serving.
    pub fn hand_over(&self, config: &Config, handover: &crate::ops::upgrade::Handover) {
        let k = key(config, &self.spec, "address");
        match &self.socket {
            Socket::Tcp(l) | Socket::L4(l) => handover.keep(&k, l, false),
            Socket::PerCore(first, more) => {
                for l in std::iter::once(first).chain(more) {
                    handover.keep(&k, l, true);
                }
            }
            Socket::Udp(_) => {}
        }
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn spec(&self) -> &ListenerSpec {
        &self.spec
    }

    /// Starts serving. `limit` is the process-wide connection cap.
    pub fn start(
        self,
        control: &Arc<Control>,
        limit: (Arc<Semaphore>, usize),
    ) -> Result<Door, String> {
        let (stop, stop_rx) = watch::channel(false);
        let id = self.spec.id();
        let task = match self.socket {
            Socket::Tcp(l) => tokio::spawn(listener::serve_data(
                l,
                control.clone(),
                stop_rx,
                self.tls.clone(),
                limit,
                id,
            )),
            Socket::L4(l) => tokio::spawn(crate::dataplane::l4::tcp::serve(
                l,
                control.clone(),
                stop_rx,
                limit,
                self.spec.name.clone(),
            )),
            Socket::Udp(u) => tokio::spawn(crate::dataplane::l4::udp::serve(
                u,
                control.clone(),
                stop_rx,
                self.spec.name.clone(),
            )),
            Socket::PerCore(first, more) => {
                let threads =
                    spawn_data_threads(first, more, control, &stop, self.tls.clone(), limit, id)?;
                tokio::spawn(async move {
                    for t in threads {
                        let _ = tokio::task::spawn_blocking(move || t.join()).await;
                    }
                })
            }
        };
        Ok(Door {
            spec: self.spec,
            local: self.local,
            tls: self.tls,
            stop,
            task,
        })
    }
}

/// What a reload does to the running listeners.
pub struct Plan {
    /// Running listeners that stay (index into the running list), with their new spec.
    pub keep: Vec<(usize, ListenerSpec)>,
    /// Listeners to bind and start.
    pub add: Vec<ListenerSpec>,
}

/// Matches the new config's listeners with the running ones by address (configured or
/// bound; for port 0, with the name). A listener whose protocol or name changed on the same address keeps running as
/// it was, and `new` is corrected to say so: that change needs a restart.
pub fn plan(running: &[Door], new: &mut Config, notes: &mut Vec<String>) -> Plan {
    let mut keep = Vec::new();
    let mut add = Vec::new();
    for spec in new.listeners.iter_mut() {
        // A port once picked by the kernel (port 0) may be written into the file later.
        let udp = |p: &Protocol| matches!(p, Protocol::Udp { .. });
        let found = running.iter().enumerate().find(|(i, d)| {
            udp(&d.spec.protocol) == udp(&spec.protocol)
                && (d.local == spec.address
                    || d.spec.address == spec.address
                        && (spec.address.port() != 0 || d.spec.name == spec.name))
                && !keep.iter().any(|(k, _)| k == i)
        });
        match found {
            None => add.push(spec.clone()),
            Some((i, d)) => {
                if d.spec.protocol.as_str() != spec.protocol.as_str() {
                    notes.push(format!(
                        "listener {:?} on {}: protocol {} -> {} needs a restart; still {}",
                        spec.name,
                        spec.address,
                        d.spec.protocol.as_str(),
                        spec.protocol.as_str(),
                        d.spec.protocol.as_str()
                    ));
                    *spec = d.spec.clone();
                } else if d.spec.name != spec.name {
                    notes.push(format!(
                        "listener on {}: renaming {:?} -> {:?} needs a restart; still {:?}",
                        spec.address, d.spec.name, spec.name, d.spec.name
                    ));
                    *spec = d.spec.clone();
                }
                keep.push((i, spec.clone()));
            }
        }
    }
    Plan { keep, add }
}
