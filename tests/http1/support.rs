//! The raw client, the raw upstream and the router setup shared by every case.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use crate::common::{config, endpoint, post, wait_until, Backend, TestRouter};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// Bound on any single socket operation of a client.
pub const IO: Duration = Duration::from_secs(20);

/// Every test runs under this bound as a whole.
pub async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(120), f)
        .await
        .expect("test exceeded its 120 s bound");
}

// ---------------------------------------------------------------------------------------
// Wire parsing shared by the raw client and the raw upstream.

pub type Headers = Vec<(String, String)>;

/// First value of header `name` (names are stored lower case).
pub fn hget<'a>(h: &'a Headers, name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Every value of header `name`, in order.
pub fn hall<'a>(h: &'a Headers, name: &str) -> Vec<&'a str> {
    h.iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The comma-separated tokens of every `name` line, lower case.
pub fn tokens(h: &Headers, name: &str) -> Vec<String> {
    hall(h, name)
        .iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

pub struct Head {
    pub first: String,
    pub headers: Headers,
}

pub fn parse_head(raw: &[u8]) -> Head {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or_default().to_string();
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("header line without a colon: {l:?}"));
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Head { first, headers }
}

#[derive(Default, Debug)]
pub struct Chunked {
    pub body: Vec<u8>,
    pub chunks: usize,
    pub exts: Vec<String>,
    pub trailers: Headers,
}

/// A byte source with a buffer: heads, exact lengths, lines, chunked bodies, to EOF.
pub struct Wire<R> {
    pub r: R,
    pub buf: Vec<u8>,
}

impl<R: AsyncRead + Unpin> Wire<R> {
    pub fn new(r: R) -> Self {
        Wire { r, buf: Vec::new() }
    }

    /// Reads more bytes; false at EOF or on a reset.
    pub async fn fill(&mut self) -> bool {
        self.buf.reserve(64 * 1024);
        matches!(self.r.read_buf(&mut self.buf).await, Ok(n) if n > 0)
    }

    /// The next head (through its blank line); None if the stream ends first.
    pub async fn head(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(self.buf.drain(..end + 4).collect());
            }
            if self.buf.len() > 1 << 20 || !self.fill().await {
                return None;
            }
        }
    }

    pub async fn exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            if !self.fill().await {
                return Err(format!(
                    "stream ended after {} of {n} bytes",
                    self.buf.len()
                ));
            }
        }
        Ok(self.buf.drain(..n).collect())
    }

    pub async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l: Vec<u8> = self.buf.drain(..p + 2).collect();
                return Ok(String::from_utf8_lossy(&l[..p]).to_string());
            }
            if self.buf.len() > 64 * 1024 || !self.fill().await {
                return Err(format!(
                    "stream ended inside a line: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ));
            }
        }
    }

    pub async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }

    /// A chunked body, strictly (RFC 9112 7.1): hex size, optional extensions, CRLF after
    /// the data, trailer fields, blank line.
    pub async fn chunked(&mut self) -> Result<Chunked, String> {
        let mut out = Chunked::default();
        loop {
            let line = self.line().await?;
            let (size, ext) = match line.find(';') {
                Some(i) => (
                    line[..i].trim_end_matches([' ', '\t']),
                    Some(&line[i + 1..]),
                ),
                None => (line.as_str(), None),
            };
            if size.is_empty() || size.len() > 15 || !size.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("bad chunk-size line {line:?}"));
            }
            let n = usize::from_str_radix(size, 16).map_err(|e| e.to_string())?;
            if let Some(e) = ext {
                out.exts.push(e.to_string());
            }
            if n == 0 {
                break;
            }
            let data = self.exact(n).await?;
            out.body.extend_from_slice(&data);
            if self.exact(2).await? != b"\r\n" {
                return Err("chunk data not followed by CRLF".into());
            }
            out.chunks += 1;
        }
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                return Ok(out);
            }
            let (n, v) = line
                .split_once(':')
                .ok_or_else(|| format!("bad trailer line {line:?}"))?;
            out.trailers
                .push((n.to_ascii_lowercase(), v.trim().to_string()));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The raw client.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body by the rules (HEAD, 1xx, 204, 304).
    Bodiless,
    Length(usize),
    Chunked,
    /// Delimited by the connection closing.
    Close,
}

#[derive(Debug)]
pub struct Resp {
    pub version: String,
    pub status: u16,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub framing: Framing,
    pub trailers: Headers,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        hget(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// Where a client connects: the router's address, and how to trust it when its listener
/// terminates TLS.
#[derive(Clone)]
pub struct Dial {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl From<SocketAddr> for Dial {
    fn from(addr: SocketAddr) -> Dial {
        Dial { addr, tls: None }
    }
}

impl TestRouter {
    /// How a client reaches this router's listener (over TLS when it terminates TLS).
    pub fn dial(&self) -> Dial {
        Dial {
            addr: self.addr,
            tls: self.client_tls.clone(),
        }
    }
}

pub struct Conn {
    pub rd: Wire<Box<dyn AsyncRead + Unpin + Send>>,
    pub wr: Box<dyn AsyncWrite + Unpin + Send>,
    /// This client's own address, as the router sees it.
    pub local: Option<SocketAddr>,
}

impl Conn {
    pub async fn open(to: impl Into<Dial>) -> Conn {
        let to = to.into();
        let s = tokio::time::timeout(IO, TcpStream::connect(to.addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let _ = s.set_nodelay(true);
        let local = s.local_addr().ok();
        let Some(tls) = to.tls else {
            let (r, w) = s.into_split();
            return Conn {
                rd: Wire::new(Box::new(r)),
                wr: Box::new(w),
                local,
            };
        };
        let name = rustls::pki_types::ServerName::try_from(TLS_NAME).expect("server name");
        let s = tokio::time::timeout(IO, tokio_rustls::TlsConnector::from(tls).connect(name, s))
            .await
            .expect("TLS handshake timed out")
            .expect("TLS handshake");
        Conn {
            local,
            ..Conn::over(s)
        }
    }

    /// A client on a stream already connected (and, for TLS, through its handshake).
    pub fn over<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(s: S) -> Conn {
        let (r, w) = tokio::io::split(s);
        Conn {
            rd: Wire::new(Box::new(r)),
            wr: Box::new(w),
            local: None,
        }
    }

    /// The next response and its head as it came on the wire.
    pub async fn read_raw(&mut self, head: bool) -> (String, Resp) {
        let raw = tokio::time::timeout(IO, self.rd.head())
            .await
            .expect("response timed out")
            .expect("a response head");
        self.rd.buf.splice(0..0, raw.iter().copied());
        (
            String::from_utf8_lossy(&raw).to_string(),
            self.read(head).await,
        )
    }

    /// Writes all of `b` (out of the TLS session too).
    async fn write(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.wr.write_all(b).await?;
        self.wr.flush().await
    }

    pub async fn send(&mut self, b: impl AsRef<[u8]>) {
        tokio::time::timeout(IO, self.write(b.as_ref()))
            .await
            .expect("write timed out")
            .expect("write");
    }

    /// Writes, ignoring a failure (the router may close on a bad request before reading it all).
    pub async fn send_lossy(&mut self, b: impl AsRef<[u8]>) {
        let _ = tokio::time::timeout(IO, self.write(b.as_ref())).await;
    }

    /// The next response, interim ones included. `head` says the request was HEAD.
    pub async fn read(&mut self, head: bool) -> Resp {
        tokio::time::timeout(IO, self.read_inner(head))
            .await
            .expect("response timed out")
    }

    pub async fn read_inner(&mut self, head_req: bool) -> Resp {
        let Some(raw) = self.rd.head().await else {
            panic!(
                "connection ended before a response head; got {:?}",
                String::from_utf8_lossy(&self.rd.buf)
            );
        };
        let h = parse_head(&raw);
        let mut first = h.first.splitn(3, ' ');
        let version = first.next().unwrap_or_default().to_string();
        assert!(
            version == "HTTP/1.1" || version == "HTTP/1.0",
            "bad status line {:?}",
            h.first
        );
        let status: u16 = first
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {:?}", h.first));
        let headers = h.headers;
        let te = tokens(&headers, "transfer-encoding");
        let cl = hall(&headers, "content-length");
        let framing = if head_req || status / 100 == 1 || status == 204 || status == 304 {
            Framing::Bodiless
        } else if !te.is_empty() {
            assert!(
                cl.is_empty(),
                "response with Transfer-Encoding and Content-Length: {headers:?}"
            );
            assert_eq!(
                te.last().map(String::as_str),
                Some("chunked"),
                "{headers:?}"
            );
            Framing::Chunked
        } else if !cl.is_empty() {
            assert!(
                cl.iter().all(|v| *v == cl[0]),
                "conflicting Content-Length: {cl:?}"
            );
            Framing::Length(cl[0].parse().expect("numeric Content-Length"))
        } else {
            Framing::Close
        };
        let (body, trailers) = match framing {
            Framing::Bodiless => (Vec::new(), Vec::new()),
            Framing::Length(n) => (self.rd.exact(n).await.expect("body"), Vec::new()),
            Framing::Chunked => {
                let c = self.rd.chunked().await.expect("valid chunked body");
                (c.body, c.trailers)
            }
            Framing::Close => (self.rd.read_to_end().await, Vec::new()),
        };
        Resp {
            version,
            status,
            headers,
            body,
            framing,
            trailers,
        }
    }

    /// Asserts the router closes the connection (EOF or reset) with nothing more sent.
    pub async fn expect_closed(&mut self) {
        assert!(
            self.rd.buf.is_empty(),
            "unexpected bytes after the response: {:?}",
            String::from_utf8_lossy(&self.rd.buf)
        );
        match tokio::time::timeout(Duration::from_secs(10), self.rd.fill()).await {
            Ok(false) => {}
            Ok(true) => panic!(
                "unexpected bytes after the response: {:?}",
                String::from_utf8_lossy(&self.rd.buf)
            ),
            Err(_) => panic!("connection still open 10 s after the response"),
        }
    }
}

pub fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: test.local\r\n\r\n")
}

/// Deterministic, non-repeating-looking bytes.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i.wrapping_mul(7)
                .wrapping_add(i / 251)
                .wrapping_add(seed as usize)
                % 256) as u8
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// The raw upstream.

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct UpReq {
    /// Which accepted connection (1, 2, ...) carried it.
    pub conn: u64,
    /// Its place on that connection (1 for the first request; health checks not counted).
    pub nth: u64,
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub chunked: bool,
    pub chunk_exts: Vec<String>,
    pub trailers: Headers,
}

impl UpReq {
    pub fn header(&self, name: &str) -> Option<&str> {
        hget(&self.headers, name)
    }
}

/// What the upstream does with a request.
pub enum Action {
    /// Writes the bytes and waits for the next request.
    Reply(Vec<u8>),
    /// Waits, then writes the bytes and waits for the next request.
    Delayed(Duration, Vec<u8>),
    /// Writes the bytes and closes the connection (whatever the bytes say).
    ReplyClose(Vec<u8>),
    /// Closes the connection without an answer (an upstream whose idle timeout fired just
    /// as the request came).
    Drop,
    /// Writes `head`, then up to `max` chunks of `chunk` bytes with `pause` between, then
    /// closes. A failed write (the router hung up) counts in `aborted`.
    Trickle {
        head: Vec<u8>,
        chunk: usize,
        pause: Duration,
        max: usize,
    },
}

pub type Handler = Arc<dyn Fn(&UpReq) -> Action + Send + Sync>;

#[derive(Default)]
pub struct UpState {
    pub seen: Mutex<Vec<UpReq>>,
    /// Request heads other than health checks, complete or not.
    pub heads: AtomicU64,
    pub accepted: AtomicU64,
    /// Requests the upstream could not read (bad framing from the router, or cut short).
    pub errors: Mutex<Vec<String>>,
    /// Trickled bodies cut short by the router closing.
    pub aborted: AtomicU64,
    pub trickling: AtomicU64,
}

pub struct RawUpstream {
    pub addr: SocketAddr,
    pub st: Arc<UpState>,
    pub task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        // Aborting the accept task drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}

pub const HEALTH_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

impl RawUpstream {
    pub async fn start(h: Handler) -> RawUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        Self::start_on(l, h)
    }

    /// On a given listener (one with a deeper accept queue than the default 128).
    pub fn start_on(l: TcpListener, h: Handler) -> RawUpstream {
        let addr = l.local_addr().expect("addr");
        let st = Arc::new(UpState::default());
        let s2 = st.clone();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut id = 0u64;
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                id += 1;
                s2.accepted.fetch_add(1, Ordering::SeqCst);
                let _ = s.set_nodelay(true);
                conns.spawn(up_conn(s, id, s2.clone(), h.clone()));
                while conns.try_join_next().is_some() {}
            }
        });
        RawUpstream { addr, st, task }
    }

    pub fn seen(&self) -> Vec<UpReq> {
        self.st.seen.lock().expect("lock").clone()
    }
    pub fn last(&self) -> UpReq {
        self.seen()
            .last()
            .cloned()
            .expect("the upstream saw a request")
    }
    pub fn heads(&self) -> u64 {
        self.st.heads.load(Ordering::SeqCst)
    }
    pub fn errors(&self) -> Vec<String> {
        self.st.errors.lock().expect("lock").clone()
    }
}

pub async fn up_conn(s: TcpStream, id: u64, st: Arc<UpState>, h: Handler) {
    let (r, mut w) = s.into_split();
    let mut rd = Wire::new(r);
    let mut nth = 0;
    while let Some(raw) = rd.head().await {
        let head = parse_head(&raw);
        let mut first = head.first.splitn(3, ' ');
        let method = first.next().unwrap_or_default().to_string();
        let target = first.next().unwrap_or_default().to_string();
        let version = first.next().unwrap_or_default().to_string();
        if target == "/healthz" {
            if w.write_all(HEALTH_OK).await.is_err() {
                return;
            }
            continue;
        }
        st.heads.fetch_add(1, Ordering::SeqCst);
        nth += 1;
        let headers = head.headers;
        if hget(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
            && w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err()
        {
            return;
        }
        let mut q = UpReq {
            conn: id,
            nth,
            method,
            target,
            version,
            headers,
            body: Vec::new(),
            chunked: false,
            chunk_exts: Vec::new(),
            trailers: Vec::new(),
        };
        let te = tokens(&q.headers, "transfer-encoding");
        let cl: Vec<String> = hall(&q.headers, "content-length")
            .into_iter()
            .map(String::from)
            .collect();
        let read: Result<(), String> = if !te.is_empty() && !cl.is_empty() {
            Err("request with both Transfer-Encoding and Content-Length".into())
        } else if !te.is_empty() {
            if te != ["chunked"] {
                Err(format!("unexpected transfer-encoding {te:?}"))
            } else {
                match rd.chunked().await {
                    Ok(c) => {
                        q.body = c.body;
                        q.chunked = true;
                        q.chunk_exts = c.exts;
                        q.trailers = c.trailers;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
        } else if let Some(first) = cl.first() {
            match first.parse::<usize>() {
                Ok(n) if cl.iter().all(|v| v == first) => match rd.exact(n).await {
                    Ok(b) => {
                        q.body = b;
                        Ok(())
                    }
                    Err(e) => Err(e),
                },
                _ => Err(format!("bad content-length {cl:?}")),
            }
        } else {
            Ok(())
        };
        if let Err(e) = read {
            st.errors
                .lock()
                .expect("lock")
                .push(format!("{} {}: {e}", q.method, q.target));
            return;
        }
        let action = h(&q);
        st.seen.lock().expect("lock").push(q);
        match action {
            Action::Reply(b) => {
                if w.write_all(&b).await.is_err() {
                    return;
                }
            }
            Action::Delayed(d, b) => {
                tokio::time::sleep(d).await;
                if w.write_all(&b).await.is_err() {
                    return;
                }
            }
            Action::Drop => return,
            Action::ReplyClose(b) => {
                let _ = w.write_all(&b).await;
                let _ = w.shutdown().await;
                return;
            }
            Action::Trickle {
                head,
                chunk,
                pause,
                max,
            } => {
                st.trickling.fetch_add(1, Ordering::SeqCst);
                if w.write_all(&head).await.is_err() {
                    st.aborted.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let data = pattern(chunk, 1);
                for _ in 0..max {
                    if w.write_all(&data).await.is_err() {
                        st.aborted.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
                return;
            }
        }
    }
}

/// `200 OK` with a Content-Length body; `extra` is more header lines, each ending in CRLF.
pub fn ok(body: &[u8], extra: &str) -> Vec<u8> {
    let mut v = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    v.extend_from_slice(body);
    v
}

/// Answers every request with its target as the body (and in `x-path`), and its upstream
/// connection number in `x-conn`.
pub fn echo_reply(q: &UpReq) -> Vec<u8> {
    ok(
        q.target.as_bytes(),
        &format!("x-path: {}\r\nx-conn: {}\r\n", q.target, q.conn),
    )
}

pub fn raw_endpoint(addr: SocketAddr) -> String {
    format!("\n[[cluster.endpoint]]\naddress = \"{addr}\"\nregion = \"r1\"\nzone = \"r1a\"\n")
}

/// Which HTTP/1.1 engine serves the listener (`listener.http1_engine`), and whether the
/// listener terminates TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Native,
    Hyper,
    /// The native engine behind TLS (clients offer no ALPN: HTTP/1.1).
    NativeTls,
}

/// The name the TLS listener's certificate is for.
pub const TLS_NAME: &str = "test.local";

/// A certificate for [`TLS_NAME`] from a private CA, and a client config trusting that CA;
/// made once per test process.
pub struct TlsFixture {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca: crate::tls_util::Ca,
}

pub fn tls_fixture() -> &'static TlsFixture {
    static F: OnceLock<TlsFixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca = crate::tls_util::Ca::new("http1 test ca");
        let leaf = ca.leaf(&[TLS_NAME]);
        TlsFixture {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            ca,
        }
    })
}

/// The `[listener]` line for a TLS listener with the fixture's certificate (files written by
/// [`start_tls_router`]).
pub const TLS_LISTENER: &str = r#"tls = { cert = "{dir}/edge.pem", key = "{dir}/edge.key" }"#;

/// A router for `toml` whose listener has [`TLS_LISTENER`]; clients get the fixture CA.
pub async fn start_tls_router(toml: &str, client: Arc<rustls::ClientConfig>) -> TestRouter {
    let f = tls_fixture();
    let mut r =
        TestRouter::start_with_files(toml, &[("edge.pem", &f.cert_pem), ("edge.key", &f.key_pem)])
            .await;
    r.client_tls = Some(client);
    r
}

impl Engine {
    /// The `listener.http1_engine` value.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Native | Engine::NativeTls => "native",
            Engine::Hyper => "hyper",
        }
    }

    /// What the upstream sees in `x-forwarded-proto`.
    pub fn scheme(self) -> &'static str {
        match self {
            Engine::NativeTls => "https",
            _ => "http",
        }
    }

    /// The `[listener]` line that selects this engine.
    pub fn listener_line(self) -> String {
        format!("http1_engine = \"{}\"", self.name())
    }

    /// [`config`] with this engine on the listener.
    pub fn config(self, endpoints: &[String], listener_extra: &str) -> String {
        self.config_with(endpoints, "", listener_extra)
    }

    /// [`Engine::config`] with `cluster_extra` under the cluster.
    pub fn config_with(
        self,
        endpoints: &[String],
        cluster_extra: &str,
        listener_extra: &str,
    ) -> String {
        let tls = if self == Engine::NativeTls {
            TLS_LISTENER
        } else {
            ""
        };
        config(
            endpoints,
            cluster_extra,
            &format!("{}\n{tls}\n{listener_extra}", self.listener_line()),
        )
    }

    /// A router with this engine in front of the raw upstream at `addr`, not yet healthy.
    pub async fn router(self, addr: SocketAddr, listener_extra: &str) -> TestRouter {
        self.start(&self.config(&[raw_endpoint(addr)], listener_extra))
            .await
    }

    /// A router for `text` (a [`Engine::config`], perhaps edited).
    pub async fn start(self, text: &str) -> TestRouter {
        if self == Engine::NativeTls {
            start_tls_router(text, tls_fixture().ca.client()).await
        } else {
            TestRouter::start(text).await
        }
    }
}

/// A raw upstream with `h` and a router (on `engine`) in front of it, the endpoint probed
/// healthy.
pub async fn setup(
    engine: Engine,
    h: impl Fn(&UpReq) -> Action + Send + Sync + 'static,
    listener_extra: &str,
) -> (RawUpstream, TestRouter) {
    let up = RawUpstream::start(Arc::new(h)).await;
    let r = engine.router(up.addr, listener_extra).await;
    r.wait_all_healthy().await;
    (up, r)
}

pub async fn in_flight(r: &TestRouter) -> u64 {
    r.routes().await["clusters"][0]["endpoints"][0]["in_flight"]
        .as_u64()
        .expect("in_flight in /routes")
}

/// What became of one bad request.
pub struct Outcome {
    pub resp: Resp,
    /// Request heads the upstream saw from it.
    pub heads: u64,
    /// Complete requests the upstream read from it.
    pub complete: Vec<UpReq>,
}

/// Sends `raw` on a new connection and reads the answer; the router must close the
/// connection after it. A good request sent afterwards on another connection is the barrier
/// that tells what of the bad one reached the upstream.
pub async fn try_bad(r: &TestRouter, up: &RawUpstream, what: &str, raw: &[u8]) -> Outcome {
    let (heads, seen) = (up.heads(), up.seen().len());
    let mut c = Conn::open(r.dial()).await;
    c.send_lossy(raw).await;
    let resp = c.read(false).await;
    eprintln!(
        "{what}: {} {:?} body {:?}",
        resp.status,
        resp.headers,
        resp.text()
    );
    c.expect_closed().await;
    let marker = format!("/marker-after-{}", what.replace(' ', "-"));
    let mut c = Conn::open(r.dial()).await;
    c.send(get(&marker)).await;
    assert_eq!(c.read(false).await.status, 200);
    let all = up.seen();
    assert_eq!(all.last().map(|q| q.target.as_str()), Some(marker.as_str()));
    Outcome {
        resp,
        heads: up.heads() - heads - 1,
        complete: all[seen..all.len() - 1].to_vec(),
    }
}

/// The router answers `want`, closes, and nothing of the request reaches the upstream.
pub async fn rejected(r: &TestRouter, up: &RawUpstream, what: &str, raw: &[u8], want: u16) {
    let o = try_bad(r, up, what, raw).await;
    assert_eq!(
        o.resp.status,
        want,
        "{what}: {:?} {}",
        o.resp.headers,
        o.resp.text()
    );
    assert_eq!(
        o.heads, 0,
        "{what}: the bad request reached the upstream: {:?}",
        o.complete
    );
}

/// Reads until the router closes the connection; the bytes read, or None if it is still
/// open after `within`.
pub async fn read_until_closed(c: &mut Conn, within: Duration) -> Option<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, c.rd.fill()).await {
            Ok(false) => return Some(std::mem::take(&mut c.rd.buf)),
            Ok(true) => {}
            Err(_) => return None,
        }
    }
}

/// The value of the first sample of `name` whose line mentions every one of `labels`.
pub async fn metric_value(r: &TestRouter, name: &str, labels: &[&str]) -> f64 {
    let text = crate::common::get(&r.admin_url("/metrics")).await.body;
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

/// `conns` connections at once, each doing `per_conn` GETs in turn; every response must be
/// 200 with its own target echoed. Returns how many were.
pub async fn many_connections(r: &TestRouter, conns: usize, per_conn: usize) -> usize {
    let mut tasks = JoinSet::new();
    for i in 0..conns {
        let to = r.dial();
        tasks.spawn(async move {
            let mut c = Conn::open(to).await;
            let mut ok = 0;
            for j in 0..per_conn {
                let target = format!("/many/{i}/{j}");
                c.send(get(&target)).await;
                let resp = c.read(false).await;
                if resp.status == 200 && resp.text() == target {
                    ok += 1;
                } else if ok + 3 > j {
                    eprintln!("conn {i} request {j}: {} {:?}", resp.status, resp.text());
                }
            }
            ok
        });
    }
    let mut ok = 0;
    while let Some(n) = tasks.join_next().await {
        ok += n.expect("client task");
    }
    ok
}
