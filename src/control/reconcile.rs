//! The reconciler: turns config + DNS answers + endpoint health into routing tables, and
//! swaps a new one in whenever it would route differently.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{error, info};

use crate::config::{self, Config, EndpointAddress};
use crate::control::discovery::{Discovery, Target, TtlBounds};
use crate::control::probe::{Health, Wanted};
use crate::control::{Control, Table, UpstreamClient};
use crate::routing::table::{ClusterInput, ClusterRuntime, EndpointEntry, TableBuilder};
use crate::routing::Reason;
use crate::telemetry::metrics::{ClusterMetrics, Metrics};
use crate::upstream;

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
                            metrics: ClusterMetrics::new(&self.metrics, &c.name, &Reason::LABELS),
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
            let on_result: crate::control::discovery::OnResult =
                Arc::new(move |name: &str, ok: bool| {
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
pub fn publish_zone_shares(metrics: &Metrics, t: &Table) {
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
pub async fn run(router: Arc<Control>, mut builder: Builder) {
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
