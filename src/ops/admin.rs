//! The admin listener: /healthz, /readyz, /metrics, /routes, /history, /events, /reload, the
//! dashboard at /, and the demo's zone switches. Loopback by default: it can reload config.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::warn;

use crate::control::Table;
use crate::ops::router::Router;
use crate::routing::rank::{required_lead_ms, zone_estimate_of, ZoneKey};
use crate::routing::ZoneTable;
use crate::state::Estimate;
use crate::telemetry::Severity;

const DASHBOARD: &str = include_str!("admin/dashboard.html");

pub async fn serve(listener: TcpListener, router: Arc<Router>) {
    // After a binary upgrade the new process answers on this socket: this one stops
    // accepting (a draining router still answers /readyz with 503 after SIGTERM).
    let mut handed_over = router.handover.handed_over();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = handed_over.wait_for(|h| *h) => return,
        };
        let (stream, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let router = router.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(router.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}

/// 405 with the `Allow` header RFC 9110 asks for.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = respond(
        StatusCode::METHOD_NOT_ALLOWED,
        "text/plain",
        format!("method not allowed: use {allow}\n"),
    );
    r.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    r
}

/// `since=UNIX_MS` of /history: only samples taken after it.
fn since(query: Option<&str>) -> Result<u64, String> {
    let mut since = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v
                    .parse()
                    .map_err(|_| format!("since={v:?}: expected unix milliseconds\n"))?;
            }
            _ => return Err(format!("unknown parameter {pair:?}: only since=UNIX_MS\n")),
        }
    }
    Ok(since)
}

fn json_response(status: StatusCode, v: &impl Serialize) -> Response<Full<Bytes>> {
    let body =
        serde_json::to_vec(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}").into_bytes());
    respond(status, "application/json", body)
}

async fn handle(
    router: Arc<Router>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let r = match (&method, path.as_str()) {
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => match router.readiness() {
            Ok(()) => json_response(StatusCode::OK, &json!({"ready": true})),
            Err(reason) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"ready": false, "reason": reason}),
            ),
        },
        (&Method::GET, "/metrics") => {
            router
                .metrics
                .table_age
                .set(router.table().built_at.elapsed().as_secs_f64());
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                router.metrics.render(),
            )
        }
        (&Method::GET, "/routes") => {
            let t = router.table();
            let mut j = routes_json(&t, &router.history.endpoint_rates());
            j.listeners = listeners_json(&t, router.listener_addrs());
            json_response(StatusCode::OK, &j)
        }
        (&Method::GET, "/history") => match since(req.uri().query()) {
            Ok(since) => json_response(StatusCode::OK, &router.history.json(since)),
            Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", e),
        },
        (&Method::GET, "/events") => {
            json_response(StatusCode::OK, &json!({"events": router.events.snapshot()}))
        }
        (&Method::POST, "/reload") => {
            let r2 = router.clone();
            // Parsing and validation read a file: keep them off the admin task's thread.
            let result = tokio::task::spawn_blocking(move || r2.reload())
                .await
                .unwrap_or_else(|e| Err(format!("reload task failed: {e}")));
            match result {
                Ok(msg) => json_response(StatusCode::OK, &json!({"ok": true, "message": msg})),
                Err(e) => json_response(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"ok": false, "error": e}),
                ),
            }
        }
        (&Method::GET, "/") => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        (_, p) if p == "/demo" || p.starts_with("/demo/") => demo(&router, &method, p),
        (_, "/reload") => method_not_allowed("POST"),
        (_, "/healthz" | "/readyz" | "/metrics" | "/routes" | "/history" | "/events" | "/") => {
            method_not_allowed("GET")
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /healthz /readyz /metrics /routes /history /events /reload\n",
        ),
    };
    Ok(r)
}

fn demo(router: &Router, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let demo = router.zone_controls.lock().ok().and_then(|d| d.clone());
    let Some(demo) = demo else {
        return respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not running the demo\n",
        );
    };
    if method == Method::GET && path == "/demo" {
        return json_response(StatusCode::OK, &demo.describe());
    }
    // POST /demo/zones/{zone}/{down|up|slow}
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["demo", "zones", zone, action]) => match demo.set(zone, action) {
            Ok(msg) => {
                let severity = if *action == "up" {
                    Severity::Ok
                } else {
                    Severity::Warning
                };
                router.events.push_with("demo", severity, msg.clone());
                json_response(StatusCode::OK, &json!({"ok": true, "message": msg}))
            }
            Err(e) => json_response(StatusCode::NOT_FOUND, &json!({"ok": false, "error": e})),
        },
        (_, ["demo", "zones", _, _]) => method_not_allowed("POST"),
        (_, ["demo"]) => method_not_allowed("GET"),
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try GET /demo or POST /demo/zones/{zone}/down|up|slow (up also undoes slow)\n",
        ),
    }
}

#[derive(Serialize)]
struct RoutesJson<'a> {
    generation: u64,
    /// Requests per second over the router's last sampling interval (null before the second
    /// sample); the zones' and endpoints' `rps` likewise.
    rps: Option<f64>,
    table_age_s: f64,
    locality: LocalityJson<'a>,
    listeners: Vec<ListenerJson<'a>>,
    clusters: Vec<ClusterJson<'a>>,
}

#[derive(Serialize)]
struct ListenerJson<'a> {
    name: String,
    protocol: &'static str,
    /// Where it really listens.
    address: String,
    /// Layer 4: the clusters it sends to; http/https: the routes that belong to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    clusters: Vec<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routes: Option<usize>,
    proxy_protocol: bool,
}

/// The running listeners as the table's config describes them.
fn listeners_json<'t>(
    t: &'t Table,
    running: Vec<(String, &'static str, std::net::SocketAddr)>,
) -> Vec<ListenerJson<'t>> {
    running
        .into_iter()
        .map(|(name, protocol, addr)| {
            let spec = t.config.listeners.iter().find(|l| l.name == name);
            let id = crate::config::listener_id(&name);
            ListenerJson {
                protocol,
                address: addr.to_string(),
                clusters: spec.map(|s| s.protocol.clusters()).unwrap_or_default(),
                routes: spec.filter(|s| s.protocol.is_http()).map(|_| {
                    t.routes
                        .iter()
                        .filter(|r| r.listeners.is_empty() || r.listeners.contains(&id))
                        .count()
                }),
                proxy_protocol: spec.is_some_and(|s| s.proxy_protocol.is_some()),
                name,
            }
        })
        .collect()
}

#[derive(Serialize)]
struct LocalityJson<'a> {
    region: &'a str,
    zone: &'a str,
}

#[derive(Serialize)]
struct ClusterJson<'a> {
    name: &'a str,
    panic: bool,
    rps: Option<f64>,
    /// The ranking's margins in force.
    ranking: RankingJson,
    zones: Vec<ZoneJson<'a>>,
    endpoints: Vec<EndpointJson<'a>>,
    /// How traffic splits, in order: zone, share, why.
    slices: Vec<SliceJson<'a>>,
    /// Share no zone takes (a strict dial with nowhere else to go): refused with 503.
    /// Zone shares plus this make 1.
    refused_share: f64,
}

#[derive(Serialize)]
struct RankingJson {
    hysteresis_percent: f64,
    cross_region_margin_ms: f64,
    rank_hold_ms: f64,
}

#[derive(Serialize)]
struct ZoneJson<'a> {
    region: &'a str,
    zone: &'a str,
    rank: usize,
    /// The zone's probe estimate (lower quartile of the round trips), live.
    latency_ms: Option<f64>,
    /// Half-width of the estimate's confidence interval.
    uncertainty_ms: Option<f64>,
    /// Probe round trips the estimate stands on.
    samples: usize,
    /// The newest probes of every endpoint moved away together: the estimate follows them.
    shifted: bool,
    /// How much faster than the zone ranked just ahead this one must be to pass it (both
    /// uncertainties, hysteresis, and the cross-region margin when it applies); `null` at
    /// rank 0 or without estimates.
    overtake_margin_ms: Option<f64>,
    healthy: usize,
    endpoints: usize,
    share: f64,
    dial: u8,
    rps: Option<f64>,
}

#[derive(Serialize)]
struct EndpointJson<'a> {
    address: &'a str,
    region: &'a str,
    zone: &'a str,
    healthy: bool,
    status: &'static str,
    ejected: bool,
    /// Smoothed probe round trip.
    latency_ms: Option<f64>,
    /// Real requests' time to headers: peak-sensitive and smoothed (`null` without a
    /// recent request).
    peak_latency_ms: Option<f64>,
    request_latency_ms: Option<f64>,
    in_flight: u32,
    weight: u32,
    requests: u64,
    rps: Option<f64>,
}

#[derive(Serialize)]
struct SliceJson<'a> {
    zone: &'a str,
    share: f64,
    reason: &'static str,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

type Rates = HashMap<(Arc<str>, Arc<str>), f64>;

fn sum_rates(it: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    it.flatten()
        .fold(None, |acc, r| Some(acc.unwrap_or(0.0) + r))
        .map(round3)
}

fn routes_json<'a>(t: &'a Table, rates: &Rates) -> RoutesJson<'a> {
    let routing = &t.config.routing;
    let rate = |c: &Arc<str>, e: &Arc<str>| rates.get(&(c.clone(), e.clone())).copied();
    let clusters: Vec<ClusterJson<'a>> = t
        .clusters
        .iter()
        .map(|c| {
            // Live, not the snapshot taken when the table was built (a table is only
            // swapped when it routes differently).
            // The table's order, except that a zone whose last endpoint went down since
            // the table was built is shown after the living ones already (the next
            // table, milliseconds away, puts it there too).
            let mut order: Vec<usize> = (0..c.zones.len()).collect();
            order.sort_by_key(|&i| !c.zones[i].endpoints.iter().any(|e| e.state.is_available()));
            let zones: Vec<&ZoneTable> = order.iter().map(|&i| &c.zones[i]).collect();
            let est: Vec<Option<Estimate>> = zones
                .iter()
                .map(|z| zone_estimate_of(z.endpoints.iter(), routing))
                .collect();
            let key = |i: usize| -> ZoneKey { (zones[i].region.clone(), zones[i].zone.clone()) };
            let zones_json: Vec<ZoneJson<'a>> = zones
                .iter()
                .enumerate()
                .map(|(i, z)| ZoneJson {
                    region: &z.region,
                    zone: &z.zone,
                    rank: i,
                    latency_ms: est[i].map(|e| round3(e.ms)),
                    uncertainty_ms: est[i].map(|e| round3(e.uncertainty_ms)),
                    samples: est[i].map_or(0, |e| e.samples),
                    shifted: est[i].is_some_and(|e| e.shifted),
                    overtake_margin_ms: match (i.checked_sub(1).and_then(|p| est[p]), est[i]) {
                        (Some(ahead), Some(me)) => Some(round3(required_lead_ms(
                            (&key(i), &me),
                            (&key(i - 1), &ahead),
                            &t.config.locality,
                            routing,
                        ))),
                        _ => None,
                    },
                    healthy: z
                        .endpoints
                        .iter()
                        .filter(|e| e.state.is_available())
                        .count(),
                    endpoints: z.endpoints.len(),
                    share: round3(z.share),
                    dial: z.dial,
                    rps: sum_rates(z.endpoints.iter().map(|e| rate(&c.name, &e.state.label))),
                })
                .collect();
            ClusterJson {
                name: &c.name,
                panic: c.panic,
                rps: sum_rates(zones_json.iter().map(|z| z.rps)),
                ranking: RankingJson {
                    hysteresis_percent: round3(routing.hysteresis * 100.0),
                    cross_region_margin_ms: round3(routing.cross_region_margin.as_secs_f64() * 1e3),
                    rank_hold_ms: round3(routing.rank_hold.as_secs_f64() * 1e3),
                },
                zones: zones_json,
                endpoints: c
                    .zones
                    .iter()
                    .flat_map(|z| z.endpoints.iter())
                    .map(|e| EndpointJson {
                        address: &e.state.label,
                        region: &e.state.region,
                        zone: &e.state.zone,
                        healthy: e.state.is_available(),
                        status: e.state.status().as_str(),
                        ejected: e.state.is_ejected(),
                        latency_ms: e.state.latency_ms().map(round3),
                        peak_latency_ms: e.state.peak_latency_ms().map(round3),
                        request_latency_ms: e.state.request_latency_ms().map(round3),
                        in_flight: e.state.in_flight.load(Ordering::Relaxed),
                        weight: e.weight,
                        requests: e.state.requests.load(Ordering::Relaxed),
                        rps: rate(&c.name, &e.state.label).map(round3),
                    })
                    .collect(),
                slices: c
                    .slices
                    .iter()
                    .enumerate()
                    .map(|(i, s)| SliceJson {
                        zone: &c.zones[s.zone].zone,
                        share: round3(s.upto - if i == 0 { 0.0 } else { c.slices[i - 1].upto }),
                        reason: s.reason.as_str(),
                    })
                    .collect(),
                refused_share: round3(1.0 - c.slices.last().map_or(0.0, |s| s.upto)),
            }
        })
        .collect();
    RoutesJson {
        generation: t.generation,
        rps: sum_rates(clusters.iter().map(|c| c.rps)),
        table_age_s: round3(t.built_at.elapsed().as_secs_f64()),
        locality: LocalityJson {
            region: &t.config.locality.region,
            zone: &t.config.locality.zone,
        },
        listeners: Vec::new(),
        clusters,
    }
}
