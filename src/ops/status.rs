//! `edge-router status`: the dashboard's picture in a terminal, for people on an edge host
//! over ssh. Reads `/routes` and `/events` of a running router's admin listener with a small
//! hyper client and prints clusters, zones ranked nearest first (latency, healthy x/y, share
//! of traffic and why, request rate), endpoints, each zone's last minute from `/history` as
//! sparklines, and the last events. `--watch` redraws (on a terminal; into a pipe it appends
//! one picture after another, with no screen-clearing codes).

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

mod render;
pub use render::{render, sparkline, Style, SPARK_CHARS, SPARK_SAMPLES};

/// Clusters with more endpoints than this list only the endpoints that are not healthy.
pub const LIST_ENDPOINTS_UP_TO: usize = 60;
/// Events shown under the table.
pub const EVENTS_SHOWN: usize = 8;
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
    /// Requests per second as the router measured them (routers before that: absent).
    pub rps: Option<f64>,
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
    pub severity: Option<String>,
    pub message: String,
}

/// `/history`: one value per sample in every series (see `ops::history`).
#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct History {
    pub interval_ms: u64,
    pub t_ms: Vec<u64>,
    pub clusters: Vec<ClusterHistory>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct ClusterHistory {
    pub name: String,
    pub rps: Vec<Option<f64>>,
    pub retries_per_s: Vec<Option<f64>>,
    pub zones: Vec<ZoneHistory>,
}

#[derive(Deserialize, Default, Debug, Clone)]
#[serde(default)]
pub struct ZoneHistory {
    pub region: String,
    pub zone: String,
    pub latency_ms: Vec<Option<f64>>,
    pub share: Vec<Option<f64>>,
    pub served_share: Vec<Option<f64>>,
    pub rps: Vec<Option<f64>>,
    pub errors_per_s: Vec<Option<f64>>,
    pub ejections_per_s: Vec<Option<f64>>,
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

    /// The router's own rate when it gives one, else the one measured here.
    fn of(&self, cluster: &str, e: &Endpoint) -> Option<f64> {
        e.rps.or_else(|| self.get(cluster, &e.address))
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

/// What one look at the router gives.
struct Snapshot {
    routes: Routes,
    events: Vec<Event>,
    history: Option<History>,
}

async fn fetch(client: &HttpClient, admin: &str) -> Result<Snapshot, String> {
    let routes: Routes = get_json(client, admin, "/routes").await?;
    // /events and /history are optional: show the table even when they are missing.
    let events = get_json::<EventsBody>(client, admin, "/events")
        .await
        .map(|b| b.events)
        .unwrap_or_default();
    let history = get_json::<History>(client, admin, "/history").await.ok();
    Ok(Snapshot {
        routes,
        events,
        history,
    })
}

impl Snapshot {
    /// Does the router give request rates itself (or do two looks have to measure them)?
    fn has_rates(&self) -> bool {
        self.routes
            .clusters
            .iter()
            .flat_map(|c| &c.endpoints)
            .any(|e| e.rps.is_some())
    }

    fn render(&self, admin: &str, rates: &Rates, style: Style) -> String {
        render(
            admin,
            &self.routes,
            &self.events,
            self.history.as_ref(),
            rates,
            style,
            unix_ms(),
        )
    }
}

/// Runs the command: 0 on success (or Ctrl-C in watch mode), 1 when the admin API cannot be
/// read.
pub async fn run(opts: Options) -> ExitCode {
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let terminal = std::io::stdout().is_terminal();
    let style = Style {
        color: terminal && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut rates = Rates::default();
    let hint = "is edge-router running? use --admin ADDR to point at its admin listener";
    let mut first = match fetch(&client, &opts.admin).await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e} ({hint})");
            return ExitCode::from(1);
        }
    };
    rates.update(&first.routes, Instant::now());
    if !opts.watch {
        // A router that does not measure rates itself needs a second look after a while.
        let has_traffic = first
            .routes
            .clusters
            .iter()
            .any(|c| !c.endpoints.is_empty());
        if !first.has_rates() && has_traffic {
            tokio::time::sleep(opts.interval.min(Duration::from_secs(1))).await;
            first = match fetch(&client, &opts.admin).await {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("error: {e} ({hint})");
                    return ExitCode::from(1);
                }
            };
            rates.update(&first.routes, Instant::now());
        }
        let text = first.render(&opts.admin, &rates, style);
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
        let mut frame = String::new();
        if terminal {
            frame.push_str("\x1b[H\x1b[2J");
        }
        match &current {
            Ok(snap) => {
                last_good = Some(Instant::now());
                frame.push_str(&snap.render(&opts.admin, &rates, style));
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
        if !terminal {
            // Into a file or a pipe: pictures one after another, each closed by a rule.
            frame.push_str(&"─".repeat(40));
            frame.push('\n');
        }
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
        if let Ok(snap) = &current {
            rates.update(&snap.routes, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests;
