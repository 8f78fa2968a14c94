//! The data plane: listeners, and the request path of both HTTP engines: the native
//! HTTP/1.1 engine ([`h1`]) and hyper ([`hyper`]) for TLS, HTTP/2, upgrades and what the
//! native one hands over.

pub mod h1;
pub mod hyper;
pub mod listener;
pub mod redirect;
pub mod watchdog;
