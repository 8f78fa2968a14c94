//! Wiring: listeners, the table builder task, reload and drain. Data flows one way:
//! probes -> health state -> table builder -> arc-swap -> request path.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{error, info, warn};

use crate::config::{self, Config};
use crate::control::probe::Health;
use crate::control::reconcile::{self, publish_zone_shares, Builder};
use crate::control::{Control, ProxyState, Table};
use crate::dataplane::listener::bind;
use crate::ops::doors::{self, bind_door, Door};
use crate::telemetry::{Events, Metrics, Severity};
use crate::upstream;

/// Switches the admin API offers under /demo: taking simulated zones down and up.
pub trait ZoneControls: Send + Sync {
    /// GET /demo: the zones and their state.
    fn describe(&self) -> serde_json::Value;
    /// POST /demo/zones/{zone}/{action}: what happened, or why not.
    fn set(&self, zone: &str, action: &str) -> Result<String, String>;
}

/// The running router: what the admin API and the signal handlers act on.
pub struct Router {
    /// The control plane: config, health, the published table.
    pub control: Arc<Control>,
    pub proxy: Arc<ProxyState>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub config_path: Option<PathBuf>,
    pub draining: AtomicBool,
    pub listening: AtomicBool,
    /// Where the first listener really is (port 0 in config picks a free one); every
    /// listener's address is in [`Router::listener_addrs`].
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The running listeners, in config order.
    doors: Mutex<Vec<Door>>,
    /// The process-wide connection cap every listener takes from.
    limit: (Arc<Semaphore>, usize),
    /// Where listeners bound after start-up run (always the shared runtime).
    shutdown_tx: watch::Sender<bool>,
    /// The listening sockets a binary upgrade hands over.
    pub handover: crate::ops::upgrade::Handover,
    /// The last minutes of every zone, sampled once a second.
    pub history: Arc<crate::ops::history::History>,
    /// The /demo switches, when something simulated stands behind the router (the demo
    /// plugs itself in; a production router has none).
    pub zone_controls: Mutex<Option<Arc<dyn ZoneControls>>>,
}

/// An error at start-up: the message for stderr and the exit code.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Handle on a started router.
pub struct Running {
    pub router: Arc<Router>,
    data: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Waits until the data listener has drained after a shutdown.
    pub async fn wait(self) {
        let _ = self.data.await;
        self.router.health.stop();
        // Lines of the last requests are still in the threads' buffers.
        crate::telemetry::access::flush();
    }
}

/// Where the data plane runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPlane {
    /// On the runtime that calls [`start_with`], from one listener socket.
    Shared,
    /// On N threads, each a current-thread runtime accepting from its own listener socket
    /// (SO_REUSEPORT: the kernel spreads connections); the control plane stays on the caller's
    /// runtime. One router: one table, one metrics registry, one health state.
    PerCore(usize),
}

/// The worker threads `run` gives its runtime, and why, for the log: `--workers` when given;
/// otherwise one (the current-thread scheduler) when the process may use only one CPU
/// (affinity or a cgroup quota, both of which `available_parallelism` honours), since a
/// multi-thread scheduler there only adds cross-thread wake-ups; otherwise one per CPU.
pub fn runtime_workers(workers: Option<usize>) -> (Option<usize>, String) {
    let cpus = std::thread::available_parallelism().map(|n| n.get());
    runtime_workers_for(workers, cpus.ok())
}

fn runtime_workers_for(workers: Option<usize>, cpus: Option<usize>) -> (Option<usize>, String) {
    match (workers, cpus) {
        (Some(n), _) => (
            Some(n.max(1)),
            format!(
                "{} (--workers {n})",
                if n <= 1 {
                    "current-thread runtime"
                } else {
                    "multi-thread runtime"
                }
            ),
        ),
        (None, Some(1)) => (
            Some(1),
            "current-thread runtime (the process may use only one CPU: affinity or cgroup quota)"
                .into(),
        ),
        (None, Some(n)) => (
            None,
            format!("multi-thread runtime, {n} workers (one per CPU the process may use)"),
        ),
        (None, None) => (
            None,
            "multi-thread runtime (the CPUs available could not be read)".into(),
        ),
    }
}

/// Binds both listeners and starts every task.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, StartError> {
    start_with(config, config_path, DataPlane::Shared).await
}

/// [`start`], with the data plane where `plane` says.
pub async fn start_with(
    config: Config,
    config_path: Option<PathBuf>,
    plane: DataPlane,
) -> Result<Running, StartError> {
    crate::telemetry::access::start(config.listener.access_log_path.as_deref())
        .map_err(|e| StartError(format!("listener.access_log_path: {e}")))?;
    let metrics = Arc::new(Metrics::new());
    let events = Arc::new(Events::new());
    let health = Arc::new(Health::new(metrics.clone(), events.clone()));

    let mut bound = Vec::with_capacity(config.listeners.len());
    for spec in &config.listeners {
        bound.push(bind_door(&config, spec, plane).await.map_err(StartError)?);
    }
    let admin_listener = bind(config.admin.address, "admin.address", false)
        .await
        .map_err(StartError)?;
    // Every listening socket, ready to hand to a new binary (SIGUSR2).
    let handover = crate::ops::upgrade::Handover::default();
    for b in &bound {
        b.hand_over(&config, &handover);
    }
    handover.keep("admin.address", &admin_listener, false);
    let data_addr = bound
        .first()
        .map(|b| b.local())
        .ok_or_else(|| StartError("no listener".into()))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError(format!("admin: {e}")))?;

    let config = Arc::new(config);
    let mut builder = Builder::new(health.clone(), metrics.clone());
    let table = builder
        .build(1, config.clone())
        .map_err(|e| StartError(format!("{}: {e}", config.source)))?;
    let (shutdown_tx, _) = watch::channel(false);
    let proxy = Arc::new(ProxyState {
        table: ArcSwap::from_pointee(table),
        metrics: metrics.clone(),
    });
    let control = Arc::new(Control {
        proxy: proxy.clone(),
        health: health.clone(),
        metrics: metrics.clone(),
        events: events.clone(),
        config: ArcSwap::new(config.clone()),
        config_changed: Notify::new(),
        generation: AtomicU64::new(1),
    });
    let router = Arc::new(Router {
        control: control.clone(),
        proxy,
        health,
        metrics: metrics.clone(),
        events: events.clone(),
        config_path,
        draining: AtomicBool::new(false),
        listening: AtomicBool::new(false),
        data_addr,
        admin_addr,
        doors: Mutex::new(Vec::new()),
        limit: {
            // max_connections holds for the whole process, however many listeners.
            let max = config.listener.max_connections;
            (Arc::new(Semaphore::new(max)), max)
        },
        shutdown_tx,
        handover,
        history: Arc::new(crate::ops::history::History::new()),
        zone_controls: Mutex::new(None),
    });
    metrics.table_generation.set(1);
    metrics.table_swaps.inc();
    publish_zone_shares(&metrics, &router.table());
    metrics
        .config_reloads
        .with_label_values(&["success"])
        .inc_by(0);
    metrics
        .config_reloads
        .with_label_values(&["failure"])
        .inc_by(0);
    for result in ["success", "failure"] {
        metrics.upgrades.with_label_values(&[result]).inc_by(0);
    }
    metrics.config_last_reload_success.set(unix_now());
    events.push("reload", format!("started with {}", config.summary()));

    let mut doors = Vec::with_capacity(bound.len());
    for b in bound {
        doors.push(
            b.start(&control, router.limit.clone())
                .map_err(StartError)?,
        );
    }
    if let Ok(mut slot) = router.doors.lock() {
        *slot = doors;
    }
    // Ends once every listener has drained after a shutdown.
    let data = {
        let router = router.clone();
        let mut shutdown = router.shutdown_tx.subscribe();
        tokio::spawn(async move {
            while !*shutdown.borrow_and_update() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
            let tasks: Vec<_> = match router.doors.lock() {
                Ok(mut d) => d.drain(..).map(Door::into_task).collect(),
                Err(_) => Vec::new(),
            };
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    tokio::spawn(reconcile::run(control.clone(), builder));
    tokio::spawn(crate::ops::history::run(
        router.history.clone(),
        control.clone(),
        metrics.clone(),
        router.shutdown_tx.subscribe(),
    ));
    tokio::spawn(crate::ops::admin::serve(admin_listener, router.clone()));
    router.listening.store(true, Ordering::Relaxed);
    info!(
        listener = %data_addr, admin = %admin_addr,
        "edge-router {} serving: {}", env!("CARGO_PKG_VERSION"), config.summary()
    );
    Ok(Running { router, data })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Router {
    /// Every running listener: name, protocol and the address it really listens on.
    pub fn listener_addrs(&self) -> Vec<(String, &'static str, SocketAddr)> {
        match self.doors.lock() {
            Ok(d) => d
                .iter()
                .map(|d| (d.spec.name.clone(), d.spec.protocol.as_str(), d.local))
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Where the listener of this name really listens.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listener_addrs()
            .into_iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, a)| a)
    }

    pub fn table(&self) -> Arc<Table> {
        self.control.table()
    }

    /// The running config.
    pub fn config(&self) -> Arc<Config> {
        self.control.config.load_full()
    }

    /// Re-reads the config file. An invalid file changes nothing; listener addresses are
    /// not rebound (that needs a restart) and the answer says so.
    pub fn reload(&self) -> Result<String, String> {
        let result = self.try_reload();
        // Also what logrotate's SIGHUP asks for, so even after a failed reload. Before the
        // reload's own log line: every access line logged before it is out first.
        self.reopen_logs();
        let label = if result.is_ok() { "success" } else { "failure" };
        // A reload that had to keep part of the old config (restart needed) is a warning.
        let severity = match &result {
            Ok((_, true)) => Severity::Warning,
            _ => Severity::Info,
        };
        let result = result.map(|(msg, _)| msg);
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(msg) => {
                info!(target: "reload", "{msg}");
                self.events.push_with("reload", severity, msg.clone());
                self.metrics.config_last_reload_success.set(unix_now());
            }
            Err(e) => {
                error!(target: "reload", "reload failed, keeping the running config: {e}");
                self.events.push_with(
                    "reload",
                    Severity::Error,
                    format!("reload failed, running config kept: {e}"),
                );
            }
        }
        result
    }

    /// The message, and whether part of the new config waits for a restart.
    fn try_reload(&self) -> Result<(String, bool), String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| "this router was started without a config file".to_string())?;
        let mut new = config::load(path).map_err(|e| e.to_string())?;
        let old = self.control.config.load_full();
        let mut notes = Vec::new();
        if new.admin.address != old.admin.address {
            notes.push(format!(
                "admin.address {} -> {} needs a restart; still serving on {}",
                old.admin.address, new.admin.address, old.admin.address
            ));
            new.admin.address = old.admin.address;
        }
        if new.listener.http1_engine != old.listener.http1_engine {
            notes.push(format!(
                "listener.http1_engine {} -> {} needs a restart; still {}",
                old.listener.http1_engine.as_str(),
                new.listener.http1_engine.as_str(),
                old.listener.http1_engine.as_str()
            ));
            new.listener.http1_engine = old.listener.http1_engine;
        }
        // Clients of every cluster are rebuilt by the builder; check them here first so a
        // bad CA file fails the reload instead of a later table build.
        for c in &new.clusters {
            upstream::connector(c)
                .map_err(|e| format!("{}: cluster {:?}: tls: {e}", new.source, c.name))?;
        }
        // One reload at a time: the listener set is planned and changed under this lock.
        let mut doors = self
            .doors
            .lock()
            .map_err(|_| "listener registry unavailable".to_string())?;
        let plan = doors::plan(&doors, &mut new, &mut notes);
        // Certificates are read again even when their paths did not change (the usual
        // rotation rewrites the files). New handshakes get them; open connections keep the
        // ones they started with. A bad pair fails the reload and keeps the running ones:
        // every pair is checked before any is swapped in.
        let mut rotations = Vec::new();
        for (i, spec) in &plan.keep {
            if let (Some(tls), config::Protocol::Https(t)) = (&doors[*i].tls, &spec.protocol) {
                let pairs = doors::tls_pairs(t);
                crate::upstream::tls::ReloadableServerTls::new(&pairs).map_err(|e| {
                    format!("{}: {}: {e}", new.source, doors::key(&new, spec, "tls"))
                })?;
                rotations.push((tls.clone(), pairs));
            }
        }
        // New sockets are all bound before anything changes, so a taken address fails the
        // reload as a whole.
        let handle = tokio::runtime::Handle::current();
        let mut bound = Vec::new();
        for spec in &plan.add {
            let b = handle
                .block_on(bind_door(&new, spec, DataPlane::Shared))
                .map_err(|e| format!("{}: {e}", new.source))?;
            b.hand_over(&new, &self.handover);
            bound.push(b);
        }
        let certs = rotations.len();
        for (tls, pairs) in rotations {
            tls.reload(&pairs)
                .map_err(|e| format!("{}: listener tls: {e}", new.source))?;
        }
        let mut running: Vec<Door> = Vec::new();
        for (i, d) in std::mem::take(&mut *doors).into_iter().enumerate() {
            if plan.keep.iter().any(|(k, _)| *k == i) {
                running.push(d);
            } else {
                notes.push(format!(
                    "listener {:?} on {} removed; its connections drain",
                    d.spec.name, d.local
                ));
                // Its task drains on its own; nothing waits for it here.
                self.handover.forget(d.local);
                d.stop();
            }
        }
        for b in bound {
            let local = b.local();
            let name = format!("{:?}", b.spec().name);
            match b.start(&self.control, self.limit.clone()) {
                Ok(d) => {
                    notes.push(format!("listener {name} added on {local}"));
                    running.push(d);
                }
                Err(e) => notes.push(format!("listener {name} could not start: {e}")),
            }
        }
        *doors = running;
        drop(doors);
        let summary = new.summary();
        self.control.config.store(Arc::new(new));
        self.control.config_changed.notify_one();
        let mut msg = format!("reloaded {summary}");
        if certs > 0 {
            msg.push_str(&format!("; certificates of {certs} listener(s) reloaded"));
        }
        let kept_old = !notes.is_empty();
        for n in notes {
            warn!(target: "reload", "{n}");
            msg.push_str("; ");
            msg.push_str(&n);
        }
        Ok((msg, kept_old))
    }

    /// Writes the buffered access-log lines and opens its file again (the path of the
    /// running config): after logrotate moved it away, lines go to the new file.
    pub fn reopen_logs(&self) {
        let path = self.config().listener.access_log_path.clone();
        if let Err(e) = crate::telemetry::access::reopen(path.as_deref()) {
            error!(target: "reload", "listener.access_log_path: {e}; still writing where it was");
        }
    }

    /// Stops accepting, turns /readyz to 503 and lets in-flight requests finish.
    pub fn shutdown(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            info!(
                "draining: no new connections; in-flight requests get up to {:?}",
                self.control.config.load().listener.drain_timeout
            );
            self.events
                .push_with("reload", Severity::Warning, "draining for shutdown".into());
            self.handover.release();
            if let Ok(doors) = self.doors.lock() {
                doors.iter().for_each(Door::stop);
            }
            let _ = self.shutdown_tx.send(true);
        }
    }

    /// Ready: listening, not draining, every cluster with an endpoint known healthy.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining".into());
        }
        if !self.listening.load(Ordering::Relaxed) {
            return Err("listeners not up".into());
        }
        let t = self.table();
        let not_ready: Vec<&str> = t
            .clusters
            .iter()
            .filter(|c| c.zones.iter().all(|z| z.healthy == 0))
            .map(|c| &*c.name)
            .collect();
        if not_ready.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "no healthy endpoint in cluster(s): {}",
                not_ready.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runtime_workers_for;

    #[test]
    fn one_usable_cpu_means_one_worker_unless_told() {
        let (w, why) = runtime_workers_for(None, Some(1));
        assert_eq!(w, Some(1));
        assert!(why.starts_with("current-thread runtime") && why.contains("one CPU"));
        assert_eq!(runtime_workers_for(None, Some(4)).0, None);
        assert_eq!(runtime_workers_for(None, None).0, None);
        // --workers wins over what the machine offers.
        assert_eq!(runtime_workers_for(Some(3), Some(1)).0, Some(3));
        assert_eq!(runtime_workers_for(Some(1), Some(8)).0, Some(1));
        assert_eq!(runtime_workers_for(Some(0), Some(8)).0, Some(1));
    }
}
