//! Message framing: Content-Length and chunked bodies both ways, close-delimited and
//! HTTP/1.0 upstreams, bodiless responses, pipelining, HTTP/1.0 clients, bad framing and
//! smuggling, head limits, request targets.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::support::*;

// Content-Length bodies.

async fn content_length_bodies_pass_byte_exact_both_ways(engine: Engine) {
    let big = pattern(1 << 20, 3);
    let big2 = big.clone();
    let (up, r) = setup(
        engine,
        move |q| match q.target.as_str() {
            "/big" => Action::Reply(ok(&big2, "Content-Type: application/octet-stream\r\n")),
            _ => Action::Reply(ok(q.body.len().to_string().as_bytes(), "")),
        },
        "",
    )
    .await;
    let body = pattern(300 * 1024, 7);
    let mut c = Conn::open(r.dial()).await;
    let mut req = format!(
        "POST /upload HTTP/1.1\r\nHost: test.local\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), (300 * 1024).to_string());
    let q = up.last();
    assert_eq!(q.method, "POST");
    assert!(!q.chunked, "a Content-Length body was re-framed as chunked");
    assert_eq!(q.header("content-length"), Some("307200"));
    assert!(q.body == body, "request body differs at the upstream");

    // The same connection, a 1 MB response.
    c.send(get("/big")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.framing, Framing::Length(1 << 20), "{:?}", resp.headers);
    assert_eq!(resp.body.len(), 1 << 20);
    assert!(resp.body == big, "response body differs at the client");
    assert_eq!(
        resp.header("content-type"),
        Some("application/octet-stream")
    );
}
both_engines!(content_length_bodies_pass_byte_exact_both_ways);

// Chunked request body.

async fn chunked_request_body_arrives_complete_and_validly_framed(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| Action::Reply(ok(q.body.len().to_string().as_bytes(), "")),
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    let big = pattern(100_000, 9);
    let mut want = b"hello".to_vec();
    want.extend_from_slice(b"abcdefghijklmnopqrstuvwxyz");
    want.extend_from_slice(&big);
    c.send("POST /chunked HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await;
    c.send("5;name=value\r\nhello\r\n").await;
    c.send("1A\r\nabcdefghijklmnopqrstuvwxyz\r\n").await;
    let mut chunk = format!("{:x}\r\n", big.len()).into_bytes();
    chunk.extend_from_slice(&big);
    chunk.extend_from_slice(b"\r\n");
    c.send(&chunk).await;
    c.send("0\r\nX-Trailer: t1\r\n\r\n").await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), want.len().to_string());
    assert!(
        up.errors().is_empty(),
        "upstream saw bad framing: {:?}",
        up.errors()
    );
    let q = up.last();
    assert!(q.body == want, "decoded body differs at the upstream");
    if q.chunked {
        assert!(q.header("content-length").is_none());
    } else {
        assert_eq!(
            q.header("content-length"),
            Some(want.len().to_string().as_str())
        );
    }
    // Trailers need not be forwarded; if they are, they are the client's.
    assert!(
        q.trailers.is_empty() || q.trailers == [("x-trailer".to_string(), "t1".to_string())],
        "{:?}",
        q.trailers
    );
    eprintln!(
        "upstream framing: chunked={} chunks-exts={:?} trailers={:?}",
        q.chunked, q.chunk_exts, q.trailers
    );
    // The connection is still good.
    c.send(get("/after")).await;
    assert_eq!(c.read(false).await.status, 200);
}
both_engines!(chunked_request_body_arrives_complete_and_validly_framed);

// Upstream chunked and close-delimited responses.

async fn upstream_chunked_and_close_delimited_responses_are_reframed(engine: Engine) {
    let long = pattern(200_000, 5);
    let long2 = long.clone();
    let (_up, r) = setup(
        engine,
        move |q| match q.target.as_str() {
            "/chunked" => Action::Reply(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;x=y\r\nabcd\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\n"
                    .to_vec(),
            ),
            "/close10" | "/close11" => {
                let v = if q.target == "/close10" { "1.0" } else { "1.1" };
                let mut b = format!("HTTP/{v} 200 OK\r\nContent-Type: text/plain\r\n\r\n").into_bytes();
                b.extend_from_slice(&long2);
                Action::ReplyClose(b)
            }
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/chunked")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "abcd0123456789abcdef");
    assert_eq!(resp.framing, Framing::Chunked, "{:?}", resp.headers);
    eprintln!("chunked upstream -> client trailers {:?}", resp.trailers);
    // An HTTP/1.1 upstream ending its body by closing: re-framed as chunked for the
    // HTTP/1.1 client, so the client connection lives on.
    c.send(get("/close11")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.body == long,
        "body differs ({} bytes)",
        resp.body.len()
    );
    assert_eq!(resp.framing, Framing::Chunked, "{:?}", resp.headers);
    assert_eq!(resp.header("content-type"), Some("text/plain"));
    c.send(get("/chunked")).await;
    assert_eq!(c.read(false).await.text(), "abcd0123456789abcdef");
    // An HTTP/1.0 upstream: the whole body, chunked (connection kept) or close-delimited
    // (then closed: reading to EOF is how the body ends).
    c.send(get("/close10")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.body == long,
        "body differs ({} bytes)",
        resp.body.len()
    );
    eprintln!(
        "HTTP/1.0 upstream, close-delimited -> client: {} {:?} {:?}",
        resp.version, resp.framing, resp.headers
    );
    match resp.framing {
        Framing::Chunked => {
            c.send(get("/chunked")).await;
            assert_eq!(c.read(false).await.text(), "abcd0123456789abcdef");
        }
        Framing::Close => {}
        f => panic!("unexpected framing {f:?}"),
    }

    // An HTTP/1.0 client never gets chunked: close-delimited, then the close.
    let mut c = Conn::open(r.dial()).await;
    c.send("GET /chunked HTTP/1.0\r\nHost: test.local\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.framing, Framing::Close, "{:?}", resp.headers);
    assert_eq!(resp.text(), "abcd0123456789abcdef");
    eprintln!(
        "HTTP/1.0 client, chunked upstream: {} {:?}",
        resp.version, resp.framing
    );
}
both_engines!(upstream_chunked_and_close_delimited_responses_are_reframed);

/// An intermediary sends its own HTTP version (RFC 9110 6.2), not the upstream's: an
/// HTTP/1.1 client is answered `HTTP/1.1` even when the upstream spoke HTTP/1.0.
async fn http11_client_gets_http11_from_an_http10_upstream(engine: Engine) {
    let (_up, r) = setup(
        engine,
        |q| {
            let mut b = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec();
            if q.target == "/close" {
                b = b"HTTP/1.0 200 OK\r\n\r\nbye".to_vec();
            }
            Action::ReplyClose(b)
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/len")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "ok"));
    assert_eq!(resp.version, "HTTP/1.1", "{:?}", resp.headers);
    c.send(get("/close")).await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "bye"));
    assert_eq!(resp.version, "HTTP/1.1", "{:?}", resp.headers);
}
both_engines!(http11_client_gets_http11_from_an_http10_upstream);

// HEAD, 204, 304.

async fn head_204_and_304_have_no_body_and_keep_the_connection(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| match q.target.as_str() {
            "/head" => Action::Reply(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n"
                    .to_vec(),
            ),
            "/204" => Action::Reply(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n".to_vec()),
            "/304" => Action::Reply(
                b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 1234\r\n\r\n"
                    .to_vec(),
            ),
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send("HEAD /head HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await;
    let resp = c.read(true).await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("content-length"),
        Some("1234"),
        "{:?}",
        resp.headers
    );
    assert!(resp.header("transfer-encoding").is_none());
    assert_eq!(up.last().method, "HEAD");
    c.send(get("/after1")).await;
    let a1 = c.read(false).await;
    assert_eq!((a1.status, a1.text().as_str()), (200, "/after1"));

    c.send(get("/204")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("x-a"), Some("1"));
    assert!(
        resp.header("transfer-encoding").is_none(),
        "{:?}",
        resp.headers
    );
    assert!(
        resp.header("content-length").is_none(),
        "{:?}",
        resp.headers
    );

    c.send(get("/304")).await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 304);
    assert_eq!(resp.header("etag"), Some("\"v1\""));
    assert!(
        resp.header("transfer-encoding").is_none(),
        "{:?}",
        resp.headers
    );
    eprintln!("304 headers to the client: {:?}", resp.headers);

    // Nothing stray was sent after the bodiless responses: the next one parses.
    c.send(get("/after2")).await;
    let a2 = c.read(false).await;
    assert_eq!((a2.status, a2.text().as_str()), (200, "/after2"));
    // And the upstream connection was reused throughout (no wait for 1234 bytes).
    let conns: std::collections::BTreeSet<u64> = up.seen().iter().map(|q| q.conn).collect();
    assert_eq!(conns.len(), 1, "upstream connections used: {conns:?}");
}
both_engines!(head_204_and_304_have_no_body_and_keep_the_connection);

// Pipelining.

async fn pipelined_requests_are_answered_in_order_on_one_connection(engine: Engine) {
    let (_up, r) = setup(
        engine,
        |q| {
            // The first is the slowest: answers must still come in request order.
            let d = if q.target == "/p/1" { 300 } else { 0 };
            Action::Delayed(Duration::from_millis(d), echo_reply(q))
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(format!("{}{}{}", get("/p/1"), get("/p/2"), get("/p/3")))
        .await;
    for i in 1..=3 {
        let resp = c.read(false).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), format!("/p/{i}"));
        assert_eq!(resp.header("x-path"), Some(format!("/p/{i}").as_str()));
    }
    c.send(get("/p/4")).await;
    assert_eq!(c.read(false).await.text(), "/p/4");
}
both_engines!(pipelined_requests_are_answered_in_order_on_one_connection);

// HTTP/1.0 clients.

async fn http10_closes_without_keep_alive_and_keeps_with_it(engine: Engine) {
    let (_up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let mut c = Conn::open(r.dial()).await;
    c.send("GET /h10 HTTP/1.0\r\nHost: test.local\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    assert_eq!((resp.status, resp.text().as_str()), (200, "/h10"));
    assert_eq!(resp.framing, Framing::Length(4));
    eprintln!(
        "HTTP/1.0 response version {} headers {:?}",
        resp.version, resp.headers
    );
    c.expect_closed().await;

    let mut c = Conn::open(r.dial()).await;
    for i in 0..2 {
        c.send(format!(
            "GET /ka{i} HTTP/1.0\r\nHost: test.local\r\nConnection: keep-alive\r\n\r\n"
        ))
        .await;
        let resp = c.read(false).await;
        assert_eq!((resp.status, resp.text()), (200, format!("/ka{i}")));
        assert_eq!(
            tokens(&resp.headers, "connection"),
            ["keep-alive"],
            "an HTTP/1.0 client must be told the connection stays: {:?}",
            resp.headers
        );
    }
    // Without keep-alive again: closed after this one.
    c.send("GET /last HTTP/1.0\r\nHost: test.local\r\n\r\n")
        .await;
    assert_eq!(c.read(false).await.text(), "/last");
    c.expect_closed().await;
}
both_engines!(http10_closes_without_keep_alive_and_keeps_with_it);

// Keep-alive and upstream connection reuse.

async fn fifty_requests_on_one_connection_reuse_upstream_connections(engine: Engine) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let b = Backend::start("a", 0).await;
    let r = engine
        .start(&engine.config(&[endpoint(&b, "r1", "r1a")], ""))
        .await;
    r.wait_all_healthy().await;
    let mut c = Conn::open(r.dial()).await;
    for i in 0..50 {
        c.send(get(&format!("/n/{i}"))).await;
        let resp = c.read(false).await;
        assert_eq!(
            (resp.status, resp.text().as_str()),
            (200, "a"),
            "request {i}"
        );
    }
    assert_eq!(b.ctl.hits(), 50);
    let accepted = b.ctl.accepted.load(Ordering::SeqCst);
    eprintln!("upstream accepted {accepted} connections (health probes included)");
    assert!(
        accepted <= 5,
        "no connection reuse: {accepted} upstream connections for 50 requests"
    );
}
both_engines!(fifty_requests_on_one_connection_reuse_upstream_connections);

// Bad framing and smuggling.

async fn bad_framing_gets_400_closes_and_reaches_nothing(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let cases: [(&str, &[u8]); 5] = [
        (
            "two content-lengths",
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        ),
        (
            "non-numeric content-length",
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5x\r\n\r\nhello",
        ),
        (
            "transfer-encoding gzip",
            b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        ),
        ("garbage request line", b"this is not http\r\n\r\n"),
        ("bad version", b"GET /x HTP/1.1\r\nHost: t\r\n\r\n"),
    ];
    for (what, raw) in cases {
        rejected(&r, &up, what, raw, 400).await;
    }
    for (what, raw) in [
        (
            "header without colon",
            &b"GET /x HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n"[..],
        ),
        (
            "space before colon",
            &b"GET /x HTTP/1.1\r\nHost : t\r\n\r\n"[..],
        ),
    ] {
        rejected(&r, &up, what, raw, 400).await;
    }
}
both_engines!(bad_framing_gets_400_closes_and_reaches_nothing);

const CL_AND_TE: &[u8] = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
const BAD_CHUNK: &[u8] =
    b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";

/// What a strict proxy does with Content-Length plus Transfer-Encoding (RFC 9112 6.3 allows
/// it to reject the message; it is the smuggling vector).
async fn content_length_with_transfer_encoding_is_rejected(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    rejected(
        &r,
        &up,
        "content-length and transfer-encoding",
        CL_AND_TE,
        400,
    )
    .await;
}
both_engines!(
    content_length_with_transfer_encoding_is_rejected,
    hyper = "hyper engine: Content-Length + chunked request served as chunked (200, connection: close), not 400; the never_smuggles floor passes"
);

/// The floor for Content-Length plus Transfer-Encoding, whichever way the router goes: either
/// 400 with nothing upstream, or the chunked reading wins (never Content-Length), the
/// upstream gets one valid request without Content-Length, and the client connection is
/// closed after the response (RFC 9112 6.3). Nothing after the body is ever a second request.
async fn content_length_with_transfer_encoding_never_smuggles(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    // If the 4 bytes of Content-Length won, "0\r\n\r\n" would not be the end and the
    // trailing GET would be read as a second request.
    let mut raw = CL_AND_TE.to_vec();
    raw.extend_from_slice(get("/smuggled").as_bytes());
    let o = try_bad(&r, &up, "cl+te", &raw).await;
    assert!(
        up.seen().iter().all(|q| q.target != "/smuggled"),
        "smuggled: {:?}",
        up.seen()
    );
    assert!(up.errors().is_empty(), "{:?}", up.errors());
    match o.resp.status {
        400 => assert_eq!(o.heads, 0),
        200 => {
            assert_eq!(o.complete.len(), 1);
            let q = &o.complete[0];
            assert_eq!(q.body, b"hello");
            assert!(q.header("content-length").is_none(), "{:?}", q.headers);
            assert_eq!(tokens(&o.resp.headers, "connection"), ["close"]);
        }
        s => panic!("cl+te answered {s}"),
    }
}
both_engines!(content_length_with_transfer_encoding_never_smuggles);

async fn invalid_chunk_size_gets_400(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let o = try_bad(&r, &up, "invalid chunk size", BAD_CHUNK).await;
    assert_eq!(o.resp.status, 400, "{:?}", o.resp.headers);
    assert!(o.complete.is_empty(), "{:?}", o.complete);
}
both_engines!(invalid_chunk_size_gets_400);

/// The floor for a bad chunk size: an error answer (400, or 502 upstream_reset when the head
/// went ahead), the client connection closed, and the upstream never reads a complete request
/// (the head may have gone ahead of the body; the upstream connection is then cut, never
/// reused).
async fn invalid_chunk_size_never_completes_upstream(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let o = try_bad(&r, &up, "invalid chunk size", BAD_CHUNK).await;
    assert!(
        matches!(o.resp.status, 400 | 502),
        "bad chunk answered {}",
        o.resp.status
    );
    if o.resp.status == 502 {
        assert_eq!(o.resp.header("x-edge-error"), Some("upstream_reset"));
    }
    assert!(o.complete.is_empty(), "{:?}", o.complete);
    eprintln!(
        "bad chunk: heads upstream {} errors {:?}",
        o.heads,
        up.errors()
    );
    assert_eq!(
        up.errors().len() as u64,
        o.heads,
        "a forwarded head is cut short"
    );
}
both_engines!(invalid_chunk_size_never_completes_upstream);

async fn head_over_max_header_bytes_gets_431(engine: Engine) {
    let (up, r) = setup(
        engine,
        |q| Action::Reply(echo_reply(q)),
        "max_header_bytes = 8192",
    )
    .await;
    // Under the limit: served.
    let mut c = Conn::open(r.dial()).await;
    c.send(format!(
        "GET /fits HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(4000)
    ))
    .await;
    assert_eq!(c.read(false).await.status, 200);
    let raw = format!(
        "GET /big HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "p".repeat(16_000)
    );
    rejected(&r, &up, "head over max_header_bytes", raw.as_bytes(), 431).await;
}
both_engines!(head_over_max_header_bytes_gets_431);

// Request targets.

async fn request_targets_are_forwarded_unchanged_and_absolute_form_becomes_origin_form(
    engine: Engine,
) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let mut c = Conn::open(r.dial()).await;
    for target in [
        "/q/a%20b/%2Fc?x=1&y=%41%2b&z=a+b&e=&&f",
        "/q/./a/../b//c",
        "/q?",
        "/q/%E2%82%AC;p=1",
    ] {
        c.send(get(target)).await;
        let resp = c.read(false).await;
        assert_eq!(resp.status, 200, "{target}");
        assert_eq!(up.last().target, target);
        assert_eq!(resp.text(), target);
    }
    for (abs, origin, host) in [
        ("http://test.local/abs/p?q=1", "/abs/p?q=1", "test.local"),
        ("http://test.local:8080/abs", "/abs", "test.local:8080"),
        ("http://test.local:80/abs", "/abs", "test.local"),
        ("http://test.local", "/", "test.local"),
    ] {
        c.send(format!("GET {abs} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .await;
        let resp = c.read(false).await;
        assert_eq!(resp.status, 200, "{abs}");
        let q = up.last();
        assert_eq!(q.target, origin, "{abs}");
        assert_eq!(q.header("host"), Some(host), "{abs}");
        assert_eq!(q.version, "HTTP/1.1");
    }
}
both_engines!(request_targets_are_forwarded_unchanged_and_absolute_form_becomes_origin_form);

// The router's own replies to HEAD.

async fn the_routers_own_reply_to_head_has_no_body_and_the_next_request_is_read_right(
    engine: Engine,
) {
    let (_up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let mut c = Conn::open(r.dial()).await;
    // Two Host lines: 400 bad_host from the router itself, then a good request behind it.
    c.send(format!(
        "HEAD /h HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n\r\n{}",
        get("/after")
    ))
    .await;
    let resp = c.read(true).await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.header("x-edge-error"), Some("bad_host"));
    let next = c.read(false).await;
    assert_eq!(next.status, 200, "the reply's body was read as a response");
    assert_eq!(next.text(), "/after");
}
both_engines!(the_routers_own_reply_to_head_has_no_body_and_the_next_request_is_read_right);
