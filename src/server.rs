//! Wiring: listeners, the table builder task, reload and drain. Data flows one way:
//! probes -> health state -> table builder -> arc-swap -> request path.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tracing::{error, info, warn};

use crate::config::{self, Config, EndpointAddress};
use crate::conn;
use crate::discovery::{Discovery, Target, TtlBounds};
use crate::h1;
use crate::health::{Events, Health, Wanted};
use crate::metrics::{ClusterMetrics, Metrics};
use crate::proxy::{self, ProxyState, Table, UpstreamClient};
use crate::table::{ClusterInput, ClusterRuntime, EndpointEntry, TableBuilder};
use crate::upstream;

/// The running router: what the admin API and the signal handlers act on.
pub struct Router {
    pub proxy: Arc<ProxyState>,
    pub health: Arc<Health>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub config: ArcSwap<Config>,
    pub config_path: Option<PathBuf>,
    pub draining: AtomicBool,
    pub listening: AtomicBool,
    /// Where the listeners really are (port 0 in config picks a free one).
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The listener's certificates when it terminates TLS; a reload re-reads them.
    pub tls: Option<Arc<crate::tls::ReloadableServerTls>>,
    config_changed: Notify,
    shutdown_tx: watch::Sender<bool>,
    generation: AtomicU64,
    /// Demo controls, when the router runs the demo.
    pub demo: Mutex<Option<Arc<crate::demo::Demo>>>,
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
                .await?
                .local_addr()
                .map_err(|e| StartError(format!("{key}: {e}")))?;
            let first = bind(addr, key, true).await?;
            let mut more = Vec::new();
            for _ in 1..n {
                more.push(bind(addr, key, true).await?);
            }
            (first, Some(more))
        }
        _ => (bind(config.listener.address, key, false).await?, None),
    };
    let admin_listener = bind(config.admin.address, "admin.address", false).await?;
    let data_addr = data_listener
        .local_addr()
        .map_err(|e| StartError(format!("listener: {e}")))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| StartError(format!("admin: {e}")))?;
    let tls = match &config.listener.tls {
        Some(t) => Some(Arc::new(
            crate::tls::ReloadableServerTls::new(&tls_pairs(t))
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
    let router = Arc::new(Router {
        proxy: Arc::new(ProxyState {
            table: ArcSwap::from_pointee(table),
            metrics: metrics.clone(),
        }),
        health,
        metrics: metrics.clone(),
        events: events.clone(),
        config: ArcSwap::new(config.clone()),
        config_path,
        draining: AtomicBool::new(false),
        listening: AtomicBool::new(false),
        data_addr,
        admin_addr,
        tls: tls.clone(),
        config_changed: Notify::new(),
        shutdown_tx,
        generation: AtomicU64::new(1),
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
        None => tokio::spawn(serve_data(data_listener, router.clone(), tls, limit)),
        Some(more) => {
            let threads = spawn_data_threads(data_listener, more, &router, tls, limit)?;
            tokio::spawn(async move {
                for t in threads {
                    let _ = tokio::task::spawn_blocking(move || t.join()).await;
                }
            })
        }
    };
    tokio::spawn(builder_loop(router.clone(), builder));
    tokio::spawn(crate::admin::serve(admin_listener, router.clone()));
    router.listening.store(true, Ordering::Relaxed);
    info!(
        listener = %data_addr, admin = %admin_addr,
        "edge-router {} serving: {}", env!("CARGO_PKG_VERSION"), config.summary()
    );
    Ok(Running { router, data })
}

fn tls_pairs(t: &config::ListenerTls) -> Vec<crate::tls::CertPair> {
    t.certificates
        .iter()
        .map(|c| crate::tls::CertPair {
            cert: c.cert.clone(),
            key: c.key.clone(),
        })
        .collect()
}

/// One thread per listener for [`DataPlane::PerCore`], each running `serve_data` on its own
/// current-thread runtime until the router drains.
fn spawn_data_threads(
    first: TcpListener,
    more: Vec<TcpListener>,
    router: &Arc<Router>,
    tls: Option<Arc<crate::tls::ReloadableServerTls>>,
    limit: (Arc<Semaphore>, usize),
) -> Result<Vec<std::thread::JoinHandle<()>>, StartError> {
    let mut threads = Vec::new();
    for (i, l) in std::iter::once(first).chain(more).enumerate() {
        // Registered again with the reactor of the thread that serves it.
        let l = l
            .into_std()
            .map_err(|e| StartError(format!("listener: {e}")))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartError(format!("cannot start a data-plane runtime: {e}")))?;
        let (router, tls, limit) = (router.clone(), tls.clone(), limit.clone());
        let t = std::thread::Builder::new()
            .name(format!("edge-data-{i}"))
            .spawn(move || {
                // Idle upstream connections stay with the thread (the reactor) that opened them.
                crate::upstream::set_pool_shard(i + 1);
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => serve_data(l, router, tls, limit).await,
                        Err(e) => error!("data-plane thread {i}: listener: {e}"),
                    }
                });
            })
            .map_err(|e| StartError(format!("cannot start a data-plane thread: {e}")))?;
        threads.push(t);
    }
    Ok(threads)
}

async fn bind(addr: SocketAddr, key: &str, reuseport: bool) -> Result<TcpListener, StartError> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| StartError(format!("{key} {addr}: {e}")))?;
    // Lets a restarted router bind while old connections sit in TIME_WAIT.
    let _ = socket.set_reuseaddr(true);
    if reuseport {
        socket
            .set_reuseport(true)
            .map_err(|e| StartError(format!("{key} {addr}: SO_REUSEPORT: {e}")))?;
    }
    socket
        .bind(addr)
        .map_err(|e| StartError(format!("{key} {addr}: cannot bind: {e}")))?;
    socket
        .listen(4096)
        .map_err(|e| StartError(format!("{key} {addr}: cannot listen: {e}")))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Router {
    pub fn table(&self) -> Arc<Table> {
        self.proxy.table.load_full()
    }

    /// Re-reads the config file. An invalid file changes nothing; listener addresses are
    /// not rebound (that needs a restart) and the answer says so.
    pub fn reload(&self) -> Result<String, String> {
        let result = self.try_reload();
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
        let old = self.config.load_full();
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
        self.config.store(Arc::new(new));
        self.config_changed.notify_one();
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

    /// Stops accepting, turns /readyz to 503 and lets in-flight requests finish.
    pub fn shutdown(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            info!(
                "draining: no new connections; in-flight requests get up to {:?}",
                self.config.load().listener.drain_timeout
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

/// Turns config + health into tables.
pub struct Builder {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    tables: TableBuilder,
    runtimes: HashMap<String, ClusterSlot>,
    endpoints: Vec<Vec<EndpointEntry>>,
    config: Option<Arc<Config>>,
    last_fingerprint: Vec<u64>,
    /// The resolver for DNS-named endpoints (made when the first name appears) and the
    /// `dns.nameserver` it was made for.
    discovery: Option<(Option<SocketAddr>, Discovery)>,
    /// One background watch per (cluster, name): resolution never runs on the request path.
    watches: HashMap<(String, Target), DnsWatch>,
    /// Grows whenever the set of endpoints changes, so the new set is swapped in (and shown
    /// in /routes) even when it does not change what requests pick yet.
    membership: u64,
}

/// What a cluster keeps across tables: its config (to see what a reload changed), its
/// clients and the connector its probers are made with.
struct ClusterSlot {
    config: config::ClusterConfig,
    runtime: Arc<ClusterRuntime<UpstreamClient>>,
    connector: upstream::Connector,
}

/// A name kept resolved by a `Discovery::watch` task.
struct DnsWatch {
    rx: watch::Receiver<Arc<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
    bounds: TtlBounds,
    /// Addresses from a previous watch of the same name (before a reload restarted it),
    /// used until this one has its first answer.
    carried: Arc<Vec<SocketAddr>>,
}

impl DnsWatch {
    /// The addresses to use now; marks the current answer as seen.
    fn current(&mut self) -> Arc<Vec<SocketAddr>> {
        let v = self.rx.borrow_and_update().clone();
        if v.is_empty() {
            self.carried.clone()
        } else {
            v
        }
    }
}

impl Drop for DnsWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn dns_target(a: &EndpointAddress) -> Option<Target> {
    match a {
        EndpointAddress::Ip(_) => None,
        EndpointAddress::Dns { host, port } => Some(Target::Host {
            name: host.clone(),
            port: *port,
        }),
        EndpointAddress::Srv { name } => Some(Target::Srv { name: name.clone() }),
    }
}

impl Builder {
    pub fn new(health: Arc<Health>, metrics: Arc<Metrics>) -> Builder {
        Builder {
            health,
            metrics,
            tables: TableBuilder::new(),
            runtimes: HashMap::new(),
            endpoints: Vec::new(),
            config: None,
            last_fingerprint: Vec::new(),
            discovery: None,
            watches: HashMap::new(),
            membership: 0,
        }
    }

    /// Applies a (new) config: clients, DNS watches, endpoint states and probers follow it.
    fn apply_config(&mut self, config: &Arc<Config>) -> Result<(), String> {
        let mut runtimes = HashMap::new();
        for c in &config.clusters {
            let slot = match self.runtimes.get(&c.name) {
                Some(slot)
                    if slot.config.tls == c.tls
                        && slot.config.http2 == c.http2
                        && slot.config.connect_timeout == c.connect_timeout =>
                {
                    ClusterSlot {
                        config: c.clone(),
                        runtime: slot.runtime.clone(),
                        connector: slot.connector.clone(),
                    }
                }
                _ => {
                    let connector = upstream::connector(c)
                        .map_err(|e| format!("cluster {:?}: tls: {e}", c.name))?;
                    ClusterSlot {
                        config: c.clone(),
                        runtime: Arc::new(ClusterRuntime {
                            shared: self.health.cluster(&c.name),
                            client: upstream::proxy_client(connector.clone(), c),
                            metrics: ClusterMetrics::new(&self.metrics, &c.name),
                        }),
                        connector,
                    }
                }
            };
            runtimes.insert(c.name.clone(), slot);
        }
        self.sync_watches(config)?;
        self.runtimes = runtimes;
        self.sync_endpoints(config);
        let names: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
        self.health.retain_clusters(&names);
        self.config = Some(config.clone());
        Ok(())
    }

    /// Starts a watch for every DNS name the config uses and stops those it no longer
    /// uses. A watch restarted (new TTL bounds or nameserver) keeps serving the addresses
    /// it had until its first answer.
    fn sync_watches(&mut self, config: &Config) -> Result<(), String> {
        let wanted: Vec<((String, Target), TtlBounds)> = config
            .clusters
            .iter()
            .flat_map(|c| {
                let bounds = TtlBounds {
                    min: c.dns_min_ttl,
                    max: c.dns_max_ttl,
                };
                c.endpoints
                    .iter()
                    .filter_map(|e| dns_target(&e.address))
                    .map(move |t| ((c.name.clone(), t), bounds))
            })
            .collect();
        if wanted.is_empty() {
            self.watches.clear();
            self.discovery = None;
            return Ok(());
        }
        let ns = config.dns.nameserver;
        let mut fresh_resolver = false;
        if self.discovery.as_ref().map(|(n, _)| *n) != Some(ns) {
            let d = match ns {
                Some(addr) => Discovery::with_nameserver(addr),
                None => Discovery::from_system().map_err(|e| format!("dns: {e}"))?,
            };
            self.discovery = Some((ns, d));
            fresh_resolver = true;
        }
        let Some((_, discovery)) = &self.discovery else {
            return Ok(());
        };
        let mut old = std::mem::take(&mut self.watches);
        for (key, bounds) in wanted {
            // Series at zero from the start, so dashboards and alerts see the name.
            self.metrics.dns_name(key.1.name());
            let carried = match old.remove(&key) {
                Some(w) if w.bounds == bounds && !fresh_resolver => {
                    self.watches.insert(key, w);
                    continue;
                }
                Some(mut w) => w.current(),
                None => Arc::new(Vec::new()),
            };
            let metrics = self.metrics.clone();
            let changed = self.health.changed.clone();
            let on_result: crate::discovery::OnResult = Arc::new(move |name: &str, ok: bool| {
                let result = if ok { "success" } else { "failure" };
                metrics
                    .dns_resolutions
                    .with_label_values(&[name, result])
                    .inc();
                if ok {
                    // The builder looks at every watch when it wakes up.
                    changed.notify_one();
                }
            });
            info!(cluster = %key.0, name = %key.1.name(), "resolving endpoint name in the background");
            let (rx, task) = discovery.watch(key.1.clone(), bounds, on_result);
            self.watches.insert(
                key,
                DnsWatch {
                    rx,
                    task,
                    bounds,
                    carried,
                },
            );
        }
        Ok(())
    }

    /// Has any watched name a new answer since the endpoints were last synced?
    fn dns_changed(&self) -> bool {
        self.watches
            .values()
            .any(|w| w.rx.has_changed().unwrap_or(false))
    }

    /// Makes the tracked endpoints those of the config, DNS names replaced by their
    /// current addresses (each address its own endpoint in the name's region and zone).
    fn sync_endpoints(&mut self, config: &Config) {
        let mut endpoints = Vec::with_capacity(config.clusters.len());
        for c in &config.clusters {
            let mut wanted: Vec<Wanted> = Vec::new();
            let mut weights: HashMap<SocketAddr, u32> = HashMap::new();
            for e in &c.endpoints {
                let addrs = match dns_target(&e.address) {
                    None => match e.address {
                        EndpointAddress::Ip(a) => Arc::new(vec![a]),
                        _ => continue,
                    },
                    Some(t) => match self.watches.get_mut(&(c.name.clone(), t)) {
                        Some(w) => w.current(),
                        None => continue,
                    },
                };
                for &addr in addrs.iter() {
                    // The same address twice (two names, or a name and an IP): first wins.
                    if weights.contains_key(&addr) {
                        continue;
                    }
                    weights.insert(addr, e.weight);
                    wanted.push(Wanted {
                        addr,
                        region: e.region.clone(),
                        zone: e.zone.clone(),
                    });
                }
            }
            let Some(slot) = self.runtimes.get(&c.name) else {
                continue;
            };
            let states =
                self.health
                    .sync_cluster(c, &wanted, &slot.connector, config.routing.decay());
            endpoints.push(
                states
                    .into_iter()
                    .map(|s| EndpointEntry {
                        weight: weights.get(&s.addr).copied().unwrap_or(100),
                        state: s,
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let same = endpoints.len() == self.endpoints.len()
            && endpoints.iter().zip(&self.endpoints).all(|(a, b)| {
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| Arc::ptr_eq(&x.state, &y.state) && x.weight == y.weight)
            });
        if !same {
            self.membership += 1;
        }
        self.endpoints = endpoints;
    }

    /// Builds a table for `config` (applying it first if it is new, and taking in any new
    /// DNS answers).
    pub fn build(&mut self, generation: u64, config: Arc<Config>) -> Result<Table, String> {
        if !self
            .config
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &config))
        {
            self.apply_config(&config)?;
        } else if self.dns_changed() {
            self.sync_endpoints(&config);
        }
        let inputs = config
            .clusters
            .iter()
            .zip(self.endpoints.iter())
            .map(|(c, eps)| ClusterInput {
                config: c.clone(),
                runtime: self.runtimes[&c.name].runtime.clone(),
                endpoints: eps.clone(),
            })
            .collect();
        let metrics = self.metrics.clone();
        let t = self.tables.build(
            generation,
            config,
            inputs,
            &|c, r, z| metrics.zone(c, r, z),
            Instant::now(),
        );
        self.last_fingerprint = fingerprint(&t);
        self.last_fingerprint.push(self.membership);
        Ok(t)
    }
}

/// What makes two tables route differently: zone order, candidates, weights, shares.
fn fingerprint(t: &Table) -> Vec<u64> {
    let mut f = Vec::new();
    for c in &t.clusters {
        f.push(c.zones.len() as u64 | (u64::from(c.panic) << 32));
        for z in &c.zones {
            f.push(Arc::as_ptr(&z.zone) as *const u8 as u64);
            f.push((z.share * 1e6).round() as u64);
            for e in &z.candidates {
                f.push(Arc::as_ptr(&e.state) as u64 ^ (e.weight as u64) << 48);
            }
            f.push(u64::MAX);
        }
        for s in &c.slices {
            f.push((s.upto * 1e6).round() as u64 ^ (s.reason as u64) << 56 ^ (s.zone as u64) << 40);
        }
    }
    f
}

/// Sets `edge_router_zone_share` from a table about to be (or just) swapped in.
fn publish_zone_shares(metrics: &Metrics, t: &Table) {
    for c in &t.clusters {
        for z in &c.zones {
            metrics
                .zone_share
                .with_label_values(&[&c.name, &z.region, &z.zone])
                .set(z.share);
        }
    }
}

fn rank_order(t: &Table) -> String {
    t.clusters
        .iter()
        .map(|c| {
            let zones: Vec<String> = c
                .zones
                .iter()
                .map(|z| {
                    format!(
                        "{}({}/{}, {:.0}%)",
                        z.zone,
                        z.healthy,
                        z.endpoints.len(),
                        z.share * 100.0
                    )
                })
                .collect();
            format!("{}: {}", c.name, zones.join(" > "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Rebuilds the table whenever health flips, the config changes, or (every 100 ms) latency
/// may have re-ranked zones; swaps it in only when it routes differently.
async fn builder_loop(router: Arc<Router>, mut builder: Builder) {
    let tick = Duration::from_millis(100);
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            _ = router.health.changed.notified() => {}
            _ = router.config_changed.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
        let config = router.config.load_full();
        let old = router.table();
        let before = builder.last_fingerprint.clone();
        let config_new = !Arc::ptr_eq(&old.config, &config);
        let next_gen = router.generation.load(Ordering::Relaxed) + 1;
        let table = match builder.build(next_gen, config.clone()) {
            Ok(t) => t,
            Err(e) => {
                // Only a reload can bring a config the builder refuses (checked before, so
                // this is a file changing under us): keep the running table.
                error!("cannot build a routing table: {e}");
                router.config.store(old.config.clone());
                continue;
            }
        };
        if config_new || builder.last_fingerprint != before {
            let old_order = rank_order(&old);
            let new_order = rank_order(&table);
            router.generation.store(next_gen, Ordering::Relaxed);
            router.metrics.table_generation.set(next_gen as i64);
            router.metrics.table_swaps.inc();
            publish_zone_shares(&router.metrics, &table);
            router.proxy.table.store(Arc::new(table));
            if old_order != new_order {
                info!(target: "table", generation = next_gen, "routing table swapped: {old_order}  =>  {new_order}");
                router
                    .events
                    .push("table", format!("generation {next_gen}: {new_order}"));
            }
        }
        let now = Instant::now();
        if now.duration_since(last_tick) >= tick {
            router
                .health
                .tick(now.duration_since(last_tick), &config.clusters);
            last_tick = now;
            let t = router.table();
            router
                .metrics
                .table_age
                .set(t.built_at.elapsed().as_secs_f64());
            for c in &t.clusters {
                for z in &c.zones {
                    for e in &z.endpoints {
                        if let Some(ms) = e.state.latency_ms() {
                            e.state.metrics.latency.set(ms / 1e3);
                        }
                        e.state
                            .metrics
                            .in_flight
                            .set(e.state.in_flight.load(Ordering::Relaxed) as i64);
                    }
                }
            }
        }
    }
}

async fn serve_data(
    listener: TcpListener,
    router: Arc<Router>,
    tls: Option<Arc<crate::tls::ReloadableServerTls>>,
    (limit, max): (Arc<Semaphore>, usize),
) {
    let cfg = router.config.load_full();
    let l = &cfg.listener;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own HTTP/1 header timer would also close every idle keep-alive connection at
    // the header timeout and never covers a connection's first bytes: crate::conn keeps
    // both timers instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(l.max_header_bytes)
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(l.max_concurrent_streams)
        .max_header_list_size(l.max_header_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let (signal_tx, _) = watch::channel(conn::Signal::Run);
    let mut shutdown = router.shutdown_tx.subscribe();
    let timeouts = (l.header_read_timeout, l.idle_timeout);
    // Plain-TCP HTTP/1.1 goes the native path unless the config asks for hyper throughout.
    let native = (l.http1_engine == config::Http1Engine::Native).then_some(h1::Limits {
        header_timeout: l.header_read_timeout,
        idle_timeout: l.idle_timeout,
        max_header_bytes: l.max_header_bytes,
    });
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            // Over max_connections: close at once rather than queue without bound.
            router.metrics.too_many_connections.inc();
            drop(stream);
            continue;
        };
        router.metrics.connections_accepted.inc();
        router.metrics.connections_active.inc();
        let _ = stream.set_nodelay(true);
        let state = router.proxy.clone();
        let metrics = router.metrics.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let signal = signal_tx.subscribe();
        tokio::spawn(async move {
            let end =
                serve_connection(stream, peer, state, builder, tls, signal, timeouts, native).await;
            if end == conn::End::SlowHead {
                metrics
                    .errors
                    .with_label_values(&["", "header_timeout"])
                    .inc();
                tracing::debug!(%peer, "request headers too slow: connection closed");
            }
            metrics.connections_active.dec();
            drop(permit);
        });
    }
    drop(listener);
    let _ = signal_tx.send(conn::Signal::Drain);
    let drain = router.config.load().listener.drain_timeout;
    // Every connection holds a permit until it ends: all of them back means all drained.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(drain, limit.acquire_many(all)).await;
    match drained {
        Ok(_) => info!("drained: all connections closed"),
        Err(_) => {
            warn!("drain timeout ({drain:?}) reached; closing remaining connections");
            let _ = signal_tx.send(conn::Signal::Close);
            // Give the connection tasks a moment to close their sockets.
            let _ = tokio::time::timeout(Duration::from_secs(1), limit.acquire_many(all)).await;
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    state: Arc<ProxyState>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<Arc<crate::tls::ReloadableServerTls>>,
    mut signal: watch::Receiver<conn::Signal>,
    (header_timeout, idle_timeout): (Duration, Duration),
    native: Option<h1::Limits>,
) -> conn::End {
    let https = tls.is_some();
    let stream = match (&tls, native) {
        (None, Some(limits)) => match h1::serve(stream, peer, &state, &mut signal, limits).await {
            h1::Served::Ended(end) => return end,
            h1::Served::Hyper(prefixed) => prefixed,
        },
        _ => h1::Prefixed::new(stream),
    };
    let activity = conn::Activity::new();
    let act = activity.clone();
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = act.begin(req.version());
        let fut = proxy::handle(state.clone(), req, peer, https);
        async move {
            let resp = fut.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|b| conn::GuardedBody::new(b, guard)))
        }
    });
    match tls {
        // Boxed: hyper's connection state is only needed by connections the native path
        // hands over, so it must not size every connection's task.
        None => {
            Box::pin(async move {
                let io = TokioIo::new(conn::Tracked::new(stream, activity.clone()));
                let c = builder.serve_connection_with_upgrades(io, svc);
                conn::drive(c, activity, signal, header_timeout, idle_timeout).await
            })
            .await
        }
        // Boxed: a TLS connection's state (rustls session inline) is larger than a plain
        // one's, and unboxed it would size every plain connection's task too.
        Some(tls) => {
            Box::pin(async move {
                let acceptor = tls.acceptor();
                // The handshake is bounded like a slow header: a client that stalls is cut off.
                let stream = stream.into_inner();
                match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let io = TokioIo::new(conn::Tracked::new(s, activity.clone()));
                        let c = builder.serve_connection_with_upgrades(io, svc);
                        conn::drive(c, activity, signal, header_timeout, idle_timeout).await
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "tls handshake failed: {e}");
                        conn::End::Closed
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "tls handshake timed out");
                        conn::End::SlowHead
                    }
                }
            })
            .await
        }
    }
}
