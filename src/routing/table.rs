//! The routing table: an immutable value built off the request path from config and health
//! state, swapped in whole (arc-swap) so a request sees one consistent table.
//!
//! For each cluster the builder
//! 1. ranks zones nearest first by their probe estimates, with noise, locality and a hold
//!    time so zones equal within noise do not flap (see [`crate::routing::rank`]);
//! 2. turns health into traffic shares down the ranking (Envoy's priority spillover with an
//!    overprovisioning factor), then applies the regions' traffic dials;
//! 3. writes the result as `slices`: contiguous ranges of [0, 1) mapped to a zone and the
//!    reason traffic lands there, so the per-request zone pick is one random number and a
//!    short scan, whatever the number of endpoints.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{ClusterConfig, Config, HeaderActions, HostMatch, Redirect, RouteAction};
use crate::routing::rank::{zone_estimate_of, Ranker, ZoneKey};
use crate::state::{ClusterShared, EndpointState, Estimate};
use crate::telemetry::metrics::{ClusterMetrics, ZoneMetrics};

/// Why a request went where it went (the `reason` of x-edge-route and of metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Nearest = 0,
    Failover,
    Spillover,
    Dial,
    Affinity,
    Retry,
    Hedge,
    Panic,
}

impl Reason {
    pub const ALL: [Reason; 8] = [
        Reason::Nearest,
        Reason::Failover,
        Reason::Spillover,
        Reason::Dial,
        Reason::Affinity,
        Reason::Retry,
        Reason::Hedge,
        Reason::Panic,
    ];

    /// Every reason's label, indexed by `reason as usize` (metrics count decisions so).
    pub const LABELS: [&'static str; 8] = [
        "nearest",
        "failover",
        "spillover",
        "dial",
        "affinity",
        "retry",
        "hedge",
        "panic",
    ];

    pub fn as_str(self) -> &'static str {
        Self::LABELS[self as usize]
    }
}

/// What a cluster brings to every table besides its endpoints: long-lived state, handles.
pub struct ClusterRuntime<C> {
    pub shared: Arc<ClusterShared>,
    pub client: C,
    pub metrics: ClusterMetrics,
}

pub struct RoutingTable<C> {
    pub generation: u64,
    pub built_at: Instant,
    pub config: Arc<Config>,
    pub routes: Vec<RouteEntry>,
    pub clusters: Vec<ClusterTable<C>>,
}

pub struct RouteEntry {
    /// Ids ([`crate::config::listener_id`]) of the listeners it belongs to; empty: every
    /// http and https listener.
    pub listeners: Vec<u64>,
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    /// Answered by the router when set; `cluster` is then meaningless.
    pub redirect: Option<Redirect>,
    pub cluster: usize,
    pub timeout: Duration,
    pub hedge: bool,
    /// Replaces `path_prefix` in the path sent upstream ([`crate::routing::rewrite::path`]).
    pub rewrite_prefix: Option<String>,
    pub request_headers: HeaderActions,
    /// Edits of the upstream's response; the router's own replies keep theirs.
    pub response_headers: HeaderActions,
}

pub struct ClusterTable<C> {
    pub name: Arc<str>,
    pub config: ClusterConfig,
    pub runtime: Arc<ClusterRuntime<C>>,
    /// Nearest first.
    pub zones: Vec<ZoneTable>,
    /// Traffic distribution over `zones`; the last `upto` is the total share served.
    pub slices: Vec<Slice>,
    /// No endpoint is healthy anywhere: fail open to the nearest zone's endpoints.
    pub panic: bool,
    pub decay: crate::config::Decay,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Slice {
    pub zone: usize,
    pub upto: f64,
    pub reason: Reason,
}

pub struct ZoneTable {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub rank: usize,
    /// Every endpoint of the zone.
    pub endpoints: Vec<EndpointEntry>,
    /// What the in-zone pick chooses from: the available endpoints with weight > 0 (in
    /// panic, every endpoint with weight > 0).
    pub candidates: Vec<EndpointEntry>,
    /// Prefix sums of candidate weights; empty when all weights are equal (uniform pick).
    pub cum_weights: Vec<u32>,
    pub healthy: usize,
    pub share: f64,
    pub dial: u8,
    /// The zone's probe estimate when the table was built (what ranked it).
    pub estimate: Option<Estimate>,
    pub metrics: Arc<ZoneMetrics>,
    /// Time-to-headers statistics (hedge delay); outlives tables.
    pub stats: Arc<crate::state::zone_stats::ZoneStats>,
}

#[derive(Clone)]
pub struct EndpointEntry {
    pub state: Arc<EndpointState>,
    pub weight: u32,
}

impl<C> RoutingTable<C> {
    /// The cluster of this name, when the table has it.
    pub fn cluster(&self, name: &str) -> Option<&ClusterTable<C>> {
        self.clusters.iter().find(|c| &*c.name == name)
    }

    /// First route of `listener` (its [`crate::config::listener_id`]), in file order, whose
    /// host and path prefix match. A route with `redirect` set is answered by the caller.
    pub fn match_route(
        &self,
        listener: u64,
        host: Option<&str>,
        path: &str,
    ) -> Option<&RouteEntry> {
        self.routes.iter().find(|r| {
            if !r.listeners.is_empty() && !r.listeners.contains(&listener) {
                return false;
            }
            let host_ok = match (&r.host, host) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(HostMatch::Exact(h)), Some(req)) => h.eq_ignore_ascii_case(req),
                // Bytes, not str: a suffix boundary may fall inside a multi-byte character.
                (Some(HostMatch::Suffix(s)), Some(req)) => {
                    let (req, s) = (req.as_bytes(), s.as_bytes());
                    req.len() > s.len() && req[req.len() - s.len()..].eq_ignore_ascii_case(s)
                }
            };
            host_ok && path.starts_with(r.path_prefix.as_str())
        })
    }
}

/// Input for one cluster.
pub struct ClusterInput<C> {
    pub config: ClusterConfig,
    pub runtime: Arc<ClusterRuntime<C>>,
    pub endpoints: Vec<EndpointEntry>,
}

/// Builds tables; remembers the last ranking of each cluster for hysteresis.
#[derive(Default)]
pub struct TableBuilder {
    ranker: Ranker,
    /// Metric handles by (cluster, zone): resolving labels is most of a small rebuild's cost.
    zone_metrics: HashMap<(String, ZoneKey), Arc<ZoneMetrics>>,
}

impl TableBuilder {
    pub fn new() -> TableBuilder {
        TableBuilder::default()
    }

    pub fn build<C: Clone>(
        &mut self,
        generation: u64,
        config: Arc<Config>,
        inputs: Vec<ClusterInput<C>>,
        zone_metrics: &dyn Fn(&str, &str, &str) -> ZoneMetrics,
        now: Instant,
    ) -> RoutingTable<C> {
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let target = r.cluster().unwrap_or_default();
                RouteEntry {
                    listeners: r
                        .listeners
                        .iter()
                        .map(|n| crate::config::listener_id(n))
                        .collect(),
                    host: r.host.clone(),
                    path_prefix: r.path_prefix.clone(),
                    redirect: match &r.action {
                        RouteAction::Redirect(rd) => Some(rd.clone()),
                        RouteAction::Cluster(_) => None,
                    },
                    cluster: inputs
                        .iter()
                        .position(|c| c.config.name == target)
                        .unwrap_or(0),
                    timeout: r.timeout,
                    hedge: r.hedge.unwrap_or_else(|| {
                        inputs
                            .iter()
                            .any(|c| c.config.name == target && c.config.hedge.enabled)
                    }),
                    rewrite_prefix: r.rewrite_prefix.clone(),
                    request_headers: r.request_headers.clone(),
                    response_headers: r.response_headers.clone(),
                }
            })
            .collect();
        let clusters = inputs
            .into_iter()
            .map(|input| self.build_cluster(&config, input, zone_metrics, now))
            .collect();
        self.ranker
            .retain(&|name| config.clusters.iter().any(|c| c.name == name));
        RoutingTable {
            generation,
            built_at: now,
            config,
            routes,
            clusters,
        }
    }

    fn build_cluster<C>(
        &mut self,
        config: &Config,
        input: ClusterInput<C>,
        zone_metrics: &dyn Fn(&str, &str, &str) -> ZoneMetrics,
        now: Instant,
    ) -> ClusterTable<C> {
        let ClusterInput {
            config: cc,
            runtime,
            endpoints,
        } = input;
        // Group endpoints by zone, keeping the first-seen order of zones. Zones are few and
        // an endpoint's region/zone names are shared `Arc`s, so a scan that compares
        // pointers first (then text) beats hashing two strings per endpoint.
        let mut keys: Vec<ZoneKey> = Vec::new();
        let mut grouped: Vec<Vec<EndpointEntry>> = Vec::new();
        let mut last = 0usize;
        for e in endpoints {
            let same = |k: &ZoneKey| {
                (Arc::ptr_eq(&k.0, &e.state.region) || k.0 == e.state.region)
                    && (Arc::ptr_eq(&k.1, &e.state.zone) || k.1 == e.state.zone)
            };
            let i = if keys.get(last).is_some_and(same) {
                last
            } else if let Some(i) = keys.iter().position(same) {
                i
            } else {
                keys.push((e.state.region.clone(), e.state.zone.clone()));
                grouped.push(Vec::new());
                keys.len() - 1
            };
            last = i;
            grouped[i].push(e);
        }
        let estimates: HashMap<ZoneKey, Option<Estimate>> = keys
            .iter()
            .zip(&grouped)
            .map(|(k, g)| (k.clone(), zone_estimate_of(g.iter(), &config.routing)))
            .collect();
        let mut groups: HashMap<ZoneKey, Vec<EndpointEntry>> =
            keys.iter().cloned().zip(grouped).collect();

        let (order, dead_ahead) = self.ranker.rank(
            &cc.name,
            &keys,
            &estimates,
            &|k| {
                groups
                    .get(k)
                    .is_some_and(|g| g.iter().any(|e| e.weight > 0 && e.state.is_available()))
            },
            &config.locality,
            &config.routing,
            now,
        );

        runtime.shared.zone_stats.retain(&order);
        let mut zones: Vec<ZoneTable> = order
            .iter()
            .enumerate()
            .map(|(rank, key)| {
                let endpoints = groups.remove(key).unwrap_or_default();
                let candidates: Vec<EndpointEntry> = endpoints
                    .iter()
                    .filter(|e| e.weight > 0 && e.state.is_available())
                    .cloned()
                    .collect();
                let dial = cc.traffic_dial.get(&*key.0).copied().unwrap_or(100);
                ZoneTable {
                    region: key.0.clone(),
                    zone: key.1.clone(),
                    rank,
                    healthy: endpoints.iter().filter(|e| e.state.is_available()).count(),
                    cum_weights: Vec::new(),
                    candidates,
                    endpoints,
                    share: 0.0,
                    dial,
                    estimate: estimates.get(key).copied().flatten(),
                    metrics: self
                        .zone_metrics
                        .entry((cc.name.clone(), key.clone()))
                        .or_insert_with(|| Arc::new(zone_metrics(&cc.name, &key.0, &key.1)))
                        .clone(),
                    stats: runtime.shared.zone_stats.get(&key.0, &key.1),
                }
            })
            .collect();

        let health: Vec<f64> = zones
            .iter()
            .map(|z| {
                let total = z.endpoints.iter().filter(|e| e.weight > 0).count();
                if total == 0 {
                    0.0
                } else {
                    (z.candidates.len() as f64 / total as f64 * cc.overprovisioning_factor).min(1.0)
                }
            })
            .collect();
        let panic = health.iter().all(|h| *h == 0.0);
        let slices = if panic {
            // Fail open: nothing is known healthy, so try the nearest zone's endpoints and
            // let retries move on to the next zone.
            for z in zones.iter_mut() {
                z.candidates = z
                    .endpoints
                    .iter()
                    .filter(|e| e.weight > 0)
                    .cloned()
                    .collect();
            }
            match zones.iter().position(|z| !z.candidates.is_empty()) {
                Some(i) => vec![Slice {
                    zone: i,
                    upto: 1.0,
                    reason: Reason::Panic,
                }],
                None => Vec::new(),
            }
        } else {
            distribute(&zones, &health, &cc, dead_ahead)
        };
        for s in slices.iter().enumerate() {
            let (i, slice) = s;
            let from = if i == 0 { 0.0 } else { slices[i - 1].upto };
            zones[slice.zone].share += slice.upto - from;
        }
        for z in zones.iter_mut() {
            let first = z.candidates.first().map(|e| e.weight);
            if z.candidates.iter().any(|e| Some(e.weight) != first) {
                let mut acc = 0u32;
                z.cum_weights = z
                    .candidates
                    .iter()
                    .map(|e| {
                        acc += e.weight;
                        acc
                    })
                    .collect();
            }
        }
        ClusterTable {
            name: Arc::from(cc.name.as_str()),
            decay: config.routing.decay(),
            config: cc,
            runtime,
            zones,
            slices,
            panic,
        }
    }
}

/// One part of the traffic flowing down the ranking: how much, why it moved last, and the
/// regions (bit per region index) that dialled it away and must not take it back.
#[derive(Clone, Copy, Debug)]
struct Portion {
    amount: f64,
    reason: Reason,
    skip: u64,
}

const EPS: f64 = 1e-9;

/// Traffic shares down the ranking: health spillover (Envoy's priority load) and regions'
/// traffic dials in one pass.
///
/// All traffic arrives at the nearest zone. Each zone in rank order takes what arrives, up
/// to its health capacity `min(1, healthy share x factor)` (scaled up when the whole cluster
/// is short of health, so the healthy zones still carry everything); the rest flows on as
/// spillover (or failover, past a zone with nothing healthy). A zone in a region dialled to
/// `d`% keeps `d`% of what it takes; the rest flows on as `dial` and no zone of that region
/// takes it back, so the region as a whole keeps `d`% of what it would otherwise get.
/// Traffic no zone could take (every other region down or dialled) falls back to the
/// dialled zones with room, as `failover`, when `dial_fallback` is on; otherwise it is left
/// unassigned and refused.
///
/// `dead_ahead`: a zone with nothing healthy is nearer by latency than every healthy one (it
/// is listed last, but the traffic that reaches the first healthy zone is its failover).
fn distribute(
    zones: &[ZoneTable],
    health: &[f64],
    cc: &ClusterConfig,
    dead_ahead: bool,
) -> Vec<Slice> {
    let total: f64 = health.iter().sum::<f64>().min(1.0);
    // One bit per region (regions past the 64th share "no bit": they cannot be skipped).
    let mut regions: Vec<&str> = Vec::new();
    let bits: Vec<u64> = zones
        .iter()
        .map(|z| {
            let i = regions
                .iter()
                .position(|r| *r == &*z.region)
                .unwrap_or_else(|| {
                    regions.push(&z.region);
                    regions.len() - 1
                });
            if i < 64 {
                1u64 << i
            } else {
                0
            }
        })
        .collect();
    let mut flow = vec![Portion {
        amount: 1.0,
        reason: if dead_ahead {
            Reason::Failover
        } else {
            Reason::Nearest
        },
        skip: 0,
    }];
    let mut parts: Vec<(usize, f64, Reason)> = Vec::new();
    let mut room = vec![0.0f64; zones.len()];
    for (i, z) in zones.iter().enumerate() {
        let bit = bits[i];
        let (eligible, mut next): (Vec<Portion>, Vec<Portion>) =
            flow.iter().partition(|p| p.skip & bit == 0);
        let arriving: f64 = eligible.iter().map(|p| p.amount).sum();
        if health[i] <= 0.0 {
            // Nothing healthy here: everything passes; the nearest zone's traffic fails over.
            next.extend(eligible.into_iter().map(|p| Portion {
                reason: if p.reason == Reason::Nearest {
                    Reason::Failover
                } else {
                    p.reason
                },
                ..p
            }));
            flow = merge(next);
            continue;
        }
        let cap = (health[i] / total).min(1.0);
        let take_frac = if arriving > cap { cap / arriving } else { 1.0 };
        let keep_frac = z.dial as f64 / 100.0;
        let mut kept = 0.0;
        for p in eligible {
            let take = p.amount * take_frac;
            let keep = take * keep_frac;
            if keep > EPS {
                parts.push((i, keep, p.reason));
                kept += keep;
            }
            if take - keep > EPS {
                next.push(Portion {
                    amount: take - keep,
                    reason: Reason::Dial,
                    skip: p.skip | bit,
                });
            }
            if p.amount - take > EPS {
                next.push(Portion {
                    amount: p.amount - take,
                    reason: Reason::Spillover,
                    skip: p.skip,
                });
            }
        }
        room[i] = cap - kept;
        flow = merge(next);
    }
    // What nobody took: only dialled regions have room left. They still serve rather than
    // refuse, unless told not to.
    if cc.dial_fallback {
        let mut left: f64 = flow.iter().map(|p| p.amount).sum();
        for (i, r) in room.iter_mut().enumerate() {
            if left <= EPS {
                break;
            }
            let take = left.min(*r);
            if take > EPS && health[i] > 0.0 {
                parts.push((i, take, Reason::Failover));
                *r -= take;
                left -= take;
            }
        }
    }
    // Contiguous slices in rank order, merging equal (zone, reason) neighbours.
    parts.sort_by_key(|p| (p.0, p.2 as u8));
    let mut slices: Vec<Slice> = Vec::new();
    let mut acc = 0.0;
    for (zone, amount, reason) in parts {
        acc += amount;
        match slices.last_mut() {
            Some(s) if s.zone == zone && s.reason == reason => s.upto = acc,
            _ => slices.push(Slice {
                zone,
                upto: acc,
                reason,
            }),
        }
    }
    // Float dust: a fully served cluster ends at exactly 1.
    if let Some(last) = slices.last_mut() {
        if (last.upto - 1.0).abs() < 1e-6 {
            last.upto = 1.0;
        }
    }
    slices
}

/// Merges portions with the same reason and skip set (keeps the flow a handful long).
fn merge(mut v: Vec<Portion>) -> Vec<Portion> {
    let mut out: Vec<Portion> = Vec::with_capacity(v.len());
    for p in v.drain(..) {
        match out
            .iter_mut()
            .find(|q| q.reason == p.reason && q.skip == p.skip)
        {
            Some(q) => q.amount += p.amount,
            None => out.push(p),
        }
    }
    out
}

#[cfg(test)]
#[path = "table_tests.rs"]
mod tests;
