//! What the router tells operators: Prometheus metrics, logs, and the ring of notable events.

pub mod access;
pub mod events;
pub mod logging;
pub mod metrics;

pub use events::{Event, Events};
pub use metrics::Metrics;
