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
