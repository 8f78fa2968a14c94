//! edge-router: a latency-aware reverse proxy that sends each request (and each layer-4
//! connection or flow) to the nearest healthy zone.
//!
//! The folders are layers; each uses only the ones above it in this list:
//!
//! - [`clock`], [`config`]: the process clock; the config file parsed and validated.
//! - [`telemetry`]: metrics, logs, the event ring.
//! - [`upstream`]: how to reach an endpoint: connectors, TLS, pooled connections.
//! - [`state`]: long-lived lock-free state per endpoint and cluster (latency averages,
//!   health and ejection, in-flight counts, budgets, zone statistics).
//! - [`routing`]: pure and synchronous: the routing table, how it is built, how a request
//!   picks an endpoint from it.
//! - [`control`]: config + DNS + probes -> tables, swapped in atomically.
//! - [`dataplane`]: listeners and the request path of both HTTP engines.
//! - [`ops`]: the running router's handle, admin API, status command, demo.
#![forbid(unsafe_code)]

pub mod clock;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod ops;
pub mod routing;
pub mod state;
pub mod telemetry;
pub mod upstream;
