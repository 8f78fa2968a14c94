//! The core promise, over real sockets: nearest healthy zone, failover, recovery, latency
//! shifts, no flapping, fail-open, errors, headers, h2c and streaming.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

/// Three zones at different distances: r1a 2 ms, r1b 15 ms, r2a 40 ms.
async fn three_zones() -> (Vec<Backend>, TestRouter) {
    let b = vec![
        Backend::start("a1", 2).await,
        Backend::start("a2", 2).await,
        Backend::start("b1", 15).await,
        Backend::start("b2", 15).await,
        Backend::start("c1", 40).await,
    ];
    let eps = vec![
        endpoint(&b[0], "r1", "r1a"),
        endpoint(&b[1], "r1", "r1a"),
        endpoint(&b[2], "r1", "r1b"),
        endpoint(&b[3], "r1", "r1b"),
        endpoint(&b[4], "r2", "r2a"),
    ];
    let r = TestRouter::start(&config(&eps, "", "")).await;
    r.wait_all_healthy().await;
    (b, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nearest_zone_takes_the_traffic() {
    let (_b, r) = three_zones().await;
    let counts = zone_counts(&r.url("/"), 200).await;
    let nearest = counts.get("r1a").copied().unwrap_or(0);
    assert!(
        nearest >= 190,
        "at least 95% to the nearest zone, got {counts:?}"
    );
    let routes = r.routes().await;
    let zones: Vec<&str> = routes["clusters"][0]["zones"]
        .as_array()
        .expect("zones")
        .iter()
        .map(|z| z["zone"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(zones, ["r1a", "r1b", "r2a"], "ranked nearest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_when_a_zone_dies_and_recovery_when_it_returns() {
    let (b, r) = three_zones().await;
    let (a1, a2) = (b[0].addr, b[1].addr);
    b[0].kill();
    b[1].kill();
    let killed = Instant::now();
    // unhealthy_threshold x interval + timeout = 2 x 200 ms + 150 ms; allow for a noisy
    // machine, but the table must move on its own (not only through retries).
    wait_until(
        "table fails over to r1b",
        Duration::from_secs(5),
        || async {
            let reply = get(&r.url("/")).await;
            reply.status == 200 && reply.zone() == "r1b" && reply.reason() == "failover"
        },
    )
    .await;
    let took = killed.elapsed();
    eprintln!("failover took {took:?} (budget 550 ms + builder)");
    // Every request meanwhile was answered: connect failures are retried elsewhere.
    let counts = zone_counts(&r.url("/"), 50).await;
    assert_eq!(counts.get("r1b").copied().unwrap_or(0), 50, "{counts:?}");

    let _a1 = Backend::start_at("a1", 2, a1).await;
    let _a2 = Backend::start_at("a2", 2, a2).await;
    let back = Instant::now();
    wait_until("traffic returns to r1a", Duration::from_secs(5), || async {
        let reply = get(&r.url("/")).await;
        reply.status == 200 && reply.zone() == "r1a" && reply.reason() == "nearest"
    })
    .await;
    eprintln!(
        "recovery took {:?} (budget 2 x 200 ms + builder)",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_moves_when_the_nearest_zone_slows_down() {
    let (b, r) = three_zones().await;
    b[0].ctl.set_delay(120);
    b[1].ctl.set_delay(120);
    let slowed = Instant::now();
    wait_until("r1b becomes nearest", Duration::from_secs(8), || async {
        let reply = get(&r.url("/")).await;
        reply.zone() == "r1b"
    })
    .await;
    eprintln!("latency shift moved traffic in {:?}", slowed.elapsed());
    let routes = r.routes().await;
    assert_eq!(routes["clusters"][0]["zones"][0]["zone"], "r1b");
    // And back once r1a is fast again.
    b[0].ctl.set_delay(2);
    b[1].ctl.set_delay(2);
    wait_until("r1a nearest again", Duration::from_secs(10), || async {
        get(&r.url("/")).await.zone() == "r1a"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_zones_do_not_flap() {
    let b = [Backend::start("a", 10).await, Backend::start("b", 10).await];
    let eps = vec![endpoint(&b[0], "r1", "r1a"), endpoint(&b[1], "r1", "r1b")];
    let r = TestRouter::start(&config(&eps, "", "")).await;
    r.wait_all_healthy().await;
    // Let the averages settle, then watch the ranking under traffic for 4 s.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let load = Load::start(r.url("/"), 8);
    let mut firsts = Vec::new();
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let routes = r.routes().await;
        firsts.push(
            routes["clusters"][0]["zones"][0]["zone"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let results = load.finish().await;
    let changes = firsts.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        changes <= 1,
        "nearest zone changed {changes} times in 4 s: {firsts:?}"
    );
    let ok = results.iter().filter(|x| x.1 == 200).count();
    assert_eq!(ok, results.len(), "all requests answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_endpoint_takes_endpoint_out_and_readyz_says_why() {
    let b = [Backend::start("a", 1).await, Backend::start("b", 1).await];
    let eps = vec![endpoint(&b[0], "r1", "r1a"), endpoint(&b[1], "r1", "r1b")];
    let r = TestRouter::start(&config(&eps, "", "")).await;
    r.wait_all_healthy().await;
    assert_eq!(get(&r.admin_url("/readyz")).await.status, 200);
    b[0].ctl
        .health_status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    wait_until("a unhealthy", Duration::from_secs(5), || async {
        let routes = r.routes().await;
        routes["clusters"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| {
                e.iter()
                    .any(|e| e["address"] == b[0].addr.to_string() && e["healthy"] == false)
            })
    })
    .await;
    let counts = zone_counts(&r.url("/"), 20).await;
    assert_eq!(counts.get("r1b").copied(), Some(20), "{counts:?}");
    b[1].ctl
        .health_status
        .store(500, std::sync::atomic::Ordering::SeqCst);
    wait_until("readyz 503", Duration::from_secs(5), || async {
        get(&r.admin_url("/readyz")).await.status == 503
    })
    .await;
    let ready = get(&r.admin_url("/readyz")).await;
    assert!(ready.body.contains("no healthy endpoint"), "{}", ready.body);
    // Fail open: nothing is healthy, but the backends still answer real requests.
    let reply = get(&r.url("/")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.reason(), "panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_codes_carry_x_edge_error() {
    let b = Backend::start("a", 1).await;
    b.ctl
        .stall_ms
        .store(2_000, std::sync::atomic::Ordering::SeqCst);
    let text = config(&[endpoint(&b, "r1", "r1a")], "", "")
        .replace("[[route]]\npath_prefix = \"/\"", "[[route]]\npath_prefix = \"/stall\"\ntimeout = \"300ms\"\ncluster = \"api\"\n\n[[route]]\npath_prefix = \"/ok\"")
        + "\n[[cluster]]\nname = \"drained\"\n[[cluster.endpoint]]\naddress = \"127.0.0.1:9\"\nregion = \"r1\"\nzone = \"r1a\"\nweight = 0\n[[route]]\npath_prefix = \"/drained\"\ncluster = \"drained\"\n"
        + "\n[[cluster]]\nname = \"dead\"\n[cluster.health_check]\ninterval = \"200ms\"\n[[cluster.endpoint]]\naddress = \"127.0.0.1:1\"\nregion = \"r1\"\nzone = \"r1a\"\n[[route]]\npath_prefix = \"/dead\"\ncluster = \"dead\"\n";
    let r = TestRouter::start(&text).await;
    wait_until("a healthy", Duration::from_secs(5), || async {
        get(&r.url("/ok")).await.status == 200
    })
    .await;

    let nf = get(&r.url("/nothing-here")).await;
    assert_eq!(
        (nf.status, nf.header("x-edge-error")),
        (404, Some("no_route"))
    );
    let to = get(&r.url("/stall")).await;
    assert_eq!(
        (to.status, to.header("x-edge-error")),
        (504, Some("upstream_timeout"))
    );
    let un = get(&r.url("/drained")).await;
    assert_eq!(
        (un.status, un.header("x-edge-error")),
        (503, Some("no_endpoint"))
    );
    let bad = get(&r.url("/dead")).await;
    assert_eq!(
        (bad.status, bad.header("x-edge-error")),
        (502, Some("upstream_connect_error"))
    );
    for reply in [&nf, &to, &un, &bad] {
        assert!(reply.header("x-request-id").is_some());
        assert!(!reply.body.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_request_id_and_hop_by_hop() {
    let b = Backend::start("a", 0).await;
    let r = TestRouter::start(&config(&[endpoint(&b, "r1", "r1a")], "", "")).await;
    r.wait_all_healthy().await;
    let c = client();
    let req = Request::get(r.url("/h"))
        .header("host", "shop.example.com")
        .header("x-request-id", "abc-123")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let reply = send(&c, req).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    let seen = b
        .ctl
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    let h = |n: &str| {
        seen.get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    assert_eq!(h("host").as_deref(), Some("shop.example.com"));
    assert_eq!(h("x-forwarded-host").as_deref(), Some("shop.example.com"));
    assert_eq!(h("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(
        h("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(h("x-request-id").as_deref(), Some("abc-123"));
    assert_eq!(h("x-secret"), None);
    assert_eq!(h("keep-alive"), None);
    assert_eq!(h("proxy-authorization"), None);

    // No id from the client: one is made, sent upstream and returned.
    let reply = get(&r.url("/h")).await;
    let id = reply
        .header("x-request-id")
        .expect("generated id")
        .to_string();
    assert_eq!(id.len(), 32);
    let seen = b
        .ctl
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    assert_eq!(
        seen.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(id.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_with_prior_knowledge() {
    let b = Backend::start("a", 0).await;
    let r = TestRouter::start(&config(&[endpoint(&b, "r1", "r1a")], "", "")).await;
    r.wait_all_healthy().await;
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = c
        .request(
            Request::get(r.url("/h2"))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let seen = b
        .ctl
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    // The :authority became the Host header upstream.
    assert_eq!(
        seen.get("host").and_then(|v| v.to_str().ok()),
        Some(r.addr.to_string().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_stream_both_ways_without_buffering() {
    let b = Backend::start("a", 0).await;
    let r = TestRouter::start(&config(&[endpoint(&b, "r1", "r1a")], "", "")).await;
    r.wait_all_healthy().await;
    // The client sends one chunk and waits for it to come back through the router before
    // sending the next: a router that buffered the request whole would deadlock here.
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
    let stream = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(hyper::body::Frame::data(b)), rx))
    }));
    let body = http_body_util::StreamBody::new(stream);
    let c = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let req = Request::post(r.url("/echo")).body(body).expect("req");
    let chunk = Bytes::from(vec![b'z'; 256 * 1024]);
    tx.send(chunk.clone()).await.expect("send first");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("headers in time")
        .expect("resp");
    let mut body = resp.into_body();
    let mut received = 0usize;
    let rounds = 64; // 16 MiB in all
    for i in 0..rounds {
        let want = (i + 1) * chunk.len();
        while received < want {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("echo arrives before the request body ends")
                .expect("frame")
                .expect("frame ok");
            received += frame.data_ref().map(|d| d.len()).unwrap_or(0);
        }
        if i + 1 < rounds {
            tx.send(chunk.clone()).await.expect("send");
        }
    }
    drop(tx);
    while let Some(f) = body.frame().await {
        received += f.expect("frame").data_ref().map(|d| d.len()).unwrap_or(0);
    }
    assert_eq!(received, rounds * chunk.len());

    // A large response streams too.
    let reply = get(&r.url("/bytes/8388608")).await;
    assert_eq!(reply.body.len(), 8 * 1024 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_json_shape_and_generation() {
    let (b, r) = three_zones().await;
    let before = r.routes().await;
    let g0 = before["generation"].as_u64().expect("generation");
    let c = &before["clusters"][0];
    assert_eq!(c["name"], "api");
    for z in c["zones"].as_array().expect("zones") {
        for key in [
            "region",
            "zone",
            "rank",
            "latency_ms",
            "healthy",
            "endpoints",
        ] {
            assert!(!z[key].is_null(), "zone lacks {key}: {z}");
        }
    }
    for e in c["endpoints"].as_array().expect("endpoints") {
        for key in [
            "address",
            "region",
            "zone",
            "healthy",
            "latency_ms",
            "in_flight",
            "weight",
        ] {
            assert!(!e[key].is_null(), "endpoint lacks {key}: {e}");
        }
    }
    b[4].kill();
    wait_until(
        "generation grows after a health change",
        Duration::from_secs(5),
        || async { r.routes().await["generation"].as_u64().unwrap_or(0) > g0 },
    )
    .await;
    let m = get(&r.admin_url("/metrics")).await;
    assert!(m.body.contains("edge_router_routing_table_generation"));
}

#[test]
fn check_accepts_the_example_config() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .args(["check", "-c", "config/edge-router.toml"])
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok:"), "{stdout}");
    assert_eq!(stdout.lines().count(), 1);
}

#[test]
fn invalid_configs_exit_2_with_one_line_naming_key_and_problem() {
    let good = config(&["\n[[cluster.endpoint]]\naddress = \"127.0.0.1:9001\"\nregion = \"r1\"\nzone = \"r1a\"\n".to_string()], "", "");
    let cases: Vec<(String, &str)> = vec![
        (good.replace("127.0.0.1:9001", "10.0.0.1"), "cluster \"api\" endpoint 1: address \"10.0.0.1\": missing port"),
        (good.replace("route_header = true", "route_headr = true"), "unknown field `route_headr`"),
        (good.replace("interval = \"200ms\"", "interval = \"200\""), "health_check.interval: \"200\" has no unit"),
        (good.replace("interval = \"200ms\"", "interval = \"0s\""), "health_check.interval: must be greater than 0"),
        (good.replace("healthy_threshold = 2\n", "healthy_threshold = 0\n"), "health_check.healthy_threshold: 0 is out of range"),
        (good.replace("cluster = \"api\"\n", "cluster = \"apj\"\n"), "route 1: cluster: no cluster named \"apj\""),
        (good.clone() + "\n[[cluster]]\nname = \"api\"\n[[cluster.endpoint]]\naddress = \"127.0.0.1:1\"\nregion = \"r\"\nzone = \"z\"\n", "cluster \"api\": name: duplicate cluster name"),
        (good.replace("address = \"127.0.0.1:0\"\nroute_header", "address = \"localhost\"\nroute_header"), "listener.address: address \"localhost\": missing port"),
        (good.replace("127.0.0.1:9001", "127.0.0.1:99999"), "port \"99999\" is not a number"),
        (good.replace("[locality]\nregion = \"r1\"\nzone = \"r1a\"\n", ""), "locality: missing"),
        (good.replace("[cluster.health_check]", "traffic_dial = { r1 = 150 }\n[cluster.health_check]"), "traffic_dial.r1: 150 is out of range"),
        (good.replace("path = \"/healthz\"", "path = \"healthz\""), "health_check.path: \"healthz\" must start with /"),
        ("this is not toml".to_string(), "edge.toml"),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, expect) in cases {
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, &text).expect("write");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-router"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("run check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "expected exit 2 for {expect:?}, stderr: {stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
        assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
        assert!(stderr.contains("edge.toml"), "names the file: {stderr}");
    }
    // A missing file is a clear error too.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .args(["check", "-c", "/nonexistent/edge.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}
