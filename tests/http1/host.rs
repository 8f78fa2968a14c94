//! The Host header and request-line authority (RFC 9112 3.2, RFC 9110 7.2), and a few header
//! and status-line rules of the proxy itself: what a bad Host gets (`400`, `x-edge-error:
//! bad_host`), that nothing of a refused request reaches the upstream, and that lookalike or
//! hop-by-hop tricks do not change what the upstream sees.

use crate::support::*;

/// A wildcard route: exactly one more label under `ab`.
const WILDCARD_ROUTE: &str =
    "\n[[route]]\nhost = \"*.ab\"\npath_prefix = \"/\"\ncluster = \"api\"\n";

/// A raw echo upstream and a router on `engine` whose first route is `*.ab` and whose second
/// is the catch-all of [`config`].
async fn setup_with_wildcard(engine: Engine) -> (RawUpstream, TestRouter) {
    let up = RawUpstream::start(std::sync::Arc::new(|q: &UpReq| {
        Action::Reply(echo_reply(q))
    }))
    .await;
    let text = engine.config(&[raw_endpoint(up.addr)], "").replacen(
        "\n[[route]]\n",
        &format!("{WILDCARD_ROUTE}\n[[route]]\n"),
        1,
    );
    let r = engine.start(&text).await;
    r.wait_all_healthy().await;
    (up, r)
}

/// Sends `raw` on a new connection and reads the answer (a reset or close before a response
/// fails the test); then a good request on another connection is the barrier that tells
/// that nothing of `raw` reached the upstream.
async fn refused(r: &TestRouter, up: &RawUpstream, what: &str, raw: &[u8]) -> Resp {
    let heads = up.heads();
    let mut c = Conn::open(r.dial()).await;
    c.send_lossy(raw).await;
    let resp = c.read(false).await;
    eprintln!(
        "{what}: {} {:?} {:?}",
        resp.status,
        resp.headers,
        resp.text()
    );
    let marker = format!("/marker-after-{}", what.replace(' ', "-"));
    let mut c = Conn::open(r.dial()).await;
    c.send(get(&marker)).await;
    assert_eq!(
        c.read(false).await.status,
        200,
        "{what}: the barrier request"
    );
    assert_eq!(
        up.heads() - heads,
        1,
        "{what}: the refused request reached the upstream: {:?}",
        up.seen()
    );
    assert_eq!(up.last().target, marker);
    resp
}

/// `refused`, and the answer is `400` with `x-edge-error: bad_host`.
async fn bad_host(r: &TestRouter, up: &RawUpstream, what: &str, raw: &[u8]) {
    let resp = refused(r, up, what, raw).await;
    assert_eq!(
        (resp.status, resp.header("x-edge-error")),
        (400, Some("bad_host")),
        "{what}: {:?} {:?}",
        resp.headers,
        resp.text()
    );
}

async fn non_ascii_host_against_a_wildcard_route_gets_400_bad_host(engine: Engine) {
    let (up, r) = setup_with_wildcard(engine).await;
    // A good `*.ab` host is served.
    let mut c = Conn::open(r.dial()).await;
    c.send("GET /w HTTP/1.1\r\nHost: x.ab\r\n\r\n").await;
    assert_eq!(c.read(false).await.status, 200);
    bad_host(
        &r,
        &up,
        "non-ascii host",
        b"GET /w HTTP/1.1\r\nHost: x\xc3\xa9ab\r\n\r\n",
    )
    .await;
}
both_engines!(non_ascii_host_against_a_wildcard_route_gets_400_bad_host,);

async fn duplicate_host_headers_get_400_bad_host(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    bad_host(
        &r,
        &up,
        "duplicate host",
        b"GET /d HTTP/1.1\r\nHost: test.local\r\nHost: other.local\r\n\r\n",
    )
    .await;
    bad_host(
        &r,
        &up,
        "duplicate identical host",
        b"GET /d HTTP/1.1\r\nHost: test.local\r\nHost: test.local\r\n\r\n",
    )
    .await;
}
both_engines!(duplicate_host_headers_get_400_bad_host,);

async fn http11_request_without_host_gets_400_bad_host(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    bad_host(&r, &up, "no host", b"GET /n HTTP/1.1\r\nX-A: 1\r\n\r\n").await;
}
both_engines!(http11_request_without_host_gets_400_bad_host,);

async fn invalid_host_values_get_400_bad_host(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    for value in ["a, b", "a b", "a/../x", "a:abc", "a:80@b"] {
        let raw = format!("GET /i HTTP/1.1\r\nHost: {value}\r\n\r\n");
        bad_host(&r, &up, &format!("host {value:?}"), raw.as_bytes()).await;
    }
}
both_engines!(invalid_host_values_get_400_bad_host,);

async fn absolute_form_target_disagreeing_with_host_gets_400_bad_host(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    bad_host(
        &r,
        &up,
        "absolute-form authority differs from host",
        b"GET http://internal.test/x HTTP/1.1\r\nHost: public.test\r\n\r\n",
    )
    .await;
}
both_engines!(absolute_form_target_disagreeing_with_host_gets_400_bad_host,);

/// `Connection` names hop-by-hop options; naming Host there must not drop the Host the
/// upstream needs (RFC 9110 7.6.1: a proxy must not remove end-to-end semantics it relies on).
async fn connection_host_does_not_strip_host(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let mut c = Conn::open(r.dial()).await;
    c.send("GET /ch HTTP/1.1\r\nHost: test.local\r\nConnection: host\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    assert_eq!(
        (resp.status, resp.text().as_str()),
        (200, "/ch"),
        "{:?}",
        resp.headers
    );
    let q = up.last();
    assert_eq!(hall(&q.headers, "host"), ["test.local"], "{:?}", q.headers);
}
both_engines!(connection_host_does_not_strip_host,);

/// An upstream response framed both ways is read as chunked (RFC 9112 6.3) and must not
/// reach the client with its Content-Length (the client would frame it differently). The
/// router may instead refuse it as a bad upstream answer (502).
async fn upstream_content_length_with_chunked_reaches_the_client_without_content_length(
    engine: Engine,
) {
    let (_up, r) = setup(
        engine,
        |q| match q.target.as_str() {
            "/both" => Action::ReplyClose(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                    .to_vec(),
            ),
            _ => Action::Reply(echo_reply(q)),
        },
        "",
    )
    .await;
    let mut c = Conn::open(r.dial()).await;
    c.send(get("/both")).await;
    let resp = c.read(false).await;
    eprintln!(
        "cl+te upstream: {} {:?} {:?}",
        resp.status,
        resp.headers,
        resp.text()
    );
    assert!(
        resp.header("content-length").is_none(),
        "{:?}",
        resp.headers
    );
    match resp.status {
        200 => assert_eq!(resp.text(), "hello"),
        502 => {}
        s => panic!("answered {s}"),
    }
}
both_engines!(upstream_content_length_with_chunked_reaches_the_client_without_content_length,);

/// CONNECT needs an authority-form target (RFC 9112 3.2.3); with an origin-form one it is
/// malformed, and this router does not tunnel anyway.
async fn connect_with_origin_form_target_is_refused(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let resp = refused(
        &r,
        &up,
        "connect origin-form",
        b"CONNECT /x HTTP/1.1\r\nHost: test.local\r\n\r\n",
    )
    .await;
    assert!(
        matches!(resp.status, 400 | 405),
        "CONNECT /x answered {}: {:?}",
        resp.status,
        resp.headers
    );
}
both_engines!(connect_with_origin_form_target_is_refused,);

/// `X_Forwarded_For` is not `X-Forwarded-For`, but upstreams that map headers to variables
/// (CGI, many frameworks) read both the same: passing it on would let a client forge the
/// forwarded chain. It is dropped (or the request refused, with nothing upstream).
async fn underscore_forwarded_for_lookalike_is_not_forwarded(engine: Engine) {
    let (up, r) = setup(engine, |q| Action::Reply(echo_reply(q)), "").await;
    let heads = up.heads();
    let mut c = Conn::open(r.dial()).await;
    c.send("GET /u HTTP/1.1\r\nHost: test.local\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    match resp.status {
        200 => {
            let q = up.last();
            assert!(q.header("x_forwarded_for").is_none(), "{:?}", q.headers);
            assert_eq!(hall(&q.headers, "x-forwarded-for"), ["127.0.0.1"]);
        }
        400 => assert_eq!(up.heads(), heads, "a refused request reached the upstream"),
        s => panic!("answered {s}: {:?}", resp.headers),
    }
}
both_engines!(underscore_forwarded_for_lookalike_is_not_forwarded,);
