//! Hop-by-hop and forwarding headers, many response headers.

use crate::support::*;

// Hop-by-hop and forwarding headers.

async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| match q.target.split('?').next().unwrap_or_default() {
            "/one-line" => Action::Reply(ok(
                b"ok",
                "Connection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nProxy-Authenticate: Basic\r\nX-End: 1\r\n",
            )),
            "/two-lines" => Action::Reply(ok(
                b"ok",
                "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nConnection: x-hop\r\nX-End: 1\r\n",
            )),
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(
        "GET /one-line?a=1 HTTP/1.1\r\nHost: Example.COM:8080\r\nConnection: close, x-secret\r\n\
         X-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         TE: gzip\r\nX-Forwarded-For: 10.0.0.1\r\nX-Keep: yes\r\n\r\n",
    )
    .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    let q = up.last();
    for h in ["x-secret", "keep-alive", "proxy-authorization", "te"] {
        assert!(
            q.header(h).is_none(),
            "{h} reached the upstream: {:?}",
            q.headers
        );
    }
    let conn = tokens(&q.headers, "connection");
    assert!(
        conn.is_empty() || conn == ["keep-alive"],
        "client's Connection options reached the upstream: {conn:?}"
    );
    assert_eq!(hall(&q.headers, "host"), ["Example.COM:8080"]);
    assert_eq!(q.header("x-forwarded-for"), Some("10.0.0.1, 127.0.0.1"));
    assert_eq!(q.header("x-forwarded-proto"), Some(engine.scheme()));
    assert_eq!(q.header("x-forwarded-host"), Some("Example.COM:8080"));
    assert_eq!(q.header("x-keep"), Some("yes"));
    assert_eq!(q.target, "/one-line?a=1");
    let rid = q
        .header("x-request-id")
        .expect("x-request-id upstream")
        .to_string();
    assert!(!rid.is_empty() && rid.len() <= 128);
    assert_eq!(resp.header("x-request-id"), Some(rid.as_str()));
    for h in ["x-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            resp.header(h).is_none(),
            "{h} reached the client: {:?}",
            resp.headers
        );
    }
    assert_eq!(resp.header("x-end"), Some("1"), "{:?}", resp.headers);
    // The client asked to close: only the router's own `close` may be there, then it closes.
    let conn = tokens(&resp.headers, "connection");
    assert!(conn.is_empty() || conn == ["close"], "{conn:?}");
    c.expect_closed().await;

    // A keep-alive request: a client request id, no prior X-Forwarded-For, TE: trailers.
    let mut c = Conn::open(r.dial()).await;
    c.send(
        "GET /one-line HTTP/1.1\r\nHost: test.local\r\nX-Request-Id: abc-123\r\nTE: trailers\r\n\r\n",
    )
    .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    let q = up.last();
    assert_eq!(q.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(q.header("x-request-id"), Some("abc-123"));
    assert_eq!(
        q.header("te"),
        Some("trailers"),
        "te: trailers is end-to-end in practice"
    );
    assert_eq!(resp.header("x-request-id"), Some("abc-123"));
    for h in ["x-hop", "keep-alive", "proxy-authenticate", "connection"] {
        assert!(
            resp.header(h).is_none(),
            "{h} reached the client: {:?}",
            resp.headers
        );
    }
    assert_eq!(resp.header("x-end"), Some("1"));
    c.send(get("/again")).await;
    assert_eq!(c.read(false).await.status, 200);
}
both_engines!(hop_by_hop_headers_are_stripped_and_forwarding_headers_set);

/// `Connection` may come as several lines (RFC 9110 5.3: same as one comma-joined line);
/// every option named on any of them is hop-by-hop, both ways.
async fn connection_options_on_a_second_line_are_stripped_too(engine: Engine) {
    let (up, r) = setup(
        engine,
        |_| {
            Action::Reply(ok(
                b"ok",
                "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nConnection: x-hop\r\nX-End: 1\r\n",
            ))
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(
        "GET /x HTTP/1.1\r\nHost: test.local\r\nConnection: keep-alive\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n",
    )
    .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    let q = up.last();
    assert!(
        q.header("x-secret").is_none(),
        "x-secret reached the upstream: {:?}",
        q.headers
    );
    for h in ["x-hop", "keep-alive"] {
        assert!(
            resp.header(h).is_none(),
            "{h} reached the client: {:?}",
            resp.headers
        );
    }
    assert_eq!(resp.header("x-end"), Some("1"));
}
both_engines!(connection_options_on_a_second_line_are_stripped_too);

// Many response headers, Set-Cookie order.

async fn many_headers_and_set_cookie_lines_reach_the_client_in_order(engine: Engine) {
    let (_up, r) = setup(
        engine,
        |_| {
            let mut extra = String::new();
            for i in 0..60 {
                extra.push_str(&format!("X-H-{i}: value-{i}\r\n"));
                if i % 12 == 0 {
                    extra.push_str(&format!("Set-Cookie: c{i}=v{i}; Path=/; HttpOnly\r\n"));
                }
            }
            Action::Reply(ok(b"ok", &extra))
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/cookies")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    let want: Vec<String> = (0..60)
        .step_by(12)
        .map(|i| format!("c{i}=v{i}; Path=/; HttpOnly"))
        .collect();
    assert_eq!(hall(&resp.headers, "set-cookie"), want);
    for i in 0..60 {
        assert_eq!(
            resp.header(&format!("x-h-{i}")),
            Some(format!("value-{i}").as_str())
        );
    }
}
both_engines!(many_headers_and_set_cookie_lines_reach_the_client_in_order);

/// `x-edge-route` is the router's word on where a request went: an upstream's line of that
/// name (another router behind, or a spoof) never reaches the client beside it or alone.
async fn an_upstreams_x_edge_route_never_reaches_the_client(engine: Engine) {
    let (_up, r) = setup(
        engine,
        |q| {
            Action::Reply(ok(
                q.target.as_bytes(),
                "x-edge-route: region=evil; zone=evil; endpoint=1.2.3.4:1; reason=nearest\r\n",
            ))
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    let lines = hall(&resp.headers, "x-edge-route");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("zone=r1a"), "{lines:?}");
}
both_engines!(an_upstreams_x_edge_route_never_reaches_the_client);
