//! What the router tells operators: Prometheus metrics, logs, and the ring of notable events.

pub mod access;
pub mod events;
pub mod l4;
pub mod logging;
pub mod metrics;

pub use events::{Event, Events, Severity};
pub use metrics::Metrics;
