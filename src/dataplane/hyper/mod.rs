//! The data path: one hyper service that matches a route, picks an endpoint from the current
//! routing table and streams the request there and the response back. It does no I/O but
//! the proxied request itself: health, ranking and metrics lookups were all done when the
//! table was built.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::control::{ProxyState, Table, UpstreamClient};
use crate::routing::balancer;
use crate::routing::table::{ClusterTable, Reason};
use crate::state::InFlight;
use crate::telemetry::metrics::{ClusterMetrics, ZoneMetrics};
use crate::upstream::{self, RequestBody};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_EDGE_ERROR: HeaderName = HeaderName::from_static("x-edge-error");
static X_EDGE_ROUTE: HeaderName = HeaderName::from_static("x-edge-route");

/// Response body to the client: the upstream's stream, carrying the request's in-flight mark
/// and access-log record until the last byte is sent (or the client goes away).
pub enum ResponseBody {
    Upstream {
        inner: Incoming,
        done: Option<Box<Completion>>,
    },
    Full(Option<Bytes>),
}

impl ResponseBody {
    fn text(s: &str) -> ResponseBody {
        ResponseBody::Full(Some(Bytes::copy_from_slice(s.as_bytes())))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Upstream { inner, done } => {
                let r = Pin::new(&mut *inner).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(c)) = (f.data_ref(), done.as_mut()) {
                            c.bytes += d.len() as u64;
                        }
                        // A body with a known length ends with its last frame: hyper may
                        // never poll again, so finish (and log it complete) now.
                        if inner.is_end_stream() {
                            if let Some(c) = done.as_mut() {
                                c.complete = true;
                            }
                            *done = None;
                        }
                    }
                    Poll::Ready(None) => {
                        if let Some(c) = done.as_mut() {
                            c.complete = true;
                        }
                        *done = None;
                    }
                    _ => {}
                }
                r
            }
            ResponseBody::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.is_end_stream(),
            ResponseBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { inner, .. } => inner.size_hint(),
            ResponseBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ResponseBody::Full(None) => SizeHint::with_exact(0),
        }
    }
}

/// Finishes a request when its response body ends or is dropped: releases the in-flight mark,
/// counts bytes, writes the access log.
pub struct Completion {
    _in_flight: InFlight,
    bytes: u64,
    complete: bool,
    response_bytes: prometheus::IntCounter,
    log: Option<AccessLog>,
}

impl Completion {
    pub fn new(in_flight: InFlight, cm: &ClusterMetrics, log: Option<AccessLog>) -> Completion {
        Completion {
            _in_flight: in_flight,
            bytes: 0,
            complete: false,
            response_bytes: cm.response_bytes.clone(),
            log,
        }
    }

    /// Body bytes sent to the client.
    pub fn sent(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The body ended: logged as complete when this is dropped.
    pub fn complete(&mut self) {
        self.complete = true;
    }
}

/// One request's access-log record: gathered while the request is routed, written (target
/// `access`, level info) when the response body ends, or at once for a response the
/// router makes itself. Built only when `listener.access_log` is on.
pub struct AccessLog {
    pub method: Method,
    pub host: String,
    pub path: String,
    pub status: u16,
    pub started: Instant,
    /// `None` when no route matched.
    pub cluster: Option<Arc<str>>,
    /// The serving zone and endpoint; `None` when no endpoint was tried.
    pub region: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub endpoint: Option<Arc<str>>,
    pub reason: Option<Reason>,
    /// The `x-edge-error` kind of a response the router made itself.
    pub error: Option<&'static str>,
    pub request_id: HeaderValue,
    pub client: SocketAddr,
}

impl AccessLog {
    /// The record of a request as it arrives; the rest is filled in as it is routed.
    pub fn new(
        method: Method,
        host: Option<&str>,
        path: &str,
        started: Instant,
        request_id: &HeaderValue,
        client: SocketAddr,
    ) -> AccessLog {
        AccessLog {
            method,
            host: host.unwrap_or_default().to_string(),
            path: path.to_string(),
            status: 0,
            started,
            cluster: None,
            region: None,
            zone: None,
            endpoint: None,
            reason: None,
            error: None,
            request_id: request_id.clone(),
            client,
        }
    }

    pub(crate) fn served_by(
        &mut self,
        zone: &crate::routing::table::ZoneTable,
        endpoint: &Arc<str>,
        reason: Reason,
    ) {
        self.region = Some(zone.region.clone());
        self.zone = Some(zone.zone.clone());
        self.endpoint = Some(endpoint.clone());
        self.reason = Some(reason);
    }

    /// Writes the event. `bytes` is the response body sent; `complete` is false when the
    /// client went away (or the upstream broke off) before the body ended.
    pub fn emit(&self, bytes: u64, complete: bool) {
        info!(
            target: "access",
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status,
            duration_ms = self.started.elapsed().as_secs_f64() * 1e3,
            bytes,
            complete,
            cluster = self.cluster.as_deref(),
            region = self.region.as_deref(),
            zone = self.zone.as_deref(),
            endpoint = self.endpoint.as_deref(),
            reason = self.reason.map(Reason::as_str),
            error = self.error,
            request_id = self.request_id.to_str().unwrap_or("-"),
            client = %self.client,
        );
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.response_bytes.inc_by(self.bytes);
        if let Some(l) = &self.log {
            l.emit(self.bytes, self.complete);
        }
    }
}

/// A response the router makes itself (see [`error_response`]), written to the access log
/// when that is on.
fn error_exit(
    log: Option<AccessLog>,
    status: StatusCode,
    kind: &'static str,
    msg: &str,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let resp = error_response(status, kind, msg, request_id);
    if let Some(mut l) = log {
        l.status = status.as_u16();
        l.error = Some(kind);
        l.emit(resp.body().size_hint().exact().unwrap_or(0), true);
    }
    resp
}

/// Entry point for every downstream request.
pub async fn handle(
    state: Arc<ProxyState>,
    req: Request<Incoming>,
    client: SocketAddr,
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
    let mut log = table.config.listener.access_log.then(|| {
        AccessLog::new(
            req.method().clone(),
            host.as_deref(),
            req.uri().path(),
            started,
            &request_id,
            client,
        )
    });
    let Some(route) = table.match_route(listener, host.as_deref(), req.uri().path()) else {
        state.metrics.no_route.inc();
        return Ok(error_exit(
            log,
            StatusCode::NOT_FOUND,
            "no_route",
            "no route matches this host and path",
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
    if let Some(l) = log.as_mut() {
        l.cluster = Some(cluster.name.clone());
    }
    let timeout = route.timeout;
    if is_upgrade(&req) {
        let mut resp = forward_upgrade(
            &table,
            cluster,
            req,
            host,
            client,
            https,
            &request_id,
            started,
            timeout,
        )
        .await;
        resp.headers_mut().insert(&X_REQUEST_ID, request_id);
        return Ok(resp);
    }
    let mut resp = forward(
        &table,
        cluster,
        req,
        host,
        client,
        https,
        request_id.clone(),
        started,
        timeout,
        route.hedge,
        log,
    )
    .await;
    resp.headers_mut().insert(&X_REQUEST_ID, request_id);
    Ok(resp)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    table: &Table,
    cluster: &ClusterTable<UpstreamClient>,
    req: Request<Incoming>,
    host: Option<String>,
    client: SocketAddr,
    https: bool,
    request_id: HeaderValue,
    started: Instant,
    timeout: Duration,
    hedge: bool,
    mut log: Option<AccessLog>,
) -> Response<ResponseBody> {
    let cm = &cluster.runtime.metrics;
    let cfg = &cluster.config;
    let shared = &cluster.runtime.shared;
    shared.retry_budget.deposit(
        cfg.retry.budget_ratio,
        crate::state::budget_cap(cfg.retry.min_retries_per_second),
    );

    let affinity_key = affinity_header(cfg, req.headers());
    let mut pick = match first_pick(cluster, client, affinity_key) {
        Ok(p) => p,
        Err(kind) => {
            cm.error(kind);
            return error_exit(
                log,
                StatusCode::SERVICE_UNAVAILABLE,
                kind,
                NO_ENDPOINT,
                &request_id,
            );
        }
    };

    let (mut parts, body) = req.into_parts();
    let method = parts.method.clone();
    prepare_upstream_headers(
        &mut parts.headers,
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
    let idempotent = matches!(
        method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    );
    let may_retry = body_empty && cfg.retry.attempts > 0;
    // Hedged: idempotent, no body, and hedging on for the route (or its cluster).
    let hedge_on =
        hedge && body_empty && matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if hedge_on {
        shared
            .hedge_budget
            .deposit(cfg.hedge.budget_ratio, HEDGE_BUDGET_CAP);
    }
    // Kept only when a retry or a hedge could need them: both resend the same request.
    let saved_headers = (may_retry || hedge_on).then(|| parts.headers.clone());
    let mut body = Some(RequestBody::Stream {
        inner: body,
        bytes: cm.request_bytes.clone(),
    });
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let version = if cfg.http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let deadline = started + timeout;
    let mut attempt = 0u32;
    let mut headers = Some(parts.headers);

    loop {
        let mut ep = pick.endpoint.state.clone();
        let mut zone = &cluster.zones[pick.zone];
        if let Some(l) = log.as_mut() {
            l.served_by(zone, &ep.label, pick.reason);
        }
        let uri = match upstream_uri(scheme, &ep.label, &path_and_query) {
            Ok(u) => u,
            Err(_) => {
                return error_exit(
                    log,
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "request target is not valid",
                    &request_id,
                )
            }
        };
        let mut up = Request::new(body.take().unwrap_or(RequestBody::Empty));
        *up.method_mut() = method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = version;
        *up.headers_mut() = headers
            .take()
            .or_else(|| saved_headers.clone())
            .unwrap_or_default();
        let mut in_flight = InFlight::new(ep.clone());
        let mut sent = Instant::now();
        let result = if hedge_on && attempt == 0 {
            let delay = hedge_delay(cfg, zone, &ep);
            let parts = BackupParts {
                scheme,
                path_and_query: &path_and_query,
                method: &method,
                version,
                headers: &saved_headers,
            };
            let h = Box::pin(hedged(cluster, &pick, up, delay, deadline, parts)).await;
            if h.sent {
                // The hedge was this request's second attempt: no retry after it.
                attempt += 1;
            }
            if let Some((b, b_in_flight, b_sent)) = h.backup {
                pick = b;
                ep = pick.endpoint.state.clone();
                zone = &cluster.zones[pick.zone];
                in_flight = b_in_flight;
                sent = b_sent;
                if let Some(l) = log.as_mut() {
                    l.served_by(zone, &ep.label, pick.reason);
                }
            }
            h.result
        } else {
            tokio::time::timeout_at(deadline.into(), cluster.runtime.client.request(up)).await
        };
        let failure = match result {
            Ok(Ok(resp)) => {
                let elapsed = sent.elapsed();
                ep.observe(elapsed, cluster.decay);
                let status = resp.status();
                ep.record_outcome(status.is_server_error(), &cfg.outlier);
                count_response(
                    &zone.metrics,
                    cm,
                    pick.reason,
                    status.as_u16(),
                    started.elapsed().as_secs_f64(),
                );
                if let Some(l) = log.as_mut() {
                    l.status = status.as_u16();
                }
                let route_header = table
                    .config
                    .listener
                    .route_header
                    .then(|| route_header(zone, &ep.label, pick.reason));
                return finish_response(resp, in_flight, cm, log, route_header);
            }
            Err(_) => {
                ep.observe(timeout, cluster.decay);
                ep.record_outcome(true, &cfg.outlier);
                count_failure(zone, cm, 504, "upstream_timeout", started);
                return error_exit(
                    log,
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream did not answer in time",
                    &request_id,
                );
            }
            Ok(Err(e)) => e,
        };
        drop(in_flight);
        let connect = failure.is_connect();
        let detail = upstream::describe_failure(&failure);
        if connect {
            ep.metrics.connect_errors.inc();
        }
        ep.record_outcome(true, &cfg.outlier);
        // A failed connect sent nothing, so any method may go again; a reset after sending
        // is retried only for idempotent methods.
        let retryable = may_retry && attempt < cfg.retry.attempts && (connect || idempotent);
        let kind = failure_kind(&failure);
        warn!(
            target: "proxy",
            cluster = %cluster.name, endpoint = %ep.label, zone = %zone.zone, error = %detail,
            "upstream request failed{}", if retryable { "; retrying" } else { "" }
        );
        if let Some(next) = retry_pick(cluster, &ep, retryable) {
            pick = next;
            attempt += 1;
            continue;
        }
        count_failure(zone, cm, 502, kind, started);
        return error_exit(
            log,
            StatusCode::BAD_GATEWAY,
            kind,
            "the upstream request failed",
            &request_id,
        );
    }
}

/// After a failed attempt that may go again: the endpoint for the retry (another zone
/// first), if the cluster's retry budget allows one.
pub fn retry_pick<'t>(
    cluster: &'t ClusterTable<UpstreamClient>,
    failed: &crate::state::EndpointState,
    retryable: bool,
) -> Option<balancer::Pick<'t>> {
    if !retryable {
        return None;
    }
    let cm = &cluster.runtime.metrics;
    if !cluster.runtime.shared.retry_budget.withdraw() {
        cm.retry_budget_exhausted.inc();
        return None;
    }
    let max = cluster.config.max_requests_per_endpoint;
    let next = balancer::pick_other(cluster, failed, max, Reason::Retry)?;
    cm.retries.inc();
    Some(next)
}

/// A request the router answers with an error after trying upstream: counted on the zone
/// of the last attempt and on the cluster's errors.
pub fn count_failure(
    zone: &crate::routing::table::ZoneTable,
    cm: &ClusterMetrics,
    code: u16,
    kind: &'static str,
    started: Instant,
) {
    zone.metrics.count(code);
    zone.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    cm.error(kind);
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

/// The message of a 503 when no endpoint could take the request.
pub const NO_ENDPOINT: &str = "no endpoint could take the request";

/// A request's first pick under the cluster's affinity rule (`affinity_key`: the value of
/// the affinity header, when the cluster has one and the request carries it). `Err` is the
/// `x-edge-error` kind of the 503 when nothing can take it.
pub fn first_pick<'t>(
    cluster: &'t ClusterTable<UpstreamClient>,
    client: SocketAddr,
    affinity_key: Option<&[u8]>,
) -> Result<balancer::Pick<'t>, &'static str> {
    let max_in_flight = cluster.config.max_requests_per_endpoint;
    let first = match (&cluster.config.affinity, affinity_key) {
        (crate::config::Affinity::SourceIp, _) => match client.ip().to_canonical() {
            std::net::IpAddr::V4(a) => balancer::pick_affinity(cluster, &a.octets(), max_in_flight),
            std::net::IpAddr::V6(a) => balancer::pick_affinity(cluster, &a.octets(), max_in_flight),
        },
        (crate::config::Affinity::Header(_), Some(key)) => {
            balancer::pick_affinity(cluster, key, max_in_flight)
        }
        _ => balancer::pick(cluster, max_in_flight),
    };
    first.ok_or_else(|| {
        let served = cluster.slices.last().map_or(0.0, |s| s.upto);
        if served < 1.0
            && cluster
                .zones
                .iter()
                .any(|z| z.dial < 100 && !z.candidates.is_empty())
        {
            // Refused by a strict dial (dial_fallback = false) with nowhere else to go.
            "dial_limit"
        } else if cluster.slices.is_empty() {
            "no_endpoint"
        } else {
            "endpoints_saturated"
        }
    })
}

/// Tokens a hedge budget may save up: a quiet spell cannot fund a burst larger than this.
const HEDGE_BUDGET_CAP: i64 = 10;

type Attempt = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

/// How long a hedged request waits for response headers before the backup goes: the
/// configured delay, or the zone's recent p95 of time to headers. Before the zone has
/// enough samples, twice the endpoint's peak latency (at least 1 ms; 50 ms when unknown).
fn hedge_delay(
    cfg: &crate::config::ClusterConfig,
    zone: &crate::routing::table::ZoneTable,
    ep: &crate::state::EndpointState,
) -> Duration {
    cfg.hedge.delay.unwrap_or_else(|| {
        zone.stats
            .p95()
            .unwrap_or_else(|| match ep.latency.get_us() {
                Some(us) => Duration::from_micros((us * 2.0) as u64).max(Duration::from_millis(1)),
                None => Duration::from_millis(50),
            })
    })
}

/// What a backup attempt needs to resend the request elsewhere.
struct BackupParts<'a> {
    scheme: &'static str,
    path_and_query: &'a PathAndQuery,
    method: &'a Method,
    version: Version,
    headers: &'a Option<HeaderMap>,
}

impl BackupParts<'_> {
    fn request(&self, addr: SocketAddr) -> Option<Request<RequestBody>> {
        let uri = upstream_uri(self.scheme, &addr.to_string(), self.path_and_query).ok()?;
        let mut up = Request::new(RequestBody::Empty);
        *up.method_mut() = self.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = self.version;
        *up.headers_mut() = self.headers.clone().unwrap_or_default();
        Some(up)
    }
}

struct HedgeOutcome<'t> {
    result: Attempt,
    /// The backup answered first: the response is from this pick (with its in-flight mark
    /// and send time).
    backup: Option<(balancer::Pick<'t>, InFlight, Instant)>,
    /// A backup attempt was sent.
    sent: bool,
}

/// Sends `up` to the primary pick; if its response headers are not there after `delay`,
/// and the hedge budget allows, sends one backup attempt to the next-nearest zone. The
/// first answer wins; the other attempt is dropped, which cancels it (hyper closes its
/// connection). An attempt that fails leaves the field to the other.
async fn hedged<'t>(
    cluster: &'t ClusterTable<UpstreamClient>,
    primary: &balancer::Pick<'t>,
    up: Request<RequestBody>,
    delay: Duration,
    deadline: Instant,
    parts: BackupParts<'_>,
) -> HedgeOutcome<'t> {
    let client = &cluster.runtime.client;
    let cfg = &cluster.config;
    let cm = &cluster.runtime.metrics;
    let ep = &primary.endpoint.state;
    let stats = &cluster.zones[primary.zone].stats;
    let started = Instant::now();
    let first = tokio::time::timeout_at(deadline.into(), client.request(up));
    tokio::pin!(first);
    let early = tokio::select! {
        biased;
        r = &mut first => Some(r),
        _ = tokio::time::sleep(delay) => None,
    };
    let only_first = |result| HedgeOutcome {
        result,
        backup: None,
        sent: false,
    };
    if let Some(r) = early {
        stats.record(started.elapsed());
        return only_first(r);
    }
    // Headers are late. One backup in the next-nearest zone, within the budget.
    let backup = balancer::pick_other(cluster, ep, cfg.max_requests_per_endpoint, Reason::Hedge)
        .and_then(|b| parts.request(b.endpoint.state.addr).map(|req| (b, req)));
    let Some((b, breq)) = backup else {
        let r = first.await;
        stats.record(started.elapsed());
        return only_first(r);
    };
    if !cluster.runtime.shared.hedge_budget.withdraw() {
        cm.hedges_refused.inc();
        let r = first.await;
        stats.record(started.elapsed());
        return only_first(r);
    }
    cm.hedges_sent.inc();
    let bep = b.endpoint.state.clone();
    let b_in_flight = InFlight::new(bep.clone());
    let b_sent = Instant::now();
    let second = tokio::time::timeout_at(deadline.into(), client.request(breq));
    tokio::pin!(second);
    let backup_failed = |r: &Attempt| {
        if let Ok(Err(e)) = r {
            if e.is_connect() {
                bep.metrics.connect_errors.inc();
            }
            bep.record_outcome(true, &cfg.outlier);
        }
    };
    tokio::select! {
        r = &mut first => {
            stats.record(started.elapsed());
            if !matches!(r, Ok(Ok(_))) {
                // The first attempt failed: the backup may still answer.
                let rb = second.await;
                if matches!(rb, Ok(Ok(_))) {
                    cm.hedges_won.inc();
                    return HedgeOutcome { result: rb, backup: Some((b, b_in_flight, b_sent)), sent: true };
                }
                backup_failed(&rb);
            }
            HedgeOutcome { result: r, backup: None, sent: true }
        }
        rb = &mut second => {
            if matches!(rb, Ok(Ok(_))) {
                // The backup won; dropping `first` cancels it. What it waited is a lower
                // bound of its latency: the in-zone pick learns from it.
                let waited = started.elapsed();
                ep.observe(waited, cluster.decay);
                stats.record(waited);
                cm.hedges_won.inc();
                return HedgeOutcome { result: rb, backup: Some((b, b_in_flight, b_sent)), sent: true };
            }
            backup_failed(&rb);
            drop(b_in_flight);
            let r = first.await;
            stats.record(started.elapsed());
            HedgeOutcome { result: r, backup: None, sent: true }
        }
    }
}

fn finish_response(
    resp: Response<Incoming>,
    in_flight: InFlight,
    cm: &ClusterMetrics,
    log: Option<AccessLog>,
    route_header: Option<HeaderValue>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    remove_hop_by_hop(&mut parts.headers);
    if let Some(v) = route_header {
        parts.headers.insert(&X_EDGE_ROUTE, v);
    }
    let done = Box::new(Completion::new(in_flight, cm, log));
    let body = if body.is_end_stream() {
        // Nothing will ever be polled: finish now rather than when hyper drops the body.
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

/// `scheme://addr/path?query` for the upstream request; `addr` is the endpoint's label (its
/// socket address as text). Plain concatenation: `format!` costs more on every request.
fn upstream_uri(
    scheme: &'static str,
    addr: &str,
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
        p.authority = Some(Authority::try_from(addr)?);
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

/// The host the client asked for, without port, lower case: Host header (HTTP/1.1) or the
/// URI authority (HTTP/2).
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let raw = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw),
    };
    Some(host.to_ascii_lowercase())
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

/// Removes hop-by-hop headers (RFC 9110 7.6.1), including those named in Connection.
/// `te: trailers` is end-to-end in practice (gRPC needs it), so it stays.
pub fn remove_hop_by_hop(h: &mut HeaderMap) {
    // Every Connection line counts: options on a second line are hop-by-hop too.
    let named: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
    for conn in named {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if !name.is_empty() && !name.eq_ignore_ascii_case("te") {
                    h.remove(name);
                }
            }
        }
    }
    for name in HOP_BY_HOP.iter() {
        h.remove(name);
    }
    h.remove(header::UPGRADE);
    if h.get(header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        h.remove(header::TE);
    }
}

fn prepare_upstream_headers(
    h: &mut HeaderMap,
    client: SocketAddr,
    https: bool,
    host: Option<&str>,
    uri: &Uri,
    request_id: &HeaderValue,
) {
    remove_hop_by_hop(h);
    let ip = client.ip().to_canonical();
    let xff = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.is_empty() => HeaderValue::from_str(&format!("{prev}, {ip}")).ok(),
        _ => {
            // No prior hop: format the address on the stack, no String.
            use std::io::Write;
            let mut buf = [0u8; 64];
            let mut w = &mut buf[..];
            let n = match write!(w, "{ip}") {
                Ok(()) => 64 - w.len(),
                Err(_) => 0,
            };
            HeaderValue::from_bytes(&buf[..n]).ok()
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

/// 32 random hex digits: a new request id.
pub(crate) fn fill_request_id(buf: &mut [u8; 32]) {
    let (a, b) = (balancer::random_u64(), balancer::random_u64());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, byte) in a
        .to_be_bytes()
        .iter()
        .chain(b.to_be_bytes().iter())
        .enumerate()
    {
        buf[i * 2] = HEX[(byte >> 4) as usize];
        buf[i * 2 + 1] = HEX[(byte & 0xf) as usize];
    }
}

fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; 32];
    fill_request_id(&mut buf);
    // One allocation that holds the bytes; the clones for the upstream request and the
    // response are refcount increments.
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A response made by the router itself: short text, `x-edge-error` saying why.
pub fn error_response(
    status: StatusCode,
    kind: &'static str,
    msg: &str,
    request_id: &HeaderValue,
) -> Response<ResponseBody> {
    let mut r = Response::new(ResponseBody::text(&format!(
        "{} {kind}: {msg}\n",
        status.as_u16()
    )));
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

/// A served request's metric updates: three atomic adds on handles the table resolved.
pub fn count_response(
    zone: &ZoneMetrics,
    cm: &ClusterMetrics,
    reason: Reason,
    code: u16,
    secs: f64,
) {
    cm.decisions[reason as usize].inc();
    zone.count(code);
    zone.duration.observe(secs);
}

pub fn in_flight_total(t: &Table) -> u64 {
    t.clusters
        .iter()
        .flat_map(|c| c.zones.iter())
        .flat_map(|z| z.endpoints.iter())
        .map(|e| e.state.in_flight.load(Ordering::Relaxed) as u64)
        .sum()
}

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like): an `Upgrade`
/// header and `upgrade` among the Connection options. One header lookup on the normal path.
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Forwards an Upgrade request: picked like any request (nearest healthy zone, p2c, or
/// affinity), sent over HTTP/1.1 with `Connection: upgrade` and the client's `Upgrade`
/// header. On `101 Switching Protocols` both connections are handed over to a task that
/// copies bytes both ways until either side closes. Counted as one request (code 101);
/// the endpoint's in-flight mark ends with the 101, so long-lived tunnels do not fill
/// `max_requests_per_endpoint`. An upstream that declines answers like any response.
#[allow(clippy::too_many_arguments)]
async fn forward_upgrade(
    table: &Table,
    cluster: &ClusterTable<UpstreamClient>,
    mut req: Request<Incoming>,
    host: Option<String>,
    client: SocketAddr,
    https: bool,
    request_id: &HeaderValue,
    started: Instant,
    timeout: Duration,
) -> Response<ResponseBody> {
    let cm = &cluster.runtime.metrics;
    let cfg = &cluster.config;
    if cfg.http2 {
        // The cluster's client speaks only HTTP/2, which has no Upgrade.
        cm.error("upgrade_unsupported");
        return error_response(
            StatusCode::BAD_GATEWAY,
            "upgrade_unsupported",
            "this cluster talks HTTP/2 to its upstreams; HTTP/1.1 Upgrade cannot pass",
            request_id,
        );
    }
    let max_in_flight = cfg.max_requests_per_endpoint;
    let shared = &cluster.runtime.shared;
    shared.retry_budget.deposit(
        cfg.retry.budget_ratio,
        crate::state::budget_cap(cfg.retry.min_retries_per_second),
    );
    // The same pick as plain requests: a client's WebSocket lands where its requests do.
    let affinity_key = affinity_header(cfg, req.headers());
    let mut pick = match first_pick(cluster, client, affinity_key) {
        Ok(p) => p,
        Err(kind) => {
            cm.error(kind);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                kind,
                NO_ENDPOINT,
                request_id,
            );
        }
    };

    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    prepare_upstream_headers(
        &mut parts.headers,
        client,
        https,
        host.as_deref(),
        &parts.uri,
        request_id,
    );
    if let Some(u) = upgrade {
        parts.headers.insert(header::UPGRADE, u);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let may_retry = body.is_end_stream() && cfg.retry.attempts > 0;
    let mut body = Some(RequestBody::Stream {
        inner: body,
        bytes: cm.request_bytes.clone(),
    });
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    let deadline = started + timeout;
    let mut attempt = 0u32;
    loop {
        let ep = pick.endpoint.state.clone();
        let zone = &cluster.zones[pick.zone];
        let Ok(uri) = Uri::try_from(format!("{scheme}://{}{}", ep.addr, path_and_query)) else {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "request target is not valid",
                request_id,
            );
        };
        let mut up = Request::new(body.take().unwrap_or(RequestBody::Empty));
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = parts.headers.clone();
        let in_flight = InFlight::new(ep.clone());
        let sent = Instant::now();
        let result =
            tokio::time::timeout_at(deadline.into(), cluster.runtime.client.request(up)).await;
        let failure = match result {
            Ok(Ok(mut resp)) => {
                ep.observe(sent.elapsed(), cluster.decay);
                let status = resp.status();
                ep.record_outcome(status.is_server_error(), &cfg.outlier);
                count_response(
                    &zone.metrics,
                    cm,
                    pick.reason,
                    status.as_u16(),
                    started.elapsed().as_secs_f64(),
                );
                let route_header = table
                    .config
                    .listener
                    .route_header
                    .then(|| route_header(zone, &ep.label, pick.reason));
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    // Declined: an ordinary response.
                    return finish_response(resp, in_flight, cm, None, route_header);
                }
                drop(in_flight);
                let upstream = hyper::upgrade::on(&mut resp);
                let (mut rparts, _) = resp.into_parts();
                for name in HOP_BY_HOP.iter() {
                    if name != header::CONNECTION {
                        rparts.headers.remove(name);
                    }
                }
                if let Some(v) = route_header {
                    rparts.headers.insert(&X_EDGE_ROUTE, v);
                }
                let tunnel = Tunnel {
                    method: parts.method.clone(),
                    host: host.unwrap_or_default(),
                    path: parts.uri.path().to_string(),
                    cluster: cluster.name.clone(),
                    zone: zone.zone.clone(),
                    endpoint: ep.label.clone(),
                    request_id: request_id.clone(),
                    client,
                    log: table.config.listener.access_log,
                    bytes: (cm.request_bytes.clone(), cm.response_bytes.clone()),
                };
                tokio::spawn(tunnel.run(downstream, upstream));
                return Response::from_parts(rparts, ResponseBody::Full(None));
            }
            Err(_) => {
                ep.observe(timeout, cluster.decay);
                ep.record_outcome(true, &cfg.outlier);
                zone.metrics.count(504);
                cm.error("upstream_timeout");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    "the upstream did not answer in time",
                    request_id,
                );
            }
            Ok(Err(e)) => e,
        };
        drop(in_flight);
        let connect = failure.is_connect();
        if connect {
            ep.metrics.connect_errors.inc();
        }
        ep.record_outcome(true, &cfg.outlier);
        let retryable = may_retry && connect && attempt < cfg.retry.attempts;
        let kind = failure_kind(&failure);
        warn!(
            target: "proxy",
            cluster = %cluster.name, endpoint = %ep.label, zone = %zone.zone,
            error = %upstream::describe_failure(&failure),
            "upstream upgrade request failed{}", if retryable { "; retrying" } else { "" }
        );
        if retryable && shared.retry_budget.withdraw() {
            if let Some(next) = balancer::pick_other(cluster, &ep, max_in_flight, Reason::Retry) {
                cm.retries.inc();
                pick = next;
                attempt += 1;
                continue;
            }
        }
        zone.metrics.count(502);
        cm.error(kind);
        return error_response(
            StatusCode::BAD_GATEWAY,
            kind,
            "the upstream request failed",
            request_id,
        );
    }
}

/// The `x-edge-error` kind of a failed upstream request.
fn failure_kind(e: &hyper_util::client::legacy::Error) -> &'static str {
    if upstream::tls_problem(e).is_some() {
        "upstream_tls_error"
    } else if e.is_connect() {
        "upstream_connect_error"
    } else {
        "upstream_reset"
    }
}

/// An upgraded connection pair being copied both ways.
struct Tunnel {
    method: Method,
    host: String,
    path: String,
    cluster: Arc<str>,
    zone: Arc<str>,
    endpoint: Arc<str>,
    request_id: HeaderValue,
    client: SocketAddr,
    log: bool,
    bytes: (prometheus::IntCounter, prometheus::IntCounter),
}

impl Tunnel {
    async fn run(self, downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
        let started = Instant::now();
        let (down, up) = match tokio::join!(downstream, upstream) {
            (Ok(d), Ok(u)) => (d, u),
            (d, u) => {
                warn!(
                    target: "proxy", cluster = %self.cluster, endpoint = %self.endpoint,
                    client_side = ?d.err(), upstream_side = ?u.err(),
                    "upgrade handed over no connection"
                );
                return;
            }
        };
        let mut down = hyper_util::rt::TokioIo::new(down);
        let mut up = hyper_util::rt::TokioIo::new(up);
        let (sent, received, error) = match tokio::io::copy_bidirectional(&mut down, &mut up).await
        {
            Ok((to_up, to_down)) => (to_up, to_down, None),
            Err(e) => (0, 0, Some(e.to_string())),
        };
        self.bytes.0.inc_by(sent);
        self.bytes.1.inc_by(received);
        if self.log {
            info!(
                target: "access",
                method = %self.method,
                host = %self.host,
                path = %self.path,
                status = 101,
                duration_ms = started.elapsed().as_secs_f64() * 1e3,
                bytes = received,
                bytes_up = sent,
                upgrade = true,
                error = error.as_deref().unwrap_or("-"),
                cluster = %self.cluster,
                zone = %self.zone,
                endpoint = %self.endpoint,
                request_id = self.request_id.to_str().unwrap_or("-"),
                client = %self.client,
            );
        }
    }
}
