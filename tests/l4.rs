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
        Echo::start_delayed(Duration::ZERO).await
    }

    /// An echo that answers the first bytes of each connection only after `delay`.
    async fn start_delayed(delay: Duration) -> Echo {
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
                                    tokio::time::sleep(delay).await;
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

/// Loopback zones are equally near, so the own zone must rank first. The cross-region
/// margin is how much faster another region must be to take the traffic: wide enough here
/// that a loaded machine's stalled probes cannot make it so.
const OWN_ZONE_FIRST: &str = "[routing]\ncross_region_margin = \"50ms\"\n";

/// Waits until /routes ranks the own zone (r1a) first in the first cluster.
async fn wait_own_zone_first(r: &TestRouter) {
    wait_until(
        "the own zone ranks first",
        Duration::from_secs(10),
        || async {
            let routes = r.routes().await;
            routes["clusters"][0]["zones"]
                .as_array()
                .and_then(|zs| zs.iter().find(|z| z["rank"] == 0))
                .is_some_and(|z| z["zone"] == "r1a")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_goes_to_the_nearest_zone_and_fails_over_without_a_failed_connect() {
    let near = Echo::start().await;
    let far = Echo::start().await;
    let r = TestRouter::start(&config(
        &format!("{TCP}{OWN_ZONE_FIRST}"),
        "connect_timeout = \"500ms\"",
        &[
            endpoint(near.addr, "r1", "r1a"),
            endpoint(far.addr, "r2", "r2a"),
        ],
    ))
    .await;
    r.wait_all_healthy().await;
    wait_own_zone_first(&r).await;
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
    assert_eq!(
        (near.served(), far.served()),
        (20, 0),
        "all in the own zone"
    );
    let (dying, other) = (&near, &far);
    let before = other.served();

    // An open connection to the zone that dies is closed.
    let mut open = TcpStream::connect(addr).await.expect("connect");
    open.write_all(b"hi").await.expect("write");
    let mut two = [0u8; 2];
    open.read_exact(&mut two).await.expect("echo");
    assert_eq!(
        dying.served(),
        21,
        "the open connection is in the own zone too"
    );
    dying.kill();
    // Aborting the server's tasks closes its socket a moment later; a connect that the
    // dying socket still accepts would be a connection cut after it began, not a failed
    // connect.
    let dead = dying.addr;
    wait_until(
        "the killed zone refuses",
        Duration::from_secs(10),
        || async move { TcpStream::connect(dead).await.is_err() },
    )
    .await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
    drop(open);

    // New connections land on the other zone, every one of them, before any probe has
    // noticed: a refused connect is retried there.
    for i in 0..30u8 {
        let got = round_trip(addr, &[i; 100])
            .await
            .expect("no failed connect");
        assert_eq!(
            got.len(),
            103,
            "connection {i}: a failed connect reached the client"
        );
        assert_eq!(&got[..100], &[i; 100][..]);
    }
    assert_eq!(other.served() - before, 30);
    let other_zone = "zone=\"r2a\"";
    assert!(
        metric(
            &r,
            "edge_router_l4_connections_total",
            &["listener=\"t\"", other_zone]
        )
        .await
            >= 30.0
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_slow_to_reply_shows_a_higher_request_latency() {
    const DELAY: Duration = Duration::from_millis(300);
    let fast = Echo::start().await;
    let slow = Echo::start_delayed(DELAY).await;
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n\
             cluster = \"{name}\"\n"
        )
    };
    let cluster = |name: &str, echo: &Echo, zone: &str| {
        format!(
            "[[cluster]]\nname = \"{name}\"\n[cluster.health_check]\ninterval = \"100ms\"\n\
             timeout = \"1s\"\nhealthy_threshold = 1\n{}",
            endpoint(echo.addr, "r1", zone)
        )
    };
    let r = TestRouter::start(&format!(
        "{}{}[admin]\naddress = \"127.0.0.1:0\"\n[locality]\nregion = \"r1\"\nzone = \"r1a\"\n{}{}",
        listener("fast"),
        listener("slow"),
        cluster("fast", &fast, "r1a"),
        cluster("slow", &slow, "r1b"),
    ))
    .await;
    r.wait_all_healthy().await;
    for name in ["slow", "fast"] {
        let addr = r.router.listener_addr(name).expect("tcp listener");
        for i in 0..3u8 {
            let got = round_trip(addr, &[i; 100]).await.expect("round trip");
            assert_eq!(got.len(), 103);
        }
    }
    let latency = |routes: &serde_json::Value, cluster: &str, key: &str| {
        routes["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["name"] == cluster))
            .and_then(|c| c["endpoints"][0][key].as_f64())
    };
    let routes = r.routes().await;
    let (fast_ms, slow_ms) = (
        latency(&routes, "fast", "request_latency_ms").expect("fast has samples"),
        latency(&routes, "slow", "request_latency_ms").expect("slow has samples"),
    );
    // Every sample of the slow upstream waited out its delay; the connect alone is far less.
    assert!(
        slow_ms >= DELAY.as_secs_f64() * 1e3,
        "slow {slow_ms} ms, fast {fast_ms} ms"
    );
    assert!(slow_ms > fast_ms, "slow {slow_ms} ms, fast {fast_ms} ms");
    // Probes only connect, so they do not see the slow reply: the two measures differ.
    let probe_ms = latency(&routes, "slow", "latency_ms").expect("probed");
    assert!(
        probe_ms < slow_ms,
        "probe {probe_ms} ms, requests {slow_ms} ms"
    );
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

/// A UDP upstream answering `NAME:` + each datagram, with a TCP listener on the same port
/// for the connect health check. `kill` stops both.
struct UdpEcho {
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl UdpEcho {
    async fn start(name: &'static str) -> UdpEcho {
        let (u, t) = loop {
            let t = TcpListener::bind("127.0.0.1:0").await.expect("bind tcp");
            let port = t.local_addr().expect("addr").port();
            // The same port number for UDP may be taken by someone else: try another.
            if let Ok(u) = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await {
                break (u, t);
            }
        };
        let addr = u.local_addr().expect("addr");
        let udp = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = u.recv_from(&mut buf).await {
                let mut reply = format!("{name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = u.send_to(&reply, from).await;
            }
        });
        let tcp = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = t.accept().await {
                held.push(s);
                held.truncate(64);
            }
        });
        UdpEcho {
            addr,
            tasks: vec![udp, tcp],
        }
    }

    fn kill(&mut self) {
        self.tasks.drain(..).for_each(|h| h.abort());
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends `msg` from `s` to `to` and waits for one answer.
async fn ask(s: &tokio::net::UdpSocket, to: SocketAddr, msg: &str) -> Option<String> {
    s.send_to(msg.as_bytes(), to).await.ok()?;
    let mut buf = [0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_millis(1500), s.recv_from(&mut buf))
        .await
        .ok()?
        .ok()?;
    assert_eq!(from, to, "replies come from the listener's address");
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

async fn udp_client() -> tokio::net::UdpSocket {
    tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind client")
}

fn udp_listener(extra: &str) -> String {
    format!("[[listener]]\nname = \"u\"\naddress = \"127.0.0.1:0\"\nprotocol = \"udp\"\ncluster = \"c\"\n{extra}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_go_to_the_nearest_zone_and_move_when_it_dies() {
    let mut near = UdpEcho::start("near").await;
    let far = UdpEcho::start("far").await;
    let r = TestRouter::start(&config(
        &format!("{}{OWN_ZONE_FIRST}", udp_listener("")),
        "",
        &[
            endpoint(near.addr, "r1", "r1a"),
            endpoint(far.addr, "r2", "r2a"),
        ],
    ))
    .await;
    r.wait_all_healthy().await;
    wait_own_zone_first(&r).await;
    let addr = r.router.listener_addr("u").expect("udp listener");
    // The own zone takes every flow; it is the one killed below.
    let pinned = udp_client().await;
    let first = ask(&pinned, addr, "q").await.expect("answer");
    assert_eq!(first, "near:q", "the own zone's endpoint answers");
    let (serving, other) = ("near", "far");
    // The flow's first reply is its endpoint's latency sample.
    let routes = r.routes().await;
    let sampled = routes["clusters"][0]["endpoints"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["zone"] == "r1a"))
        .map(|e| e["request_latency_ms"].is_number());
    assert_eq!(sampled, Some(true), "{routes}");
    for i in 0..5 {
        assert_eq!(
            ask(&pinned, addr, &format!("q{i}")).await,
            Some(format!("{serving}:q{i}"))
        );
    }
    for i in 0..5 {
        let c = udp_client().await;
        assert_eq!(
            ask(&c, addr, &format!("n{i}")).await,
            Some(format!("{serving}:n{i}"))
        );
    }

    near.kill();
    let dead_zone = "r1a";
    wait_until(
        "the serving zone is seen down",
        Duration::from_secs(10),
        || async {
            let routes = r.routes().await;
            routes["clusters"][0]["endpoints"]
                .as_array()
                .map(|eps| {
                    eps.iter()
                        .any(|e| e["zone"] == dead_zone && e["healthy"] == false)
                })
                .unwrap_or(false)
        },
    )
    .await;
    for i in 0..5 {
        let c = udp_client().await;
        assert_eq!(
            ask(&c, addr, &format!("m{i}")).await,
            Some(format!("{other}:m{i}"))
        );
    }
    // The pinned flow's endpoint left the table: its next datagram picks again.
    assert_eq!(
        ask(&pinned, addr, "again").await,
        Some(format!("{other}:again"))
    );
    let live_zone = "zone=\"r2a\"";
    assert!(
        metric(
            &r,
            "edge_router_l4_connections_total",
            &["listener=\"u\"", live_zone]
        )
        .await
            >= 6.0
    );
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_idle_out_and_the_cap_holds_under_a_flood_of_source_ports() {
    let echo = UdpEcho::start("e").await;
    let r = TestRouter::start(&config(
        &udp_listener("flow_idle_timeout = \"400ms\"\nmax_flows = 5"),
        "",
        &[endpoint(echo.addr, "r1", "r1a")],
    ))
    .await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("u").expect("udp listener");
    let active = |r: &TestRouter| {
        let url = r.admin_url("/metrics");
        async move {
            let text = common::get(&url).await.body;
            text.lines()
                .find(|l| l.starts_with("edge_router_udp_flows_active{listener=\"u\"}"))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(-1.0)
        }
    };

    let first = udp_client().await;
    assert_eq!(ask(&first, addr, "hello").await.as_deref(), Some("e:hello"));
    assert_eq!(active(&r).await, 1.0);
    wait_until("the idle flow expires", Duration::from_secs(10), || async {
        active(&r).await == 0.0
    })
    .await;

    // A flood of new source ports: five flows at most, the rest dropped and counted.
    let mut clients = Vec::new();
    for _ in 0..50 {
        let c = udp_client().await;
        c.send_to(b"x", addr).await.expect("send");
        clients.push(c);
    }
    wait_until(
        "the flood is dropped beyond the cap",
        Duration::from_secs(10),
        || async {
            metric(
                &r,
                "edge_router_udp_dropped_total",
                &["reason=\"flow_limit\""],
            )
            .await
                >= 45.0
        },
    )
    .await;
    let live = active(&r).await;
    assert!((1.0..=5.0).contains(&live), "{live}");
    // Once those idle out, a new client is served again.
    wait_until(
        "the flood's flows expire",
        Duration::from_secs(10),
        || async { active(&r).await == 0.0 },
    )
    .await;
    let late = udp_client().await;
    assert_eq!(ask(&late, addr, "late").await.as_deref(), Some("e:late"));
    r.stop().await;
}

/// A PROXY v2 header for a TCP/IPv4 connection from `src` to `dst`, written out by hand.
fn v2_header(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&src.0);
    h.extend_from_slice(&dst.0);
    h.extend_from_slice(&src.1.to_be_bytes());
    h.extend_from_slice(&dst.1.to_be_bytes());
    h
}

/// Sends `prefix` and then a GET; the whole answer, or "" when the router closed at once.
async fn http_after(addr: SocketAddr, prefix: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut out = prefix.to_vec();
    out.extend_from_slice(b"GET /pp HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n");
    let _ = s.write_all(&out).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).to_string()
}

fn http_with_proxy_protocol(backend: &common::Backend, trusted: &str) -> String {
    format!(
        r#"
[[listener]]
name = "web"
address = "127.0.0.1:0"
protocol = "http"
proxy_protocol = {{ trusted = [{trusted}] }}
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
{}
[[route]]
cluster = "api"
"#,
        common::endpoint(backend, "r1", "r1a")
    )
}

fn forwarded_for(b: &common::Backend) -> String {
    b.ctl
        .last_headers
        .lock()
        .ok()
        .and_then(|h| {
            h.as_ref()?
                .get("x-forwarded-for")?
                .to_str()
                .ok()
                .map(String::from)
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_trusted_sources_gives_the_client_address() {
    let b = common::Backend::start("a", 0).await;
    let r = TestRouter::start(&http_with_proxy_protocol(&b, "\"127.0.0.0/8\", \"::1\"")).await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("web").expect("web");

    let ans = http_after(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n").await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
    assert_eq!(forwarded_for(&b), "203.0.113.7");

    let ans = http_after(
        addr,
        &v2_header(([198, 51, 100, 9], 5555), ([127, 0, 0, 1], 80)),
    )
    .await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
    assert_eq!(forwarded_for(&b), "198.51.100.9");

    // Trusted sources must send a header; bad and cut-short headers close the connection.
    let hits = b.ctl.hits();
    for bad in [
        &b""[..],
        b"PROXY TCP4 203.0.113.7\r\n",
        b"PROXY TCP4 not.an.ip 127.0.0.1 1 2\r\n",
        b"PROXY TCP4 203.0.113.7 127.0.0.1 40000",
        &v2_header(([1, 2, 3, 4], 1), ([5, 6, 7, 8], 2))[..20],
    ] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let mut out = bad.to_vec();
        if !bad.is_empty() && bad.ends_with(b"\r\n") {
            out.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        }
        let _ = s.write_all(&out).await;
        if bad.is_empty() || !bad.ends_with(b"\r\n") {
            // A truncated header: the client stops sending; the router gives up and closes.
            let _ = s.shutdown().await;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut answer)).await;
        assert!(
            answer.is_empty(),
            "{:?}: {}",
            String::from_utf8_lossy(bad),
            String::from_utf8_lossy(&answer)
        );
    }
    assert_eq!(b.ctl.hits(), hits, "nothing reached the upstream");
    assert!(
        metric(
            &r,
            "edge_router_l4_rejected_total",
            &["listener=\"web\"", "proxy_protocol"]
        )
        .await
            >= 5.0
    );
    // ...and the router keeps serving.
    let ans = http_after(addr, b"PROXY TCP4 203.0.113.8 127.0.0.1 40000 80\r\n").await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
    assert_eq!(forwarded_for(&b), "203.0.113.8");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_from_untrusted_sources_is_refused() {
    let b = common::Backend::start("a", 0).await;
    let r = TestRouter::start(&http_with_proxy_protocol(&b, "\"10.0.0.0/8\"")).await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("web").expect("web");
    let ans = http_after(addr, b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n").await;
    assert!(ans.is_empty(), "{ans}");
    let ans = http_after(
        addr,
        &v2_header(([198, 51, 100, 9], 5555), ([127, 0, 0, 1], 80)),
    )
    .await;
    assert!(ans.is_empty(), "{ans}");
    assert!(
        metric(
            &r,
            "edge_router_l4_rejected_total",
            &["reason=\"proxy_protocol_untrusted\""]
        )
        .await
            >= 2.0
    );
    // Without a header it is served with its own address.
    let ans = http_after(addr, b"").await;
    assert!(ans.starts_with("HTTP/1.1 200"), "{ans}");
    assert_eq!(forwarded_for(&b), "127.0.0.1");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_clusters_send_the_client_address_in_a_proxy_header() {
    for (version, want_prefix) in [
        ("v1", &b"PROXY TCP4 127.0.0.1 127.0.0.1 "[..]),
        ("v2", b"\r\n\r\n\0\r\nQUIT\n"),
    ] {
        let echo = Echo::start().await;
        let r = TestRouter::start(&config(
            TCP,
            &format!("send_proxy_protocol = \"{version}\""),
            &[endpoint(echo.addr, "r1", "r1a")],
        ))
        .await;
        r.wait_all_healthy().await;
        let addr = r.router.listener_addr("t").expect("tcp listener");
        let got = round_trip(addr, b"payload").await.expect("round trip");
        assert!(
            got.ends_with(b"payloadEND"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        let first = echo
            .first
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .unwrap_or_default();
        assert!(
            first.starts_with(want_prefix),
            "{version}: {:?}",
            String::from_utf8_lossy(&first)
        );
        if version == "v1" {
            let line = String::from_utf8_lossy(&first);
            let line = line.lines().next().unwrap_or("");
            let parts: Vec<&str> = line.split(' ').collect();
            assert_eq!(parts[2], "127.0.0.1");
            assert_eq!(parts[5], addr.port().to_string(), "{line}");
        } else {
            // Family TCP4, then source 127.0.0.1 and destination the listener's port.
            assert_eq!(first[13], 0x11);
            assert_eq!(&first[16..20], &[127, 0, 0, 1]);
            assert_eq!(u16::from_be_bytes([first[26], first[27]]), addr.port());
        }
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_shutdown_stops_accepting_and_lets_open_connections_finish() {
    let echo = Echo::start().await;
    let r = TestRouter::start(&config(
        &format!("{TCP}drain_timeout = \"10s\"\n"),
        "",
        &[endpoint(echo.addr, "r1", "r1a")],
    ))
    .await;
    r.wait_all_healthy().await;
    let addr = r.router.listener_addr("t").expect("tcp listener");
    let mut open = TcpStream::connect(addr).await.expect("connect");
    open.write_all(b"before").await.expect("write");
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).await.expect("echo");

    let router = r.router.clone();
    let stopped = tokio::spawn(r.stop());
    wait_until(
        "the listener stops accepting",
        Duration::from_secs(10),
        || async { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    assert!(
        !stopped.is_finished(),
        "the open connection holds the drain"
    );
    // The open connection still works, and ends normally.
    open.write_all(b"during")
        .await
        .expect("write while draining");
    open.read_exact(&mut buf)
        .await
        .expect("echo while draining");
    assert_eq!(&buf, b"during");
    open.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    open.read_to_end(&mut rest).await.expect("read the end");
    assert_eq!(rest, b"END");
    tokio::time::timeout(Duration::from_secs(10), stopped)
        .await
        .expect("drained once the connection ended")
        .expect("stop");
    drop(router);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_tcp_and_udp_listeners_on_one_port_and_removes_them() {
    let echo = Echo::start().await;
    let base = config(TCP, "", &[endpoint(echo.addr, "r1", "r1a")]);
    let r = TestRouter::start(&base).await;
    r.wait_all_healthy().await;
    // A free port for both protocols.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let more = format!(
        "{TCP}[[listener]]\nname = \"t2\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"tcp\"\ncluster = \"c\"\n\
         [[listener]]\nname = \"u2\"\naddress = \"127.0.0.1:{port}\"\nprotocol = \"udp\"\ncluster = \"c\"\n"
    );
    // The first listener keeps its kernel-picked port: write it into the file.
    let t = r.router.listener_addr("t").expect("t");
    let more = more.replacen("127.0.0.1:0", &t.to_string(), 1);
    r.rewrite_config(&config(&more, "", &[endpoint(echo.addr, "r1", "r1a")]));
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    let t2 = r.router.listener_addr("t2").expect("t2 added");
    assert_eq!(t2.port(), port);
    assert!(r.router.listener_addr("u2").is_some());
    let got = round_trip(t2, b"new")
        .await
        .expect("served by the new listener");
    assert_eq!(got, b"newEND");
    let got = round_trip(t, b"old")
        .await
        .expect("the old one still serves");
    assert_eq!(got, b"oldEND");

    r.rewrite_config(&base);
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "{}", rep.body);
    assert!(r.router.listener_addr("t2").is_none());
    assert!(r.router.listener_addr("u2").is_none());
    wait_until(
        "the removed tcp listener refuses",
        Duration::from_secs(10),
        || async { TcpStream::connect(t2).await.is_err() },
    )
    .await;
    r.stop().await;
}
