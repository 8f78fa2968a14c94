//! A few minutes of each zone's story: once a second a task off the request path reads the
//! live table and the counters the request path already keeps (atomics; the request path
//! takes no lock for this) and appends one sample to a small ring. Rates are computed here,
//! from the router's own clock, so every reader (the dashboard, `edge-router status`, a
//! script) sees the same numbers whatever its own clock does.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus::core::Collector;
use serde::Serialize;
use tokio::sync::watch;

use crate::control::{Control, Table};
use crate::routing::rank::zone_estimate_of;
use crate::telemetry::Metrics;

/// One sample a second...
pub const INTERVAL: Duration = Duration::from_secs(1);
/// ...for five minutes.
pub const CAPACITY: usize = 300;

/// The ring of samples and what the next sample needs to turn counters into rates.
pub struct History {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    samples: VecDeque<Sample>,
    prev: Option<Counters>,
    /// Requests per second of each endpoint over the last interval: (cluster, address).
    endpoint_rps: HashMap<(Arc<str>, Arc<str>), f64>,
}

struct Sample {
    t_ms: u64,
    clusters: Vec<ClusterSample>,
}

struct ClusterSample {
    name: Arc<str>,
    rps: Option<f32>,
    retries_per_s: Option<f32>,
    zones: Vec<ZoneSample>,
}

struct ZoneSample {
    region: Arc<str>,
    zone: Arc<str>,
    latency_ms: Option<f32>,
    share: f32,
    served_share: Option<f32>,
    rps: Option<f32>,
    errors_per_s: Option<f32>,
    ejections_per_s: Option<f32>,
    healthy: u32,
}

type ZoneKey = (Arc<str>, Arc<str>, Arc<str>);

/// Counter values at one instant.
struct Counters {
    at: Instant,
    endpoints: HashMap<(Arc<str>, Arc<str>), u64>,
    zone_requests: HashMap<ZoneKey, u64>,
    zone_errors: HashMap<ZoneKey, u64>,
    zone_ejections: HashMap<ZoneKey, u64>,
    retries: HashMap<Arc<str>, u64>,
}

fn rate<K: std::hash::Hash + Eq>(
    prev: Option<&HashMap<K, u64>>,
    key: &K,
    now: u64,
    dt: f64,
) -> Option<f64> {
    let before = *prev?.get(key)?;
    // A counter that went down belongs to a set that changed (an endpoint left): no rate.
    (now >= before && dt > 0.0).then(|| (now - before) as f64 / dt)
}

fn round(v: f64, step: f64) -> f32 {
    ((v / step).round() * step) as f32
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// 5xx answers per (cluster, region, zone) from `edge_router_requests_total`. Reading the
/// family takes its label map's read lock; the request path holds resolved handles and
/// never takes it.
fn zone_errors(metrics: &Metrics) -> HashMap<ZoneKey, u64> {
    let mut out: HashMap<ZoneKey, u64> = HashMap::new();
    for family in metrics.requests.collect() {
        for m in family.get_metric() {
            let mut key: [&str; 4] = [""; 4];
            for l in m.get_label() {
                match l.name() {
                    "cluster" => key[0] = l.value(),
                    "region" => key[1] = l.value(),
                    "zone" => key[2] = l.value(),
                    "code" => key[3] = l.value(),
                    _ => {}
                }
            }
            if !key[3].starts_with('5') {
                continue;
            }
            let v = m.get_counter().value().max(0.0) as u64;
            *out.entry((key[0].into(), key[1].into(), key[2].into()))
                .or_default() += v;
        }
    }
    out
}

impl History {
    pub fn new() -> History {
        History {
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Takes one sample of `table` at `t_ms` (unix time) and `at` (for rates).
    pub fn sample(&self, table: &Table, metrics: &Metrics, t_ms: u64, at: Instant) {
        let mut now = Counters {
            at,
            endpoints: HashMap::new(),
            zone_requests: HashMap::new(),
            zone_errors: zone_errors(metrics),
            zone_ejections: HashMap::new(),
            retries: HashMap::new(),
        };
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let prev = inner.prev.take();
        let dt = prev
            .as_ref()
            .map_or(0.0, |p| at.duration_since(p.at).as_secs_f64());
        let mut endpoint_rps = HashMap::new();
        let mut clusters = Vec::with_capacity(table.clusters.len());
        for c in &table.clusters {
            let retries = c.runtime.metrics.retries.get();
            let retries_per_s = rate(prev.as_ref().map(|p| &p.retries), &c.name, retries, dt);
            now.retries.insert(c.name.clone(), retries);
            let mut zones = Vec::with_capacity(c.zones.len());
            let mut cluster_rps: Option<f64> = None;
            for z in &c.zones {
                let key: ZoneKey = (c.name.clone(), z.region.clone(), z.zone.clone());
                let (mut requests, mut ejections) = (0u64, 0u64);
                for e in &z.endpoints {
                    let n = e.state.requests.load(Ordering::Relaxed);
                    requests += n;
                    ejections += e.state.metrics.ejections.get();
                    let ek = (c.name.clone(), e.state.label.clone());
                    if let Some(r) = rate(prev.as_ref().map(|p| &p.endpoints), &ek, n, dt) {
                        endpoint_rps.insert(ek.clone(), r);
                    }
                    now.endpoints.insert(ek, n);
                }
                let errors = now.zone_errors.get(&key).copied().unwrap_or(0);
                let p = prev.as_ref();
                let rps = rate(p.map(|p| &p.zone_requests), &key, requests, dt);
                let errors_per_s = rate(p.map(|p| &p.zone_errors), &key, errors, dt)
                    // A zone with no 5xx yet has no series: it had none before either.
                    .or_else(|| p.is_some().then_some(0.0));
                let ejections_per_s = rate(p.map(|p| &p.zone_ejections), &key, ejections, dt);
                if let Some(r) = rps {
                    *cluster_rps.get_or_insert(0.0) += r;
                }
                now.zone_requests.insert(key.clone(), requests);
                now.zone_ejections.insert(key, ejections);
                zones.push(ZoneSample {
                    region: z.region.clone(),
                    zone: z.zone.clone(),
                    latency_ms: zone_estimate_of(z.endpoints.iter(), &table.config.routing)
                        .map(|e| round(e.ms, 0.01)),
                    share: round(z.share, 0.001),
                    served_share: None,
                    rps: rps.map(|v| round(v, 0.01)),
                    errors_per_s: errors_per_s.map(|v| round(v, 0.01)),
                    ejections_per_s: ejections_per_s.map(|v| round(v, 0.01)),
                    healthy: z
                        .endpoints
                        .iter()
                        .filter(|e| e.state.is_available())
                        .count() as u32,
                });
            }
            if let Some(total) = cluster_rps.filter(|t| *t > 0.0) {
                for z in &mut zones {
                    z.served_share = z.rps.map(|r| round(f64::from(r) / total, 0.001));
                }
            }
            clusters.push(ClusterSample {
                name: c.name.clone(),
                rps: cluster_rps.map(|v| round(v, 0.01)),
                retries_per_s: retries_per_s.map(|v| round(v, 0.01)),
                zones,
            });
        }
        if inner.samples.len() == CAPACITY {
            inner.samples.pop_front();
        }
        inner.samples.push_back(Sample { t_ms, clusters });
        inner.endpoint_rps = endpoint_rps;
        inner.prev = Some(now);
    }

    /// Every endpoint's rate at once, for a whole /routes answer: (cluster, address) -> req/s.
    pub fn endpoint_rates(&self) -> HashMap<(Arc<str>, Arc<str>), f64> {
        self.inner
            .lock()
            .map(|i| i.endpoint_rps.clone())
            .unwrap_or_default()
    }

    /// The samples taken after `since_ms` (unix ms), one column per series.
    pub fn json(&self, since_ms: u64) -> HistoryJson {
        let mut out = HistoryJson {
            interval_ms: INTERVAL.as_millis() as u64,
            capacity: CAPACITY,
            t_ms: Vec::new(),
            clusters: Vec::new(),
        };
        let Ok(inner) = self.inner.lock() else {
            return out;
        };
        let samples: Vec<&Sample> = inner.samples.iter().filter(|s| s.t_ms > since_ms).collect();
        let n = samples.len();
        // Clusters and zones in the order of the newest sample (zones nearest first), then
        // those seen only earlier.
        let mut cluster_at: HashMap<Arc<str>, usize> = HashMap::new();
        let mut zone_at: HashMap<ZoneKey, (usize, usize)> = HashMap::new();
        for s in samples.iter().rev() {
            for c in &s.clusters {
                let ci = *cluster_at.entry(c.name.clone()).or_insert_with(|| {
                    out.clusters.push(ClusterSeries::new(&c.name, n));
                    out.clusters.len() - 1
                });
                for z in &c.zones {
                    let key = (c.name.clone(), z.region.clone(), z.zone.clone());
                    zone_at.entry(key).or_insert_with(|| {
                        let zones = &mut out.clusters[ci].zones;
                        zones.push(ZoneSeries::new(&z.region, &z.zone, n));
                        (ci, zones.len() - 1)
                    });
                }
            }
        }
        for (i, s) in samples.iter().enumerate() {
            out.t_ms.push(s.t_ms);
            for c in &s.clusters {
                let Some(&ci) = cluster_at.get(&c.name) else {
                    continue;
                };
                let cs = &mut out.clusters[ci];
                cs.rps[i] = c.rps;
                cs.retries_per_s[i] = c.retries_per_s;
                for z in &c.zones {
                    let key = (c.name.clone(), z.region.clone(), z.zone.clone());
                    let Some(&(_, zi)) = zone_at.get(&key) else {
                        continue;
                    };
                    let zs = &mut out.clusters[ci].zones[zi];
                    zs.latency_ms[i] = z.latency_ms;
                    zs.share[i] = Some(z.share);
                    zs.served_share[i] = z.served_share;
                    zs.rps[i] = z.rps;
                    zs.errors_per_s[i] = z.errors_per_s;
                    zs.ejections_per_s[i] = z.ejections_per_s;
                    zs.healthy[i] = Some(z.healthy);
                }
            }
        }
        out
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

/// `GET /history`: `t_ms[i]` is when sample i was taken; every series has one value per
/// sample, null where it had none (a zone not yet in the table, the first sample's rates).
#[derive(Serialize)]
pub struct HistoryJson {
    pub interval_ms: u64,
    pub capacity: usize,
    pub t_ms: Vec<u64>,
    pub clusters: Vec<ClusterSeries>,
}

#[derive(Serialize)]
pub struct ClusterSeries {
    pub name: String,
    pub rps: Vec<Option<f32>>,
    pub retries_per_s: Vec<Option<f32>>,
    pub zones: Vec<ZoneSeries>,
}

impl ClusterSeries {
    fn new(name: &str, n: usize) -> ClusterSeries {
        ClusterSeries {
            name: name.to_string(),
            rps: vec![None; n],
            retries_per_s: vec![None; n],
            zones: Vec::new(),
        }
    }
}

#[derive(Serialize)]
pub struct ZoneSeries {
    pub region: String,
    pub zone: String,
    /// The zone's latency as ranked (mean of its healthy endpoints' smoothed averages).
    pub latency_ms: Vec<Option<f32>>,
    /// The share the routing table gave the zone.
    pub share: Vec<Option<f32>>,
    /// The share of the cluster's requests the zone really took over the interval.
    pub served_share: Vec<Option<f32>>,
    pub rps: Vec<Option<f32>>,
    /// 5xx answers per second counted for the zone (the router's own 502/503/504 included).
    pub errors_per_s: Vec<Option<f32>>,
    pub ejections_per_s: Vec<Option<f32>>,
    pub healthy: Vec<Option<u32>>,
}

impl ZoneSeries {
    fn new(region: &str, zone: &str, n: usize) -> ZoneSeries {
        ZoneSeries {
            region: region.to_string(),
            zone: zone.to_string(),
            latency_ms: vec![None; n],
            share: vec![None; n],
            served_share: vec![None; n],
            rps: vec![None; n],
            errors_per_s: vec![None; n],
            ejections_per_s: vec![None; n],
            healthy: vec![None; n],
        }
    }
}

/// Samples every [`INTERVAL`] until the router shuts down.
pub async fn run(
    history: Arc<History>,
    control: Arc<Control>,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
        history.sample(&control.table(), &metrics, unix_ms(), Instant::now());
    }
}
