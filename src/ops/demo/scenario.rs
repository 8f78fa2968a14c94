//! Scripted demo scenarios: `edge-router demo --scenario failover|latency|spillover`.
//!
//! The driver sends its own bounded traffic to the router's data plane (loopback only, a fixed
//! rate, only while the scenario runs), injects a fault on a timer, and prints what happened
//! with times measured on both sides: from the answers (the `x-edge-route` header says which
//! zone answered and why) and from the router's live routing table. Each line also goes to
//! the event ring, so the dashboard's timeline tells the same story.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Demo, SLOW_EXTRA_MS};
use crate::ops::router::Router;
use crate::routing::rank::zone_estimate_of;
use crate::telemetry::Severity;

mod traffic;
use traffic::{drive, Outcome, Traffic};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// The nearest zone goes down, then comes back.
    Failover,
    /// The nearest zone gets slow (+150 ms), then recovers.
    Latency,
    /// One of the two endpoints of the nearest zone goes down: part of its traffic spills over.
    Spillover,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Failover => "failover",
            Scenario::Latency => "latency",
            Scenario::Spillover => "spillover",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Requests per second the driver sends.
    pub rate: u32,
    /// When the fault starts, after the traffic started.
    pub fault_at: Duration,
    /// How long the fault lasts.
    pub hold: Duration,
    /// How long any one expected change may take before the scenario gives up on it.
    pub step_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            rate: 50,
            fault_at: Duration::from_secs(5),
            hold: Duration::from_secs(10),
            step_timeout: Duration::from_secs(20),
        }
    }
}

/// The zone the router runs in (the demo's locality) and the next nearest one.
const NEAR: &str = "us-east-1a";
const NEXT: &str = "us-east-1b";

/// What the router's live table says about a zone of the demo cluster.
#[derive(Debug, Clone)]
struct ZoneView {
    position: usize,
    healthy: usize,
    endpoints: usize,
    share: f64,
    latency_ms: Option<f64>,
}

struct Driver {
    router: Arc<Router>,
    demo: Arc<Demo>,
    traffic: Arc<Traffic>,
    opts: Options,
    name: &'static str,
}

fn ms(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1000.0)
    } else {
        format!("{s:.1} s")
    }
}

fn fmt_lat(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.0} ms"),
        None => "–".into(),
    }
}

impl Driver {
    /// Prints a line of the story with the scenario clock, and puts it on the timeline.
    fn say(&self, msg: String) {
        self.say_at_as(self.traffic.now(), Severity::Info, msg);
    }

    fn say_as(&self, severity: Severity, msg: String) {
        self.say_at_as(self.traffic.now(), severity, msg);
    }

    fn say_at(&self, t: Duration, msg: String) {
        self.say_at_as(t, Severity::Info, msg);
    }

    /// `severity` colours the line on the dashboard: a fault is a warning, a recovery ok.
    fn say_at_as(&self, t: Duration, severity: Severity, msg: String) {
        use std::io::Write;
        let line = format!("t={:>5.2}s  {msg}", t.as_secs_f64());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        self.router.events.push_with(
            "demo",
            severity,
            format!("scenario {}, t={:.2}s: {msg}", self.name, t.as_secs_f64()),
        );
    }

    fn zone(&self, zone: &str) -> Option<ZoneView> {
        let t = self.router.table();
        let c = t.clusters.first()?;
        let (position, z) = c.zones.iter().enumerate().find(|(_, z)| &*z.zone == zone)?;
        Some(ZoneView {
            position,
            healthy: z.healthy,
            endpoints: z.endpoints.len(),
            share: z.share,
            latency_ms: zone_estimate_of(z.endpoints.iter(), &t.config.routing).map(|e| e.ms),
        })
    }

    fn generation(&self) -> u64 {
        self.router.table().generation
    }

    /// Zones with traffic, as "zone share% (why)".
    fn split(&self) -> String {
        let t = self.router.table();
        let Some(c) = t.clusters.first() else {
            return String::new();
        };
        let mut prev = 0.0;
        c.slices
            .iter()
            .map(|s| {
                let share = s.upto - prev;
                prev = s.upto;
                format!(
                    "{} {:.0}% ({})",
                    c.zones[s.zone].zone,
                    share * 100.0,
                    s.reason.as_str()
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Polls `f` every 10 ms until it gives a value or the step times out.
    async fn until<T>(&self, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
        let deadline = Instant::now() + self.opts.step_timeout;
        loop {
            if let Some(v) = f() {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "{what}: did not happen within {}",
                    ms(self.opts.step_timeout)
                );
                self.say_as(Severity::Error, msg.clone());
                return Err(msg);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn sleep_until(&self, t: Duration) {
        let now = self.traffic.now();
        if t > now {
            tokio::time::sleep(t - now).await;
        }
    }

    /// Requests sent in [from, to): (count, failed, retried).
    fn tally(&self, from: Duration, to: Duration) -> (usize, usize, usize) {
        let log = self.traffic.snapshot();
        let sel: Vec<&Outcome> = log
            .iter()
            .filter(|o| o.sent >= from && o.sent < to)
            .collect();
        let failed = sel.iter().filter(|o| !o.ok).count();
        let retried = sel
            .iter()
            .filter(|o| o.reason.as_deref() == Some("retry"))
            .count();
        (sel.len(), failed, retried)
    }

    /// Shares of answers by zone for requests sent in [from, to).
    fn measured_split(&self, from: Duration, to: Duration) -> (usize, Vec<(String, usize)>) {
        let log = self.traffic.snapshot();
        let mut by: Vec<(String, usize)> = Vec::new();
        let mut n = 0;
        for o in log.iter().filter(|o| o.sent >= from && o.sent < to && o.ok) {
            n += 1;
            let z = o.zone.clone().unwrap_or_else(|| "?".into());
            match by.iter_mut().find(|(k, _)| *k == z) {
                Some((_, c)) => *c += 1,
                None => by.push((z, 1)),
            }
        }
        by.sort_by_key(|b| std::cmp::Reverse(b.1));
        (n, by)
    }

    fn fmt_split(n: usize, by: &[(String, usize)]) -> String {
        by.iter()
            .map(|(z, c)| format!("{z} {:.0}% ({c})", *c as f64 * 100.0 / n.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Median time to the answer of successful requests sent in [from, to).
    fn median_latency(&self, from: Duration, to: Duration) -> Option<Duration> {
        let mut v: Vec<Duration> = self
            .traffic
            .snapshot()
            .into_iter()
            .filter(|o| o.ok && o.sent >= from && o.sent < to)
            .map(|o| o.done - o.sent)
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort();
        Some(v[v.len() / 2])
    }

    /// Waits until the router's table sends all traffic to `zone`, then until the requests
    /// sent from then on are all answered there; returns when the first of those was.
    async fn all_in(&self, zone: &str, what: &str) -> Result<Duration, String> {
        let table_at = self
            .until(what, || {
                let z = self.zone(zone)?;
                (z.share >= 0.999).then(|| self.traffic.now())
            })
            .await?;
        self.until(what, || self.traffic.steady_in(table_at, zone))
            .await
    }

    /// Waits until all traffic goes to NEAR: the starting point of every scenario.
    async fn warm_up(&self) -> Result<(), String> {
        let since = self.traffic.now();
        self.until("all traffic in the nearest zone", || {
            self.traffic.steady_in(since, NEAR)
        })
        .await?;
        let z = self.zone(NEAR);
        self.say(format!(
            "traffic flowing: every request answered by {NEAR} (the nearest zone, {})",
            fmt_lat(z.and_then(|z| z.latency_ms))
        ));
        Ok(())
    }

    async fn failover(&self) -> Result<(), String> {
        self.warm_up().await?;
        self.sleep_until(self.opts.fault_at).await;
        let down_at = self.traffic.now();
        self.demo.set(NEAR, "down")?;
        self.say_as(
            Severity::Warning,
            format!("zone {NEAR} DOWN: its backends drop every connection"),
        );
        let first = self
            .until("a request answered outside the failed zone", || {
                self.traffic
                    .first_answer(down_at, |o| o.zone.as_deref() != Some(NEAR))
            })
            .await?;
        self.say_at(
            first.done,
            format!(
                "traffic moved to {} in {} (first request answered there, reason={})",
                first.zone.as_deref().unwrap_or("?"),
                ms(first.done.saturating_sub(down_at)),
                first.reason.as_deref().unwrap_or("?")
            ),
        );
        let out = self
            .until("the router taking the zone out of the table", || {
                let z = self.zone(NEAR)?;
                (z.healthy == 0).then(|| (self.traffic.now(), z))
            })
            .await?;
        let (n, failed, retried) = self.tally(down_at, out.0);
        self.say_at(
            out.0,
            format!(
                "router took {NEAR} out ({}/{} healthy) {} after the fault; table generation {}: {}; meanwhile {n} requests: {failed} failed, {retried} answered by a retry",
                out.1.healthy,
                out.1.endpoints,
                ms(out.0 - down_at),
                self.generation(),
                self.split()
            ),
        );
        self.sleep_until(self.opts.fault_at + self.opts.hold).await;
        self.recover_zone(NEAR, "up").await
    }

    /// Brings NEAR back and reports when traffic returns.
    async fn recover_zone(&self, zone: &str, action: &str) -> Result<(), String> {
        let up_at = self.traffic.now();
        self.demo.set(zone, action)?;
        self.say_as(Severity::Ok, format!("zone {zone} UP again"));
        self.returned(up_at).await
    }

    async fn returned(&self, up_at: Duration) -> Result<(), String> {
        let first = self
            .until("a request answered by the recovered zone", || {
                self.traffic
                    .first_answer(up_at, |o| o.zone.as_deref() == Some(NEAR))
            })
            .await?;
        self.say_at_as(
            first.done,
            Severity::Ok,
            format!(
                "zone back, traffic returned to {NEAR} in {} (first request answered there)",
                ms(first.done.saturating_sub(up_at))
            ),
        );
        let all = self
            .all_in(NEAR, "all traffic back in the nearest zone")
            .await?;
        self.say_at_as(
            all,
            Severity::Ok,
            format!(
                "all traffic in {NEAR} again {} after it came back; table: {}",
                ms(all.saturating_sub(up_at)),
                self.split()
            ),
        );
        Ok(())
    }

    async fn latency(&self) -> Result<(), String> {
        self.warm_up().await?;
        self.sleep_until(self.opts.fault_at).await;
        let before = self.median_latency(
            self.opts.fault_at.saturating_sub(Duration::from_secs(2)),
            self.opts.fault_at,
        );
        let slow_at = self.traffic.now();
        self.demo.set(NEAR, "slow")?;
        self.say_as(
            Severity::Warning,
            format!(
                "zone {NEAR} SLOW (+{SLOW_EXTRA_MS} ms per request); median answer before: {}",
                before.map(ms).unwrap_or_else(|| "–".into())
            ),
        );
        let re = self
            .until("the router ranking another zone first", || {
                let z = self.zone(NEAR)?;
                (z.position > 0).then(|| (self.traffic.now(), z))
            })
            .await?;
        let next = self.zone(NEXT);
        self.say_at(
            re.0,
            format!(
                "router re-ranked {} after the slowdown: {NEXT} ({}) ahead of {NEAR} ({}); table generation {}",
                ms(re.0 - slow_at),
                fmt_lat(next.and_then(|z| z.latency_ms)),
                fmt_lat(re.1.latency_ms),
                self.generation()
            ),
        );
        let first = self
            .until("a request answered outside the slow zone", || {
                self.traffic
                    .first_answer(slow_at, |o| o.zone.as_deref() != Some(NEAR))
            })
            .await?;
        self.say_at(
            first.done,
            format!(
                "traffic moved to {} in {} (first request answered there, reason={})",
                first.zone.as_deref().unwrap_or("?"),
                ms(first.done.saturating_sub(slow_at)),
                first.reason.as_deref().unwrap_or("?")
            ),
        );
        let all = self.all_in(NEXT, "all traffic in the next zone").await?;
        let (n, failed, _) = self.tally(slow_at, all);
        self.say_at(
            all,
            format!(
                "all traffic in {NEXT} {} after the slowdown ({n} requests meanwhile, {failed} failed)",
                ms(all.saturating_sub(slow_at))
            ),
        );
        let settle = (all + Duration::from_secs(2)).min(self.opts.fault_at + self.opts.hold);
        self.sleep_until(settle).await;
        if let Some(after) = self.median_latency(all, settle) {
            self.say(format!(
                "median answer now {} (slow zone avoided)",
                ms(after)
            ));
        }
        self.sleep_until(self.opts.fault_at + self.opts.hold).await;
        self.recover_zone(NEAR, "up").await
    }

    async fn spillover(&self) -> Result<(), String> {
        self.warm_up().await?;
        self.sleep_until(self.opts.fault_at).await;
        let zone = self
            .demo
            .zones
            .iter()
            .find(|z| z.zone == NEAR)
            .ok_or("the demo has no zone us-east-1a")?
            .clone();
        let victim = *zone.endpoints.first().ok_or("us-east-1a has no endpoint")?;
        let n_eps = zone.endpoints.len();
        let down_at = self.traffic.now();
        self.demo.set_endpoint(victim, true)?;
        self.say_as(
            Severity::Warning,
            format!(
                "endpoint {victim} in {NEAR} DOWN: the zone keeps {} of {n_eps}",
                n_eps - 1
            ),
        );
        let first = self
            .until("a request answered outside the degraded zone", || {
                self.traffic
                    .first_answer(down_at, |o| o.zone.as_deref() != Some(NEAR))
            })
            .await?;
        self.say_at(
            first.done,
            format!(
                "first request answered by {} {} after the fault (reason={})",
                first.zone.as_deref().unwrap_or("?"),
                ms(first.done.saturating_sub(down_at)),
                first.reason.as_deref().unwrap_or("?")
            ),
        );
        let out = self
            .until(
                "the router spilling part of the zone's traffic over",
                || {
                    let z = self.zone(NEAR)?;
                    (z.healthy < z.endpoints && z.share < 1.0).then(|| (self.traffic.now(), z))
                },
            )
            .await?;
        self.say_at(
            out.0,
            format!(
                "router: {NEAR} has {}/{} healthy, so it keeps {:.0}% ({}/{} x 1.4 overprovisioning) {} after the fault; table: {}",
                out.1.healthy,
                out.1.endpoints,
                out.1.share * 100.0,
                out.1.healthy,
                out.1.endpoints,
                ms(out.0 - down_at),
                self.split()
            ),
        );
        let from = self.traffic.now() + Duration::from_millis(200);
        let to = (from + Duration::from_secs(3)).min(self.opts.fault_at + self.opts.hold);
        self.sleep_until(to + Duration::from_millis(300)).await;
        let (n, by) = self.measured_split(from, to);
        self.say(format!(
            "measured over {}: {}",
            ms(to.saturating_sub(from)),
            Self::fmt_split(n, &by)
        ));
        self.sleep_until(self.opts.fault_at + self.opts.hold).await;
        let up_at = self.traffic.now();
        self.demo.set_endpoint(victim, false)?;
        self.say_as(Severity::Ok, format!("endpoint {victim} in {NEAR} back up"));
        let whole = self
            .until("the zone taking all its traffic back", || {
                let z = self.zone(NEAR)?;
                (z.healthy == z.endpoints && z.share >= 0.999).then(|| self.traffic.now())
            })
            .await?;
        let all = self
            .all_in(NEAR, "all traffic back in the nearest zone")
            .await?;
        let mut lines = [
            (
                whole,
                format!(
                    "router: {NEAR} healthy {n_eps}/{n_eps} again {} after the endpoint came back; table: {}",
                    ms(whole.saturating_sub(up_at)),
                    self.split()
                ),
            ),
            (
                all,
                format!(
                    "all traffic in {NEAR} again {} after the endpoint came back",
                    ms(all.saturating_sub(up_at))
                ),
            ),
        ];
        lines.sort_by_key(|l| l.0);
        for (t, msg) in lines {
            self.say_at(t, msg);
        }
        Ok(())
    }

    /// Undoes any fault the scenario injected (also after a failed step).
    fn restore(&self) {
        let _ = self.demo.set(NEAR, "up");
        for z in &self.demo.zones {
            for a in &z.endpoints {
                let _ = self.demo.set_endpoint(*a, false);
            }
        }
    }
}

/// Runs a scenario against a running demo router; Err when an expected change did not
/// happen in time. Traffic stops when the scenario ends.
pub async fn run(
    scenario: Scenario,
    router: Arc<Router>,
    demo: Arc<Demo>,
    opts: Options,
) -> Result<(), String> {
    let data = router.data_addr;
    let target = if data.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, data.port()))
    } else if data.ip().is_loopback() {
        data
    } else {
        return Err(format!(
            "the scenario drives traffic on loopback only, and the data plane listens on {data}"
        ));
    };
    // Start from a router that is ready and ranks the local zone first.
    let ready_by = Instant::now() + opts.step_timeout;
    loop {
        let t = router.table();
        let near_first = t
            .clusters
            .first()
            .and_then(|c| c.zones.first())
            .is_some_and(|z| &*z.zone == NEAR && z.healthy == z.endpoints.len());
        if router.readiness().is_ok() && near_first {
            break;
        }
        if Instant::now() >= ready_by {
            return Err(format!(
                "the router did not become ready with {NEAR} nearest within {}",
                ms(opts.step_timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let traffic = Arc::new(Traffic {
        start: Instant::now(),
        log: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        in_flight: AtomicUsize::new(0),
    });
    let d = Driver {
        router,
        demo,
        traffic: traffic.clone(),
        opts: opts.clone(),
        name: scenario.name(),
    };
    let fault = match scenario {
        Scenario::Failover => format!("zone {NEAR} goes down"),
        Scenario::Latency => format!("zone {NEAR} gets {SLOW_EXTRA_MS} ms slower"),
        Scenario::Spillover => format!("one of the endpoints of {NEAR} goes down"),
    };
    d.say(format!(
        "scenario {}: {} req/s to http://{target}/; at t={:.0}s {fault}, {:.0} s later it recovers",
        scenario.name(),
        opts.rate,
        opts.fault_at.as_secs_f64(),
        opts.hold.as_secs_f64()
    ));
    let load = tokio::spawn(drive(traffic.clone(), target, opts.rate));
    let result = match scenario {
        Scenario::Failover => d.failover().await,
        Scenario::Latency => d.latency().await,
        Scenario::Spillover => d.spillover().await,
    };
    d.restore();
    traffic.stop.store(true, Ordering::Relaxed);
    let _ = load.await;
    let log = traffic.snapshot();
    let failed = log.iter().filter(|o| !o.ok).count();
    let (n, by) = d.measured_split(Duration::ZERO, Duration::MAX);
    let severity = if result.is_ok() {
        Severity::Ok
    } else {
        Severity::Error
    };
    d.say_as(
        severity,
        format!(
            "scenario {} {}: {} requests in {:.1} s, {failed} failed; answered by {}",
            scenario.name(),
            if result.is_ok() { "done" } else { "FAILED" },
            log.len(),
            traffic.now().as_secs_f64(),
            Driver::fmt_split(n, &by)
        ),
    );
    result
}
