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
