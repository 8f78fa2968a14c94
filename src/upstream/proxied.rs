//! Upstream connections that start with a PROXY protocol header (a cluster's
//! `send_proxy_protocol`). Such a header names one client for the whole connection, so these
//! connections are never shared between clients: the native HTTP/1.1 engine keeps one per
//! client connection, and everything else opens one per request (see [`send_once`]).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::ProxyVersion;

/// The header announcing a TCP connection from `src` to `dst`.
pub fn encode(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => encode_v1(src, dst),
        ProxyVersion::V2 => encode_v2(src, dst),
    }
}

/// A new connection to `addr` (Nagle off) that starts with a PROXY header. `announce` is
/// the (client, listener) pair the header names; `None` names the connection's own ends,
/// as a health probe does (an upstream that requires the header refuses a probe without
/// one; HAProxy's `check-send-proxy` does the same).
pub async fn dial(
    addr: SocketAddr,
    connect_timeout: Duration,
    version: ProxyVersion,
    announce: Option<(SocketAddr, SocketAddr)>,
) -> io::Result<TcpStream> {
    let mut s = crate::upstream::IdlePool::dial(addr, connect_timeout).await?;
    let (src, dst) = match announce {
        Some(pair) => pair,
        None => (s.local_addr()?, s.peer_addr()?),
    };
    s.write_all(&encode(version, src, dst)).await?;
    Ok(s)
}

/// Why [`send_once`] got no response head.
#[derive(Debug)]
pub enum OnceError {
    /// Nothing was sent: the connect failed.
    Connect(io::Error),
    /// The request went out (or started to) and the exchange failed.
    Http(hyper::Error),
}

impl std::fmt::Display for OnceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnceError::Connect(e) => write!(f, "connect: {e}"),
            OnceError::Http(e) => write!(f, "{}", crate::upstream::error_chain(e)),
        }
    }
}

/// One HTTP/1.1 request on a new connection that starts with a PROXY header; the
/// connection closes when the response ends (upgrades are allowed: the connection is then
/// the tunnel's). `req`'s URI is sent as is, so it should be in origin form. With `pool`,
/// the connect takes a turn of that pool's connect cap.
pub async fn send_once<B>(
    pool: Option<&crate::upstream::IdlePool>,
    addr: SocketAddr,
    connect_timeout: Duration,
    version: ProxyVersion,
    announce: Option<(SocketAddr, SocketAddr)>,
    req: http::Request<B>,
) -> Result<http::Response<Incoming>, OnceError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let connect = dial(addr, connect_timeout, version, announce);
    let stream = match pool {
        Some(p) => p.in_dial_turn(connect).await,
        None => connect.await,
    }
    .map_err(OnceError::Connect)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(OnceError::Http)?;
    tokio::spawn(async move {
        // Its error, if any, is the request's, reported through `send_request`.
        let _ = conn.with_upgrades().await;
    });
    sender.send_request(req).await.map_err(OnceError::Http)
}

/// Both addresses in one family: IPv4 when both are IPv4 (or IPv4-mapped), else IPv6 with
/// any IPv4 address mapped, since a header has a single family for both.
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canonical(src), canonical(dst));
    match (src, dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) | (SocketAddr::V6(_), SocketAddr::V6(_)) => {
            (src, dst)
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
                IpAddr::V6(_) => a,
            };
            (v6(src), v6(dst))
        }
    }
}

/// A v1 (text) header announcing a TCP connection from `src` to `dst`.
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    ppp::v1::Addresses::from(same_family(src, dst))
        .to_string()
        .into_bytes()
}

/// A v2 (binary) header announcing a TCP connection from `src` to `dst`, without TLVs.
pub fn encode_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    // `build` fails only for a payload over 64 KiB; addresses alone are 12 or 36 bytes.
    Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Stream,
        same_family(src, dst),
    )
    .build()
    .unwrap_or_default()
}
