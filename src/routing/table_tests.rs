//! The table builder: ranking, spillover, dials, weights, routes.

use super::*;
use crate::config::{parse, Config};
use crate::state::{EndpointState, Status};
use crate::telemetry::metrics::Metrics;

fn config(dials: &str) -> Config {
    let text = format!(
        r#"
[locality]
region = "r1"
zone = "a"
[[cluster]]
name = "api"
{dials}
[[cluster.endpoint]]
address = "127.0.0.1:1"
region = "r1"
zone = "a"
[[cluster.endpoint]]
address = "127.0.0.1:2"
region = "r2"
zone = "c"
[[cluster.endpoint]]
address = "127.0.0.1:3"
region = "r3"
zone = "d"
[[route]]
cluster = "api"
"#
    );
    parse("t.toml", &text, &|_| None).expect("valid")
}

fn cfg_decay() -> crate::config::Decay {
    config("").routing.decay()
}

struct Fixture {
    metrics: Metrics,
    endpoints: Vec<Arc<EndpointState>>,
}

impl Fixture {
    /// `zones`: (region, zone, endpoints, latency ms).
    fn new(zones: &[(&str, &str, usize, f64)]) -> Fixture {
        let metrics = Metrics::new();
        let mut endpoints = Vec::new();
        let mut port = 10000u16;
        for (region, zone, n, ms) in zones {
            for _ in 0..*n {
                port += 1;
                let e = EndpointState::detached(
                    "api",
                    ([127, 0, 0, 1], port).into(),
                    region,
                    zone,
                    &metrics,
                );
                e.force_status(Status::Healthy);
                for _ in 0..crate::state::estimate::WINDOW {
                    e.observe_probe(Duration::from_secs_f64(ms / 1000.0), cfg_decay());
                }
                endpoints.push(e);
            }
        }
        Fixture { metrics, endpoints }
    }

    fn build(&self, b: &mut TableBuilder, cfg: &Config, now: Instant) -> RoutingTable<()> {
        let cc = cfg.clusters[0].clone();
        let shared = self.endpoints[0].shared().clone();
        let runtime = Arc::new(ClusterRuntime {
            shared,
            client: (),
            metrics: ClusterMetrics::new(&self.metrics, "api", &Reason::LABELS),
        });
        let input = ClusterInput {
            config: cc,
            runtime,
            endpoints: self
                .endpoints
                .iter()
                .map(|e| EndpointEntry {
                    state: e.clone(),
                    weight: 100,
                })
                .collect(),
        };
        b.build(
            1,
            Arc::new(cfg.clone()),
            vec![input],
            &|c, r, z| self.metrics.zone(c, r, z),
            now,
        )
    }

    /// Replaces a zone's probe history with `ms` (and `noise` ms of spread around it).
    fn set_latency(&self, zone: &str, ms: f64) {
        self.set_noisy(zone, ms, 0.0);
    }

    fn set_noisy(&self, zone: &str, ms: f64, noise: f64) {
        for e in self.endpoints.iter().filter(|e| &*e.zone == zone) {
            e.probes.clear();
            e.probe_latency.reset();
            for i in 0..crate::state::estimate::WINDOW {
                let jitter = noise * ((i % 4) as f64 / 1.5 - 1.0);
                e.observe_probe(Duration::from_secs_f64((ms + jitter) / 1000.0), cfg_decay());
            }
        }
    }

    /// One more probe for every endpoint of a zone.
    fn probe(&self, zone: &str, ms: f64) {
        for e in self.endpoints.iter().filter(|e| &*e.zone == zone) {
            e.observe_probe(Duration::from_secs_f64(ms / 1000.0), cfg_decay());
        }
    }
}

fn order(t: &RoutingTable<()>) -> Vec<String> {
    t.clusters[0]
        .zones
        .iter()
        .map(|z| z.zone.to_string())
        .collect()
}

fn shares(t: &RoutingTable<()>) -> Vec<(String, f64)> {
    t.clusters[0]
        .zones
        .iter()
        .map(|z| (z.zone.to_string(), (z.share * 1000.0).round() / 1000.0))
        .collect()
}

#[test]
fn ranks_nearest_first_and_sends_all_traffic_there() {
    let f = Fixture::new(&[
        ("r2", "far", 2, 80.0),
        ("r1", "b", 2, 8.0),
        ("r1", "a", 2, 1.0),
    ]);
    let t = f.build(&mut TableBuilder::new(), &config(""), Instant::now());
    assert_eq!(order(&t), ["a", "b", "far"]);
    assert_eq!(
        t.clusters[0].slices,
        vec![Slice {
            zone: 0,
            upto: 1.0,
            reason: Reason::Nearest
        }]
    );
}

#[test]
fn hysteresis_keeps_order_of_near_equal_zones_and_moves_on_clear_wins() {
    let f = Fixture::new(&[("r1", "a", 1, 10.0), ("r1", "b", 1, 10.5)]);
    let cfg = config("");
    let mut b = TableBuilder::new();
    let t0 = Instant::now();
    assert_eq!(order(&f.build(&mut b, &cfg, t0)), ["a", "b"]);
    // b becomes 5% faster: inside the 10% margin, no change however long it lasts.
    f.set_latency("b", 9.5);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_secs(5))),
        ["a", "b"]
    );
    // b becomes 20% faster: the new order must stand for rank_hold (500 ms) first.
    f.set_latency("b", 8.0);
    let t1 = t0 + Duration::from_secs(10);
    assert_eq!(order(&f.build(&mut b, &cfg, t1)), ["a", "b"]);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_millis(300))),
        ["a", "b"]
    );
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_millis(600))),
        ["b", "a"]
    );
    // a becomes twice as fast as b: it passes at once.
    f.set_latency("a", 3.0);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_millis(700))),
        ["a", "b"]
    );
}

#[test]
fn zones_equal_within_noise_rank_by_locality_whatever_came_first() {
    // Listed remote first; each a little faster than the next, but within noise.
    let f = Fixture::new(&[
        ("r2", "c", 1, 3.0),
        ("r1", "b", 1, 3.2),
        ("r1", "a", 1, 3.4),
    ]);
    f.set_noisy("c", 3.0, 1.0);
    f.set_noisy("b", 3.2, 1.0);
    f.set_noisy("a", 3.4, 1.0);
    let cfg = config("");
    let mut b = TableBuilder::new();
    let t0 = Instant::now();
    for k in 0..30 {
        let t = f.build(&mut b, &cfg, t0 + Duration::from_millis(100 * k));
        assert_eq!(order(&t), ["a", "b", "c"], "build {k}");
    }
    // A zone that drifted ahead (b was clearly faster for a while) gives the place back
    // to the local zone once it is equal within noise again, after the hold.
    f.set_noisy("b", 1.0, 0.05);
    let t1 = t0 + Duration::from_secs(10);
    f.build(&mut b, &cfg, t1);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_secs(1))),
        ["b", "a", "c"]
    );
    f.set_noisy("b", 3.2, 1.0);
    f.build(&mut b, &cfg, t1 + Duration::from_secs(2));
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_secs(3))),
        ["a", "b", "c"]
    );
}

#[test]
fn another_region_needs_the_cross_region_margin() {
    let f = Fixture::new(&[("r1", "a", 1, 5.0), ("r2", "c", 1, 4.0)]);
    let mut b = TableBuilder::new();
    let t0 = Instant::now();
    // 1 ms faster: not more than 10% + the 1 ms default margin.
    let cfg = config("");
    f.build(&mut b, &cfg, t0);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_secs(2))),
        ["a", "c"]
    );
    // Without the margin it is clearly faster.
    let mut cfg1 = config("");
    cfg1.routing.cross_region_margin = Duration::ZERO;
    f.build(&mut b, &cfg1, t0 + Duration::from_secs(3));
    assert_eq!(
        order(&f.build(&mut b, &cfg1, t0 + Duration::from_secs(4))),
        ["c", "a"]
    );
}

#[test]
fn one_lucky_probe_steals_nothing_and_a_shift_is_followed_in_two() {
    let f = Fixture::new(&[("r1", "a", 2, 3.0), ("r1", "b", 1, 3.0)]);
    f.set_noisy("a", 3.0, 0.3);
    f.set_noisy("b", 3.0, 0.3);
    let cfg = config("");
    let mut b = TableBuilder::new();
    let t0 = Instant::now();
    assert_eq!(order(&f.build(&mut b, &cfg, t0)), ["a", "b"]);
    // a gets slow: three slow probes of each endpoint are a shift, twice as slow: at once.
    f.probe("a", 150.0);
    f.probe("a", 152.0);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_millis(200))),
        ["a", "b"]
    );
    f.probe("a", 151.0);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_millis(400))),
        ["b", "a"]
    );
    // One fast probe among slow ones changes nothing, early in the slow spell or late.
    f.probe("a", 150.0);
    f.probe("a", 3.0);
    for k in 0..10 {
        let t = f.build(&mut b, &cfg, t0 + Duration::from_millis(500 + 30 * k));
        assert_eq!(order(&t), ["b", "a"]);
    }
    for _ in 0..30 {
        f.probe("a", 150.0);
    }
    f.probe("a", 3.0);
    for k in 0..10 {
        let t = f.build(&mut b, &cfg, t0 + Duration::from_millis(1000 + 100 * k));
        assert_eq!(order(&t), ["b", "a"]);
    }
    // Fast again for two probes: back after the hold (locality breaks the tie).
    f.probe("a", 3.1);
    let t1 = t0 + Duration::from_secs(3);
    f.build(&mut b, &cfg, t1);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t1 + Duration::from_millis(600))),
        ["a", "b"]
    );
}

#[test]
fn a_zone_known_from_one_probe_yields_to_a_measured_faster_one() {
    let cfg = config("");
    let t0 = Instant::now();
    // b has one probe (180 ms) and sorts first by name: it does not keep its place
    // ahead of a measured faster c.
    let f2 = Fixture::new(&[("r3", "b", 1, 180.0), ("r2", "c", 1, 80.0)]);
    for e in f2.endpoints.iter().filter(|e| &*e.zone == "b") {
        e.probes.clear();
        e.observe_probe(Duration::from_millis(180), cfg_decay());
    }
    let mut b2 = TableBuilder::new();
    f2.build(&mut b2, &cfg, t0);
    assert_eq!(
        order(&f2.build(&mut b2, &cfg, t0 + Duration::from_secs(1))),
        ["c", "b"]
    );
}

#[test]
fn one_slow_first_probe_of_the_own_zone_keeps_its_place_until_the_estimates_settle() {
    let cfg = config("");
    let t0 = Instant::now();
    let f = Fixture::new(&[("r1", "a", 1, 0.2), ("r2", "c", 1, 0.2)]);
    let probe = |zone: &str, ms: f64| {
        for e in f.endpoints.iter().filter(|e| &*e.zone == zone) {
            e.observe_probe(Duration::from_secs_f64(ms / 1000.0), cfg_decay());
        }
    };
    for e in &f.endpoints {
        e.probes.clear();
    }
    // Own zone's first probe hit a cold connection: 5 ms against 0.2 ms.
    probe("a", 5.0);
    probe("c", 0.2);
    let mut b = TableBuilder::new();
    assert_eq!(order(&f.build(&mut b, &cfg, t0)), ["a", "c"]);
    probe("a", 5.0);
    probe("c", 0.2);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_millis(10))),
        ["a", "c"],
        "two probes each are not enough to leave the own zone"
    );
    // The third probe settles both: a really is 25 times slower, and c leads at once.
    probe("a", 5.0);
    probe("c", 0.2);
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_millis(20))),
        ["c", "a"]
    );
}

#[test]
fn a_zone_without_a_healthy_endpoint_never_ranks_ahead_of_a_healthy_one() {
    let f = Fixture::new(&[("r1", "a", 2, 1.0), ("r2", "c", 1, 50.0)]);
    let cfg = config("");
    let mut b = TableBuilder::new();
    let t0 = Instant::now();
    assert_eq!(order(&f.build(&mut b, &cfg, t0)), ["a", "c"]);
    for e in f.endpoints.iter().filter(|e| &*e.zone == "a") {
        e.force_status(Status::Unhealthy);
    }
    let t = f.build(&mut b, &cfg, t0 + Duration::from_millis(100));
    assert_eq!(order(&t), ["c", "a"], "at once, without a hold");
    assert_eq!(t.clusters[0].zones[0].rank, 0);
    for e in f.endpoints.iter().filter(|e| &*e.zone == "a") {
        e.force_status(Status::Healthy);
    }
    assert_eq!(
        order(&f.build(&mut b, &cfg, t0 + Duration::from_millis(200))),
        ["a", "c"]
    );
}

#[test]
fn partial_health_spills_over_like_envoy() {
    let f = Fixture::new(&[("r1", "a", 4, 1.0), ("r1", "b", 4, 8.0)]);
    // 3 of 4 healthy: 0.75 x 1.4 > 1, zone a keeps everything.
    f.endpoints[0].force_status(Status::Unhealthy);
    let mut b = TableBuilder::new();
    let t = f.build(&mut b, &config(""), Instant::now());
    assert_eq!(shares(&t), [("a".into(), 1.0), ("b".into(), 0.0)]);
    // 1 of 4 healthy: keeps 0.25 x 1.4 = 35%, the rest spills.
    f.endpoints[1].force_status(Status::Unhealthy);
    f.endpoints[2].force_status(Status::Unhealthy);
    let t = f.build(&mut b, &config(""), Instant::now());
    assert_eq!(shares(&t), [("a".into(), 0.35), ("b".into(), 0.65)]);
    assert_eq!(t.clusters[0].slices[1].reason, Reason::Spillover);
    // None healthy in a: all goes to b as failover.
    f.endpoints[3].force_status(Status::Unhealthy);
    let t = f.build(&mut b, &config(""), Instant::now());
    assert_eq!(shares(&t), [("b".into(), 1.0), ("a".into(), 0.0)]);
    assert_eq!(t.clusters[0].slices[0].reason, Reason::Failover);
}

#[test]
fn dial_caps_a_region_and_falls_back_when_alone() {
    let f = Fixture::new(&[("r1", "a", 2, 1.0), ("r2", "b", 2, 8.0)]);
    let mut b = TableBuilder::new();
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 30 }"),
        Instant::now(),
    );
    assert_eq!(shares(&t), [("a".into(), 0.3), ("b".into(), 0.7)]);
    assert_eq!(t.clusters[0].slices[1].reason, Reason::Dial);
    for e in f.endpoints.iter().filter(|e| &*e.zone == "b") {
        e.force_status(Status::Unhealthy);
    }
    let t = f.build(&mut b, &config("traffic_dial = { r1 = 0 }"), Instant::now());
    assert_eq!(shares(&t), [("a".into(), 1.0), ("b".into(), 0.0)]);
}

#[test]
fn a_dial_caps_the_whole_region_and_cascades_down_the_ranking() {
    let f = Fixture::new(&[
        ("r1", "a", 2, 1.0),
        ("r1", "b", 2, 2.0),
        ("r2", "c", 2, 8.0),
        ("r3", "d", 2, 20.0),
    ]);
    let mut b = TableBuilder::new();
    // Region r1 at 50%: zone a keeps half, the other half skips r1's zone b.
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 50 }"),
        Instant::now(),
    );
    assert_eq!(
        shares(&t),
        [
            ("a".into(), 0.5),
            ("b".into(), 0.0),
            ("c".into(), 0.5),
            ("d".into(), 0.0)
        ]
    );
    // r2 dialled too: it keeps half of what reaches it, the rest goes on to r3.
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 50, r2 = 50 }"),
        Instant::now(),
    );
    assert_eq!(
        shares(&t),
        [
            ("a".into(), 0.5),
            ("b".into(), 0.0),
            ("c".into(), 0.25),
            ("d".into(), 0.25)
        ]
    );
    let reasons: Vec<Reason> = t.clusters[0].slices.iter().map(|s| s.reason).collect();
    assert_eq!(reasons, [Reason::Nearest, Reason::Dial, Reason::Dial]);
    // Dial 0 drains r1 but keeps its zones ready (candidates, probed elsewhere).
    let t = f.build(&mut b, &config("traffic_dial = { r1 = 0 }"), Instant::now());
    assert_eq!(
        shares(&t)[..3],
        [("a".into(), 0.0), ("b".into(), 0.0), ("c".into(), 1.0)]
    );
    assert_eq!(t.clusters[0].zones[0].candidates.len(), 2);
}

#[test]
fn strict_dial_refuses_what_nobody_else_can_take() {
    let f = Fixture::new(&[("r1", "a", 2, 1.0), ("r2", "b", 2, 8.0)]);
    for e in f.endpoints.iter().filter(|e| &*e.zone == "b") {
        e.force_status(Status::Unhealthy);
    }
    let mut b = TableBuilder::new();
    // Fallback (default): the dialled region serves everything, as failover.
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 30 }"),
        Instant::now(),
    );
    assert_eq!(shares(&t), [("a".into(), 1.0), ("b".into(), 0.0)]);
    assert_eq!(
        t.clusters[0].slices,
        vec![
            Slice {
                zone: 0,
                upto: 0.3,
                reason: Reason::Nearest
            },
            Slice {
                zone: 0,
                upto: 1.0,
                reason: Reason::Failover
            }
        ]
    );
    // Strict: 30% served, 70% refused.
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 30 }\ndial_fallback = false"),
        Instant::now(),
    );
    assert_eq!(shares(&t), [("a".into(), 0.3), ("b".into(), 0.0)]);
    assert!((t.clusters[0].slices.last().map_or(0.0, |s| s.upto) - 0.3).abs() < 1e-9);
    // Nothing healthy anywhere: fail open, dials or not.
    for e in &f.endpoints {
        e.force_status(Status::Unhealthy);
    }
    let t = f.build(
        &mut b,
        &config("traffic_dial = { r1 = 0 }\ndial_fallback = false"),
        Instant::now(),
    );
    assert!(t.clusters[0].panic);
    assert_eq!(shares(&t), [("a".into(), 1.0), ("b".into(), 0.0)]);
}

#[test]
fn nothing_healthy_fails_open_to_the_nearest_zone() {
    let f = Fixture::new(&[("r1", "a", 2, 1.0), ("r1", "b", 2, 8.0)]);
    for e in &f.endpoints {
        e.force_status(Status::Unhealthy);
    }
    let t = f.build(&mut TableBuilder::new(), &config(""), Instant::now());
    let c = &t.clusters[0];
    assert!(c.panic);
    assert_eq!(
        c.slices,
        vec![Slice {
            zone: 0,
            upto: 1.0,
            reason: Reason::Panic
        }]
    );
    assert_eq!(c.zones[0].candidates.len(), 2);
}

#[test]
fn host_matching_never_panics_and_agrees_with_a_byte_reference() {
    let cfg = parse(
        "t.toml",
        r#"
[locality]
region = "r1"
zone = "a"
[[cluster]]
name = "api"
[[cluster.endpoint]]
address = "127.0.0.1:1"
region = "r1"
zone = "a"
[[route]]
host = "*.ab"
path_prefix = "/"
cluster = "api"
[[route]]
host = "exact.test"
path_prefix = "/"
cluster = "api"
"#,
        &|_| None,
    )
    .expect("valid");
    let f = Fixture::new(&[("r1", "a", 1, 1.0)]);
    let t = f.build(&mut TableBuilder::new(), &cfg, Instant::now());
    let reference = |h: &str| {
        let b = h.as_bytes();
        (b.len() > 3 && b[b.len() - 3..].eq_ignore_ascii_case(b".ab"))
            || b.eq_ignore_ascii_case(b"exact.test")
    };
    let mut cases: Vec<String> = [
        "x\u{e9}ab",
        "\u{e9}.ab",
        "a.AB",
        "ab",
        ".ab",
        "\u{1F600}b",
        "EXACT.test",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Arbitrary bytes (as the engines could pass them on), from a fixed seed.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..20_000 {
        let mut bytes = Vec::new();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        for i in 0..(x % 9) {
            let b = (x >> (i * 7)) as u8;
            bytes.push(if b % 3 == 0 {
                b'.'
            } else if b % 5 == 0 {
                b'a'
            } else {
                b
            });
        }
        bytes.extend_from_slice(if x % 2 == 0 { b"ab" } else { b".ab" });
        cases.push(String::from_utf8_lossy(&bytes).into_owned());
    }
    for h in &cases {
        let got = t.match_route(0, Some(h), "/").is_some();
        assert_eq!(got, reference(h), "host {h:?}");
    }
}
