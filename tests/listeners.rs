//! Several listeners at once: routes per listener, redirect routes, reload adding and
//! removing a listener. Real sockets on loopback.

mod common;
mod tls_util;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, host: &str, target: &str) -> String {
    let req = format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer timed out")
        .expect("read");
    String::from_utf8_lossy(&out).to_string()
}

fn status(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    answer
        .split("\r\n\r\n")
        .next()?
        .lines()
        .skip(1)
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
}

fn two_listeners(
    backend: &Backend,
    cert: &std::path::Path,
    key: &std::path::Path,
    extra: &str,
) -> String {
    format!(
        r#"
[[listener]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"

[[listener]]
name = "web-tls"
address = "127.0.0.1:0"
protocol = "https"
tls = {{ cert = "{}", key = "{}" }}
{extra}
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
listener = "web"
redirect = {{ scheme = "https", code = 308, port = 8443 }}

[[route]]
listener = ["web-tls"]
path_prefix = "/"
cluster = "api"
"#,
        cert.display(),
        key.display(),
        endpoint(backend, "r1", "r1a")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_redirects_to_https_and_each_listener_has_its_own_routes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = tls_util::Ca::new("test ca");
    let (cert, key) = ca.leaf(&["edge.test"]).write(dir.path(), "edge");
    let b = Backend::start("a", 0).await;
    let r = TestRouter::start(&two_listeners(&b, &cert, &key, "")).await;
    r.wait_all_healthy().await;
    let web = r.router.listener_addr("web").expect("web listener");
    let tls = r.router.listener_addr("web-tls").expect("web-tls listener");
    assert_ne!(web, tls);

    // Plain HTTP: answered by the router with a redirect; the upstream never sees it.
    let hits = b.ctl.hits();
    for engine_path in ["/a/b?x=1&y=%20", "/"] {
        let s = TcpStream::connect(web).await.expect("connect");
        let ans = exchange(s, "edge.test:8080", engine_path).await;
        assert_eq!(status(&ans), 308, "{ans}");
        assert_eq!(
            header(&ans, "location"),
            Some(format!("https://edge.test:8443{engine_path}").as_str()),
            "{ans}"
        );
        assert!(header(&ans, "x-edge-error").is_none(), "{ans}");
    }
    assert_eq!(
        b.ctl.hits(),
        hits,
        "a redirected request reached the upstream"
    );

    // HTTPS: the same path is served by the cluster on the other listener.
    let s = tls_util::connect(tls, "edge.test", ca.client())
        .await
        .expect("tls handshake");
    let ans = exchange(s, "edge.test", "/a/b?x=1").await;
    assert_eq!(status(&ans), 200, "{ans}");
    assert_eq!(b.ctl.hits(), hits + 1);

    let routes = r.routes().await;
    let names: Vec<&str> = routes["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(names, ["web", "web-tls"]);
    assert_eq!(routes["listeners"][1]["protocol"], "https");
    assert_eq!(routes["listeners"][0]["routes"], 1);
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_a_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = tls_util::Ca::new("test ca");
    let (cert, key) = ca.leaf(&["edge.test"]).write(dir.path(), "edge");
    let b = Backend::start("a", 0).await;
    let base = two_listeners(&b, &cert, &key, "");
    let r = TestRouter::start(&base).await;
    r.wait_all_healthy().await;

    // A third listener with a route of its own.
    let third = two_listeners(
        &b,
        &cert,
        &key,
        "[[listener]]\nname = \"internal\"\naddress = \"127.0.0.1:0\"\n",
    )
        + "\n[[route]]\nlistener = \"internal\"\npath_prefix = \"/\"\ncluster = \"api\"\n";
    r.rewrite_config(&third);
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    assert!(
        rep.body.contains("listener \\\"internal\\\" added"),
        "{}",
        rep.body
    );
    let internal = r
        .router
        .listener_addr("internal")
        .expect("internal listener");
    let ans = exchange(
        TcpStream::connect(internal).await.expect("connect"),
        "edge.test",
        "/x",
    )
    .await;
    assert_eq!(status(&ans), 200, "{ans}");
    // The first listener still redirects: the new route belongs to "internal" only.
    let web = r.router.listener_addr("web").expect("web");
    let ans = exchange(
        TcpStream::connect(web).await.expect("connect"),
        "edge.test",
        "/x",
    )
    .await;
    assert_eq!(status(&ans), 308, "{ans}");

    // Removed again: its port stops accepting; the others serve on.
    r.rewrite_config(&base);
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    assert!(rep.body.contains("removed"), "{}", rep.body);
    assert!(r.router.listener_addr("internal").is_none());
    wait_until(
        "the removed listener refuses",
        Duration::from_secs(10),
        || async { TcpStream::connect(internal).await.is_err() },
    )
    .await;
    let ans = exchange(
        TcpStream::connect(web).await.expect("connect"),
        "edge.test",
        "/x",
    )
    .await;
    assert_eq!(status(&ans), 308, "{ans}");

    // A changed protocol on a running address needs a restart and says so.
    let web_port = web.port();
    let pinned = base.replacen(
        "address = \"127.0.0.1:0\"",
        &format!("address = \"127.0.0.1:{web_port}\""),
        1,
    );
    r.rewrite_config(&pinned);
    // Same address, same protocol: matched, nothing rebound.
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    let changed = pinned.replacen(
        "protocol = \"http\"",
        "protocol = \"tcp\"\ncluster = \"api\"",
        1,
    );
    let changed = changed.replacen(
        "[[route]]\nlistener = \"web\"\nredirect",
        "[[route]]\nlistener = \"web-tls\"\nredirect",
        1,
    );
    r.rewrite_config(&changed);
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    assert!(rep.body.contains("needs a restart"), "{}", rep.body);
    let ans = exchange(
        TcpStream::connect(web).await.expect("connect"),
        "edge.test",
        "/x",
    )
    .await;
    assert!(status(&ans) == 308 || status(&ans) == 404, "{ans}");
    r.stop().await;
}
