//! Protocols and discovery over real sockets: HTTPS termination (h2 and http/1.1 by ALPN,
//! SNI, certificate reload), upstream TLS with a private CA (and refusals), HTTP/2 upstreams
//! sharing one connection, WebSocket passthrough, and DNS-named endpoints answered by a DNS
//! server run in this process. Certificates are made at test time with rcgen.

mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

// ---------------------------------------------------------------------------------------------
// Certificates

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A private CA made at test time.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate and its key, as PEM and DER.
struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
    key_der: Vec<u8>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Ca {
            cert: params.self_signed(&key).expect("self-signed"),
            key,
        }
    }

    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    fn leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names)
            .expect("params")
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
            key_der: key.serialize_der(),
        }
    }
}

impl Leaf {
    /// Writes NAME.pem and NAME.key into `dir`; returns their paths.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem).expect("write cert");
        std::fs::write(&k, &self.key_pem).expect("write key");
        (c, k)
    }
}

fn write_ca(dir: &Path, name: &str, ca: &Ca) -> PathBuf {
    let p = dir.join(format!("{name}.pem"));
    std::fs::write(&p, ca.cert.pem()).expect("write ca");
    p
}

/// `tls = { cert = "...", key = "..." }` for [listener].
fn listener_tls(cert: &Path, key: &Path, sni: &[(PathBuf, PathBuf)]) -> String {
    let extra: Vec<String> = sni
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    format!(
        "tls = {{ cert = \"{}\", key = \"{}\", sni = [{}] }}",
        cert.display(),
        key.display(),
        extra.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// A TLS client (tokio-rustls) and HTTP over it

fn client_tls(ca: &Ca, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("root");
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(c)
}

async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("handshake failed")
}

fn alpn(s: &TlsStream<TcpStream>) -> Option<String> {
    s.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).to_string())
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().expect("peer certificate")[0].to_vec()
}

type H1 = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Empty<Bytes>>;

async fn h1(s: TlsStream<TcpStream>) -> H1 {
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    tx
}

async fn h2(s: TlsStream<TcpStream>) -> H2 {
    let (tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    tx
}

async fn read(resp: Response<Incoming>) -> (StatusCode, Version, HeaderMap, String) {
    let (status, version, headers) = (resp.status(), resp.version(), resp.headers().clone());
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .expect("body timed out")
        .expect("body")
        .to_bytes();
    (
        status,
        version,
        headers,
        String::from_utf8_lossy(&body).to_string(),
    )
}

async fn get_h1(tx: &mut H1, host: &str, path: &str) -> (StatusCode, Version, HeaderMap, String) {
    let req = Request::get(path)
        .header(http::header::HOST, host)
        .body(Empty::new())
        .expect("req");
    tokio::time::timeout(Duration::from_secs(10), tx.ready())
        .await
        .expect("ready timed out")
        .expect("connection closed");
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("timed out")
        .expect("request failed");
    read(resp).await
}

async fn get_h2(tx: &mut H2, url: &str) -> (StatusCode, Version, HeaderMap, String) {
    let req = Request::get(url).body(Empty::new()).expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(10), tx.send_request(req))
        .await
        .expect("timed out")
        .expect("request failed");
    read(resp).await
}

// ---------------------------------------------------------------------------------------------
// Logs and metrics

/// Everything logged by this test binary (INFO and above), captured for assertions.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .with_writer(move || Capture(b.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(sub);
        buf
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(data);
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(needles: &[&str]) -> Vec<String> {
    let buf = logs();
    let text = String::from_utf8_lossy(&buf.lock().expect("logs")).to_string();
    text.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_string)
        .collect()
}

/// Sum of the samples of `family` whose labels contain every one of `labels`.
async fn metric(r: &TestRouter, family: &str, labels: &[&str]) -> f64 {
    let text = get(&r.admin_url("/metrics")).await.body;
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// (address, healthy) of every endpoint of `cluster` in /routes.
async fn endpoints_of(r: &TestRouter, cluster: &str) -> Vec<(String, bool)> {
    let routes = r.routes().await;
    let mut v: Vec<(String, bool)> = routes["clusters"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["name"] == cluster)
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["address"].as_str().unwrap_or("").to_string(),
                e["healthy"] == true,
            )
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// TLS termination

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clients_over_h2_and_http11() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("edge test ca");
    let (cert, key) = ca.leaf(&["edge.test"]).write(dir.path(), "edge");
    let b = Backend::start("b1", 0).await;
    let r = TestRouter::start(&config(
        &[endpoint(&b, "r1", "r1a")],
        "",
        &listener_tls(&cert, &key, &[]),
    ))
    .await;
    r.wait_all_healthy().await;

    // A browser-like client offers both; the router picks h2.
    let s = tls_connect(r.addr, "edge.test", client_tls(&ca, &[b"h2", b"http/1.1"])).await;
    assert_eq!(alpn(&s).as_deref(), Some("h2"));
    let mut tx = h2(s).await;
    for i in 0..3 {
        let (status, version, headers, body) =
            get_h2(&mut tx, &format!("https://edge.test/h2/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_2);
        assert_eq!(body, "b1");
        assert!(headers.contains_key("x-request-id"));
    }
    let seen = b
        .ctl
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-host"], "edge.test");

    // A client offering only http/1.1 gets http/1.1.
    let s = tls_connect(r.addr, "edge.test", client_tls(&ca, &[b"http/1.1"])).await;
    assert_eq!(alpn(&s).as_deref(), Some("http/1.1"));
    let mut tx = h1(s).await;
    for i in 0..3 {
        let (status, version, _, body) = get_h1(&mut tx, "edge.test", &format!("/h1/{i}")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, Version::HTTP_11);
        assert_eq!(body, "b1");
    }
    let seen = b
        .ctl
        .last_headers
        .lock()
        .expect("lock")
        .clone()
        .expect("headers");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(b.ctl.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_between_two_certificates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("edge test ca");
    let a = ca.leaf(&["a.test"]);
    let bb = ca.leaf(&["b.test", "*.b.test"]);
    let (ac, ak) = a.write(dir.path(), "a");
    let (bc, bk) = bb.write(dir.path(), "b");
    let b = Backend::start("b1", 0).await;
    let r = TestRouter::start(&config(
        &[endpoint(&b, "r1", "r1a")],
        "",
        &listener_tls(&ac, &ak, &[(bc, bk)]),
    ))
    .await;
    r.wait_all_healthy().await;
    let cfg = client_tls(&ca, &[b"http/1.1"]);
    for (sni, want, which) in [
        ("a.test", &a.der, "a"),
        ("b.test", &bb.der, "b"),
        ("www.b.test", &bb.der, "b (wildcard)"),
    ] {
        let s = tls_connect(r.addr, sni, cfg.clone()).await;
        assert!(
            peer_cert(&s) == *want,
            "SNI {sni} should get certificate {which}"
        );
        let mut tx = h1(s).await;
        let (status, _, _, body) = get_h1(&mut tx, sni, "/").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "b1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_via_admin_keeps_open_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("edge test ca");
    let first = ca.leaf(&["edge.test"]);
    let (cert, key) = first.write(dir.path(), "edge");
    let b = Backend::start("b1", 0).await;
    let r = TestRouter::start(&config(
        &[endpoint(&b, "r1", "r1a")],
        "",
        &listener_tls(&cert, &key, &[]),
    ))
    .await;
    r.wait_all_healthy().await;
    let cfg = client_tls(&ca, &[b"http/1.1"]);

    let s = tls_connect(r.addr, "edge.test", cfg.clone()).await;
    assert!(peer_cert(&s) == first.der);
    let mut old = h1(s).await;
    assert_eq!(get_h1(&mut old, "edge.test", "/").await.0, StatusCode::OK);

    // Rotate: new files at the same paths, then POST /reload.
    let second = ca.leaf(&["edge.test"]);
    second.write(dir.path(), "edge");
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 200, "reload: {}", rep.body);
    assert!(rep.body.contains("certificate"), "{}", rep.body);
    let s = tls_connect(r.addr, "edge.test", cfg.clone()).await;
    assert!(
        peer_cert(&s) == second.der,
        "a new connection gets the new certificate"
    );
    let mut new = h1(s).await;
    assert_eq!(get_h1(&mut new, "edge.test", "/").await.0, StatusCode::OK);
    // The connection opened before the reload is still served.
    assert_eq!(
        get_h1(&mut old, "edge.test", "/again").await.0,
        StatusCode::OK
    );

    // A key that does not match its certificate fails the reload and keeps the old pair.
    std::fs::write(&key, ca.leaf(&["edge.test"]).key_pem).expect("write key");
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 422, "{}", rep.body);
    assert!(rep.body.contains("listener.tls"), "{}", rep.body);
    assert!(rep.body.contains("do not match"), "{}", rep.body);
    let s = tls_connect(r.addr, "edge.test", cfg.clone()).await;
    assert!(
        peer_cert(&s) == second.der,
        "a failed reload keeps the running certificate"
    );
    let mut tx = h1(s).await;
    assert_eq!(get_h1(&mut tx, "edge.test", "/").await.0, StatusCode::OK);
    // An unreadable file too.
    std::fs::remove_file(&cert).expect("rm");
    let rep = post(&r.admin_url("/reload")).await;
    assert_eq!(rep.status, 422, "{}", rep.body);
    assert!(rep.body.contains("cannot read"), "{}", rep.body);
    assert_eq!(
        metric(
            &r,
            "edge_router_config_reloads_total",
            &["result=\"failure\""]
        )
        .await,
        2.0
    );
    assert_eq!(
        get_h1(&mut old, "edge.test", "/still").await.0,
        StatusCode::OK
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream TLS

/// An HTTPS backend: answers /healthz, and anything else with "tls <version>"; counts
/// handshakes and the TCP connections that carried proxied requests.
struct TlsBackend {
    addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    hits: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tls_backend(leaf: &Leaf) -> TlsBackend {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(leaf.der.clone())],
            PrivateKeyDer::Pkcs8(leaf.key_der.clone().into()),
        )
        .expect("server cert");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let handshakes = Arc::new(AtomicUsize::new(0));
    let hits = Arc::new(AtomicUsize::new(0));
    let (hs, h) = (handshakes.clone(), hits.clone());
    let task = tokio::spawn(async move {
        let mut conns = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, hs, h) = (acceptor.clone(), hs.clone(), h.clone());
            conns.push(AbortOnDrop(tokio::spawn(async move {
                let Ok(s) = acceptor.accept(tcp).await else {
                    return;
                };
                hs.fetch_add(1, Ordering::SeqCst);
                let svc = service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        let body = if req.uri().path() == "/healthz" {
                            "ok".to_string()
                        } else {
                            h.fetch_add(1, Ordering::SeqCst);
                            format!("tls {:?}", req.version())
                        };
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body,
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            })));
            conns.retain(|c| !c.0.is_finished());
        }
    });
    TlsBackend {
        addr,
        handshakes,
        hits,
        task,
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn tls_endpoint(addr: SocketAddr, region: &str, zone: &str) -> String {
    format!(
        "\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"{region}\"\nzone = \"{zone}\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_with_a_private_ca_and_refusals() {
    let logs = logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("private upstream ca");
    let other = Ca::new("some other ca");
    let ca_pem = write_ca(dir.path(), "ca", &ca);
    let other_pem = write_ca(dir.path(), "other", &other);
    let be = tls_backend(&ca.leaf(&["backend.internal"])).await;

    // Right CA and SNI: health probes and requests go over TLS.
    let good = format!(
        "tls = {{ sni = \"backend.internal\", ca = \"{}\" }}",
        ca_pem.display()
    );
    let r = TestRouter::start(&config(&[tls_endpoint(be.addr, "r1", "r1a")], &good, "")).await;
    r.wait_all_healthy().await;
    let rep = get(&r.url("/x")).await;
    assert_eq!((rep.status, rep.body.as_str()), (200, "tls HTTP/1.1"));
    assert!(
        be.handshakes.load(Ordering::SeqCst) >= 2,
        "probes and requests"
    );
    drop(r);

    // Same cluster with http2: h2 by ALPN over TLS.
    let h2 = format!("{good}\nhttp2 = true");
    let r = TestRouter::start(&config(&[tls_endpoint(be.addr, "r1", "r1a")], &h2, "")).await;
    r.wait_all_healthy().await;
    let rep = get(&r.url("/x")).await;
    assert_eq!((rep.status, rep.body.as_str()), (200, "tls HTTP/2.0"));
    drop(r);

    // Wrong CA: the probe and the request are refused; 502 and a log line saying why.
    let hits = be.hits.load(Ordering::SeqCst);
    let wrong = format!(
        "tls = {{ sni = \"backend.internal\", ca = \"{}\" }}",
        other_pem.display()
    );
    let r = TestRouter::start(&config(&[tls_endpoint(be.addr, "r1", "r1a")], &wrong, "")).await;
    let rep = get(&r.url("/x")).await;
    assert_eq!(rep.status, 502, "{}", rep.body);
    assert_eq!(rep.header("x-edge-error"), Some("upstream_tls_error"));
    let line = log_lines_with(&["upstream request failed", &be.addr.to_string()])
        .into_iter()
        .find(|l| l.contains("WARN"))
        .unwrap_or_else(|| {
            panic!(
                "no warn line; logs:\n{}",
                String::from_utf8_lossy(&logs.lock().expect("logs"))
            )
        });
    assert!(
        line.contains("TLS handshake with upstream failed")
            && line.contains("invalid peer certificate")
            && line.contains("UnknownIssuer"),
        "{line}"
    );
    wait_until(
        "the probe to report the refused certificate",
        Duration::from_secs(10),
        || async {
            metric(
                &r,
                "edge_router_health_checks_total",
                &["result=\"failure\""],
            )
            .await
                >= 1.0
        },
    )
    .await;
    assert!(
        !endpoints_of(&r, "api").await[0].1,
        "the endpoint is not healthy"
    );
    drop(r);

    // Right CA, wrong name: refused as well.
    let wrong_name = format!(
        "tls = {{ sni = \"elsewhere.internal\", ca = \"{}\" }}",
        ca_pem.display()
    );
    let r = TestRouter::start(&config(
        &[tls_endpoint(be.addr, "r1", "r1a")],
        &wrong_name,
        "",
    ))
    .await;
    let rep = get(&r.url("/y")).await;
    assert_eq!(rep.status, 502);
    assert_eq!(rep.header("x-edge-error"), Some("upstream_tls_error"));
    assert!(
        !log_lines_with(&[
            "upstream request failed",
            "TLS handshake with upstream failed",
            "not valid for name",
            "elsewhere.internal",
        ])
        .is_empty(),
        "a log line names the certificate problem"
    );
    assert_eq!(
        be.hits.load(Ordering::SeqCst),
        hits,
        "no request reached the backend"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 upstream

/// A cleartext HTTP/2 (prior knowledge) backend that holds every proxied request until
/// released, recording which TCP connection carried it.
struct H2Backend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    conns: Arc<Mutex<HashSet<usize>>>,
    in_flight: Arc<AtomicUsize>,
    versions: Arc<Mutex<HashSet<Version>>>,
    release: tokio::sync::watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn h2_backend() -> H2Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (release, rx) = tokio::sync::watch::channel(false);
    let accepts = Arc::new(AtomicUsize::new(0));
    let conns = Arc::new(Mutex::new(HashSet::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let versions = Arc::new(Mutex::new(HashSet::new()));
    let (a, c, f, v) = (
        accepts.clone(),
        conns.clone(),
        in_flight.clone(),
        versions.clone(),
    );
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let id = a.fetch_add(1, Ordering::SeqCst);
            let (c, f, v, rx) = (c.clone(), f.clone(), v.clone(), rx.clone());
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (c, f, v, mut rx) = (c.clone(), f.clone(), v.clone(), rx.clone());
                    async move {
                        if req.uri().path() != "/healthz" {
                            c.lock().expect("lock").insert(id);
                            v.lock().expect("lock").insert(req.version());
                            f.fetch_add(1, Ordering::SeqCst);
                            let _ = tokio::time::timeout(
                                Duration::from_secs(30),
                                rx.wait_for(|go| *go),
                            )
                            .await;
                            f.fetch_sub(1, Ordering::SeqCst);
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"h2 backend"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(1000)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            })));
            tasks.retain(|t| !t.0.is_finished());
        }
    });
    H2Backend {
        addr,
        accepts,
        conns,
        in_flight,
        versions,
        release,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_carries_many_concurrent_streams_on_one_connection() {
    let be = h2_backend().await;
    let r = TestRouter::start(&config(
        &[tls_endpoint(be.addr, "r1", "r1a")],
        "http2 = true",
        "",
    ))
    .await;
    r.wait_all_healthy().await;
    const N: usize = 100;
    let url = r.url("/held");
    let requests: Vec<_> = (0..N)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    // Every request is held at the backend at once: N concurrent streams.
    wait_until(
        "all requests in flight at the backend",
        Duration::from_secs(30),
        || async { be.in_flight.load(Ordering::SeqCst) == N },
    )
    .await;
    let conns = be.conns.lock().expect("lock").clone();
    assert_eq!(
        conns.len(),
        1,
        "{N} concurrent requests shared one upstream connection"
    );
    let _ = be.release.send(true);
    for t in requests {
        let rep = t.await.expect("task");
        assert_eq!((rep.status, rep.body.as_str()), (200, "h2 backend"));
    }
    assert_eq!(
        *be.versions.lock().expect("lock"),
        HashSet::from([Version::HTTP_2])
    );
    // One connection for the probes (their own pool), one for the proxied requests.
    let accepts = be.accepts.load(Ordering::SeqCst);
    assert!(accepts <= 2, "TCP accepts at the backend: {accepts}");
}

// ---------------------------------------------------------------------------------------------
// WebSocket

/// A WebSocket echo backend behind hyper's upgrade support; /healthz answers with
/// `health` after `delay_ms`. Text echoes come back prefixed with the backend's name.
struct WsBackend {
    addr: SocketAddr,
    health: Arc<AtomicU32>,
    upgrades: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for WsBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ws_backend(name: &'static str, delay_ms: u64) -> WsBackend {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let health = Arc::new(AtomicU32::new(200));
    let upgrades = Arc::new(AtomicUsize::new(0));
    let (h, u) = (health.clone(), upgrades.clone());
    let task = tokio::spawn(async move {
        let mut tasks = Vec::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (h, u) = (h.clone(), u.clone());
            tasks.push(AbortOnDrop(tokio::spawn(async move {
                let svc = service_fn(move |mut req: Request<Incoming>| {
                    let (h, u) = (h.clone(), u.clone());
                    async move {
                        let mut resp = Response::new(Full::new(Bytes::new()));
                        if req.uri().path() == "/healthz" {
                            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                            *resp.status_mut() =
                                StatusCode::from_u16(h.load(Ordering::SeqCst) as u16)
                                    .unwrap_or(StatusCode::OK);
                            return Ok::<_, std::convert::Infallible>(resp);
                        }
                        let key = req.headers().get("sec-websocket-key").cloned();
                        let wants_ws = req
                            .headers()
                            .get(http::header::UPGRADE)
                            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                        let (Some(key), true) = (key, wants_ws) else {
                            *resp.status_mut() = StatusCode::BAD_REQUEST;
                            return Ok(resp);
                        };
                        u.fetch_add(1, Ordering::SeqCst);
                        let on = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            let Ok(io) = on.await else { return };
                            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                                TokioIo::new(io),
                                Role::Server,
                                None,
                            )
                            .await;
                            while let Some(Ok(msg)) = ws.next().await {
                                let reply = match msg {
                                    WsMessage::Text(t) => {
                                        WsMessage::text(format!("{name}: {}", t.as_str()))
                                    }
                                    WsMessage::Binary(b) => WsMessage::Binary(b),
                                    WsMessage::Close(_) => break,
                                    _ => continue,
                                };
                                if ws.send(reply).await.is_err() {
                                    break;
                                }
                            }
                        });
                        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                        let hm = resp.headers_mut();
                        hm.insert(http::header::CONNECTION, "upgrade".parse().expect("hv"));
                        hm.insert(http::header::UPGRADE, "websocket".parse().expect("hv"));
                        hm.insert(
                            "sec-websocket-accept",
                            derive_accept_key(key.as_bytes()).parse().expect("hv"),
                        );
                        Ok(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .with_upgrades()
                    .await;
            })));
            tasks.retain(|t| !t.0.is_finished());
        }
    });
    WsBackend {
        addr,
        health,
        upgrades,
        task,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Opens a WebSocket through the router; returns it and the handshake's x-edge-route zone.
async fn ws_connect(r: &TestRouter) -> (Ws, String, String) {
    let tcp = TcpStream::connect(r.addr).await.expect("connect");
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(format!("ws://{}/chat", r.addr), tcp),
    )
    .await
    .expect("handshake timed out")
    .expect("websocket handshake through the router");
    let route = resp
        .headers()
        .get("x-edge-route")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (
        ws,
        route_field(&route, "zone"),
        route_field(&route, "reason"),
    )
}

async fn ws_roundtrip(ws: &mut Ws, msg: WsMessage) -> WsMessage {
    ws.send(msg).await.expect("send");
    tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("echo timed out")
        .expect("stream ended")
        .expect("echo")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_router_follows_nearest_healthy() {
    let near = ws_backend("near", 0).await;
    let far = ws_backend("far", 40).await;
    let r = TestRouter::start(&config(
        &[
            tls_endpoint(near.addr, "r1", "r1a"),
            tls_endpoint(far.addr, "r2", "r2a"),
        ],
        "",
        "",
    ))
    .await;
    r.wait_all_healthy().await;
    wait_until(
        "near zone ranked first",
        Duration::from_secs(10),
        || async { r.routes().await["clusters"][0]["zones"][0]["zone"] == "r1a" },
    )
    .await;

    let (mut ws, zone, reason) = ws_connect(&r).await;
    assert_eq!((zone.as_str(), reason.as_str()), ("r1a", "nearest"));
    for i in 0..5 {
        let got = ws_roundtrip(&mut ws, WsMessage::text(format!("hello {i}"))).await;
        assert_eq!(got, WsMessage::text(format!("near: hello {i}")));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let got = ws_roundtrip(&mut ws, WsMessage::binary(blob.clone())).await;
    assert_eq!(got, WsMessage::binary(blob));
    // Plain requests keep working next to the tunnel.
    let rep = get(&r.url("/plain")).await;
    assert_eq!(
        rep.status, 400,
        "the ws backend refuses non-upgrade requests"
    );

    // The near zone goes unhealthy: a new WebSocket fails over, the open one stays up.
    near.health.store(503, Ordering::SeqCst);
    wait_until(
        "near endpoint unhealthy",
        Duration::from_secs(10),
        || async {
            endpoints_of(&r, "api")
                .await
                .iter()
                .any(|(a, h)| *a == near.addr.to_string() && !h)
        },
    )
    .await;
    let (mut ws2, zone, reason) = ws_connect(&r).await;
    assert_eq!((zone.as_str(), reason.as_str()), ("r2a", "failover"));
    let got = ws_roundtrip(&mut ws2, WsMessage::text("again")).await;
    assert_eq!(got, WsMessage::text("far: again"));
    let got = ws_roundtrip(&mut ws, WsMessage::text("still here")).await;
    assert_eq!(got, WsMessage::text("near: still here"));
    ws.close(None).await.expect("close");
    ws2.close(None).await.expect("close");

    assert_eq!(near.upgrades.load(Ordering::SeqCst), 1);
    assert_eq!(far.upgrades.load(Ordering::SeqCst), 1);
    // Each WebSocket counted as one request, with code 101.
    assert_eq!(
        metric(
            &r,
            "edge_router_requests_total",
            &["cluster=\"api\"", "code=\"101\""]
        )
        .await,
        2.0
    );
}

// ---------------------------------------------------------------------------------------------
// DNS-named endpoints

/// A few lines of authoritative DNS over UDP on 127.0.0.1: `api.test.` A = a changeable
/// list; `_http._tcp.svc.test.` SRV = s1.svc.test.:P1 and s2.svc.test.:P2, both 127.0.0.1;
/// anything else NXDOMAIN. Every answer has TTL 1.
struct TestDns {
    addr: SocketAddr,
    a: Arc<Mutex<Vec<Ipv4Addr>>>,
    srv_ports: Arc<Mutex<Vec<u16>>>,
    down: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestDns {
    async fn start(a: &[Ipv4Addr], srv_ports: &[u16]) -> TestDns {
        use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
        use hickory_resolver::proto::rr::rdata::{A, SRV};
        use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp");
        let addr = sock.local_addr().expect("addr");
        let a = Arc::new(Mutex::new(a.to_vec()));
        let srv_ports = Arc::new(Mutex::new(srv_ports.to_vec()));
        let down = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicUsize::new(0));
        let (a2, s2, d2, q2) = (a.clone(), srv_ports.clone(), down.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                if d2.load(Ordering::SeqCst) {
                    continue; // an outage: no answer at all
                }
                let Ok(req) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = req.queries().first().cloned() else {
                    continue;
                };
                q2.fetch_add(1, Ordering::SeqCst);
                let mut resp = Message::new();
                resp.set_id(req.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(req.op_code())
                    .set_recursion_desired(req.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true);
                resp.add_query(q.clone());
                let qname = q.name().to_ascii().to_ascii_lowercase();
                let rec = |ip: Ipv4Addr| Record::from_rdata(q.name().clone(), 1, RData::A(A(ip)));
                match (qname.as_str(), q.query_type()) {
                    ("api.test.", RecordType::A) => {
                        for ip in a2.lock().expect("lock").iter() {
                            resp.add_answer(rec(*ip));
                        }
                    }
                    ("s1.svc.test." | "s2.svc.test.", RecordType::A) => {
                        resp.add_answer(rec(Ipv4Addr::LOCALHOST));
                    }
                    ("_http._tcp.svc.test.", RecordType::SRV) => {
                        let ports = s2.lock().expect("lock").clone();
                        for (i, port) in ports.into_iter().enumerate() {
                            let target =
                                Name::from_ascii(format!("s{}.svc.test.", i + 1)).expect("name");
                            resp.add_answer(Record::from_rdata(
                                q.name().clone(),
                                1,
                                RData::SRV(SRV::new(0, 10, port, target)),
                            ));
                        }
                    }
                    ("api.test." | "s1.svc.test." | "s2.svc.test." | "_http._tcp.svc.test.", _) => {
                    }
                    _ => {
                        resp.set_response_code(ResponseCode::NXDomain);
                    }
                }
                if let Ok(bytes) = resp.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        TestDns {
            addr,
            a,
            srv_ports,
            down,
            queries,
            task,
        }
    }

    fn set_a(&self, ips: &[Ipv4Addr]) {
        *self.a.lock().expect("lock") = ips.to_vec();
    }
}

/// A port free on both 127.0.0.2 and 127.0.0.3 (one name, two addresses, one port).
fn port_free_on_two_loopbacks() -> u16 {
    for _ in 0..50 {
        let Ok(l) = std::net::TcpListener::bind("127.0.0.2:0") else {
            continue;
        };
        let Ok(port) = l.local_addr().map(|a| a.port()) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.3", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.2 and 127.0.0.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_named_endpoints_follow_the_answer_and_survive_an_outage() {
    let port = port_free_on_two_loopbacks();
    let two: SocketAddr = ([127, 0, 0, 2], port).into();
    let three: SocketAddr = ([127, 0, 0, 3], port).into();
    let b2 = Backend::start_at("b2", 0, two).await;
    let b3 = Backend::start_at("b3", 0, three).await;
    let s1 = Backend::start("s1", 0).await;
    let s2 = Backend::start("s2", 0).await;
    let dns = TestDns::start(&[Ipv4Addr::new(127, 0, 0, 2)], &[s1.addr.port()]).await;
    let hc = r#"
[cluster.health_check]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 2
unhealthy_threshold = 2
"#;
    let toml = format!(
        r#"
[listener]
address = "127.0.0.1:0"
route_header = true

[admin]
address = "127.0.0.1:0"

[locality]
region = "r1"
zone = "r1a"

[dns]
nameserver = "{ns}"

[[cluster]]
name = "api"
dns_min_ttl = "200ms"
dns_max_ttl = "500ms"
{hc}
[[cluster.endpoint]]
address = "api.test:{port}"
region = "r1"
zone = "r1a"

[[cluster]]
name = "svc"
dns_min_ttl = "200ms"
dns_max_ttl = "500ms"
{hc}
[[cluster.endpoint]]
srv = "_http._tcp.svc.test"
region = "r1"
zone = "r1b"

[[route]]
path_prefix = "/svc"
cluster = "svc"

[[route]]
path_prefix = "/"
cluster = "api"
"#,
        ns = dns.addr
    );
    let r = TestRouter::start(&toml).await;
    let (two_s, three_s) = (two.to_string(), three.to_string());

    wait_until(
        "api.test -> 127.0.0.2 in /routes, healthy",
        Duration::from_secs(15),
        || async { endpoints_of(&r, "api").await == vec![(two_s.clone(), true)] },
    )
    .await;
    let rep = get(&r.url("/")).await;
    assert_eq!((rep.status, rep.header("x-backend")), (200, Some("b2")));
    assert_eq!(
        rep.zone(),
        "r1a",
        "a resolved address keeps its endpoint's zone"
    );

    // The answer grows: a new endpoint in the same zone.
    dns.set_a(&[Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)]);
    wait_until(
        "both addresses, healthy",
        Duration::from_secs(15),
        || async {
            endpoints_of(&r, "api").await == vec![(two_s.clone(), true), (three_s.clone(), true)]
        },
    )
    .await;

    // The answer moves: the old address leaves the table.
    dns.set_a(&[Ipv4Addr::new(127, 0, 0, 3)]);
    wait_until("only 127.0.0.3", Duration::from_secs(15), || async {
        endpoints_of(&r, "api").await == vec![(three_s.clone(), true)]
    })
    .await;
    let hits2 = b2.ctl.hits();
    for _ in 0..10 {
        let rep = get(&r.url("/")).await;
        assert_eq!((rep.status, rep.header("x-backend")), (200, Some("b3")));
    }
    assert_eq!(b2.ctl.hits(), hits2, "nothing goes to the vanished address");
    assert!(b3.ctl.hits() >= 10);

    // SRV: ports come from the records; a second target appears.
    wait_until("svc: one SRV target", Duration::from_secs(15), || async {
        endpoints_of(&r, "svc").await == vec![(s1.addr.to_string(), true)]
    })
    .await;
    *dns.srv_ports.lock().expect("lock") = vec![s1.addr.port(), s2.addr.port()];
    let mut want = vec![(s1.addr.to_string(), true), (s2.addr.to_string(), true)];
    want.sort();
    wait_until("svc: two SRV targets", Duration::from_secs(15), || async {
        endpoints_of(&r, "svc").await == want
    })
    .await;
    let rep = get(&r.url("/svc/x")).await;
    assert_eq!(rep.status, 200);
    assert!(matches!(rep.header("x-backend"), Some("s1" | "s2")));

    // Outage: the nameserver stops answering. Failures are counted and logged; the last
    // good addresses stay and keep serving.
    let ok_before = metric(
        &r,
        "edge_router_dns_resolutions_total",
        &["name=\"api.test\"", "result=\"success\""],
    )
    .await;
    assert!(ok_before >= 3.0, "successful look-ups counted: {ok_before}");
    dns.down.store(true, Ordering::SeqCst);
    wait_until("two failed look-ups", Duration::from_secs(20), || async {
        metric(
            &r,
            "edge_router_dns_resolutions_total",
            &["name=\"api.test\"", "result=\"failure\""],
        )
        .await
            >= 2.0
    })
    .await;
    assert_eq!(endpoints_of(&r, "api").await, vec![(three_s.clone(), true)]);
    assert_eq!(endpoints_of(&r, "svc").await, want);
    let rep = get(&r.url("/")).await;
    assert_eq!((rep.status, rep.header("x-backend")), (200, Some("b3")));

    // Back up with a new answer: followed again.
    dns.set_a(&[Ipv4Addr::new(127, 0, 0, 2)]);
    dns.down.store(false, Ordering::SeqCst);
    wait_until("back to 127.0.0.2", Duration::from_secs(20), || async {
        endpoints_of(&r, "api").await == vec![(two_s.clone(), true)]
    })
    .await;
    assert!(dns.queries.load(Ordering::SeqCst) > 0);
}
