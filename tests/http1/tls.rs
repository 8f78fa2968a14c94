//! The TLS listener and the native engine: which engine serves a connection by its ALPN,
//! certificates by SNI, and HTTPS keep-alive with bodies around the small-body limit.
//!
//! Which engine wrote a response shows on the wire: the native engine relays the upstream's
//! header names as the upstream wrote them, hyper sends them lower case. The upstream here
//! answers with a mixed-case `X-Engine-Probe` header.

use std::sync::Arc;

use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::support::*;
use crate::tls_util;

/// The upstream: the request's body (or, without one, its target) as the response body.
fn probe(q: &UpReq) -> Action {
    let body = if q.body.is_empty() {
        q.target.as_bytes()
    } else {
        &q.body
    };
    Action::Reply(ok(body, "X-Engine-Probe: 1\r\n"))
}

/// Which engine wrote the response whose head is `raw`.
fn engine_of(raw: &str) -> &'static str {
    if raw.contains("\r\nX-Engine-Probe: 1\r\n") {
        "native"
    } else if raw.contains("\r\nx-engine-probe: 1\r\n") {
        "hyper"
    } else {
        panic!("no probe header in {raw:?}")
    }
}

fn client(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut c = (*tls_fixture().ca.client()).clone();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

/// A TLS connection to `r` for `sni`, offering `alpn`: the protocol agreed, the server's
/// certificate, and the raw client on it.
async fn open(r: &TestRouter, sni: &str, alpn: &[&[u8]]) -> (Option<String>, Vec<u8>, Conn) {
    let s = tls_util::connect(r.addr, sni, client(alpn))
        .await
        .expect("TLS handshake");
    let agreed = s
        .get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).to_string());
    let cert = tls_util::peer_cert(&s);
    (agreed, cert, Conn::over(s))
}

/// GETs `n` targets in turn on `c`; returns the engine that wrote each response.
async fn gets(c: &mut Conn, host: &str, n: usize) -> Vec<&'static str> {
    let mut engines = Vec::new();
    for i in 0..n {
        let target = format!("/keep/{i}");
        c.send(format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .await;
        let (raw, resp) = c.read_raw(false).await;
        assert_eq!((resp.status, resp.text()), (200, target), "{raw}");
        engines.push(engine_of(&raw));
    }
    engines
}

async fn tls_router(engine: Engine, up: &RawUpstream) -> TestRouter {
    let r = engine.router(up.addr, "").await;
    r.wait_all_healthy().await;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_h2_goes_to_hyper_and_http11_or_no_alpn_to_the_native_engine() {
    bounded(async {
        let up = RawUpstream::start(Arc::new(probe)).await;
        let r = tls_router(Engine::NativeTls, &up).await;

        for offer in [&[][..], &[&b"http/1.1"[..]][..]] {
            let (agreed, _, mut c) = open(&r, TLS_NAME, offer).await;
            let want = (!offer.is_empty()).then(|| "http/1.1".to_string());
            assert_eq!(agreed, want);
            assert_eq!(
                gets(&mut c, TLS_NAME, 3).await,
                ["native"; 3],
                "offering {offer:?}"
            );
            assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
            assert_eq!(up.last().header("x-forwarded-host"), Some(TLS_NAME));
        }

        // A client offering h2 first gets h2, which only hyper serves.
        let s = tls_util::connect(r.addr, TLS_NAME, client(&[b"h2", b"http/1.1"]))
            .await
            .expect("TLS handshake");
        assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        for i in 0..2 {
            let req = http::Request::get(format!("https://{TLS_NAME}/h2/{i}"))
                .body(Empty::<bytes::Bytes>::new())
                .expect("request");
            let resp = tokio::time::timeout(IO, tx.send_request(req))
                .await
                .expect("h2 response timed out")
                .expect("h2 response");
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert!(resp.headers().contains_key("x-engine-probe"));
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], format!("/h2/{i}").as_bytes());
            assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
        }

        // The probe tells the engines apart: with `http1_engine = "hyper"` the same client
        // gets hyper.
        let h = RawUpstream::start(Arc::new(probe)).await;
        let text = Engine::Hyper.config(&[raw_endpoint(h.addr)], TLS_LISTENER);
        let hr = start_tls_router(&text, tls_fixture().ca.client()).await;
        hr.wait_all_healthy().await;
        let (_, _, mut c) = open(&hr, TLS_NAME, &[b"http/1.1"]).await;
        assert_eq!(gets(&mut c, TLS_NAME, 2).await, ["hyper"; 2]);
        assert_eq!(h.last().header("x-forwarded-proto"), Some("https"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_the_native_engine_serves_each_name() {
    bounded(async {
        let up = RawUpstream::start(Arc::new(probe)).await;
        let f = tls_fixture();
        let other = f.ca.leaf(&["other.test", "*.other.test"]);
        let listener = "http1_engine = \"native\"\ntls = { cert = \"{dir}/edge.pem\", key = \
                        \"{dir}/edge.key\", sni = [{ cert = \"{dir}/other.pem\", key = \
                        \"{dir}/other.key\" }] }";
        let text = config(&[raw_endpoint(up.addr)], "", listener);
        let r = TestRouter::start_with_files(
            &text,
            &[
                ("edge.pem", &f.cert_pem),
                ("edge.key", &f.key_pem),
                ("other.pem", &other.cert_pem),
                ("other.key", &other.key_pem),
            ],
        )
        .await;
        r.wait_all_healthy().await;
        let default = pem_der(&f.cert_pem);
        for (sni, want) in [
            (TLS_NAME, &default),
            ("other.test", &other.der),
            ("www.other.test", &other.der),
        ] {
            let (_, cert, mut c) = open(&r, sni, &[b"http/1.1"]).await;
            assert!(cert == *want, "SNI {sni}: wrong certificate");
            assert_eq!(gets(&mut c, sni, 2).await, ["native"; 2], "SNI {sni}");
            assert_eq!(up.last().header("x-forwarded-host"), Some(sni));
        }
    })
    .await;
}

/// The DER of the first certificate in `pem`.
fn pem_der(pem: &str) -> Vec<u8> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("valid PEM")
        .to_vec()
}

/// Bodies up to the small-body limit (16 KiB) and a chunked body in hand are read whole by
/// the native engine over TLS, on one keep-alive connection, pipelined or not; a larger
/// body hands the connection to hyper, which serves the rest of it with the bytes already
/// read replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_keep_alive_bodies_around_the_small_body_limit() {
    bounded(async {
        let up = RawUpstream::start(Arc::new(probe)).await;
        let r = tls_router(Engine::NativeTls, &up).await;
        let (_, _, mut c) = open(&r, TLS_NAME, &[]).await;
        let post = |n: usize, seed: u8| {
            let mut v = format!(
                "POST /body/{n} HTTP/1.1\r\nHost: {TLS_NAME}\r\nContent-Length: {n}\r\n\r\n"
            )
            .into_bytes();
            v.extend_from_slice(&pattern(n, seed));
            v
        };
        for (i, n) in [1usize, 16 * 1024 - 1, 16 * 1024].into_iter().enumerate() {
            c.send(post(n, i as u8)).await;
            let (raw, resp) = c.read_raw(false).await;
            assert_eq!(resp.status, 200, "{raw}");
            assert!(resp.body == pattern(n, i as u8), "{n}-byte body changed");
            assert_eq!(engine_of(&raw), "native", "{n}-byte body");
        }

        // Chunked, and two GETs pipelined behind it, in one write.
        let mut burst = format!(
            "POST /chunked HTTP/1.1\r\nHost: {TLS_NAME}\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        for t in ["/p/1", "/p/2"] {
            burst.push_str(&format!("GET {t} HTTP/1.1\r\nHost: {TLS_NAME}\r\n\r\n"));
        }
        c.send(burst).await;
        for want in ["hello world", "/p/1", "/p/2"] {
            let (raw, resp) = c.read_raw(false).await;
            assert_eq!((resp.status, resp.text().as_str()), (200, want), "{raw}");
            assert_eq!(engine_of(&raw), "native", "{want}");
        }
        assert!(up
            .seen()
            .iter()
            .any(|q| q.chunked && q.body == b"hello world"));

        // Over the limit: hyper streams it, on the same connection, and serves what follows.
        let n = 16 * 1024 + 1;
        c.send(post(n, 9)).await;
        let (raw, resp) = c.read_raw(false).await;
        assert_eq!(resp.status, 200, "{raw}");
        assert!(resp.body == pattern(n, 9), "{n}-byte body changed");
        assert_eq!(engine_of(&raw), "hyper", "a body over the limit");
        assert_eq!(gets(&mut c, TLS_NAME, 2).await, ["hyper"; 2]);
        assert!(up.errors().is_empty(), "{:?}", up.errors());
    })
    .await;
}
