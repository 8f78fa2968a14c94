//! Operating the router: the running router's handle (start, reload, drain, readiness), the
//! admin API and dashboard, the per-zone history behind its charts, the `status` command, and the demo.

pub mod admin;
pub mod demo;
pub mod doors;
pub mod history;
pub mod router;
pub mod status;
pub mod upgrade;
