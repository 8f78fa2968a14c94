//! What one endpoint is now (health, ejection, latency, load) and what its cluster keeps
//! across tables (budgets, ejection count). Everything the request path reads or writes here
//! is an atomic; probers and real requests write it, the table builder reads it and wakes up
//! on the cluster's `changed` notification whenever something flips.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use crate::clock::now_ms;
use crate::config::{Decay, HealthCheckConfig, OutlierConfig};
use crate::state::budget::Budget;
use crate::state::estimate::ProbeWindow;
use crate::state::ewma::{Ewma, PeakEwma};
use crate::telemetry::events::{Events, Severity};
use crate::telemetry::metrics::{EndpointMetrics, Metrics};

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
    /// `addr` as a URI authority, parsed once: the hyper engine's upstream requests share it.
    pub authority: Option<http::uri::Authority>,
    pub region: Arc<str>,
    pub zone: Arc<str>,
    status: AtomicU8,
    /// Real requests only, peak-sensitive: the in-zone pick's latency.
    pub latency: PeakEwma,
    /// Real requests only, symmetric: confirms the peak before the in-zone pick acts on it.
    pub smoothed: Ewma,
    /// Real requests only: the smoothed square (us^2), for the spread of single answers.
    pub smoothed_sq: Ewma,
    /// Probes only, symmetric: the reported latency, and the in-zone pick's comparison when
    /// an endpoint has no recent request to compare.
    pub probe_latency: Ewma,
    /// Probes only: the last round trips, which rank zones with their noise.
    pub probes: ProbeWindow,
    pub in_flight: AtomicU32,
    pub requests: AtomicU64,
    passive_failures: AtomicU32,
    /// `now_ms()` until which the endpoint is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Good probes since the ejection began; enough of them end it early.
    probes_since_ejection: AtomicU32,
    ejections: AtomicU32,
    pub metrics: EndpointMetrics,
    pub(crate) shared: Arc<ClusterShared>,
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
            authority: http::uri::Authority::from_maybe_shared(bytes::Bytes::from(label.clone()))
                .ok(),
            region: Arc::from(region),
            zone: Arc::from(zone),
            status: AtomicU8::new(Status::Unknown as u8),
            latency: PeakEwma::default(),
            smoothed: Ewma::default(),
            smoothed_sq: Ewma::default(),
            probe_latency: Ewma::default(),
            probes: ProbeWindow::default(),
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

    /// The probes' smoothed round trip (/routes, metrics): measured alike for every
    /// endpoint, busy or idle.
    pub fn latency_ms(&self) -> Option<f64> {
        self.probe_latency.get_us().map(|us| us / 1000.0)
    }

    /// Real requests' peak-sensitive time to headers.
    pub fn peak_latency_ms(&self) -> Option<f64> {
        self.latency.get_us().map(|us| us / 1000.0)
    }

    /// Real requests' smoothed time to headers.
    pub fn request_latency_ms(&self) -> Option<f64> {
        self.smoothed.get_us().map(|us| us / 1000.0)
    }

    /// One real request's time to headers. Probes go to [`Self::observe_probe`]: a probe
    /// and a request differ (connection reuse, path, the backend's load), so the two are
    /// kept apart and only compared with their own kind.
    pub fn observe(&self, sample: Duration, decay: Decay) {
        self.latency.observe(sample, decay.peak);
        self.smoothed.observe(sample, decay.smooth);
        let us = sample.as_secs_f64() * 1e6;
        self.smoothed_sq.observe_value(us * us, decay.smooth);
    }

    /// Variance of single request latencies (us^2) from the smoothed averages.
    pub fn request_variance_us2(&self) -> Option<f64> {
        let m = self.smoothed.get_us()?;
        let sq = self.smoothed_sq.get_us()?;
        Some((sq - m * m).max(0.0))
    }

    /// One probe round trip (or a probe's timeout, a lower bound).
    pub fn observe_probe(&self, sample: Duration, decay: Decay) {
        self.probe_latency.observe(sample, decay.smooth);
        self.probes.push(sample.as_secs_f64() * 1e3);
    }

    /// Forgets the request averages when no request has fed them for `max_age`: an
    /// endpoint that stopped getting traffic is then compared on probes, like its peers,
    /// instead of on a frozen sample from before it lost its share.
    pub fn forget_stale_requests(&self, max_age: Duration) {
        let max = max_age.as_millis() as u64;
        if self.latency.age_ms().is_some_and(|a| a > max) {
            self.latency.reset();
            self.smoothed.reset();
            self.smoothed_sq.reset();
        }
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
        shared.events.push_with("ejection", Severity::Error, msg);
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
            self.shared.events.push_with("ejection", Severity::Ok, msg);
        }
    }

    /// Feeds a probe result into the state machine; returns true when the status flipped.
    pub(crate) fn on_probe(
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
        let severity = match new {
            Status::Healthy => Severity::Ok,
            Status::Unhealthy => Severity::Error,
            Status::Unknown => Severity::Info,
        };
        // Losing an endpoint, or getting it back, is what an operator filtering at WARN still
        // wants to see; the first verdict on a new endpoint is not.
        if old == Status::Unknown {
            info!(target: "health", cluster = %self.cluster, endpoint = %self.label, "{msg}");
        } else {
            warn!(target: "health", cluster = %self.cluster, endpoint = %self.label, "{msg}");
        }
        self.shared.events.push_with("health", severity, msg);
        self.shared.changed.notify_one();
        true
    }

    /// Copies what was learnt about an endpoint into its successor after a reload.
    pub(crate) fn inherit(&self, old: &EndpointState) {
        self.status
            .store(old.status.load(Ordering::Relaxed), Ordering::Relaxed);
        self.latency.copy_from(&old.latency);
        self.smoothed.copy_from(&old.smoothed);
        self.smoothed_sq.copy_from(&old.smoothed_sq);
        self.probe_latency.copy_from(&old.probe_latency);
        self.probes.copy_from(&old.probes);
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

/// State of a cluster that outlives tables: budgets and the ejection count.
pub struct ClusterShared {
    pub name: Arc<str>,
    pub retry_budget: Budget,
    pub hedge_budget: Budget,
    /// Per-zone time-to-headers statistics for the hedge delay.
    pub zone_stats: crate::state::zone_stats::ZoneRegistry,
    pub(crate) ejected: AtomicU32,
    pub(crate) endpoints: AtomicU32,
    changed: Arc<Notify>,
    events: Arc<Events>,
}

impl ClusterShared {
    pub(crate) fn new(name: &str, changed: Arc<Notify>, events: Arc<Events>) -> ClusterShared {
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
