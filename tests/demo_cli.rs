//! The demo's scripted scenarios and `edge-router status`, run as the real binary on free
//! loopback ports. Times are printed, not asserted on (the machine is shared); what is
//! asserted is that each step happened, in order, and what the router did.

mod demo_proc;

use std::process::Command;
use std::time::Duration;

use demo_proc::{closed_port, http, run_bounded, DemoProc, BIN};

/// Runs `demo --scenario NAME --exit-after` to its end; its "t=" lines.
fn scenario(name: &str) -> Vec<String> {
    let mut demo = DemoProc::start(&["--scenario", name, "--exit-after"]);
    let status = demo.wait_exit(Duration::from_secs(150));
    let lines: Vec<String> = demo
        .stdout()
        .into_iter()
        .filter(|l| l.starts_with("t="))
        .collect();
    eprintln!("{}", lines.join("\n"));
    assert!(
        status.success(),
        "demo --scenario {name} --exit-after exited {status}; stdout: {:#?}; stderr: {:#?}",
        demo.stdout(),
        demo.err.lock().unwrap()
    );
    lines
}

/// The index of the first line containing `what`, after line `after`.
fn find(lines: &[String], after: usize, what: &str) -> usize {
    lines
        .iter()
        .enumerate()
        .skip(after)
        .find(|(_, l)| l.contains(what))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no line with {what:?} after line {after}: {lines:#?}"))
}

/// The scenario clock of a line: "t= 5.01s  ..." -> 5.01.
fn clock(line: &str) -> f64 {
    line.trim_start_matches("t=")
        .trim_start()
        .split('s')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no clock in {line:?}"))
}

#[test]
fn failover_scenario_moves_traffic_and_brings_it_back() {
    let l = scenario("failover");
    let flowing = find(&l, 0, "every request answered by us-east-1a");
    let down = find(&l, flowing, "zone us-east-1a DOWN");
    let moved = find(&l, down, "traffic moved to us-east-1b in");
    let out = find(&l, moved, "router took us-east-1a out (0/2 healthy)");
    let up = find(&l, out, "zone us-east-1a UP again");
    let back = find(&l, up, "traffic returned to us-east-1a in");
    let all = find(&l, back, "all traffic in us-east-1a again");
    let done = find(&l, all, "scenario failover done");
    let t: Vec<f64> = [down, moved, out, up, back, all, done]
        .iter()
        .map(|i| clock(&l[*i]))
        .collect();
    assert!(
        t.windows(2).all(|w| w[0] <= w[1]),
        "story out of order: {l:#?}"
    );
    assert!(l[out].contains("us-east-1b 100%"), "{}", l[out]);
}

#[test]
fn latency_scenario_reranks_the_slow_zone() {
    let l = scenario("latency");
    let slow = find(&l, 0, "zone us-east-1a SLOW");
    let re = find(&l, slow, "router re-ranked");
    let moved = find(&l, re, "traffic moved to us-east-1b in");
    let up = find(&l, moved, "zone us-east-1a UP again");
    let back = find(&l, up, "traffic returned to us-east-1a in");
    find(&l, back, "scenario latency done");
    assert!(
        l[re].contains("us-east-1b (") && l[re].contains("ahead of us-east-1a ("),
        "{}",
        l[re]
    );
}

#[test]
fn spillover_scenario_splits_traffic_by_healthy_share() {
    let l = scenario("spillover");
    let down = find(&l, 0, "in us-east-1a DOWN: the zone keeps 1 of 2");
    let table = find(
        &l,
        down,
        "router: us-east-1a has 1/2 healthy, so it keeps 70%",
    );
    assert!(
        l[table].contains("us-east-1b 30% (spillover)"),
        "{}",
        l[table]
    );
    let measured = find(&l, table, "measured over");
    // "measured over 3.0 s: us-east-1a 71% (91), us-east-1b 29% (38)"
    let share = |zone: &str| -> f64 {
        let s = &l[measured];
        let at = s
            .find(&format!("{zone} "))
            .unwrap_or_else(|| panic!("{zone} missing in {s}"));
        s[at + zone.len() + 1..]
            .split('%')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (a, b) = (share("us-east-1a"), share("us-east-1b"));
    // The table says 70/30; about 150 requests were counted.
    assert!((50.0..=88.0).contains(&a), "{}", l[measured]);
    assert!((12.0..=50.0).contains(&b), "{}", l[measured]);
    let up = find(&l, measured, "back up");
    find(&l, up, "all traffic in us-east-1a again");
    find(&l, up, "scenario spillover done");
}

#[test]
fn status_prints_the_routing_picture_and_sees_a_zone_go_down() {
    let demo = DemoProc::start(&[]);
    demo.wait_all_healthy(Duration::from_secs(60));
    // Some traffic, so the request counters move.
    for _ in 0..20 {
        let (code, _) = http(&demo.data, "GET", "/status-test").unwrap();
        assert_eq!(code, 200);
    }
    let o = run_bounded(
        Command::new(BIN).args(["status", "--admin", &demo.admin]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
    let text = o.stdout;
    eprintln!("{text}");
    assert!(text.contains("cluster demo"), "{text}");
    assert!(text.contains("10/10 endpoints healthy"), "{text}");
    assert!(text.contains("serving from us-east-1a"), "{text}");
    // Zones nearest first: the local zone leads, the farthest comes last.
    let pos = |z: &str| {
        text.find(z)
            .unwrap_or_else(|| panic!("{z} missing:\n{text}"))
    };
    for z in ["us-east-1b", "us-west-2a", "eu-west-1a", "eu-west-1b"] {
        assert!(pos("us-east-1a local") < pos(z), "{text}");
        assert!(pos(z) < pos("ap-southeast-1a"), "{text}");
    }
    let endpoint_lines = text.lines().filter(|l| l.trim_start().starts_with("● "));
    assert_eq!(
        endpoint_lines.filter(|l| l.contains(" healthy ")).count(),
        10,
        "{text}"
    );
    assert!(text.contains("100% nearest"), "{text}");
    assert!(text.contains("Events (newest first)"), "{text}");

    let (code, body) = http(&demo.admin, "POST", "/demo/zones/us-east-1a/down").unwrap();
    assert_eq!(code, 200, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The router notices through probes (every 500 ms) and real traffic.
        let _ = http(&demo.data, "GET", "/status-test");
        let o = run_bounded(
            Command::new(BIN).args(["status", "--admin", &demo.admin, "--interval", "200ms"]),
            Duration::from_secs(30),
        );
        assert_eq!(o.code, Some(0), "{}\n{}", o.stdout, o.stderr);
        if o.stdout.contains("serving from us-east-1b") && o.stdout.contains("0/2") {
            assert!(o.stdout.contains("8/10 endpoints healthy"), "{}", o.stdout);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status never showed us-east-1a down:\n{}",
            o.stdout
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn status_without_a_router_fails_with_one_line() {
    let addr = format!("127.0.0.1:{}", closed_port());
    let o = run_bounded(
        Command::new(BIN).args(["status", "--admin", &addr]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "{}\n{}", o.stdout, o.stderr);
    assert!(o.stdout.is_empty(), "{}", o.stdout);
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", o.stderr);
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(&addr),
        "{}",
        lines[0]
    );

    let o = run_bounded(
        Command::new(BIN).args(["status", "--watch", "--admin", &addr]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(1), "--watch too: {}\n{}", o.stdout, o.stderr);

    let o = run_bounded(
        Command::new(BIN).args(["status", "--admin", "no-port"]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(2), "{}\n{}", o.stdout, o.stderr);
}
