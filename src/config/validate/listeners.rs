//! `[listener]` / `[[listener]]`: the front doors and the HTTP settings they share.

use super::*;

/// The short form's listener name.
pub const DEFAULT_NAME: &str = "default";

fn raw_listener(v: &V, key: &str, value: toml::Value) -> Result<raw::Listener, ConfigError> {
    serde_path_to_error::deserialize::<_, raw::Listener>(value).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = msg.lines().next().unwrap_or("invalid").to_string();
        let msg = crate::config::duration_hint(&path, msg);
        if path.is_empty() || path == "." {
            v.err(key, msg)
        } else if key == "listener" {
            // The short form's keys read as everywhere else in the file: listener.address.
            v.err(format!("{key}.{path}"), msg)
        } else {
            v.err(format!("{key}: {path}"), msg)
        }
    })
}

/// A setting shared by every listener: where it was set first, and its value.
struct Shared<T> {
    value: Option<(String, T)>,
}

impl<T: PartialEq + Clone> Shared<T> {
    fn new() -> Self {
        Shared { value: None }
    }

    fn set(&mut self, v: &V, key: &str, owner: &str, x: Option<T>) -> Result<(), ConfigError> {
        let Some(x) = x else { return Ok(()) };
        match &self.value {
            Some((first, old)) if *old != x => Err(v.err(
                format!("{owner}: {key}"),
                format!("differs from {first}; this setting applies to every listener"),
            )),
            Some(_) => Ok(()),
            None => {
                self.value = Some((owner.to_string(), x));
                Ok(())
            }
        }
    }

    fn get(&self) -> Option<&T> {
        self.value.as_ref().map(|(_, x)| x)
    }
}

/// Reads the listener tables into the shared HTTP settings and the list of listeners.
/// Cluster names are checked later, once clusters are known.
pub(super) fn validate_listeners(
    v: &V,
    value: Option<toml::Value>,
) -> Result<(ListenerConfig, Vec<ListenerSpec>), ConfigError> {
    let (tables, short) = match value {
        None => (vec![raw::Listener::default()], true),
        Some(t @ toml::Value::Table(_)) => (vec![raw_listener(v, "listener", t)?], true),
        Some(toml::Value::Array(items)) => {
            let mut tables = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                tables.push(raw_listener(v, &format!("listener {}", i + 1), item)?);
            }
            (tables, false)
        }
        Some(_) => return Err(v.err("listener", "must be a table or an array of tables")),
    };
    if tables.is_empty() {
        return Err(v.err("listener", "at least one [[listener]] is needed"));
    }

    let mut route_header = Shared::new();
    let mut access_log = Shared::new();
    let mut access_log_path = Shared::new();
    let mut max_connections = Shared::new();
    let mut header_read_timeout = Shared::new();
    let mut max_header_bytes = Shared::new();
    let mut http_idle = Shared::new();
    let mut drain_timeout = Shared::new();
    let mut max_streams = Shared::new();
    let mut engine = Shared::new();

    let mut specs: Vec<ListenerSpec> = Vec::with_capacity(tables.len());
    for (i, l) in tables.into_iter().enumerate() {
        let name = match (&l.name, short) {
            (Some(n), _) => n.clone(),
            (None, true) => DEFAULT_NAME.to_string(),
            (None, false) => {
                return Err(v.err(format!("listener {}: name", i + 1), "missing"));
            }
        };
        // The short form names its keys "listener.address", as SPEC's examples do.
        let (p, dot) = if short {
            ("listener".to_string(), ".")
        } else {
            (format!("listener {name:?}"), ": ")
        };
        let key = |k: &str| format!("{p}{dot}{k}");
        v.name(&key("name"), &name)?;
        if specs.iter().any(|s| s.name == name) {
            return Err(v.err(key("name"), "duplicate listener name"));
        }
        let address = match (&l.address, short) {
            (Some(a), _) => parse_listen_address(a).map_err(|pr| v.err(key("address"), pr))?,
            (None, true) => {
                parse_listen_address(DEFAULT_LISTENER).map_err(|pr| v.err(key("address"), pr))?
            }
            (None, false) => return Err(v.err(key("address"), "missing")),
        };
        // udp and tcp ports are separate: DNS serves both on 53.
        let udp = l.protocol.as_deref() == Some("udp");
        if let Some(other) = specs.iter().find(|s| {
            s.address == address
                && address.port() != 0
                && matches!(s.protocol, Protocol::Udp { .. }) == udp
        }) {
            return Err(v.err(
                key("address"),
                format!("{address} is already used by listener {:?}", other.name),
            ));
        }
        let protocol_name = match (&l.protocol, &l.tls) {
            (Some(p), _) => p.clone(),
            (None, Some(_)) => "https".to_string(),
            (None, None) => "http".to_string(),
        };
        let is_http = protocol_name == "http" || protocol_name == "https";
        let l4_idle = |default: Duration| {
            v.positive_duration(&key("idle_timeout"), l.idle_timeout.as_ref(), default)
        };
        let l4_cluster = |what: &str| match &l.cluster {
            Some(c) => Ok(c.clone()),
            None => Err(v.err(
                key("cluster"),
                format!("missing: a {what} listener names one cluster"),
            )),
        };
        let protocol = match protocol_name.as_str() {
            "http" => {
                if l.tls.is_some() {
                    return Err(v.err(key("tls"), "an http listener has no tls (use protocol = \"https\")"));
                }
                Protocol::Http
            }
            "https" => match &l.tls {
                Some(t) => Protocol::Https(listener_tls(t)),
                None => return Err(v.err(key("tls"), "missing: an https listener needs tls = { cert, key }")),
            },
            "tcp" => Protocol::Tcp {
                cluster: l4_cluster("tcp")?,
                idle_timeout: l4_idle(Duration::from_secs(300))?,
            },
            "udp" => Protocol::Udp {
                cluster: l4_cluster("udp")?,
                flow_idle_timeout: v.positive_duration(
                    &key("flow_idle_timeout"),
                    l.flow_idle_timeout.as_ref(),
                    Duration::from_secs(30),
                )?,
                max_flows: v.int(&key("max_flows"), l.max_flows, 10_000, 1, 10_000_000)? as usize,
            },
            "tls_passthrough" => {
                let mut sni = Vec::new();
                for (si, r) in l.sni.iter().flatten().enumerate() {
                    let sk = key(&format!("sni {}: host", si + 1));
                    let host = host_match(&r.host).map_err(|pr| v.err(&sk, pr))?;
                    sni.push(SniRoute {
                        host,
                        cluster: r.cluster.clone(),
                    });
                }
                if sni.is_empty() && l.default_cluster.is_none() {
                    return Err(v.err(
                        key("sni"),
                        "missing: a tls_passthrough listener needs sni routes or a default_cluster",
                    ));
                }
                Protocol::TlsPassthrough {
                    sni,
                    default_cluster: l.default_cluster.clone(),
                    idle_timeout: l4_idle(Duration::from_secs(300))?,
                }
            }
            other => {
                return Err(v.err(
                    key("protocol"),
                    format!("{other:?} is not one of \"http\", \"https\", \"tcp\", \"tls_passthrough\", \"udp\""),
                ))
            }
        };
        // Keys that belong to other protocols are mistakes, not no-ops.
        let stray: [(&str, bool); 8] = [
            (
                "tls",
                l.tls.is_some() && !matches!(protocol, Protocol::Https(_)),
            ),
            (
                "cluster",
                l.cluster.is_some()
                    && !matches!(protocol, Protocol::Tcp { .. } | Protocol::Udp { .. }),
            ),
            (
                "sni",
                l.sni.is_some() && !matches!(protocol, Protocol::TlsPassthrough { .. }),
            ),
            (
                "default_cluster",
                l.default_cluster.is_some() && !matches!(protocol, Protocol::TlsPassthrough { .. }),
            ),
            (
                "flow_idle_timeout",
                l.flow_idle_timeout.is_some() && !matches!(protocol, Protocol::Udp { .. }),
            ),
            (
                "max_flows",
                l.max_flows.is_some() && !matches!(protocol, Protocol::Udp { .. }),
            ),
            (
                "idle_timeout",
                l.idle_timeout.is_some() && matches!(protocol, Protocol::Udp { .. }),
            ),
            (
                "proxy_protocol",
                l.proxy_protocol.is_some() && matches!(protocol, Protocol::Udp { .. }),
            ),
        ];
        if let Some((k, _)) = stray.iter().find(|(_, bad)| *bad) {
            return Err(v.err(
                key(k),
                format!("does not apply to a {} listener", protocol.as_str()),
            ));
        }
        let http_only: [(&str, bool); 6] = [
            ("route_header", l.route_header.is_some()),
            ("access_log", l.access_log.is_some()),
            ("header_read_timeout", l.header_read_timeout.is_some()),
            ("max_header_bytes", l.max_header_bytes.is_some()),
            ("max_concurrent_streams", l.max_concurrent_streams.is_some()),
            ("http1_engine", l.http1_engine.is_some()),
        ];
        if !is_http {
            if let Some((k, _)) = http_only.iter().find(|(_, set)| *set) {
                return Err(v.err(
                    key(k),
                    format!(
                        "applies to http and https listeners, not {}",
                        protocol.as_str()
                    ),
                ));
            }
        }
        let proxy_protocol = match &l.proxy_protocol {
            None => None,
            // No trusted source would refuse every PROXY header while requiring none: the
            // same as leaving proxy_protocol out, so surely not what was meant.
            Some(pp) if pp.trusted.is_empty() => {
                return Err(v.err(
                    key("proxy_protocol.trusted"),
                    "empty: name the balancers that send PROXY headers (CIDR ranges or addresses)",
                ));
            }
            Some(pp) => {
                let mut nets = Vec::with_capacity(pp.trusted.len());
                for (ti, t) in pp.trusted.iter().enumerate() {
                    let net = trusted_net(t.trim()).ok_or_else(|| {
                        v.err(
                            key(&format!("proxy_protocol.trusted {}", ti + 1)),
                            format!(
                                "{t:?} is not a CIDR range (like \"10.0.0.0/8\") or an IP address"
                            ),
                        )
                    })?;
                    nets.push(net);
                }
                Some(nets)
            }
        };

        let owner = if short {
            "listener".to_string()
        } else {
            format!("listener {name:?}")
        };
        route_header.set(v, "route_header", &owner, l.route_header)?;
        access_log.set(v, "access_log", &owner, l.access_log)?;
        access_log_path.set(v, "access_log_path", &owner, l.access_log_path.clone())?;
        max_connections.set(v, "max_connections", &owner, l.max_connections)?;
        header_read_timeout.set(
            v,
            "header_read_timeout",
            &owner,
            l.header_read_timeout.clone(),
        )?;
        max_header_bytes.set(v, "max_header_bytes", &owner, l.max_header_bytes)?;
        if is_http {
            http_idle.set(v, "idle_timeout", &owner, l.idle_timeout.clone())?;
        }
        drain_timeout.set(v, "drain_timeout", &owner, l.drain_timeout.clone())?;
        max_streams.set(
            v,
            "max_concurrent_streams",
            &owner,
            l.max_concurrent_streams,
        )?;
        engine.set(v, "http1_engine", &owner, l.http1_engine.clone())?;

        specs.push(ListenerSpec {
            name,
            address,
            protocol,
            proxy_protocol,
        });
    }

    let k = "listener";
    let shared = ListenerConfig {
        route_header: route_header.get().copied().unwrap_or(false),
        access_log: access_log.get().copied().unwrap_or(true),
        access_log_path: match access_log_path.get() {
            None => None,
            Some(p) => Some(access_log_path_of(v, p)?),
        },
        max_connections: v.int(
            &format!("{k}.max_connections"),
            max_connections.get().copied(),
            10_000,
            1,
            1_000_000,
        )? as usize,
        header_read_timeout: v.positive_duration(
            &format!("{k}.header_read_timeout"),
            header_read_timeout.get(),
            Duration::from_secs(10),
        )?,
        max_header_bytes: v.int(
            &format!("{k}.max_header_bytes"),
            max_header_bytes.get().copied(),
            64 * 1024,
            8192,
            1 << 20,
        )? as usize,
        idle_timeout: v.positive_duration(
            &format!("{k}.idle_timeout"),
            http_idle.get(),
            Duration::from_secs(60),
        )?,
        drain_timeout: v.duration(
            &format!("{k}.drain_timeout"),
            drain_timeout.get(),
            Duration::from_secs(30),
        )?,
        max_concurrent_streams: v.int(
            &format!("{k}.max_concurrent_streams"),
            max_streams.get().copied(),
            256,
            1,
            65_535,
        )? as u32,
        http1_engine: match engine.get().map(String::as_str) {
            None | Some("native") => Http1Engine::Native,
            Some("hyper") => Http1Engine::Hyper,
            Some(other) => {
                return Err(v.err(
                    format!("{k}.http1_engine"),
                    format!("\"{other}\" is not an engine (expected \"native\" or \"hyper\")"),
                ))
            }
        },
    };
    Ok((shared, specs))
}

fn listener_tls(t: &raw::Tls) -> ListenerTls {
    let mut certificates = vec![CertFiles {
        cert: PathBuf::from(&t.cert),
        key: PathBuf::from(&t.key),
    }];
    certificates.extend(t.sni.iter().map(|p| CertFiles {
        cert: PathBuf::from(&p.cert),
        key: PathBuf::from(&p.key),
    }));
    ListenerTls { certificates }
}

/// Every cluster a layer-4 listener names must exist.
pub(super) fn check_listener_clusters(
    v: &V,
    listeners: &[ListenerSpec],
    short_form: bool,
    clusters: &HashSet<String>,
) -> Result<(), ConfigError> {
    for l in listeners {
        // Named as every other key of the listener: `listener.cluster` in the short form.
        let (p, sep) = if short_form {
            ("listener".to_string(), ".")
        } else {
            (format!("listener {:?}", l.name), ": ")
        };
        let missing = |key: &str, c: &str| {
            v.err(
                format!("{p}{sep}{key}"),
                format!("cluster {c:?} is not defined"),
            )
        };
        match &l.protocol {
            Protocol::Tcp { cluster, .. } | Protocol::Udp { cluster, .. } => {
                if !clusters.contains(cluster) {
                    return Err(missing("cluster", cluster));
                }
            }
            Protocol::TlsPassthrough {
                sni,
                default_cluster,
                ..
            } => {
                for (i, r) in sni.iter().enumerate() {
                    if !clusters.contains(&r.cluster) {
                        return Err(missing(&format!("sni {}: cluster", i + 1), &r.cluster));
                    }
                }
                if let Some(c) = default_cluster {
                    if !clusters.contains(c) {
                        return Err(missing("default_cluster", c));
                    }
                }
            }
            Protocol::Http | Protocol::Https(_) => {}
        }
    }
    Ok(())
}

/// `listener.access_log_path`: a file (created when missing) in a directory that exists.
pub(super) fn access_log_path_of(v: &V<'_>, p: &str) -> Result<PathBuf, ConfigError> {
    let key = "listener.access_log_path";
    if p.trim().is_empty() {
        return Err(v.err(
            key,
            "must not be empty (leave the key out to log to stdout)",
        ));
    }
    let path = PathBuf::from(p);
    if p.ends_with('/') || path.is_dir() {
        return Err(v.err(key, format!("\"{p}\" is a directory, not a file")));
    }
    let parent = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !parent.is_dir() {
        return Err(v.err(
            key,
            format!("directory \"{}\" does not exist", parent.display()),
        ));
    }
    Ok(path)
}

/// A trusted network: a CIDR (host bits ignored) or one address. An IPv4-mapped IPv6 entry
/// (`::ffff:10.0.0.5`, as dual-stack logs write balancers) is stored as the IPv4 network it
/// denotes, since the listener compares peers in their canonical form.
fn trusted_net(text: &str) -> Option<ipnet::IpNet> {
    use ipnet::{IpNet, Ipv4Net};
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(text.parse::<std::net::IpAddr>().ok()?),
    }
    .trunc();
    if let IpNet::V6(v6) = net {
        if let Some(v4) = v6.addr().to_ipv4_mapped() {
            if v6.prefix_len() >= 96 {
                return Ipv4Net::new(v4, v6.prefix_len() - 96).ok().map(IpNet::V4);
            }
        }
    }
    Some(net)
}
