//! Route actions: header edits of the request and the response, and the path prefix
//! rewrite, as the upstream and the client see them.

use crate::common::TestRouter;
use crate::support::*;

/// A router on `engine` in front of `up` with the given `[[route]]` tables instead of the
/// one catch-all route.
async fn router_with_routes(engine: Engine, up: &RawUpstream, routes: &str) -> TestRouter {
    let base = engine.config(&[raw_endpoint(up.addr)], "");
    let catch_all = "[[route]]\npath_prefix = \"/\"\ncluster = \"api\"\n";
    assert!(base.contains(catch_all), "the test config changed shape");
    let r = engine.start(&base.replace(catch_all, routes)).await;
    r.wait_all_healthy().await;
    r
}

const EDIT_ROUTES: &str = r#"
[[route]]
path_prefix = "/api/"
cluster = "api"
rewrite_prefix = "/v2/"
request_headers = { add = { "x-added" = "edge" }, set = { "x-set" = "one" }, remove = ["x-secret"] }
response_headers = { add = { "x-served-by" = "edge-router" }, set = { "cache-control" = "no-store" }, remove = ["server"] }

[[route]]
path_prefix = "/strip"
cluster = "api"
rewrite_prefix = ""

[[route]]
path_prefix = "/"
cluster = "api"
"#;

async fn route_header_edits_reach_the_upstream_and_the_client(engine: Engine) {
    let up = RawUpstream::start(std::sync::Arc::new(|q: &UpReq| {
        Action::Reply(ok(
            q.target.as_bytes(),
            "Server: upstream/1\r\nCache-Control: max-age=60\r\nX-Served-By: app\r\n",
        ))
    }))
    .await;
    let r = router_with_routes(engine, &up, EDIT_ROUTES).await;
    let mut c = Conn::open(r.dial()).await;
    c.send(
        "GET /api/users?id=7 HTTP/1.1\r\nHost: example.com\r\nX-Secret: s3cret\r\n\
         X-Set: a\r\nX-Set: b\r\nX-Added: client\r\nX-Keep: yes\r\n\r\n",
    )
    .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let q = up.last();
    assert_eq!(
        q.target, "/v2/users?id=7",
        "the prefix is replaced, the query kept"
    );
    assert_eq!(q.header("x-secret"), None, "removed: {:?}", q.headers);
    assert_eq!(
        hall(&q.headers, "x-set"),
        ["one"],
        "set replaces every line"
    );
    assert_eq!(
        hall(&q.headers, "x-added"),
        ["client", "edge"],
        "add appends"
    );
    assert_eq!(q.header("x-keep"), Some("yes"));
    assert_eq!(hall(&q.headers, "host"), ["example.com"]);
    assert_eq!(q.header("x-forwarded-for"), Some("127.0.0.1"));
    // The response: the upstream's edited, the rest relayed.
    assert_eq!(resp.text(), "/v2/users?id=7");
    assert_eq!(resp.header("server"), None, "{:?}", resp.headers);
    assert_eq!(hall(&resp.headers, "cache-control"), ["no-store"]);
    assert_eq!(hall(&resp.headers, "x-served-by"), ["app", "edge-router"]);
    assert!(resp.header("x-request-id").is_some());

    // Another route on the same connection: none of those edits.
    c.send("GET /other HTTP/1.1\r\nHost: example.com\r\nX-Secret: kept\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 200);
    assert_eq!(up.last().header("x-secret"), Some("kept"));
    assert_eq!(up.last().target, "/other");
    assert_eq!(resp.header("server"), Some("upstream/1"));
    assert_eq!(resp.header("x-served-by"), Some("app"));

    // A client's Connection header naming the lines the route writes strips its own
    // lines (hop-by-hop), never the route's.
    c.send(
        "GET /api/x HTTP/1.1\r\nHost: example.com\r\nConnection: x-added, x-set\r\n\
         X-Added: client\r\nX-Set: client\r\n\r\n",
    )
    .await;
    assert_eq!(c.read(false).await.status, 200);
    let q = up.last();
    assert_eq!(hall(&q.headers, "x-added"), ["edge"], "{:?}", q.headers);
    assert_eq!(hall(&q.headers, "x-set"), ["one"], "{:?}", q.headers);
}
both_engines!(route_header_edits_reach_the_upstream_and_the_client);

async fn a_stripped_prefix_leaves_a_valid_path(engine: Engine) {
    let up = RawUpstream::start(std::sync::Arc::new(|q: &UpReq| {
        Action::Reply(echo_reply(q))
    }))
    .await;
    let r = router_with_routes(engine, &up, EDIT_ROUTES).await;
    let mut c = Conn::open(r.dial()).await;
    for (sent, seen) in [
        ("/strip", "/"),
        ("/strip?x=1", "/?x=1"),
        ("/strip/a/b?c=d", "/a/b?c=d"),
        ("/stripped", "/ped"),
        ("/api/", "/v2/"),
    ] {
        c.send(format!("GET {sent} HTTP/1.1\r\nHost: example.com\r\n\r\n"))
            .await;
        let resp = c.read(false).await;
        assert_eq!(resp.status, 200, "{sent}: {}", resp.text());
        assert_eq!(up.last().target, seen, "{sent}");
    }
}
both_engines!(a_stripped_prefix_leaves_a_valid_path);

/// The router's own answers keep their shape: response edits are for the upstream's
/// responses only.
async fn router_errors_are_not_edited(engine: Engine) {
    let up = RawUpstream::start(std::sync::Arc::new(|_: &UpReq| Action::Drop)).await;
    let routes = r#"
[[route]]
path_prefix = "/api/"
cluster = "api"
response_headers = { add = { "x-served-by" = "edge-router" } }
"#;
    let r = router_with_routes(engine, &up, routes).await;
    let mut c = Conn::open(r.dial()).await;
    // Every attempt is dropped by the upstream: a 502 of the router's own.
    c.send("GET /api/x HTTP/1.1\r\nHost: example.com\r\n\r\n")
        .await;
    let resp = c.read(false).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(resp.header("x-edge-error"), Some("upstream_reset"));
    assert_eq!(resp.header("x-served-by"), None);
}
both_engines!(router_errors_are_not_edited);

/// An upgrade request gets the route's edits too, and a client's Connection header naming
/// a line the route writes strips only the client's own line there as well.
async fn an_upgrade_request_gets_the_routes_edits(engine: Engine) {
    let up = RawUpstream::start(std::sync::Arc::new(|q: &UpReq| {
        if q.header("upgrade").is_some() {
            Action::Reply(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
                    .to_vec(),
            )
        } else {
            Action::Reply(echo_reply(q))
        }
    }))
    .await;
    let r = router_with_routes(engine, &up, EDIT_ROUTES).await;
    let mut c = Conn::open(r.dial()).await;
    c.send(
        "GET /api/ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade, x-added, x-set\r\n\
         Upgrade: websocket\r\nX-Added: client\r\nX-Set: client\r\nX-Secret: s\r\n\r\n",
    )
    .await;
    let resp = c.read(true).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    let q = up.last();
    assert_eq!(q.target, "/v2/ws");
    assert_eq!(hall(&q.headers, "x-added"), ["edge"], "{:?}", q.headers);
    assert_eq!(hall(&q.headers, "x-set"), ["one"], "{:?}", q.headers);
    assert_eq!(q.header("x-secret"), None, "{:?}", q.headers);
    assert_eq!(q.header("upgrade"), Some("websocket"), "{:?}", q.headers);
}
both_engines!(an_upgrade_request_gets_the_routes_edits);
