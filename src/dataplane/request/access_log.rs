//! The end of a request: its access-log line and the accounting of the response body.

use super::*;
use crate::telemetry::access;
use std::sync::atomic::AtomicBool;

/// Finishes a request when its response body ends or is dropped: releases the in-flight mark,
/// counts bytes, writes the access log.
pub struct Completion {
    pub(super) in_flight: InFlight,
    pub(super) bytes: u64,
    pub(super) complete: bool,
    pub(super) response_bytes: prometheus::IntCounter,
    /// For a response the upstream broke off mid-body: counted, and fed to outlier detection.
    pub(super) upstream_reset: prometheus::IntCounter,
    pub(super) outlier: OutlierConfig,
    pub(super) log: Option<AccessLog>,
    /// Set by the request body when the client's upload broke (engines that stream it).
    pub(super) client_broke: Option<Arc<AtomicBool>>,
    /// The response's status was not a 5xx: a whole body ends the endpoint's failure streak.
    pub(super) good_status: bool,
}

impl Completion {
    /// The flag the request body sets when the client's upload breaks.
    pub fn watch_client(mut self, flag: Option<Arc<AtomicBool>>) -> Completion {
        self.client_broke = flag;
        self
    }

    /// Body bytes sent to the client.
    pub fn sent(&mut self, n: u64) {
        self.bytes += n;
    }

    /// The body ended: logged as complete when this is dropped.
    pub fn complete(&mut self) {
        self.complete = true;
    }

    /// The upstream broke off after the response head: an `upstream_reset` against the
    /// endpoint (its outlier streak too), even though the status already went out.
    pub fn upstream_broke(&mut self) {
        if self
            .client_broke
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
        {
            // The client's upload broke first: the upstream only followed.
            if let Some(l) = self.log.as_mut() {
                l.error = Some(ErrorKind::ClientAbort.as_str());
            }
            return;
        }
        self.upstream_reset.inc();
        self.in_flight
            .endpoint()
            .record_outcome(true, &self.outlier);
        if let Some(l) = self.log.as_mut() {
            l.error = Some(ErrorKind::UpstreamReset.as_str());
        }
    }
}

/// One request's access-log record: gathered while the request is routed, written (see
/// [`access`]) when the response body ends, or at once for a response the
/// router makes itself. Built only when `listener.access_log` is on.
pub struct AccessLog {
    pub method: Method,
    /// The host, then the path: one allocation for both (see [`AccessLog::host`]).
    target: String,
    host_len: usize,
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
        let host = host.unwrap_or_default();
        let mut target = String::with_capacity(host.len() + path.len());
        target.push_str(host);
        target.push_str(path);
        AccessLog {
            method,
            target,
            host_len: host.len(),
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

    /// The host the request was routed on (empty when it had none).
    pub fn host(&self) -> &str {
        &self.target[..self.host_len]
    }

    pub fn path(&self) -> &str {
        &self.target[self.host_len..]
    }

    pub(crate) fn served_by(&mut self, zone: &ZoneTable, endpoint: &Arc<str>, reason: Reason) {
        self.region = Some(zone.region.clone());
        self.zone = Some(zone.zone.clone());
        self.endpoint = Some(endpoint.clone());
        self.reason = Some(reason);
    }

    /// Writes the line to the process's access log. `bytes` is the response body sent;
    /// `complete` is false when the client went away (or the upstream broke off) before
    /// the body ended.
    pub fn emit(&self, bytes: u64, complete: bool) {
        if let Some(w) = access::global() {
            self.write_to(w, bytes, complete);
        }
    }

    /// [`AccessLog::emit`] to a given access log.
    pub fn write_to(&self, log: &Arc<access::AccessWriter>, bytes: u64, complete: bool) {
        log.line(|l| {
            l.bare("method", self.method.as_str());
            l.bare("host", self.host());
            l.bare("path", self.path());
            l.u64("status", u64::from(self.status));
            l.millis("duration_ms", self.started.elapsed());
            l.u64("bytes", bytes);
            l.bool("complete", complete);
            l.quoted_opt("cluster", self.cluster.as_deref());
            l.quoted_opt("region", self.region.as_deref());
            l.quoted_opt("zone", self.zone.as_deref());
            l.quoted_opt("endpoint", self.endpoint.as_deref());
            l.quoted_opt("reason", self.reason.map(Reason::as_str));
            l.quoted_opt("error", self.error);
            l.quoted("request_id", self.request_id.to_str().unwrap_or("-"));
            l.addr("client", self.client);
        });
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.complete && self.good_status {
            // Only a whole response ends the endpoint's failure streak: one that breaks
            // off mid-body must not reset it at its head.
            self.in_flight
                .endpoint()
                .record_outcome(false, &self.outlier);
        }
        self.response_bytes.inc_by(self.bytes);
        if let Some(l) = &self.log {
            l.emit(self.bytes, self.complete);
        }
    }
}
