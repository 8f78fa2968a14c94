//! The data plane: listeners, the request path of both HTTP engines (the native HTTP/1.1
//! engine [`h1`], and [`hyper`] for TLS, HTTP/2, upgrades and what the native one hands
//! over), and the layer-4 proxies ([`l4`]).

pub mod h1;
pub mod hyper;
pub mod inherited;
pub mod l4;
pub mod listener;
pub mod redirect;
pub mod request;
pub mod watchdog;
