//! Ranking quality under real-world noise, over real sockets: backends with random jitter,
//! zones equal within it, a truly faster remote zone, alike endpoints at several request
//! rates and connection habits, a zone that gets slow and recovers, and a dead zone.
//! Each test prints what it measured (`--nocapture` to see it; with `RQ_DEBUG=1` also every
//! zone's estimate while rank 0 is watched).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

/// These tests measure timing: one at a time, so they do not load the machine for each
/// other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const LOCAL: &str = "us-east-1a";
const SAME_REGION: &str = "us-east-1b";
const REMOTE: &str = "eu-west-1a";

fn region_of(zone: &str) -> &'static str {
    if zone.starts_with("eu-") {
        "eu-west-1"
    } else {
        "us-east-1"
    }
}

/// A router in us-east-1a, probing every 200 ms with a timeout long enough that a slow zone
/// stays healthy (so latency, not health, moves traffic).
fn quality_config(endpoints: &[(String, &str)], routing: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|(addr, zone)| {
            format!(
                "\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"{}\"\nzone = \"{zone}\"\n",
                region_of(zone)
            )
        })
        .collect();
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
route_header = true

[admin]
address = "127.0.0.1:0"

[locality]
region = "us-east-1"
zone = "{LOCAL}"

[routing]
{routing}

[[cluster]]
name = "api"

[cluster.health_check]
path = "/healthz"
interval = "200ms"
timeout = "1s"
healthy_threshold = 2
unhealthy_threshold = 2
{eps}

[[route]]
path_prefix = "/"
cluster = "api"
"#
    )
}

/// Three zones, one backend each, 2 ms + 0-3 ms of jitter.
async fn three_jittered_zones() -> (Vec<Backend>, TestRouter) {
    let b = vec![
        Backend::start_jittered("a", 2, 3).await,
        Backend::start_jittered("b", 2, 3).await,
        Backend::start_jittered("c", 2, 3).await,
    ];
    let eps = vec![
        (b[0].addr.to_string(), LOCAL),
        (b[1].addr.to_string(), SAME_REGION),
        (b[2].addr.to_string(), REMOTE),
    ];
    let r = TestRouter::start(&quality_config(&eps, "")).await;
    r.wait_all_healthy().await;
    wait_full_windows(&r).await;
    (b, r)
}

/// Waits until every zone's estimate stands on at least half a window of probes.
async fn wait_full_windows(r: &TestRouter) {
    wait_samples(r, 16).await;
}

async fn wait_samples(r: &TestRouter, n: u64) {
    wait_until("probe windows filled", Duration::from_secs(15), || async {
        let routes = r.routes().await;
        routes["clusters"][0]["zones"]
            .as_array()
            .is_some_and(|zs| zs.iter().all(|z| z["samples"].as_u64().unwrap_or(0) >= n))
    })
    .await;
}

fn rank0(routes: &serde_json::Value) -> String {
    routes["clusters"][0]["zones"][0]["zone"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn zone_lines(routes: &serde_json::Value) -> String {
    routes["clusters"][0]["zones"]
        .as_array()
        .map(|zs| {
            zs.iter()
                .map(|z| {
                    format!(
                        "{} {}±{} ms (n={}, margin {})",
                        z["zone"],
                        z["latency_ms"],
                        z["uncertainty_ms"],
                        z["samples"],
                        z["overtake_margin_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join(" > ")
        })
        .unwrap_or_default()
}

/// Polls rank 0 every 100 ms for `d`; returns the sequence seen.
async fn watch_rank0(r: &TestRouter, d: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let until = Instant::now() + d;
    while Instant::now() < until {
        let routes = r.routes().await;
        if std::env::var("RQ_DEBUG").is_ok() {
            eprintln!("  {}", zone_lines(&routes));
        }
        seen.push(rank0(&routes));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    seen
}

fn changes(seq: &[String]) -> usize {
    seq.windows(2).filter(|w| w[0] != w[1]).count()
}

fn generation(routes: &serde_json::Value) -> u64 {
    routes["generation"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_zones_keep_the_local_zone_first_idle_and_under_traffic() {
    let _serial = SERIAL.lock().await;
    let (_b, r) = three_jittered_zones().await;
    let before = r.routes().await;
    eprintln!("settled: {}", zone_lines(&before));

    // Idle for 10 s.
    let idle = watch_rank0(&r, Duration::from_secs(10)).await;
    let after_idle = r.routes().await;
    let idle_swaps = generation(&after_idle) - generation(&before);
    eprintln!(
        "idle 10 s: rank 0 changed {} times, {idle_swaps} table swaps; {}",
        changes(&idle),
        zone_lines(&after_idle)
    );
    assert!(changes(&idle) <= 1, "rank 0 changed: {idle:?}");
    assert!(
        idle.iter().filter(|z| *z == LOCAL).count() * 10 >= idle.len() * 9,
        "{idle:?}"
    );
    assert_eq!(rank0(&after_idle), LOCAL);

    // 12 s of traffic.
    let load = Load::start(r.url("/"), 4);
    let busy = watch_rank0(&r, Duration::from_secs(12)).await;
    let results = load.finish().await;
    let after_busy = r.routes().await;
    let busy_swaps = generation(&after_busy) - generation(&after_idle);
    let mut by_zone: HashMap<String, usize> = HashMap::new();
    for (_, status, zone) in &results {
        *by_zone
            .entry(if *status == 200 {
                zone.clone()
            } else {
                format!("status {status}")
            })
            .or_insert(0) += 1;
    }
    let local = by_zone.get(LOCAL).copied().unwrap_or(0);
    eprintln!(
        "traffic 12 s: {} requests {by_zone:?} ({:.2}% local); rank 0 changed {} times; {busy_swaps} table swaps ({:.1}/min over 22 s)",
        results.len(),
        local as f64 * 100.0 / results.len().max(1) as f64,
        changes(&busy),
        (idle_swaps + busy_swaps) as f64 * 60.0 / 22.0
    );
    let errors = results.iter().filter(|x| x.1 != 200).count();
    assert_eq!(errors, 0, "{by_zone:?}");
    assert!(local * 100 >= results.len() * 99, "{by_zone:?}");
    assert_eq!(idle_swaps + busy_swaps, 0, "steady state swaps no table");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truly_faster_remote_zone_takes_the_traffic_within_2s() {
    let _serial = SERIAL.lock().await;
    let (b, r) = three_jittered_zones().await;
    // Full windows: the uncertainty the gap is checked against is the settled one.
    wait_samples(&r, 32).await;
    let routes = r.routes().await;
    assert_eq!(rank0(&routes), LOCAL);
    // The local region gets 6 ms slower (8 ms + jitter against eu-west-1a's 2 ms + jitter):
    // faster by far more than the jitter's noise and the cross-region margin. On a host so
    // loaded that the measured noise itself is several ms, 6 ms is not "far more", and the
    // ranking is right to wait; there the gap grows with the measured uncertainty, so the
    // test still checks that a clear difference moves traffic, and says so.
    let u_max = routes["clusters"][0]["zones"]
        .as_array()
        .map(|zs| {
            zs.iter()
                .filter_map(|z| z["uncertainty_ms"].as_f64())
                .fold(0.0, f64::max)
        })
        .unwrap_or(0.0);
    let gap = 6u64.max((4.5 * u_max + 3.0).ceil() as u64);
    eprintln!(
        "uncertainty before the change: up to {u_max:.2} ms; local region made {gap} ms slower"
    );
    b[0].ctl.set_delay(2 + gap);
    b[1].ctl.set_delay(2 + gap);
    let t0 = Instant::now();
    wait_until("traffic in eu-west-1a", Duration::from_secs(5), || async {
        get(&r.url("/")).await.zone() == REMOTE
    })
    .await;
    let took = t0.elapsed();
    let routes = r.routes().await;
    eprintln!(
        "remote zone {gap} ms faster: traffic moved in {took:?}; {}",
        zone_lines(&routes)
    );
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    let counts = zone_counts(&r.url("/"), 100).await;
    assert!(counts.get(REMOTE).copied().unwrap_or(0) >= 99, "{counts:?}");
}

/// Requests served by each backend over `n` requests from `clients` keep-alive clients.
async fn split(r: &TestRouter, b: &[Backend], clients: usize, per_client: usize) -> (u64, u64) {
    let before: Vec<u64> = b.iter().map(|x| x.ctl.hits()).collect();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = r.url("/");
            tokio::spawn(async move {
                let c = client();
                for _ in 0..per_client {
                    let req = Request::get(url.as_str())
                        .body(Full::new(Bytes::new()))
                        .expect("req");
                    let reply = send(&c, req).await;
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    (b[0].ctl.hits() - before[0], b[1].ctl.hits() - before[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_alike_endpoints_share_evenly_at_1_4_and_16_clients() {
    let _serial = SERIAL.lock().await;
    let b = vec![
        Backend::start_jittered("x", 2, 1).await,
        Backend::start_jittered("y", 2, 1).await,
    ];
    let eps = vec![
        (b[0].addr.to_string(), LOCAL),
        (b[1].addr.to_string(), LOCAL),
    ];
    let r = TestRouter::start(&quality_config(&eps, "")).await;
    r.wait_all_healthy().await;
    let mut report = Vec::new();
    for (clients, per_client) in [(1usize, 200usize), (4, 75), (16, 25)] {
        let (x, y) = split(&r, &b, clients, per_client).await;
        let share = x as f64 / (x + y).max(1) as f64;
        report.push(format!(
            "{clients} client(s): {x}/{y} ({:.0}%)",
            share * 100.0
        ));
        let routes = r.routes().await;
        for e in routes["clusters"][0]["endpoints"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            eprintln!(
                "  {} probe {} peak {} request {}",
                e["address"], e["latency_ms"], e["peak_latency_ms"], e["request_latency_ms"]
            );
        }
        assert!(
            (0.4..=0.6).contains(&share),
            "{clients} clients: {x}/{y}; {report:?}"
        );
    }
    eprintln!("keep-alive split: {}", report.join(", "));
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two stock `python3 -m http.server` backends (HTTP/1.0: a new upstream connection per
/// request) and a client that opens a new connection per request, 10 requests a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_connection_per_request_against_python_servers_shares_evenly() {
    let _serial = SERIAL.lock().await;
    // An empty directory: the listing python serves stays small.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut servers = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..2 {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                &port.to_string(),
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let Ok(child) = child else {
            eprintln!("python3 is not available: nothing to measure");
            return;
        };
        servers.push(KillOnDrop(child));
        addrs.push(format!("127.0.0.1:{port}"));
    }
    let eps = vec![(addrs[0].clone(), LOCAL), (addrs[1].clone(), LOCAL)];
    let toml = quality_config(&eps, "").replace("path = \"/healthz\"", "path = \"/\"");
    let r = TestRouter::start(&toml).await;
    r.wait_all_healthy().await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut took: HashMap<String, Vec<Duration>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for _ in 0..150 {
        tick.tick().await;
        // A fresh client each time: a new connection per request, as curl in a loop.
        let c = client();
        let req = Request::get(r.url("/"))
            .header("connection", "close")
            .body(Full::new(Bytes::new()))
            .expect("req");
        let t0 = Instant::now();
        let reply = send(&c, req).await;
        let t = t0.elapsed();
        assert_eq!(reply.status, 200);
        let ep = route_field(reply.header("x-edge-route").unwrap_or(""), "endpoint");
        took.entry(ep.clone()).or_default().push(t);
        *counts.entry(ep).or_insert(0) += 1;
    }
    let a = counts.get(&addrs[0]).copied().unwrap_or(0);
    let b = counts.get(&addrs[1]).copied().unwrap_or(0);
    let median = |addr: &str| {
        let mut v = took.get(addr).cloned().unwrap_or_default();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    let (ma, mb) = (median(&addrs[0]), median(&addrs[1]));
    eprintln!("new connection per request, 10 req/s: {a}/{b}; median answers {ma:?} / {mb:?}");
    let share = a as f64 / (a + b).max(1) as f64;
    // Alike servers share evenly. On a busy host one python process can really answer
    // slower for the whole run (it shares a core with something else); then the faster one
    // may take more, and only that way round, and never the whole.
    if !(0.4..=0.6).contains(&share) {
        let (favoured, other) = if a > b { (ma, mb) } else { (mb, ma) };
        assert!(
            (0.25..=0.75).contains(&share) && favoured < other,
            "{a}/{b} {counts:?}, median answers {ma:?} / {mb:?}"
        );
    }
    drop(servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_zone_loses_traffic_within_1s_and_gets_it_back_within_2s() {
    let _serial = SERIAL.lock().await;
    let (b, r) = three_jittered_zones().await;
    assert_eq!(rank0(&r.routes().await), LOCAL);
    let load = Load::start(r.url("/"), 2);
    tokio::time::sleep(Duration::from_millis(500)).await;

    b[0].ctl.set_delay(152);
    let slowed = Instant::now();
    wait_until(
        "traffic leaves the slow zone",
        Duration::from_secs(5),
        || async { rank0(&r.routes().await) != LOCAL },
    )
    .await;
    let left = slowed.elapsed();
    // Slow for 3 s in all: rank 0 must not come back on a stray fast probe meanwhile.
    let during = watch_rank0(&r, Duration::from_secs(3).saturating_sub(left)).await;
    b[0].ctl.set_delay(2);
    let fast = Instant::now();
    wait_until("traffic returns", Duration::from_secs(6), || async {
        rank0(&r.routes().await) == LOCAL
    })
    .await;
    let back = fast.elapsed();
    let results = load.finish().await;
    let errors = results.iter().filter(|x| x.1 != 200).count();
    eprintln!(
        "slow +150 ms for 3 s: left in {left:?}, back {back:?} after it was fast again; rank 0 changes while slow: {}; {} requests, {errors} errors",
        changes(&during),
        results.len()
    );
    assert!(left <= Duration::from_secs(1), "left after {left:?}");
    assert!(back <= Duration::from_secs(2), "back after {back:?}");
    assert!(
        during.iter().all(|z| z != LOCAL),
        "flapped back while slow: {during:?}"
    );
    assert_eq!(errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_with_every_endpoint_down_is_never_rank_0() {
    let _serial = SERIAL.lock().await;
    let b = [
        Backend::start_jittered("a1", 1, 1).await,
        Backend::start_jittered("a2", 1, 1).await,
        Backend::start_jittered("c", 30, 1).await,
    ];
    let eps = vec![
        (b[0].addr.to_string(), LOCAL),
        (b[1].addr.to_string(), LOCAL),
        (b[2].addr.to_string(), REMOTE),
    ];
    let r = TestRouter::start(&quality_config(&eps, "")).await;
    r.wait_all_healthy().await;
    assert_eq!(rank0(&r.routes().await), LOCAL);
    b[0].kill();
    b[1].kill();
    let mut seen_dead_last = false;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let routes = r.routes().await;
        let zones = routes["clusters"][0]["zones"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let any_healthy = zones.iter().any(|z| z["healthy"].as_u64().unwrap_or(0) > 0);
        if any_healthy {
            assert!(
                zones[0]["healthy"].as_u64().unwrap_or(0) > 0,
                "a dead zone at rank 0: {}",
                zone_lines(&routes)
            );
        }
        if zones
            .last()
            .is_some_and(|z| z["zone"] == LOCAL && z["healthy"] == 0)
        {
            seen_dead_last = true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen_dead_last, "the dead local zone went last");
    let reply = get(&r.url("/")).await;
    assert_eq!(
        (reply.status, reply.zone().as_str(), reply.reason().as_str()),
        (200, REMOTE, "failover")
    );
}
