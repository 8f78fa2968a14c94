//! HTTP/1.1 Upgrade (WebSocket and the like): routed and accounted like any request, then
//! the two connections are spliced.

use super::*;

/// An HTTP/1.1 request asking to switch protocols (WebSocket and the like): an `Upgrade`
/// header and `upgrade` among the Connection options. One header lookup on the normal path.
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
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
/// affinity: a client's WebSocket lands where its requests do), sent over HTTP/1.1 with
/// `Connection: upgrade` and the client's `Upgrade` header. On `101 Switching Protocols`
/// both connections are handed over to a task that copies bytes both ways until either side
/// closes. Counted as one request (code 101); the endpoint's in-flight mark ends with the
/// 101, so long-lived tunnels do not fill `max_requests_per_endpoint`. An upstream that
/// declines answers like any response, and failures are accounted like any request's.
pub(super) async fn forward_upgrade(
    mut x: Exchange<'_>,
    mut req: Request<Incoming>,
    host: Option<String>,
    client: SocketAddr,
    https: bool,
    request_id: &HeaderValue,
    route_header: bool,
) -> Response<ResponseBody> {
    let cluster = x.cluster;
    let cm = x.metrics();
    if x.config().http2 {
        // The cluster's client speaks only HTTP/2, which has no Upgrade.
        cm.error(ErrorKind::UpgradeUnsupported.as_str());
        let log = x.log.take();
        return error_exit(
            ErrorReply::new(ErrorKind::UpgradeUnsupported, log),
            request_id,
        );
    }
    let downstream = hyper::upgrade::on(&mut req);
    let (mut parts, body) = req.into_parts();
    let upgrade = parts.headers.get(header::UPGRADE).cloned();
    prepare_upstream_headers(
        &mut parts.headers,
        x.request_headers,
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
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let scheme = if x.config().tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut body = ClientBody::new(body, cm.request_bytes.clone());
    loop {
        let (ep, zone) = x.target();
        let Ok(uri) = upstream_uri(scheme, ep, &path_and_query) else {
            return error_exit(
                ErrorReply::new(ErrorKind::BadRequest, x.log.take()),
                request_id,
            );
        };
        let mut up = Request::new(body.for_attempt());
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        *up.version_mut() = Version::HTTP_11;
        *up.headers_mut() = parts.headers.clone();
        let in_flight = InFlight::new(ep.clone());
        let sent = Instant::now();
        let attempt = proxied::send(cluster, ep, x.announce, up);
        let result = tokio::time::timeout_at(x.deadline.into(), attempt).await;
        let failure = match result {
            Ok(Ok(mut resp)) => {
                let status = resp.status();
                x.responded(status.as_u16(), sent);
                let route = x
                    .route_header(route_header)
                    .map(|(z, e, r)| self::route_header(z, e, r));
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    // Declined: an ordinary response.
                    let resp = resp.map(UpstreamBody::Hyper);
                    return finish_response(resp, in_flight, x, route, body.client_broke);
                }
                drop(in_flight);
                let upstream = hyper::upgrade::on(&mut resp);
                let (mut rparts, _) = resp.into_parts();
                for name in HOP_BY_HOP.iter() {
                    if name != header::CONNECTION {
                        rparts.headers.remove(name);
                    }
                }
                rewrite::apply(x.response_headers, &mut rparts.headers);
                rparts.headers.remove(&X_EDGE_ROUTE);
                if let Some(v) = route {
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
                    log: x.log.is_some(),
                    bytes: (cm.request_bytes.clone(), cm.response_bytes.clone()),
                };
                tokio::spawn(tunnel.run(downstream, upstream));
                return Response::from_parts(rparts, ResponseBody::Full(None));
            }
            Err(_) => AttemptError::Timeout,
            Ok(Err(e)) => {
                body.recover();
                e
            }
        };
        drop(in_flight);
        // An upgrade is not replayed after a reset: the upstream may have switched already.
        let may_resend = matches!(failure, AttemptError::Connect { .. });
        match x.failed(failure, may_resend) {
            Next::Retry => continue,
            Next::Reply(r) => return error_exit(r, request_id),
            Next::Abort => {
                return error_response(
                    ErrorKind::ClientAbort.status(),
                    ErrorKind::ClientAbort.as_str(),
                    String::new(),
                    request_id,
                )
            }
        }
    }
}

/// An upgraded connection pair being copied both ways.
pub(super) struct Tunnel {
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
        let log = crate::telemetry::access::global().filter(|_| self.log);
        if let Some(log) = log {
            log.line(|l| {
                l.bare("method", self.method.as_str());
                l.bare("host", &self.host);
                l.bare("path", &self.path);
                l.u64("status", 101);
                l.millis("duration_ms", started.elapsed());
                l.u64("bytes", received);
                l.u64("bytes_up", sent);
                l.bool("upgrade", true);
                l.quoted("error", error.as_deref().unwrap_or("-"));
                l.bare("cluster", &self.cluster);
                l.bare("zone", &self.zone);
                l.bare("endpoint", &self.endpoint);
                l.quoted("request_id", self.request_id.to_str().unwrap_or("-"));
                l.addr("client", self.client);
            });
        }
    }
}
