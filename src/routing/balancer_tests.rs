//! The pick, deterministic: every test seeds this thread's generator first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::config::parse;
use crate::routing::table::{ClusterInput, ClusterRuntime, RoutingTable, TableBuilder};
use crate::telemetry::metrics::{ClusterMetrics, Metrics};

/// One cluster "api" in one zone, endpoints with (weight, latency ms, in flight).
fn table(eps: &[(u32, f64, u32)]) -> RoutingTable<()> {
    let mut text =
        String::from("[locality]\nregion = \"r1\"\nzone = \"a\"\n[[cluster]]\nname = \"api\"\n");
    for (i, (w, _, _)) in eps.iter().enumerate() {
        text.push_str(&format!(
            "[[cluster.endpoint]]\naddress = \"127.0.0.1:{}\"\nregion = \"r1\"\nzone = \"a\"\nweight = {w}\n",
            1000 + i
        ));
    }
    text.push_str("[[route]]\ncluster = \"api\"\n");
    let cfg = parse("t.toml", &text, &|_| None).expect("valid");
    let metrics = Metrics::new();
    let decay = cfg.routing.decay();
    let states: Vec<_> = eps
        .iter()
        .enumerate()
        .map(|(i, (_, ms, inflight))| {
            let e = EndpointState::detached(
                "api",
                ([127, 0, 0, 1], 1000 + i as u16).into(),
                "r1",
                "a",
                &metrics,
            );
            e.force_status(crate::state::Status::Healthy);
            e.observe(Duration::from_secs_f64(ms / 1000.0), decay);
            e.in_flight.store(*inflight, Ordering::Relaxed);
            e
        })
        .collect();
    let input = ClusterInput {
        config: cfg.clusters[0].clone(),
        runtime: Arc::new(ClusterRuntime {
            shared: states[0].shared().clone(),
            client: (),
            metrics: ClusterMetrics::new(&metrics, "api", &Reason::LABELS),
        }),
        endpoints: states
            .iter()
            .zip(eps)
            .map(|(s, (w, _, _))| EndpointEntry {
                state: s.clone(),
                weight: *w,
            })
            .collect(),
    };
    TableBuilder::new().build(
        1,
        Arc::new(cfg),
        vec![input],
        &|c, r, z| metrics.zone(c, r, z),
        Instant::now(),
    )
}

fn counts(t: &RoutingTable<()>, n: usize) -> HashMap<u16, usize> {
    let mut m = HashMap::new();
    for _ in 0..n {
        let p = pick(&t.clusters[0], u32::MAX).expect("a pick");
        *m.entry(p.endpoint.state.addr.port()).or_default() += 1;
    }
    m
}

#[test]
fn the_same_seed_gives_the_same_picks() {
    let t = table(&[(100, 2.0, 0), (100, 2.0, 0), (100, 2.0, 0)]);
    seed(42);
    let a: Vec<u16> = (0..50)
        .map(|_| {
            pick(&t.clusters[0], u32::MAX)
                .expect("pick")
                .endpoint
                .state
                .addr
                .port()
        })
        .collect();
    seed(42);
    let b: Vec<u16> = (0..50)
        .map(|_| {
            pick(&t.clusters[0], u32::MAX)
                .expect("pick")
                .endpoint
                .state
                .addr
                .port()
        })
        .collect();
    assert_eq!(a, b);
}

#[test]
fn alike_endpoints_share_evenly() {
    let t = table(&[(100, 2.0, 0), (100, 2.0, 0)]);
    seed(7);
    let c = counts(&t, 10_000);
    for n in c.values() {
        assert!((4_500..=5_500).contains(n), "{c:?}");
    }
}

#[test]
fn weights_hold_between_alike_endpoints() {
    let t = table(&[(300, 2.0, 0), (100, 2.0, 0)]);
    seed(11);
    let c = counts(&t, 20_000);
    let heavy = c[&1000] as f64 / 20_000.0;
    assert!(
        (0.70..=0.80).contains(&heavy),
        "weight 3:1 gave {heavy:.3}: {c:?}"
    );
}

#[test]
fn a_clearly_slower_or_busier_endpoint_loses_the_comparison() {
    let slow = table(&[(100, 2.0, 0), (100, 20.0, 0)]);
    seed(3);
    let c = counts(&slow, 10_000);
    assert!(
        c.get(&1001).copied().unwrap_or(0) < 3_000,
        "slow one kept {c:?}"
    );
    let busy = table(&[(100, 2.0, 0), (100, 2.0, 8)]);
    seed(3);
    let c = counts(&busy, 10_000);
    assert!(
        c.get(&1001).copied().unwrap_or(0) < 3_000,
        "busy one kept {c:?}"
    );
}

#[test]
fn saturated_endpoints_are_skipped_and_all_saturated_is_none() {
    let t = table(&[(100, 2.0, 5), (100, 2.0, 0)]);
    seed(5);
    for _ in 0..1000 {
        let p = pick(&t.clusters[0], 5).expect("the free endpoint");
        assert_eq!(p.endpoint.state.addr.port(), 1001);
    }
    let full = table(&[(100, 2.0, 5), (100, 2.0, 5)]);
    assert!(pick(&full.clusters[0], 5).is_none());
}

#[test]
fn a_retry_never_returns_the_failed_endpoint() {
    let t = table(&[(100, 2.0, 0), (100, 2.0, 0), (100, 2.0, 0)]);
    seed(9);
    let c = &t.clusters[0];
    for _ in 0..1000 {
        let first = pick(c, u32::MAX).expect("pick");
        let again = pick_other(c, &first.endpoint.state, u32::MAX, Reason::Retry).expect("other");
        assert!(!std::ptr::eq(
            &*first.endpoint.state,
            &*again.endpoint.state
        ));
        assert_eq!(again.reason, Reason::Retry);
    }
}

#[test]
fn affinity_keeps_a_key_on_its_endpoint() {
    let t = table(&[(100, 2.0, 0), (100, 2.0, 0), (100, 2.0, 0)]);
    let c = &t.clusters[0];
    for key in [b"10.0.0.1".as_slice(), b"client-7", b""] {
        let first = pick_affinity(c, key, u32::MAX).expect("pick");
        for _ in 0..100 {
            let p = pick_affinity(c, key, u32::MAX).expect("pick");
            assert!(std::ptr::eq(&*first.endpoint.state, &*p.endpoint.state));
        }
    }
}
