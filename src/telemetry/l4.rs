//! Metric families of listeners and layer-4 proxying (tcp, tls_passthrough, udp).
//!
//! Label values come from config (listener, cluster, region, zone, endpoint) and from a
//! fixed set of our own words (direction, reason).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

pub struct L4Metrics {
    /// `edge_router_listener_connections_total{listener,protocol}`: accepted per listener.
    pub listener_connections: IntCounterVec,
    /// `edge_router_l4_connections_total{listener,cluster,region,zone}`: connections (and
    /// udp flows) sent to a zone.
    pub connections: IntCounterVec,
    /// `edge_router_l4_bytes_total{listener,direction}`: `to_upstream` or `to_client`.
    pub bytes: IntCounterVec,
    /// `edge_router_l4_connect_errors_total{cluster,endpoint}`.
    pub connect_errors: IntCounterVec,
    /// `edge_router_l4_connection_duration_seconds{listener}`.
    pub duration: HistogramVec,
    /// `edge_router_l4_rejected_total{listener,reason}`: connections closed before any
    /// upstream saw them.
    pub rejected: IntCounterVec,
    /// `edge_router_udp_flows_active{listener}`.
    pub flows_active: IntGaugeVec,
    /// `edge_router_udp_datagrams_total{listener,direction}`.
    pub datagrams: IntCounterVec,
    /// `edge_router_udp_dropped_total{listener,reason}`.
    pub dropped: IntCounterVec,
}

/// Registering can fail only on a duplicate or invalid name: a programming error caught by
/// every test run.
fn reg<M: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    m: prometheus::Result<M>,
) -> M {
    let m = m.expect("metric definition");
    r.register(Box::new(m.clone()))
        .expect("metric registration");
    m
}

impl L4Metrics {
    pub fn new(r: &Registry) -> L4Metrics {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(r, IntCounterVec::new(Opts::new(name, help), labels))
        };
        L4Metrics {
            listener_connections: counter(
                "edge_router_listener_connections_total",
                "Connections accepted (udp: flows opened), by listener.",
                &["listener", "protocol"],
            ),
            connections: counter(
                "edge_router_l4_connections_total",
                "Layer-4 connections and udp flows sent upstream, by the zone that took them.",
                &["listener", "cluster", "region", "zone"],
            ),
            bytes: counter(
                "edge_router_l4_bytes_total",
                "Bytes copied by layer-4 listeners, to_upstream or to_client.",
                &["listener", "direction"],
            ),
            connect_errors: counter(
                "edge_router_l4_connect_errors_total",
                "Layer-4 upstream connects that failed or timed out.",
                &["cluster", "endpoint"],
            ),
            duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "edge_router_l4_connection_duration_seconds",
                        "Lifetime of proxied layer-4 connections.",
                    )
                    .buckets(vec![
                        0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 1800.0, 7200.0,
                    ]),
                    &["listener"],
                ),
            ),
            rejected: counter(
                "edge_router_l4_rejected_total",
                "Connections closed before reaching an upstream, by reason.",
                &["listener", "reason"],
            ),
            flows_active: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("edge_router_udp_flows_active", "Live udp flows."),
                    &["listener"],
                ),
            ),
            datagrams: counter(
                "edge_router_udp_datagrams_total",
                "Datagrams relayed by udp listeners, to_upstream or to_client.",
                &["listener", "direction"],
            ),
            dropped: counter(
                "edge_router_udp_dropped_total",
                "Datagrams dropped by udp listeners, by reason.",
                &["listener", "reason"],
            ),
        }
    }

    pub fn reject(&self, listener: &str, reason: &str) -> IntCounter {
        self.rejected.with_label_values(&[listener, reason])
    }

    pub fn duration(&self, listener: &str) -> Histogram {
        self.duration.with_label_values(&[listener])
    }
}
