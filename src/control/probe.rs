//! Every endpoint the router knows, with its prober: active health checks feed each
//! endpoint's state (health, latency); the reconciler turns that state into tables.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{ClusterConfig, Decay, HealthCheckConfig};
use crate::state::{budget_cap, ClusterShared, EndpointState};
use crate::telemetry::events::Events;
use crate::telemetry::metrics::{EndpointMetrics, Metrics};
use crate::upstream::{self, Connector};

/// Every endpoint the router knows, with its prober. Touched only off the request path.
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// Woken on every flip of health or ejection: the table builder waits on it.
    pub changed: Arc<Notify>,
    pub events: Arc<Events>,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    clusters: HashMap<String, Arc<ClusterShared>>,
    endpoints: HashMap<(String, SocketAddr), Tracked>,
}

struct Tracked {
    state: Arc<EndpointState>,
    prober: JoinHandle<()>,
    /// The health check the prober runs with; a change restarts it.
    hc: HealthCheckConfig,
    zone: (String, String),
}

/// One endpoint as the config (after DNS) wants it.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub addr: SocketAddr,
    pub region: String,
    pub zone: String,
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, events: Arc<Events>) -> Health {
        Health {
            metrics,
            changed: Arc::new(Notify::new()),
            events,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn cluster(&self, name: &str) -> Arc<ClusterShared> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        Self::cluster_locked(&mut inner, name, &self.changed, &self.events)
    }

    fn cluster_locked(
        inner: &mut Inner,
        name: &str,
        changed: &Arc<Notify>,
        events: &Arc<Events>,
    ) -> Arc<ClusterShared> {
        inner
            .clusters
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(ClusterShared::new(name, changed.clone(), events.clone())))
            .clone()
    }

    /// Makes the tracked endpoints of `cluster` exactly `wanted`: new ones get a state and a
    /// prober, removed ones lose theirs, kept ones keep what was learnt about them.
    /// Returns the states in the order of `wanted`.
    pub fn sync_cluster(
        &self,
        cluster: &ClusterConfig,
        wanted: &[Wanted],
        connector: &Connector,
        decay: Decay,
    ) -> Vec<Arc<EndpointState>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let shared = Self::cluster_locked(&mut inner, &cluster.name, &self.changed, &self.events);
        shared
            .endpoints
            .store(wanted.len() as u32, Ordering::Relaxed);
        let mut out = Vec::with_capacity(wanted.len());
        let mut keep = std::collections::HashSet::new();
        for w in wanted {
            let key = (cluster.name.clone(), w.addr);
            keep.insert(key.clone());
            let zone = (w.region.clone(), w.zone.clone());
            let reuse = match inner.endpoints.get(&key) {
                Some(t) if t.zone == zone && t.hc == cluster.health_check => Some(t.state.clone()),
                _ => None,
            };
            if let Some(s) = reuse {
                out.push(s);
                continue;
            }
            let label: Arc<str> = Arc::from(w.addr.to_string());
            let mut state =
                EndpointState::detached(&cluster.name, w.addr, &w.region, &w.zone, &self.metrics);
            if let Some(s) = Arc::get_mut(&mut state) {
                s.shared = shared.clone();
            }
            if let Some(old) = inner.endpoints.remove(&key) {
                // Same address, new zone or new health check: keep what we learnt.
                old.prober.abort();
                state.inherit(&old.state);
                if old.state.is_ejected() {
                    shared.ejected.fetch_sub(1, Ordering::AcqRel);
                }
                if old.zone != zone {
                    EndpointMetrics::remove(
                        &self.metrics,
                        &cluster.name,
                        &old.zone.0,
                        &old.zone.1,
                        &label,
                    );
                }
            }
            let prober = tokio::spawn(probe_loop(
                state.clone(),
                cluster.health_check.clone(),
                decay,
                upstream::probe_client(connector.clone(), cluster.http2),
                cluster.tls.is_some(),
                cluster.send_proxy_protocol,
            ));
            inner.endpoints.insert(
                key,
                Tracked {
                    state: state.clone(),
                    prober,
                    hc: cluster.health_check.clone(),
                    zone,
                },
            );
            out.push(state);
        }
        let gone: Vec<_> = inner
            .endpoints
            .keys()
            .filter(|k| k.0 == cluster.name && !keep.contains(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(t) = inner.endpoints.remove(&k) {
                t.prober.abort();
                if t.state.is_ejected() {
                    shared.ejected.fetch_sub(1, Ordering::AcqRel);
                }
                EndpointMetrics::remove(&self.metrics, &k.0, &t.zone.0, &t.zone.1, &t.state.label);
            }
        }
        out
    }

    /// Forgets clusters that left the config.
    pub fn retain_clusters(&self, names: &[&str]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clusters.retain(|n, _| names.contains(&n.as_str()));
        let gone: Vec<_> = inner
            .endpoints
            .keys()
            .filter(|k| !names.contains(&k.0.as_str()))
            .cloned()
            .collect();
        for k in gone {
            if let Some(t) = inner.endpoints.remove(&k) {
                t.prober.abort();
                EndpointMetrics::remove(&self.metrics, &k.0, &t.zone.0, &t.zone.1, &t.state.label);
            }
        }
    }

    /// Refills budgets; called by the table builder every `dt`.
    pub fn tick(&self, dt: Duration, clusters: &[ClusterConfig]) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for c in clusters {
            if let Some(s) = inner.clusters.get(&c.name) {
                let per_tick =
                    (c.retry.min_retries_per_second as f64 * dt.as_secs_f64() * 1000.0) as i64;
                s.retry_budget
                    .refill(per_tick, budget_cap(c.retry.min_retries_per_second));
                s.hedge_budget.refill(0, 0);
            }
        }
    }

    /// Stops every prober (shutdown).
    pub fn stop(&self) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for t in inner.endpoints.values() {
            t.prober.abort();
        }
    }
}

async fn probe_loop(
    ep: Arc<EndpointState>,
    hc: HealthCheckConfig,
    decay: Decay,
    client: Client<Connector, Empty<Bytes>>,
    tls: bool,
    proxy: Option<crate::config::ProxyVersion>,
) {
    // Spread the first probes so a thousand endpoints are not probed in one instant, yet
    // keep start-up quick.
    let first = rand::thread_rng()
        .gen_range(0..=hc.interval.min(Duration::from_millis(100)).as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(first)).await;
    let mut counters = (0u32, 0u32);
    loop {
        let started = Instant::now();
        // health_check.port: the endpoint's health is served elsewhere (a udp service with
        // a tcp health port, a sidecar).
        let target = match hc.port {
            Some(port) => SocketAddr::new(ep.addr.ip(), port),
            None => ep.addr,
        };
        let result = match &hc.path {
            Some(path) => probe_http(&client, target, path, hc.timeout, tls, proxy).await,
            None => probe_tcp(target, hc.timeout, proxy).await,
        };
        let rtt = started.elapsed();
        ep.metrics.probe_duration.observe(rtt.as_secs_f64());
        if result.is_ok() {
            ep.idle.expire();
        } else {
            ep.idle.clear();
        }
        let (ok, detail) = match result {
            Ok(()) => {
                ep.observe_probe(rtt, decay);
                ep.metrics.probe_ok.inc();
                (
                    true,
                    format!("probe ok in {:.1} ms", rtt.as_secs_f64() * 1e3),
                )
            }
            Err(ProbeError::Timeout) => {
                // A probe that times out says the endpoint is at least this slow.
                ep.observe_probe(hc.timeout, decay);
                ep.metrics.probe_fail.inc();
                (false, format!("probe timed out after {:?}", hc.timeout))
            }
            Err(ProbeError::Failed(e)) => {
                ep.metrics.probe_fail.inc();
                (false, e)
            }
        };
        ep.on_probe(ok, &hc, &mut counters, &detail);
        ep.forget_stale_requests(decay.peak);
        if let Some(ms) = ep.latency_ms() {
            ep.metrics.latency.set(ms / 1e3);
        }
        // +-10% jitter so probes of many endpoints do not march in step.
        let jitter = rand::thread_rng().gen_range(0.9..1.1);
        let next = hc
            .interval
            .mul_f64(jitter)
            .saturating_sub(started.elapsed());
        tokio::time::sleep(next).await;
    }
}

enum ProbeError {
    Timeout,
    Failed(String),
}

/// A connect; for a cluster that sends PROXY headers, one naming the probe's own
/// connection follows (an upstream that requires the header would log every probe as a
/// bad connection otherwise).
async fn probe_tcp(
    addr: SocketAddr,
    timeout: Duration,
    proxy: Option<crate::config::ProxyVersion>,
) -> Result<(), ProbeError> {
    let connect = async {
        match proxy {
            None => tokio::net::TcpStream::connect(addr).await.map(drop),
            Some(v) => upstream::proxied::dial(addr, timeout, v, None)
                .await
                .map(drop),
        }
    };
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(ProbeError::Timeout),
        Ok(Err(e)) => Err(ProbeError::Failed(format!("tcp connect failed: {e}"))),
        Ok(Ok(())) => Ok(()),
    }
}

async fn probe_http(
    client: &Client<Connector, Empty<Bytes>>,
    target: SocketAddr,
    path: &str,
    timeout: Duration,
    tls: bool,
    proxy: Option<crate::config::ProxyVersion>,
) -> Result<(), ProbeError> {
    let scheme = if tls { "https" } else { "http" };
    // A cluster that sends PROXY headers is probed on a connection of its own that starts
    // with one naming the probe's own ends (HAProxy's `check-send-proxy`): the pooled
    // probe client could not send it. Such a cluster is plain HTTP/1.1 (config says so).
    let uri = match proxy {
        None => format!("{scheme}://{target}{path}"),
        Some(_) => path.to_string(),
    };
    let req = http::Request::get(uri)
        .header(
            http::header::USER_AGENT,
            concat!("edge-router/", env!("CARGO_PKG_VERSION"), " health-check"),
        )
        .header(http::header::HOST, target.to_string())
        .body(Empty::new())
        .map_err(|e| ProbeError::Failed(format!("bad probe request: {e}")))?;
    let exchange = async {
        match proxy {
            None => client
                .request(req)
                .await
                .map_err(|e| upstream::describe_failure(&e)),
            Some(v) => upstream::proxied::send_once(None, target, timeout, v, None, req)
                .await
                .map_err(|e| e.to_string()),
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Err(ProbeError::Timeout),
        Ok(Err(e)) => Err(ProbeError::Failed(format!("probe failed: {e}"))),
        Ok(Ok(resp)) if resp.status().is_success() => {
            // Drain the (small) body so the connection returns to the pool.
            let _ =
                tokio::time::timeout(timeout, http_body_util::BodyExt::collect(resp.into_body()))
                    .await;
            Ok(())
        }
        Ok(Ok(resp)) => Err(ProbeError::Failed(format!(
            "probe answered {}",
            resp.status()
        ))),
    }
}
