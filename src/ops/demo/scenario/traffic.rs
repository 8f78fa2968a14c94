//! The scenario's own traffic: a fixed request rate to the router's data plane, every
//! answer logged with the zone and reason `x-edge-route` gave.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Answers in a row that make "all traffic is in zone Z".
pub(super) const STEADY: usize = 25;
pub(super) const MAX_IN_FLIGHT: usize = 64;
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// One answered (or failed) request of the driver.
#[derive(Clone, Debug)]
pub(super) struct Outcome {
    /// Since the traffic started.
    pub sent: Duration,
    pub done: Duration,
    pub zone: Option<String>,
    pub reason: Option<String>,
    pub ok: bool,
}

pub(super) struct Traffic {
    pub start: Instant,
    pub log: Mutex<Vec<Outcome>>,
    pub stop: AtomicBool,
    pub in_flight: AtomicUsize,
}

impl Traffic {
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn snapshot(&self) -> Vec<Outcome> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The earliest-answered successful request sent at or after `since` that `pred` accepts.
    pub fn first_answer(
        &self,
        since: Duration,
        pred: impl Fn(&Outcome) -> bool,
    ) -> Option<Outcome> {
        self.snapshot()
            .into_iter()
            .filter(|o| o.sent >= since && o.ok && pred(o))
            .min_by_key(|o| o.done)
    }

    /// The last STEADY requests sent at or after `since` were all answered by `zone`: when the
    /// first answer of that run (which starts at or after `since`) came.
    pub fn steady_in(&self, since: Duration, zone: &str) -> Option<Duration> {
        let mut log: Vec<Outcome> = self
            .snapshot()
            .into_iter()
            .filter(|o| o.sent >= since)
            .collect();
        log.sort_by_key(|o| o.sent);
        if log.len() < STEADY {
            return None;
        }
        let tail = &log[log.len() - STEADY..];
        if tail.iter().all(|o| o.ok && o.zone.as_deref() == Some(zone)) {
            // Since the first of the run of answers from `zone` that reaches to now.
            let mut first = log.len() - STEADY;
            while first > 0 && log[first - 1].ok && log[first - 1].zone.as_deref() == Some(zone) {
                first -= 1;
            }
            Some(log[first].done)
        } else {
            None
        }
    }
}

pub(super) async fn drive(traffic: Arc<Traffic>, target: SocketAddr, rate: u32) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut n: u64 = 0;
    while !traffic.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if traffic.in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            continue;
        }
        n += 1;
        let uri: http::Uri = match format!("http://{target}/scenario/{n}").parse() {
            Ok(u) => u,
            Err(_) => break,
        };
        let t = traffic.clone();
        let client = client.clone();
        t.in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let sent = t.now();
            let res = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let resp = client.get(uri).await.ok()?;
                let route = resp
                    .headers()
                    .get("x-edge-route")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let ok = resp.status().is_success();
                let _ = resp.into_body().collect().await;
                Some((ok, route))
            })
            .await
            .ok()
            .flatten();
            let (ok, route) = res.unwrap_or((false, None));
            let field = |k: &str| {
                route.as_deref().and_then(|r| {
                    r.split(';')
                        .filter_map(|kv| kv.trim().split_once('='))
                        .find(|(key, _)| *key == k)
                        .map(|(_, v)| v.to_string())
                })
            };
            let o = Outcome {
                sent,
                done: t.now(),
                zone: field("zone"),
                reason: field("reason"),
                ok,
            };
            if let Ok(mut l) = t.log.lock() {
                l.push(o);
            }
            t.in_flight.fetch_sub(1, Ordering::Relaxed);
        });
    }
    // Let the last requests finish (each is bounded by REQUEST_TIMEOUT).
    let deadline = Instant::now() + REQUEST_TIMEOUT + Duration::from_secs(1);
    while traffic.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
