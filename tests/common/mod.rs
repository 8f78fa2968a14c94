//! Test harness: real HTTP backends on loopback with injected latency and faults, and a real
//! router started in-process on free ports. Nothing here mocks the router's own parts.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edge_router::ops::router::{self as server, Router};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How a backend behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Ok = 0,
    /// Every request fails with 500.
    Error500 = 1,
    /// Connections are closed without an answer.
    Reset = 2,
}

pub struct BackendCtl {
    pub name: String,
    pub delay_ms: AtomicU64,
    mode: AtomicU8,
    /// Status of GET /healthz.
    pub health_status: AtomicU16,
    /// Requests served (health checks not counted).
    pub hits: AtomicU64,
    pub health_hits: AtomicU64,
    /// Requests whose path starts with /stall wait this long (ms) instead of delay_ms.
    pub stall_ms: AtomicU64,
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub accepted: AtomicU64,
    /// Up to this many microseconds of uniform random delay added to every answer
    /// (requests and health checks alike), on top of `delay_ms`.
    pub jitter_us: AtomicU64,
}

impl BackendCtl {
    pub fn set_mode(&self, m: Mode) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }
    pub fn mode(&self) -> Mode {
        match self.mode.load(Ordering::SeqCst) {
            1 => Mode::Error500,
            2 => Mode::Reset,
            _ => Mode::Ok,
        }
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
    /// The headers of the last request served (health checks aside).
    pub fn seen_headers(&self) -> HeaderMap {
        self.last_headers
            .lock()
            .expect("lock")
            .clone()
            .expect("a request was served")
    }
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
    /// Adds 0 to `ms` milliseconds of random delay to every answer.
    pub fn set_jitter(&self, ms: u64) {
        self.jitter_us.store(ms * 1000, Ordering::SeqCst);
    }
    /// `delay_ms` plus this answer's random jitter.
    fn answer_delay(&self, base_ms: u64) -> Duration {
        let j = self.jitter_us.load(Ordering::SeqCst);
        let extra = if j == 0 {
            0
        } else {
            rand::Rng::gen_range(&mut rand::thread_rng(), 0..=j)
        };
        Duration::from_millis(base_ms) + Duration::from_micros(extra)
    }
}

pub struct Backend {
    pub addr: SocketAddr,
    pub ctl: Arc<BackendCtl>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl Backend {
    /// Starts a backend on 127.0.0.1 with a free port.
    pub async fn start(name: &str, delay_ms: u64) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("addr");
        Self::serve(name, delay_ms, listener, addr)
    }

    /// Starts a backend that answers after `delay_ms` plus 0 to `jitter_ms` of uniform random
    /// delay, drawn anew for every answer (health checks included), like a real server on a
    /// real network.
    pub async fn start_jittered(name: &str, delay_ms: u64, jitter_ms: u64) -> Backend {
        let b = Self::start(name, delay_ms).await;
        b.ctl.set_jitter(jitter_ms);
        b
    }

    /// Starts a backend on a given address (to bring a killed one back on its port).
    pub async fn start_at(name: &str, delay_ms: u64, addr: SocketAddr) -> Backend {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match TcpListener::bind(addr).await {
                Ok(l) => return Self::serve(name, delay_ms, l, addr),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        }
    }

    fn serve(name: &str, delay_ms: u64, listener: TcpListener, addr: SocketAddr) -> Backend {
        let ctl = Arc::new(BackendCtl {
            name: name.to_string(),
            delay_ms: AtomicU64::new(delay_ms),
            mode: AtomicU8::new(Mode::Ok as u8),
            health_status: AtomicU16::new(200),
            hits: AtomicU64::new(0),
            health_hits: AtomicU64::new(0),
            stall_ms: AtomicU64::new(0),
            last_headers: Mutex::new(None),
            accepted: AtomicU64::new(0),
            jitter_us: AtomicU64::new(0),
        });
        let c = ctl.clone();
        let accept = tokio::spawn(async move {
            let conns = Arc::new(Mutex::new(Vec::<JoinHandle<()>>::new()));
            let _guard = AbortOnDrop(conns.clone());
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.accepted.fetch_add(1, Ordering::SeqCst);
                if c.mode() == Mode::Reset {
                    drop(stream);
                    continue;
                }
                let c2 = c.clone();
                let h = tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(c2.clone(), req));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
                if let Ok(mut v) = conns.lock() {
                    v.retain(|h| !h.is_finished());
                    v.push(h);
                }
            }
        });
        Backend {
            addr,
            ctl,
            accept: Mutex::new(Some(accept)),
        }
    }

    /// Kills the backend: the port refuses connections and open connections are cut.
    pub fn kill(&self) {
        if let Some(h) = self.accept.lock().expect("lock").take() {
            h.abort();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

struct AbortOnDrop(Arc<Mutex<Vec<JoinHandle<()>>>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Ok(v) = self.0.lock() {
            for h in v.iter() {
                h.abort();
            }
        }
    }
}

#[derive(Debug)]
struct Broken;
impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("backend set to reset")
    }
}
impl std::error::Error for Broken {}

async fn answer(c: Arc<BackendCtl>, req: Request<Incoming>) -> Result<Response<BoxBody>, Broken> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        c.health_hits.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(c.answer_delay(c.delay_ms.load(Ordering::SeqCst))).await;
        if c.mode() == Mode::Reset {
            return Err(Broken);
        }
        let status =
            StatusCode::from_u16(c.health_status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
        return Ok(resp(
            status,
            &c.name,
            Full::new(Bytes::from("ok")).map_err(|e| match e {}).boxed(),
        ));
    }
    c.hits.fetch_add(1, Ordering::SeqCst);
    if let Ok(mut h) = c.last_headers.lock() {
        *h = Some(req.headers().clone());
    }
    let delay = if path.starts_with("/stall") {
        c.stall_ms.load(Ordering::SeqCst)
    } else {
        c.delay_ms.load(Ordering::SeqCst)
    };
    let delay = c.answer_delay(delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match c.mode() {
        Mode::Reset => return Err(Broken),
        Mode::Error500 => {
            return Ok(resp(
                StatusCode::INTERNAL_SERVER_ERROR,
                &c.name,
                Full::new(Bytes::from("boom"))
                    .map_err(|e| match e {})
                    .boxed(),
            ))
        }
        Mode::Ok => {}
    }
    if path.starts_with("/echo") {
        // Streams the request body straight back, frame by frame.
        let body = req
            .into_body()
            .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { Box::new(e) })
            .boxed();
        return Ok(resp(StatusCode::OK, &c.name, body));
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        // A large streamed response of n bytes, made on the fly.
        let n: usize = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = (0..n.div_ceil(chunk.len())).map(move |i| {
            let len = chunk.len().min(n - i * chunk.len());
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper::body::Frame::data(
                chunk.slice(..len),
            ))
        });
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        return Ok(resp(StatusCode::OK, &c.name, body));
    }
    Ok(resp(
        StatusCode::OK,
        &c.name,
        Full::new(Bytes::from(c.name.clone()))
            .map_err(|e| match e {})
            .boxed(),
    ))
}

type BoxBody =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

fn resp(status: StatusCode, name: &str, body: BoxBody) -> Response<BoxBody> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(name) {
        r.headers_mut().insert("x-backend", v);
    }
    r
}

/// One endpoint line of a test config.
pub fn endpoint(b: &Backend, region: &str, zone: &str) -> String {
    format!(
        "\n[[cluster.endpoint]]\naddress = \"{}\"\nregion = \"{region}\"\nzone = \"{zone}\"\n",
        b.addr
    )
}

/// A config with one cluster "api": fast health checks, the given endpoints, one route.
/// `cluster_extra` goes inside [[cluster]] (before its tables), `top_extra` under [listener].
pub fn config(endpoints: &[String], cluster_extra: &str, listener_extra: &str) -> String {
    format!(
        r#"
[listener]
address = "127.0.0.1:0"
route_header = true
{listener_extra}

[admin]
address = "127.0.0.1:0"

[locality]
region = "r1"
zone = "r1a"

[[cluster]]
name = "api"
{cluster_extra}

[cluster.health_check]
path = "/healthz"
interval = "200ms"
timeout = "150ms"
healthy_threshold = 2
unhealthy_threshold = 2
{}

[[route]]
path_prefix = "/"
cluster = "api"
"#,
        endpoints.join("")
    )
}

pub struct TestRouter {
    pub router: Arc<Router>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    /// Set when the listener terminates TLS: how a client trusts it.
    pub client_tls: Option<Arc<rustls::ClientConfig>>,
    _dir: tempfile::TempDir,
    running: Option<server::Running>,
}

impl TestRouter {
    pub async fn start(toml: &str) -> TestRouter {
        Self::start_with_files(toml, &[]).await
    }

    /// Like [`TestRouter::start`], with `files` (name, contents) written next to the config
    /// first, for as long as the router lives; `{dir}` in the config text names their
    /// directory.
    pub async fn start_with_files(toml: &str, files: &[(&str, &str)]) -> TestRouter {
        let dir = tempfile::tempdir().expect("tempdir");
        for (name, contents) in files {
            std::fs::write(dir.path().join(name), contents).expect("write file");
        }
        let toml = toml.replace("{dir}", &dir.path().display().to_string());
        let path = dir.path().join("edge-router.toml");
        std::fs::write(&path, toml).expect("write config");
        let cfg =
            edge_router::config::load(&path).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        let running = server::start(cfg, Some(path.clone()))
            .await
            .unwrap_or_else(|e| panic!("start: {e}"));
        let router = running.router.clone();
        TestRouter {
            addr: router.data_addr,
            admin: router.admin_addr,
            router,
            config_path: path,
            client_tls: None,
            _dir: dir,
            running: Some(running),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub async fn routes(&self) -> serde_json::Value {
        let r = get(&self.admin_url("/routes")).await;
        serde_json::from_str(&r.body).expect("routes json")
    }

    /// Waits until every endpoint of the router has been probed healthy.
    pub async fn wait_all_healthy(&self) {
        let n = self
            .router
            .table()
            .clusters
            .iter()
            .map(|c| c.zones.iter().map(|z| z.endpoints.len()).sum::<usize>())
            .sum::<usize>();
        wait_until("all endpoints healthy", Duration::from_secs(10), || async {
            let r = self.routes().await;
            let healthy = r["clusters"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
                        .filter(|e| e["healthy"] == true && e["latency_ms"].is_number())
                        .count()
                })
                .unwrap_or(0);
            healthy == n
        })
        .await;
    }

    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(&self.config_path, toml).expect("write config");
    }

    /// Drains and waits for the data listener to close.
    pub async fn stop(mut self) {
        self.router.shutdown();
        if let Some(r) = self.running.take() {
            r.wait().await;
        }
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.router.shutdown();
        self.router.health.stop();
    }
}

pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The zone named in x-edge-route.
    pub fn zone(&self) -> String {
        route_field(self.header("x-edge-route").unwrap_or(""), "zone")
    }

    pub fn reason(&self) -> String {
        route_field(self.header("x-edge-route").unwrap_or(""), "reason")
    }
}

pub fn route_field(h: &str, key: &str) -> String {
    h.split(';')
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
        .unwrap_or_default()
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(c: &Client<HttpConnector, Full<Bytes>>, req: Request<Full<Bytes>>) -> Reply {
    let r = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&body).to_string(),
    }
}

pub async fn get(url: &str) -> Reply {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&client(), req).await
}

pub async fn post(url: &str) -> Reply {
    let req = Request::post(url)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&client(), req).await
}

/// Polls `cond` until it holds or the deadline passes (then panics with `what`).
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends `n` GETs and counts the zones that answered (by x-edge-route).
pub async fn zone_counts(url: &str, n: usize) -> HashMap<String, usize> {
    let c = client();
    let mut m = HashMap::new();
    for _ in 0..n {
        let r = send(
            &c,
            Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("req"),
        )
        .await;
        *m.entry(if r.status == 200 {
            r.zone()
        } else {
            format!("status {}", r.status)
        })
        .or_insert(0) += 1;
    }
    m
}

/// Continuous traffic from `conns` concurrent clients until stopped; returns per-status counts.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<JoinHandle<Vec<(Instant, u16, String)>>>,
}

impl Load {
    pub fn start(url: String, conns: usize) -> Load {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..conns)
            .map(|_| {
                let stop = stop.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let c = client();
                    let mut out = Vec::new();
                    // Bounded: at most 20 000 requests per connection, whatever happens.
                    for _ in 0..20_000 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let req = Request::get(url.as_str())
                            .body(Full::new(Bytes::new()))
                            .expect("req");
                        let r = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await;
                        let (status, zone) = match r {
                            Ok(Ok(resp)) => {
                                let zone = route_field(
                                    resp.headers()
                                        .get("x-edge-route")
                                        .and_then(|v| v.to_str().ok())
                                        .unwrap_or(""),
                                    "zone",
                                );
                                let s = resp.status().as_u16();
                                let _ = resp.into_body().collect().await;
                                (s, zone)
                            }
                            _ => (0, String::new()),
                        };
                        out.push((Instant::now(), status, zone));
                    }
                    out
                })
            })
            .collect();
        Load { stop, tasks }
    }

    pub async fn finish(self) -> Vec<(Instant, u16, String)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all.sort_by_key(|x| x.0);
        all
    }
}
