//! Honest failure accounting, on both HTTP engines: a client that aborts its own upload is
//! never the endpoint's fault; an upstream that breaks off mid-body is; a request with a
//! body is retried when its connect failed (nothing was sent).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ENGINES: [&str; 2] = ["native", "hyper"];

/// The sum of a metric family's samples whose labels contain every `want` pair.
async fn metric(r: &TestRouter, family: &str, want: &[&str]) -> f64 {
    let text = get(&r.admin_url("/metrics")).await.body;
    text.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn metric_gauge(r: &TestRouter, name: &str) -> f64 {
    let text = get(&r.admin_url("/metrics")).await.body;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_aborted_uploads_never_touch_endpoints() {
    for engine in ENGINES {
        let b = Backend::start("a", 0).await;
        let toml = config(
            &[endpoint(&b, "r1", "r1a")],
            "",
            &format!("http1_engine = \"{engine}\""),
        );
        let r = TestRouter::start(&toml).await;
        r.wait_all_healthy().await;
        let chunk = vec![b'u'; 16 * 1024];
        for _ in 0..100 {
            let mut s = TcpStream::connect(r.addr).await.expect("connect");
            let head = format!(
                "POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                1024 * 1024
            );
            s.write_all(head.as_bytes()).await.expect("head");
            // 100 KiB of the announced 1 MiB, then the client is gone.
            for _ in 0..6 {
                if s.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            drop(s);
        }
        // Every aborted connection has been seen to its end by the router.
        wait_until(
            "aborted connections closed",
            Duration::from_secs(10),
            || async { metric_gauge(&r, "edge_router_connections_active").await == 0.0 },
        )
        .await;
        let label = format!("endpoint=\"{}\"", b.addr);
        assert_eq!(
            metric(&r, "edge_router_ejections_total", &[&label]).await,
            0.0,
            "{engine}"
        );
        assert_eq!(
            metric(&r, "edge_router_errors_total", &["kind=\"upstream_reset\""]).await,
            0.0,
            "{engine}: a client abort counted as an upstream reset"
        );
        assert_eq!(
            metric(&r, "edge_router_requests_total", &["code=\"502\""]).await,
            0.0,
            "{engine}: phantom 502s"
        );
        // The endpoint is still in the table and serves.
        let ok = get(&r.url("/after")).await;
        assert_eq!(ok.status, 200, "{engine}");
        r.stop().await;
    }
}

/// A raw upstream: health checks get a whole answer; every other request gets a head that
/// announces 1000 bytes, 10 of them, and a closed connection.
async fn breaking_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut tmp = [0u8; 4096];
                loop {
                    match s.read(&mut tmp).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        if head.starts_with("GET /healthz") {
                            let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if s.write_all(ok.as_bytes()).await.is_err() {
                                return;
                            }
                        } else {
                            let part = "HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789";
                            let _ = s.write_all(part.as_bytes()).await;
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_resets_after_the_head_are_counted_and_eject() {
    for engine in ENGINES {
        let addr = breaking_upstream().await;
        let ep = format!(
            "\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"r1\"\nzone = \"r1a\"\n"
        );
        // A second, healthy endpoint: ejection never takes a cluster's last endpoint.
        let good = Backend::start("good", 0).await;
        let toml = config(
            &[ep, endpoint(&good, "r1", "r1a")],
            "outlier = { consecutive_failures = 3, max_ejection_percent = 50 }",
            &format!("http1_engine = \"{engine}\""),
        );
        let r = TestRouter::start(&toml).await;
        r.wait_all_healthy().await;
        let c = client();
        for _ in 0..20 {
            let req = http::Request::get(r.url("/x"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            // The body breaks off: the client sees an error or a short body.
            let _ = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await;
        }
        wait_until(
            &format!("{engine}: mid-body resets counted"),
            Duration::from_secs(5),
            || async {
                metric(&r, "edge_router_errors_total", &["kind=\"upstream_reset\""]).await >= 3.0
            },
        )
        .await;
        let label = format!("endpoint=\"{addr}\"");
        wait_until(
            &format!("{engine}: the breaking endpoint is ejected"),
            Duration::from_secs(5),
            || async { metric(&r, "edge_router_ejections_total", &[&label]).await >= 1.0 },
        )
        .await;
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_a_body_is_retried_when_its_connect_fails() {
    for engine in ENGINES {
        let a = Backend::start("a", 0).await;
        let b = Backend::start("b", 0).await;
        // Probes far apart: the killed endpoint stays in the table for the whole test.
        let toml = config(
            &[endpoint(&a, "r1", "r1a"), endpoint(&b, "r1", "r1a")],
            "",
            &format!("http1_engine = \"{engine}\""),
        )
        .replace("interval = \"200ms\"", "interval = \"60s\"")
        .replace("healthy_threshold = 2", "healthy_threshold = 1");
        let r = TestRouter::start(&toml).await;
        r.wait_all_healthy().await;
        a.kill();
        let c = client();
        // A small body (the native engine holds it) and a large one (streamed).
        for size in [1000usize, 300 * 1024] {
            for i in 0..6 {
                let body = vec![b'0' + (i as u8 % 10); size];
                let req = http::Request::post(r.url("/echo"))
                    .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
                    .expect("request");
                let resp = send(&c, req).await;
                assert_eq!(
                    resp.status, 200,
                    "{engine}, {size} bytes, request {i}: {:?}",
                    resp.headers
                );
                assert_eq!(resp.body.len(), size, "{engine}: the whole body arrived");
                assert_eq!(resp.header("x-backend"), Some("b"));
            }
        }
        r.stop().await;
    }
}
