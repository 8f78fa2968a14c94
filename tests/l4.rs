//! Layer-4 listeners end to end: tcp, tls_passthrough, udp and the PROXY protocol, with
//! real upstream servers on loopback.

mod common;
mod tls_util;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{post, wait_until, TestRouter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP upstream that echoes what it reads and, once the client has half-closed, writes
/// `END` and closes. `kill` refuses new connections and cuts open ones.
struct Echo {
    addr: SocketAddr,
    /// The first bytes of every connection (a PROXY header, when one is sent).
    first: Arc<Mutex<Vec<Vec<u8>>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Echo {
    async fn start() -> Echo {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let first = Arc::new(Mutex::new(Vec::new()));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (f, t) = (first.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let f = f.clone();
                let h = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut seen_first = false;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(n) => {
                                if !seen_first {
                                    seen_first = true;
                                    if let Ok(mut v) = f.lock() {
                                        v.push(buf[..n].to_vec());
                                    }
                                }
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(b"END").await;
                    let _ = s.shutdown().await;
                });
                if let Ok(mut v) = t.lock() {
                    v.push(h);
                }
            }
        });
        tasks.lock().expect("lock").push(accept);
        Echo { addr, first, tasks }
    }

    fn kill(&self) {
        if let Ok(mut v) = self.tasks.lock() {
            v.drain(..).for_each(|h| h.abort());
        }
    }

    /// Connections that carried data (health probes connect and send nothing).
    fn served(&self) -> usize {
        self.first.lock().map_or(0, |v| v.len())
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.kill();
    }
}

fn endpoint(addr: SocketAddr, region: &str, zone: &str) -> String {
    format!(
        "\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"{region}\"\nzone = \"{zone}\"\n"
    )
}

/// A config with the given listeners and one cluster "c" of the given endpoints, probed by
/// TCP connect.
fn config(listeners: &str, cluster_extra: &str, endpoints: &[String]) -> String {
    format!(
        r#"
{listeners}
[admin]
address = "127.0.0.1:0"

[locality]
region = "r1"
zone = "r1a"

[[cluster]]
name = "c"
{cluster_extra}
[cluster.health_check]
interval = "100ms"
timeout = "100ms"
healthy_threshold = 1
unhealthy_threshold = 1
{}
"#,
        endpoints.join("")
    )
}

const TCP: &str =
    "[[listener]]\nname = \"t\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\ncluster = \"c\"\n";

/// Writes `data`, half-closes, reads everything back.
async fn round_trip(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await
    });
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut out))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    writer.await.map_err(std::io::Error::other)??;
    Ok(out)
}

async fn metric(r: &TestRouter, family: &str, labels: &[&str]) -> f64 {
    let text = common::get(&r.admin_url("/metrics")).await.body;
    text.lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_goes_to_the_nearest_zone_and_fails_over_without_a_failed_connect() {
    let near = Echo::start().await;
    let far = Echo::start().await;
    let r = TestRouter::start(&config(
        TCP,
        "connect_timeout = \"500ms\"",
        &[
            endpoint(near.addr, "r1", "r1a"),
            endpoint(far.addr, "r2", "r2a"),
        ],
    ))
    .await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("t").expect("tcp listener");
    for i in 0..20u8 {
        let got = round_trip(addr, &[i; 1000]).await.expect("round trip");
        assert_eq!(got.len(), 1003);
        assert_eq!(
            &got[1000..],
            b"END",
            "the upstream's reply after a half-close"
        );
    }
    assert_eq!(near.served(), 20, "own zone first");
    assert_eq!(far.served(), 0);

    // An open connection to the zone that dies is closed.
    let mut open = TcpStream::connect(addr).await.expect("connect");
    open.write_all(b"hi").await.expect("write");
    let mut two = [0u8; 2];
    open.read_exact(&mut two).await.expect("echo");
    near.kill();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");

    // New connections land on the next zone, every one of them.
    for i in 0..30u8 {
        let got = round_trip(addr, &[i; 100])
            .await
            .expect("no failed connect");
        assert_eq!(&got[..100], &[i; 100][..]);
    }
    assert_eq!(far.served(), 30);
    assert!(
        metric(
            &r,
            "edge_router_l4_connections_total",
            &["listener=\"t\"", "zone=\"r2a\""]
        )
        .await
            >= 30.0
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_200_concurrent_connections_of_256_kib_each_way_intact() {
    let echo = Echo::start().await;
    // Made before any connection, so the clients do not compete with the router for CPU.
    let mut x = 2_654_435_761u32;
    let base: Vec<u8> = (0..256 * 1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let payloads: Vec<Vec<u8>> = (0..200usize)
        .map(|c| {
            let mut d = base.clone();
            d.rotate_left(c * 997);
            d
        })
        .collect();
    // A loaded debug build on a shared machine can take long to accept: a slow connect is
    // not what this test is about.
    let r = TestRouter::start(&config(
        TCP,
        "connect_timeout = \"10s\"",
        &[endpoint(echo.addr, "r1", "r1a")],
    ))
    .await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("t").expect("tcp listener");
    let mut tasks = Vec::new();
    for data in payloads {
        tasks.push(tokio::spawn(async move {
            match round_trip(addr, &data).await {
                Ok(got) => got.len() == data.len() + 3 && got[..data.len()] == data[..],
                Err(e) => {
                    eprintln!("round trip: {e}");
                    false
                }
            }
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.expect("task") {
            ok += 1;
        }
    }
    let m = common::get(&r.admin_url("/metrics")).await.body;
    let l4: Vec<&str> = m
        .lines()
        .filter(|l| l.contains("l4_") && !l.starts_with('#'))
        .collect();
    assert_eq!(ok, 200, "every byte back, in order; {l4:#?}");
    let up = metric(
        &r,
        "edge_router_l4_bytes_total",
        &["direction=\"to_upstream\""],
    )
    .await;
    assert!(up >= 200.0 * 256.0 * 1024.0, "{up}");
    r.stop().await;
}

/// Writes at most one byte per call, so a TLS client's ClientHello leaves in pieces.
struct OneByte<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for OneByte<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for OneByte<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = buf.len().min(1);
        std::pin::Pin::new(&mut self.0).poll_write(cx, &buf[..n])
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TLS upstream that answers every connection with its name.
async fn tls_upstream(leaf: &tls_util::Leaf, name: &'static str) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(leaf.server());
    let h = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut t) = acceptor.accept(s).await {
                    let _ = t.write_all(name.as_bytes()).await;
                    let _ = t.shutdown().await;
                }
            });
        }
    });
    (addr, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_passthrough_routes_by_sni_without_terminating() {
    let ca = tls_util::Ca::new("test ca");
    // a's certificate also names x.b.example.com, so a client can finish a handshake with
    // it once the default sends that name there.
    let a = ca.leaf(&["a.example.com", "x.b.example.com"]);
    let b = ca.leaf(&["b.example.com"]);
    let (a_addr, _ha) = tls_upstream(&a, "a").await;
    let (b_addr, _hb) = tls_upstream(&b, "b").await;
    let text = |default: &str| {
        format!(
            r#"
[[listener]]
name = "pass"
address = "127.0.0.1:0"
protocol = "tls_passthrough"
sni = [ {{ host = "*.example.com", cluster = "b" }}, {{ host = "a.example.com", cluster = "a" }} ]
{default}
[admin]
address = "127.0.0.1:0"
[locality]
region = "r1"
zone = "r1a"
[[cluster]]
name = "a"
[cluster.health_check]
interval = "100ms"
{}
[[cluster]]
name = "b"
[cluster.health_check]
interval = "100ms"
{}
"#,
            endpoint(a_addr, "r1", "r1a"),
            endpoint(b_addr, "r1", "r1a")
        )
    };
    let r = TestRouter::start(&text("")).await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("pass").expect("listener");
    let client = ca.client();

    async fn read_name<S: AsyncRead + Unpin>(mut s: S) -> String {
        let mut out = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await;
        out
    }
    // Exact beats the wildcard listed before it.
    let s = tls_util::connect(addr, "a.example.com", client.clone())
        .await
        .expect("a");
    assert_eq!(tls_util::peer_cert(&s), a.der);
    assert_eq!(read_name(s).await, "a");
    let s = tls_util::connect(addr, "b.example.com", client.clone())
        .await
        .expect("b");
    assert_eq!(tls_util::peer_cert(&s), b.der);
    assert_eq!(read_name(s).await, "b");
    // The wildcard covers one label only; without a default the connection is closed.
    assert!(tls_util::connect(addr, "x.b.example.com", client.clone())
        .await
        .is_err());
    assert!(
        metric(
            &r,
            "edge_router_l4_rejected_total",
            &["reason=\"no_sni_match\""]
        )
        .await
            >= 1.0
    );

    // A ClientHello arriving one byte at a time.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = rustls::pki_types::ServerName::try_from("a.example.com").expect("name");
    let s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(client.clone()).connect(name, OneByte(tcp)),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake");
    assert_eq!(read_name(s).await, "a");

    // Not TLS at all: closed and counted; the listener keeps serving.
    let mut junk = TcpStream::connect(addr).await.expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), junk.read_to_end(&mut rest)).await;
    assert!(rest.is_empty());
    assert!(
        metric(
            &r,
            "edge_router_l4_rejected_total",
            &["reason=\"client_hello\""]
        )
        .await
            >= 1.0
    );

    // With a default, an unknown name goes there.
    r.rewrite_config(&text("default_cluster = \"a\""));
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    wait_until("the default applies", Duration::from_secs(10), || {
        let client = client.clone();
        async move {
            match tls_util::connect(addr, "x.b.example.com", client).await {
                Ok(s) => read_name(s).await == "a",
                Err(_) => false,
            }
        }
    })
    .await;
    r.stop().await;
}
