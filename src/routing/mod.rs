//! Pure and synchronous: the immutable routing table (zones ranked nearest first, traffic
//! slices, candidates), how it is built from config and endpoint state, and how a request
//! picks an endpoint from it. No I/O and no locks: the request path runs this.

pub mod balancer;
pub mod rank;
pub mod redirect;
pub mod rewrite;
pub mod table;

pub use table::{ClusterTable, Reason, RoutingTable, ZoneTable};
