//! Connection life: stale pooled connections, clients leaving, 100-continue, upstream down,
//! timers, body boundaries, pipelining, engine selection, drain, many connections.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::support::*;

// Stale pooled connections.

async fn upstream_closing_after_each_response_never_surfaces_as_502(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| match q.target.as_str() {
            "/silent" => Action::ReplyClose(echo_reply(q)),
            "/announced" => Action::ReplyClose(ok(b"bye", "Connection: close\r\n")),
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    for i in 0..20 {
        c.send(get("/silent")).await;
        let resp = c.read(false).await;
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, "/silent"),
            "request {i}: {:?}",
            resp.headers
        );
    }
    let conns: std::collections::BTreeSet<u64> = up.seen().iter().map(|q| q.conn).collect();
    assert_eq!(
        conns.len(),
        20,
        "each request on a fresh upstream connection"
    );
    c.send(get("/announced")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "bye"));
    assert!(
        tokens(&resp.headers, "connection").is_empty(),
        "{:?}",
        resp.headers
    );
    c.send(get("/next")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "/next"));
    assert!(up.errors().is_empty(), "{:?}", up.errors());
}
both_engines!(upstream_closing_after_each_response_never_surfaces_as_502);

/// The stale-connection race made deterministic: the upstream keeps each connection for one
/// request and closes the next one on it unanswered, as if its idle timeout fired just as
/// the request arrived. Nothing was answered, the request is an idempotent GET without a
/// body: a proxy retries it on a fresh connection instead of answering 502.
async fn request_on_a_connection_the_upstream_just_closed_is_retried(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| {
            if q.nth >= 2 {
                Action::Drop
            } else {
                Action::Reply(echo_reply(q))
            }
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    for i in 0..10 {
        c.send(get(&format!("/r/{i}"))).await;
        let resp = c.read(false).await;
        assert_eq!(
            (resp.status, resp.text()),
            (200, format!("/r/{i}")),
            "request {i}: {:?}",
            resp.headers
        );
    }
    let dropped = up.seen().iter().filter(|q| q.nth >= 2).count();
    eprintln!("stale: {dropped} requests met a closing upstream connection and were retried");
    assert!(
        dropped > 0,
        "the race was never hit: the test proves nothing"
    );
}
both_engines!(request_on_a_connection_the_upstream_just_closed_is_retried);

// Client gone mid-response.

async fn client_leaving_mid_response_releases_the_request(engine: Engine) {
    let chunk = 16 * 1024;
    let max = 4096; // 64 MiB at most, trickled
    let (up, r) = setup(
        engine,
        move |q| match q.target.as_str() {
            "/slow" => Action::Trickle {
                head: format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", chunk * max)
                    .into_bytes(),
                chunk,
                pause: Duration::from_millis(5),
                max,
            },
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/slow")).await;
    let got = tokio::time::timeout(IO, async {
        while c.rd.buf.len() < 100 * 1024 {
            assert!(c.rd.fill().await, "router closed early");
        }
    })
    .await;
    assert!(got.is_ok(), "the body did not start flowing");
    wait_until(
        "request counted in flight",
        Duration::from_secs(5),
        || async { in_flight(&r).await == 1 },
    )
    .await;
    drop(c);
    wait_until("in_flight back to 0", Duration::from_secs(10), || async {
        in_flight(&r).await == 0
    })
    .await;
    wait_until(
        "upstream connection closed by the router",
        Duration::from_secs(10),
        || async { up.st.aborted.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/still")).await;
    assert_eq!(c.read(false).await.text(), "/still");
}
both_engines!(client_leaving_mid_response_releases_the_request);

// Expect: 100-continue.

async fn expect_100_continue_gets_the_interim_and_the_body_through(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| Action::Reply(ok(q.body.len().to_string().as_bytes(), "")),
        "",
    )
    .await;
    let body = pattern(50_000, 11);
    let mut c = Conn::open(r.dial()).await;
    c.send(format!(
        "POST /expect HTTP/1.1\r\nHost: test.local\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ))
    .await;
    let interim = c.read(false).await;
    assert_eq!(interim.status, 100, "{:?}", interim.headers);
    c.send(&body).await;
    let mut interims = 1;
    let resp = loop {
        let r = c.read(false).await;
        if r.status >= 200 {
            break r;
        }
        interims += 1;
    };
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "50000");
    assert!(up.last().body == body, "body differs at the upstream");
    eprintln!(
        "100-continue: {interims} interim response(s) to the client; upstream saw expect={:?}",
        up.last().header("expect")
    );
    c.send(get("/after")).await;
    assert_eq!(c.read(false).await.status, 200);
}
both_engines!(expect_100_continue_gets_the_interim_and_the_body_through);

// Upstream down.

async fn post_to_a_refusing_upstream_gets_502_promptly(engine: Engine) {
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr")
    };
    let r = engine.router(dead, "").await;
    let body = pattern(64 * 1024, 13);
    let c = Conn::open(r.dial()).await;
    let Conn { mut rd, mut wr, .. } = c;
    let writer = tokio::spawn(async move {
        let head = format!(
            "POST /post HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let _ = wr.write_all(head.as_bytes()).await;
        let _ = wr.write_all(&body).await;
        wr
    });
    let started = Instant::now();
    let raw = tokio::time::timeout(IO, rd.head())
        .await
        .expect("no answer: the router hangs")
        .expect("connection closed without a response");
    let h = parse_head(&raw);
    assert!(h.first.starts_with("HTTP/1.1 502"), "{}", h.first);
    assert_eq!(
        hget(&h.headers, "x-edge-error"),
        Some("upstream_connect_error")
    );
    let n: usize = hget(&h.headers, "content-length")
        .expect("error response has a Content-Length")
        .parse()
        .expect("numeric");
    let text = rd.exact(n).await.expect("error body");
    eprintln!(
        "502 after {:?}: {:?} {:?}",
        started.elapsed(),
        h.headers,
        String::from_utf8_lossy(&text)
    );
    let _ = tokio::time::timeout(IO, writer).await;
}
both_engines!(post_to_a_refusing_upstream_gets_502_promptly);

// Slow and trickled heads.

async fn trickled_heads_are_served_and_unfinished_heads_are_cut_at_the_header_timeout(
    engine: Engine,
) {
    let timeout = Duration::from_secs(2);
    let (up, r) = setup(
        engine,
        |q| Action::Reply(echo_reply(q)),
        "header_read_timeout = \"2s\"",
    )
    .await;
    let trickle = |target: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: test.local\r\nX-Pad: abcdefghij\r\n\r\n")
            .into_bytes()
    };
    // A head in 3-byte writes, 10 ms apart (about 0.2 s in all), twice on one connection:
    // the first request of a connection and a keep-alive one.
    let mut c = Conn::open(r.dial()).await;
    for target in ["/trickle/1", "/trickle/2"] {
        let started = Instant::now();
        for part in trickle(target).chunks(3) {
            c.send(part).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("{target}: head trickled in {:?}", started.elapsed());
        let resp = c.read(false).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, target));
        assert_eq!(up.last().header("x-pad"), Some("abcdefghij"));
    }

    // A head that starts and never ends: the first request of a connection...
    let started = Instant::now();
    let mut slow = Conn::open(r.dial()).await;
    slow.send("GET /never/1 HTTP/1.1\r\nHost: te").await;
    // ...and one on a keep-alive connection that already served a request.
    let mut slow2 = Conn::open(r.dial()).await;
    slow2.send(get("/before-slow")).await;
    assert_eq!(slow2.read(false).await.status, 200);
    let started2 = Instant::now();
    slow2.send("GET /never/2 HTTP/1.1\r\nHo").await;
    // Others are served meanwhile.
    let mut other = Conn::open(r.dial()).await;
    other.send(get("/meanwhile")).await;
    assert_eq!(other.read(false).await.status, 200);
    for (what, conn, since) in [
        ("first", &mut slow, started),
        ("keep-alive", &mut slow2, started2),
    ] {
        let got = read_until_closed(conn, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{what}: an unfinished head kept the connection open 15 s"));
        let took = since.elapsed();
        eprintln!(
            "{what}: unfinished head closed after {took:?}, {} bytes sent back",
            got.len()
        );
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
            "{what}: unexpected answer to an unfinished head: {:?}",
            String::from_utf8_lossy(&got)
        );
        // Not cut before its time (the timer starts at the connection's accept or at the
        // head's first byte, both after `since`).
        assert!(
            took >= timeout - Duration::from_millis(100),
            "{what}: closed after {took:?}"
        );
    }
    assert!(
        up.seen().iter().all(|q| !q.target.starts_with("/never")),
        "an unfinished head reached the upstream"
    );
    // Still serving, and the cut connections were counted.
    let mut after = Conn::open(r.dial()).await;
    after.send(get("/after")).await;
    assert_eq!(after.read(false).await.text(), "/after");
    // Counted as the connection's task ends, which may be a moment after its socket closed.
    wait_until(
        "both cut heads counted",
        Duration::from_secs(10),
        || async { metric_value(&r, "edge_router_errors_total", &["header_timeout"]).await >= 2.0 },
    )
    .await;
}
both_engines!(trickled_heads_are_served_and_unfinished_heads_are_cut_at_the_header_timeout);

// Keep-alive idle timeout.

async fn idle_keep_alive_connections_close_after_idle_timeout_busy_ones_stay(engine: Engine) {
    let (_up, r) = setup(
        engine,
        |q| Action::Reply(echo_reply(q)),
        "idle_timeout = \"1s\"",
    )
    .await;
    let mut idle = Conn::open(r.dial()).await;
    idle.send(get("/once")).await;
    assert_eq!(idle.read(false).await.text(), "/once");
    // Watched while the busy connection below is served.
    let since = Instant::now();
    let watch = tokio::spawn(async move {
        let got = read_until_closed(&mut idle, Duration::from_secs(10)).await;
        (got, since.elapsed())
    });

    // Meanwhile a busy connection: a request every 300 ms for more than 2 s.
    let mut busy = Conn::open(r.dial()).await;
    let busy_start = Instant::now();
    let mut n = 0;
    while busy_start.elapsed() < Duration::from_millis(2300) {
        n += 1;
        let target = format!("/busy/{n}");
        busy.send(get(&target)).await;
        let resp = busy.read(false).await;
        assert_eq!((resp.status, resp.text()), (200, target.clone()));
        assert!(resp.header("connection").is_none(), "{:?}", resp.headers);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // One more after the last pause: the connection is still open past 2 s.
    busy.send(get("/busy/last")).await;
    assert_eq!(busy.read(false).await.text(), "/busy/last");
    eprintln!(
        "busy connection: {} requests over {:?}",
        n + 1,
        busy_start.elapsed()
    );

    let (got, took) = watch.await.expect("join");
    let got = got.expect("an idle keep-alive connection stayed open 10 s with idle_timeout 1 s");
    eprintln!("idle connection closed {took:?} after its response");
    assert!(
        got.is_empty(),
        "bytes on an idle connection: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        took >= Duration::from_millis(500),
        "closed after {took:?}, before its idle timeout"
    );
}
both_engines!(idle_keep_alive_connections_close_after_idle_timeout_busy_ones_stay);

// Request body sizes around the native engine's in-hand limit (16 KiB).

async fn bodies_around_16k_sent_in_two_parts_arrive_exact_and_keep_the_connection(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| {
            if q.method == "POST" {
                Action::Reply(ok(q.body.len().to_string().as_bytes(), ""))
            } else {
                Action::Reply(echo_reply(q))
            }
        },
        "",
    )
    .await;
    for n in [0usize, 1, 16383, 16384, 16385, 200_000] {
        let body = pattern(n, n as u8);
        let target = format!("/size/{n}");
        let mut c = Conn::open(r.dial()).await;
        let mut first =
            format!("POST {target} HTTP/1.1\r\nHost: test.local\r\nContent-Length: {n}\r\n\r\n")
                .into_bytes();
        let split = n / 2;
        first.extend_from_slice(&body[..split]);
        c.send(&first).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if split < n {
            c.send(&body[split..]).await;
        }
        let resp = c.read(false).await;
        assert_eq!(
            (resp.status, resp.text()),
            (200, n.to_string()),
            "{n} bytes"
        );
        let q = up
            .seen()
            .into_iter()
            .find(|q| q.target == target)
            .unwrap_or_else(|| panic!("{n} bytes: the upstream saw no request"));
        assert_eq!(q.method, "POST");
        assert!(
            q.body == body,
            "{n} bytes: the body differs at the upstream ({} bytes)",
            q.body.len()
        );
        if n > 0 {
            assert_eq!(
                q.header("content-length"),
                Some(n.to_string().as_str()),
                "{n} bytes"
            );
        } else {
            assert!(
                matches!(q.header("content-length"), None | Some("0")),
                "{:?}",
                q.headers
            );
        }
        // The same connection serves the next request.
        let next = format!("/after/{n}");
        c.send(get(&next)).await;
        let resp = c.read(false).await;
        assert_eq!((resp.status, resp.text()), (200, next), "after {n} bytes");
    }
    assert!(up.errors().is_empty(), "{:?}", up.errors());
}
both_engines!(bodies_around_16k_sent_in_two_parts_arrive_exact_and_keep_the_connection);

// A 100-continue request between plain ones on one connection (on the native engine, a
// hand-off to hyper and back).

async fn get_then_expect_continue_then_get_on_one_connection_are_answered_in_order(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| {
            if q.method == "POST" {
                Action::Reply(ok(&q.body, &format!("x-path: {}\r\n", q.target)))
            } else {
                Action::Reply(echo_reply(q))
            }
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/one")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "/one"));

    let body = pattern(3000, 5);
    c.send(format!(
        "POST /two HTTP/1.1\r\nHost: test.local\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ))
    .await;
    let interim = c.read(false).await;
    assert_eq!(interim.status, 100, "{:?}", interim.headers);
    c.send(&body).await;
    let resp = loop {
        let r = c.read(false).await;
        if r.status >= 200 {
            break r;
        }
    };
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-path"), Some("/two"));
    assert!(resp.body == body, "the echoed body differs");

    c.send(get("/three")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "/three"));

    let seen: Vec<(String, usize)> = up
        .seen()
        .iter()
        .map(|q| (q.target.clone(), q.body.len()))
        .collect();
    assert_eq!(
        seen,
        [
            ("/one".to_string(), 0),
            ("/two".to_string(), 3000),
            ("/three".to_string(), 0)
        ]
    );
    assert!(up.last().body.is_empty());
}
both_engines!(get_then_expect_continue_then_get_on_one_connection_are_answered_in_order);

// Pipelined POSTs.

async fn pipelined_posts_then_a_get_are_answered_in_order_with_their_bodies(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| Action::Reply(ok(&q.body, &format!("x-path: {}\r\n", q.target))),
        "",
    )
    .await;
    let bodies: Vec<Vec<u8>> = vec![
        b"alpha".to_vec(),
        Vec::new(),
        pattern(1000, 1),
        b"{\"k\":1}".to_vec(),
        pattern(4000, 2),
    ];
    let mut all = Vec::new();
    for (i, b) in bodies.iter().enumerate() {
        all.extend_from_slice(
            format!(
                "POST /pp/{i} HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n",
                b.len()
            )
            .as_bytes(),
        );
        all.extend_from_slice(b);
    }
    all.extend_from_slice(get("/pp/get").as_bytes());
    let mut c = Conn::open(r.dial()).await;
    c.send(&all).await;
    for (i, b) in bodies.iter().enumerate() {
        let resp = c.read(false).await;
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.header("x-path"), Some(format!("/pp/{i}").as_str()));
        assert!(resp.body == *b, "request {i}: the echoed body differs");
    }
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.header("x-path")), (200, Some("/pp/get")));
    assert!(resp.body.is_empty());

    let seen = up.seen();
    let targets: Vec<&str> = seen.iter().map(|q| q.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/pp/0", "/pp/1", "/pp/2", "/pp/3", "/pp/4", "/pp/get"]
    );
    for (i, b) in bodies.iter().enumerate() {
        assert_eq!(seen[i].method, "POST");
        assert!(
            seen[i].body == *b,
            "request {i}: the body differs at the upstream"
        );
    }
    assert_eq!(seen[5].method, "GET");
    // Still usable.
    c.send(get("/pp/last")).await;
    assert_eq!(c.read(false).await.header("x-path"), Some("/pp/last"));
}
both_engines!(pipelined_posts_then_a_get_are_answered_in_order_with_their_bodies);

// listener.http1_engine.

async fn http1_engine_serves_and_a_bogus_engine_is_refused_by_check(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| Action::Reply(ok(&q.body, &format!("x-path: {}\r\n", q.target))),
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    for i in 0..3 {
        let target = format!("/{}/{i}", engine.name());
        c.send(format!(
            "POST {target} HTTP/1.1\r\nHost: test.local\r\nX-Forwarded-For: 10.1.2.3\r\nContent-Length: 5\r\n\r\nhello"
        ))
        .await;
        let resp = c.read(false).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "hello"));
        assert_eq!(resp.header("x-path"), Some(target.as_str()));
        let q = up.last();
        assert_eq!(q.target, target);
        assert_eq!(q.header("x-forwarded-for"), Some("10.1.2.3, 127.0.0.1"));
        assert_eq!(q.header("x-forwarded-proto"), Some(engine.scheme()));
        assert_eq!(q.header("x-forwarded-host"), Some("test.local"));
        let rid = q.header("x-request-id").expect("x-request-id upstream");
        assert_eq!(resp.header("x-request-id"), Some(rid));
        assert!(resp.header("x-edge-route").is_some(), "{:?}", resp.headers);
    }

    // `edge-router check` on the same config with each engine value.
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |value: &str| {
        let path = dir.path().join(format!("{value}.toml"));
        let text = config(
            &[raw_endpoint("127.0.0.1:9".parse().expect("addr"))],
            "",
            &format!("http1_engine = \"{value}\""),
        );
        std::fs::write(&path, text).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_edge-router"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run edge-router check");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for good in ["native", "hyper"] {
        let (code, err) = check(good);
        assert_eq!(code, Some(0), "{good}: {err}");
    }
    let (code, err) = check("bogus");
    eprintln!("check with http1_engine = \"bogus\": exit {code:?}: {err}");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("listener.http1_engine"), "{err}");

    // The engine is chosen when the listener starts: a reload that changes it is taken,
    // says the change needs a restart, and the router goes on serving as before.
    let text = std::fs::read_to_string(&r.config_path).expect("config");
    let other = match engine {
        Engine::Native | Engine::NativeTls => Engine::Hyper,
        Engine::Hyper => Engine::Native,
    };
    r.rewrite_config(&text.replace(&engine.listener_line(), &other.listener_line()));
    let reply = post(&format!("http://{}/reload", r.admin)).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert!(
        reply.body.contains(&format!(
            "listener.http1_engine {} -> {} needs a restart",
            engine.name(),
            other.name()
        )),
        "{}",
        reply.body
    );
    c.send(get("/after-reload")).await;
    assert_eq!(c.read(false).await.status, 200);
}
both_engines!(http1_engine_serves_and_a_bogus_engine_is_refused_by_check);

// Drain.

/// A slow request in flight on one keep-alive connection and another keep-alive connection
/// idle when the router is told to shut down: the slow one is answered whole, with
/// `connection: close`, then closed; the idle one is closed; the drain ends.
async fn drain_finishes_the_request_in_flight_with_close_and_closes_idle_connections(
    engine: Engine,
) {
    let (up, r) = setup(
        engine,
        |q| {
            let d = if q.target == "/slow" { 1500 } else { 0 };
            Action::Delayed(Duration::from_millis(d), echo_reply(q))
        },
        "drain_timeout = \"15s\"",
    )
    .await;
    let mut busy = Conn::open(r.dial()).await;
    busy.send(get("/warm/busy")).await;
    assert_eq!(busy.read(false).await.text(), "/warm/busy");
    let mut idle = Conn::open(r.dial()).await;
    idle.send(get("/warm/idle")).await;
    assert_eq!(idle.read(false).await.text(), "/warm/idle");

    busy.send(get("/slow")).await;
    wait_until(
        "the slow request reached the upstream",
        Duration::from_secs(10),
        || async { up.seen().iter().any(|q| q.target == "/slow") },
    )
    .await;
    // TestRouter::stop: Router::shutdown (what SIGTERM does), then waits for the drain.
    let stopping = tokio::spawn(r.stop());

    let got = read_until_closed(&mut idle, Duration::from_secs(10))
        .await
        .expect("an idle keep-alive connection stayed open 10 s into the drain");
    assert!(
        got.is_empty(),
        "bytes on the idle connection: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        !stopping.is_finished(),
        "the drain ended with a request in flight"
    );
    let resp = busy.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "/slow"));
    assert!(
        tokens(&resp.headers, "connection").contains(&"close".to_string()),
        "a response finished during the drain must say connection: close: {:?}",
        resp.headers
    );
    busy.expect_closed().await;
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("the router did not finish draining")
        .expect("join");
}

both_engines!(drain_finishes_the_request_in_flight_with_close_and_closes_idle_connections);

// Many connections.

async fn three_hundred_connections_of_five_requests_all_succeed_and_in_flight_returns_to_zero(
    engine: Engine,
) {
    // An upstream with a deep accept queue: 300 connections may arrive at once.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let up = RawUpstream::start_on(
        sock.listen(4096).expect("listen"),
        Arc::new(|q: &UpReq| Action::Reply(echo_reply(q))),
    );
    let r = engine.router(up.addr, "").await;
    r.wait_all_healthy().await;
    let ok = many_connections(&r, 300, 5).await;
    eprintln!(
        "300 x 5: {ok} answered 200; upstream accepted {} connections",
        up.st.accepted.load(Ordering::SeqCst)
    );
    assert_eq!(ok, 1500, "requests answered 200 with their own target");
    assert_eq!(up.seen().len(), 1500);
    assert!(up.errors().is_empty(), "{:?}", up.errors());
    wait_until("in-flight back to 0", Duration::from_secs(10), || async {
        in_flight(&r).await == 0
    })
    .await;
}
both_engines!(three_hundred_connections_of_five_requests_all_succeed_and_in_flight_returns_to_zero);

/// The same against an upstream whose accept queue is the usual 128 (Rust std, mio, many
/// servers): a burst of upstream connects must not overrun it into connect timeouts (502).
async fn three_hundred_connections_to_an_upstream_with_a_128_backlog_all_succeed(engine: Engine) {
    let up = RawUpstream::start(Arc::new(|q: &UpReq| Action::Reply(echo_reply(q)))).await;
    let r = engine.router(up.addr, "").await;
    r.wait_all_healthy().await;
    let ok = many_connections(&r, 300, 5).await;
    eprintln!(
        "300 x 5, backlog 128: {ok} answered 200; upstream accepted {} connections",
        up.st.accepted.load(Ordering::SeqCst)
    );
    assert_eq!(ok, 1500, "requests answered 200 with their own target");
}
both_engines!(three_hundred_connections_to_an_upstream_with_a_128_backlog_all_succeed);
