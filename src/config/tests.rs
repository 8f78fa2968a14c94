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
        "edge.toml: cluster \"api\" endpoint 1: address \"10.0.0.1\": missing port (line 17)"
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
        "edge.toml: cluster \"api\": dns_max_ttl: must not be less than dns_min_ttl (line 14)"
    );
    let e = parse_err(&text.replace("127.0.0.1:5353", "dns.local:53"));
    assert!(e.starts_with("edge.toml: dns.nameserver: "), "{e}");
    let e = parse_err(&text.replace("127.0.0.1:5353", "127.0.0.1"));
    assert!(e.contains("missing port"), "{e}");
}

#[test]
fn routing_margins() {
    let c = parse("edge.toml", GOOD, &no_env).expect("valid");
    assert_eq!(c.routing.cross_region_margin, Duration::from_millis(1));
    assert_eq!(c.routing.rank_hold, Duration::from_millis(500));
    let text = format!("{GOOD}\n[routing]\ncross_region_margin = \"15ms\"\n");
    let c = parse("edge.toml", &text, &no_env).expect("valid");
    assert_eq!(c.routing.cross_region_margin, Duration::from_millis(15));
    let e = parse_err(&format!(
        "{GOOD}\n[routing]\ncross_region_margin = \"lots\"\n"
    ));
    assert!(
        e.contains("edge.toml") && e.contains("routing.cross_region_margin"),
        "{e}"
    );
}

const BASE: &str = r#"
[locality]
region = "us-east-1"
zone = "us-east-1a"
[[cluster]]
name = "db"
send_proxy_protocol = "v2"
[cluster.health_check]
port = 9100
[[cluster.endpoint]]
address = "127.0.0.1:5432"
region = "us-east-1"
zone = "us-east-1a"
"#;

#[test]
fn trusted_networks_match_peers_in_canonical_form() {
    let text = format!(
        "[[listener]]\nname = \"t\"\naddress = \"127.0.0.1:5433\"\nprotocol = \"tcp\"\ncluster = \"db\"\nproxy_protocol = {{ trusted = [\"::ffff:192.0.2.0/120\", \" ::ffff:10.0.0.5 \", \"172.16.5.9/12\", \"2001:db8::/32\"] }}\n{BASE}"
    );
    let c = parse("edge.toml", &text, &no_env).expect("valid");
    let nets = c.listeners[0].proxy_protocol.clone().expect("trusted");
    // The listener compares `peer.ip().to_canonical()`: mapped entries must be IPv4.
    let trusted = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().expect("ip");
        nets.iter().any(|n| n.contains(&ip.to_canonical()))
    };
    assert!(trusted("192.0.2.55"));
    assert!(trusted("::ffff:192.0.2.55"));
    assert!(!trusted("192.0.3.1"));
    assert!(trusted("10.0.0.5"));
    assert!(!trusted("10.0.0.6"));
    // Host bits are ignored: 172.16.5.9/12 is 172.16.0.0/12.
    assert!(trusted("172.31.255.255"));
    assert!(trusted("2001:db8:ffff::1"));
    assert!(!trusted("2001:db9::1"));
}

#[test]
fn several_listeners_of_every_protocol() {
    let text = format!(
        r#"
[[listener]]
name = "web"
address = "127.0.0.1:8080"
protocol = "http"
proxy_protocol = {{ trusted = ["10.0.0.0/8", "127.0.0.1"] }}
access_log = false
[[listener]]
name = "web-tls"
address = "127.0.0.1:8443"
protocol = "https"
tls = {{ cert = "a.pem", key = "a.key" }}
access_log = false
[[listener]]
name = "db"
address = "127.0.0.1:5433"
protocol = "tcp"
cluster = "db"
idle_timeout = "5m"
[[listener]]
name = "pass"
address = "127.0.0.1:9443"
protocol = "tls_passthrough"
sni = [ {{ host = "a.example.com", cluster = "db" }}, {{ host = "*.example.com", cluster = "db" }} ]
default_cluster = "db"
[[listener]]
name = "dns"
address = "127.0.0.1:5353"
protocol = "udp"
cluster = "api"
flow_idle_timeout = "10s"
{BASE}
[[cluster]]
name = "api"
[[cluster.endpoint]]
address = "127.0.0.1:9001"
region = "us-east-1"
zone = "us-east-1a"
[[route]]
listener = "web"
redirect = {{ scheme = "https", code = 308 }}
[[route]]
listener = ["web-tls"]
cluster = "api"
"#
    );
    let c = parse("edge.toml", &text, &no_env).expect("valid");
    assert_eq!(c.listeners.len(), 5);
    assert!(!c.listener.access_log);
    assert_eq!(
        c.listeners[0].proxy_protocol.as_ref().map(Vec::len),
        Some(2)
    );
    assert!(matches!(
        c.listeners[4].protocol,
        Protocol::Udp {
            max_flows: 10_000,
            ..
        }
    ));
    assert_eq!(c.clusters[0].send_proxy_protocol, Some(ProxyVersion::V2));
    assert_eq!(c.clusters[0].health_check.port, Some(9100));
    assert!(matches!(
        &c.routes[0].action,
        RouteAction::Redirect(Redirect {
            code: 308,
            port: None,
            ..
        })
    ));
    assert_eq!(c.routes[1].listeners, vec!["web-tls".to_string()]);
    assert!(c.summary().contains("5 listener(s)"), "{}", c.summary());
}

#[test]
fn routes_may_be_absent_without_an_http_listener() {
    let text = format!(
        "[listener]\nname = \"db\"\naddress = \"127.0.0.1:5433\"\nprotocol = \"tcp\"\ncluster = \"db\"\n{BASE}"
    );
    let c = parse("edge.toml", &text, &no_env).expect("valid");
    assert!(c.routes.is_empty());
    assert_eq!(c.listeners[0].name, "db");
}

#[test]
fn listener_errors_name_the_key() {
    let l4 = |body: &str| format!("[[listener]]\n{body}\n{BASE}");
    let cases = [
        (
            l4("name = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"x\""),
            "listener \"db\": cluster: cluster \"x\" is not defined",
        ),
        (
            format!("[listener]\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"x\"\n{BASE}"),
            "listener.cluster: cluster \"x\" is not defined (line 4)",
        ),
        (
            l4("name = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\""),
            "listener \"db\": cluster: missing",
        ),
        (
            l4("name = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"sctp\""),
            "listener \"db\": protocol: \"sctp\" is not one of",
        ),
        (
            l4("name = \"u\"\naddress = \"127.0.0.1:1\"\nprotocol = \"udp\"\ncluster = \"db\"\nmax_flows = 0"),
            "listener \"u\": max_flows: 0 is out of range",
        ),
        (
            l4("name = \"p\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tls_passthrough\"\nsni = [{ host = \"a..b\", cluster = \"db\" }]"),
            "listener \"p\": sni 1: host:",
        ),
        (
            l4("name = \"p\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\"\nproxy_protocol = { trusted = [\"10.0.0.0/33\"] }"),
            "listener \"p\": proxy_protocol.trusted 1:",
        ),
        (
            l4("name = \"p\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\"\nproxy_protocol = { trusted = [] }"),
            "listener \"p\": proxy_protocol.trusted: empty",
        ),
        (
            l4("name = \"w\"\naddress = \"127.0.0.1:1\"\nprotocol = \"https\""),
            "listener \"w\": tls: missing",
        ),
        (
            l4("name = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\"\nroute_header = true"),
            "listener \"db\": route_header: applies to http and https listeners",
        ),
        (
            l4("address = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\""),
            "listener 1: name: missing",
        ),
        (
            l4("name = \"db\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\"\nbogus = 1"),
            "listener 1: bogus: unknown field `bogus`",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"tcp\"\ncluster = \"db\"\n[[listener]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\nprotocol = \"tcp\"\ncluster = \"db\""),
            "listener \"a\": name: duplicate listener name",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\naccess_log = true\n[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:2\"\naccess_log = false"),
            "listener \"b\": access_log: differs from listener \"a\"",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\n[[route]]\nlistener = \"nope\"\ncluster = \"db\""),
            "route 1: listener: listener \"nope\" is not defined",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\n[[route]]\nredirect = { code = 200 }"),
            "route 1: redirect.code: 200 is not a redirect status",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\"\n[[route]]\ncluster = \"db\"\nredirect = {}"),
            "route 1: a route either names a cluster or redirects",
        ),
        (
            l4("name = \"a\"\naddress = \"127.0.0.1:1\"\nprotocol = \"http\""),
            "route: at least one [[route]] is needed",
        ),
    ];
    for (text, want) in cases {
        let e = parse_err(&text);
        assert!(e.contains(want), "want {want:?} in {e:?}");
        assert!(e.starts_with("edge.toml: "), "{e}");
    }
    let bad = BASE.replace(
        "send_proxy_protocol = \"v2\"",
        "send_proxy_protocol = \"v3\"",
    );
    let e = parse_err(&format!(
        "[listener]\nprotocol = \"tcp\"\ncluster = \"db\"\n{bad}"
    ));
    assert!(
        e.contains("cluster \"db\": send_proxy_protocol: \"v3\""),
        "{e}"
    );
}

#[test]
fn send_proxy_protocol_is_refused_where_it_is_not_sent() {
    let http = |extra: &str| {
        format!(
            "[listener]\naddress = \"127.0.0.1:8080\"\n{}\n[[route]]\ncluster = \"db\"\n",
            BASE.replace(
                "send_proxy_protocol = \"v2\"",
                &format!("send_proxy_protocol = \"v2\"\n{extra}")
            )
        )
    };
    let c = parse("edge.toml", &http(""), &no_env).expect("plain HTTP/1.1 clusters send it");
    assert_eq!(c.clusters[0].send_proxy_protocol, Some(ProxyVersion::V2));
    for extra in ["http2 = true", "tls = { sni = \"db.example.com\" }"] {
        let e = parse_err(&http(extra));
        assert!(
            e.contains("cluster \"db\": send_proxy_protocol: is sent to HTTP/1.1 upstreams without tls; this cluster is used by an http route and has tls or http2"),
            "{extra}: {e}"
        );
    }
    let udp = format!(
        "[listener]\naddress = \"127.0.0.1:53\"\nprotocol = \"udp\"\ncluster = \"db\"\n{BASE}"
    );
    let e = parse_err(&udp);
    assert!(
        e.contains("cluster \"db\": send_proxy_protocol: is sent on TCP connections; this cluster is used by a udp listener"),
        "{e}"
    );
}

#[test]
fn the_example_files_parse() {
    for (name, text) in [
        (
            "edge-router.toml",
            include_str!("../../config/edge-router.toml"),
        ),
        (
            "global-accelerator.toml",
            include_str!("../../config/global-accelerator.toml"),
        ),
    ] {
        if let Err(e) = parse(name, text, &no_env) {
            panic!("{e}");
        }
    }
}

#[test]
fn access_log_path() {
    let with = |v: &str| {
        GOOD.replace(
            "address = \"127.0.0.1:8080\"",
            &format!("address = \"127.0.0.1:8080\"\naccess_log_path = {v:?}"),
        )
    };
    let c = parse("edge.toml", GOOD, &no_env).expect("valid");
    assert_eq!(c.listener.access_log_path, None);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("access.log");
    let c = parse("edge.toml", &with(&file.display().to_string()), &no_env).expect("valid");
    assert_eq!(c.listener.access_log_path.as_deref(), Some(file.as_path()));
    let e = parse_err(&with(""));
    assert!(
        e.starts_with("edge.toml: listener.access_log_path: must not be empty"),
        "{e}"
    );
    let e = parse_err(&with(&dir.path().display().to_string()));
    assert!(
        e.contains("listener.access_log_path") && e.contains("is a directory"),
        "{e}"
    );
    let missing = dir.path().join("nope").join("access.log");
    let e = parse_err(&with(&missing.display().to_string()));
    assert!(
        e.contains("listener.access_log_path") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn a_bare_number_for_a_duration_says_how_to_write_one() {
    let e = parse_err(&GOOD.replace("interval = \"1s\"", "interval = 1"));
    assert!(e.contains("interval") && e.contains("write \"1s\""), "{e}");
    // Not for keys that are not durations.
    let e = parse_err(&GOOD.replace("address = \"127.0.0.1:8080\"", "address = 5"));
    assert!(!e.contains("write \"1s\""), "{e}");
}

#[test]
fn likely_mistakes_are_warnings_naming_the_key() {
    let c = parse("edge.toml", GOOD, &no_env).expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    let slow = GOOD.replace("timeout = \"500ms\"", "timeout = \"5s\"");
    let c = parse("edge.toml", &slow, &no_env).expect("valid");
    assert!(
        c.warnings.iter().any(|w| w.to_string()
            == "edge.toml: cluster \"api\": health_check.timeout: 5s is longer than \
                    health_check.interval (1s): a probe may still be waiting when the next starts \
                    (line 14)"),
        "{:?}",
        c.warnings
    );
    let twice = format!("{GOOD}\n[[route]]\npath_prefix = \"/\"\ncluster = \"api\"\n");
    let c = parse("edge.toml", &twice, &no_env).expect("valid");
    assert!(
        c.warnings.iter().any(|w| w.to_string()
            == "edge.toml: route 2: matches exactly what route 1 matches, so it never applies (line 25)"),
        "{:?}",
        c.warnings
    );
    let slash = format!(
        "{GOOD}\n[[route]]\npath_prefix = \"/api/\"\nrewrite_prefix = \"/v2\"\ncluster = \"api\"\n"
    );
    let c = parse("edge.toml", &slash, &no_env).expect("valid");
    assert!(
        c.warnings.iter().any(|w| w.to_string()
            == "edge.toml: route 2: rewrite_prefix: \"/v2\" and path_prefix \"/api/\" differ in \
                their trailing /: the rest of the path is joined as written (line 27)"),
        "{:?}",
        c.warnings
    );
    let same = slash.replace("\"/v2\"", "\"/v2/\"");
    let c = parse("edge.toml", &same, &no_env).expect("valid");
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// A type error serde finds and a value validation refuses name their place the same way:
/// the table by name or 1-based position, then the key, then the line.
#[test]
fn one_index_style_in_every_message() {
    let weight = |w: &str| {
        GOOD.replacen(
            "\"127.0.0.1:9001\"\n",
            &format!("\"127.0.0.1:9001\"\nweight = {w}\n"),
            1,
        )
    };
    let typed = parse_err(&weight("\"heavy\""));
    let ranged = parse_err(&weight("5000"));
    let line = GOOD
        .lines()
        .position(|l| l.contains("127.0.0.1:9001"))
        .map(|i| i + 2);
    let tail = format!("(line {})", line.unwrap_or(0));
    for e in [&typed, &ranged] {
        assert!(
            e.starts_with("edge.toml: cluster \"api\" endpoint 1: weight: "),
            "{e}"
        );
        assert!(e.ends_with(&tail), "{e} should end with {tail}");
        assert!(!e.contains('['), "no 0-based brackets: {e}");
    }
    let route = parse_err(&GOOD.replace("cluster = \"api\"", "cluster = 7"));
    assert!(
        route.starts_with("edge.toml: route 1: cluster: "),
        "{route}"
    );
}

#[test]
fn route_actions_are_parsed_and_bad_ones_name_their_key() {
    let http = |route: &str| {
        format!(
            "[listener]\naddress = \"127.0.0.1:8080\"\n{}\n[[route]]\ncluster = \"db\"\n{route}\n",
            BASE.replace("send_proxy_protocol = \"v2\"\n", "")
        )
    };
    let c = parse(
        "edge.toml",
        &http("path_prefix = \"/api/\"\nrewrite_prefix = \"/v2/\"\nrequest_headers = { add = { \"X-A\" = \"1\" }, set = { \"x-b\" = \"two words\" }, remove = [\"x-c\"] }\nresponse_headers = { remove = [\"server\"] }"),
        &no_env,
    )
    .expect("valid");
    let r = &c.routes[0];
    assert_eq!(r.rewrite_prefix.as_deref(), Some("/v2/"));
    assert_eq!(
        r.request_headers.add[0].0.as_str(),
        "x-a",
        "names are lower-cased"
    );
    assert_eq!(r.request_headers.set[0].1, "two words");
    assert_eq!(r.request_headers.remove[0].as_str(), "x-c");
    assert_eq!(r.response_headers.remove[0].as_str(), "server");
    assert!(r.response_headers.add.is_empty());

    let cases = [
        ("request_headers = { add = { \"x a\" = \"1\" } }", "route 1: request_headers.add.\"x a\": \"x a\" is not a valid header name"),
        ("request_headers = { set = { \"x-a\" = \"bad\\nvalue\" } }", "route 1: request_headers.set.\"x-a\": \"bad\\nvalue\" is not a valid header value"),
        ("request_headers = { add = { \"x-a\" = \" padded\" } }", "route 1: request_headers.add.\"x-a\": \" padded\" is not a valid header value"),
        ("request_headers = { add = { \"Host\" = \"a\" } }", "route 1: request_headers.add.\"Host\": \"Host\" may not be changed by a route: it is what the request was routed on"),
        ("response_headers = { remove = [\"x-a\", \"Content-Length\"] }", "route 1: response_headers.remove 2: \"Content-Length\" may not be changed by a route: it frames the body"),
        ("request_headers = { remove = [\"connection\"] }", "route 1: request_headers.remove 1: \"connection\" may not be changed by a route: it is hop-by-hop"),
        ("response_headers = { set = { \"transfer-encoding\" = \"chunked\" } }", "may not be changed by a route: it frames the body"),
        ("request_headers = { set = { \"x-forwarded-for\" = \"1.2.3.4\" } }", "is written by the router itself"),
        ("request_headers = { remove = [\"x-a\"], add = { \"x-a\" = \"1\" } }", "route 1: request_headers.add.\"x-a\": is also removed or set"),
        ("response_headers = { set = { \"X-Env\" = \"a\", \"x-env\" = \"b\" } }", "route 1: response_headers.set.\"x-env\": is set twice (header names ignore case)"),
        ("request_headers = { append = { \"x-a\" = \"1\" } }", "unknown field `append`"),
        ("rewrite_prefix = \"v2\"", "route 1: rewrite_prefix: \"v2\" must be empty or a path starting with /"),
        ("rewrite_prefix = \"/a b\"", "route 1: rewrite_prefix:"),
        ("rewrite_prefix = \"/a?b\"", "route 1: rewrite_prefix:"),
    ];
    for (route, want) in cases {
        let e = parse_err(&http(route));
        assert!(e.contains(want), "want {want:?} in {e:?}");
    }
    let redirect = format!(
        "[listener]\naddress = \"127.0.0.1:8080\"\n{BASE}\n[[route]]\nredirect = {{ scheme = \"https\" }}\nresponse_headers = {{ add = {{ \"x-a\" = \"1\" }} }}\n"
    );
    let e = parse_err(&redirect);
    assert!(
        e.contains("route 1: response_headers: a redirect route forwards nothing"),
        "{e}"
    );
}
