//! The native HTTP/1.1 data path: plain-TCP HTTP/1.1 clients to plain HTTP/1.1 upstreams,
//! with no hyper in between.
//!
//! Why: hyper's server and pooled client cost a channel hand-off between tasks, a `HeaderMap`
//! per message each way and 16 KiB of buffers held by every connection, idle or not. Here one
//! task per client connection parses the head in place (httparse), rewrites it straight into
//! the upstream request, drives a pooled upstream connection inline and copies the response
//! through. Buffers are taken from a per-thread cache only while a request is in flight, so
//! an idle keep-alive connection holds its socket and its task, nothing more.
//!
//! Anything this path does not do is handed to hyper on the same connection, with the bytes
//! already read replayed first ([`Prefixed`]): HTTP/2 prior knowledge (h2c), HTTP/1.0
//! clients, `Expect`, Upgrade (WebSocket), absolute-form targets, and routes whose cluster
//! speaks TLS or HTTP/2 upstream or hedges. HTTP/1.1 carries no state between requests, so the
//! hand-off is seamless; the rest of that connection stays with hyper.

pub mod wire;

use std::borrow::Cow;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::warn;

use crate::control::{ProxyState, Table, UpstreamClient};
use crate::dataplane::hyper::{self as proxy, AccessLog, Completion};
use crate::dataplane::watchdog::{End, Signal};
use crate::routing::balancer::Pick;
use crate::routing::table::{ClusterTable, Reason};
use crate::state::InFlight;
use wire::{BodyEnd, ConnectionOptions, Framing};

/// The most headers a request or response head may carry (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// The largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Buffer size for heads and for copying bodies.
const BUF_SIZE: usize = 8 * 1024;
/// A request body up to this size is read whole before the request goes upstream.
const SMALL_BODY: u64 = 16 * 1024;

/// The listener's limits, as the connection loop uses them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// The listener's id ([`crate::config::listener_id`]), for its routes.
    pub listener: u64,
}

/// How [`serve`] ends.
pub enum Served {
    Ended(End),
    /// Hand the connection to hyper: it starts with bytes already read.
    Hyper(Prefixed),
}

/// Serves one plain-TCP connection for as long as it stays HTTP/1.1 this path can carry.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    state: &ProxyState,
    signal: &mut watch::Receiver<Signal>,
    limits: Limits,
) -> Served {
    let accepted = Instant::now();
    let mut buf = BytesMut::new();
    let mut served = 0u64;
    loop {
        if buf.is_empty() {
            // Idle: the buffer goes back to the cache, so idle connections hold none.
            give_buf(std::mem::take(&mut buf));
            if *signal.borrow_and_update() != Signal::Run {
                return Served::Ended(End::Drained);
            }
            let wait = if served == 0 {
                limits.header_timeout.saturating_sub(accepted.elapsed())
            } else {
                limits.idle_timeout
            };
            tokio::select! {
                r = stream.readable() => if r.is_err() {
                    return Served::Ended(End::Closed);
                },
                _ = tokio::time::sleep(wait) => {
                    return Served::Ended(if served == 0 { End::SlowHead } else { End::Idle });
                }
                _ = signal.changed() => return Served::Ended(End::Drained),
            }
            buf = take_buf();
        }
        // The head must be complete within the header timeout of its first byte (of the
        // connection's start, for the first request).
        let since = if served == 0 {
            accepted
        } else {
            Instant::now()
        };
        let head_deadline = since + limits.header_timeout;
        let table = state.table.load_full();
        // The head is parsed once its end is in the buffer, and a small body awaited by
        // length: a client trickling bytes costs a scan of each byte once, not a parse.
        let mut scanned = 0usize;
        let mut need = 0usize;
        // What to do next is decided in this block, and the parsed request (a `Step`, about
        // 500 bytes) ends with it: a value alive across an await below would be part of every
        // connection's task, idle or not.
        let next: Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> = {
            let step = loop {
                let ready = if need > 0 {
                    buf.len() >= need
                } else {
                    head_end_seen(&buf, &mut scanned)
                };
                if ready {
                    match prepare(
                        &buf,
                        &table,
                        peer,
                        limits.max_header_bytes,
                        limits.listener,
                        state,
                    ) {
                        Step::Partial => {}
                        Step::MoreBody(total) => need = total,
                        step => break step,
                    }
                }
                if need == 0 && buf.len() >= limits.max_header_bytes {
                    break Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BUF_SIZE);
                }
                match tokio::time::timeout_at(head_deadline.into(), stream.read_buf(&mut buf)).await
                {
                    Err(_) => return Served::Ended(End::SlowHead),
                    Ok(Ok(0)) | Ok(Err(_)) => return Served::Ended(End::Closed),
                    Ok(Ok(_)) => {}
                }
            };
            served += 1;
            match step {
                Step::Partial | Step::MoreBody(_) => {
                    unreachable!("the loop above ends only on a complete request")
                }
                Step::Hyper => {
                    return Served::Hyper(Prefixed {
                        prefix: buf,
                        stream,
                    })
                }
                // The head itself is bad: say so and close; nothing went upstream.
                Step::Refuse(status) => {
                    let out = refusal(status);
                    let stream = &mut stream;
                    Box::pin(async move {
                        let _ = write_all(stream, &out, limits.idle_timeout).await;
                        false
                    })
                }
                Step::Reply(r) => {
                    buf.advance(r.head_len);
                    let close = r.close || *signal.borrow() != Signal::Run;
                    let out = r.reply.bytes(close);
                    let stream = &mut stream;
                    Box::pin(async move {
                        write_all(stream, &out, limits.idle_timeout).await.is_ok() && !close
                    })
                }
                // Boxed: a request's state is only needed while it is in flight. (A drain
                // that times out ends with the runtime, which drops in-flight requests.)
                Step::Forward(f) => Box::pin(forward(&mut stream, &mut buf, f, limits, signal)),
            }
        };
        let keep = next.await;
        if !keep {
            let _ = stream.shutdown().await;
            give_buf(buf);
            return Served::Ended(End::Closed);
        }
    }
}

/// Whether `buf` holds the blank line that ends a head (CRLF CRLF, or bare LFs as httparse
/// accepts them). `scanned` carries over what was already searched.
fn head_end_seen(buf: &[u8], scanned: &mut usize) -> bool {
    let from = scanned.saturating_sub(2);
    *scanned = buf.len();
    let tail = &buf[from..];
    tail.iter().enumerate().any(|(i, b)| {
        *b == b'\n'
            && (tail.get(i + 1) == Some(&b'\n')
                || (tail.get(i + 1) == Some(&b'\r') && tail.get(i + 2) == Some(&b'\n')))
    })
}

enum Step<'t> {
    /// The head is not complete yet.
    Partial,
    /// The head is complete; the (small) body is not: the request needs this many bytes.
    MoreBody(usize),
    /// Not for this path: hand the connection to hyper.
    Hyper,
    /// A malformed head: this status, then close.
    Refuse(StatusCode),
    /// A response the router makes itself (404, 503).
    Reply(Reply),
    Forward(Forward<'t>),
}

/// A response the router makes itself, with its access-log record.
struct Reply {
    head_len: usize,
    /// The request has a body this path did not read: close after answering.
    close: bool,
    reply: ErrorReply,
}

struct ErrorReply {
    status: StatusCode,
    kind: &'static str,
    msg: &'static str,
    request_id: RequestId,
    log: Option<AccessLog>,
}

impl ErrorReply {
    /// The response bytes (the same text and headers as [`proxy::error_response`]); writes
    /// the access log.
    fn bytes(self, close: bool) -> Vec<u8> {
        let code = self.status.as_u16();
        let mut body = Vec::with_capacity(64);
        wire::put_u64(&mut body, u64::from(code));
        body.push(b' ');
        body.extend_from_slice(self.kind.as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(self.msg.as_bytes());
        body.push(b'\n');
        let mut out = Vec::with_capacity(256 + body.len());
        status_line(&mut out, self.status);
        wire::put_header(&mut out, b"x-edge-error", self.kind.as_bytes());
        wire::put_header(&mut out, b"content-type", b"text/plain; charset=utf-8");
        wire::put_header(&mut out, b"x-request-id", self.request_id.as_bytes());
        out.extend_from_slice(b"content-length: ");
        wire::put_u64(&mut out, body.len() as u64);
        out.extend_from_slice(b"\r\n");
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        wire::put_date(&mut out);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        if let Some(mut l) = self.log {
            l.status = code;
            l.error = Some(self.kind);
            l.emit(body.len() as u64, true);
        }
        out
    }
}

/// A request's id, inline: the client's `x-request-id` (up to 128 bytes) or a new one.
/// Made into a `HeaderValue` (an allocation) only for the access log.
struct RequestId {
    buf: [u8; 128],
    len: u8,
}

impl RequestId {
    fn new(client: Option<&[u8]>) -> RequestId {
        let mut id = RequestId {
            buf: [0; 128],
            len: 0,
        };
        // httparse let the value through, so its bytes are valid in a header value.
        match client {
            Some(v) if !v.is_empty() && v.len() <= 128 => {
                id.buf[..v.len()].copy_from_slice(v);
                id.len = v.len() as u8;
            }
            _ => {
                let mut hex = [0u8; 32];
                proxy::fill_request_id(&mut hex);
                id.buf[..32].copy_from_slice(&hex);
                id.len = 32;
            }
        }
        id
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The answer to a head that could not be parsed (as hyper answers it: no body, close).
fn refusal(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    status_line(&mut out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    wire::put_date(&mut out);
    out.extend_from_slice(b"\r\n");
    out
}

/// A request on its way upstream: its head already rewritten for the upstream.
struct Forward<'t> {
    head_len: usize,
    upstream_head: Scratch,
    body: Framing,
    /// The body's length without framing (it is all in the buffer).
    body_bytes: u64,
    head_method: bool,
    idempotent: bool,
    /// The client asked to close after this request.
    client_close: bool,
    cluster: &'t ClusterTable<UpstreamClient>,
    pick: Pick<'t>,
    timeout: Duration,
    started: Instant,
    request_id: RequestId,
    log: Option<AccessLog>,
    route_header: bool,
}

/// Parses the head at the start of `buf` and decides what to do with the request. Sync, so
/// the parser's header array never lives in the connection's task between requests.
fn prepare<'t>(
    buf: &[u8],
    table: &'t Table,
    peer: SocketAddr,
    max_header_bytes: usize,
    listener: u64,
    state: &ProxyState,
) -> Step<'t> {
    // HTTP/2 with prior knowledge starts "PRI * HTTP/2.0".
    if buf.starts_with(b"PRI ") || (buf.len() < 4 && b"PRI ".starts_with(buf)) {
        return if buf.len() < 4 {
            Step::Partial
        } else {
            Step::Hyper
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Step::Refuse(StatusCode::BAD_REQUEST),
    };
    if head_len > max_header_bytes {
        return Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        // HTTP/1.0 (keep-alive rules of its own) goes to hyper.
        return Step::Hyper;
    };
    if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) || method == "CONNECT" {
        return Step::Hyper;
    }
    let started = Instant::now();

    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut conn = ConnectionOptions::default();
    let mut upgrade = false;
    let mut xff: Option<&[u8]> = None;
    let mut rid: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                host = Some(value);
            }
            6 if name.eq_ignore_ascii_case(b"expect") => return Step::Hyper,
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade = true,
            10 if name.eq_ignore_ascii_case(b"connection") => conn.add(value),
            12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                rid.get_or_insert(value);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                match wire::content_length(length, value) {
                    Ok(n) => length = Some(n),
                    Err(_) => return Step::Refuse(StatusCode::BAD_REQUEST),
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                xff.get_or_insert(value);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                if chunked.is_some() {
                    // Two Transfer-Encoding headers: refuse rather than guess.
                    return Step::Refuse(StatusCode::BAD_REQUEST);
                }
                match wire::ends_chunked(value) {
                    Ok(true) => chunked = Some(true),
                    _ => return Step::Refuse(StatusCode::BAD_REQUEST),
                }
            }
            _ => {}
        }
    }
    if upgrade && conn.upgrade {
        return Step::Hyper;
    }
    // RFC 9112 section 6.3: both framings at once, or a Host missing or doubled, is a bad request.
    if (chunked.is_some() && length.is_some()) || hosts != 1 {
        return Step::Refuse(StatusCode::BAD_REQUEST);
    }
    let body = match (chunked, length) {
        (Some(_), _) => Framing::Chunked,
        (None, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::None,
    };
    // This path sends a request whole: the body must be in hand. A small one is awaited; a
    // larger one, or a chunked one still arriving, is streamed by hyper, which sends and
    // receives at once (an upstream may answer while the body is still coming).
    let avail = buf.len() - head_len;
    let body_bytes = match body {
        Framing::Length(n) if (avail as u64) < n => {
            return if n <= SMALL_BODY {
                Step::MoreBody(head_len + n as usize)
            } else {
                Step::Hyper
            };
        }
        Framing::Length(n) => n,
        Framing::Chunked => {
            let mut scanner = wire::ChunkScanner::default();
            match scanner.scan(&buf[head_len..]) {
                Ok(Some(_)) => scanner.data,
                Ok(None) => return Step::Hyper,
                Err(()) => return Step::Refuse(StatusCode::BAD_REQUEST),
            }
        }
        _ => 0,
    };
    let Some(host_raw) = host else {
        return Step::Refuse(StatusCode::BAD_REQUEST);
    };
    let Some(route_host) = route_host(host_raw) else {
        return Step::Refuse(StatusCode::BAD_REQUEST);
    };
    let path = target.split('?').next().unwrap_or(target);

    let request_id = RequestId::new(rid);
    let mut log = table.config.listener.access_log.then(|| {
        let m = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        AccessLog::new(
            m,
            Some(&route_host),
            path,
            started,
            &request_id.header(),
            peer,
        )
    });
    // A body this path will not read: answer, then close.
    let close = body != Framing::None || conn.close;
    let Some(route) = table.match_route(listener, Some(&route_host), path) else {
        state.metrics.no_route.inc();
        return Step::Reply(Reply {
            head_len,
            close,
            reply: ErrorReply {
                status: StatusCode::NOT_FOUND,
                kind: "no_route",
                msg: "no route matches this host and path",
                request_id,
                log,
            },
        });
    };
    let cluster = &table.clusters[route.cluster];
    let cfg = &cluster.config;
    if cfg.http2 || cfg.tls.is_some() || route.hedge || route.redirect.is_some() {
        return Step::Hyper;
    }
    if let Some(l) = log.as_mut() {
        l.cluster = Some(cluster.name.clone());
    }
    let affinity_key = match &cfg.affinity {
        crate::config::Affinity::Header(h) => req
            .headers
            .iter()
            .find(|x| x.name.eq_ignore_ascii_case(h.as_str()))
            .map(|x| x.value),
        _ => None,
    };
    cluster.runtime.shared.retry_budget.deposit(
        cfg.retry.budget_ratio,
        crate::state::budget_cap(cfg.retry.min_retries_per_second),
    );
    let pick = match proxy::first_pick(cluster, peer, affinity_key) {
        Ok(p) => p,
        Err(kind) => {
            cluster.runtime.metrics.error(kind);
            return Step::Reply(Reply {
                head_len,
                close,
                reply: ErrorReply {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    kind,
                    msg: proxy::NO_ENDPOINT,
                    request_id,
                    log,
                },
            });
        }
    };

    // The upstream head: the request line, the end-to-end headers as sent (names in their
    // case, Host kept), then the forwarding headers and the framing this path writes itself.
    let mut up = Scratch::take();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    up.extend_from_slice(target.as_bytes());
    up.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if wire::is_hop_by_hop(name, h.value)
            || conn.names(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"x-forwarded-host")
            || name.eq_ignore_ascii_case(b"x-request-id")
        {
            continue;
        }
        wire::put_header(&mut up, name, h.value);
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff.filter(|v| !v.is_empty()) {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    {
        use std::io::Write;
        let _ = write!(up, "{}", peer.ip().to_canonical());
    }
    up.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n");
    wire::put_header(&mut up, b"x-forwarded-host", host_raw);
    wire::put_header(&mut up, b"x-request-id", request_id.as_bytes());
    match body {
        Framing::Chunked => up.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            up.extend_from_slice(b"content-length: ");
            wire::put_u64(&mut up, n);
            up.extend_from_slice(b"\r\n");
        }
        _ => {
            if length == Some(0) {
                up.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    up.extend_from_slice(b"\r\n");

    Step::Forward(Forward {
        head_len,
        upstream_head: up,
        body,
        body_bytes,
        head_method: method == "HEAD",
        idempotent: matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"),
        client_close: conn.close,
        cluster,
        pick,
        timeout: route.timeout,
        started,
        request_id,
        log,
        route_header: table.config.listener.route_header,
    })
}

/// The host to route on: the Host header without its port, lower case.
fn route_host(raw: &[u8]) -> Option<Cow<'_, str>> {
    let raw = std::str::from_utf8(wire::trim(raw)).ok()?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw),
    };
    Some(if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    })
}

/// Why an upstream attempt failed before a response head arrived.
enum Failure {
    /// Nothing was sent: the connect failed (or timed out).
    Connect(io::Error),
    /// The connection broke (or the upstream sent garbage) after the request went out.
    Reset(io::Error),
    /// The route's timeout passed before the response head.
    Timeout,
    /// The client broke off while its body was being sent: nobody to answer.
    ClientGone,
}

/// What the first part of an attempt gives: the upstream connection and the response head
/// parsed and already rewritten for the client.
struct Head {
    conn: TcpStream,
    rbuf: BytesMut,
    start: ResponseStart,
}

/// Sends `f` upstream (retrying as the cluster allows) and copies the response to the
/// client. Returns whether the client connection stays open.
async fn forward(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    f: Forward<'_>,
    limits: Limits,
    signal: &watch::Receiver<Signal>,
) -> bool {
    // Read when the answer is written: a drain that began meanwhile closes the connection
    // with `connection: close`.
    let draining = || *signal.borrow() != Signal::Run;
    let Forward {
        head_len,
        upstream_head,
        body,
        body_bytes,
        head_method,
        idempotent,
        client_close,
        cluster,
        mut pick,
        timeout,
        started,
        request_id,
        mut log,
        route_header,
    } = f;
    buf.advance(head_len);
    let cfg = &cluster.config;
    let cm = &cluster.runtime.metrics;
    let may_retry = body == Framing::None && cfg.retry.attempts > 0;
    if body_bytes > 0 {
        cm.request_bytes.inc_by(body_bytes);
    }
    let deadline = started + timeout;
    let mut attempt = 0u32;
    // Request body bytes still to be read from the client.
    let mut request_body = BodyEnd::new(body);
    loop {
        let ep = pick.endpoint.state.clone();
        let zone = &cluster.zones[pick.zone];
        if let Some(l) = log.as_mut() {
            l.served_by(zone, &ep.label, pick.reason);
        }
        let in_flight = InFlight::new(ep.clone());
        let sent = Instant::now();
        let attempt_fut = send(
            buf,
            &ep,
            cfg.connect_timeout,
            &upstream_head,
            &mut request_body,
            head_method,
            idempotent,
        );
        let failure = match tokio::time::timeout_at(deadline.into(), attempt_fut).await {
            Ok(Ok(head)) => {
                ep.observe(sent.elapsed(), cluster.decay);
                let status = head.start.status;
                ep.record_outcome(status >= 500, &cfg.outlier);
                proxy::count_response(
                    &zone.metrics,
                    cm,
                    pick.reason,
                    status,
                    started.elapsed().as_secs_f64(),
                );
                if let Some(l) = log.as_mut() {
                    l.status = status;
                }
                let route = route_header.then(|| (zone, &*ep.label, pick.reason));
                // The client's connection stays open only if its request was read whole.
                let keep = !client_close && !draining() && request_body.is_done();
                let done = Completion::new(in_flight, cm, log);
                return respond(client, head, done, &ep, &request_id, route, keep, limits).await;
            }
            Ok(Err(Failure::ClientGone)) => return false,
            Err(_) => Failure::Timeout,
            Ok(Err(f)) => f,
        };
        drop(in_flight);
        // After an error the client's connection stays open only if its request was read whole.
        let keep = request_body.is_done() && !client_close && !draining();
        let (connect, err) = match failure {
            Failure::Timeout => {
                ep.observe(timeout, cluster.decay);
                ep.record_outcome(true, &cfg.outlier);
                proxy::count_failure(zone, cm, 504, "upstream_timeout", started);
                let r = ErrorReply {
                    status: StatusCode::GATEWAY_TIMEOUT,
                    kind: "upstream_timeout",
                    msg: "the upstream did not answer in time",
                    request_id,
                    log,
                };
                return reply_error(client, r, keep, limits).await;
            }
            Failure::Connect(e) => (true, e),
            Failure::Reset(e) => (false, e),
            Failure::ClientGone => return false,
        };
        if connect {
            ep.metrics.connect_errors.inc();
        }
        ep.record_outcome(true, &cfg.outlier);
        let retryable = may_retry && attempt < cfg.retry.attempts && (connect || idempotent);
        let kind = if connect {
            "upstream_connect_error"
        } else {
            "upstream_reset"
        };
        warn!(
            target: "proxy",
            cluster = %cluster.name, endpoint = %ep.label, zone = %zone.zone,
            error = %format_args!("{}: {err}", if connect { "connect" } else { "upstream connection" }),
            "upstream request failed{}", if retryable { "; retrying" } else { "" }
        );
        if let Some(next) = proxy::retry_pick(cluster, &ep, retryable) {
            pick = next;
            attempt += 1;
            continue;
        }
        proxy::count_failure(zone, cm, 502, kind, started);
        let r = ErrorReply {
            status: StatusCode::BAD_GATEWAY,
            kind,
            msg: "the upstream request failed",
            request_id,
            log,
        };
        return reply_error(client, r, keep, limits).await;
    }
}

async fn reply_error(client: &mut TcpStream, r: ErrorReply, keep: bool, limits: Limits) -> bool {
    let out = r.bytes(!keep);
    write_all(client, &out, limits.idle_timeout).await.is_ok() && keep
}

/// One attempt up to the response head: a pooled connection (or a new one), the request
/// head and body, the response head. A pooled connection the upstream closed meanwhile is
/// replaced by a new one when the write failed (nothing was taken) or, for idempotent
/// requests, when it closed without a byte of answer.
#[allow(clippy::too_many_arguments)]
async fn send(
    buf: &mut BytesMut,
    ep: &crate::state::EndpointState,
    connect_timeout: Duration,
    upstream_head: &[u8],
    body: &mut BodyEnd,
    head_method: bool,
    idempotent: bool,
) -> Result<Head, Failure> {
    // The body is in hand (see `prepare`): it goes out with the head, in one write.
    let (n, _) = body.take(buf).map_err(|_| Failure::ClientGone)?;
    let first: Cow<'_, [u8]> = if n == 0 {
        Cow::Borrowed(upstream_head)
    } else {
        let mut v = Vec::with_capacity(upstream_head.len() + n);
        v.extend_from_slice(upstream_head);
        v.extend_from_slice(&buf[..n]);
        Cow::Owned(v)
    };
    buf.advance(n);
    let (mut conn, mut reused) = ep
        .idle
        .acquire(ep.addr, connect_timeout)
        .await
        .map_err(Failure::Connect)?;
    loop {
        if let Err(e) = conn.write_all(&first).await {
            // Nothing reached a pooled connection the upstream had closed: a new one.
            if reused {
                conn = redial(ep, connect_timeout).await?;
                reused = false;
                continue;
            }
            return Err(Failure::Reset(e));
        }
        let mut rbuf = take_buf();
        loop {
            match response_start(&rbuf, head_method) {
                Ok(Some(start)) if start.informational => {
                    // 100 Continue and friends: not for the client of this path.
                    rbuf.advance(start.head_len);
                    continue;
                }
                Ok(Some(start)) => return Ok(Head { conn, rbuf, start }),
                Ok(None) => {}
                Err(e) => return Err(Failure::Reset(e)),
            }
            if rbuf.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Reset(io::Error::other("response head too large")));
            }
            if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(BUF_SIZE);
            }
            match conn.read_buf(&mut rbuf).await {
                Ok(0) if reused && idempotent && rbuf.is_empty() => break,
                Ok(0) => {
                    return Err(Failure::Reset(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response head",
                    )))
                }
                Err(_) if reused && idempotent && rbuf.is_empty() => break,
                Err(e) => return Err(Failure::Reset(e)),
                Ok(_) => {}
            }
        }
        // The pooled connection was closed under us: once more on a new one.
        give_buf(rbuf);
        conn = redial(ep, connect_timeout).await?;
        reused = false;
    }
}

async fn redial(
    ep: &crate::state::EndpointState,
    connect_timeout: Duration,
) -> Result<TcpStream, Failure> {
    crate::upstream::IdlePool::dial(ep.addr, connect_timeout)
        .await
        .map_err(Failure::Connect)
}

/// A parsed upstream response head, rewritten for the client.
struct ResponseStart {
    head_len: usize,
    status: u16,
    informational: bool,
    framing: Framing,
    /// The upstream keeps the connection open after this response.
    upstream_keep_alive: bool,
    /// The client head without the router's own headers and the final CRLF.
    out: Scratch,
    has_date: bool,
}

fn response_start(rbuf: &[u8], head_method: bool) -> io::Result<Option<ResponseStart>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(rbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(io::Error::other("bad response head"));
    };
    if status == 101 {
        return Err(io::Error::other(
            "101 to a request that did not ask to upgrade",
        ));
    }
    let informational = (100..200).contains(&status);
    let mut conn = ConnectionOptions::default();
    let mut length = None;
    let mut chunked = false;
    let mut te = false;
    let mut has_date = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            conn.add(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length = Some(
                wire::content_length(length, h.value)
                    .map_err(|_| io::Error::other("bad content-length from upstream"))?,
            );
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            chunked = wire::ends_chunked(h.value).unwrap_or(false);
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
    }
    let framing = if head_method || informational || status == 204 || status == 304 {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let mut out = Scratch::take();
    out.extend_from_slice(b"HTTP/1.1 ");
    wire::put_u64(&mut out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let framing_header =
            name.eq_ignore_ascii_case(b"content-length") && matches!(framing, Framing::Length(_));
        if wire::is_hop_by_hop(name, h.value)
            || conn.names(name)
            || framing_header
            || name.eq_ignore_ascii_case(b"x-request-id")
        {
            continue;
        }
        wire::put_header(&mut out, name, h.value);
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            wire::put_u64(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        // A body that ends with the upstream's connection is re-framed as chunked, so the
        // client's connection outlives it.
        Framing::Chunked | Framing::Close => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
        Framing::None => {}
    }
    Ok(Some(ResponseStart {
        head_len,
        status,
        informational,
        framing,
        upstream_keep_alive: version == 1 && !conn.close,
        out,
        has_date,
    }))
}

/// Writes the response head and copies the body through; returns the upstream connection
/// to its pool when the response ended cleanly. Returns whether the client stays open.
#[allow(clippy::too_many_arguments)]
async fn respond(
    client: &mut TcpStream,
    head: Head,
    mut done: Completion,
    ep: &crate::state::EndpointState,
    request_id: &RequestId,
    route: Option<(&crate::routing::table::ZoneTable, &str, Reason)>,
    keep: bool,
    limits: Limits,
) -> bool {
    let Head {
        mut conn,
        mut rbuf,
        start,
    } = head;
    let rechunk = start.framing == Framing::Close;
    let mut out = start.out;
    wire::put_header(&mut out, b"x-request-id", request_id.as_bytes());
    if let Some((zone, endpoint, reason)) = route {
        out.extend_from_slice(b"x-edge-route: region=");
        out.extend_from_slice(zone.region.as_bytes());
        out.extend_from_slice(b"; zone=");
        out.extend_from_slice(zone.zone.as_bytes());
        out.extend_from_slice(b"; endpoint=");
        out.extend_from_slice(endpoint.as_bytes());
        out.extend_from_slice(b"; reason=");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !start.has_date {
        wire::put_date(&mut out);
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    rbuf.advance(start.head_len);
    let mut body = BodyEnd::new(start.framing);
    let mut ok = true;
    // Raw body bytes copied (chunk framing included).
    let mut raw = 0u64;
    let mut ended = match body.take(&rbuf) {
        Ok((n, ended)) => {
            if rechunk {
                put_chunk(&mut out, &rbuf[..n]);
            } else {
                out.extend_from_slice(&rbuf[..n]);
            }
            raw += n as u64;
            rbuf.advance(n);
            ended || body.is_done()
        }
        Err(()) => {
            ok = false;
            false
        }
    };
    if write_all(client, &out, limits.idle_timeout).await.is_err() {
        give_buf(rbuf);
        return false;
    }
    drop(out);
    while ok && !ended {
        rbuf.clear();
        if rbuf.capacity() < BUF_SIZE {
            rbuf.reserve(BUF_SIZE);
        }
        match conn.read_buf(&mut rbuf).await {
            Ok(0) if rechunk => {
                ended = write_all(client, b"0\r\n\r\n", limits.idle_timeout)
                    .await
                    .is_ok();
                ok = ended;
                break;
            }
            Ok(0) | Err(_) => {
                ok = false;
                break;
            }
            Ok(_) => {}
        }
        let Ok((n, end)) = body.take(&rbuf) else {
            ok = false;
            break;
        };
        let written = if rechunk {
            let mut chunk = Vec::with_capacity(n + 16);
            put_chunk(&mut chunk, &rbuf[..n]);
            write_all(client, &chunk, limits.idle_timeout).await
        } else {
            write_all(client, &rbuf[..n], limits.idle_timeout).await
        };
        if written.is_err() {
            done.sent(body.payload(raw));
            give_buf(rbuf);
            return false;
        }
        raw += n as u64;
        rbuf.advance(n);
        ended = end;
    }
    done.sent(body.payload(raw));
    if ended {
        done.complete();
    }
    // Reused only after a clean end with nothing unasked behind it.
    if ended && rbuf.is_empty() && start.upstream_keep_alive && start.framing != Framing::Close {
        ep.idle.put(conn);
    }
    give_buf(rbuf);
    drop(done);
    // A response cut short leaves the client's framing broken: close.
    ok && ended && keep
}

/// Appends `data` as one chunk of a chunked body (nothing for no data: an empty chunk
/// would end the body).
fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// `write_all`, bounded: a client that does not read for `timeout` is cut off.
async fn write_all(s: &mut TcpStream, bytes: &[u8], timeout: Duration) -> io::Result<()> {
    // Usually the socket takes it all at once: no timer, no clock read.
    let bytes = match s.try_write(bytes) {
        Ok(n) if n == bytes.len() => return Ok(()),
        Ok(n) => &bytes[n..],
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => bytes,
        Err(e) => return Err(e),
    };
    match tokio::time::timeout(timeout, s.write_all(bytes)).await {
        Ok(r) => r,
        Err(_) => Err(io::ErrorKind::TimedOut.into()),
    }
}

/// A byte vector for a message head, reused per thread: heads are built for every request.
struct Scratch(Vec<u8>);

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Scratch {
    fn take() -> Scratch {
        Scratch(
            SCRATCH
                .with(|s| s.borrow_mut().pop())
                .unwrap_or_else(|| Vec::with_capacity(1024)),
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let mut v = std::mem::take(&mut self.0);
        if v.capacity() <= 4 * BUF_SIZE {
            v.clear();
            SCRATCH.with(|s| {
                let mut s = s.borrow_mut();
                if s.len() < BUF_CACHE {
                    s.push(v);
                }
            });
        }
    }
}

impl std::ops::Deref for Scratch {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

thread_local! {
    /// Buffers between requests, per thread: idle connections hold none, busy ones do not
    /// allocate one per request.
    static BUFS: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// Buffers (and head vectors) kept per thread; beyond this they are freed. A buffer is held
/// only while a request is in flight, so this is about the requests in flight at once on a
/// thread; every one kept is 8 KiB of RSS that 10 000 idle connections would also carry.
const BUF_CACHE: usize = 64;

fn take_buf() -> BytesMut {
    BUFS.with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(BUF_SIZE))
}

fn give_buf(mut buf: BytesMut) {
    buf.clear();
    // `advance` moved the start forward; with nothing left in the buffer, reserving takes
    // the whole allocation back (no new allocation) so the capacity check below sees it.
    buf.reserve(BUF_SIZE);
    // Only plain buffers of the usual size come back; grown or empty ones are freed.
    if buf.capacity() < BUF_SIZE || buf.capacity() > 4 * BUF_SIZE {
        return;
    }
    BUFS.with(|b| {
        let mut b = b.borrow_mut();
        if b.len() < BUF_CACHE {
            b.push(buf);
        }
    });
}

/// A connection handed to hyper, with the bytes this path read replayed first.
pub struct Prefixed {
    prefix: BytesMut,
    stream: TcpStream,
}

impl Prefixed {
    pub fn new(stream: TcpStream) -> Prefixed {
        Prefixed {
            prefix: BytesMut::new(),
            stream,
        }
    }

    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_head_is_found_across_reads_of_any_size() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in 1..head.len() {
            let mut scanned = 0;
            let mut seen_at = None;
            for end in (step..=head.len()).step_by(step).chain([head.len()]) {
                if head_end_seen(&head[..end], &mut scanned) {
                    seen_at = Some(end);
                    break;
                }
            }
            assert_eq!(seen_at, Some(head.len()), "reads of {step} bytes");
        }
        let mut scanned = 0;
        assert!(head_end_seen(b"GET / HTTP/1.1\nHost: a\n\n", &mut scanned));
        let mut scanned = 0;
        assert!(!head_end_seen(
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            &mut scanned
        ));
    }

    #[test]
    fn a_buffer_read_from_goes_back_to_the_cache_whole() {
        let cached = || BUFS.with(|b| b.borrow().len());
        let mut buf = take_buf();
        buf.extend_from_slice(&[b'x'; 5000]);
        buf.advance(5000);
        let before = cached();
        give_buf(buf);
        assert_eq!(cached(), before + 1, "kept for the next request, not freed");
        assert!(take_buf().capacity() >= BUF_SIZE);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// A deterministic generator (xorshift): `next(n)` is in 0..n, the same sequence every run.
    fn below(seed: u64) -> impl FnMut(usize) -> usize {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        }
    }

    /// The state a connection needs, with a routing table built from `toml` by the real
    /// builder. Its probers start but the endpoint (port 9, discard) does not answer HTTP, and
    /// the tests use the table as first built: endpoints of unknown health.
    pub(super) fn test_state(toml: &str) -> ProxyState {
        let cfg = crate::config::parse("test", toml, &|_| None).expect("config");
        let metrics = std::sync::Arc::new(crate::telemetry::metrics::Metrics::new());
        let events = std::sync::Arc::new(crate::telemetry::Events::new());
        let health =
            std::sync::Arc::new(crate::control::probe::Health::new(metrics.clone(), events));
        let mut builder = crate::control::reconcile::Builder::new(health, metrics.clone());
        let table = builder.build(1, std::sync::Arc::new(cfg)).expect("table");
        ProxyState {
            table: arc_swap::ArcSwap::from_pointee(table),
            metrics,
        }
    }

    /// Upstream response heads made of valid and broken pieces: parsing one never panics, and
    /// a head it accepts is rewritten into a head that parses again with the same status.
    #[test]
    fn response_heads_of_any_shape_are_parsed_or_refused_without_panic() {
        const PIECES: [&[u8]; 16] = [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 404 Not Found\r\n",
            b"HTTP/1.1 100 Continue\r\n",
            b"HTTP/1.1 204 \r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 5, 6\r\n",
            b"Content-Length: x\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Connection: close, x-a\r\n",
            b"X-A: 1\r\n",
            b"Date: Thu, 26 Nov 2026 19:00:00 GMT\r\n",
            b"\r\n",
            b"garbage",
            b": no name\r\n",
            b"\n",
        ];
        let mut next = below(0x2545_f491_4f6c_dd1d);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut head = Vec::new();
            for _ in 0..next(7) + 1 {
                head.extend_from_slice(PIECES[next(PIECES.len())]);
            }
            let head_method = next(2) == 0;
            if let Ok(Some(start)) = response_start(&head, head_method) {
                accepted += 1;
                let mut out = start.out.to_vec();
                out.extend_from_slice(b"\r\n");
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut again = httparse::Response::new(&mut headers);
                assert!(
                    matches!(again.parse(&out), Ok(httparse::Status::Complete(_))),
                    "{:?}",
                    String::from_utf8_lossy(&out)
                );
                assert_eq!(again.code, Some(start.status));
                let hop = again.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("x-a")
                });
                // Only a Connection line inside the head (not in the bytes after it) counts.
                let named =
                    String::from_utf8_lossy(&head[..start.head_len]).contains("close, x-a\r\n");
                assert!(!(hop && named), "{:?}", String::from_utf8_lossy(&out));
            }
        }
        assert!(
            accepted > 100,
            "the generator makes valid heads too ({accepted})"
        );
    }

    /// Client request heads made of valid and broken pieces, against a real routing table:
    /// every one is answered (forwarded, refused, replied to or handed to hyper) without a
    /// panic, and a forwarded one becomes an upstream head that parses, with no hop-by-hop
    /// header and exactly one framing header.
    #[tokio::test]
    async fn request_heads_of_any_shape_get_an_answer_without_panic() {
        let text = r#"
[locality]
region = "r0"
zone = "r0-z0"
[[cluster]]
name = "api"
affinity = { header = "x-session" }
[cluster.health_check]
interval = "1h"
[[cluster.endpoint]]
address = "127.0.0.1:9"
region = "r0"
zone = "r0-z0"
[[route]]
host = "api.test"
path_prefix = "/api"
cluster = "api"
"#;
        let state = test_state(text);
        const PIECES: [&[u8]; 22] = [
            b"GET /api/x HTTP/1.1\r\n",
            b"POST /api?q=1 HTTP/1.1\r\n",
            b"GET http://api.test/ HTTP/1.1\r\n",
            b"GET / HTTP/1.0\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"Host: api.test\r\n",
            b"Host: API.test:80\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: 3, 4\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Connection: close, x-a\r\n",
            b"Upgrade: websocket\r\nConnection: upgrade\r\n",
            b"Expect: 100-continue\r\n",
            b"X-A: 1\r\n",
            b"X-Session: s1\r\n",
            b"X-Forwarded-For: 10.0.0.1\r\n",
            b"X-Request-Id: abc\r\n",
            b"\r\n",
            b"abc",
            b"3\r\nabc\r\n0\r\n\r\n",
            b"\x00\xff",
        ];
        let mut next = below(0x9e37_79b9_7f4a_7c15);
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let table = state.table.load_full();
        let mut forwarded = 0;
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            if next(2) == 0 {
                // Shaped like a request: a request line, a Host, headers, the blank line, a body.
                buf.extend_from_slice(PIECES[next(5)]);
                buf.extend_from_slice(PIECES[5 + next(2)]);
                for _ in 0..next(5) {
                    buf.extend_from_slice(PIECES[7 + next(11)]);
                }
                buf.extend_from_slice(b"\r\n");
                buf.extend_from_slice(PIECES[18 + next(4)]);
            } else {
                for _ in 0..next(8) + 1 {
                    buf.extend_from_slice(PIECES[next(PIECES.len())]);
                }
            }
            if let Step::Forward(f) = prepare(&buf, &table, peer, 64 * 1024, 0, &state) {
                forwarded += 1;
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut up = httparse::Request::new(&mut headers);
                assert!(
                    matches!(up.parse(&f.upstream_head), Ok(httparse::Status::Complete(n)) if n == f.upstream_head.len()),
                    "{:?}",
                    String::from_utf8_lossy(&f.upstream_head)
                );
                let count = |name: &str| {
                    up.headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .count()
                };
                let shown = String::from_utf8_lossy(&f.upstream_head).to_string();
                assert_eq!(count("connection") + count("upgrade"), 0, "{shown}");
                let head = String::from_utf8_lossy(&buf[..f.head_len]).to_string();
                if head.contains("close, x-a\r\n") {
                    assert_eq!(count("x-a"), 0, "{head:?} -> {shown}");
                }
                assert!(count("content-length") + count("transfer-encoding") <= 1);
                assert_eq!(count("host"), 1);
                assert_eq!(count("x-request-id"), 1);
            }
        }
        assert!(
            forwarded > 100,
            "the generator makes valid requests too ({forwarded})"
        );
    }
}

#[cfg(test)]
mod size {
    use super::*;

    /// Every open connection holds its `serve` future, idle or not: 10 000 idle connections
    /// hold 10 000 of them. Guards against a large value creeping into it (an inline `Step`
    /// once made it 1 512 bytes).
    #[tokio::test]
    async fn an_idle_connection_s_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let text = "[locality]\nregion = \"r\"\nzone = \"z\"\n[[cluster]]\nname = \"a\"\n\
                    [[cluster.endpoint]]\naddress = \"127.0.0.1:9\"\nregion = \"r\"\nzone = \"z\"\n\
                    [[route]]\ncluster = \"a\"\n";
        let state = super::fuzz::test_state(text);
        let (_tx, mut rx) = watch::channel(Signal::Run);
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 65536,
            listener: 0,
        };
        let peer = "127.0.0.1:1".parse().expect("addr");
        let fut = serve(s, peer, &state, &mut rx, limits);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "the serve future is {size} bytes");
    }
}
