//! Hedged requests: a backup attempt in the next-nearest zone when the first one's
//! response headers are late, within the cluster's hedge budget.

use super::*;

/// Tokens a hedge budget may save up: a quiet spell cannot fund a burst larger than this.
pub(super) const HEDGE_BUDGET_CAP: i64 = 10;

pub(super) type Attempt = Result<
    Result<Response<Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
>;

/// How long a hedged request waits for response headers before the backup goes: the
/// configured delay, or the zone's recent p95 of time to headers. Before the zone has
/// enough samples, twice the endpoint's peak latency (at least 1 ms; 50 ms when unknown).
pub(super) fn hedge_delay(
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
pub(super) struct BackupParts<'a> {
    pub(super) scheme: &'static str,
    pub(super) path_and_query: &'a PathAndQuery,
    pub(super) method: &'a Method,
    pub(super) version: Version,
    pub(super) headers: &'a Option<HeaderMap>,
}

impl BackupParts<'_> {
    fn request(&self, addr: SocketAddr) -> Option<Request<RequestBody>> {
        let uri =
            upstream_uri_to(self.scheme, &addr.to_string(), None, self.path_and_query).ok()?;
        let mut up = Request::new(RequestBody::Empty);
        *up.method_mut() = self.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = self.version;
        *up.headers_mut() = self.headers.clone().unwrap_or_default();
        Some(up)
    }
}

pub(super) struct HedgeOutcome<'t> {
    pub(super) result: Attempt,
    /// The backup answered first: the response is from this pick (with its in-flight mark
    /// and send time).
    pub(super) backup: Option<(balancer::Pick<'t>, InFlight, Instant)>,
    /// A backup attempt was sent.
    pub(super) sent: bool,
}

/// Sends `up` to the primary pick; if its response headers are not there after `delay`,
/// and the hedge budget allows, sends one backup attempt to the next-nearest zone. The
/// first answer wins; the other attempt is dropped, which cancels it (hyper closes its
/// connection). An attempt that fails leaves the field to the other.
pub(super) async fn hedged<'t>(
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
