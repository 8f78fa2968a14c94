//! One attempt's exchange with an endpoint: to a plain HTTP/1.1 cluster on a pooled
//! connection the request's task drives itself, else on the cluster's pooled hyper client,
//! or, for a cluster that sends PROXY headers, on a connection of its own. Such a header names one
//! client for the whole connection, so this engine opens one per request and closes it
//! with the response: never pooled, never shared (the native HTTP/1.1 engine keeps one per
//! client connection instead).

use super::*;
use crate::dataplane::h1::streamed;
use crate::upstream::proxied::{send_once, OnceError};

/// One attempt of an ordinary request: to a plain HTTP/1.1 cluster on a connection the
/// request's task drives itself ([`streamed`]), else through [`send`].
pub(super) async fn attempt(
    cluster: &ClusterTable<UpstreamClient>,
    ep: &Arc<crate::state::EndpointState>,
    announce: Option<(SocketAddr, SocketAddr)>,
    idempotent: bool,
    up: Request<RequestBody>,
) -> Result<Response<UpstreamBody>, AttemptError> {
    let cfg = &cluster.config;
    if cfg.tls.is_none() && !cfg.http2 && cfg.send_proxy_protocol.is_none() {
        let resp = streamed::send(ep, cfg.connect_timeout, idempotent, up).await?;
        return Ok(resp.map(UpstreamBody::H1));
    }
    Ok(send(cluster, ep, announce, up)
        .await?
        .map(UpstreamBody::Hyper))
}

pub(super) async fn send(
    cluster: &ClusterTable<UpstreamClient>,
    ep: &crate::state::EndpointState,
    announce: Option<(SocketAddr, SocketAddr)>,
    mut up: Request<RequestBody>,
) -> Result<Response<Incoming>, AttemptError> {
    let (Some(version), Some(from)) = (cluster.config.send_proxy_protocol, announce) else {
        return cluster
            .runtime
            .client
            .request(up)
            .await
            .map_err(|e| attempt_error(&e));
    };
    // A connection of its own speaks origin form (the pooled client does this itself).
    if let Some(pq) = up.uri().path_and_query().cloned() {
        *up.uri_mut() = Uri::from(pq);
    }
    let timeout = cluster.config.connect_timeout;
    match send_once(Some(&ep.idle), ep.addr, timeout, version, Some(from), up).await {
        Ok(resp) => Ok(resp),
        Err(OnceError::Connect(e)) => Err(AttemptError::Connect {
            detail: format!("connect: {e}"),
            tls: false,
        }),
        Err(OnceError::Http(e)) => Err(match client_side(&e) {
            Some(true) => AttemptError::ClientBad,
            Some(false) => AttemptError::ClientGone,
            None => AttemptError::Reset(upstream::error_chain(&e)),
        }),
    }
}
