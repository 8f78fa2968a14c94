//! Prometheus metric families.
//!
//! Label values come only from config (cluster, region, zone, endpoint) and from a bounded set
//! of our own words (status code, reason, result): nothing a client sends becomes a label.
//! The request path never looks a label up: the table builder resolves per-zone and
//! per-endpoint handles once and carries them in the table (see [`ZoneMetrics`]).

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry,
};

use prometheus::{Gauge, GaugeVec};
use std::sync::{Arc, OnceLock};

/// From 0.25 ms to ~33 s: the span of a proxied request, loopback to slow upstream.
pub fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.00025, 2.0, 18).unwrap_or_else(|_| vec![0.001, 0.01, 0.1, 1.0, 10.0])
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_healthy: IntGaugeVec,
    pub upstream_latency: GaugeVec,
    pub upstream_in_flight: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub probe_duration: HistogramVec,
    pub retries: IntCounterVec,
    pub retry_budget_exhausted: IntCounterVec,
    pub hedges: IntCounterVec,
    pub ejections: IntCounterVec,
    pub connect_errors: IntCounterVec,
    pub decisions: IntCounterVec,
    pub errors: IntCounterVec,
    pub request_bytes: IntCounterVec,
    pub response_bytes: IntCounterVec,
    pub zone_share: GaugeVec,
    pub table_generation: IntGauge,
    pub table_swaps: IntCounter,
    pub table_age: Gauge,
    pub config_reloads: IntCounterVec,
    pub upgrades: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub connections_active: IntGauge,
    pub connections_accepted: IntCounter,
    pub dns_resolutions: IntCounterVec,
    /// `edge_router_errors_total{cluster="",kind="no_route"}`, resolved once.
    pub no_route: IntCounter,
    /// `edge_router_errors_total{cluster="",kind="too_many_connections"}`, resolved once.
    pub too_many_connections: IntCounter,
    /// Listener and layer-4 families.
    pub l4: super::l4::L4Metrics,
}

/// Registering a family can fail only on a duplicate or invalid name: a programming error
/// caught by every test run, so a panic at start-up is the honest answer.
macro_rules! reg {
    ($r:expr, $m:expr) => {{
        let m = $m.expect("metric definition");
        $r.register(Box::new(m.clone()))
            .expect("metric registration");
        m
    }};
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let ep = &["cluster", "region", "zone", "endpoint"];
        let buckets = latency_buckets();
        let errors = reg!(
            r,
            IntCounterVec::new(
                Opts::new(
                    "edge_router_errors_total",
                    "Error responses made by the router itself, by x-edge-error kind."
                ),
                &["cluster", "kind"]
            )
        );
        let m = Metrics {
            no_route: errors.with_label_values(&["", "no_route"]),
            too_many_connections: errors.with_label_values(&["", "too_many_connections"]),
            errors,
            requests: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_requests_total", "Requests answered, by the zone that served them and status code."),
                    &["cluster", "region", "zone", "code"]
                )
            ),
            request_duration: reg!(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edge_router_request_duration_seconds",
                        "Time from request received to response headers sent, by serving zone."
                    )
                    .buckets(buckets.clone()),
                    &["cluster", "region", "zone"]
                )
            ),
            upstream_healthy: reg!(
                r,
                IntGaugeVec::new(Opts::new("edge_router_upstream_healthy", "1 when the endpoint is in the routing table as healthy."), ep)
            ),
            upstream_latency: reg!(
                r,
                GaugeVec::new(
                    Opts::new("edge_router_upstream_latency_seconds", "The endpoint's smoothed latency average (probes and requests), the one zones are ranked by."),
                    ep
                )
            ),
            upstream_in_flight: reg!(
                r,
                IntGaugeVec::new(
                    Opts::new("edge_router_upstream_in_flight", "Requests outstanding to the endpoint."),
                    &["cluster", "endpoint"]
                )
            ),
            health_checks: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_health_checks_total", "Active health probes by result."),
                    &["cluster", "endpoint", "result"]
                )
            ),
            probe_duration: reg!(
                r,
                HistogramVec::new(
                    HistogramOpts::new("edge_router_probe_duration_seconds", "Round trip of active health probes.").buckets(buckets.clone()),
                    &["cluster", "endpoint"]
                )
            ),
            retries: reg!(
                r,
                IntCounterVec::new(Opts::new("edge_router_retries_total", "Requests retried on another endpoint."), &["cluster"])
            ),
            retry_budget_exhausted: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_retry_budget_exhausted_total", "Retries not sent because the retry budget was spent."),
                    &["cluster"]
                )
            ),
            hedges: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_hedges_total", "Hedged (backup) requests: sent, won, or refused by the budget."),
                    &["cluster", "result"]
                )
            ),
            ejections: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_ejections_total", "Endpoints ejected by passive outlier detection."),
                    &["cluster", "endpoint"]
                )
            ),
            connect_errors: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_upstream_connect_errors_total", "Failed connection attempts to upstream endpoints."),
                    &["cluster", "endpoint"]
                )
            ),
            decisions: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_route_decisions_total", "Why requests went where they went."),
                    &["cluster", "reason"]
                )
            ),
            request_bytes: reg!(
                r,
                IntCounterVec::new(Opts::new("edge_router_request_bytes_total", "Request body bytes sent upstream."), &["cluster"])
            ),
            response_bytes: reg!(
                r,
                IntCounterVec::new(Opts::new("edge_router_response_bytes_total", "Response body bytes sent to clients."), &["cluster"])
            ),
            zone_share: reg!(
                r,
                GaugeVec::new(
                    Opts::new("edge_router_zone_share", "Share of the cluster's traffic the current routing table gives the zone (0-1)."),
                    &["cluster", "region", "zone"]
                )
            ),
            table_generation: reg!(
                r,
                IntGauge::new("edge_router_routing_table_generation", "Generation of the routing table in use; grows with every swap.")
            ),
            table_swaps: reg!(r, IntCounter::new("edge_router_routing_table_swaps_total", "Routing tables swapped in.")),
            table_age: reg!(r, Gauge::new("edge_router_routing_table_age_seconds", "Age of the routing table in use.")),
            config_reloads: reg!(
                r,
                IntCounterVec::new(Opts::new("edge_router_config_reloads_total", "Config reloads by result."), &["result"])
            ),
            upgrades: reg!(
                r,
                IntCounterVec::new(Opts::new("edge_router_upgrades_total", "Binary upgrades by result: success in the process that took over, failure in the one that tried."), &["result"])
            ),
            config_last_reload_success: reg!(
                r,
                Gauge::new(
                    "edge_router_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last config load that succeeded."
                )
            ),
            connections_active: reg!(r, IntGauge::new("edge_router_connections_active", "Open downstream connections.")),
            connections_accepted: reg!(
                r,
                IntCounter::new("edge_router_connections_accepted_total", "Downstream connections accepted.")
            ),
            dns_resolutions: reg!(
                r,
                IntCounterVec::new(
                    Opts::new("edge_router_dns_resolutions_total", "DNS look-ups of endpoint names by result."),
                    &["name", "result"]
                )
            ),
            l4: super::l4::L4Metrics::new(&r),
            registry: r,
        };
        let build = reg!(
            m.registry,
            IntGaugeVec::new(
                Opts::new(
                    "edge_router_build_info",
                    "Always 1; the version label says which build runs."
                ),
                &["version"]
            )
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        if let Ok(c) = super::access::DroppedCollector::new() {
            let _ = m.registry.register(Box::new(c));
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            // Only fails when registered twice; a second Metrics in one process (tests) is fine without it.
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Text exposition of every family.
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        prometheus::TextEncoder::new()
            .encode_to_string(&families)
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }

    pub fn zone(&self, cluster: &str, region: &str, zone: &str) -> ZoneMetrics {
        let lv = [cluster, region, zone];
        let code = |c: &str| self.requests.with_label_values(&[cluster, region, zone, c]);
        ZoneMetrics {
            codes: COMMON_CODES.map(|c| code(c.1)),
            rare: std::iter::repeat_with(OnceLock::new)
                .take(RARE_CODES)
                .collect(),
            requests: self.requests.clone(),
            labels: Arc::new([cluster.to_string(), region.to_string(), zone.to_string()]),
            duration: self.request_duration.with_label_values(&lv),
        }
    }

    /// Creates the series of a DNS-named endpoint at zero, so dashboards and rules see the
    /// family (and `rate()` a baseline) before the first look-up ends. `name` is the name
    /// resolved: the host of `host:port`, or the SRV name.
    pub fn dns_name(&self, name: &str) {
        for result in ["success", "failure"] {
            self.dns_resolutions
                .with_label_values(&[name, result])
                .inc_by(0);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const COMMON_CODES: [(u16, &str); 16] = [
    (200, "200"),
    (201, "201"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (304, "304"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (429, "429"),
    (500, "500"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
];

/// Status codes 100..=599 outside [`COMMON_CODES`] get a lazily resolved slot each.
const RARE_CODES: usize = 500;

/// Handles for one zone of one cluster, resolved when the table is built.
#[derive(Clone)]
pub struct ZoneMetrics {
    codes: [IntCounter; 16],
    /// Index `code - 100`: resolved on the first response with that code, an atomic add after.
    rare: Arc<[OnceLock<IntCounter>]>,
    requests: IntCounterVec,
    labels: Arc<[String; 3]>,
    pub duration: Histogram,
}

impl ZoneMetrics {
    /// Counts a response: one atomic add. Only the first response with a code outside the
    /// common set pays a label lookup (and codes above 599, which hyper allows, every time).
    pub fn count(&self, code: u16) {
        if let Some(i) = COMMON_CODES.iter().position(|(c, _)| *c == code) {
            self.codes[i].inc();
            return;
        }
        let slot = (code as usize)
            .checked_sub(100)
            .and_then(|i| self.rare.get(i));
        match slot {
            Some(slot) => slot.get_or_init(|| self.lookup(code)).inc(),
            None => self.lookup(code).inc(),
        }
    }

    fn lookup(&self, code: u16) -> IntCounter {
        let [cl, r, z] = &*self.labels;
        self.requests
            .with_label_values(&[cl.as_str(), r.as_str(), z.as_str(), &code.to_string()])
    }
}

/// Handles for one endpoint, resolved when its health state is created.
#[derive(Clone)]
pub struct EndpointMetrics {
    pub healthy: IntGauge,
    pub latency: Gauge,
    pub in_flight: IntGauge,
    pub probe_ok: IntCounter,
    pub probe_fail: IntCounter,
    pub probe_duration: Histogram,
    pub ejections: IntCounter,
    pub connect_errors: IntCounter,
}

impl EndpointMetrics {
    pub fn new(
        m: &Metrics,
        cluster: &str,
        region: &str,
        zone: &str,
        endpoint: &str,
    ) -> EndpointMetrics {
        let lv = [cluster, region, zone, endpoint];
        EndpointMetrics {
            healthy: m.upstream_healthy.with_label_values(&lv),
            latency: m.upstream_latency.with_label_values(&lv),
            in_flight: m.upstream_in_flight.with_label_values(&[cluster, endpoint]),
            probe_ok: m
                .health_checks
                .with_label_values(&[cluster, endpoint, "success"]),
            probe_fail: m
                .health_checks
                .with_label_values(&[cluster, endpoint, "failure"]),
            probe_duration: m.probe_duration.with_label_values(&[cluster, endpoint]),
            ejections: m.ejections.with_label_values(&[cluster, endpoint]),
            connect_errors: m.connect_errors.with_label_values(&[cluster, endpoint]),
        }
    }

    /// Drops the endpoint's series once it has left the config, so a removed endpoint does
    /// not keep reporting itself healthy forever.
    pub fn remove(m: &Metrics, cluster: &str, region: &str, zone: &str, endpoint: &str) {
        let lv = [cluster, region, zone, endpoint];
        let _ = m.upstream_healthy.remove_label_values(&lv);
        let _ = m.upstream_latency.remove_label_values(&lv);
        let _ = m
            .upstream_in_flight
            .remove_label_values(&[cluster, endpoint]);
    }
}

/// The `x-edge-error` kinds a cluster's requests can end with; their counters are resolved
/// (and shown at zero) when the cluster is set up.
pub const CLUSTER_ERROR_KINDS: [&str; 9] = [
    "client_abort",
    "no_endpoint",
    "endpoints_saturated",
    "dial_limit",
    "upstream_connect_error",
    "upstream_tls_error",
    "upstream_reset",
    "upstream_timeout",
    "upgrade_unsupported",
];

/// Handles for one cluster, resolved when the table is built.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub retries: IntCounter,
    pub retry_budget_exhausted: IntCounter,
    pub hedges_sent: IntCounter,
    pub hedges_won: IntCounter,
    pub hedges_refused: IntCounter,
    pub request_bytes: IntCounter,
    pub response_bytes: IntCounter,
    /// One counter per routing decision reason, in the order given to [`ClusterMetrics::new`].
    pub decisions: Vec<IntCounter>,
    pub cluster: String,
    pub errors: IntCounterVec,
    /// Indexed like [`CLUSTER_ERROR_KINDS`].
    known_errors: Vec<IntCounter>,
}

impl ClusterMetrics {
    /// `reasons`: the labels of the routing decisions, indexed as the router counts them.
    pub fn new(m: &Metrics, cluster: &str, reasons: &[&str]) -> ClusterMetrics {
        ClusterMetrics {
            retries: m.retries.with_label_values(&[cluster]),
            retry_budget_exhausted: m.retry_budget_exhausted.with_label_values(&[cluster]),
            hedges_sent: m.hedges.with_label_values(&[cluster, "sent"]),
            hedges_won: m.hedges.with_label_values(&[cluster, "won"]),
            hedges_refused: m.hedges.with_label_values(&[cluster, "budget_exhausted"]),
            request_bytes: m.request_bytes.with_label_values(&[cluster]),
            response_bytes: m.response_bytes.with_label_values(&[cluster]),
            decisions: reasons
                .iter()
                .map(|r| m.decisions.with_label_values(&[cluster, r]))
                .collect(),
            cluster: cluster.to_string(),
            errors: m.errors.clone(),
            known_errors: CLUSTER_ERROR_KINDS
                .iter()
                .map(|k| m.errors.with_label_values(&[cluster, k]))
                .collect(),
        }
    }

    /// The counter of one error kind (for a request that may count it later).
    pub fn error_counter(&self, kind: &str) -> IntCounter {
        match CLUSTER_ERROR_KINDS.iter().position(|k| *k == kind) {
            Some(i) => self.known_errors[i].clone(),
            None => self.errors.with_label_values(&[&self.cluster, kind]),
        }
    }

    /// Counts an error response of this cluster by its `x-edge-error` kind: an atomic add
    /// for the known kinds (an overload of 503s must not turn into a hash per request).
    pub fn error(&self, kind: &str) {
        match CLUSTER_ERROR_KINDS.iter().position(|k| *k == kind) {
            Some(i) => self.known_errors[i].inc(),
            None => self.errors.with_label_values(&[&self.cluster, kind]).inc(),
        }
    }
}
