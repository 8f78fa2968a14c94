//! Resilience under continuous concurrent traffic, over real sockets: a zone dies, a backend
//! fails, a zone is partly healthy, retries meet their budget, the config changes, clients
//! misbehave, the process is told to stop. The router is the real one (in-process, or the
//! real binary where signals are the point); backends are real HTTP servers on loopback.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sum of the samples of metric `name` whose label set contains every `labels` pair.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = match key.split_once('{') {
                Some((n, rest)) => (n, rest),
                None => (key, ""),
            };
            if n != name {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

async fn metrics(admin: &str) -> String {
    get(&format!("{admin}/metrics")).await.body
}

/// Non-200 answers in `results` whose completion time is in `[from, to)`.
fn errors_between(results: &[(Instant, u16, String)], from: Instant, to: Instant) -> usize {
    results
        .iter()
        .filter(|r| r.0 >= from && r.0 < to && r.1 != 200)
        .count()
}

fn endpoint_json(routes: &serde_json::Value, addr: SocketAddr) -> &serde_json::Value {
    routes["clusters"][0]["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["address"] == addr.to_string()))
        .unwrap_or(&serde_json::Value::Null)
}

fn zone_json<'a>(routes: &'a serde_json::Value, zone: &str) -> &'a serde_json::Value {
    routes["clusters"][0]["zones"]
        .as_array()
        .and_then(|zs| zs.iter().find(|z| z["zone"] == zone))
        .unwrap_or(&serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_zone_under_load_fails_no_get_after_the_first_retry_window() {
    let b = [
        Backend::start("a1", 2).await,
        Backend::start("a2", 2).await,
        Backend::start("b1", 10).await,
        Backend::start("b2", 10).await,
    ];
    let eps = vec![
        endpoint(&b[0], "r1", "r1a"),
        endpoint(&b[1], "r1", "r1a"),
        endpoint(&b[2], "r1", "r1b"),
        endpoint(&b[3], "r1", "r1b"),
    ];
    let r = TestRouter::start(&config(&eps, "", "")).await;
    r.wait_all_healthy().await;
    let load = Load::start(r.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let killed = Instant::now();
    b[0].kill();
    b[1].kill();
    // The retry window: until the table stops offering r1a (passive ejection after a few
    // failures, or the probes after unhealthy_threshold x interval).
    wait_until("r1a out of the table", Duration::from_secs(5), || async {
        zone_json(&r.routes().await, "r1a")["healthy"] == 0
    })
    .await;
    let out = Instant::now();
    // Requests that were already on their way to r1a when the table changed finish (retried)
    // shortly after; give them a moment before counting "after the window".
    let window_end = out + Duration::from_millis(250);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let results = load.finish().await;
    let m = metrics(&format!("http://{}", r.admin)).await;

    let before = errors_between(&results, results[0].0, killed);
    let inside = errors_between(&results, killed, window_end);
    let after = errors_between(
        &results,
        window_end,
        Instant::now() + Duration::from_secs(60),
    );
    let in_window = results
        .iter()
        .filter(|x| x.0 >= killed && x.0 < window_end)
        .count();
    let after_total = results.iter().filter(|x| x.0 >= window_end).count();
    let to_r1b_after = results
        .iter()
        .filter(|x| x.0 >= window_end && x.2 == "r1b")
        .count();
    eprintln!(
        "kill-a-zone: {} requests; window {:?} (table out after {:?}): {inside} errors of \
         {in_window} requests; after the window: {after} errors of {after_total}; retries {}, \
         ejections {}",
        results.len(),
        window_end - killed,
        out - killed,
        metric(&m, "edge_router_retries_total", &[]),
        metric(&m, "edge_router_ejections_total", &[]),
    );
    assert_eq!(before, 0, "no error before the kill");
    assert!(after_total > 100, "traffic went on after the window");
    assert_eq!(after, 0, "no failed GET after the first retry window");
    assert_eq!(to_r1b_after, after_total, "r1b serves everything after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_answering_5xx_is_ejected_and_returns() {
    let b = [
        Backend::start("a1", 2).await,
        Backend::start("a2", 2).await,
        Backend::start("b1", 10).await,
        Backend::start("b2", 10).await,
    ];
    let eps = vec![
        endpoint(&b[0], "r1", "r1a"),
        endpoint(&b[1], "r1", "r1a"),
        endpoint(&b[2], "r1", "r1b"),
        endpoint(&b[3], "r1", "r1b"),
    ];
    let extra = "[cluster.outlier]\nconsecutive_failures = 5\nbase_ejection_time = \"3s\"\n";
    let r = TestRouter::start(&config(&eps, extra, "")).await;
    r.wait_all_healthy().await;
    let admin = format!("http://{}", r.admin);
    let a1 = b[0].addr.to_string();
    let before = metric(
        &metrics(&admin).await,
        "edge_router_ejections_total",
        &[("endpoint", &a1)],
    );
    assert_eq!(before, 0.0);

    let load = Load::start(r.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // a1 answers 500 to real requests while its health check stays green: only passive
    // outlier detection can see it.
    b[0].ctl.set_mode(Mode::Error500);
    let failing = Instant::now();
    wait_until("a1 ejected", Duration::from_secs(5), || async {
        endpoint_json(&r.routes().await, b[0].addr)["ejected"] == true
    })
    .await;
    eprintln!("a1 ejected {:?} after it began to fail", failing.elapsed());
    let count = metric(
        &metrics(&admin).await,
        "edge_router_ejections_total",
        &[("endpoint", &a1)],
    );
    assert!(count >= 1.0, "edge_router_ejections_total grew: {count}");
    let events = get(&format!("{admin}/events")).await.body;
    assert!(events.contains("ejected"), "ejection logged: {events}");

    // Fixed: it comes back (good probes end the ejection) and takes traffic again.
    b[0].ctl.set_mode(Mode::Ok);
    let fixed = Instant::now();
    wait_until("a1 back in the table", Duration::from_secs(8), || async {
        let e = endpoint_json(&r.routes().await, b[0].addr).clone();
        e["ejected"] == false && e["healthy"] == true
    })
    .await;
    let back = Instant::now();
    eprintln!("a1 returned {:?} after it was fixed", fixed.elapsed());
    let hits = b[0].ctl.hits();
    wait_until("a1 serves again", Duration::from_secs(5), || async {
        b[0].ctl.hits() > hits + 20
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let results = load.finish().await;
    let later = errors_between(
        &results,
        back + Duration::from_millis(100),
        Instant::now() + Duration::from_secs(60),
    );
    assert_eq!(later, 0, "no errors once a1 is fixed and back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_four_healthy_keeps_35_percent_and_spills_65() {
    let mut b = Vec::new();
    let mut eps = Vec::new();
    for i in 0..4 {
        let x = Backend::start(&format!("a{i}"), 1).await;
        eps.push(endpoint(&x, "r1", "r1a"));
        b.push(x);
    }
    for i in 0..4 {
        // Far enough that r1a stays nearest even on a loaded machine.
        let x = Backend::start(&format!("b{i}"), 40).await;
        eps.push(endpoint(&x, "r1", "r1b"));
        b.push(x);
    }
    let r = TestRouter::start(&config(&eps, "", "")).await;
    r.wait_all_healthy().await;
    for x in &b[1..4] {
        x.ctl.health_status.store(503, Ordering::SeqCst);
    }
    wait_until("1 of 4 healthy in r1a", Duration::from_secs(5), || async {
        zone_json(&r.routes().await, "r1a")["healthy"] == 1
    })
    .await;
    let routes = r.routes().await;
    assert_eq!(zone_json(&routes, "r1a")["share"], 0.35, "{routes}");
    assert_eq!(zone_json(&routes, "r1b")["share"], 0.65, "{routes}");

    let load = Load::start(r.url("/"), 8);
    let started = Instant::now();
    wait_until("enough traffic", Duration::from_secs(20), || async {
        b.iter().map(|x| x.ctl.hits()).sum::<u64>() >= 800
    })
    .await;
    let results = load.finish().await;
    let took = started.elapsed();
    let n = results.len() as f64;
    let a = results.iter().filter(|x| x.2 == "r1a").count() as f64;
    let bb = results.iter().filter(|x| x.2 == "r1b").count() as f64;
    let errors = results.iter().filter(|x| x.1 != 200).count();
    eprintln!(
        "spillover: {n} requests in {took:?}: r1a {:.1}%, r1b {:.1}%",
        a / n * 100.0,
        bb / n * 100.0
    );
    assert_eq!(errors, 0);
    // Binomial sd at n=800, p=0.35 is 1.7%; allow 6 points.
    let routes = r.routes().await;
    assert!(
        (a / n - 0.35).abs() < 0.06,
        "r1a share {:.3}; routes now: {routes}",
        a / n
    );
    assert!((bb / n - 0.65).abs() < 0.06, "r1b share {:.3}", bb / n);
    // Inside r1a, only the healthy endpoint serves.
    for x in &b[1..4] {
        assert!(
            x.ctl.hits() == 0,
            "{} is unhealthy and took {}",
            x.ctl.name,
            x.ctl.hits()
        );
    }
}

/// An upstream that passes its health check but resets every real request: a dead zone the
/// health checks cannot see.
async fn resetter() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let attempts = Arc::new(AtomicU64::new(0));
    let a = attempts.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let a = a.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let a = a.clone();
                    async move {
                        if req.uri().path() == "/healthz" {
                            Ok(Response::new(Full::new(Bytes::from("ok"))))
                        } else {
                            a.fetch_add(1, Ordering::SeqCst);
                            Err(std::io::Error::other("reset"))
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, attempts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_when_a_whole_zone_is_dead() {
    let (d1, dead1) = resetter().await;
    let (d2, dead2) = resetter().await;
    let b = [
        Backend::start("b1", 10).await,
        Backend::start("b2", 10).await,
    ];
    let dead_ep = |a: SocketAddr| {
        format!("\n[[cluster.endpoint]]\naddress = \"{a}\"\nregion = \"r1\"\nzone = \"r1a\"\n")
    };
    let eps = vec![
        dead_ep(d1),
        dead_ep(d2),
        endpoint(&b[0], "r1", "r1b"),
        endpoint(&b[1], "r1", "r1b"),
    ];
    // Outlier detection off: the zone stays in the table, so only the budget stands between
    // its failures and a doubled load on r1b.
    let extra = "[cluster.outlier]\nconsecutive_failures = 0\n\
                 [cluster.retry]\nbudget_percent = 20\nmin_retries_per_second = 10\n";
    let r = TestRouter::start(&config(&eps, extra, "")).await;
    r.wait_all_healthy().await;
    let admin = format!("http://{}", r.admin);
    assert_eq!(r.routes().await["clusters"][0]["zones"][0]["zone"], "r1a");

    let started = Instant::now();
    let load = Load::start(r.url("/"), 8);
    wait_until("enough traffic", Duration::from_secs(20), || async {
        dead1.load(Ordering::SeqCst) + dead2.load(Ordering::SeqCst) >= 1500
    })
    .await;
    let results = load.finish().await;
    let secs = started.elapsed().as_secs_f64();
    let m = metrics(&admin).await;
    let n = results.len() as f64;
    let dead = (dead1.load(Ordering::SeqCst) + dead2.load(Ordering::SeqCst)) as f64;
    let live = (b[0].ctl.hits() + b[1].ctl.hits()) as f64;
    let retries = metric(&m, "edge_router_retries_total", &[("cluster", "api")]);
    let refused = metric(
        &m,
        "edge_router_retry_budget_exhausted_total",
        &[("cluster", "api")],
    );
    let e502 = results.iter().filter(|x| x.1 == 502).count() as f64;
    eprintln!(
        "retry budget: {n} requests in {secs:.1}s; upstream attempts {} ({dead} to the dead \
         zone, {live} to r1b) = {:.2} per request; retries {retries}, refused by the budget \
         {refused}; 502s {e502}",
        dead + live,
        (dead + live) / n
    );
    // The budget: 20% of requests, 10/s, and at most 100 saved up.
    let cap = 0.2 * n + 10.0 * secs + 100.0;
    assert!(retries <= cap, "retries {retries} > budget {cap:.0}");
    assert!(refused > 0.0, "the budget refused retries");
    assert!(
        (dead + live) / n < 1.5,
        "a dead zone must not double the load"
    );
    assert!(
        retries > 0.0 && live >= retries * 0.9,
        "retries went to r1b"
    );
    assert!(e502 > 0.0, "what the budget refused surfaced as 502");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_endpoints_under_load_with_zero_failures() {
    let a1 = Backend::start("a1", 2).await;
    let a2 = Backend::start("a2", 2).await;
    let a3 = Backend::start("a3", 2).await;
    let b1 = Backend::start("b1", 10).await;
    let b2 = Backend::start("b2", 10).await;
    let cfg = |eps: &[&Backend]| {
        let lines: Vec<String> = eps
            .iter()
            .map(|b| {
                let zone = if b.ctl.name.starts_with('a') {
                    "r1a"
                } else {
                    "r1b"
                };
                endpoint(b, "r1", zone)
            })
            .collect();
        config(&lines, "", "")
    };
    let r = TestRouter::start(&cfg(&[&a1, &b1])).await;
    r.wait_all_healthy().await;
    let admin = format!("http://{}", r.admin);
    let load = Load::start(r.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 1. Add a2 and b2.
    r.rewrite_config(&cfg(&[&a1, &a2, &b1, &b2]));
    let reply = post(&format!("{admin}/reload")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_until("a2 and b2 healthy", Duration::from_secs(5), || async {
        let routes = r.routes().await;
        [a2.addr, b2.addr]
            .iter()
            .all(|a| endpoint_json(&routes, *a)["healthy"] == true)
    })
    .await;
    let hits = a2.ctl.hits();
    wait_until("a2 takes traffic", Duration::from_secs(5), || async {
        a2.ctl.hits() > hits + 20
    })
    .await;

    // 2. Remove a1 while it has slow requests in flight: they must finish.
    a1.ctl.stall_ms.store(1500, Ordering::SeqCst);
    a2.ctl.stall_ms.store(1500, Ordering::SeqCst);
    let stalls: Vec<_> = (0..6)
        .map(|_| {
            let url = r.url("/stall");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    wait_until(
        "a slow request in flight on a1",
        Duration::from_secs(5),
        || async {
            endpoint_json(&r.routes().await, a1.addr)["in_flight"]
                .as_u64()
                .unwrap_or(0)
                >= 1
        },
    )
    .await;
    let a1_in_flight = endpoint_json(&r.routes().await, a1.addr)["in_flight"].clone();
    let gen = r.routes().await["generation"].as_u64().unwrap_or(0);
    r.rewrite_config(&cfg(&[&a2, &a3, &b1, &b2]));
    let reply = post(&format!("{admin}/reload")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    // The first table of the new config keeps what was learnt about a2 (no re-probing).
    wait_until("a1 gone from the table", Duration::from_secs(5), || async {
        let routes = r.routes().await;
        routes["generation"].as_u64().unwrap_or(0) > gen
            && endpoint_json(&routes, a1.addr).is_null()
    })
    .await;
    let routes = r.routes().await;
    assert_eq!(
        endpoint_json(&routes, a2.addr)["healthy"],
        true,
        "kept endpoint keeps its health: {routes}"
    );
    assert!(endpoint_json(&routes, a2.addr)["latency_ms"].is_number());
    for s in stalls {
        assert_eq!(
            s.await.expect("join"),
            200,
            "in-flight request finished ({a1_in_flight} on a1 at the reload)"
        );
    }
    let hits = a1.ctl.hits();
    wait_until("a3 healthy", Duration::from_secs(5), || async {
        endpoint_json(&r.routes().await, a3.addr)["healthy"] == true
    })
    .await;

    // 3. Remove a whole zone (b1, b2) and keep going.
    r.rewrite_config(&cfg(&[&a2, &a3]));
    let reply = post(&format!("{admin}/reload")).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    wait_until("r1b gone", Duration::from_secs(5), || async {
        zone_json(&r.routes().await, "r1b").is_null()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results = load.finish().await;
    let failed = results.iter().filter(|x| x.1 != 200).count();
    let m = metrics(&admin).await;
    eprintln!(
        "reload under load: {} requests, {failed} failed; reloads ok {}",
        results.len(),
        metric(
            &m,
            "edge_router_config_reloads_total",
            &[("result", "success")]
        )
    );
    assert_eq!(failed, 0, "zero failed requests across three reloads");
    assert_eq!(
        a1.ctl.hits(),
        hits,
        "a removed endpoint gets no new request"
    );
    assert_eq!(
        metric(
            &m,
            "edge_router_config_reloads_total",
            &[("result", "success")]
        ),
        3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_over_admin_keeps_serving_and_counts_a_failure() {
    let b = [
        Backend::start("a1", 2).await,
        Backend::start("b1", 10).await,
    ];
    let good = config(
        &[endpoint(&b[0], "r1", "r1a"), endpoint(&b[1], "r1", "r1b")],
        "",
        "",
    );
    let r = TestRouter::start(&good).await;
    r.wait_all_healthy().await;
    let admin = format!("http://{}", r.admin);
    let load = Load::start(r.url("/"), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gen = r.routes().await["generation"].clone();
    r.rewrite_config(&good.replace("[[route]]", "[[route]]\nno_such_key = 1"));
    let reply = post(&format!("{admin}/reload")).await;
    assert_eq!(reply.status, 422, "{}", reply.body);
    assert!(reply.body.contains("no_such_key"), "{}", reply.body);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results = load.finish().await;
    let m = metrics(&admin).await;
    assert_eq!(
        metric(
            &m,
            "edge_router_config_reloads_total",
            &[("result", "failure")]
        ),
        1.0
    );
    assert_eq!(r.routes().await["generation"], gen, "running table kept");
    assert_eq!(results.iter().filter(|x| x.1 != 200).count(), 0);
    assert!(results.len() > 50);
}

/// A free loopback port (bound and released: a tiny race, fine for tests).
async fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

/// The real binary, run with a config file, stopped with signals.
struct Binary {
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Binary {
    async fn start(endpoints: &[String], listener_extra: &str) -> Binary {
        Binary::start_args(endpoints, listener_extra, &[]).await
    }

    /// [`Binary::start`] with more arguments after `run --config FILE`.
    async fn start_args(endpoints: &[String], listener_extra: &str, args: &[&str]) -> Binary {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: SocketAddr = ([127, 0, 0, 1], free_port().await).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port().await).into();
        let text = config(endpoints, "", listener_extra)
            .replacen("127.0.0.1:0", &data.to_string(), 1)
            .replacen("127.0.0.1:0", &admin.to_string(), 1);
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_edge-router"))
            .args(["run", "--config"])
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn edge-router");
        let b = Binary {
            child,
            data,
            admin,
            config: path,
            _dir: dir,
        };
        let url = format!("http://{admin}/readyz");
        wait_until("binary ready", Duration::from_secs(15), || async {
            let req = Request::get(url.as_str())
                .body(Full::new(Bytes::new()))
                .expect("req");
            matches!(
                tokio::time::timeout(Duration::from_secs(1), client().request(req)).await,
                Ok(Ok(resp)) if resp.status() == StatusCode::OK
            )
        })
        .await;
        b
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig}");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("log")).unwrap_or_default()
    }

    /// Waits for the process to exit; its exit code.
    async fn wait(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_by_sighup_keeps_the_binary_serving() {
    let b = [
        Backend::start("a1", 2).await,
        Backend::start("b1", 10).await,
    ];
    let eps = [endpoint(&b[0], "r1", "r1a"), endpoint(&b[1], "r1", "r1b")];
    let bin = Binary::start(&eps, "").await;
    let admin = format!("http://{}", bin.admin);
    let load = Load::start(format!("http://{}/", bin.data), 8);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let good = std::fs::read_to_string(&bin.config).expect("read");
    std::fs::write(
        &bin.config,
        good.replace(
            "[[route]]",
            "[[route]]\ncluster = \"api\"\n[[route]]\nbogus = 1",
        ),
    )
    .expect("write");
    bin.signal("-HUP");
    wait_until("reload failure counted", Duration::from_secs(5), || async {
        metric(
            &metrics(&admin).await,
            "edge_router_config_reloads_total",
            &[("result", "failure")],
        ) == 1.0
    })
    .await;
    // And a valid file afterwards is taken.
    std::fs::write(&bin.config, &good).expect("write");
    bin.signal("-HUP");
    wait_until("reload success counted", Duration::from_secs(5), || async {
        metric(
            &metrics(&admin).await,
            "edge_router_config_reloads_total",
            &[("result", "success")],
        ) == 1.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let results = load.finish().await;
    let failed = results.iter().filter(|x| x.1 != 200).count();
    assert_eq!(failed, 0, "served throughout; log:\n{}", bin.log());
    assert!(results.len() > 50);
    assert!(
        bin.log().contains("keeping the running config"),
        "the failure is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_slow_request_finish_then_exits_zero() {
    let a = Backend::start("a1", 1).await;
    a.ctl.stall_ms.store(2500, Ordering::SeqCst);
    let mut bin = Binary::start(
        &[endpoint(&a, "r1", "r1a")],
        "drain_timeout = \"15s\"\nidle_timeout = \"60s\"",
    )
    .await;
    let admin = format!("http://{}", bin.admin);
    let slow_url = format!("http://{}/stall", bin.data);
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        (get(&slow_url).await, started.elapsed())
    });
    wait_until(
        "slow request reached the backend",
        Duration::from_secs(5),
        || async { a.ctl.hits() >= 1 },
    )
    .await;
    bin.signal("-TERM");
    let signalled = Instant::now();
    wait_until(
        "readyz 503 while draining",
        Duration::from_secs(2),
        || async { get(&format!("{admin}/readyz")).await.status == 503 },
    )
    .await;
    let to_503 = signalled.elapsed();
    assert!(
        !slow.is_finished(),
        "readyz turned 503 while the request was still in flight"
    );
    let ready = get(&format!("{admin}/readyz")).await;
    assert!(ready.body.contains("draining"), "{}", ready.body);
    // No new connections are taken.
    let refused = match TcpStream::connect(bin.data).await {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            let mut buf = [0u8; 64];
            matches!(
                tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
    };
    assert!(refused, "a draining router takes no new connection");
    let (reply, took) = slow.await.expect("join");
    assert_eq!(reply.status, 200, "the in-flight request finished");
    let code = bin.wait(Duration::from_secs(15)).await;
    eprintln!("drain: readyz 503 after {to_503:?}; slow request 200 after {took:?}; exit {code:?}");
    assert_eq!(code, Some(0), "clean exit; log:\n{}", bin.log());
}

/// Reads until EOF or `within`; what was read, and whether the peer closed.
async fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (out, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_cut_off_while_others_are_served() {
    let a = Backend::start("a1", 1).await;
    let r = TestRouter::start(&config(
        &[endpoint(&a, "r1", "r1a")],
        "",
        "header_read_timeout = \"500ms\"",
    ))
    .await;
    r.wait_all_healthy().await;
    let load = Load::start(r.url("/"), 8);
    let addr = r.addr;
    let mut slow = Vec::new();
    for i in 0..24 {
        slow.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            if i % 3 == 0 {
                // Silent: connects and sends nothing.
                let (_, closed) = read_to_close(&mut s, Duration::from_secs(10)).await;
                return (closed, started.elapsed());
            }
            // Slowloris: a header line every 100 ms, never the blank line.
            let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(b"X-Slow: yes\r\n").await.is_err() {
                    break;
                }
                let mut buf = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(1), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return (true, started.elapsed()),
                    _ => {}
                }
            }
            let (_, closed) = read_to_close(&mut s, Duration::from_secs(2)).await;
            (closed, started.elapsed())
        }));
    }
    let mut times = Vec::new();
    for h in slow {
        let (closed, took) = h.await.expect("join");
        assert!(closed, "a slow client was cut off");
        times.push(took);
    }
    let results = load.finish().await;
    let m = metrics(&format!("http://{}", r.admin)).await;
    times.sort();
    eprintln!(
        "slow headers: 24 clients cut after {:?}..{:?}; {} normal requests meanwhile",
        times[0],
        times[times.len() - 1],
        results.len()
    );
    assert!(
        times[0] >= Duration::from_millis(450),
        "not before the timeout"
    );
    assert!(
        times[times.len() - 1] < Duration::from_secs(5),
        "cut near the timeout"
    );
    assert_eq!(results.iter().filter(|x| x.1 != 200).count(), 0);
    assert!(results.len() > 50);
    assert!(
        metric(
            &m,
            "edge_router_errors_total",
            &[("kind", "header_timeout")]
        ) >= 24.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed_and_busy_ones_are_not() {
    let a = Backend::start("a1", 1).await;
    a.ctl.stall_ms.store(2500, Ordering::SeqCst);
    let r = TestRouter::start(&config(
        &[endpoint(&a, "r1", "r1a")],
        "",
        "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"",
    ))
    .await;
    r.wait_all_healthy().await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    // HTTP/1.1: idle longer than the header timeout but shorter than the idle timeout, the
    // connection stays; idle past the idle timeout, it is closed.
    let mut s = TcpStream::connect(r.addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.write_all(req).await.expect("write after 1.5 s idle");
    let n = s.read(&mut buf).await.expect("read");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "kept alive past the header timeout: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    let idle_from = Instant::now();
    let (_, closed) = read_to_close(&mut s, Duration::from_secs(8)).await;
    let idle_for = idle_from.elapsed();
    eprintln!("idle HTTP/1.1 connection closed after {idle_for:?} (idle_timeout 2 s)");
    assert!(closed, "idle connection closed");
    assert!(idle_for >= Duration::from_millis(1900), "{idle_for:?}");

    // A request that takes longer than the idle timeout is not cut.
    let slow = get(&r.url("/stall")).await;
    assert_eq!(slow.status, 200);

    // HTTP/2 (prior knowledge): an idle connection gets GOAWAY and closes.
    let stream = TcpStream::connect(r.addr).await.expect("connect");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let resp = send
        .send_request(
            Request::get(r.url("/"))
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await
        .expect("h2 request");
    assert_eq!(resp.status(), 200);
    let _ = resp.into_body().collect().await;
    let h2_idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(8), conn).await;
    eprintln!(
        "idle HTTP/2 connection closed after {:?}",
        h2_idle.elapsed()
    );
    assert!(ended.is_ok(), "idle h2 connection closed by the router");
    assert!(h2_idle.elapsed() >= Duration::from_millis(1900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_garbage_gets_400_or_a_close() {
    let a = Backend::start("a1", 1).await;
    let r = TestRouter::start(&config(&[endpoint(&a, "r1", "r1a")], "", "")).await;
    r.wait_all_healthy().await;
    let load = Load::start(r.url("/"), 8);

    // 100 KiB in one header (default limit 64 KiB).
    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend_from_slice(&vec![b'a'; 100 * 1024]);
    big.extend_from_slice(b"\r\n\r\n");
    // 100 KiB in many headers.
    let mut many = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..3000 {
        many.extend_from_slice(format!("X-H{i}: {:026}\r\n", i).as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert!(many.len() > 100 * 1024);
    for (what, payload) in [("one big header", big), ("many headers", many)] {
        let s = TcpStream::connect(r.addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&payload).await;
            wr
        });
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
        let _ = writer.await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 431"),
            "{what}: expected 431, got {:?}",
            &text[..text.len().min(200)]
        );
    }

    for garbage in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n"[..],
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(r.addr).await.expect("connect");
        let _ = s.write_all(garbage).await;
        let (out, closed) = read_to_close(&mut s, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(closed, "connection closed after {garbage:?}");
        assert!(
            out.is_empty() || text.starts_with("HTTP/1.1 400"),
            "400 or a close for {garbage:?}, got {text:?}"
        );
    }
    // Others were served meanwhile, and still are.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let results = load.finish().await;
    assert_eq!(results.iter().filter(|x| x.1 != 200).count(), 0);
    assert!(results.len() > 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_when_the_drain_times_out() {
    sigterm_with_a_stuck_request(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_sigterm_exits_zero_when_the_drain_times_out() {
    sigterm_with_a_stuck_request(&["--workers", "2", "--thread-per-core"]).await;
}

async fn sigterm_with_a_stuck_request(args: &[&str]) {
    let a = Backend::start("a1", 1).await;
    a.ctl.stall_ms.store(20_000, Ordering::SeqCst);
    let mut bin =
        Binary::start_args(&[endpoint(&a, "r1", "r1a")], "drain_timeout = \"1s\"", args).await;
    let url = format!("http://{}/stall", bin.data);
    let stuck = tokio::spawn(async move {
        let req = Request::get(url.as_str())
            .body(Full::new(Bytes::new()))
            .expect("req");
        tokio::time::timeout(Duration::from_secs(15), client().request(req)).await
    });
    wait_until(
        "stuck request reached the backend",
        Duration::from_secs(5),
        || async { a.ctl.hits() >= 1 },
    )
    .await;
    bin.signal("-TERM");
    let signalled = Instant::now();
    let code = bin.wait(Duration::from_secs(10)).await;
    let took = signalled.elapsed();
    eprintln!("drain timeout 1 s: exited {code:?} after {took:?}");
    assert_eq!(code, Some(0), "log:\n{}", bin.log());
    assert!(took >= Duration::from_millis(900), "waited for the drain");
    assert!(
        took < Duration::from_secs(5),
        "did not wait for the request"
    );
    let r = stuck.await.expect("join");
    assert!(
        matches!(r, Ok(Err(_))),
        "the request outliving the drain was cut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_closes_extra_connections_and_recovers() {
    let a = Backend::start("a1", 1).await;
    let r = TestRouter::start(&config(
        &[endpoint(&a, "r1", "r1a")],
        "",
        "max_connections = 4",
    ))
    .await;
    r.wait_all_healthy().await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(r.addr).await.expect("connect");
        s.write_all(req).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // A fifth is closed at once, without an answer.
    let mut extra = TcpStream::connect(r.addr).await.expect("connect");
    let _ = extra.write_all(req).await;
    let (out, closed) = read_to_close(&mut extra, Duration::from_secs(3)).await;
    assert!(closed && out.is_empty(), "over the limit: closed");
    // One slot freed: served again.
    drop(held.pop());
    wait_until("a slot is free again", Duration::from_secs(5), || async {
        let Ok(mut s) = TcpStream::connect(r.addr).await else {
            return false;
        };
        let _ = s.write_all(req).await;
        let (out, _) = read_to_close(&mut s, Duration::from_millis(300)).await;
        out.starts_with(b"HTTP/1.1 200")
    })
    .await;
    let m = metrics(&format!("http://{}", r.admin)).await;
    assert!(
        metric(
            &m,
            "edge_router_errors_total",
            &[("kind", "too_many_connections")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_requests_per_endpoint_sends_the_excess_to_the_next_zone() {
    let a = Backend::start("a1", 1).await;
    let b = Backend::start("b1", 10).await;
    a.ctl.stall_ms.store(1500, Ordering::SeqCst);
    b.ctl.stall_ms.store(1500, Ordering::SeqCst);
    let r = TestRouter::start(&config(
        &[endpoint(&a, "r1", "r1a"), endpoint(&b, "r1", "r1b")],
        "max_requests_per_endpoint = 3",
        "",
    ))
    .await;
    r.wait_all_healthy().await;
    // One at a time, each only once the previous one is in flight or answered: the cap is
    // checked when the endpoint is picked, so requests picked in the same instant may pass it.
    let mut calls = Vec::new();
    for _ in 0..8 {
        let before = a.ctl.hits() + b.ctl.hits();
        let url = r.url("/stall");
        let call = tokio::spawn(async move { get(&url).await });
        wait_until(
            "request in flight or answered",
            Duration::from_secs(5),
            || async { a.ctl.hits() + b.ctl.hits() > before || call.is_finished() },
        )
        .await;
        calls.push(call);
    }
    let mut zones = std::collections::HashMap::new();
    for c in calls {
        let reply = c.await.expect("join");
        *zones
            .entry(format!("{} {}", reply.status, reply.zone()))
            .or_insert(0) += 1;
    }
    eprintln!("8 concurrent slow requests, at most 3 per endpoint: {zones:?}");
    assert_eq!(zones.get("200 r1a"), Some(&3), "{zones:?}");
    assert_eq!(zones.get("200 r1b"), Some(&3), "{zones:?}");
    assert_eq!(zones.get("503 "), Some(&2), "{zones:?}");
}

/// Names of the threads of process `pid`.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("/proc/PID/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

/// Sends one GET on a new connection; the connection, for reading the answer later.
async fn raw_get(addr: SocketAddr, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_sigterm_drains_every_thread_then_exits_zero() {
    let a = Backend::start("a1", 1).await;
    a.ctl.stall_ms.store(2500, Ordering::SeqCst);
    let mut bin = Binary::start_args(
        &[endpoint(&a, "r1", "r1a")],
        "drain_timeout = \"15s\"\nidle_timeout = \"60s\"",
        &["--workers", "2", "--thread-per-core"],
    )
    .await;
    let names = thread_names(bin.child.id());
    let data: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("edge-data-"))
        .collect();
    assert_eq!(data, ["edge-data-0", "edge-data-1"], "threads: {names:?}");
    // 16 slow requests on 16 connections: SO_REUSEPORT hashes each connection to one of the
    // two listeners, so both threads hold some (all on one: probability 2^-15).
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let addr = bin.data;
            tokio::spawn(async move {
                let mut s = raw_get(addr, "/stall").await;
                read_to_close(&mut s, Duration::from_secs(20)).await
            })
        })
        .collect();
    wait_until(
        "all slow requests reached the backend",
        Duration::from_secs(10),
        || async { a.ctl.hits() >= 16 },
    )
    .await;
    bin.signal("-TERM");
    let admin = format!("http://{}", bin.admin);
    wait_until(
        "readyz 503 while draining",
        Duration::from_secs(2),
        || async { get(&format!("{admin}/readyz")).await.status == 503 },
    )
    .await;
    assert!(
        slow.iter().all(|h| !h.is_finished()),
        "the requests were still in flight"
    );
    // Neither listener takes a new connection: a few tries land on both sockets.
    for _ in 0..8 {
        let refused = match TcpStream::connect(bin.data).await {
            Err(_) => true,
            Ok(mut s) => {
                let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let mut buf = [0u8; 64];
                matches!(
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await,
                    Ok(Ok(0)) | Ok(Err(_))
                )
            }
        };
        assert!(refused, "a draining router takes no new connection");
    }
    for h in slow {
        let (out, closed) = h.await.expect("join");
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "every in-flight request finished: {:?}; log:\n{}",
            String::from_utf8_lossy(&out),
            bin.log()
        );
        assert!(closed, "the drained connection was closed");
    }
    let code = bin.wait(Duration::from_secs(15)).await;
    assert_eq!(code, Some(0), "clean exit; log:\n{}", bin.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_max_connections_is_one_limit_for_all_threads() {
    let a = Backend::start("a1", 1).await;
    let bin = Binary::start_args(
        &[endpoint(&a, "r1", "r1a")],
        "max_connections = 4",
        &["--workers", "2", "--thread-per-core"],
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = raw_get(bin.data, "/").await;
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(s);
    }
    // With a limit per listener (4 each) some of these would be served.
    for i in 0..6 {
        let mut extra = raw_get(bin.data, "/").await;
        let (out, closed) = read_to_close(&mut extra, Duration::from_secs(3)).await;
        assert!(closed && out.is_empty(), "extra connection {i}: closed");
    }
    drop(held.pop());
    wait_until("a slot is free again", Duration::from_secs(5), || async {
        let mut s = raw_get(bin.data, "/").await;
        let (out, _) = read_to_close(&mut s, Duration::from_millis(300)).await;
        out.starts_with(b"HTTP/1.1 200")
    })
    .await;
    let m = metrics(&format!("http://{}", bin.admin)).await;
    assert!(
        metric(
            &m,
            "edge_router_errors_total",
            &[("kind", "too_many_connections")]
        ) >= 6.0
    );
}

/// A second `--thread-per-core` router on the same address must fail as a plain one does,
/// not join the first one's SO_REUSEPORT sockets and take part of its traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thread_per_core_second_router_on_the_same_address_is_refused() {
    let a = Backend::start("a1", 1).await;
    let mut first = Binary::start_args(
        &[endpoint(&a, "r1", "r1a")],
        "",
        &["--workers", "2", "--thread-per-core"],
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin: SocketAddr = ([127, 0, 0, 1], free_port().await).into();
    let text = std::fs::read_to_string(&first.config)
        .expect("config")
        .replacen(&first.admin.to_string(), &admin.to_string(), 1);
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).expect("write config");
    let err_path = dir.path().join("stderr");
    let mut second = Command::new(env!("CARGO_BIN_EXE_edge-router"))
        .args(["run", "--config"])
        .arg(&path)
        .args(["--workers", "2", "--thread-per-core"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn the second router");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = second.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() > deadline {
            // It runs: it joined the first router's sockets. Stop it before failing.
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = status.unwrap_or_else(|| panic!("the second router kept running: {stderr}"));
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("listener.address") && stderr.contains("in use"),
        "stderr: {stderr}"
    );
    // The first one still serves every request.
    for _ in 0..20 {
        assert_eq!(get(&format!("http://{}/", first.data)).await.status, 200);
    }
    first.signal("-TERM");
    assert_eq!(first.wait(Duration::from_secs(15)).await, Some(0));
}
