//! The embedded demo: simulated backends on loopback in several regions and zones, each with
//! a latency that looks like its distance, and the router in front of them. Zones can be
//! taken down, slowed down and brought back from the admin API or the dashboard.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

pub mod scenario;

/// A simulated zone: (region, zone, endpoints, one-way-ish latency in ms).
pub const ZONES: &[(&str, &str, usize, u64)] = &[
    ("us-east-1", "us-east-1a", 2, 1),
    ("us-east-1", "us-east-1b", 2, 8),
    ("us-west-2", "us-west-2a", 2, 35),
    ("eu-west-1", "eu-west-1a", 2, 75),
    ("eu-west-1", "eu-west-1b", 1, 80),
    ("ap-southeast-1", "ap-southeast-1a", 1, 180),
];

/// Extra latency of a zone that was slowed down.
pub const SLOW_EXTRA_MS: u64 = 150;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum ZoneState {
    Up = 0,
    Down = 1,
    Slow = 2,
}

impl ZoneState {
    fn as_str(self) -> &'static str {
        match self {
            ZoneState::Up => "up",
            ZoneState::Down => "down",
            ZoneState::Slow => "slow",
        }
    }
}

pub struct DemoZone {
    pub region: &'static str,
    pub zone: &'static str,
    pub latency_ms: u64,
    pub endpoints: Vec<SocketAddr>,
    state: AtomicU8,
    /// Bit i set: endpoint i is down on its own (the rest of the zone is not).
    down_endpoints: AtomicU64,
}

impl DemoZone {
    pub fn state(&self) -> ZoneState {
        match self.state.load(Ordering::Relaxed) {
            1 => ZoneState::Down,
            2 => ZoneState::Slow,
            _ => ZoneState::Up,
        }
    }

    fn endpoint_down(&self, i: usize) -> bool {
        self.state() == ZoneState::Down
            || self.down_endpoints.load(Ordering::Relaxed) & (1 << i) != 0
    }
}

/// The demo's backends and their switches.
pub struct Demo {
    pub zones: Vec<Arc<DemoZone>>,
}

#[derive(Serialize)]
pub struct DemoJson {
    zones: Vec<DemoZoneJson>,
}

#[derive(Serialize)]
struct DemoZoneJson {
    region: &'static str,
    zone: &'static str,
    state: &'static str,
    latency_ms: u64,
    endpoints: Vec<String>,
}

impl Demo {
    /// Starts every simulated backend on 127.0.0.1 with a free port.
    pub async fn start() -> std::io::Result<Demo> {
        let mut zones = Vec::new();
        for (region, zone, n, latency_ms) in ZONES {
            let mut listeners = Vec::new();
            for _ in 0..*n {
                listeners.push(TcpListener::bind("127.0.0.1:0").await?);
            }
            let endpoints = listeners
                .iter()
                .filter_map(|l| l.local_addr().ok())
                .collect();
            let z = Arc::new(DemoZone {
                region,
                zone,
                latency_ms: *latency_ms,
                endpoints,
                state: AtomicU8::new(ZoneState::Up as u8),
                down_endpoints: AtomicU64::new(0),
            });
            for (i, l) in listeners.into_iter().enumerate() {
                tokio::spawn(backend(l, z.clone(), i));
            }
            zones.push(z);
        }
        Ok(Demo { zones })
    }

    pub fn describe(&self) -> DemoJson {
        DemoJson {
            zones: self
                .zones
                .iter()
                .map(|z| DemoZoneJson {
                    region: z.region,
                    zone: z.zone,
                    state: z.state().as_str(),
                    latency_ms: z.latency_ms,
                    endpoints: z.endpoints.iter().map(|a| a.to_string()).collect(),
                })
                .collect(),
        }
    }

    /// `action` is down, up or slow; `up` also undoes `slow`.
    pub fn set(&self, zone: &str, action: &str) -> Result<String, String> {
        let state = match action {
            "down" => ZoneState::Down,
            "up" => ZoneState::Up,
            "slow" => ZoneState::Slow,
            other => return Err(format!("unknown action {other:?}: use down, up or slow")),
        };
        let z = self.zones.iter().find(|z| z.zone == zone).ok_or_else(|| {
            let names: Vec<&str> = self.zones.iter().map(|z| z.zone).collect();
            format!("no demo zone {zone:?}: the zones are {}", names.join(", "))
        })?;
        z.state.store(state as u8, Ordering::Relaxed);
        Ok(match state {
            ZoneState::Down => {
                format!("demo: zone {zone} is down (its backends drop every connection)")
            }
            ZoneState::Up => format!("demo: zone {zone} is up again"),
            ZoneState::Slow => format!(
                "demo: zone {zone} is slow (+{SLOW_EXTRA_MS} ms; POST /demo/zones/{zone}/up undoes it)"
            ),
        })
    }

    /// Takes one endpoint down (or back up) while the rest of its zone keeps serving.
    pub fn set_endpoint(&self, addr: SocketAddr, down: bool) -> Result<String, String> {
        for z in &self.zones {
            if let Some(i) = z
                .endpoints
                .iter()
                .position(|a| *a == addr)
                .filter(|i| *i < 64)
            {
                if down {
                    z.down_endpoints.fetch_or(1 << i, Ordering::Relaxed);
                } else {
                    z.down_endpoints.fetch_and(!(1 << i), Ordering::Relaxed);
                }
                let what = if down { "down" } else { "up again" };
                return Ok(format!("demo: endpoint {addr} in {} is {what}", z.zone));
            }
        }
        Err(format!("no demo endpoint {addr}"))
    }

    /// The router config for these backends.
    pub fn config_toml(&self, listen: SocketAddr, admin: SocketAddr, access_log: bool) -> String {
        let mut s = format!(
            r#"
[listener]
address = "{listen}"
route_header = true
access_log = {access_log}

[admin]
address = "{admin}"

[locality]
region = "us-east-1"
zone = "us-east-1a"

[[cluster]]
name = "demo"

[cluster.health_check]
path = "/healthz"
interval = "500ms"
timeout = "400ms"
healthy_threshold = 2
unhealthy_threshold = 2

[cluster.outlier]
base_ejection_time = "5s"
"#
        );
        for z in &self.zones {
            for a in &z.endpoints {
                s.push_str(&format!(
                    "\n[[cluster.endpoint]]\naddress = \"{a}\"\nregion = \"{}\"\nzone = \"{}\"\n",
                    z.region, z.zone
                ));
            }
        }
        s.push_str("\n[[route]]\npath_prefix = \"/\"\ncluster = \"demo\"\n");
        s
    }
}

async fn backend(listener: TcpListener, zone: Arc<DemoZone>, index: usize) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        if zone.endpoint_down(index) {
            // A dead zone: the connection closes before any answer.
            drop(stream);
            continue;
        }
        let zone = zone.clone();
        let addr = listener.local_addr().ok();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(zone.clone(), index, addr, req));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Why a simulated backend broke a connection.
#[derive(Debug)]
struct ZoneDown;

impl std::fmt::Display for ZoneDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("zone is down")
    }
}

impl std::error::Error for ZoneDown {}

async fn answer(
    zone: Arc<DemoZone>,
    index: usize,
    addr: Option<SocketAddr>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, ZoneDown> {
    // A dead zone breaks kept-alive connections too: hyper closes the connection when the
    // service fails, so the client sees a reset with no answer.
    if zone.endpoint_down(index) {
        return Err(ZoneDown);
    }
    let delay = match zone.state() {
        ZoneState::Slow => zone.latency_ms + SLOW_EXTRA_MS,
        _ => zone.latency_ms,
    };
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if zone.endpoint_down(index) {
        return Err(ZoneDown);
    }
    let body = format!(
        "hello from {} / {} ({}), path {}\n",
        zone.region,
        zone.zone,
        addr.map(|a| a.to_string()).unwrap_or_default(),
        req.uri().path()
    );
    Ok(Response::new(Full::new(Bytes::from(body))))
}

impl crate::ops::router::ZoneControls for Demo {
    fn describe(&self) -> serde_json::Value {
        serde_json::to_value(Demo::describe(self)).unwrap_or(serde_json::Value::Null)
    }

    fn set(&self, zone: &str, action: &str) -> Result<String, String> {
        Demo::set(self, zone, action)
    }
}
