//! The demo's scripted scenarios and `edge-router status`, run as the real binary on free
//! loopback ports. Times are printed, not asserted on (the machine is shared); what is
//! asserted is that each step happened, in order, and what the router did.

mod demo_proc;

use std::os::unix::process::CommandExt;
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

/// One request: (status, head, body), the head with lower-case header names.
fn raw(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn demo_admin_answers_405_with_allow_and_names_the_zones_it_has() {
    let demo = DemoProc::start(&[]);
    // A GET on a POST-only path.
    let (code, head, _) = raw(&demo.admin, "GET", "/demo/zones/us-east-1a/up");
    assert_eq!(code, 405, "{head}");
    assert!(head.contains("\r\nallow: post"), "{head}");
    let (code, head, _) = raw(&demo.admin, "GET", "/reload");
    assert_eq!(code, 405, "{head}");
    assert!(head.contains("\r\nallow: post"), "{head}");
    let (code, head, _) = raw(&demo.admin, "POST", "/routes");
    assert_eq!(code, 405, "{head}");
    assert!(head.contains("\r\nallow: get"), "{head}");
    // An unknown zone: the answer lists the real ones.
    let (code, _, body) = raw(&demo.admin, "POST", "/demo/zones/us-east-9z/down");
    assert_eq!(code, 404, "{body}");
    for z in ["us-east-1a", "us-east-1b", "ap-southeast-1a"] {
        assert!(body.contains(z), "{z} not listed: {body}");
    }
    // Undoing slow is `up`, and the answer to slow says so.
    let (code, _, body) = raw(&demo.admin, "POST", "/demo/zones/us-east-1b/slow");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("/demo/zones/us-east-1b/up undoes it"),
        "{body}"
    );
    let (code, _, body) = raw(&demo.admin, "POST", "/demo/zones/us-east-1b/up");
    assert_eq!(code, 200, "{body}");
    let (_, _, body) = raw(&demo.admin, "GET", "/demo");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let b = v["zones"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["zone"] == "us-east-1b")
        .unwrap();
    assert_eq!(b["state"], "up", "{body}");
}

#[test]
fn demo_is_quiet_by_default_and_logs_requests_with_access_log() {
    let quiet = DemoProc::start(&[]);
    let loud = DemoProc::start(&["--access-log"]);
    quiet.wait_all_healthy(Duration::from_secs(60));
    loud.wait_all_healthy(Duration::from_secs(60));
    for d in [&quiet, &loud] {
        for _ in 0..5 {
            let (code, _) = http(&d.data, "GET", "/quiet-test").unwrap();
            assert_eq!(code, 200);
        }
    }
    // Access lines are written when each response ends: wait for the loud one's.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !loud.stdout().iter().any(|l| l.contains("/quiet-test")) {
        assert!(
            std::time::Instant::now() < deadline,
            "--access-log logged no request: {:#?}",
            loud.stdout()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let noisy: Vec<String> = quiet
        .stdout()
        .into_iter()
        .filter(|l| l.contains(" INFO ") || l.contains("/quiet-test"))
        .collect();
    assert!(
        noisy.is_empty(),
        "the demo logged at INFO by default: {noisy:#?}"
    );
    // The banner is all there is.
    assert!(
        quiet.stdout().iter().any(|l| l.contains("Dashboard:")),
        "{:#?}",
        quiet.stdout()
    );
}

#[test]
fn status_draws_history_sparklines_and_watch_into_a_pipe_has_no_screen_codes() {
    let demo = DemoProc::start(&[]);
    demo.wait_all_healthy(Duration::from_secs(60));
    // Wait (bounded) for a few samples of history with traffic in them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let _ = http(&demo.data, "GET", "/spark-test");
        let (_, body) = http(&demo.admin, "GET", "/history").unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["t_ms"].as_array().is_some_and(|t| t.len() >= 3) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no history: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // stdout is a pipe here: the watch must write pictures, never cursor or clear codes.
    // `timeout` ends it with SIGTERM after 3 s, which status takes as a clean stop.
    let o = run_bounded(
        Command::new("timeout").args([
            "--preserve-status",
            "3",
            BIN,
            "status",
            "--admin",
            &demo.admin,
            "--watch",
            "--interval",
            "300ms",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let text = o.stdout;
    assert!(!text.contains('\x1b'), "escape codes into a pipe: {text:?}");
    assert!(
        text.matches("cluster demo").count() >= 2,
        "fewer than two pictures in 3 s:\n{text}"
    );
    assert!(text.contains("LAST MINUTE"), "{text}");
    // Every zone has a history line with block characters.
    let history: Vec<&str> = text
        .split("LAST MINUTE")
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take(6)
        .collect();
    for z in ["us-east-1a", "us-east-1b", "ap-southeast-1a"] {
        let line = history
            .iter()
            .find(|l| l.trim_start().starts_with(z))
            .unwrap_or_else(|| panic!("no history line for {z}:\n{text}"));
        assert!(line.contains('▁') || line.contains('█'), "{line}");
    }
}

/// The README's quick start, followed literally: its config file (ports moved to free ones,
/// since tests share the machine), its one-line sample backends, `edge-router run -c`, and
/// the first request answered 200 with `x-edge-route`.
#[test]
fn readme_quick_start_works_on_the_first_try() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let config = std::fs::read_to_string(format!("{root}/config/quickstart.toml")).unwrap();
    assert!(
        readme.contains("edge-router run -c config/quickstart.toml"),
        "the README does not run config/quickstart.toml"
    );
    // The sample backends as the README starts them.
    let line = readme
        .lines()
        .find(|l| l.contains("-m http.server 9001"))
        .expect("README: one-line sample backends");
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let ports: Vec<(u16, u16)> = [8080, 9901, 9001, 9002]
        .into_iter()
        .map(|p| (p, free()))
        .collect();
    let moved = |s: &str| {
        ports.iter().fold(s.to_string(), |s, (from, to)| {
            s.replace(&format!("{from}"), &to.to_string())
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("quickstart.toml");
    std::fs::write(&path, moved(&config)).unwrap();
    let backends = line.split('#').next().unwrap().trim();
    let mut sh = std::process::Command::new("sh")
        .args(["-c", &format!("{} wait", moved(backends))])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut router = std::process::Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let data = format!("127.0.0.1:{}", ports[0].1);
    let admin = format!("127.0.0.1:{}", ports[1].1);
    // Ready once both backends answer probes; python needs a moment to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !matches!(http(&admin, "GET", "/readyz"), Ok((200, _))) {
        assert!(std::time::Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, head, _) = raw(&data, "GET", "/");
    let _ = router.kill();
    let _ = router.wait();
    // The backends run in their own process group: stop the group.
    let _ = std::process::Command::new("kill")
        .args(["--", &format!("-{}", sh.id())])
        .status();
    let _ = sh.wait();
    assert_eq!(code, 200, "{head}");
    assert!(
        head.contains("x-edge-route: region=local; zone=local-"),
        "{head}"
    );
}
