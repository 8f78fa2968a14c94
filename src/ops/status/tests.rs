use super::*;

fn sample() -> Routes {
    serde_json::from_str(
        r#"{"generation": 7, "table_age_s": 1.5,
          "locality": {"region": "us-east-1", "zone": "us-east-1a"},
          "clusters": [{"name": "api", "panic": false,
            "zones": [
              {"region": "us-east-1", "zone": "us-east-1b", "rank": 0, "latency_ms": 8.2,
               "healthy": 1, "endpoints": 2, "share": 0.7, "dial": 100},
              {"region": "eu-west-1", "zone": "eu-west-1a", "rank": 1, "latency_ms": 75.0,
               "healthy": 1, "endpoints": 1, "share": 0.3, "dial": 100},
              {"region": "us-east-1", "zone": "us-east-1a", "rank": 2, "latency_ms": null,
               "healthy": 0, "endpoints": 1, "share": 0.0, "dial": 100}],
            "endpoints": [
              {"address": "10.0.0.1:80", "region": "us-east-1", "zone": "us-east-1b",
               "healthy": true, "ejected": false, "latency_ms": 8.0, "in_flight": 3,
               "weight": 100, "requests": 100},
              {"address": "10.0.0.2:80", "region": "us-east-1", "zone": "us-east-1b",
               "healthy": false, "ejected": true, "latency_ms": 9.0, "in_flight": 0,
               "weight": 100, "requests": 50},
              {"address": "10.0.0.3:80", "region": "eu-west-1", "zone": "eu-west-1a",
               "healthy": true, "ejected": false, "latency_ms": 75.0, "in_flight": 1,
               "weight": 100, "requests": 10},
              {"address": "10.0.0.4:80", "region": "us-east-1", "zone": "us-east-1a",
               "healthy": false, "ejected": false, "latency_ms": null, "in_flight": 0,
               "weight": 100, "requests": 0}],
            "slices": [{"zone": "us-east-1b", "share": 0.7, "reason": "failover"},
                       {"zone": "eu-west-1a", "share": 0.3, "reason": "spillover"}]}]}"#,
    )
    .unwrap()
}

#[test]
fn renders_zones_in_rank_order_with_health_share_and_rates() {
    let r = sample();
    let mut rates = Rates::default();
    let t0 = Instant::now();
    rates.update(&r, t0);
    let mut r2 = r.clone();
    r2.clusters[0].endpoints[0].requests = Some(120);
    rates.update(&r2, t0 + Duration::from_secs(2));
    let events = vec![
        Event {
            ts_ms: 1_000,
            kind: "health".into(),
            severity: None,
            message: "older event".into(),
        },
        Event {
            ts_ms: 2_000,
            kind: "ejection".into(),
            severity: None,
            message: "newer event".into(),
        },
    ];
    let text = render(
        "127.0.0.1:9901",
        &r2,
        &events,
        None,
        &rates,
        Style { color: false },
        5_000,
    );
    let b = text.find("us-east-1b").unwrap();
    let e = text.find("eu-west-1a").unwrap();
    let a = text.find("us-east-1a local").unwrap();
    assert!(b < e && e < a, "zones not nearest first:\n{text}");
    assert!(text.contains("2/4 endpoints healthy"), "{text}");
    assert!(text.contains("serving from us-east-1b"), "{text}");
    assert!(text.contains("1/2"), "{text}");
    assert!(text.contains("70% failover"), "{text}");
    assert!(text.contains("30% spillover"), "{text}");
    // 20 requests in 2 s on the first endpoint.
    assert!(text.contains("10.0 req/s"), "{text}");
    assert!(text.contains("ejected"), "{text}");
    assert!(text.contains("unhealthy"), "{text}");
    // Newest event first.
    let s = text.find("newer event").unwrap();
    let f = text.find("older event").unwrap();
    assert!(s < f, "{text}");
    assert!(text.contains("3.0 s ago"), "{text}");
    assert!(!text.contains('\x1b'), "no colour asked for");
}

#[test]
fn large_clusters_list_only_unhealthy_endpoints() {
    let mut r = sample();
    let c = &mut r.clusters[0];
    for i in 0..100 {
        c.endpoints.push(Endpoint {
            address: format!("10.1.0.{i}:80"),
            region: "eu-west-1".into(),
            zone: "eu-west-1a".into(),
            healthy: true,
            ..Default::default()
        });
    }
    let text = render(
        "x:1",
        &r,
        &[],
        None,
        &Rates::default(),
        Style { color: false },
        0,
    );
    assert!(!text.contains("10.1.0.5:80"), "{text}");
    assert!(text.contains("10.0.0.2:80"), "{text}");
    assert!(text.contains("(102 healthy endpoints not listed"), "{text}");
}

#[test]
fn admin_addresses() {
    assert_eq!(parse_admin("127.0.0.1:9901").unwrap(), "127.0.0.1:9901");
    assert_eq!(
        parse_admin("http://localhost:9901/").unwrap(),
        "localhost:9901"
    );
    assert_eq!(parse_admin("[::1]:9901").unwrap(), "[::1]:9901");
    assert!(parse_admin("localhost").is_err());
    assert!(parse_admin("https://x:1").is_err());
    assert!(parse_admin("a b:1").is_err());
}

#[test]
fn sparklines_scale_and_end_at_the_newest_sample() {
    let v: Vec<Option<f64>> = (0..60).map(|i| Some(i as f64)).collect();
    let s = sparkline(&v, 60, 30, None);
    assert_eq!(s.chars().count(), 30);
    // The first pair is (0, 1): not zero, so one step above the floor.
    assert!(s.starts_with('▂') && s.ends_with('█'), "{s}");
    // Fewer samples than the width: blanks on the left, values on the right.
    let s = sparkline(&[Some(1.0), None, Some(4.0)], 60, 30, Some(4.0));
    assert_eq!(s.chars().count(), 30);
    assert!(s.ends_with('█'), "{s:?}");
    // A one-sample spike survives the two-to-one squeeze.
    let mut v = vec![Some(0.0); 60];
    v[31] = Some(10.0);
    let s = sparkline(&v, 60, 30, None);
    assert_eq!(s.chars().filter(|c| *c == '█').count(), 1, "{s}");
}

#[test]
fn history_is_drawn_per_zone_nearest_first() {
    let r = sample();
    let h: History = serde_json::from_str(
        r#"{"interval_ms": 1000, "t_ms": [1, 2, 3],
          "clusters": [{"name": "api", "rps": [null, 10, 10], "retries_per_s": [null, 0, 2],
            "zones": [
              {"region": "eu-west-1", "zone": "eu-west-1a", "latency_ms": [75, 75, 75],
               "share": [0.3, 0.3, 0.3], "served_share": [null, 0.3, 0.3],
               "rps": [null, 3, 3], "errors_per_s": [null, 0, 0], "ejections_per_s": [null, 0, 0]},
              {"region": "us-east-1", "zone": "us-east-1b", "latency_ms": [8, 8, 150],
               "share": [0.7, 0.7, 0.7], "served_share": [null, 0.7, 0.7],
               "rps": [null, 7, 7], "errors_per_s": [null, 0, 1.5], "ejections_per_s": [null, 0, 0]}]}]}"#,
    )
    .unwrap();
    let text = render(
        "x:1",
        &r,
        &[],
        Some(&h),
        &Rates::default(),
        Style { color: false },
        0,
    );
    let head = text.find("LAST MINUTE").expect("history section");
    let b = text[head..].find("us-east-1b").unwrap();
    let e = text[head..].find("eu-west-1a").unwrap();
    assert!(b < e, "history rows not in table order:\n{text}");
    assert!(text.contains("150 ms"), "{text}");
    assert!(text.contains("70%"), "{text}");
    assert!(text.contains("2.0 retries/s"), "{text}");
}
