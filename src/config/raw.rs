//! The file as serde reads it: every key optional where the config has a default, unknown
//! keys refused. `validate` turns it into the typed [`super::Config`].

use super::*;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// `[listener]` (one table, the short form) or `[[listener]]` (several); read as a
    /// value first so either shape gets errors that name its key.
    pub listener: Option<toml::Value>,
    pub admin: Option<Admin>,
    pub locality: Option<Locality>,
    pub routing: Option<Routing>,
    pub dns: Option<Dns>,
    #[serde(default)]
    pub cluster: Vec<Cluster>,
    #[serde(default)]
    pub route: Vec<Route>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Option<String>,
    pub address: Option<String>,
    pub protocol: Option<String>,
    pub tls: Option<Tls>,
    pub cluster: Option<String>,
    pub sni: Option<Vec<SniRoute>>,
    pub default_cluster: Option<String>,
    pub flow_idle_timeout: Option<String>,
    pub max_flows: Option<i64>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub route_header: Option<bool>,
    pub access_log: Option<bool>,
    pub access_log_path: Option<String>,
    pub max_connections: Option<i64>,
    pub header_read_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub idle_timeout: Option<String>,
    pub drain_timeout: Option<String>,
    pub max_concurrent_streams: Option<i64>,
    pub http1_engine: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    pub host: String,
    pub cluster: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    pub trusted: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub cert: String,
    pub key: String,
    /// More certificates, chosen by SNI.
    #[serde(default)]
    pub sni: Vec<CertPair>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: String,
    pub key: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Routing {
    pub hysteresis_percent: Option<f64>,
    pub rank_hold: Option<String>,
    pub cross_region_margin: Option<String>,
    pub latency_decay: Option<String>,
    pub rank_decay: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    pub nameserver: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum Affinity {
    Name(String),
    Header { header: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    pub sni: Option<String>,
    pub ca: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: String,
    #[serde(default)]
    pub traffic_dial: BTreeMap<String, i64>,
    pub dial_fallback: Option<bool>,
    pub affinity: Option<Affinity>,
    pub tls: Option<UpstreamTls>,
    pub http2: Option<bool>,
    pub dns_min_ttl: Option<String>,
    pub dns_max_ttl: Option<String>,
    pub connect_timeout: Option<String>,
    pub max_requests_per_endpoint: Option<i64>,
    pub overprovisioning_factor: Option<f64>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    pub retry: Option<Retry>,
    pub hedge: Option<Hedge>,
    pub send_proxy_protocol: Option<String>,
    #[serde(default)]
    pub endpoint: Vec<Endpoint>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub port: Option<i64>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub healthy_threshold: Option<i64>,
    pub unhealthy_threshold: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Outlier {
    pub consecutive_failures: Option<i64>,
    pub base_ejection_time: Option<String>,
    pub max_ejection_time: Option<String>,
    pub max_ejection_percent: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Retry {
    pub attempts: Option<i64>,
    pub budget_percent: Option<f64>,
    pub min_retries_per_second: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Hedge {
    pub enabled: Option<bool>,
    pub delay: Option<String>,
    pub budget_percent: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub address: Option<String>,
    pub srv: Option<String>,
    pub region: String,
    pub zone: String,
    pub weight: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub listener: Option<OneOrMany>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub cluster: Option<String>,
    pub redirect: Option<Redirect>,
    pub timeout: Option<String>,
    pub hedge: Option<bool>,
    pub rewrite_prefix: Option<String>,
    pub request_headers: Option<HeaderActions>,
    pub response_headers: Option<HeaderActions>,
}

/// `{ add = { name = value }, set = { name = value }, remove = [name] }`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderActions {
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub code: Option<i64>,
    pub port: Option<i64>,
}
