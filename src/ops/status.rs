//! `edge-router status`: the dashboard's picture in a terminal, for people on an edge host
//! over ssh. Reads `/routes` and `/events` of a running router's admin listener with a small
//! hyper client and prints clusters, zones ranked nearest first (latency, healthy x/y, share
//! of traffic and why, request rate), endpoints and the last events. `--watch` redraws.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

/// Clusters with more endpoints than this list only the endpoints that are not healthy.
pub const LIST_ENDPOINTS_UP_TO: usize = 60;
/// Events shown under the table.
pub const EVENTS_SHOWN: usize = 8;
const BAR: usize = 20;
const TIMEOUT: Duration = Duration::from_secs(3);

pub struct Options {
    /// host:port of the admin listener.
    pub admin: String,
    pub watch: bool,
    pub interval: Duration,
}

/// Accepts `host:port` or `http://host:port[/]`; returns `host:port`.
pub fn parse_admin(s: &str) -> Result<String, String> {
    let a = s.trim();
    let a = a.strip_prefix("http://").unwrap_or(a).trim_end_matches('/');
    if a.starts_with("https://") {
        return Err("the admin listener speaks plain HTTP: use host:port".into());
    }
    let auth: http::uri::Authority = a
        .parse()
        .map_err(|_| format!("{s:?} is not an address (like 127.0.0.1:9901)"))?;
    if auth.port_u16().is_none() {
        return Err(format!("{s:?}: missing port (like 127.0.0.1:9901)"));
    }
    Ok(auth.to_string())
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Routes {
    pub generation: u64,
    pub table_age_s: Option<f64>,
    pub locality: Option<Locality>,
    pub clusters: Vec<Cluster>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Locality {
    pub region: String,
    pub zone: String,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Cluster {
    pub name: String,
    pub panic: bool,
    pub zones: Vec<Zone>,
    pub endpoints: Vec<Endpoint>,
    pub slices: Vec<Slice>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Zone {
    pub region: String,
    pub zone: String,
    pub rank: Option<usize>,
    pub latency_ms: Option<f64>,
    pub healthy: usize,
    pub endpoints: usize,
    pub share: Option<f64>,
    pub dial: Option<u8>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Endpoint {
    pub address: String,
    pub region: String,
    pub zone: String,
    pub healthy: bool,
    pub ejected: bool,
    pub latency_ms: Option<f64>,
    pub in_flight: u32,
    pub weight: Option<u32>,
    pub requests: Option<u64>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Slice {
    pub zone: String,
    pub share: f64,
    pub reason: String,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct EventsBody {
    pub events: Vec<Event>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: String,
    pub message: String,
}

/// Request rates from the `requests` counters of two snapshots.
#[derive(Default)]
pub struct Rates {
    last: HashMap<(String, String), (Instant, u64)>,
    rates: HashMap<(String, String), f64>,
}

impl Rates {
    pub fn update(&mut self, routes: &Routes, now: Instant) {
        let mut last = HashMap::new();
        self.rates.clear();
        for c in &routes.clusters {
            for e in &c.endpoints {
                let Some(n) = e.requests else { continue };
                let key = (c.name.clone(), e.address.clone());
                if let Some(&(t, m)) = self.last.get(&key) {
                    let dt = now.duration_since(t).as_secs_f64();
                    if dt > 0.05 && n >= m {
                        self.rates.insert(key.clone(), (n - m) as f64 / dt);
                    }
                }
                last.insert(key, (now, n));
            }
        }
        self.last = last;
    }

    pub fn get(&self, cluster: &str, address: &str) -> Option<f64> {
        self.rates
            .get(&(cluster.to_string(), address.to_string()))
            .copied()
    }
}

/// ANSI styling, or none.
#[derive(Clone, Copy)]
pub struct Style {
    pub color: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
    fn bold(&self, s: &str) -> String {
        self.paint("1", s)
    }
    fn dim(&self, s: &str) -> String {
        self.paint("2", s)
    }
    fn green(&self, s: &str) -> String {
        self.paint("32", s)
    }
    fn yellow(&self, s: &str) -> String {
        self.paint("33", s)
    }
    fn red(&self, s: &str) -> String {
        self.paint("31", s)
    }
    fn blue(&self, s: &str) -> String {
        self.paint("34", s)
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.0} ms"),
    }
}

fn fmt_rate(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn fmt_age(ms: i64) -> String {
    let s = ms.max(0) as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1} s ago")
    } else if s < 7200.0 {
        format!("{:.0} min ago", s / 60.0)
    } else {
        format!("{:.1} h ago", s / 3600.0)
    }
}

/// Pads `s` (which may hold ANSI codes) to `w` visible characters.
fn pad(s: &str, visible: usize, w: usize) -> String {
    let mut out = s.to_string();
    for _ in visible..w {
        out.push(' ');
    }
    out
}

fn bar(share: f64) -> (String, String) {
    let share = share.clamp(0.0, 1.0);
    let mut n = (share * BAR as f64).round() as usize;
    if share > 0.0 && n == 0 {
        n = 1;
    }
    ("█".repeat(n), "░".repeat(BAR - n))
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The whole picture as text. `events` may be empty (an older router without /events).
pub fn render(
    admin: &str,
    routes: &Routes,
    events: &[Event],
    rates: &Rates,
    style: Style,
    now_ms: i64,
) -> String {
    let mut o = String::new();
    let (mut healthy, mut total, mut rps, mut have_rate) = (0, 0, 0.0, false);
    for c in &routes.clusters {
        for e in &c.endpoints {
            total += 1;
            if e.healthy && !e.ejected {
                healthy += 1;
            }
            if let Some(r) = rates.get(&c.name, &e.address) {
                rps += r;
                have_rate = true;
            }
        }
    }
    let loc = routes
        .locality
        .as_ref()
        .map(|l| format!("{} / {}", l.region, l.zone))
        .unwrap_or_else(|| "–".into());
    let _ = writeln!(
        o,
        "{}  {}",
        style.bold("edge-router"),
        style.dim(&format!("admin {admin}"))
    );
    let _ = writeln!(
        o,
        "generation {}  ·  table age {}  ·  locality {}  ·  {}/{} endpoints healthy  ·  {} req/s",
        routes.generation,
        routes
            .table_age_s
            .map(|s| format!("{s:.1} s"))
            .unwrap_or_else(|| "–".into()),
        loc,
        healthy,
        total,
        if have_rate {
            fmt_rate(Some(rps))
        } else {
            "–".into()
        }
    );
    if routes.clusters.is_empty() {
        let _ = writeln!(o, "\nThe routing table has no clusters.");
    }
    for c in &routes.clusters {
        render_cluster(&mut o, c, routes.locality.as_ref(), rates, style);
    }
    let _ = writeln!(o, "\n{}", style.bold("Events (newest first)"));
    if events.is_empty() {
        let _ = writeln!(o, "  {}", style.dim("no events yet"));
    }
    for e in events.iter().rev().take(EVENTS_SHOWN) {
        let kind = match e.kind.as_str() {
            "ejection" => style.red(&format!("{:<9}", e.kind)),
            "health" => style.blue(&format!("{:<9}", e.kind)),
            "demo" => style.yellow(&format!("{:<9}", e.kind)),
            _ => style.dim(&format!("{:<9}", e.kind)),
        };
        let _ = writeln!(
            o,
            "  {:>12}  {kind} {}",
            fmt_age(now_ms - e.ts_ms as i64),
            e.message
        );
    }
    o
}

fn render_cluster(
    o: &mut String,
    c: &Cluster,
    local: Option<&Locality>,
    rates: &Rates,
    style: Style,
) {
    let healthy = c
        .endpoints
        .iter()
        .filter(|e| e.healthy && !e.ejected)
        .count();
    let mut rps = 0.0;
    let mut have_rate = false;
    for e in &c.endpoints {
        if let Some(r) = rates.get(&c.name, &e.address) {
            rps += r;
            have_rate = true;
        }
    }
    let serving = c.zones.iter().find(|z| z.healthy > 0);
    let _ = write!(
        o,
        "\n{} {}  ·  {} zones  ·  {}/{} endpoints healthy  ·  {} req/s  ·  ",
        style.bold("cluster"),
        style.bold(&c.name),
        c.zones.len(),
        healthy,
        c.endpoints.len(),
        if have_rate {
            fmt_rate(Some(rps))
        } else {
            "–".into()
        },
    );
    let _ = match serving {
        Some(z) => writeln!(o, "serving from {}", style.bold(&z.zone)),
        None if c.endpoints.is_empty() => writeln!(o, "no endpoints"),
        None => writeln!(o, "{}", style.red("no healthy endpoint: failing open")),
    };
    let _ = writeln!(
        o,
        "{}",
        style.dim(&format!(
            "  {:>4}  {:<22} {:<16} {:>9}  {:>7}  {:<31} {:>7}",
            "RANK", "ZONE", "REGION", "LATENCY", "HEALTHY", "TRAFFIC SHARE", "REQ/S"
        ))
    );
    let list_all = c.endpoints.len() <= LIST_ENDPOINTS_UP_TO;
    let mut hidden = 0;
    for (i, z) in c.zones.iter().enumerate() {
        let eps: Vec<&Endpoint> = c
            .endpoints
            .iter()
            .filter(|e| e.zone == z.zone && e.region == z.region)
            .collect();
        let mut zone_rps = 0.0;
        let mut zone_have = false;
        for e in &eps {
            if let Some(r) = rates.get(&c.name, &e.address) {
                zone_rps += r;
                zone_have = true;
            }
        }
        let mut name = z.zone.clone();
        let mut name_w = name.chars().count();
        if local.is_some_and(|l| l.zone == z.zone && l.region == z.region) {
            name.push_str(&format!(" {}", style.blue("local")));
            name_w += 6;
        }
        if let Some(d) = z.dial.filter(|d| *d < 100) {
            let t = format!(" dial {d}%");
            name_w += t.chars().count();
            name.push_str(&style.yellow(&t));
        }
        let hx = format!("{}/{}", z.healthy, z.endpoints);
        let hx = if z.endpoints == 0 {
            style.dim(&format!("{hx:>7}"))
        } else if z.healthy == 0 {
            style.red(&format!("{hx:>7}"))
        } else if z.healthy < z.endpoints {
            style.yellow(&format!("{hx:>7}"))
        } else {
            style.green(&format!("{hx:>7}"))
        };
        let share = z.share.unwrap_or(0.0);
        let (full, empty) = bar(share);
        let why = c
            .slices
            .iter()
            .find(|s| s.zone == z.zone && s.share > 0.0)
            .map(|s| s.reason.as_str())
            .unwrap_or("");
        let share_txt = format!("{:>4.0}% {:<9}", share * 100.0, why);
        let rank = z.rank.unwrap_or(i);
        let _ = writeln!(
            o,
            "  {:>4}  {} {:<16} {:>9}  {}  {}{} {} {:>7}",
            rank,
            pad(&name, name_w, 22),
            z.region,
            fmt_ms(z.latency_ms),
            hx,
            style.blue(&full),
            style.dim(&empty),
            if share > 0.0 {
                share_txt
            } else {
                style.dim(&share_txt)
            },
            if zone_have {
                fmt_rate(Some(zone_rps))
            } else {
                "–".into()
            }
        );
        for e in eps {
            let health = if e.ejected {
                style.yellow("ejected  ")
            } else if e.healthy {
                style.green("healthy  ")
            } else {
                style.red("unhealthy")
            };
            if !list_all && e.healthy && !e.ejected {
                hidden += 1;
                continue;
            }
            let dot = if e.ejected {
                style.yellow("●")
            } else if e.healthy {
                style.green("●")
            } else {
                style.red("●")
            };
            let _ = writeln!(
                o,
                "          {dot} {:<24} {health} {:>9}  {:>3} in flight  {:>7} req/s{}",
                e.address,
                fmt_ms(e.latency_ms),
                e.in_flight,
                fmt_rate(rates.get(&c.name, &e.address)),
                e.weight
                    .filter(|w| *w != 100)
                    .map(|w| format!("  weight {w}"))
                    .unwrap_or_default(),
            );
        }
    }
    if hidden > 0 {
        let _ = writeln!(
            o,
            "  {}",
            style.dim(&format!(
                "({hidden} healthy endpoints not listed: more than {LIST_ENDPOINTS_UP_TO} in this cluster)"
            ))
        );
    }
    if c.panic {
        let _ = writeln!(
            o,
            "  {}",
            style.red("panic mode: too few healthy endpoints, routing to all")
        );
    }
}

/// SIGINT or SIGTERM.
struct Stop {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Stop {
    fn new() -> Stop {
        use tokio::signal::unix::{signal, SignalKind};
        Stop {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    async fn recv(&mut self) {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = one(&mut self.int) => {}
            _ = one(&mut self.term) => {}
        }
    }
}

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &HttpClient,
    admin: &str,
    path: &str,
) -> Result<T, String> {
    let url = format!("http://{admin}{path}");
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let fut = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| crate::upstream::error_chain(&e))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        serde_json::from_slice(&body).map_err(|e| format!("not the JSON of edge-router: {e}"))
    };
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("cannot read {url}: {e}")),
        Err(_) => Err(format!("cannot read {url}: no answer within {TIMEOUT:?}")),
    }
}

async fn fetch(client: &HttpClient, admin: &str) -> Result<(Routes, Vec<Event>), String> {
    let routes: Routes = get_json(client, admin, "/routes").await?;
    // /events is optional: show the table even when it is missing.
    let events = get_json::<EventsBody>(client, admin, "/events")
        .await
        .map(|b| b.events)
        .unwrap_or_default();
    Ok((routes, events))
}

/// Runs the command: 0 on success (or Ctrl-C in watch mode), 1 when the admin API cannot be
/// read.
pub async fn run(opts: Options) -> ExitCode {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let style = Style {
        color: std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut rates = Rates::default();
    let hint = "is edge-router running? use --admin ADDR to point at its admin listener";
    let first = match fetch(&client, &opts.admin).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e} ({hint})");
            return ExitCode::from(1);
        }
    };
    rates.update(&first.0, Instant::now());
    if !opts.watch {
        // A second look after a short while gives request rates.
        tokio::time::sleep(opts.interval.min(Duration::from_secs(1))).await;
        let (routes, events) = match fetch(&client, &opts.admin).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e} ({hint})");
                return ExitCode::from(1);
            }
        };
        rates.update(&routes, Instant::now());
        let text = render(&opts.admin, &routes, &events, &rates, style, unix_ms());
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
        return ExitCode::SUCCESS;
    }
    // One listener for the whole run, so a Ctrl-C during a fetch is not lost.
    let mut stop = Stop::new();
    let mut current = Ok(first);
    let mut last_good: Option<Instant> = None;
    loop {
        let mut frame = String::from("\x1b[H\x1b[2J");
        match &current {
            Ok((routes, events)) => {
                last_good = Some(Instant::now());
                frame.push_str(&render(
                    &opts.admin,
                    routes,
                    events,
                    &rates,
                    style,
                    unix_ms(),
                ));
            }
            Err(e) => {
                frame.push_str(&style.red(&format!("disconnected: {e}")));
                if let Some(t) = last_good {
                    let _ = write!(
                        frame,
                        " (last answer {:.0} s ago)",
                        t.elapsed().as_secs_f64()
                    );
                }
                frame.push_str("\nretrying…\n");
            }
        }
        let _ = write!(
            frame,
            "\n{}\n",
            style.dim(&format!("every {:?} · Ctrl-C to quit", opts.interval))
        );
        {
            let mut out = std::io::stdout().lock();
            if out
                .write_all(frame.as_bytes())
                .and_then(|_| out.flush())
                .is_err()
            {
                // stdout is gone (closed pipe): nothing left to show.
                return ExitCode::SUCCESS;
            }
        }
        let next = async {
            tokio::time::sleep(opts.interval).await;
            fetch(&client, &opts.admin).await
        };
        tokio::select! {
            r = next => current = r,
            _ = stop.recv() => return ExitCode::SUCCESS,
        }
        if let Ok((routes, _)) = &current {
            rates.update(routes, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Routes {
        serde_json::from_str(
            r#"{"generation": 7, "table_age_s": 1.5,
              "locality": {"region": "us-east-1", "zone": "us-east-1a"},
              "clusters": [{"name": "api", "panic": false,
                "zones": [
                  {"region": "us-east-1", "zone": "us-east-1b", "rank": 0, "latency_ms": 8.2,
                   "healthy": 1, "endpoints": 2, "share": 0.7, "dial": 100},
                  {"region": "eu-west-1", "zone": "eu-west-1a", "rank": 1, "latency_ms": 75.0,
                   "healthy": 1, "endpoints": 1, "share": 0.3, "dial": 100},
                  {"region": "us-east-1", "zone": "us-east-1a", "rank": 2, "latency_ms": null,
                   "healthy": 0, "endpoints": 1, "share": 0.0, "dial": 100}],
                "endpoints": [
                  {"address": "10.0.0.1:80", "region": "us-east-1", "zone": "us-east-1b",
                   "healthy": true, "ejected": false, "latency_ms": 8.0, "in_flight": 3,
                   "weight": 100, "requests": 100},
                  {"address": "10.0.0.2:80", "region": "us-east-1", "zone": "us-east-1b",
                   "healthy": false, "ejected": true, "latency_ms": 9.0, "in_flight": 0,
                   "weight": 100, "requests": 50},
                  {"address": "10.0.0.3:80", "region": "eu-west-1", "zone": "eu-west-1a",
                   "healthy": true, "ejected": false, "latency_ms": 75.0, "in_flight": 1,
                   "weight": 100, "requests": 10},
                  {"address": "10.0.0.4:80", "region": "us-east-1", "zone": "us-east-1a",
                   "healthy": false, "ejected": false, "latency_ms": null, "in_flight": 0,
                   "weight": 100, "requests": 0}],
                "slices": [{"zone": "us-east-1b", "share": 0.7, "reason": "failover"},
                           {"zone": "eu-west-1a", "share": 0.3, "reason": "spillover"}]}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn renders_zones_in_rank_order_with_health_share_and_rates() {
        let r = sample();
        let mut rates = Rates::default();
        let t0 = Instant::now();
        rates.update(&r, t0);
        let mut r2 = r.clone();
        r2.clusters[0].endpoints[0].requests = Some(120);
        rates.update(&r2, t0 + Duration::from_secs(2));
        let events = vec![
            Event {
                ts_ms: 1_000,
                kind: "health".into(),
                message: "older event".into(),
            },
            Event {
                ts_ms: 2_000,
                kind: "ejection".into(),
                message: "newer event".into(),
            },
        ];
        let text = render(
            "127.0.0.1:9901",
            &r2,
            &events,
            &rates,
            Style { color: false },
            5_000,
        );
        let b = text.find("us-east-1b").unwrap();
        let e = text.find("eu-west-1a").unwrap();
        let a = text.find("us-east-1a local").unwrap();
        assert!(b < e && e < a, "zones not nearest first:\n{text}");
        assert!(text.contains("2/4 endpoints healthy"), "{text}");
        assert!(text.contains("serving from us-east-1b"), "{text}");
        assert!(text.contains("1/2"), "{text}");
        assert!(text.contains("70% failover"), "{text}");
        assert!(text.contains("30% spillover"), "{text}");
        // 20 requests in 2 s on the first endpoint.
        assert!(text.contains("10.0 req/s"), "{text}");
        assert!(text.contains("ejected"), "{text}");
        assert!(text.contains("unhealthy"), "{text}");
        // Newest event first.
        let s = text.find("newer event").unwrap();
        let f = text.find("older event").unwrap();
        assert!(s < f, "{text}");
        assert!(text.contains("3.0 s ago"), "{text}");
        assert!(!text.contains('\x1b'), "no colour asked for");
    }

    #[test]
    fn large_clusters_list_only_unhealthy_endpoints() {
        let mut r = sample();
        let c = &mut r.clusters[0];
        for i in 0..100 {
            c.endpoints.push(Endpoint {
                address: format!("10.1.0.{i}:80"),
                region: "eu-west-1".into(),
                zone: "eu-west-1a".into(),
                healthy: true,
                ..Default::default()
            });
        }
        let text = render("x:1", &r, &[], &Rates::default(), Style { color: false }, 0);
        assert!(!text.contains("10.1.0.5:80"), "{text}");
        assert!(text.contains("10.0.0.2:80"), "{text}");
        assert!(text.contains("(102 healthy endpoints not listed"), "{text}");
    }

    #[test]
    fn admin_addresses() {
        assert_eq!(parse_admin("127.0.0.1:9901").unwrap(), "127.0.0.1:9901");
        assert_eq!(
            parse_admin("http://localhost:9901/").unwrap(),
            "localhost:9901"
        );
        assert_eq!(parse_admin("[::1]:9901").unwrap(), "[::1]:9901");
        assert!(parse_admin("localhost").is_err());
        assert!(parse_admin("https://x:1").is_err());
        assert!(parse_admin("a b:1").is_err());
    }
}
