//! Connections to upstream endpoints: the connector and pooled clients shared by the proxy
//! and the health probes of a cluster.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::ClusterConfig;

pub type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// Builds the connector of a cluster: TCP with Nagle off and the cluster's connect timeout,
/// TLS when the cluster asks for it.
pub fn connector(cluster: &ClusterConfig) -> Result<Connector, String> {
    let tls = cluster.tls.as_ref().map(|t| crate::tls::UpstreamTls {
        sni: t.sni.clone(),
        ca: t.ca.clone(),
    });
    crate::tls::upstream_connector(tls.as_ref(), cluster.http2, cluster.connect_timeout)
}

/// The pooled keep-alive client the proxy uses for a cluster.
pub fn proxy_client<B>(connector: Connector, cluster: &ClusterConfig) -> Client<Connector, B>
where
    B: hyper::body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .http2_only(cluster.http2)
        .build(connector)
}

/// A small client for health probes: its own pool, so probes measure the endpoint and not a
/// queue behind proxied requests.
pub fn probe_client(connector: Connector, http2: bool) -> Client<Connector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1)
        .build(connector)
}

/// An error and its sources on one line: hyper's top-level message alone ("client error
/// (Connect)") does not say what went wrong.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
