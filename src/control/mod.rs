//! The control plane: config + DNS answers + probe results -> routing tables. Off the
//! request path; the request path only loads the table it publishes.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::Notify;

use crate::config::Config;
use crate::routing::RoutingTable;
use crate::telemetry::{Events, Metrics};

pub mod discovery;
pub mod probe;
pub mod reconcile;

pub use crate::upstream::UpstreamClient;

/// The routing table the request path reads.
pub type Table = RoutingTable<UpstreamClient>;

/// What every request needs, shared by all connections.
pub struct ProxyState {
    pub table: ArcSwap<Table>,
    pub metrics: Arc<Metrics>,
}

/// The control plane's shared state: the published table and what feeds it.
pub struct Control {
    pub proxy: Arc<ProxyState>,
    pub health: Arc<probe::Health>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub config: ArcSwap<Config>,
    /// Woken when a reload stored a new config.
    pub config_changed: Notify,
    pub generation: AtomicU64,
}

impl Control {
    pub fn table(&self) -> Arc<Table> {
        self.proxy.table.load_full()
    }
}
