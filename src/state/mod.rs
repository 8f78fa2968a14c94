//! Long-lived, lock-free state that outlives routing tables: each endpoint's latency
//! averages, health, ejection and load, and each cluster's budgets and zone statistics.
//! Probes and real requests write it; the table builder reads it.

pub mod budget;
pub mod endpoint;
pub mod estimate;
pub mod ewma;
pub mod zone_stats;

pub use budget::{budget_cap, Budget};
pub use endpoint::{ClusterShared, EndpointState, InFlight, Status};
pub use estimate::{zone_estimate, Estimate, ProbeWindow};
pub use ewma::{Average, Ewma, PeakEwma};
