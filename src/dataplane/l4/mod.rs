//! Layer-4 building blocks: plain TCP proxying, TLS passthrough by SNI, UDP flows, and the
//! PROXY protocol both ways.
//!
//! Each module is a leaf with no knowledge of config, routing or metrics, so a listener can
//! compose them and each can be tested on its own: the listener decides *whether* to expect a
//! PROXY header (the listener's trusted networks), reads it ([`proxy_protocol::read_header`]),
//! peeks at the ClientHello for routing ([`sni::read_client_hello`], [`sni::SniTable`]),
//! dials an endpoint, and then hands both sockets to [`copy::splice`], replaying whatever it
//! read (and any PROXY header for the upstream) as the first bytes. UDP has no connection,
//! so [`udp_flows::FlowTable`] stands in for one: a synchronous table the listener drives.

pub mod client;
pub mod copy;
pub mod proxy_protocol;
pub mod sni;
pub mod tcp;
pub mod udp;
pub mod udp_flows;

pub use client::client_address;

pub use copy::{splice, ByteCounters};
pub use proxy_protocol::{encode_v1, encode_v2, read_header, ProxiedAddrs, ProxyHeaderError};
pub use sni::{read_client_hello, ClientHello, SniError, SniTable};
pub use udp_flows::{FlowTable, FlowTableFull};
