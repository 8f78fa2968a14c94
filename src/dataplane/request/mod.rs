//! The request logic both HTTP engines share. An engine parses and writes its protocol; what
//! a request means is decided here, once: the authority it is routed on, the first pick,
//! the accounting of every attempt (latency sample, outlier outcome, metrics, access log),
//! the retry decision and pick, and the error the router answers with.
//!
//! An engine drives one [`Exchange`] per routed request:
//!
//! ```text
//! let mut x = Exchange::begin(..)?;          // budget deposit + first pick
//! loop {
//!     let (ep, zone) = x.target();           // where this attempt goes
//!     match engine_attempt(ep).await {       // protocol specific
//!         Ok(head) => { x.responded(status, sent); return relay(head) }
//!         Err(f) => match x.failed(f, ..) {  // outcome, retry pick, or the error reply
//!             Next::Retry => continue,
//!             Next::Reply(r) => return render(r),
//!             Next::Abort => return close(),
//!         },
//!     }
//! }
//! ```

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, StatusCode};
use tracing::warn;

use crate::config::{Affinity, ClusterConfig, OutlierConfig};
use crate::control::{Table, UpstreamClient};
use crate::routing::balancer::{self, Pick};
use crate::routing::{ClusterTable, Reason, ZoneTable};
use crate::state::{EndpointState, InFlight};
use crate::telemetry::metrics::{ClusterMetrics, ZoneMetrics};

mod access_log;
mod authority;

pub use access_log::{AccessLog, Completion};
pub use authority::{is_forwarding_lookalike, route_host, same_authority};

/// Why the router answered a request itself: the `x-edge-error` value, one per cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    NoRoute,
    NoEndpoint,
    EndpointsSaturated,
    DialLimit,
    UpstreamConnectError,
    UpstreamTlsError,
    UpstreamReset,
    UpstreamTimeout,
    UpgradeUnsupported,
    BadRequest,
    /// Missing, duplicate or invalid Host, or a Host that disagrees with the target.
    BadHost,
    MethodNotAllowed,
    /// The client went away: nobody to answer, never counted against an endpoint.
    ClientAbort,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::NoEndpoint => "no_endpoint",
            ErrorKind::EndpointsSaturated => "endpoints_saturated",
            ErrorKind::DialLimit => "dial_limit",
            ErrorKind::UpstreamConnectError => "upstream_connect_error",
            ErrorKind::UpstreamTlsError => "upstream_tls_error",
            ErrorKind::UpstreamReset => "upstream_reset",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpgradeUnsupported => "upgrade_unsupported",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::BadHost => "bad_host",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::ClientAbort => "client_abort",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::NoEndpoint | ErrorKind::EndpointsSaturated | ErrorKind::DialLimit => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorKind::UpstreamConnectError
            | ErrorKind::UpstreamTlsError
            | ErrorKind::UpstreamReset
            | ErrorKind::UpgradeUnsupported => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::BadRequest | ErrorKind::BadHost => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            // nginx's 499: what the access log says of a request whose client left.
            ErrorKind::ClientAbort => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        }
    }

    fn message(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no route matches this host and path",
            ErrorKind::NoEndpoint | ErrorKind::EndpointsSaturated | ErrorKind::DialLimit => {
                "no endpoint could take the request"
            }
            ErrorKind::UpstreamConnectError
            | ErrorKind::UpstreamTlsError
            | ErrorKind::UpstreamReset => "the upstream request failed",
            ErrorKind::UpstreamTimeout => "the upstream did not answer in time",
            ErrorKind::UpgradeUnsupported => {
                "this cluster talks HTTP/2 to its upstreams; HTTP/1.1 Upgrade cannot pass"
            }
            ErrorKind::BadRequest => "the request is malformed",
            ErrorKind::BadHost => "missing, duplicate or invalid Host",
            ErrorKind::MethodNotAllowed => "this method is not proxied",
            ErrorKind::ClientAbort => "the client went away",
        }
    }
}

/// A response the router makes itself, engine-neutral: each engine renders [`body`] with
/// its status, `x-edge-error: kind`, `content-type: text/plain` and the request id.
///
/// [`body`]: ErrorReply::body
pub struct ErrorReply {
    pub kind: ErrorKind,
    /// Boxed: error replies are rare, and a result carrying one stays small.
    log: Option<Box<AccessLog>>,
}

impl ErrorReply {
    pub fn new(kind: ErrorKind, log: Option<AccessLog>) -> ErrorReply {
        ErrorReply {
            kind,
            log: log.map(Box::new),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The response body; writes the access-log line (the reply is the request's end).
    pub fn body(self) -> String {
        let status = self.kind.status();
        let body = format!(
            "{} {}: {}\n",
            status.as_u16(),
            self.kind.as_str(),
            self.kind.message()
        );
        if let Some(mut l) = self.log {
            l.status = status.as_u16();
            l.error = Some(self.kind.as_str());
            l.emit(body.len() as u64, true);
        }
        body
    }
}

/// Methods whose request may be sent again after the upstream broke off mid-way.
pub fn idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"PUT" | b"DELETE" | b"TRACE"
    )
}

/// Why one attempt ended before a usable response head.
#[derive(Debug)]
pub enum AttemptError {
    /// Nothing was sent: the connect (or TLS handshake) failed.
    Connect { detail: String, tls: bool },
    /// The connection broke, or the upstream answered garbage, after the request went out.
    Reset(String),
    /// The upstream closed the connection without a byte of answer, as a pooled connection
    /// does when its idle timeout fires just as a request goes out on it. An engine that
    /// cannot tell a reused connection from a fresh one sends an idempotent request once
    /// more before this counts; then it counts as [`AttemptError::Reset`].
    Closed(String),
    /// The route's timeout passed before the response head.
    Timeout,
    /// The client broke off (while its body was being read or sent): nobody to answer.
    ClientGone,
    /// The client's body was malformed (bad chunk framing): a 400, nobody else's fault.
    ClientBad,
}

/// What an engine does after a failed attempt.
pub enum Next {
    /// Send again to [`Exchange::target`], which now names another endpoint.
    Retry,
    /// Answer with this error.
    Reply(ErrorReply),
    /// The client left: close without an answer.
    Abort,
}

/// One routed request: its pick and the accounting of each attempt.
pub struct Exchange<'t> {
    pub cluster: &'t ClusterTable<UpstreamClient>,
    pub pick: Pick<'t>,
    pub started: Instant,
    pub deadline: Instant,
    timeout: Duration,
    pub attempt: u32,
    /// The request can be sent again after a reset (its body is replayable or empty).
    replayable: bool,
    idempotent: bool,
    pub log: Option<AccessLog>,
    /// The status of the response head, once one came.
    status: u16,
    /// The route's edits of the request, made where each engine writes the upstream head.
    pub request_headers: &'t crate::config::HeaderActions,
    /// The route's edits of the upstream's response (not of the router's own replies).
    pub response_headers: &'t crate::config::HeaderActions,
    /// For a cluster that sends PROXY headers: the client's address and the one it
    /// connected to, which a new upstream connection announces.
    pub announce: Option<(SocketAddr, SocketAddr)>,
}

/// What [`Exchange::begin`] needs to know of a request.
pub struct Begin<'a> {
    pub client: SocketAddr,
    /// The cluster's affinity header value, when the cluster has one and the request carries it.
    pub affinity_key: Option<&'a [u8]>,
    pub method: &'a [u8],
    /// The request has no body still to stream (nothing would be lost by sending it again).
    pub replayable: bool,
    pub started: Instant,
    pub timeout: Duration,
}

impl<'t> Exchange<'t> {
    /// Funds the retry budget and makes the first pick; `Err` is the 503 when nothing can
    /// take the request.
    pub fn begin(
        cluster: &'t ClusterTable<UpstreamClient>,
        b: Begin<'_>,
        mut log: Option<AccessLog>,
    ) -> Result<Exchange<'t>, ErrorReply> {
        let cfg = &cluster.config;
        if let Some(l) = log.as_mut() {
            l.cluster = Some(cluster.name.clone());
        }
        cluster.runtime.shared.retry_budget.deposit(
            cfg.retry.budget_ratio,
            crate::state::budget_cap(cfg.retry.min_retries_per_second),
        );
        match first_pick(cluster, b.client, b.affinity_key) {
            Ok(pick) => Ok(Exchange {
                cluster,
                pick,
                started: b.started,
                deadline: b.started + b.timeout,
                timeout: b.timeout,
                attempt: 0,
                replayable: b.replayable,
                idempotent: idempotent(b.method),
                log,
                status: 0,
                request_headers: &crate::routing::rewrite::NO_EDITS,
                response_headers: &crate::routing::rewrite::NO_EDITS,
                announce: None,
            }),
            Err(kind) => {
                cluster.runtime.metrics.error(kind.as_str());
                Err(ErrorReply::new(kind, log))
            }
        }
    }

    pub fn idempotent(&self) -> bool {
        self.idempotent
    }

    pub fn config(&self) -> &'t ClusterConfig {
        &self.cluster.config
    }

    pub fn metrics(&self) -> &'t ClusterMetrics {
        &self.cluster.runtime.metrics
    }

    /// The endpoint and zone of the current attempt (noted in the access log).
    pub fn target(&mut self) -> (&'t Arc<EndpointState>, &'t ZoneTable) {
        let ep = &self.pick.endpoint.state;
        let zone = &self.cluster.zones[self.pick.zone];
        if let Some(l) = self.log.as_mut() {
            l.served_by(zone, &ep.label, self.pick.reason);
        }
        (ep, zone)
    }

    /// Another pick answered instead (a hedge's backup).
    pub fn switch_to(&mut self, pick: Pick<'t>) {
        self.pick = pick;
        self.target();
    }

    /// The attempt got a response head with `status` after `sent`.
    pub fn responded(&mut self, status: u16, sent: Instant) {
        let (ep, zone) = (
            &self.pick.endpoint.state,
            &self.cluster.zones[self.pick.zone],
        );
        self.status = status;
        ep.observe(sent.elapsed(), self.cluster.decay);
        if status >= 500 {
            ep.record_outcome(true, &self.cluster.config.outlier);
        }
        count_response(
            &zone.metrics,
            &self.cluster.runtime.metrics,
            self.pick.reason,
            status,
            self.started.elapsed().as_secs_f64(),
        );
        if let Some(l) = self.log.as_mut() {
            l.status = status;
        }
    }

    /// The request got its response: what finishes it when the body ends.
    pub fn completion(self, in_flight: InFlight) -> Completion {
        let cm = &self.cluster.runtime.metrics;
        Completion {
            in_flight,
            bytes: 0,
            complete: false,
            response_bytes: cm.response_bytes.clone(),
            upstream_reset: cm.error_counter(ErrorKind::UpstreamReset.as_str()),
            outlier: self.cluster.config.outlier.clone(),
            log: self.log,
            client_broke: None,
            good_status: self.status < 500,
        }
    }

    /// `x-edge-route` of the current attempt, when the listener adds it.
    pub fn route_header(&self, on: bool) -> Option<(&'t ZoneTable, &'t str, Reason)> {
        on.then(|| {
            (
                &self.cluster.zones[self.pick.zone],
                &*self.pick.endpoint.state.label,
                self.pick.reason,
            )
        })
    }

    /// Accounts a failed attempt and decides what comes next: a connect failure sent
    /// nothing, so any request may go again; a reset only an idempotent, replayable one.
    /// `may_resend`: the engine can still send this request (its body was not consumed).
    pub fn failed(&mut self, e: AttemptError, may_resend: bool) -> Next {
        let cluster = self.cluster;
        let cfg = &cluster.config;
        let cm = &cluster.runtime.metrics;
        let ep = &self.pick.endpoint.state;
        let zone = &cluster.zones[self.pick.zone];
        let (kind, retryable, detail) = match e {
            AttemptError::ClientGone => {
                // Not the endpoint's fault: no outcome, no latency sample, no 502.
                cm.error(ErrorKind::ClientAbort.as_str());
                if let Some(mut l) = self.log.take() {
                    l.status = 499;
                    l.error = Some(ErrorKind::ClientAbort.as_str());
                    l.emit(0, false);
                }
                return Next::Abort;
            }
            AttemptError::ClientBad => {
                cm.error(ErrorKind::BadRequest.as_str());
                return Next::Reply(ErrorReply::new(ErrorKind::BadRequest, self.log.take()));
            }
            AttemptError::Timeout => {
                ep.observe(self.timeout, cluster.decay);
                ep.record_outcome(true, &cfg.outlier);
                (ErrorKind::UpstreamTimeout, false, Cow::Borrowed("timeout"))
            }
            AttemptError::Connect { detail, tls } => {
                ep.metrics.connect_errors.inc();
                ep.record_outcome(true, &cfg.outlier);
                let kind = if tls {
                    ErrorKind::UpstreamTlsError
                } else {
                    ErrorKind::UpstreamConnectError
                };
                (kind, may_resend, Cow::Owned(detail))
            }
            AttemptError::Reset(detail) | AttemptError::Closed(detail) => {
                ep.record_outcome(true, &cfg.outlier);
                let again = may_resend && self.replayable && self.idempotent;
                (ErrorKind::UpstreamReset, again, Cow::Owned(detail))
            }
        };
        let retryable = retryable && self.attempt < cfg.retry.attempts;
        if kind != ErrorKind::UpstreamTimeout {
            warn!(
                target: "proxy",
                cluster = %cluster.name, endpoint = %ep.label, zone = %zone.zone, error = %detail,
                "upstream request failed{}", if retryable { "; retrying" } else { "" }
            );
        }
        if let Some(next) = retry_pick(cluster, ep, retryable) {
            self.pick = next;
            self.attempt += 1;
            return Next::Retry;
        }
        count_failure(
            zone,
            cm,
            kind.status().as_u16(),
            kind.as_str(),
            self.started,
        );
        Next::Reply(ErrorReply::new(kind, self.log.take()))
    }
}

/// After a failed attempt that may go again: the endpoint for the retry (another zone
/// first), if the cluster's retry budget allows one.
pub fn retry_pick<'t>(
    cluster: &'t ClusterTable<UpstreamClient>,
    failed: &EndpointState,
    retryable: bool,
) -> Option<Pick<'t>> {
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
    zone: &ZoneTable,
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

/// A request's first pick under the cluster's affinity rule (`affinity_key`: the value of
/// the affinity header, when the cluster has one and the request carries it). `Err` is the
/// error of the 503 when nothing can take it.
pub fn first_pick<'t>(
    cluster: &'t ClusterTable<UpstreamClient>,
    client: SocketAddr,
    affinity_key: Option<&[u8]>,
) -> Result<Pick<'t>, ErrorKind> {
    let max_in_flight = cluster.config.max_requests_per_endpoint;
    let first = match (&cluster.config.affinity, affinity_key) {
        (Affinity::SourceIp, _) => match client.ip().to_canonical() {
            std::net::IpAddr::V4(a) => balancer::pick_affinity(cluster, &a.octets(), max_in_flight),
            std::net::IpAddr::V6(a) => balancer::pick_affinity(cluster, &a.octets(), max_in_flight),
        },
        (Affinity::Header(_), Some(key)) => balancer::pick_affinity(cluster, key, max_in_flight),
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
            ErrorKind::DialLimit
        } else if cluster.slices.is_empty() {
            ErrorKind::NoEndpoint
        } else {
            ErrorKind::EndpointsSaturated
        }
    })
}

/// 32 random hex digits: a new request id.
pub fn fill_request_id(buf: &mut [u8; 32]) {
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
