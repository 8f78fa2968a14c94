//! The config file: parse and validate, nothing else.
//!
//! Parsing happens in two steps. serde reads the TOML into `raw` structs that keep durations
//! and addresses as strings (so a bad value is reported by us, with its key path, instead of
//! by serde with a generic message); `validate` then turns them into the typed [`Config`] the
//! rest of the program uses. Every error is one line: `FILE: KEY PATH: PROBLEM`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// One line naming the file, the key path and the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: String,
    pub path: String,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.problem)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.problem)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the config came from, for messages.
    pub source: String,
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub locality: Locality,
    pub routing: RoutingConfig,
    pub dns: DnsConfig,
    pub clusters: Vec<ClusterConfig>,
    pub routes: Vec<RouteConfig>,
}

/// How DNS-named endpoints are resolved (`[dns]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// Ask only this nameserver (UDP), without /etc/hosts; `None`: the system resolver
    /// (/etc/resolv.conf and /etc/hosts). For tests and split-horizon setups.
    pub nameserver: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub tls: Option<ListenerTls>,
    pub route_header: bool,
    pub access_log: bool,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_concurrent_streams: u32,
    /// Which HTTP/1.1 implementation serves plain-TCP clients.
    pub http1_engine: Http1Engine,
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
    /// A zone must be this much faster (relative) than the zone ranked ahead of it to pass it.
    pub hysteresis: f64,
    /// ...and stay faster for this long, unless it is at least twice as fast.
    pub rank_hold: Duration,
    /// Time constant of the peak-sensitive latency average (in-zone pick) after a peak.
    pub latency_decay: Duration,
    /// Time constant of the smoothed latency average that ranks zones.
    pub rank_decay: Duration,
}

impl RoutingConfig {
    pub fn decay(&self) -> crate::health::Decay {
        crate::health::Decay {
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
    pub endpoints: Vec<EndpointConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    /// HTTP GET of this path; `None` means a TCP connect check.
    pub path: Option<String>,
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
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub cluster: String,
    pub timeout: Duration,
    /// Per-route override of the cluster's hedging switch.
    pub hedge: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Raw, as written in the file.

mod raw {
    use super::*;

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct File {
        pub listener: Option<Listener>,
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
        pub address: Option<String>,
        pub tls: Option<Tls>,
        pub route_header: Option<bool>,
        pub access_log: Option<bool>,
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
        #[serde(default)]
        pub endpoint: Vec<Endpoint>,
    }

    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields)]
    pub struct HealthCheck {
        pub path: Option<String>,
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
        pub host: Option<String>,
        pub path_prefix: Option<String>,
        pub cluster: String,
        pub timeout: Option<String>,
        pub hedge: Option<bool>,
    }
}

// ---------------------------------------------------------------------------------------------
// Loading.

/// Reads, expands `${VAR}` and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        path: String::new(),
        problem: format!("cannot read: {e}"),
    })?;
    parse(&file, &text, &|name| std::env::var(name).ok())
}

/// Parses config text; `env` looks up variables for `${VAR}` expansion.
pub fn parse(
    file: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let err = |path: String, problem: String| ConfigError {
        file: file.to_string(),
        path,
        problem,
    };
    let expanded = expand_env(text, env).map_err(|(line, p)| err(format!("line {line}"), p))?;
    let de = toml::Deserializer::new(&expanded);
    let raw: raw::File = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.span().map(|s| {
            expanded[..s.start.min(expanded.len())]
                .lines()
                .count()
                .max(1)
        });
        // toml's own message spans several lines (a snippet with a caret); keep the first.
        let msg = inner
            .message()
            .lines()
            .next()
            .unwrap_or("invalid")
            .to_string();
        let path = match (path.as_str(), line) {
            (".", Some(l)) | ("", Some(l)) => format!("line {l}"),
            (".", None) | ("", None) => String::new(),
            (p, Some(l)) => format!("{p} (line {l})"),
            (p, None) => p.to_string(),
        };
        err(path, msg)
    })?;
    validate(file, raw)
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
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m or h)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (like \"250ms\" or \"2s\")"))?;
    let secs = match unit {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(format!(
                "{s:?} has unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `host:port` where host is an IP (v6 in brackets) or a DNS name.
pub fn parse_endpoint_address(s: &str) -> Result<EndpointAddress, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(EndpointAddress::Ip(sa));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(format!("address {s:?}: missing port"));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("address {s:?}: missing port"))?;
    if host.starts_with('[') || host.contains(':') {
        return Err(format!("address {s:?}: not a valid IPv6 address with port"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("address {s:?}: port {port:?} is not a number from 1 to 65535"))?;
    if port == 0 {
        return Err(format!("address {s:?}: port 0 is not allowed"));
    }
    if !valid_dns_name(host) {
        return Err(format!(
            "address {s:?}: {host:?} is not an IP address or DNS name"
        ));
    }
    Ok(EndpointAddress::Dns {
        host: host.to_string(),
        port,
    })
}

fn valid_dns_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
}

fn parse_listen_address(s: &str) -> Result<SocketAddr, String> {
    match parse_endpoint_address(s)? {
        EndpointAddress::Ip(sa) => Ok(sa),
        EndpointAddress::Dns { host, port } if host == "localhost" => {
            Ok(SocketAddr::from(([127, 0, 0, 1], port)))
        }
        _ => Err(format!(
            "address {s:?}: a listener needs an IP address (like 127.0.0.1:8080)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct V<'a> {
    file: &'a str,
}

impl V<'_> {
    fn err(&self, path: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_string(),
            path: path.into(),
            problem: problem.into(),
        }
    }

    fn duration(
        &self,
        path: &str,
        v: Option<&String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        match v {
            None => Ok(default),
            Some(s) => parse_duration(s).map_err(|p| self.err(path, p)),
        }
    }

    fn positive_duration(
        &self,
        path: &str,
        v: Option<&String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(path, v, default)?;
        if d.is_zero() {
            return Err(self.err(path, "must be greater than 0"));
        }
        Ok(d)
    }

    fn int(
        &self,
        path: &str,
        v: Option<i64>,
        default: i64,
        min: i64,
        max: i64,
    ) -> Result<i64, ConfigError> {
        let n = v.unwrap_or(default);
        if n < min || n > max {
            return Err(self.err(path, format!("{n} is out of range ({min} to {max})")));
        }
        Ok(n)
    }

    fn float(
        &self,
        path: &str,
        v: Option<f64>,
        default: f64,
        min: f64,
        max: f64,
    ) -> Result<f64, ConfigError> {
        let n = v.unwrap_or(default);
        if !n.is_finite() || n < min || n > max {
            return Err(self.err(path, format!("{n} is out of range ({min} to {max})")));
        }
        Ok(n)
    }

    fn name(&self, path: &str, s: &str) -> Result<(), ConfigError> {
        if s.is_empty() {
            return Err(self.err(path, "must not be empty"));
        }
        if s.len() > 128 || s.chars().any(|c| c.is_control() || c == '"') {
            return Err(self.err(path, format!("{s:?} is not a valid name")));
        }
        Ok(())
    }
}

pub const DEFAULT_LISTENER: &str = "127.0.0.1:8080";
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9901";

fn validate(file: &str, raw: raw::File) -> Result<Config, ConfigError> {
    let v = V { file };

    let rl = raw.listener.unwrap_or_default();
    let address = parse_listen_address(rl.address.as_deref().unwrap_or(DEFAULT_LISTENER))
        .map_err(|p| v.err("listener.address", p))?;
    let tls = rl.tls.map(|t| {
        let mut certificates = vec![CertFiles {
            cert: PathBuf::from(t.cert),
            key: PathBuf::from(t.key),
        }];
        certificates.extend(t.sni.into_iter().map(|p| CertFiles {
            cert: PathBuf::from(p.cert),
            key: PathBuf::from(p.key),
        }));
        ListenerTls { certificates }
    });
    let listener = ListenerConfig {
        address,
        tls,
        route_header: rl.route_header.unwrap_or(false),
        access_log: rl.access_log.unwrap_or(true),
        max_connections: v.int(
            "listener.max_connections",
            rl.max_connections,
            10_000,
            1,
            1_000_000,
        )? as usize,
        header_read_timeout: v.positive_duration(
            "listener.header_read_timeout",
            rl.header_read_timeout.as_ref(),
            Duration::from_secs(10),
        )?,
        max_header_bytes: v.int(
            "listener.max_header_bytes",
            rl.max_header_bytes,
            64 * 1024,
            8192,
            1 << 20,
        )? as usize,
        idle_timeout: v.positive_duration(
            "listener.idle_timeout",
            rl.idle_timeout.as_ref(),
            Duration::from_secs(60),
        )?,
        drain_timeout: v.duration(
            "listener.drain_timeout",
            rl.drain_timeout.as_ref(),
            Duration::from_secs(30),
        )?,
        max_concurrent_streams: v.int(
            "listener.max_concurrent_streams",
            rl.max_concurrent_streams,
            256,
            1,
            65_535,
        )? as u32,
        http1_engine: match rl.http1_engine.as_deref() {
            None | Some("native") => Http1Engine::Native,
            Some("hyper") => Http1Engine::Hyper,
            Some(other) => {
                return Err(v.err(
                    "listener.http1_engine",
                    format!("\"{other}\" is not an engine (expected \"native\" or \"hyper\")"),
                ))
            }
        },
    };

    let admin_addr = raw
        .admin
        .unwrap_or_default()
        .address
        .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    let admin = AdminConfig {
        address: parse_listen_address(&admin_addr).map_err(|p| v.err("admin.address", p))?,
    };
    if admin.address == listener.address && admin.address.port() != 0 {
        return Err(v.err("admin.address", "must differ from listener.address"));
    }

    let locality = match raw.locality {
        Some(l) => {
            v.name("locality.region", &l.region)?;
            v.name("locality.zone", &l.zone)?;
            Locality {
                region: l.region,
                zone: l.zone,
            }
        }
        None => {
            return Err(v.err(
                "locality",
                "missing: say where this router runs (region and zone)",
            ))
        }
    };

    let rr = raw.routing.unwrap_or_default();
    let routing = RoutingConfig {
        hysteresis: v.float(
            "routing.hysteresis_percent",
            rr.hysteresis_percent,
            10.0,
            0.0,
            100.0,
        )? / 100.0,
        rank_hold: v.duration(
            "routing.rank_hold",
            rr.rank_hold.as_ref(),
            Duration::from_secs(1),
        )?,
        latency_decay: v.positive_duration(
            "routing.latency_decay",
            rr.latency_decay.as_ref(),
            Duration::from_secs(5),
        )?,
        rank_decay: v.positive_duration(
            "routing.rank_decay",
            rr.rank_decay.as_ref(),
            Duration::from_secs(2),
        )?,
    };

    let dns = DnsConfig {
        nameserver: match raw.dns.unwrap_or_default().nameserver {
            None => None,
            Some(ns) => Some(match parse_endpoint_address(&ns) {
                Ok(EndpointAddress::Ip(sa)) => sa,
                Ok(_) => {
                    return Err(v.err(
                        "dns.nameserver",
                        format!("{ns:?} must be an IP address with port, like \"10.0.0.10:53\""),
                    ))
                }
                Err(p) => return Err(v.err("dns.nameserver", p)),
            }),
        },
    };

    if raw.cluster.is_empty() {
        return Err(v.err("cluster", "at least one [[cluster]] is needed"));
    }
    let mut clusters = Vec::with_capacity(raw.cluster.len());
    let mut names = HashSet::new();
    for (ci, c) in raw.cluster.into_iter().enumerate() {
        let p = if c.name.is_empty() {
            format!("cluster {}", ci + 1)
        } else {
            format!("cluster {:?}", c.name)
        };
        v.name(&format!("{p}: name"), &c.name)?;
        if !names.insert(c.name.clone()) {
            return Err(v.err(format!("{p}: name"), "duplicate cluster name"));
        }
        clusters.push(validate_cluster(&v, &p, c)?);
    }

    if raw.route.is_empty() {
        return Err(v.err("route", "at least one [[route]] is needed"));
    }
    let mut routes = Vec::with_capacity(raw.route.len());
    for (ri, r) in raw.route.into_iter().enumerate() {
        let p = format!("route {}", ri + 1);
        if !names.contains(&r.cluster) {
            return Err(v.err(
                format!("{p}: cluster"),
                format!("no cluster named {:?}", r.cluster),
            ));
        }
        let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') {
            return Err(v.err(
                format!("{p}: path_prefix"),
                format!("{path_prefix:?} must start with /"),
            ));
        }
        let host = match r.host {
            None => None,
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if let Some(suffix) = h.strip_prefix("*.") {
                    if !valid_dns_name(suffix) {
                        return Err(v.err(
                            format!("{p}: host"),
                            format!("{h:?} is not a valid host pattern"),
                        ));
                    }
                    Some(HostMatch::Suffix(format!(".{suffix}")))
                } else if valid_dns_name(&h) || h.parse::<IpAddr>().is_ok() {
                    Some(HostMatch::Exact(h))
                } else {
                    return Err(v.err(
                        format!("{p}: host"),
                        format!("{h:?} is not a host name (exact, or \"*.example.com\")"),
                    ));
                }
            }
        };
        routes.push(RouteConfig {
            host,
            path_prefix,
            cluster: r.cluster,
            timeout: v.positive_duration(
                &format!("{p}: timeout"),
                r.timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            hedge: r.hedge,
        });
    }

    Ok(Config {
        source: file.to_string(),
        listener,
        admin,
        locality,
        routing,
        dns,
        clusters,
        routes,
    })
}

fn validate_cluster(v: &V, p: &str, c: raw::Cluster) -> Result<ClusterConfig, ConfigError> {
    let mut traffic_dial = BTreeMap::new();
    for (region, pct) in c.traffic_dial {
        let key = format!("{p}: traffic_dial.{region}");
        let pct = v.int(&key, Some(pct), 100, 0, 100)?;
        traffic_dial.insert(region, pct as u8);
    }
    let affinity = match c.affinity {
        None => Affinity::None,
        Some(raw::Affinity::Name(n)) => match n.as_str() {
            "none" => Affinity::None,
            "source_ip" => Affinity::SourceIp,
            other => {
                return Err(v.err(
                    format!("{p}: affinity"),
                    format!(
                        "{other:?} is not one of \"none\", \"source_ip\" or {{ header = \"...\" }}"
                    ),
                ))
            }
        },
        Some(raw::Affinity::Header { header }) => {
            let h = http::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                v.err(
                    format!("{p}: affinity.header"),
                    format!("{header:?} is not a valid header name"),
                )
            })?;
            Affinity::Header(h)
        }
    };
    let tls = c.tls.map(|t| UpstreamTls {
        sni: t.sni,
        ca: t.ca.map(PathBuf::from),
    });

    let hc = c.health_check.unwrap_or_default();
    let hp = format!("{p}: health_check");
    let path = match hc.path {
        Some(path) if !path.starts_with('/') => {
            return Err(v.err(format!("{hp}.path"), format!("{path:?} must start with /")))
        }
        other => other,
    };
    let health_check = HealthCheckConfig {
        path,
        interval: v.positive_duration(
            &format!("{hp}.interval"),
            hc.interval.as_ref(),
            Duration::from_secs(1),
        )?,
        timeout: v.positive_duration(
            &format!("{hp}.timeout"),
            hc.timeout.as_ref(),
            Duration::from_millis(500),
        )?,
        healthy_threshold: v.int(
            &format!("{hp}.healthy_threshold"),
            hc.healthy_threshold,
            2,
            1,
            1000,
        )? as u32,
        unhealthy_threshold: v.int(
            &format!("{hp}.unhealthy_threshold"),
            hc.unhealthy_threshold,
            2,
            1,
            1000,
        )? as u32,
    };

    let o = c.outlier.unwrap_or_default();
    let op = format!("{p}: outlier");
    let outlier = OutlierConfig {
        consecutive_failures: v.int(
            &format!("{op}.consecutive_failures"),
            o.consecutive_failures,
            5,
            0,
            1000,
        )? as u32,
        base_ejection_time: v.positive_duration(
            &format!("{op}.base_ejection_time"),
            o.base_ejection_time.as_ref(),
            Duration::from_secs(30),
        )?,
        max_ejection_time: v.positive_duration(
            &format!("{op}.max_ejection_time"),
            o.max_ejection_time.as_ref(),
            Duration::from_secs(300),
        )?,
        max_ejection_percent: v.int(
            &format!("{op}.max_ejection_percent"),
            o.max_ejection_percent,
            50,
            0,
            100,
        )? as u8,
    };
    if outlier.max_ejection_time < outlier.base_ejection_time {
        return Err(v.err(
            format!("{op}.max_ejection_time"),
            "must not be less than base_ejection_time",
        ));
    }

    let r = c.retry.unwrap_or_default();
    let rp = format!("{p}: retry");
    let retry = RetryConfig {
        attempts: v.int(&format!("{rp}.attempts"), r.attempts, 1, 0, 5)? as u32,
        budget_ratio: v.float(
            &format!("{rp}.budget_percent"),
            r.budget_percent,
            20.0,
            0.0,
            100.0,
        )? / 100.0,
        min_retries_per_second: v.int(
            &format!("{rp}.min_retries_per_second"),
            r.min_retries_per_second,
            10,
            0,
            100_000,
        )? as u32,
    };

    let h = c.hedge.unwrap_or_default();
    let hp = format!("{p}: hedge");
    let hedge = HedgeConfig {
        enabled: h.enabled.unwrap_or(false),
        delay: match h.delay.as_deref() {
            None | Some("p95") => None,
            Some(d) => Some(v.positive_duration(
                &format!("{hp}.delay"),
                Some(&d.to_string()),
                Duration::ZERO,
            )?),
        },
        budget_ratio: v.float(
            &format!("{hp}.budget_percent"),
            h.budget_percent,
            5.0,
            0.0,
            100.0,
        )? / 100.0,
    };

    if c.endpoint.is_empty() {
        return Err(v.err(
            format!("{p}: endpoint"),
            "at least one [[cluster.endpoint]] is needed",
        ));
    }
    let mut endpoints = Vec::with_capacity(c.endpoint.len());
    let mut seen = HashSet::new();
    for (ei, e) in c.endpoint.into_iter().enumerate() {
        let ep = format!("{p} endpoint {}", ei + 1);
        let address = match (e.address, e.srv) {
            (Some(a), None) => parse_endpoint_address(&a).map_err(|pr| v.err(&ep, pr))?,
            (None, Some(s)) => {
                if !valid_dns_name(&s) {
                    return Err(v.err(format!("{ep}: srv"), format!("{s:?} is not a DNS name")));
                }
                EndpointAddress::Srv { name: s }
            }
            (Some(_), Some(_)) => return Err(v.err(&ep, "give either address or srv, not both")),
            (None, None) => return Err(v.err(format!("{ep}: address"), "missing")),
        };
        if !seen.insert(address.clone()) {
            return Err(v.err(
                format!("{ep}: address"),
                format!("duplicate endpoint {address}"),
            ));
        }
        v.name(&format!("{ep}: region"), &e.region)?;
        v.name(&format!("{ep}: zone"), &e.zone)?;
        endpoints.push(EndpointConfig {
            address,
            region: e.region,
            zone: e.zone,
            weight: v.int(&format!("{ep}: weight"), e.weight, 100, 0, 1000)? as u32,
        });
    }
    // A dial for a region with no endpoint is a typo, not a no-op.
    for region in traffic_dial.keys() {
        if !endpoints.iter().any(|e| &e.region == region) {
            return Err(v.err(
                format!("{p}: traffic_dial.{region}"),
                format!("no endpoint of this cluster is in region {region:?}"),
            ));
        }
    }
    // A zone name means one place: the same zone cannot sit in two regions.
    let mut zone_region: BTreeMap<&str, &str> = BTreeMap::new();
    for (ei, e) in endpoints.iter().enumerate() {
        if let Some(r) = zone_region.insert(&e.zone, &e.region) {
            if r != e.region {
                return Err(v.err(
                    format!("{p} endpoint {}: zone", ei + 1),
                    format!("zone {:?} is already in region {r:?}", e.zone),
                ));
            }
        }
    }

    let dns_min_ttl = v.positive_duration(
        &format!("{p}: dns_min_ttl"),
        c.dns_min_ttl.as_ref(),
        Duration::from_secs(1),
    )?;
    let dns_max_ttl = v.positive_duration(
        &format!("{p}: dns_max_ttl"),
        c.dns_max_ttl.as_ref(),
        Duration::from_secs(300),
    )?;
    if dns_max_ttl < dns_min_ttl {
        return Err(v.err(
            format!("{p}: dns_max_ttl"),
            "must not be less than dns_min_ttl",
        ));
    }

    Ok(ClusterConfig {
        name: c.name,
        traffic_dial,
        dial_fallback: c.dial_fallback.unwrap_or(true),
        affinity,
        tls,
        http2: c.http2.unwrap_or(false),
        dns_min_ttl,
        dns_max_ttl,
        connect_timeout: v.positive_duration(
            &format!("{p}: connect_timeout"),
            c.connect_timeout.as_ref(),
            Duration::from_secs(1),
        )?,
        max_requests_per_endpoint: v.int(
            &format!("{p}: max_requests_per_endpoint"),
            c.max_requests_per_endpoint,
            1024,
            1,
            1_000_000,
        )? as u32,
        overprovisioning_factor: v.float(
            &format!("{p}: overprovisioning_factor"),
            c.overprovisioning_factor,
            1.4,
            1.0,
            10.0,
        )?,
        health_check,
        outlier,
        retry,
        hedge,
        endpoints,
    })
}

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
        format!(
            "{}: ok: {} cluster(s), {} endpoint(s) in {} zone(s), {} route(s); listener {}, admin {}, locality {}/{}",
            self.source,
            self.clusters.len(),
            endpoints,
            zones.len(),
            self.routes.len(),
            self.listener.address,
            self.admin.address,
            self.locality.region,
            self.locality.zone
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[listener]
address = "127.0.0.1:8080"
[admin]
address = "127.0.0.1:9901"
[locality]
region = "us-east-1"
zone = "us-east-1a"
[[cluster]]
name = "api"
[cluster.health_check]
path = "/healthz"
interval = "1s"
timeout = "500ms"
healthy_threshold = 2
unhealthy_threshold = 2
[[cluster.endpoint]]
address = "127.0.0.1:9001"
region = "us-east-1"
zone = "us-east-1a"
[[route]]
path_prefix = "/"
cluster = "api"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_err(text: &str) -> String {
        match parse("edge.toml", text, &no_env) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn good_config_parses() {
        let c = parse("edge.toml", GOOD, &no_env).expect("valid");
        assert_eq!(c.clusters[0].health_check.interval, Duration::from_secs(1));
        assert_eq!(c.clusters[0].endpoints[0].weight, 100);
        assert!(c.summary().contains("1 cluster(s)"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }

    #[test]
    fn the_spec_example_error() {
        let text = GOOD.replace("127.0.0.1:9001", "10.0.0.1");
        assert_eq!(
            parse_err(&text),
            "edge.toml: cluster \"api\" endpoint 1: address \"10.0.0.1\": missing port"
        );
    }

    #[test]
    fn env_expansion() {
        let text = GOOD.replace(
            "zone = \"us-east-1a\"\n[[cluster]]",
            "zone = \"${EDGE_ZONE}\"\n[[cluster]]",
        );
        let env = |n: &str| (n == "EDGE_ZONE").then(|| "eu-west-1b".to_string());
        let c = parse("edge.toml", &text, &env).expect("valid");
        assert_eq!(c.locality.zone, "eu-west-1b");
        let e = parse_err(&text);
        assert!(
            e.contains("environment variable EDGE_ZONE is not set"),
            "{e}"
        );
        assert!(e.starts_with("edge.toml: line "), "{e}");
        let d = text.replace("${EDGE_ZONE}", "${EDGE_ZONE:-z1}");
        assert_eq!(
            parse("edge.toml", &d, &no_env)
                .expect("valid")
                .locality
                .zone,
            "z1"
        );
    }

    #[test]
    fn dns_keys() {
        let c = parse("edge.toml", GOOD, &no_env).expect("valid");
        assert_eq!(c.dns.nameserver, None);
        assert_eq!(c.clusters[0].dns_min_ttl, Duration::from_secs(1));
        assert_eq!(c.clusters[0].dns_max_ttl, Duration::from_secs(300));
        let text = GOOD
            .replace(
                "[[cluster]]\nname = \"api\"",
                "[dns]\nnameserver = \"127.0.0.1:5353\"\n[[cluster]]\nname = \"api\"\ndns_min_ttl = \"200ms\"\ndns_max_ttl = \"30s\"",
            )
            .replace("127.0.0.1:9001", "api.default.svc.cluster.local:8080");
        let c = parse("edge.toml", &text, &no_env).expect("valid");
        assert_eq!(c.dns.nameserver, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(c.clusters[0].dns_min_ttl, Duration::from_millis(200));
        assert_eq!(c.clusters[0].dns_max_ttl, Duration::from_secs(30));
        assert_eq!(
            c.clusters[0].endpoints[0].address,
            EndpointAddress::Dns {
                host: "api.default.svc.cluster.local".into(),
                port: 8080
            }
        );
        let e = parse_err(&text.replace("\"30s\"", "\"100ms\""));
        assert_eq!(
            e,
            "edge.toml: cluster \"api\": dns_max_ttl: must not be less than dns_min_ttl"
        );
        let e = parse_err(&text.replace("127.0.0.1:5353", "dns.local:53"));
        assert!(e.starts_with("edge.toml: dns.nameserver: "), "{e}");
        let e = parse_err(&text.replace("127.0.0.1:5353", "127.0.0.1"));
        assert!(e.contains("missing port"), "{e}");
    }
}
