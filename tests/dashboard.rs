//! The dashboard in a real browser: the `edge-router demo` binary runs on free loopback ports,
//! and tests/browser/dashboard_check.py loads its admin page in headless chromium and checks
//! the rendered page (after its script ran). These tests FAIL when python3 or chromium is
//! missing: .ci/run installs Debian's `chromium`.

mod demo_proc;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use demo_proc::{http, run_bounded, DemoProc, Output};

const CHECK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/browser/dashboard_check.py"
);

fn check(args: &[&str]) -> Output {
    let mut cmd = Command::new("python3");
    cmd.arg(CHECK).args(args);
    run_bounded(&mut cmd, Duration::from_secs(240))
}

fn must_pass(what: &str, args: &[&str]) -> Output {
    let o = check(args);
    assert_eq!(
        o.code,
        Some(0),
        "{what}: dashboard_check.py {args:?} exited {:?}{}\nstdout: {}\nstderr: {}",
        o.code,
        if o.code == Some(2) {
            " (2: bad usage, or chromium is missing or cannot run; install Debian's chromium as .ci/run does)"
        } else {
            ""
        },
        o.stdout,
        o.stderr
    );
    o
}

/// (region, zone, endpoints) of every demo zone, from the demo's own description.
fn demo_zones(demo: &DemoProc) -> Vec<(String, String, usize)> {
    let (code, body) = http(&demo.admin, "GET", "/demo").expect("GET /demo");
    assert_eq!(code, 200, "GET /demo: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from /demo");
    v["zones"]
        .as_array()
        .expect("zones")
        .iter()
        .map(|z| {
            (
                z["region"].as_str().unwrap().to_string(),
                z["zone"].as_str().unwrap().to_string(),
                z["endpoints"].as_array().unwrap().len(),
            )
        })
        .collect()
}

#[test]
fn dashboard_lists_regions_zones_endpoints_and_shows_a_zone_going_down() {
    let demo = DemoProc::start(&[]);
    demo.wait_all_healthy(Duration::from_secs(60));
    let url = demo.url();
    let zones = demo_zones(&demo);
    assert!(zones.len() >= 2, "the demo has several zones: {zones:?}");
    let total: usize = zones.iter().map(|z| z.2).sum();
    let total_s = total.to_string();
    let regions: BTreeSet<&str> = zones.iter().map(|z| z.0.as_str()).collect();

    // Every region, zone and endpoint is on the page, each with a health state.
    let mut args = vec![
        "expect",
        url.as_str(),
        "--cluster",
        "demo",
        "--endpoints",
        total_s.as_str(),
        "--min-healthy",
        "1",
        "--wait",
        "30",
    ];
    for r in &regions {
        args.extend(["--region", r]);
    }
    for z in &zones {
        args.extend(["--zone", z.1.as_str()]);
    }
    let o = must_pass("all zones shown", &args);
    eprintln!("{}", o.stdout);

    // Each zone shows exactly its own endpoints, all healthy.
    let counts: BTreeSet<usize> = zones.iter().map(|z| z.2).collect();
    for n in counts {
        let n_s = n.to_string();
        let mut args = vec![
            "expect",
            url.as_str(),
            "--cluster",
            "demo",
            "--zone-endpoints",
            n_s.as_str(),
            "--min-healthy",
            n_s.as_str(),
            "--wait",
            "30",
        ];
        for z in zones.iter().filter(|z| z.2 == n) {
            args.extend(["--zone", z.1.as_str()]);
        }
        must_pass("endpoints per zone", &args);
    }

    // The check is able to fail: a healthy zone is not reported as down.
    let zone = "us-east-1a";
    let o = check(&[
        "expect-down",
        &url,
        "--zone",
        zone,
        "--cluster",
        "demo",
        "--wait",
        "0",
    ]);
    assert_eq!(
        o.code,
        Some(1),
        "a healthy zone must not pass expect-down: {} {}",
        o.stdout,
        o.stderr
    );

    // Take the zone down through the admin API: the page shows it down.
    let (code, body) = http(&demo.admin, "POST", &format!("/demo/zones/{zone}/down")).unwrap();
    assert_eq!(code, 200, "{body}");
    let o = must_pass(
        "zone down shown",
        &[
            "expect-down",
            &url,
            "--zone",
            zone,
            "--cluster",
            "demo",
            "--wait",
            "40",
        ],
    );
    eprintln!("{}", o.stdout);

    // And back up again.
    let (code, body) = http(&demo.admin, "POST", &format!("/demo/zones/{zone}/up")).unwrap();
    assert_eq!(code, 200, "{body}");
    must_pass(
        "zone back shown",
        &[
            "expect",
            &url,
            "--cluster",
            "demo",
            "--zone",
            zone,
            "--min-healthy",
            "2",
            "--wait",
            "40",
        ],
    );
}

#[test]
fn dashboard_tells_the_story_of_a_running_scenario() {
    let demo = DemoProc::start(&["--scenario", "failover"]);
    // Wait (bounded) until the scenario took the zone down and the router reacted.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !demo
        .stdout()
        .iter()
        .any(|l| l.contains("router took us-east-1a out"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the scenario did not get to the failover within 90 s: {:#?}",
            demo.stdout()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = demo.url();
    let o = must_pass("dump", &["dump", &url]);
    let dom = o.stdout;
    for want in [
        "Scenario: failover",
        "zone us-east-1a DOWN",
        "traffic moved to us-east-1b in",
        "router took us-east-1a out",
    ] {
        assert!(
            dom.contains(want),
            "the rendered dashboard does not show {want:?}"
        );
    }
    // The story panel is visible, and the zone is shown down with its demo chip.
    assert!(
        dom.contains(r#"<section id="story" class="panel story" aria-label="Demo scenario">"#),
        "the story panel is hidden"
    );
    assert!(
        dom.contains(r#"<span class="chip demo-down" title="demo fault injected">down</span>"#),
        "the downed zone has no 'down' chip"
    );
}

/// Steady traffic to the demo's data plane (about 20 requests a second) until dropped, and
/// in any case for no longer than three minutes.
struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(data: &str) -> Traffic {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (s, data) = (stop.clone(), data.to_string());
        let thread = std::thread::spawn(move || {
            let end = std::time::Instant::now() + Duration::from_secs(180);
            while !s.load(Ordering::Relaxed) && std::time::Instant::now() < end {
                let _ = http(&data, "GET", "/chart-test");
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        Traffic {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Polls GET /history until `ok` holds for the last sample of `zone` (bounded).
fn wait_history(demo: &DemoProc, what: &str, ok: impl Fn(&serde_json::Value) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http(&demo.admin, "GET", "/history").expect("GET /history");
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON from /history");
        if ok(&v) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not seen in /history within 60 s: {body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The newest value of a zone's series in a /history answer.
fn last_of(v: &serde_json::Value, zone: &str, series: &str) -> Option<f64> {
    v["clusters"][0]["zones"]
        .as_array()?
        .iter()
        .find(|z| z["zone"] == zone)?[series]
        .as_array()?
        .iter()
        .rev()
        .find_map(|x| x.as_f64())
}

const CHART_PROBE: &str = r#"(() => {
  const series = (chart, zone) => {
    const p = document.querySelector(`svg.chart[data-chart="${chart}"] path[data-zone="${zone}"]`);
    return p ? {min: +p.dataset.min, max: +p.dataset.max, last: +p.dataset.last} : null;
  };
  const marks = {};
  document.querySelectorAll('svg.chart[data-chart="latency"] .ev-mark-g').forEach(g => {
    marks[g.dataset.severity] = (marks[g.dataset.severity] || 0) + 1;
  });
  const events = Array.from(document.querySelectorAll('#events li.ev')).map(li => ({
    cls: li.className, text: li.querySelector('.body').textContent }));
  return {
    latency_a: series('latency', 'us-east-1a'), share_a: series('share', 'us-east-1a'),
    share_b: series('share', 'us-east-1b'), marks, events,
    total_rps: document.getElementById('total-rps').textContent,
  };
})()"#;

const NARROW_PROBE: &str = r#"(() => {
  const row = document.querySelector('.zone[data-zone="us-east-1a"] .zone-row');
  const cell = sel => {
    const el = row && row.querySelector(sel);
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return {display: getComputedStyle(el).display, width: r.width, right: r.right};
  };
  return {viewport: window.innerWidth, health: cell('.c-hl'), share: cell('.c-share'),
          scroll: document.documentElement.scrollWidth};
})()"#;

fn eval(url: &str, expr: &str, size: &str) -> serde_json::Value {
    let o = must_pass(
        "eval",
        &["eval", url, expr, "--size", size, "--settle", "4"],
    );
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {}", o.stdout))
}

#[test]
fn charts_show_a_zone_slowing_then_failing_and_events_carry_the_servers_severity() {
    let demo = DemoProc::start(&[]);
    demo.wait_all_healthy(Duration::from_secs(60));
    let traffic = Traffic::start(&demo.data);
    wait_history(&demo, "traffic served by us-east-1a", |v| {
        last_of(v, "us-east-1a", "served_share").is_some_and(|s| s > 0.9)
    });
    // A latency step: the zone gets +150 ms.
    let (code, body) = http(&demo.admin, "POST", "/demo/zones/us-east-1a/slow").unwrap();
    assert_eq!(code, 200, "{body}");
    wait_history(&demo, "us-east-1a slower than 100 ms", |v| {
        last_of(v, "us-east-1a", "latency_ms").is_some_and(|l| l > 100.0)
    });
    // A failure: traffic moves to us-east-1b.
    let (code, body) = http(&demo.admin, "POST", "/demo/zones/us-east-1a/down").unwrap();
    assert_eq!(code, 200, "{body}");
    wait_history(&demo, "us-east-1b serving everything", |v| {
        last_of(v, "us-east-1b", "served_share").is_some_and(|s| s > 0.9)
            && last_of(v, "us-east-1a", "healthy") == Some(0.0)
    });
    // And back: the recovery must read as good news.
    let (code, body) = http(&demo.admin, "POST", "/demo/zones/us-east-1a/up").unwrap();
    assert_eq!(code, 200, "{body}");
    demo.wait_all_healthy(Duration::from_secs(60));

    let url = demo.url();
    let v = eval(&url, CHART_PROBE, "1400,1000");
    eprintln!("{v:#}");
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    let lat = &v["latency_a"];
    assert!(
        f(&lat["min"]) < 50.0 && f(&lat["max"]) > 100.0,
        "no latency step: {lat}"
    );
    let (sa, sb) = (&v["share_a"], &v["share_b"]);
    assert!(
        f(&sa["max"]) > 0.9 && f(&sa["min"]) < 0.1,
        "us-east-1a share did not change: {sa}"
    );
    assert!(
        f(&sb["max"]) > 0.9,
        "us-east-1b never took the traffic: {sb}"
    );
    assert!(
        f(&v["marks"]["error"]) >= 1.0,
        "no error marked on the time axis: {}",
        v["marks"]
    );
    assert!(
        f(&v["marks"]["ok"]) >= 1.0,
        "no recovery marked on the time axis: {}",
        v["marks"]
    );
    assert!(
        v["total_rps"]
            .as_str()
            .is_some_and(|s| s.ends_with("req/s")),
        "{}",
        v["total_rps"]
    );
    let events = v["events"].as_array().expect("events");
    let class_of = |needle: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["text"].as_str().is_some_and(|t| t.contains(needle)))
            .map(|e| e["cls"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let down = class_of("healthy -> unhealthy");
    let back = class_of("unhealthy -> healthy");
    let slow = class_of("is slow");
    assert!(
        !down.is_empty() && down.iter().all(|c| c.contains("sev-error")),
        "{down:?}"
    );
    assert!(
        !back.is_empty() && back.iter().all(|c| c.contains("sev-ok")),
        "{back:?}"
    );
    assert!(
        !slow.is_empty() && slow.iter().all(|c| c.contains("sev-warning")),
        "{slow:?}"
    );
    drop(traffic);

    // At 700 px the zone rows keep their health and share columns, inside the window.
    let v = eval(&url, NARROW_PROBE, "700,900");
    eprintln!("{v:#}");
    for col in ["health", "share"] {
        let c = &v[col];
        assert!(
            c["display"] != "none" && f(&c["width"]) > 20.0,
            "{col} hidden at 700 px: {v}"
        );
        assert!(
            f(&c["right"]) <= f(&v["viewport"]),
            "{col} outside the window: {v}"
        );
    }
}
