//! The config file: parse and validate, nothing else.
//!
//! Parsing happens in two steps. serde reads the TOML into `raw` structs that keep durations
//! and addresses as strings (so a bad value is reported by us, with its key path, instead of
//! by serde with a generic message); `validate` then turns them into the typed [`Config`] the
//! rest of the program uses. Every error is one line: `FILE: KEY PATH: PROBLEM`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod locate;
mod raw;
mod validate;

use validate::validate;
pub use validate::{
    parse_duration, parse_endpoint_address, DEFAULT_ADMIN, DEFAULT_LISTENER, DEFAULT_LISTENER_NAME,
};

/// A number where a duration string belongs ("write 1s, not 1") says so: the key's name
/// tells a duration (every duration key ends in one of these words).
fn duration_hint(path: &str, msg: String) -> String {
    let key = path.rsplit(['.', ' ']).next().unwrap_or(path);
    let duration_key = [
        "timeout", "interval", "time", "delay", "hold", "decay", "margin",
    ]
    .iter()
    .any(|w| key.ends_with(w));
    if duration_key
        && (msg.contains("invalid type: integer") || msg.contains("invalid type: float"))
    {
        format!("{msg}; a duration is a string with a unit: write \"1s\" or \"250ms\", not a bare number")
    } else {
        msg
    }
}

/// One line naming the file, the key path and the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    /// The key, in the words every message uses (see `locate`); empty for the whole file.
    pub path: String,
    pub problem: String,
    /// 1-based, when the place is in the file (a missing key has the line of its table).
    pub line: Option<usize>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The line goes last, so `FILE: KEY: PROBLEM` reads the same with or without it.
        match (self.path.is_empty(), self.line) {
            (true, None) => write!(f, "{}: {}", self.file, self.problem),
            (true, Some(l)) => write!(f, "{}: line {l}: {}", self.file, self.problem),
            (false, None) => write!(f, "{}: {}: {}", self.file, self.path, self.problem),
            (false, Some(l)) => {
                write!(
                    f,
                    "{}: {}: {} (line {l})",
                    self.file, self.path, self.problem
                )
            }
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the config came from, for messages.
    pub source: String,
    /// Settings every HTTP listener shares (and the process-wide connection limit and drain).
    pub listener: ListenerConfig,
    /// Every front door, in file order; never empty.
    pub listeners: Vec<ListenerSpec>,
    pub admin: AdminConfig,
    pub locality: Locality,
    pub routing: RoutingConfig,
    pub dns: DnsConfig,
    pub clusters: Vec<ClusterConfig>,
    pub routes: Vec<RouteConfig>,
    /// Likely mistakes that are not errors, one line each naming the file and key:
    /// `check` prints them and `run` logs them.
    pub warnings: Vec<ConfigError>,
}

/// How DNS-named endpoints are resolved (`[dns]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Ask only this nameserver (UDP), without /etc/hosts; `None`: the system resolver
    /// (/etc/resolv.conf and /etc/hosts). For tests and split-horizon setups.
    pub nameserver: Option<SocketAddr>,
}

/// Settings shared by every listener: `[listener]` holds them in the short form; with
/// `[[listener]]` any table may set them, and tables that set the same one must agree.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub route_header: bool,
    pub access_log: bool,
    /// Where access-log lines go; `None`: stdout. Reopened on SIGHUP and SIGUSR1.
    pub access_log_path: Option<PathBuf>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// Which HTTP/1.1 implementation serves HTTP/1.1 clients, over plain TCP or TLS.
    pub http1_engine: Http1Engine,
}

/// One front door (`[[listener]]`, or the `[listener]` short form, named "default").
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSpec {
    pub name: String,
    pub address: SocketAddr,
    pub protocol: Protocol,
    /// Sources that must (and alone may) open with a PROXY v1/v2 header.
    pub proxy_protocol: Option<Vec<ipnet::IpNet>>,
}

impl ListenerSpec {
    /// See [`listener_id`].
    pub fn id(&self) -> u64 {
        listener_id(&self.name)
    }
}

/// A listener's identity on the request path: a hash of its name, so it is `Copy`, cheap to
/// compare, and the same across reloads whatever the order of the listener tables.
pub fn listener_id(name: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    Http,
    Https(ListenerTls),
    Tcp {
        cluster: String,
        idle_timeout: Duration,
    },
    TlsPassthrough {
        sni: Vec<SniRoute>,
        default_cluster: Option<String>,
        idle_timeout: Duration,
    },
    Udp {
        cluster: String,
        flow_idle_timeout: Duration,
        max_flows: usize,
    },
}

impl Protocol {
    /// The `protocol` key's value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Https(_) => "https",
            Protocol::Tcp { .. } => "tcp",
            Protocol::TlsPassthrough { .. } => "tls_passthrough",
            Protocol::Udp { .. } => "udp",
        }
    }

    pub fn is_http(&self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https(_))
    }

    /// The clusters this listener sends traffic to directly (layer 4).
    pub fn clusters(&self) -> Vec<&str> {
        match self {
            Protocol::Http | Protocol::Https(_) => Vec::new(),
            Protocol::Tcp { cluster, .. } | Protocol::Udp { cluster, .. } => vec![cluster],
            Protocol::TlsPassthrough {
                sni,
                default_cluster,
                ..
            } => sni
                .iter()
                .map(|r| r.cluster.as_str())
                .chain(default_cluster.as_deref())
                .collect(),
        }
    }
}

/// One `sni` entry of a tls_passthrough listener.
#[derive(Debug, Clone, PartialEq)]
pub struct SniRoute {
    pub host: HostMatch,
    pub cluster: String,
}

/// `send_proxy_protocol` of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

/// `listener.http1_engine`: the native path (src/h1) by default; `hyper` serves every
/// connection with hyper, as before the native path existed (for comparison, or as a way
/// back if the native path misbehaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http1Engine {
    Native,
    Hyper,
}

impl Http1Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Http1Engine::Native => "native",
            Http1Engine::Hyper => "hyper",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerTls {
    /// The first pair is the default certificate; the others are picked by SNI.
    pub certificates: Vec<CertFiles>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

/// Knobs of the routing table builder.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingConfig {
    /// A zone must be this much faster (relative) than the zone ranked ahead of it, beyond
    /// both zones' uncertainties, to pass it.
    pub hysteresis: f64,
    /// ...and the new order must stand for this long, unless the new nearest zone is at
    /// least twice as fast as the old one.
    pub rank_hold: Duration,
    /// What a zone of another region must be faster by, on top of the rest, to pass a zone
    /// of this router's region: the latency given up to stay in-region.
    pub cross_region_margin: Duration,
    /// Time constant of the peak-sensitive latency average (in-zone pick) after a peak.
    pub latency_decay: Duration,
    /// Time constant of the smoothed latency average that ranks zones.
    pub rank_decay: Duration,
}

/// Time constants of an endpoint's two averages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Decay {
    pub peak: Duration,
    pub smooth: Duration,
}

impl RoutingConfig {
    pub fn decay(&self) -> Decay {
        Decay {
            peak: self.latency_decay,
            smooth: self.rank_decay,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Affinity {
    None,
    SourceIp,
    Header(http::HeaderName),
}

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamTls {
    pub sni: Option<String>,
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    pub name: String,
    /// Percent (0-100) per region; regions not named have 100.
    pub traffic_dial: BTreeMap<String, u8>,
    /// When every undialled zone is down, dialled-down regions still serve.
    pub dial_fallback: bool,
    pub affinity: Affinity,
    pub tls: Option<UpstreamTls>,
    pub http2: bool,
    /// Bounds on how long a DNS answer for this cluster's named endpoints is used before
    /// the name is resolved again (the record's TTL, clamped to these).
    pub dns_min_ttl: Duration,
    pub dns_max_ttl: Duration,
    pub connect_timeout: Duration,
    pub max_requests_per_endpoint: u32,
    pub overprovisioning_factor: f64,
    pub health_check: HealthCheckConfig,
    pub outlier: OutlierConfig,
    pub retry: RetryConfig,
    pub hedge: HedgeConfig,
    pub send_proxy_protocol: Option<ProxyVersion>,
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// HTTP GET of this path; `None` means a TCP connect check.
    pub path: Option<String>,
    /// Probe this port instead of the endpoint's own.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierConfig {
    /// Connect failures or 5xx in a row on real traffic that eject an endpoint; 0 disables.
    pub consecutive_failures: u32,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Extra attempts per request (0 disables retries).
    pub attempts: u32,
    pub budget_ratio: f64,
    pub min_retries_per_second: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HedgeConfig {
    pub enabled: bool,
    /// `None`: the zone's recent p95.
    pub delay: Option<Duration>,
    pub budget_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddress {
    Ip(SocketAddr),
    Dns { host: String, port: u16 },
    Srv { name: String },
}

impl fmt::Display for EndpointAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddress::Ip(a) => write!(f, "{a}"),
            EndpointAddress::Dns { host, port } => write!(f, "{host}:{port}"),
            EndpointAddress::Srv { name } => write!(f, "srv:{name}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct EndpointConfig {
    pub address: EndpointAddress,
    pub region: String,
    pub zone: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// The listeners the route belongs to; empty: every http and https listener.
    pub listeners: Vec<String>,
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub action: RouteAction,
    pub timeout: Duration,
    /// Per-route override of the cluster's hedging switch.
    pub hedge: Option<bool>,
    /// Replaces the matched `path_prefix` in the path sent upstream.
    pub rewrite_prefix: Option<String>,
    /// Applied to the request before it goes upstream.
    pub request_headers: HeaderActions,
    /// Applied to the upstream's response before it goes to the client (not to the
    /// router's own replies).
    pub response_headers: HeaderActions,
}

/// A route's header edits, applied in this order: `remove`, then `set` (replaces every
/// line of that name), then `add` (one more line, whatever is there). Names are lower case.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HeaderActions {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
    pub add: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HeaderActions {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteAction {
    /// Forward to this cluster.
    Cluster(String),
    Redirect(Redirect),
}

/// `redirect = { scheme, code, port }`: answered by the router, never forwarded.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    pub scheme: String,
    pub code: u16,
    pub port: Option<u16>,
}

impl RouteConfig {
    /// The cluster a forwarding route sends to.
    pub fn cluster(&self) -> Option<&str> {
        match &self.action {
            RouteAction::Cluster(c) => Some(c),
            RouteAction::Redirect(_) => None,
        }
    }
}

pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        path: String::new(),
        problem: format!("cannot read: {e}"),
        line: None,
    })?;
    parse(&file, &text, &|name| std::env::var(name).ok())
}

/// Parses config text; `env` looks up variables for `${VAR}` expansion.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let err = |path: String, problem: String, line: Option<usize>| ConfigError {
        file: file.to_string(),
        path,
        problem,
        line,
    };
    let expanded = expand_env(text, env).map_err(|(line, p)| err(String::new(), p, Some(line)))?;
    let de = toml::Deserializer::new(&expanded);
    let raw: raw::File = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| {
            expanded[..s.start.min(expanded.len())]
                .matches('\n')
                .count()
                + 1
        });
        // toml's own message spans several lines (a snippet with a caret); keep the first.
        let msg = inner
            .message()
            .lines()
            .next()
            .unwrap_or("invalid")
            .to_string();
        let msg = duration_hint(&path, msg);
        let path = if path == "." {
            String::new()
        } else {
            locate::serde_path(&expanded, &path)
        };
        err(path, msg, line)
    })?;
    let mut config = validate(file, raw).map_err(|mut e| {
        e.line = locate::line_of(&expanded, &e.path);
        e
    })?;
    for w in &mut config.warnings {
        w.line = locate::line_of(&expanded, &w.path);
    }
    Ok(config)
}

/// `${NAME}` and `${NAME:-default}` are replaced from the environment, so one file can serve
/// every zone of a fleet. `$${` writes a literal `${`. Comment lines are left alone.
fn expand_env(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, (usize, String)> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') || !line.contains('$') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos..];
            if let Some(stripped) = after.strip_prefix("$${") {
                out.push_str("${");
                rest = stripped;
            } else if let Some(body) = after.strip_prefix("${") {
                let end = body
                    .find('}')
                    .ok_or((i + 1, "unterminated ${ in variable reference".to_string()))?;
                let spec = &body[..end];
                let (name, default) = match spec.split_once(":-") {
                    Some((n, d)) => (n, Some(d)),
                    None => (spec, None),
                };
                let valid =
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err((i + 1, format!("invalid variable name {name:?} in ${{...}}")));
                }
                match (env(name), default) {
                    (Some(v), _) => out.push_str(&v),
                    (None, Some(d)) => out.push_str(d),
                    (None, None) => {
                        return Err((i + 1, format!("environment variable {name} is not set")))
                    }
                }
                rest = &body[end + 1..];
            } else {
                out.push('$');
                rest = &after[1..];
            }
        }
        out.push_str(rest);
    }
    Ok(out)
}

/// Parses "250ms", "2s", "1m", "1h", "500us".
impl Config {
    /// One line for `check` and the start-up log.
    pub fn summary(&self) -> String {
        let endpoints: usize = self.clusters.iter().map(|c| c.endpoints.len()).sum();
        let zones: HashSet<(&str, &str)> = self
            .clusters
            .iter()
            .flat_map(|c| {
                c.endpoints
                    .iter()
                    .map(|e| (e.region.as_str(), e.zone.as_str()))
            })
            .collect();
        let listeners: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{} {} {}", l.name, l.protocol.as_str(), l.address))
            .collect();
        format!(
            "{}: ok: {} cluster(s), {} endpoint(s) in {} zone(s), {} route(s); {} listener(s) ({}), admin {}, locality {}/{}",
            self.source,
            self.clusters.len(),
            endpoints,
            zones.len(),
            self.routes.len(),
            self.listeners.len(),
            listeners.join(", "),
            self.admin.address,
            self.locality.region,
            self.locality.zone
        )
    }
}

#[cfg(test)]
mod tests;
