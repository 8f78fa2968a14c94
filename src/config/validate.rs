//! From the raw file to the typed config: every value checked, every error naming its key.

use super::*;
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

mod listeners;
mod routes;
mod warnings;
pub use listeners::DEFAULT_NAME as DEFAULT_LISTENER_NAME;
use routes::{actions, host_match, redirect};

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
            line: None,
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

pub(super) fn validate(file: &str, raw: raw::File) -> Result<Config, ConfigError> {
    let v = V { file };

    let short_form = !matches!(raw.listener, Some(toml::Value::Array(_)));
    let (listener, listeners) = listeners::validate_listeners(&v, raw.listener)?;

    let admin_addr = raw
        .admin
        .unwrap_or_default()
        .address
        .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    let admin = AdminConfig {
        address: parse_listen_address(&admin_addr).map_err(|p| v.err("admin.address", p))?,
    };
    if let Some(l) = listeners
        .iter()
        .find(|l| l.address == admin.address && admin.address.port() != 0)
    {
        return Err(v.err(
            "admin.address",
            format!("must differ from the address of listener {:?}", l.name),
        ));
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
            Duration::from_millis(500),
        )?,
        cross_region_margin: v.duration(
            "routing.cross_region_margin",
            rr.cross_region_margin.as_ref(),
            Duration::from_millis(1),
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

    listeners::check_listener_clusters(&v, &listeners, short_form, &names)?;
    let any_http = listeners.iter().any(|l| l.protocol.is_http());
    if raw.route.is_empty() && any_http {
        return Err(v.err(
            "route",
            "at least one [[route]] is needed for the http/https listener(s)",
        ));
    }
    let mut routes = Vec::with_capacity(raw.route.len());
    for (ri, mut r) in raw.route.into_iter().enumerate() {
        let p = format!("route {}", ri + 1);
        let acts = actions(&v, &p, &mut r)?;
        let named = match r.listener {
            None => Vec::new(),
            Some(raw::OneOrMany::One(n)) => vec![n],
            Some(raw::OneOrMany::Many(ns)) => {
                if ns.is_empty() {
                    return Err(v.err(format!("{p}: listener"), "an empty list matches nothing"));
                }
                ns
            }
        };
        for n in &named {
            match listeners.iter().find(|l| &l.name == n) {
                None => {
                    return Err(v.err(
                        format!("{p}: listener"),
                        format!("listener {n:?} is not defined"),
                    ))
                }
                Some(l) if !l.protocol.is_http() => {
                    return Err(v.err(
                        format!("{p}: listener"),
                        format!(
                            "listener {n:?} is a {} listener; routes belong to http and https listeners",
                            l.protocol.as_str()
                        ),
                    ))
                }
                Some(_) => {}
            }
        }
        if !any_http {
            return Err(v.err(&p, "there is no http or https listener for this route"));
        }
        let action = match (r.cluster, r.redirect) {
            (Some(c), None) => {
                if !names.contains(&c) {
                    return Err(v.err(format!("{p}: cluster"), format!("no cluster named {c:?}")));
                }
                RouteAction::Cluster(c)
            }
            (None, Some(rd)) => RouteAction::Redirect(redirect(&v, &p, rd)?),
            (Some(_), Some(_)) => {
                return Err(v.err(&p, "a route either names a cluster or redirects, not both"))
            }
            (None, None) => {
                return Err(v.err(
                    format!("{p}: cluster"),
                    "missing: a route names a cluster or has a redirect",
                ))
            }
        };
        let path_prefix = r.path_prefix.unwrap_or_else(|| "/".to_string());
        if !path_prefix.starts_with('/') {
            return Err(v.err(
                format!("{p}: path_prefix"),
                format!("{path_prefix:?} must start with /"),
            ));
        }
        let host = match r.host {
            None => None,
            Some(h) => Some(host_match(&h).map_err(|pr| v.err(format!("{p}: host"), pr))?),
        };
        routes.push(RouteConfig {
            listeners: named,
            host,
            path_prefix,
            action,
            timeout: v.positive_duration(
                &format!("{p}: timeout"),
                r.timeout.as_ref(),
                Duration::from_secs(30),
            )?,
            hedge: r.hedge,
            rewrite_prefix: acts.rewrite_prefix,
            request_headers: acts.request_headers,
            response_headers: acts.response_headers,
        });
    }

    // PROXY headers go out on TCP connections: tcp and tls_passthrough listeners, and plain
    // HTTP/1.1 upstream connections of http routes (a connection per client, never shared).
    for c in clusters.iter().filter(|c| c.send_proxy_protocol.is_some()) {
        let by_route = routes.iter().any(|r| r.cluster() == Some(c.name.as_str()));
        let by_udp = listeners
            .iter()
            .any(|l| matches!(&l.protocol, Protocol::Udp { cluster, .. } if cluster == &c.name));
        let why = if by_udp {
            Some("is sent on TCP connections; this cluster is used by a udp listener")
        } else if by_route && (c.tls.is_some() || c.http2) {
            Some("is sent to HTTP/1.1 upstreams without tls; this cluster is used by an http route and has tls or http2")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(v.err(format!("cluster {:?}: send_proxy_protocol", c.name), why));
        }
    }

    let warnings = warnings::warnings(file, &clusters, &routes);
    Ok(Config {
        warnings,
        source: file.to_string(),
        listener,
        listeners,
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
        port: match hc.port {
            None => None,
            Some(n) => Some(v.int(&format!("{hp}.port"), Some(n), 0, 1, 65_535)? as u16),
        },
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
        send_proxy_protocol: match c.send_proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(ProxyVersion::V1),
            Some("v2") => Some(ProxyVersion::V2),
            Some(other) => {
                return Err(v.err(
                    format!("{p}: send_proxy_protocol"),
                    format!("{other:?} is not \"v1\" or \"v2\""),
                ))
            }
        },
        endpoints,
    })
}
