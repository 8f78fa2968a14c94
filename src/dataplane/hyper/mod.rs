//! The data path: one hyper service that matches a route, picks an endpoint from the current
//! routing table and streams the request there and the response back. It does no I/O but
//! the proxied request itself: health, ranking and metrics lookups were all done when the
//! table was built.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tracing::warn;

use crate::control::{ProxyState, UpstreamClient};
use crate::dataplane::request::{
    self, AccessLog, AttemptError, Completion, ErrorKind, ErrorReply, Exchange, Next,
};
use crate::routing::table::{ClusterTable, Reason};
use crate::routing::{balancer, rewrite};
use crate::state::InFlight;
use crate::upstream::{self, RequestBody};

mod body;
mod failure;
mod hedge;
mod proxied;
mod upgrade;

pub use body::{BodyError, ResponseBody, UpstreamBody};
use failure::{attempt_error, client_side};
use hedge::{hedge_delay, hedged, BackupParts, HEDGE_BUDGET_CAP};
use upgrade::{forward_upgrade, is_upgrade};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

static X_EDGE_ERROR: HeaderName = HeaderName::from_static("x-edge-error");

static X_EDGE_ROUTE: HeaderName = HeaderName::from_static("x-edge-route");

/// Renders a reply the router makes itself (and writes its access-log line).
fn error_exit(r: ErrorReply, request_id: &HeaderValue) -> Response<ResponseBody> {
    let (status, kind) = (r.status(), r.kind.as_str());
    error_response(status, kind, r.body(), request_id)
}

/// The host a request is routed on, checked as [`request::route_host`] says: one Host (or
/// the HTTP/2 `:authority`); an absolute-form target's authority must agree with it.
/// HTTP/1.1 needs a Host (RFC 9112 3.2); HTTP/1.0 may go without and routes on no host.
fn request_host(req: &Request<Incoming>) -> Result<Option<String>, ()> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(());
    }
    let target = req.uri().authority().map(|a| a.as_str().as_bytes());
    let raw = match (host, target) {
        (Some(h), Some(t)) if !request::same_authority(t, h.as_bytes(), default_port(req)) => {
            return Err(())
        }
        (Some(h), _) => h.as_bytes(),
        (None, Some(t)) => t,
        (None, None) if req.version() == Version::HTTP_11 => return Err(()),
        (None, None) => return Ok(None),
    };
    request::route_host(raw)
        .map(|h| Some(h.into_owned()))
        .ok_or(())
}

fn default_port<B>(req: &Request<B>) -> u16 {
    if req.uri().scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    }
}

/// Entry point for every downstream request.
pub async fn handle(
    state: Arc<ProxyState>,
    mut req: Request<Incoming>,
    (client, local): (SocketAddr, SocketAddr),
    https: bool,
    listener: u64,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let table = state.table.load_full();
    let request_id = match req.headers().get(&X_REQUEST_ID) {
        Some(v) if !v.is_empty() && v.len() <= 128 => v.clone(),
        _ => new_request_id(),
    };
    let host = request_host(&req);
    let log = table.config.listener.access_log.then(|| {
        AccessLog::new(
            req.method().clone(),
            host.as_ref().ok().and_then(|h| h.as_deref()),
            req.uri().path(),
            started,
            &request_id,
            client,
        )
    });
    let Ok(host) = host else {
        state
            .metrics
            .errors
            .with_label_values(&["", "bad_host"])
            .inc();
        return Ok(error_exit(
            ErrorReply::new(ErrorKind::BadHost, log),
            &request_id,
        ));
    };
    if req.method() == Method::CONNECT {
        // A forward-proxy tunnel: never opened to a configured upstream on a client's say.
        return Ok(error_exit(
            ErrorReply::new(ErrorKind::MethodNotAllowed, log),
            &request_id,
        ));
    }
    let Some(route) = table.match_route(listener, host.as_deref(), req.uri().path()) else {
        state.metrics.no_route.inc();
        return Ok(error_exit(
            ErrorReply::new(ErrorKind::NoRoute, log),
            &request_id,
        ));
    };
    if let Some(r) = &route.redirect {
        return Ok(super::redirect::response(
            r,
            host.as_deref(),
            req.uri(),
            &request_id,
            log,
        ));
    }
    let cluster = &table.clusters[route.cluster];
    let begin = request::Begin {
        client,
        affinity_key: affinity_header(&cluster.config, req.headers()),
        method: req.method().as_str().as_bytes(),
        replayable: req.body().is_end_stream(),
        started,
        timeout: route.timeout,
    };
    let mut x = match Exchange::begin(cluster, begin, log) {
        Ok(x) => x,
        Err(r) => return Ok(error_exit(r, &request_id)),
    };
    x.request_headers = &route.request_headers;
    x.response_headers = &route.response_headers;
    if cluster.config.send_proxy_protocol.is_some() {
        x.announce = Some((client, local));
    }
    if let Some(r) = &route.rewrite_prefix {
        rewrite_target(req.uri_mut(), &route.path_prefix, r);
    }
    let route_header = table.config.listener.route_header;
    let mut resp = if is_upgrade(&req) {
        forward_upgrade(x, req, host, client, https, &request_id, route_header).await
    } else {
        forward(
            x,
            req,
            host,
            client,
            https,
            request_id.clone(),
            route.hedge,
            route_header,
        )
        .await
    };
    resp.headers_mut().insert(&X_REQUEST_ID, request_id);
    Ok(resp)
}

/// The client's request body across attempts: it goes with an attempt, comes back when that
/// attempt's connect failed before reading it (so the request can go again whole), and
/// tells the response whether the client broke it.
struct ClientBody {
    body: Option<Incoming>,
    /// Set on the attempt that took the body: where it comes back if unread.
    returned: Option<tokio::sync::oneshot::Receiver<Incoming>>,
    /// No body at all: any attempt may be sent again.
    empty: bool,
    bytes: prometheus::IntCounter,
    client_broke: Arc<AtomicBool>,
}

impl ClientBody {
    fn new(body: Incoming, bytes: prometheus::IntCounter) -> ClientBody {
        ClientBody {
            empty: body.is_end_stream(),
            body: Some(body),
            returned: None,
            bytes,
            client_broke: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The body for the next attempt: the client's stream if it is still here, else none.
    fn for_attempt(&mut self) -> RequestBody {
        match self.body.take() {
            Some(b) if !b.is_end_stream() => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                self.returned = Some(rx);
                RequestBody::stream(b, self.bytes.clone(), tx, self.client_broke.clone())
            }
            _ => RequestBody::Empty,
        }
    }

    /// After a failed attempt: takes the body back if that attempt never read it.
    fn recover(&mut self) {
        if let Some(mut rx) = self.returned.take() {
            self.body = rx.try_recv().ok();
        }
    }

    /// Whether the whole request can still be sent again.
    fn can_resend(&self) -> bool {
        self.empty || self.body.is_some()
    }
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    mut x: Exchange<'_>,
    req: Request<Incoming>,
    host: Option<String>,
    client: SocketAddr,
    https: bool,
    request_id: HeaderValue,
    hedge: bool,
    route_header: bool,
) -> Response<ResponseBody> {
    let cluster = x.cluster;
    let cm = x.metrics();
    let cfg = x.config();
    let shared = &cluster.runtime.shared;
    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    prepare_upstream_headers(
        &mut parts.headers,
        x.request_headers,
        client,
        https,
        host.as_deref(),
        &parts.uri,
        &request_id,
    );
    // A refcounted view of the request's own buffer: no copy, no second parse.
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let body_empty = body.is_end_stream();
    // Hedged: idempotent, no body, and hedging on for the route (or its cluster).
    // Not for clusters that send PROXY headers: a hedge races two connections of its own.
    let hedge_on = hedge
        && body_empty
        && cfg.send_proxy_protocol.is_none()
        && matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if hedge_on {
        shared
            .hedge_budget
            .deposit(cfg.hedge.budget_ratio, HEDGE_BUDGET_CAP);
    }
    // Kept only when a retry or a hedge could need them: both resend the same request.
    let saved_headers = (cfg.retry.attempts > 0 || hedge_on).then(|| parts.headers.clone());
    let mut body = ClientBody::new(body, cm.request_bytes.clone());
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let version = if cfg.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let mut headers = Some(parts.headers);
    // One resend on a fresh connection when a pooled one turns out closed (see below).
    let mut closed_resend = saved_headers.is_some();

    loop {
        let (ep, zone) = x.target();
        let Ok(uri) = upstream_uri(scheme, ep, &path_and_query) else {
            return error_exit(
                ErrorReply::new(ErrorKind::BadRequest, x.log.take()),
                &request_id,
            );
        };
        // The client's body goes with the first attempt; a connect failure gives it back.
        let mut up = Request::new(body.for_attempt());
        *up.method_mut() = method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = version;
        *up.headers_mut() = headers
            .take()
            .or_else(|| saved_headers.clone())
            .unwrap_or_default();
        let mut in_flight = InFlight::new(ep.clone());
        let mut sent = Instant::now();
        let result = if hedge_on && x.attempt == 0 {
            let delay = hedge_delay(cfg, zone, ep);
            let parts = BackupParts {
                scheme,
                path_and_query: &path_and_query,
                method: &method,
                version,
                headers: &saved_headers,
            };
            let h = Box::pin(hedged(cluster, &x.pick, up, delay, x.deadline, parts)).await;
            if h.sent {
                // The hedge was this request's second attempt: no retry after it.
                x.attempt += 1;
            }
            if let Some((b, b_in_flight, b_sent)) = h.backup {
                x.switch_to(b);
                in_flight = b_in_flight;
                sent = b_sent;
            }
            h.result.map(|r| {
                r.map(|r| r.map(UpstreamBody::Hyper))
                    .map_err(|e| attempt_error(&e))
            })
        } else {
            let attempt = proxied::attempt(cluster, ep, x.announce, x.idempotent(), up);
            tokio::time::timeout_at(x.deadline.into(), attempt).await
        };
        let failure = match result {
            Ok(Ok(resp)) => {
                x.responded(resp.status().as_u16(), sent);
                let route = x
                    .route_header(route_header)
                    .map(|(z, e, r)| self::route_header(z, e, r));
                return finish_response(resp, in_flight, x, route, body.client_broke);
            }
            Err(_) => AttemptError::Timeout,
            Ok(Err(e)) => {
                body.recover();
                e
            }
        };
        drop(in_flight);
        let may_resend = body.can_resend();
        // hyper's pool does not say whether the connection was a reused one; the native
        // engine knows and resends only then. Once, on the same endpoint, is what a stale
        // pooled connection needs; an endpoint that closes every connection fails again and
        // is counted then.
        if matches!(failure, AttemptError::Closed(_))
            && closed_resend
            && may_resend
            && x.idempotent()
        {
            closed_resend = false;
            continue;
        }
        match x.failed(failure, may_resend) {
            Next::Retry => continue,
            Next::Reply(r) => return error_exit(r, &request_id),
            // hyper has a response to send whatever happens; the client is gone anyway.
            Next::Abort => {
                return error_response(
                    ErrorKind::ClientAbort.status(),
                    ErrorKind::ClientAbort.as_str(),
                    String::new(),
                    &request_id,
                )
            }
        }
    }
}

/// The value of the cluster's affinity header in `headers`, when the cluster has one.
fn affinity_header<'h>(
    cfg: &crate::config::ClusterConfig,
    headers: &'h HeaderMap,
) -> Option<&'h [u8]> {
    match &cfg.affinity {
        crate::config::Affinity::Header(h) => headers.get(h).map(|v| v.as_bytes()),
        _ => None,
    }
}

fn finish_response(
    resp: Response<UpstreamBody>,
    in_flight: InFlight,
    x: Exchange<'_>,
    route_header: Option<HeaderValue>,
    client_broke: Arc<AtomicBool>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    // Both framings from the upstream: Transfer-Encoding wins (RFC 9112 6.3) and the stale
    // length must not reach the client, where it would frame the body.
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop(&mut parts.headers);
    rewrite::apply(x.response_headers, &mut parts.headers);
    // An HTTP/1.0 upstream's version is not the client's: the server speaks its own.
    parts.version = Version::HTTP_11;
    // The router's own header comes from the router alone, never from an upstream.
    parts.headers.remove(&X_EDGE_ROUTE);
    if let Some(v) = route_header {
        parts.headers.insert(&X_EDGE_ROUTE, v);
    }
    let mut done = Box::new(x.completion(in_flight).watch_client(Some(client_broke)));
    let body = if body.is_end_stream() {
        // Nothing will ever be polled: finish now rather than when hyper drops the body.
        done.complete();
        drop(done);
        ResponseBody::Upstream {
            inner: body,
            done: None,
        }
    } else {
        ResponseBody::Upstream {
            inner: body,
            done: Some(done),
        }
    };
    Response::from_parts(parts, body)
}

/// Replaces the route's `prefix` in the target's path (scheme and authority kept).
fn rewrite_target(uri: &mut Uri, prefix: &str, replacement: &str) {
    let Some(pq) = uri.path_and_query() else {
        return;
    };
    // The client's path was valid and the replacement is checked at config time, so this
    // parses; if it ever did not, the request goes with its path unchanged.
    let Ok(pq) = PathAndQuery::try_from(rewrite::path(pq.as_str(), prefix, replacement).as_ref())
    else {
        return;
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(pq);
    if let Ok(u) = Uri::from_parts(parts) {
        *uri = u;
    }
}

/// `scheme://addr/path?query` for the upstream request to `ep`.
fn upstream_uri(
    scheme: &'static str,
    ep: &crate::state::EndpointState,
    path_and_query: &PathAndQuery,
) -> Result<Uri, http::Error> {
    upstream_uri_to(scheme, &ep.label, ep.authority.as_ref(), path_and_query)
}

/// [`upstream_uri`] to `addr` (the endpoint's socket address as text), with its parsed
/// `authority` when there is one. Plain concatenation: `format!` costs more on every request.
fn upstream_uri_to(
    scheme: &'static str,
    addr: &str,
    authority: Option<&Authority>,
    path_and_query: &PathAndQuery,
) -> Result<Uri, http::Error> {
    let pq = path_and_query.as_str();
    if pq.starts_with('/') {
        // The usual origin-form target: reuse the parsed path, parse only the authority.
        let mut p = http::uri::Parts::default();
        p.scheme = Some(if scheme == "https" {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        p.authority = Some(match authority {
            // A reference count, not a parse and a copy, on every request.
            Some(a) => a.clone(),
            None => Authority::try_from(addr)?,
        });
        p.path_and_query = Some(path_and_query.clone());
        return Ok(Uri::from_parts(p)?);
    }
    // Anything else (`*`) goes through the full parser, which decides as before.
    let mut s = String::with_capacity(scheme.len() + 3 + addr.len() + pq.len());
    s.push_str(scheme);
    s.push_str("://");
    s.push_str(addr);
    s.push_str(pq);
    Ok(Uri::try_from(s)?)
}

fn route_header(
    zone: &crate::routing::table::ZoneTable,
    endpoint: &str,
    reason: Reason,
) -> HeaderValue {
    let s = format!(
        "region={}; zone={}; endpoint={}; reason={}",
        zone.region,
        zone.zone,
        endpoint,
        reason.as_str()
    );
    HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("reason=unknown"))
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Bit of a hop-by-hop name in [`hop_by_hop_present`]'s mask: its index in [`HOP_BY_HOP`],
/// then Upgrade and TE.
fn hop_bit(name: &HeaderName) -> u16 {
    match HOP_BY_HOP.iter().position(|h| h == name) {
        Some(i) => 1 << i,
        None if name == header::UPGRADE => 1 << HOP_BY_HOP.len(),
        None if name == header::TE => 1 << (HOP_BY_HOP.len() + 1),
        None => 0,
    }
}

/// Which hop-by-hop names `h` holds, in one pass over its names: a message carries a few
/// names, and most carry no hop-by-hop one but Connection, so this is cheaper than looking
/// each hop-by-hop name up.
fn hop_by_hop_present(h: &HeaderMap) -> u16 {
    h.keys().fold(0, |m, n| m | hop_bit(n))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in Connection.
/// `te: trailers` is end-to-end in practice (gRPC needs it), so it stays.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    let present = hop_by_hop_present(h);
    if present == 0 {
        return;
    }
    // Every Connection line counts: options on a second line are hop-by-hop too.
    if present & 1 != 0 {
        let named: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        for conn in named {
            if let Ok(list) = conn.to_str() {
                for name in list.split(',') {
                    let name = name.trim();
                    // Host is never hop-by-hop: the upstream must see what was routed.
                    if !name.is_empty()
                        && !name.eq_ignore_ascii_case("te")
                        && !name.eq_ignore_ascii_case("host")
                    {
                        h.remove(name);
                    }
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            h.remove(name);
        }
    }
    if present & (1 << HOP_BY_HOP.len()) != 0 {
        h.remove(header::UPGRADE);
    }
    // Line by line, as the native engine: each `te` line other than `trailers` goes.
    if present & (1 << (HOP_BY_HOP.len() + 1)) != 0
        && h.get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes() != b"trailers")
    {
        let trailers = h
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes() == b"trailers");
        h.remove(header::TE);
        if trailers {
            h.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
}

/// The upstream request's headers: the client's hop-by-hop ones removed, then the route's
/// edits (so a client's `Connection` naming a line the route writes cannot strip it), then
/// the forwarding headers the router writes itself.
#[allow(clippy::too_many_arguments)]
fn prepare_upstream_headers(
    h: &mut HeaderMap,
    edits: &crate::config::HeaderActions,
    client: SocketAddr,
    https: bool,
    host: Option<&str>,
    uri: &Uri,
    request_id: &HeaderValue,
) {
    remove_hop_by_hop(h);
    if !edits.is_empty() {
        rewrite::apply(edits, h);
    }
    // Room for the five added below at once, not a grow halfway through.
    h.reserve(5);
    let lookalikes: Vec<HeaderName> = h
        .keys()
        .filter(|n| request::is_forwarding_lookalike(n.as_str().as_bytes()))
        .cloned()
        .collect();
    for n in lookalikes {
        h.remove(n);
    }
    let ip = client.ip().to_canonical();
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => HeaderValue::from_str(&format!("{prev}, {ip}")).ok(),
        _ => {
            // No prior hop: the address written straight into the value's own buffer.
            let mut buf = Vec::with_capacity(15);
            crate::telemetry::access::push_ip(&mut buf, ip);
            HeaderValue::from_maybe_shared(Bytes::from(buf)).ok()
        }
    };
    if let Some(v) = xff {
        h.insert(&X_FORWARDED_FOR, v);
    }
    h.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if https { "https" } else { "http" }),
    );
    // The Host header is kept as the client sent it; HTTP/2 clients send :authority instead.
    let original_host = h.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    if let Some(v) = original_host {
        h.insert(&X_FORWARDED_HOST, v.clone());
        h.entry(header::HOST).or_insert(v);
    } else if let Some(hn) = host.and_then(|s| HeaderValue::from_str(s).ok()) {
        h.insert(&X_FORWARDED_HOST, hn);
    }
    h.insert(&X_REQUEST_ID, request_id.clone());
}

fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    request::fill_request_id(&mut buf);
    // One allocation that holds the bytes; the clones for the upstream request and the
    // response are refcount increments.
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A response made by the router itself: short text, `x-edge-error` saying why.
pub fn error_response(
    status: StatusCode,
    kind: &'static str,
    body: String,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::Full(Some(Bytes::from(body))));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(&X_EDGE_ERROR, HeaderValue::from_static(kind));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(&X_REQUEST_ID, request_id.clone());
    r
}
