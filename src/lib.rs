//! edge-router: a latency-aware reverse proxy that sends each request to the nearest healthy
//! zone.
//!
//! Data flows one way: [`health`] probes endpoints and keeps latency averages; [`table`]
//! builds an immutable routing table from config and health; [`server`] swaps it in with
//! arc-swap; [`proxy`] loads it per request and [`balancer`] picks the endpoint.

pub mod admin;
pub mod balancer;
pub mod config;
pub mod conn;
pub mod dataplane;
pub mod demo;
pub mod discovery;
pub mod h1;
pub mod health;
pub mod hedge;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod status;
pub mod table;
pub mod tls;
pub mod upstream;
