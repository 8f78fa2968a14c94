//! Observability over real sockets: a Prometheus scrape of a router that served traffic in
//! two zones and failed one over (checked against what the clients saw, by promtool and by
//! deploy/check-metrics.sh), and the access log of the real binary in JSON.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

// ---------------------------------------------------------------------------------------
// A small parser of the Prometheus text format (enough for our own exposition).

struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_scrape(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample line has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((name, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = BTreeMap::new();
                // Our label values hold no quotes or commas.
                for kv in body.split("\",").filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once("=\"").expect("label k=\"v\"");
                    labels.insert(k.to_string(), v.trim_end_matches('"').to_string());
                }
                (name.to_string(), labels)
            }
        };
        out.push(Sample {
            name,
            labels,
            value,
        });
    }
    out
}

/// Samples of `name` whose labels include every pair of `want`.
fn matching<'a>(s: &'a [Sample], name: &str, want: &[(&str, &str)]) -> Vec<&'a Sample> {
    s.iter()
        .filter(|x| {
            x.name == name
                && want
                    .iter()
                    .all(|(k, v)| x.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .collect()
}

/// The one sample of `name` with these labels; panics when absent or ambiguous.
fn value(s: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    let m = matching(s, name, want);
    assert_eq!(
        m.len(),
        1,
        "expected exactly one {name}{want:?} in the scrape, found {}",
        m.len()
    );
    m[0].value
}

fn sum(s: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    matching(s, name, want).iter().map(|x| x.value).sum()
}

/// Every family of SPEC's table and of docs/metrics.md (process_* from the crate's
/// process collector, registered on Linux).
const FAMILIES: [&str; 31] = [
    "edge_router_requests_total",
    "edge_router_request_duration_seconds",
    "edge_router_upstream_healthy",
    "edge_router_upstream_latency_seconds",
    "edge_router_health_checks_total",
    "edge_router_retries_total",
    "edge_router_ejections_total",
    "edge_router_routing_table_generation",
    "edge_router_config_reloads_total",
    "edge_router_connections_active",
    "edge_router_build_info",
    "edge_router_route_decisions_total",
    "edge_router_errors_total",
    "edge_router_probe_duration_seconds",
    "edge_router_upstream_connect_errors_total",
    "edge_router_upstream_in_flight",
    "edge_router_connections_accepted_total",
    "edge_router_request_bytes_total",
    "edge_router_response_bytes_total",
    "edge_router_routing_table_swaps_total",
    "edge_router_routing_table_age_seconds",
    "edge_router_zone_share",
    "edge_router_retry_budget_exhausted_total",
    "edge_router_hedges_total",
    "edge_router_dns_resolutions_total",
    "edge_router_config_last_reload_success_timestamp_seconds",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_start_time_seconds",
    "process_virtual_memory_bytes",
];

async fn scrape(r: &TestRouter) -> (String, Vec<Sample>) {
    let reply = get(&r.admin_url("/metrics")).await;
    assert_eq!(reply.status, 200);
    let ct = reply.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "Prometheus text format content type, got {ct:?}"
    );
    let samples = parse_scrape(&reply.body);
    (reply.body, samples)
}

/// Two zones of cluster "api" (r1a near, r1b 15 ms away) and a cluster "named" with a DNS
/// endpoint, which gives edge_router_dns_resolutions_total its series.
fn two_zone_config(b: &[Backend]) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
route_header = true

[admin]
address = "127.0.0.1:0"

[locality]
region = "r1"
zone = "r1a"

[[cluster]]
name = "api"

[cluster.health_check]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 2
unhealthy_threshold = 2
{}{}{}{}
[[cluster]]
name = "named"

[cluster.health_check]
path = "/healthz"
interval = "1s"
timeout = "500ms"

[[cluster.endpoint]]
address = "localhost:{}"
region = "r1"
zone = "r1b"

[[route]]
host = "named.test"
path_prefix = "/"
cluster = "named"

[[route]]
path_prefix = "/"
cluster = "api"
"#,
        endpoint(&b[0], "r1", "r1a"),
        endpoint(&b[1], "r1", "r1a"),
        endpoint(&b[2], "r1", "r1b"),
        endpoint(&b[3], "r1", "r1b"),
        b[2].addr.port()
    )
}

/// What the clients saw, to hold the scrape against.
#[derive(Default, Debug)]
struct Seen {
    /// (zone, status) -> replies.
    by_zone: HashMap<(String, u16), u64>,
    /// reason of x-edge-route -> 200 replies.
    by_reason: HashMap<String, u64>,
    response_bytes: u64,
    request_bytes: u64,
    other: Vec<u16>,
}

impl Seen {
    fn record(&mut self, r: &Reply) {
        if r.status == 200 {
            *self.by_zone.entry((r.zone(), 200)).or_default() += 1;
            *self.by_reason.entry(r.reason()).or_default() += 1;
            self.response_bytes += r.body.len() as u64;
        } else {
            self.other.push(r.status);
        }
    }

    fn ok(&self, zone: &str) -> u64 {
        self.by_zone
            .get(&(zone.to_string(), 200))
            .copied()
            .unwrap_or(0)
    }
}

async fn get_recorded(
    c: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
    url: &str,
    seen: &mut Seen,
) -> Reply {
    let r = send(
        c,
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await;
    seen.record(&r);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_after_traffic_and_failover_holds_every_family_and_passes_promtool() {
    let b = vec![
        Backend::start("a1", 1).await,
        Backend::start("a2", 1).await,
        Backend::start("b1", 15).await,
        Backend::start("b2", 15).await,
    ];
    let r = TestRouter::start(&two_zone_config(&b)).await;
    let addr = |i: usize| b[i].addr.to_string();
    wait_until(
        "the four endpoints of api healthy with a latency",
        Duration::from_secs(10),
        || async {
            let routes = r.routes().await;
            let api = routes["clusters"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == "api").cloned())
                .unwrap_or_default();
            api["endpoints"]
                .as_array()
                .map(|es| {
                    es.iter()
                        .filter(|e| e["healthy"] == true && e["latency_ms"].is_number())
                        .count()
                })
                .unwrap_or(0)
                == 4
        },
    )
    .await;

    let c = client();
    let mut seen = Seen::default();
    // Zone r1a serves: plain GETs, a large streamed body, POSTs with bodies.
    for _ in 0..40 {
        get_recorded(&c, &r.url("/hello"), &mut seen).await;
    }
    get_recorded(&c, &r.url("/bytes/300000"), &mut seen).await;
    for i in 0..5 {
        let body = vec![b'p'; 1000 + i * 100];
        seen.request_bytes += body.len() as u64;
        let reply = send(
            &c,
            Request::post(r.url("/echo"))
                .body(Full::new(Bytes::from(body)))
                .expect("req"),
        )
        .await;
        seen.record(&reply);
    }
    assert_eq!(
        seen.ok("r1a"),
        46,
        "r1a, the nearest zone, served: {seen:?}"
    );

    // Zone r1a dies: traffic fails over to r1b.
    b[0].kill();
    b[1].kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get_recorded(&c, &r.url("/hello"), &mut seen).await;
        if reply.zone() == "r1b" && reply.reason() == "failover" {
            break;
        }
        assert!(Instant::now() < deadline, "no failover to r1b: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..40 {
        get_recorded(&c, &r.url("/hello"), &mut seen).await;
    }
    assert!(seen.ok("r1b") >= 40, "{seen:?}");
    // A request caught between the kill and the failover is retried in r1b; should the
    // retry budget run dry it ends in a 502, which the scrape must count too.
    assert!(
        seen.other.iter().all(|s| *s == 502),
        "only 200s and 502s: {seen:?}"
    );

    // The probes have marked r1a down, and every response body has been counted (the
    // byte counter moves when a body ends, just after the client has read it).
    wait_until(
        "r1a unhealthy and all response bytes counted",
        Duration::from_secs(10),
        || async {
            let (_, s) = scrape(&r).await;
            let down = |i: usize| {
                matching(
                    &s,
                    "edge_router_upstream_healthy",
                    &[("cluster", "api"), ("endpoint", &addr(i))],
                )
                .first()
                .map(|x| x.value)
                    == Some(0.0)
            };
            down(0)
                && down(1)
                && sum(
                    &s,
                    "edge_router_response_bytes_total",
                    &[("cluster", "api")],
                ) == seen.response_bytes as f64
        },
    )
    .await;

    let gen_before = r.routes().await["generation"].as_u64().expect("generation");
    let (text, s) = scrape(&r).await;
    let gen_after = r.routes().await["generation"].as_u64().expect("generation");
    eprintln!("{seen:?}");

    // Every family is there.
    for f in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {f} ")),
            "family {f} missing from the scrape:\n{text}"
        );
    }

    // Requests per zone, exactly as the clients saw them.
    let api = ("cluster", "api");
    for zone in ["r1a", "r1b"] {
        let z = ("zone", zone);
        assert_eq!(
            value(
                &s,
                "edge_router_requests_total",
                &[api, ("region", "r1"), z, ("code", "200")]
            ),
            seen.ok(zone) as f64,
            "requests_total of {zone}"
        );
        // The latency histogram of the zone: one observation per answered request,
        // cumulative buckets from 0.25 ms to about 30 s.
        let answered = sum(&s, "edge_router_requests_total", &[api, z]);
        let count = value(&s, "edge_router_request_duration_seconds_count", &[api, z]);
        assert_eq!(count, answered, "histogram count of {zone}");
        assert!(value(&s, "edge_router_request_duration_seconds_sum", &[api, z]) > 0.0);
        let mut buckets: Vec<(f64, f64)> =
            matching(&s, "edge_router_request_duration_seconds_bucket", &[api, z])
                .iter()
                .map(|x| {
                    let le = &x.labels["le"];
                    let le = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().expect("le")
                    };
                    (le, x.value)
                })
                .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(
            (buckets[0].0 - 0.00025).abs() < 1e-12,
            "first bucket 0.25 ms"
        );
        let last = buckets[buckets.len() - 2].0;
        assert!(
            (30.0..=35.0).contains(&last),
            "last bucket ~30 s, got {last}"
        );
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "cumulative");
        assert_eq!(buckets.last().map(|x| x.1), Some(count), "+Inf = count");
    }
    // r1b is 15 ms away: none of its requests fits the 1 ms bucket.
    assert_eq!(
        value(
            &s,
            "edge_router_request_duration_seconds_bucket",
            &[api, ("zone", "r1b"), ("le", "0.001")]
        ),
        0.0
    );

    // Health and latency of every endpoint; the failover in upstream_healthy.
    for (i, zone, healthy) in [
        (0, "r1a", 0.0),
        (1, "r1a", 0.0),
        (2, "r1b", 1.0),
        (3, "r1b", 1.0),
    ] {
        let ep = [
            api,
            ("region", "r1"),
            ("zone", zone),
            ("endpoint", &addr(i)),
        ];
        assert_eq!(
            value(&s, "edge_router_upstream_healthy", &ep),
            healthy,
            "upstream_healthy of {}",
            addr(i)
        );
        let lat = value(&s, "edge_router_upstream_latency_seconds", &ep);
        assert!(lat > 0.0, "latency of {} is {lat}", addr(i));
        if zone == "r1b" {
            assert!(lat >= 0.010, "r1b answers in >= 15 ms, gauge says {lat}");
        }
        let e = [api, ("endpoint", &addr(i))];
        assert!(value(&s, "edge_router_probe_duration_seconds_count", &e) >= 1.0);
        assert!(
            value(
                &s,
                "edge_router_health_checks_total",
                &[api, ("endpoint", &addr(i)), ("result", "success")]
            ) >= 1.0
        );
        value(&s, "edge_router_upstream_in_flight", &e);
        value(&s, "edge_router_ejections_total", &e);
        value(&s, "edge_router_upstream_connect_errors_total", &e);
    }
    for i in [0, 1] {
        assert!(
            value(
                &s,
                "edge_router_health_checks_total",
                &[api, ("endpoint", &addr(i)), ("result", "failure")]
            ) >= 2.0,
            "unhealthy_threshold failed probes of {}",
            addr(i)
        );
    }
    // The table gives r1b everything now.
    assert_eq!(
        value(&s, "edge_router_zone_share", &[api, ("zone", "r1b")]),
        1.0
    );
    assert_eq!(
        value(&s, "edge_router_zone_share", &[api, ("zone", "r1a")]),
        0.0
    );

    // Why requests went where they went, as the x-edge-route headers said.
    for reason in ["nearest", "failover", "retry", "spillover"] {
        let n = seen.by_reason.get(reason).copied().unwrap_or(0) as f64;
        assert_eq!(
            value(
                &s,
                "edge_router_route_decisions_total",
                &[api, ("reason", reason)]
            ),
            n,
            "route decisions {reason}"
        );
    }
    assert!(seen.by_reason.get("failover").copied().unwrap_or(0) >= 40);
    let retried = seen.by_reason.get("retry").copied().unwrap_or(0) as f64;
    assert!(value(&s, "edge_router_retries_total", &[api]) >= retried);
    // (A retry follows a connect error or a reset of a pooled connection to the killed
    // backends; only the first is counted per endpoint, so no equation ties them.)
    assert_eq!(
        sum(&s, "edge_router_errors_total", &[api]),
        seen.other.len() as f64,
        "every 502 the clients saw is in errors_total"
    );
    assert_eq!(
        sum(&s, "edge_router_requests_total", &[api, ("code", "502")]),
        seen.other.len() as f64
    );
    value(
        &s,
        "edge_router_errors_total",
        &[("cluster", ""), ("kind", "no_route")],
    );

    // Bytes both ways.
    assert_eq!(
        value(&s, "edge_router_request_bytes_total", &[api]),
        seen.request_bytes as f64
    );
    assert!(seen.response_bytes > 300_000);

    // The table: generation as /routes says, swaps, age.
    let generation = value(&s, "edge_router_routing_table_generation", &[]);
    assert!(
        (gen_before as f64..=gen_after as f64).contains(&generation) && generation >= 2.0,
        "generation {generation}, /routes said {gen_before}..{gen_after}"
    );
    assert!(value(&s, "edge_router_routing_table_swaps_total", &[]) >= 2.0);
    assert!(value(&s, "edge_router_routing_table_age_seconds", &[]) >= 0.0);

    // Process-wide.
    assert!(value(&s, "edge_router_connections_accepted_total", &[]) >= 1.0);
    assert!(value(&s, "edge_router_connections_active", &[]) >= 0.0);
    assert_eq!(
        value(
            &s,
            "edge_router_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "edge_router_config_reloads_total",
            &[("result", "success")]
        ),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "edge_router_config_reloads_total",
            &[("result", "failure")]
        ),
        0.0
    );
    assert!(
        value(
            &s,
            "edge_router_config_last_reload_success_timestamp_seconds",
            &[]
        ) > 1.5e9
    );
    value(
        &s,
        "edge_router_dns_resolutions_total",
        &[("name", "localhost"), ("result", "success")],
    );
    assert!(value(&s, "process_resident_memory_bytes", &[]) > 0.0);

    // Labels come from config and our own words only: nothing the clients sent.
    assert!(!text.contains("/hello") && !text.contains("/echo"));

    // promtool and the deploy check on this very scrape.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("scrape.prom");
    std::fs::write(&file, &text).expect("write scrape");
    promtool_check_metrics(&text);
    deploy_check_metrics(&file);

    // A router without DNS-named endpoints has no DNS family: a pass, with a note.
    let without = |family: &str| -> String {
        text.lines()
            .filter(|l| !l.contains(family))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    std::fs::write(&file, without("edge_router_dns_resolutions_total")).expect("write scrape");
    let (ok, report) = run_check_metrics(&file);
    assert!(ok, "a scrape without DNS-named endpoints failed:\n{report}");
    assert!(
        report.contains("note: edge_router_dns_resolutions_total is not in"),
        "{report}"
    );
    // A family every router has is still required.
    std::fs::write(&file, without("edge_router_requests_total")).expect("write scrape");
    let (ok, report) = run_check_metrics(&file);
    assert!(!ok, "a scrape without requests_total passed:\n{report}");
    assert!(report.contains("edge_router_requests_total"), "{report}");
}

/// `promtool check metrics` on a scrape; fails (never skips) when promtool is missing.
fn promtool_check_metrics(text: &str) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is needed to check the scrape and could not be run ({e}); install it \
             with `apt-get install prometheus` (Debian), as .ci/run does"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool ran");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics: {:?}\n{report}",
        out.status
    );
}

/// deploy/check-metrics.sh on a scrape file: (passed, its output).
fn run_check_metrics(file: &Path) -> (bool, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/check-metrics.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(file)
        .output()
        .expect("run bash deploy/check-metrics.sh");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// deploy/check-metrics.sh: every family the alert rules and the dashboard use is there.
fn deploy_check_metrics(file: &Path) {
    let (ok, report) = run_check_metrics(file);
    eprintln!("{report}");
    assert!(ok, "check-metrics.sh failed:\n{report}");
}

// ---------------------------------------------------------------------------------------
// The access log of the real binary.

/// The binary running with `--log-format json`, its stdout read line by line.
struct Binary {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<serde_json::Value>,
}

impl Binary {
    fn start(config: &Path) -> Binary {
        Binary::start_via(Command::new(env!("CARGO_BIN_EXE_edge-router")), config)
    }

    /// [`Binary::start`] with `cmd` as the program: the binary itself, or a launcher in
    /// front of it (taskset).
    fn start_via(mut cmd: Command, config: &Path) -> Binary {
        let mut child = cmd
            .args(["--log-format", "json", "run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start edge-router");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads stdout until a JSON line satisfies `pred`; every line must be JSON.
    async fn wait_line(
        &mut self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {line}"));
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => {
                    assert!(
                        Instant::now() < deadline,
                        "timed out waiting for a log line: {what}; saw {:#?}",
                        self.seen
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(mpsc::TryRecvError::Disconnected) => {
                    panic!(
                        "edge-router exited before logging {what}; saw {:#?}",
                        self.seen
                    )
                }
            }
        }
    }

    fn stop(mut self) {
        self.terminate();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig}");
    }

    /// SIGTERM, then waits up to 10 s for the exit; `None` when it had to be killed.
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn access_config(b: &Backend, listener_extra: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
{listener_extra}

[admin]
address = "127.0.0.1:0"

[locality]
region = "r1"
zone = "r1a"

[[cluster]]
name = "api"

[cluster.health_check]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
{}
[[route]]
host = "api.example.test"
path_prefix = "/"
cluster = "api"
"#,
        endpoint(b, "r1", "r1a")
    )
}

fn field<'a>(v: &'a serde_json::Value, k: &str) -> &'a serde_json::Value {
    &v[k]
}

/// Starts the binary on `toml`, waits for its "serving" line and readiness; returns it with
/// its data and admin addresses.
async fn start_binary(dir: &Path, toml: &str) -> (Binary, SocketAddr, SocketAddr) {
    let path = dir.join("edge-router.toml");
    std::fs::write(&path, toml).expect("write config");
    let mut bin = Binary::start(&path);
    let serving = bin
        .wait_line("the serving line", |v| {
            v["message"].as_str().is_some_and(|m| m.contains("serving"))
        })
        .await;
    let data: SocketAddr = serving["listener"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("listener address in {serving}"));
    let admin: SocketAddr = serving["admin"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("admin address in {serving}"));
    wait_until("router ready", Duration::from_secs(10), || async {
        get(&format!("http://{admin}/readyz")).await.status == 200
    })
    .await;
    (bin, data, admin)
}

async fn request(data: SocketAddr, host: &str, path: &str, id: &str) -> Reply {
    send(
        &client(),
        Request::get(format!("http://{data}{path}"))
            .header("host", host)
            .header("x-request-id", id)
            .body(Full::new(Bytes::new()))
            .expect("req"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_json_fields_of_the_real_binary() {
    let backend = Backend::start("a1", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bin, data, _admin) = start_binary(dir.path(), &access_config(&backend, "")).await;

    let reply = request(
        data,
        "API.Example.Test:8080",
        "/hello/world?q=1",
        "obs-req-1",
    )
    .await;
    assert_eq!(reply.status, 200);
    let ev = bin
        .wait_line("the access event of obs-req-1", |v| {
            v["target"] == "access" && v["request_id"] == "obs-req-1"
        })
        .await;
    assert_eq!(field(&ev, "level"), "INFO");
    assert_eq!(field(&ev, "method"), "GET");
    assert_eq!(field(&ev, "host"), "api.example.test");
    assert_eq!(field(&ev, "path"), "/hello/world");
    assert_eq!(field(&ev, "status"), 200);
    assert!(
        field(&ev, "duration_ms").as_f64().is_some_and(|d| d > 0.0),
        "{ev}"
    );
    assert_eq!(field(&ev, "bytes"), reply.body.len() as u64);
    assert_eq!(field(&ev, "complete"), true);
    assert_eq!(field(&ev, "cluster"), "api");
    assert_eq!(field(&ev, "region"), "r1");
    assert_eq!(field(&ev, "zone"), "r1a");
    assert_eq!(field(&ev, "endpoint"), backend.addr.to_string().as_str());
    assert_eq!(field(&ev, "reason"), "nearest");
    assert!(field(&ev, "client")
        .as_str()
        .is_some_and(|c| c.starts_with("127.0.0.1:")));
    assert!(ev.get("error").is_none(), "no error field on a proxied 200");

    // A response the router makes itself is logged too, with its x-edge-error kind.
    let reply = request(data, "elsewhere.test", "/x", "obs-req-2").await;
    assert_eq!(reply.status, 404);
    let ev = bin
        .wait_line("the access event of obs-req-2", |v| {
            v["target"] == "access" && v["request_id"] == "obs-req-2"
        })
        .await;
    assert_eq!(field(&ev, "status"), 404);
    assert_eq!(field(&ev, "error"), "no_route");
    assert_eq!(field(&ev, "host"), "elsewhere.test");
    assert_eq!(field(&ev, "bytes"), reply.body.len() as u64);
    assert!(ev.get("cluster").is_none() && ev.get("endpoint").is_none());
    bin.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_false_silences_the_access_log() {
    let backend = Backend::start("a1", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut bin, data, admin) =
        start_binary(dir.path(), &access_config(&backend, "access_log = false")).await;

    let mut body_bytes = 0;
    for i in 0..3 {
        let reply = request(data, "api.example.test", "/hello", &format!("quiet-{i}")).await;
        assert_eq!(reply.status, 200);
        body_bytes += reply.body.len();
    }
    let reply = request(data, "elsewhere.test", "/x", "quiet-404").await;
    assert_eq!(reply.status, 404);
    // Every response has finished (its bytes are counted where the access event would be
    // written) ...
    wait_until(
        "response bytes counted",
        Duration::from_secs(10),
        || async {
            let m = get(&format!("http://{admin}/metrics")).await;
            let s = parse_scrape(&m.body);
            sum(
                &s,
                "edge_router_response_bytes_total",
                &[("cluster", "api")],
            ) == body_bytes as f64
        },
    )
    .await;
    // ... and a later event (a reload) has reached stdout, behind anything logged before.
    let r = post(&format!("http://{admin}/reload")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    bin.wait_line("the reload event", |v| v["target"] == "reload")
        .await;
    let access: Vec<_> = bin
        .seen
        .iter()
        .filter(|v| v["target"] == "access")
        .collect();
    assert!(access.is_empty(), "access_log = false, yet: {access:#?}");
    assert!(bin.seen.len() >= 2, "other logs still flow");
    bin.stop();
}

// ---------------------------------------------------------------------------------------
// History, server-side rates and event severity.

/// The newest non-null value of one zone's series in a /history answer.
fn newest(h: &serde_json::Value, zone: &str, series: &str) -> Option<f64> {
    h["clusters"][0]["zones"]
        .as_array()?
        .iter()
        .find(|z| z["zone"] == zone)?[series]
        .as_array()?
        .iter()
        .rev()
        .find_map(|v| v.as_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_rates_and_event_severity_come_from_the_router() {
    let a = Backend::start("a", 1).await;
    let b = Backend::start("b", 1).await;
    let r = TestRouter::start(&config(
        &[endpoint(&a, "r1", "r1a"), endpoint(&b, "r1", "r1b")],
        "",
        "",
    ))
    .await;
    r.wait_all_healthy().await;
    // Steady traffic (bounded): the router's own counters turn into rates once a second.
    let url = r.url("/h");
    let load = tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(90);
        while Instant::now() < end {
            let _ = get(&url).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    wait_until(
        "r1a serving with a rate in /history",
        Duration::from_secs(20),
        || async {
            let h = get(&r.admin_url("/history")).await;
            let h: serde_json::Value = serde_json::from_str(&h.body).unwrap_or_default();
            newest(&h, "r1a", "rps").is_some_and(|v| v > 1.0)
                && newest(&h, "r1a", "served_share").is_some_and(|v| v > 0.9)
                && newest(&h, "r1a", "latency_ms").is_some()
        },
    )
    .await;
    // /routes carries the same rates, measured by the router.
    let routes = r.routes().await;
    let c = &routes["clusters"][0];
    let zone_rps = c["zones"][0]["rps"].as_f64().expect("zone rps");
    assert!(zone_rps > 1.0, "{routes}");
    assert!(
        routes["rps"].as_f64().is_some_and(|v| v >= zone_rps - 1e-9),
        "{routes}"
    );
    let ep = c["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["address"] == a.addr.to_string())
        .unwrap();
    assert!(ep["rps"].as_f64().is_some_and(|v| v > 1.0), "{ep}");

    // `since` returns only newer samples.
    let h = get(&r.admin_url("/history")).await;
    let h: serde_json::Value = serde_json::from_str(&h.body).unwrap();
    let t = h["t_ms"].as_array().unwrap();
    let last = t[t.len() - 1].as_u64().unwrap();
    let newer = get(&r.admin_url(&format!("/history?since={last}"))).await;
    let newer: serde_json::Value = serde_json::from_str(&newer.body).unwrap();
    assert!(newer["t_ms"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v.as_u64().unwrap() > last));
    assert_eq!(get(&r.admin_url("/history?since=x")).await.status, 400);

    // r1a fails, traffic moves to r1b: the share and the errors show in the history,
    // and the health flips carry their severity.
    a.ctl.set_mode(Mode::Reset);
    a.ctl
        .health_status
        .store(503, std::sync::atomic::Ordering::SeqCst);
    wait_until(
        "r1b serving everything",
        Duration::from_secs(20),
        || async {
            let h = get(&r.admin_url("/history")).await;
            let h: serde_json::Value = serde_json::from_str(&h.body).unwrap_or_default();
            newest(&h, "r1b", "served_share").is_some_and(|v| v > 0.9)
        },
    )
    .await;
    a.ctl.set_mode(Mode::Ok);
    a.ctl
        .health_status
        .store(200, std::sync::atomic::Ordering::SeqCst);
    wait_until("r1a healthy again", Duration::from_secs(20), || async {
        let e = get(&r.admin_url("/events")).await;
        e.body.contains("unhealthy -> healthy")
    })
    .await;
    load.abort();
    let e = get(&r.admin_url("/events")).await;
    let e: serde_json::Value = serde_json::from_str(&e.body).unwrap();
    let severity_of = |needle: &str| -> Vec<String> {
        e["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
            .map(|v| v["severity"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let down = severity_of("healthy -> unhealthy");
    let back = severity_of("unhealthy -> healthy");
    assert!(!down.is_empty() && down.iter().all(|s| s == "error"), "{e}");
    assert!(!back.is_empty() && back.iter().all(|s| s == "ok"), "{e}");
    assert!(
        severity_of("started with").iter().all(|s| s == "info"),
        "{e}"
    );
}

#[test]
fn deploy_check_help_prints_its_usage_and_nothing_else() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/check.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("--help")
        .output()
        .expect("run bash deploy/check.sh --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.starts_with("CI check of everything in deploy/."),
        "{text}"
    );
    assert!(text.contains("deploy/check.sh --scrape FILE"), "{text}");
    // Usage text only: no comment markers, no line of the script itself.
    assert!(!text.lines().any(|l| l.starts_with('#')), "{text}");
    assert!(!text.contains("set -uo pipefail"), "{text}");
}

/// The complete JSON lines of an access-log file; panics on a partial or non-JSON line.
fn access_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "partial last line: {text}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

async fn wait_for_lines(path: &Path, n: usize) {
    let what = format!("{n} access lines in {}", path.display());
    wait_until(&what, Duration::from_secs(10), || async {
        access_lines(path).len() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_file_rotated_on_sigusr1_and_sighup_and_flushed_at_exit() {
    let backend = Backend::start("a1", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let extra = format!("access_log_path = {:?}", log.display().to_string());
    let (mut bin, data, admin) = start_binary(dir.path(), &access_config(&backend, &extra)).await;

    for i in 0..5 {
        let r = request(data, "api.example.test", "/a", &format!("file-{i}")).await;
        assert_eq!(r.status, 200);
    }
    // Swept within a second without anything else happening.
    wait_for_lines(&log, 5).await;
    let lines = access_lines(&log);
    assert_eq!(lines.len(), 5);
    assert!(lines
        .iter()
        .all(|v| v["target"] == "access" && v["status"] == 200 && v["cluster"] == "api"));
    assert!(
        bin.seen.iter().all(|v| v["target"] != "access"),
        "access lines went to stdout too"
    );

    // logrotate: rename, then signal; lines after the signal go to a new file.
    for (n, sig) in [(1, "-USR1"), (2, "-HUP")] {
        let rotated = dir.path().join(format!("access.log.{n}"));
        std::fs::rename(&log, &rotated).expect("rename");
        bin.signal(sig);
        let id = format!("after-{sig}");
        wait_until(
            "a line in the reopened file",
            Duration::from_secs(10),
            || {
                let id = id.clone();
                let log = log.clone();
                async move {
                    let r = request(data, "api.example.test", "/b", &id).await;
                    assert_eq!(r.status, 200);
                    // Give the writer its sweep before asking again.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    access_lines(&log)
                        .iter()
                        .any(|v| v["request_id"] == id.as_str())
                }
            },
        )
        .await;
    }
    let m = get(&format!("http://{admin}/metrics")).await;
    let scrape = parse_scrape(&m.body);
    assert_eq!(
        sum(&scrape, "edge_router_access_log_dropped_total", &[]),
        0.0
    );
    assert!(m.body.contains("edge_router_access_log_dropped_total"));

    // A burst and at once SIGTERM: lines still in the threads' buffers are written at exit.
    let before: usize = (1..=2)
        .map(|n| access_lines(&dir.path().join(format!("access.log.{n}"))).len())
        .sum::<usize>()
        + access_lines(&log).len();
    for i in 0..20 {
        let r = request(data, "api.example.test", "/c", &format!("last-{i}")).await;
        assert_eq!(r.status, 200);
    }
    let status = bin.terminate().expect("exits after SIGTERM");
    assert!(status.success(), "{status}");
    let mut total = access_lines(&log);
    for n in 1..=2 {
        total.extend(access_lines(&dir.path().join(format!("access.log.{n}"))));
    }
    assert_eq!(total.len(), before + 20, "lines lost at exit");
    for i in 0..20 {
        let id = format!("last-{i}");
        assert!(total.iter().any(|v| v["request_id"] == id.as_str()), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_usable_cpu_picks_the_current_thread_runtime() {
    let taskset = ["/usr/bin/taskset", "/bin/taskset"]
        .into_iter()
        .find(|p| Path::new(p).exists());
    let Some(taskset) = taskset else {
        eprintln!("skipped: taskset (util-linux) is not installed");
        return;
    };
    let backend = Backend::start("a1", 0).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edge-router.toml");
    std::fs::write(&path, access_config(&backend, "")).expect("write config");
    let mut cmd = Command::new(taskset);
    cmd.args(["-c", "0", env!("CARGO_BIN_EXE_edge-router")]);
    let mut bin = Binary::start_via(cmd, &path);
    let line = bin
        .wait_line("the runtime choice", |v| {
            v["message"].as_str().is_some_and(|m| m.contains("runtime"))
        })
        .await;
    let m = line["message"].as_str().unwrap_or_default();
    assert!(
        m.starts_with("current-thread runtime") && m.contains("only one CPU"),
        "{line}"
    );
    // And it serves.
    let serving = bin
        .wait_line("the serving line", |v| {
            v["message"].as_str().is_some_and(|m| m.contains("serving"))
        })
        .await;
    let data: SocketAddr = serving["listener"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("listener address in {serving}"));
    wait_until("served on one CPU", Duration::from_secs(10), || async {
        request(data, "api.example.test", "/", "one-cpu")
            .await
            .status
            == 200
    })
    .await;
    bin.stop();
}

/// Every request gets exactly one access-log line, on either HTTP/1.1 engine: those served
/// before SIGTERM over kept-alive connections, and those still in flight when the drain began
/// (they finish, and their lines are written before the process exits).
async fn access_lines_match_requests_across_a_drain(engine: &str) {
    let backend = Backend::start("a1", 0).await;
    backend
        .ctl
        .stall_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let extra = format!(
        "http1_engine = {engine:?}\naccess_log_path = {:?}",
        log.display().to_string()
    );
    let (mut bin, data, _admin) = start_binary(dir.path(), &access_config(&backend, &extra)).await;
    let c = client();
    let send_one = |path: &'static str, id: String| {
        let c = c.clone();
        tokio::spawn(async move {
            let r = send(
                &c,
                Request::get(format!("http://{data}{path}"))
                    .header("host", "api.example.test")
                    .header("x-request-id", id.as_str())
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            )
            .await;
            (id, r.status)
        })
    };
    let mut ids = Vec::new();
    // Served before the drain, 8 at a time over the client's pooled connections.
    for round in 0..5 {
        let batch: Vec<_> = (0..8)
            .map(|i| send_one("/a", format!("{engine}-served-{round}-{i}")))
            .collect();
        for t in batch {
            let (id, status) = t.await.expect("request task");
            assert_eq!(status, 200, "{id}");
            ids.push(id);
        }
    }
    // In flight when the drain begins: the backend holds each for 400 ms.
    let hits = backend.ctl.hits();
    let stalled: Vec<_> = (0..6)
        .map(|i| send_one("/stall", format!("{engine}-draining-{i}")))
        .collect();
    wait_until(
        "the stalled requests at the backend",
        Duration::from_secs(10),
        || async { backend.ctl.hits() >= hits + 6 },
    )
    .await;
    bin.signal("-TERM");
    for t in stalled {
        let (id, status) = t.await.expect("request task");
        assert_eq!(status, 200, "{id} was cut by the drain");
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Ok(Some(s)) = bin.child.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after the drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    let lines = access_lines(&log);
    assert_eq!(lines.len(), ids.len(), "one line per request");
    for id in &ids {
        let n = lines
            .iter()
            .filter(|v| v["request_id"] == id.as_str())
            .count();
        assert_eq!(n, 1, "lines of {id}");
    }
    assert!(lines
        .iter()
        .all(|v| v["status"] == 200 && v["complete"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_match_requests_across_a_drain_native_engine() {
    access_lines_match_requests_across_a_drain("native").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_lines_match_requests_across_a_drain_hyper_engine() {
    access_lines_match_requests_across_a_drain("hyper").await;
}
