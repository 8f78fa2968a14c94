//! HTTP/2 clients (h2c, prior knowledge) through the router to plain HTTP/1.1 backends on
//! loopback: the hyper engine's own upstream leg. Bodies both ways (chunked, by length,
//! delimited by close, several MiB, every byte checked), pooled connections reused and
//! replaced when the backend closed them, and a backend that breaks off mid-body.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Client<B> = hyper_util::client::legacy::Client<HttpConnector, B>;

fn h2c<B>() -> Client<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// The bytes of a patterned body: no two neighbouring 251-byte runs alike, so a lost,
/// repeated or reordered piece shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// The body of a 200 answer to a POST of `body` to `url`.
async fn echoed<B>(c: &Client<B>, url: &str, body: B) -> Bytes
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let req = Request::post(url).body(body).expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(30), c.request(req))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(resp.status(), 200);
    resp.into_body()
        .collect()
        .await
        .expect("echo body")
        .to_bytes()
}

async fn get(c: &Client<Full<Bytes>>, url: &str) -> (u16, Result<Bytes, String>) {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("response head in time")
        .expect("h2c request");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(20), resp.into_body().collect())
        .await
        .expect("body in time")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_mib_both_ways_arrive_whole_and_the_connection_is_reused() {
    let b = Backend::start("a", 0).await;
    let r = TestRouter::start(&config(&[endpoint(&b, "r1", "r1a")], "", "")).await;
    r.wait_all_healthy().await;

    // A streamed upload of unknown length goes up chunked; the echo streams it back.
    let sent = pattern(5 * 1024 * 1024 + 17);
    let frames: Vec<Result<hyper::body::Frame<Bytes>, std::convert::Infallible>> = sent
        .chunks(100_000)
        .map(|c| Ok(hyper::body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let got = echoed(&h2c(), &r.url("/echo"), body).await;
    assert_eq!(first_mismatch(&sent, &got), None, "chunked upload echoed");

    // A whole body of known length goes up with its Content-Length.
    let c = h2c::<Full<Bytes>>();
    let sent = pattern(3 * 1024 * 1024 + 5);
    let got = echoed(&c, &r.url("/echo"), Full::new(Bytes::from(sent.clone()))).await;
    assert_eq!(first_mismatch(&sent, &got), None, "sized upload echoed");
    let seen = b.ctl.seen_headers();
    assert_eq!(
        seen.get("content-length").and_then(|v| v.to_str().ok()),
        Some(sent.len().to_string().as_str())
    );

    // A large chunked response.
    let n = 6 * 1024 * 1024 + 3;
    let (status, body) = get(&c, &r.url(&format!("/bytes/{n}"))).await;
    assert_eq!(status, 200);
    let body = body.expect("whole body");
    assert_eq!(body.len(), n);
    assert!(body.iter().all(|b| *b == b'x'));

    // Sequential requests share pooled upstream connections.
    let before = b.ctl.accepted.load(Ordering::SeqCst);
    for i in 0..50 {
        let (status, body) = get(&c, &r.url(&format!("/n{i}"))).await;
        assert_eq!((status, body.as_deref().ok()), (200, Some(&b"a"[..])));
    }
    let opened = b.ctl.accepted.load(Ordering::SeqCst) - before;
    assert!(opened <= 2, "{opened} upstream connections for 50 requests");
}

/// A raw HTTP/1.1 backend: `answer(path, nth request on this connection)` gives the bytes
/// to write and whether to close after them (`None`: close without answering). Health
/// checks get a short 200.
struct Raw {
    addr: SocketAddr,
    /// Requests closed without an answer.
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Answer = fn(&str, u32) -> Option<(Vec<u8>, bool)>;

async fn raw(answer: Answer) -> Raw {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let dropped = Arc::new(AtomicU64::new(0));
    let d = dropped.clone();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve_raw(s, answer, d.clone()));
        }
    });
    Raw {
        addr,
        dropped,
        task,
    }
}

async fn serve_raw(mut s: TcpStream, answer: Answer, dropped: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    let mut nth = 0;
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        buf.drain(..end);
        // A body announced by length is read before the answer, as a server does.
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        if path == "/healthz" {
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
            if s.write_all(ok).await.is_err() {
                return;
            }
            continue;
        }
        nth += 1;
        let Some((out, close)) = answer(&path, nth) else {
            dropped.fetch_add(1, Ordering::SeqCst);
            return;
        };
        if s.write_all(&out).await.is_err() {
            return;
        }
        if close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

fn raw_config(addr: SocketAddr) -> String {
    let ep =
        format!("\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"r1\"\nzone = \"r1a\"\n");
    config(&[ep], "", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_close_delimited_responses_are_relayed_whole() {
    let b = raw(|path, _| {
        Some(match path {
            "/chunked" => (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n".to_vec(), false),
            _ => {
                let mut v = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".to_vec();
                v.extend_from_slice(&pattern(300_000));
                (v, true)
            }
        })
    })
    .await;
    let r = TestRouter::start(&raw_config(b.addr)).await;
    r.wait_all_healthy().await;
    let c = h2c::<Full<Bytes>>();
    for _ in 0..3 {
        let req = Request::get(r.url("/chunked"))
            .body(Full::new(Bytes::new()))
            .expect("req");
        let resp = c.request(req).await.expect("h2c request");
        assert_eq!(resp.status(), 200);
        let whole = resp.into_body().collect().await.expect("whole body");
        let trailer = whole.trailers().and_then(|t| t.get("x-trailer")).cloned();
        assert_eq!(trailer.as_ref().map(|v| v.as_bytes()), Some(&b"1"[..]));
        assert_eq!(&whole.to_bytes()[..], b"hello world");
    }
    let (status, body) = get(&c, &r.url("/close")).await;
    assert_eq!(status, 200);
    let body = body.expect("a body delimited by close is whole");
    assert_eq!(first_mismatch(&pattern(300_000), &body), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_backend_closed_is_replaced_without_an_error() {
    // Every connection answers one request; the next one on it is closed unanswered, as a
    // backend whose keep-alive timeout fires just as the request arrives.
    let b = raw(|_, nth| {
        (nth == 1).then(|| {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh".to_vec(),
                false,
            )
        })
    })
    .await;
    let r = TestRouter::start(&raw_config(b.addr)).await;
    r.wait_all_healthy().await;
    let c = h2c::<Full<Bytes>>();
    for i in 0..10 {
        let (status, body) = get(&c, &r.url(&format!("/s{i}"))).await;
        assert_eq!(
            (status, body.as_deref()),
            (200, Ok(&b"fresh"[..])),
            "request {i}"
        );
    }
    assert!(
        b.dropped.load(Ordering::SeqCst) >= 1,
        "no request met a closed pooled connection"
    );
    // A body already sent cannot go again: on a pooled connection closed unanswered, such
    // a request fails at once (502) rather than going out again without its body.
    for i in 0..4 {
        let req = Request::put(r.url(&format!("/p{i}")))
            .body(Full::new(Bytes::from_static(b"payload")))
            .expect("req");
        let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
            .await
            .expect("an answer before the route's timeout")
            .expect("h2c request");
        assert!(
            matches!(resp.status().as_u16(), 200 | 502),
            "{}",
            resp.status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_breaking_off_mid_body_ends_the_stream_with_an_error() {
    let b = raw(|_, _| {
        let mut v = b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n".to_vec();
        v.extend_from_slice(&pattern(20_000));
        // The connection closes after this: 980 000 bytes short.
        Some((v, true))
    })
    .await;
    let r = TestRouter::start(&raw_config(b.addr)).await;
    r.wait_all_healthy().await;
    let c = h2c::<Full<Bytes>>();
    let req = Request::get(r.url("/cut"))
        .body(Full::new(Bytes::new()))
        .expect("req");
    // The stream may be reset before the client has read the head it was sent with; either
    // way it ends in an error, never as a shorter success.
    let outcome = match tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .expect("in time")
    {
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.map(|b| b.to_bytes().len())
        }
        Err(e) => {
            assert!(format!("{e:?}").contains("Reset"), "{e:?}");
            Ok(0)
        }
    };
    assert!(
        !matches!(outcome, Ok(n) if n > 0),
        "a truncated body must not end as a success: {outcome:?}"
    );
}
