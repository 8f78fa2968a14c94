//! Health state of every endpoint: active probes, passive outlier detection and the decaying
//! latency average. Everything the request path reads or writes here is an atomic.
//!
//! Data flows one way: probers and real requests write [`EndpointState`]; the table builder
//! reads it and wakes up on [`Health::changed`] whenever something flips.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use rand::Rng;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{ClusterConfig, HealthCheckConfig, OutlierConfig};
use crate::metrics::{EndpointMetrics, Metrics};
use crate::upstream::{self, Connector};

/// Milliseconds since the process started: a cheap, monotonic clock that fits in 32 bits
/// for 49 days and wraps harmlessly (only differences are used).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// An exponentially decaying latency average whose weights follow time, not sample count:
/// a sample moves it by `1 - exp(-elapsed / decay)`, so 10 or 10 000 samples a second give
/// the same time constant. Estimate and timestamp share one atomic word, so updates from
/// many requests never tear and never lock.
///
/// With `PEAK` (the idea of tower's PeakEwma) a sample above the estimate replaces it at
/// once: a slowdown counts immediately and recovery decays in. That is right for choosing
/// between endpoints of one zone, which all get traffic. Ranking zones uses the symmetric
/// form, because only the nearest zone gets traffic and a peak-biased average would make
/// the busy zone look slower than idle ones and flap.
#[derive(Default)]
pub struct Average<const PEAK: bool> {
    /// High 32 bits: estimate in microseconds as f32 bits (0 = no sample yet);
    /// low 32 bits: `now_ms()` of the last update, truncated.
    word: AtomicU64,
}

pub type PeakEwma = Average<true>;
pub type Ewma = Average<false>;

/// Time constants of an endpoint's two averages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decay {
    pub peak: Duration,
    pub smooth: Duration,
}

impl<const PEAK: bool> Average<PEAK> {
    fn pack(est_us: f32, at_ms: u64) -> u64 {
        ((est_us.to_bits() as u64) << 32) | (at_ms & 0xffff_ffff)
    }

    pub fn observe(&self, sample: Duration, decay: Duration) {
        let s = (sample.as_secs_f64() * 1e6).max(1.0) as f32;
        let now = now_ms();
        let decay_ms = decay.as_millis().max(1) as f64;
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let est = f32::from_bits((cur >> 32) as u32);
            let next = if cur == 0 || est <= 0.0 || (PEAK && s >= est) {
                s
            } else {
                let elapsed = (now as u32).wrapping_sub(cur as u32) as f64;
                let w = (-elapsed / decay_ms).exp() as f32;
                est * w + s * (1.0 - w)
            };
            match self.word.compare_exchange_weak(
                cur,
                Self::pack(next, now),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The estimate in microseconds, `None` before the first sample.
    pub fn get_us(&self) -> Option<f64> {
        let w = self.word.load(Ordering::Relaxed);
        let est = f32::from_bits((w >> 32) as u32);
        (w != 0 && est > 0.0).then_some(est as f64)
    }

    /// Forgets every sample (tests and benches that script latencies).
    pub fn reset_for_test(&self) {
        self.word.store(0, Ordering::Relaxed);
    }

    /// Seeds a state from another (reload keeps averages of endpoints that stayed).
    pub fn copy_from(&self, other: &Average<PEAK>) {
        self.word
            .store(other.word.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Not probed yet: not in the table, but fail-open may still try it.
    Unknown = 0,
    Healthy = 1,
    Unhealthy = 2,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Unknown => "unknown",
            Status::Healthy => "healthy",
            Status::Unhealthy => "unhealthy",
        }
    }
}

/// What one endpoint is now. Shared by the prober, the table builder and the request path;
/// it outlives tables, so in-flight counts and averages survive every rebuild.
pub struct EndpointState {
    pub cluster: Arc<str>,
    pub addr: SocketAddr,
    /// `addr` as text, the label and the name in /routes.
    pub label: Arc<str>,
    pub region: Arc<str>,
    pub zone: Arc<str>,
    status: AtomicU8,
    /// Peak-sensitive: the in-zone pick's latency.
    pub latency: PeakEwma,
    /// Symmetric: the zone ranking's latency, and the one reported.
    pub smoothed: Ewma,
    pub in_flight: AtomicU32,
    pub requests: AtomicU64,
    passive_failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Good probes since the ejection began; enough of them end it early.
    probes_since_ejection: AtomicU32,
    ejections: AtomicU32,
    pub metrics: EndpointMetrics,
    shared: Arc<ClusterShared>,
    /// Idle upstream connections of the native HTTP/1.1 path; they live and die with the
    /// endpoint (a reload that keeps the endpoint keeps them).
    pub idle: crate::upstream::IdlePool,
}

impl EndpointState {
    /// An endpoint with no prober, for tests and benches that script its health.
    pub fn detached(
        cluster: &str,
        addr: SocketAddr,
        region: &str,
        zone: &str,
        metrics: &Metrics,
    ) -> Arc<EndpointState> {
        let label = addr.to_string();
        Arc::new(EndpointState {
            cluster: Arc::from(cluster),
            addr,
            label: Arc::from(label.as_str()),
            region: Arc::from(region),
            zone: Arc::from(zone),
            status: AtomicU8::new(Status::Unknown as u8),
            latency: PeakEwma::default(),
            smoothed: Ewma::default(),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            probes_since_ejection: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            metrics: EndpointMetrics::new(metrics, cluster, region, zone, &label),
            shared: Arc::new(ClusterShared::new(
                cluster,
                Arc::new(Notify::new()),
                Arc::new(Events::new()),
            )),
            idle: crate::upstream::IdlePool::default(),
        })
    }

    /// Sets the status directly (tests and benches).
    pub fn force_status(&self, s: Status) {
        self.status.store(s as u8, Ordering::Relaxed);
    }

    pub fn shared(&self) -> &Arc<ClusterShared> {
        &self.shared
    }

    pub fn status(&self) -> Status {
        match self.status.load(Ordering::Relaxed) {
            1 => Status::Healthy,
            2 => Status::Unhealthy,
            _ => Status::Unknown,
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Ordering::Relaxed) != 0
    }

    /// In the table as a normal (non fail-open) target.
    pub fn is_available(&self) -> bool {
        self.status() == Status::Healthy && !self.is_ejected()
    }

    /// The smoothed latency (ranking, /routes, metrics).
    pub fn latency_ms(&self) -> Option<f64> {
        self.smoothed.get_us().map(|us| us / 1000.0)
    }

    pub fn peak_latency_ms(&self) -> Option<f64> {
        self.latency.get_us().map(|us| us / 1000.0)
    }

    /// One latency sample (a probe's round trip or a request's time to headers).
    pub fn observe(&self, sample: Duration, decay: Decay) {
        self.latency.observe(sample, decay.peak);
        self.smoothed.observe(sample, decay.smooth);
    }

    /// A real request's outcome, for passive outlier detection. `failed` means a connect
    /// failure or a 5xx. Cheap on success: one load, and a store only after failures.
    pub fn record_outcome(&self, failed: bool, outlier: &OutlierConfig) {
        if !failed {
            if self.passive_failures.load(Ordering::Relaxed) != 0 {
                self.passive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let n = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if outlier.consecutive_failures == 0
            || n < outlier.consecutive_failures
            || self.is_ejected()
        {
            return;
        }
        self.eject(outlier);
    }

    fn eject(&self, outlier: &OutlierConfig) {
        let shared = &self.shared;
        let total = shared.endpoints.load(Ordering::Relaxed);
        // At least one endpoint may go even in small clusters, where a percentage of 2 or 3
        // rounds down to nothing (the Envoy complaint in envoy#3263).
        let allowed = ((total as u64 * outlier.max_ejection_percent as u64) / 100)
            .max(u64::from(total >= 2)) as u32;
        let ejected = shared.ejected.fetch_add(1, Ordering::AcqRel);
        if ejected >= allowed {
            shared.ejected.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        let times = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let dur = outlier
            .base_ejection_time
            .saturating_mul(times)
            .min(outlier.max_ejection_time);
        let until = now_ms() + dur.as_millis() as u64;
        if self
            .ejected_until
            .compare_exchange(0, until.max(1), Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            shared.ejected.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        self.probes_since_ejection.store(0, Ordering::Relaxed);
        self.passive_failures.store(0, Ordering::Relaxed);
        self.metrics.ejections.inc();
        shared.changed.notify_one();
        let msg = format!(
            "{} {} ({}/{}) ejected for {:?}: {} failures in a row on real traffic (ejection #{times})",
            self.cluster, self.label, self.region, self.zone, dur, outlier.consecutive_failures
        );
        warn!(target: "health", cluster = %self.cluster, endpoint = %self.label, "{msg}");
        shared.events.push("ejection", msg);
    }

    fn end_ejection(&self, why: &str) {
        if self.ejected_until.swap(0, Ordering::AcqRel) != 0 {
            self.shared.ejected.fetch_sub(1, Ordering::AcqRel);
            self.shared.changed.notify_one();
            let msg = format!(
                "{} {} ({}/{}) returns: {why}",
                self.cluster, self.label, self.region, self.zone
            );
            info!(target: "health", cluster = %self.cluster, endpoint = %self.label, "{msg}");
            self.shared.events.push("ejection", msg);
        }
    }

    /// Feeds a probe result into the state machine; returns true when the status flipped.
    fn on_probe(
        &self,
        ok: bool,
        hc: &HealthCheckConfig,
        counters: &mut (u32, u32),
        detail: &str,
    ) -> bool {
        let (good, bad) = counters;
        if ok {
            *good += 1;
            *bad = 0;
        } else {
            *bad += 1;
            *good = 0;
        }
        let old = self.status();
        // The first probe decides at once (as Envoy does for new hosts), so a fresh router
        // is ready after one round instead of `healthy_threshold` rounds.
        let new = match old {
            Status::Unknown => {
                if ok {
                    Status::Healthy
                } else {
                    Status::Unhealthy
                }
            }
            Status::Healthy if !ok && *bad >= hc.unhealthy_threshold => Status::Unhealthy,
            Status::Unhealthy if ok && *good >= hc.healthy_threshold => Status::Healthy,
            s => s,
        };
        if self.is_ejected() {
            let now = now_ms();
            let until = self.ejected_until.load(Ordering::Relaxed);
            let good_probes = if ok {
                self.probes_since_ejection.fetch_add(1, Ordering::Relaxed) + 1
            } else {
                self.probes_since_ejection.store(0, Ordering::Relaxed);
                0
            };
            if now >= until {
                self.end_ejection("ejection time is over");
            } else if good_probes >= hc.healthy_threshold {
                self.end_ejection(&format!("{good_probes} good probes in a row"));
            }
        }
        if new == old {
            return false;
        }
        self.status.store(new as u8, Ordering::Relaxed);
        self.metrics.healthy.set(i64::from(new == Status::Healthy));
        let msg = format!(
            "{} {} ({}/{}) {} -> {}: {detail}",
            self.cluster,
            self.label,
            self.region,
            self.zone,
            old.as_str(),
            new.as_str()
        );
        info!(target: "health", cluster = %self.cluster, endpoint = %self.label, "{msg}");
        self.shared.events.push("health", msg);
        self.shared.changed.notify_one();
        true
    }

    /// Copies what was learnt about an endpoint into its successor after a reload.
    fn inherit(&self, old: &EndpointState) {
        self.status
            .store(old.status.load(Ordering::Relaxed), Ordering::Relaxed);
        self.latency.copy_from(&old.latency);
        self.smoothed.copy_from(&old.smoothed);
        self.requests
            .store(old.requests.load(Ordering::Relaxed), Ordering::Relaxed);
        self.metrics
            .healthy
            .set(i64::from(self.status() == Status::Healthy));
    }
}

/// Marks a request outstanding to an endpoint for as long as it lives.
pub struct InFlight(Arc<EndpointState>);

impl InFlight {
    pub fn new(ep: Arc<EndpointState>) -> InFlight {
        ep.in_flight.fetch_add(1, Ordering::Relaxed);
        ep.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(ep)
    }

    pub fn endpoint(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A token bucket for retries and hedges: every request deposits `ratio` of a token, a
/// floor refills `min_per_second`, and the balance is capped so a quiet hour cannot fund a
/// storm. Milli-tokens in one atomic: no lock.
pub struct Budget {
    milli: AtomicI64,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            milli: AtomicI64::new(10_000),
        }
    }

    pub fn deposit(&self, ratio: f64, cap: i64) {
        let add = (ratio * 1000.0) as i64;
        if add > 0 && self.milli.load(Ordering::Relaxed) < cap * 1000 {
            self.milli.fetch_add(add, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        if self.milli.fetch_sub(1000, Ordering::AcqRel) >= 1000 {
            true
        } else {
            self.milli.fetch_add(1000, Ordering::AcqRel);
            false
        }
    }

    fn refill(&self, milli: i64, cap: i64) {
        let cur = self.milli.load(Ordering::Relaxed);
        if cur < cap * 1000 {
            self.milli
                .fetch_add(milli.min(cap * 1000 - cur), Ordering::Relaxed);
        }
    }
}

/// Bounded ring of notable events for /events and the dashboard.
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
}

#[derive(Clone, serde::Serialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: &'static str,
    pub message: String,
}

impl Events {
    pub const CAPACITY: usize = 256;

    pub fn new() -> Events {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
        }
    }

    pub fn push(&self, kind: &'static str, message: String) {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut r) = self.ring.lock() {
            if r.len() == Self::CAPACITY {
                r.pop_front();
            }
            r.push_back(Event {
                ts_ms,
                kind,
                message,
            });
        }
    }

    pub fn snapshot(&self) -> Vec<Event> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

/// State of a cluster that outlives tables: budgets and the ejection count.
pub struct ClusterShared {
    pub name: Arc<str>,
    pub retry_budget: Budget,
    pub hedge_budget: Budget,
    /// Per-zone time-to-headers statistics for the hedge delay.
    pub zone_stats: crate::hedge::ZoneRegistry,
    ejected: AtomicU32,
    endpoints: AtomicU32,
    changed: Arc<Notify>,
    events: Arc<Events>,
}

impl ClusterShared {
    fn new(name: &str, changed: Arc<Notify>, events: Arc<Events>) -> ClusterShared {
        ClusterShared {
            name: Arc::from(name),
            retry_budget: Budget::new(),
            hedge_budget: Budget::new(),
            zone_stats: Default::default(),
            ejected: AtomicU32::new(0),
            endpoints: AtomicU32::new(0),
            changed,
            events,
        }
    }
}

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

/// The most tokens a budget may hold: ten seconds of the floor, and never less than 100.
pub fn budget_cap(min_per_second: u32) -> i64 {
    (min_per_second as i64 * 10).max(100)
}

async fn probe_loop(
    ep: Arc<EndpointState>,
    hc: HealthCheckConfig,
    decay: Decay,
    client: Client<Connector, Empty<Bytes>>,
    tls: bool,
) {
    // Spread the first probes so a thousand endpoints are not probed in one instant, yet
    // keep start-up quick.
    let first = rand::thread_rng()
        .gen_range(0..=hc.interval.min(Duration::from_millis(100)).as_millis() as u64);
    tokio::time::sleep(Duration::from_millis(first)).await;
    let mut counters = (0u32, 0u32);
    loop {
        let started = Instant::now();
        let result = match &hc.path {
            Some(path) => probe_http(&client, &ep, path, hc.timeout, tls).await,
            None => probe_tcp(ep.addr, hc.timeout).await,
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
                ep.observe(rtt, decay);
                ep.metrics.probe_ok.inc();
                (
                    true,
                    format!("probe ok in {:.1} ms", rtt.as_secs_f64() * 1e3),
                )
            }
            Err(ProbeError::Timeout) => {
                // A probe that times out says the endpoint is at least this slow.
                ep.observe(hc.timeout, decay);
                ep.metrics.probe_fail.inc();
                (false, format!("probe timed out after {:?}", hc.timeout))
            }
            Err(ProbeError::Failed(e)) => {
                ep.metrics.probe_fail.inc();
                (false, e)
            }
        };
        ep.on_probe(ok, &hc, &mut counters, &detail);
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

async fn probe_tcp(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => Err(ProbeError::Timeout),
        Ok(Err(e)) => Err(ProbeError::Failed(format!("tcp connect failed: {e}"))),
        Ok(Ok(_)) => Ok(()),
    }
}

async fn probe_http(
    client: &Client<Connector, Empty<Bytes>>,
    ep: &EndpointState,
    path: &str,
    timeout: Duration,
    tls: bool,
) -> Result<(), ProbeError> {
    let scheme = if tls { "https" } else { "http" };
    let uri = format!("{scheme}://{}{path}", ep.addr);
    let req = http::Request::get(uri)
        .header(
            http::header::USER_AGENT,
            concat!("edge-router/", env!("CARGO_PKG_VERSION"), " health-check"),
        )
        .body(Empty::new())
        .map_err(|e| ProbeError::Failed(format!("bad probe request: {e}")))?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(ProbeError::Timeout),
        Ok(Err(e)) => Err(ProbeError::Failed(format!(
            "probe failed: {}",
            upstream::describe_failure(&e)
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let e = PeakEwma::default();
        assert_eq!(e.get_us(), None);
        let decay = Duration::from_secs(5);
        e.observe(Duration::from_millis(10), decay);
        assert!((e.get_us().unwrap_or(0.0) - 10_000.0).abs() < 1.0);
        e.observe(Duration::from_millis(50), decay);
        assert!(
            (e.get_us().unwrap_or(0.0) - 50_000.0).abs() < 1.0,
            "a peak counts at once"
        );
        // A lower sample right away barely moves it: recovery decays in over time.
        e.observe(Duration::from_millis(10), decay);
        assert!(e.get_us().unwrap_or(0.0) > 45_000.0);
    }

    #[test]
    fn budget_spends_and_refuses() {
        let b = Budget::new();
        let mut granted = 0;
        for _ in 0..100 {
            if b.withdraw() {
                granted += 1;
            }
        }
        assert_eq!(granted, 10, "starts with ten tokens");
        for _ in 0..10 {
            b.deposit(0.2, 100);
        }
        assert!(
            b.withdraw() && b.withdraw(),
            "ten requests at 20% fund two retries"
        );
        assert!(!b.withdraw(), "and no third");
    }
}
