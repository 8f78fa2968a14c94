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
use crate::dataplane::listener::{self, bind, spawn_data_threads};
use crate::telemetry::{Events, Metrics};
use crate::upstream;

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
    /// Where the listeners really are (port 0 in config picks a free one).
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The listener's certificates when it terminates TLS; a reload re-reads them.
    pub tls: Option<Arc<crate::upstream::tls::ReloadableServerTls>>,
    shutdown_tx: watch::Sender<bool>,
    /// Demo controls, when the router runs the demo.
    pub demo: Mutex<Option<Arc<crate::ops::demo::Demo>>>,
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

    let key = "listener.address";
    let (data_listener, per_core) = match plane {
        DataPlane::PerCore(n) if n > 1 => {
            // A plain bind first: it fails while anything holds the address, another
            // router's SO_REUSEPORT sockets included, which the sockets below would otherwise
            // silently join (and share its traffic). It also settles the port when the
            // config says 0.
            let addr = bind(config.listener.address, key, false)
                .await
                .map_err(StartError)?
                .local_addr()
                .map_err(|e| StartError(format!("{key}: {e}")))?;
            let first = bind(addr, key, true).await.map_err(StartError)?;
            let mut more = Vec::new();
            for _ in 1..n {
                more.push(bind(addr, key, true).await.map_err(StartError)?);
            }
            (first, Some(more))
        }
        _ => (
            bind(config.listener.address, key, false)
                .await
                .map_err(StartError)?,
            None,
        ),
    };
    let admin_listener = bind(config.admin.address, "admin.address", false)
        .await
        .map_err(StartError)?;
    let data_addr = data_listener
        .local_addr()
        .map_err(|e| StartError(format!("listener: {e}")))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError(format!("admin: {e}")))?;
    let tls = match &config.listener.tls {
        Some(t) => Some(Arc::new(
            crate::upstream::tls::ReloadableServerTls::new(&tls_pairs(t))
                .map_err(|e| StartError(format!("listener.tls: {e}")))?,
        )),
        None => None,
    };

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
        tls: tls.clone(),
        shutdown_tx,
        demo: Mutex::new(None),
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
    metrics.config_last_reload_success.set(unix_now());
    events.push("reload", format!("started with {}", config.summary()));

    // max_connections holds for the whole process, however many listeners.
    let max = config.listener.max_connections;
    let limit = (Arc::new(Semaphore::new(max)), max);
    let data = match per_core {
        None => tokio::spawn(listener::serve_data(
            data_listener,
            control.clone(),
            router.shutdown_tx.subscribe(),
            tls,
            limit,
        )),
        Some(more) => {
            let threads = spawn_data_threads(
                data_listener,
                more,
                &control,
                &router.shutdown_tx,
                tls,
                limit,
            )
            .map_err(StartError)?;
            tokio::spawn(async move {
                for t in threads {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
            })
        }
    };
    tokio::spawn(reconcile::run(control.clone(), builder));
    tokio::spawn(crate::ops::admin::serve(admin_listener, router.clone()));
    router.listening.store(true, Ordering::Relaxed);
    info!(
        listener = %data_addr, admin = %admin_addr,
        "edge-router {} serving: {}", env!("CARGO_PKG_VERSION"), config.summary()
    );
    Ok(Running { router, data })
}

fn tls_pairs(t: &config::ListenerTls) -> Vec<crate::upstream::tls::CertPair> {
    t.certificates
        .iter()
        .map(|c| crate::upstream::tls::CertPair {
            cert: c.cert.clone(),
            key: c.key.clone(),
        })
        .collect()
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Router {
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
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        match &result {
            Ok(msg) => {
                info!(target: "reload", "{msg}");
                self.events.push("reload", msg.clone());
                self.metrics.config_last_reload_success.set(unix_now());
            }
            Err(e) => {
                error!(target: "reload", "reload failed, keeping the running config: {e}");
                self.events
                    .push("reload", format!("reload failed, running config kept: {e}"));
            }
        }
        result
    }

    fn try_reload(&self) -> Result<String, String> {
        let path = self
            .config_path
            .as_ref()
            .ok_or_else(|| "this router was started without a config file".to_string())?;
        let mut new = config::load(path).map_err(|e| e.to_string())?;
        let old = self.control.config.load_full();
        let mut notes = Vec::new();
        if new.listener.address != old.listener.address {
            notes.push(format!(
                "listener.address {} -> {} needs a restart; still serving on {}",
                old.listener.address, new.listener.address, old.listener.address
            ));
            new.listener.address = old.listener.address;
        }
        if new.admin.address != old.admin.address {
            notes.push(format!(
                "admin.address {} -> {} needs a restart; still serving on {}",
                old.admin.address, new.admin.address, old.admin.address
            ));
            new.admin.address = old.admin.address;
        }
        if new.listener.tls.is_some() != old.listener.tls.is_some() {
            notes.push("turning TLS on or off needs a restart".to_string());
            new.listener.tls = old.listener.tls.clone();
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
        // Certificates are read again even when their paths did not change (the usual
        // rotation rewrites the files). New handshakes get them; open connections keep the
        // ones they started with. A bad pair fails the reload and keeps the running ones.
        let mut certs = None;
        if let (Some(tls), Some(t)) = (&self.tls, &new.listener.tls) {
            tls.reload(&tls_pairs(t))
                .map_err(|e| format!("{}: listener.tls: {e}", new.source))?;
            certs = Some(t.certificates.len());
        }
        let summary = new.summary();
        self.control.config.store(Arc::new(new));
        self.control.config_changed.notify_one();
        let mut msg = format!("reloaded {summary}");
        if let Some(n) = certs {
            msg.push_str(&format!("; {n} listener certificate(s) reloaded"));
        }
        for n in notes {
            warn!(target: "reload", "{n}");
            msg.push_str("; ");
            msg.push_str(&n);
        }
        Ok(msg)
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
            self.events.push("reload", "draining for shutdown".into());
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
