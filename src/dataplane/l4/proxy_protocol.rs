//! PROXY protocol (v1 text and v2 binary): learning the real client address from a trusted
//! load balancer in front of us, and telling upstreams the client address behind us.
//!
//! Why the reader is this careful: the header is followed on the same connection by the
//! client's own bytes (a TLS ClientHello, an HTTP request, a database handshake), which the
//! next layer must see untouched. So [`read_header`] never reads a byte past the header: it
//! first reads the 15 bytes every header has (the shortest is `PROXY UNKNOWN\r\n`), then v1
//! one byte at a time up to its line end, or v2 exactly the length the header announces. It
//! is bounded in size (v1 by the protocol's 107 bytes, v2 by [`V2_MAX_PAYLOAD`]) and in time,
//! because until the header is read the peer has not proven anything.
//!
//! Parsing itself is the `ppp` crate's; this module only frames the bytes, maps the result
//! to socket addresses, and decides what the header means for us. A `LOCAL` command (a
//! balancer's own health check) or an address family we cannot use (`UNKNOWN`, unix
//! sockets, non-stream protocols) yields `None`: the caller then keeps the connection's own
//! peer address, as the protocol says a receiver should.
//!
//! Whether a header is required, allowed or refused depends on the peer's address; that is
//! the listener's call (the trusted networks come from config), with [`detect`] to tell, from peeked
//! bytes, whether an untrusted peer is trying to send one.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

/// The longest v1 header, line end included, that the protocol allows.
pub const V1_MAX_LEN: usize = 107;
/// The largest v2 payload (addresses plus TLVs) accepted. Balancers add a few TLVs (an
/// endpoint id, a unique id, TLS details), far below this; the protocol would allow 64 KiB,
/// which an unauthenticated peer should not be able to make us buffer.
pub const V2_MAX_PAYLOAD: usize = 2048;
/// The fixed part of a v2 header: signature, version/command, family/protocol, length.
pub const V2_FIXED_LEN: usize = 16;
/// The shortest possible header of either version, so always safe to read in one go.
const MIN_HEADER_LEN: usize = 15;
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = ppp::v2::PROTOCOL_PREFIX;

/// The addresses a PROXY header announces: the client, and the address it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddrs {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// Why a PROXY header could not be read. Every variant means the connection should close.
#[derive(Debug)]
pub enum ProxyHeaderError {
    /// The connection does not start with a PROXY signature at all.
    Missing,
    /// It starts like a header, but the header is invalid.
    Malformed(String),
    /// The peer closed the connection before the header ended.
    Truncated,
    /// Longer than [`V1_MAX_LEN`] (v1) or announcing more than [`V2_MAX_PAYLOAD`] (v2).
    TooLong,
    /// The whole header did not arrive within the allowed time.
    Timeout,
    /// Reading from the connection failed.
    Io(io::Error),
}

impl fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing => f.write_str("connection does not start with a PROXY header"),
            Self::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
            Self::Truncated => f.write_str("connection closed inside the PROXY header"),
            Self::TooLong => f.write_str("PROXY header too long"),
            Self::Timeout => f.write_str("timed out waiting for the PROXY header"),
            Self::Io(e) => write!(f, "reading the PROXY header: {e}"),
        }
    }
}

impl std::error::Error for ProxyHeaderError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ProxyHeaderError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Self::Truncated
        } else {
            Self::Io(e)
        }
    }
}

/// What the first bytes of a connection say about a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detect {
    /// A v1 or v2 signature.
    Header,
    /// Certainly not a header.
    NotHeader,
    /// Too few bytes to tell: peek again once more have arrived.
    NeedMore,
}

/// Tells from the first bytes of a connection (peeked, not read) whether it starts with a
/// PROXY signature. An untrusted peer sending one must be refused, not served with the
/// header passed on as data, and this is how a listener finds out without consuming bytes.
pub fn detect(prefix: &[u8]) -> Detect {
    for signature in [V1_PREFIX, V2_SIGNATURE] {
        let n = prefix.len().min(signature.len());
        if prefix[..n] == signature[..n] {
            return if n == signature.len() {
                Detect::Header
            } else {
                Detect::NeedMore
            };
        }
    }
    Detect::NotHeader
}

/// Reads one PROXY header (v1 or v2) from the start of `stream`, consuming exactly its
/// bytes. `Ok(None)` means a valid header that carries no usable client address (`LOCAL`,
/// `UNKNOWN`): keep the connection's own address.
pub async fn read_header<S>(
    stream: &mut S,
    timeout: Duration,
) -> Result<Option<ProxiedAddrs>, ProxyHeaderError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    match tokio::time::timeout(timeout, read_header_inner(stream)).await {
        Ok(result) => result,
        Err(_) => Err(ProxyHeaderError::Timeout),
    }
}

async fn read_header_inner<S>(stream: &mut S) -> Result<Option<ProxiedAddrs>, ProxyHeaderError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut buf = Vec::with_capacity(V1_MAX_LEN);
    buf.resize(MIN_HEADER_LEN, 0);
    stream.read_exact(&mut buf).await?;
    match detect(&buf) {
        Detect::Header => {}
        Detect::NotHeader | Detect::NeedMore => return Err(ProxyHeaderError::Missing),
    }
    if buf.starts_with(V1_PREFIX) {
        // One byte at a time: the line end is the only way to know where v1 stops.
        while buf.last() != Some(&b'\n') {
            if buf.len() >= V1_MAX_LEN {
                return Err(ProxyHeaderError::TooLong);
            }
            buf.push(stream.read_u8().await?);
        }
    } else {
        buf.push(stream.read_u8().await?);
        let announced = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if announced > V2_MAX_PAYLOAD {
            return Err(ProxyHeaderError::TooLong);
        }
        buf.resize(V2_FIXED_LEN + announced, 0);
        stream.read_exact(&mut buf[V2_FIXED_LEN..]).await?;
    }
    // The framing above already cut the header to its exact length.
    parse_header(&buf).map(|(addrs, _)| addrs)
}

/// Parses one complete header at the start of `bytes`, returning what it announces and its
/// length in bytes (the client's data starts right after). A header cut short is
/// [`ProxyHeaderError::Truncated`]; anything not starting with a signature is
/// [`ProxyHeaderError::Missing`].
pub fn parse_header(bytes: &[u8]) -> Result<(Option<ProxiedAddrs>, usize), ProxyHeaderError> {
    match detect(bytes) {
        Detect::NotHeader => Err(ProxyHeaderError::Missing),
        Detect::NeedMore => Err(ProxyHeaderError::Truncated),
        Detect::Header if bytes.starts_with(V1_PREFIX) => parse_v1(bytes),
        Detect::Header => parse_v2(bytes),
    }
}

fn parse_v1(bytes: &[u8]) -> Result<(Option<ProxiedAddrs>, usize), ProxyHeaderError> {
    let Some(newline) = bytes.iter().position(|&b| b == b'\n') else {
        return Err(if bytes.len() >= V1_MAX_LEN {
            ProxyHeaderError::TooLong
        } else {
            ProxyHeaderError::Truncated
        });
    };
    let line = &bytes[..=newline];
    if line.len() > V1_MAX_LEN {
        return Err(ProxyHeaderError::TooLong);
    }
    if !line.ends_with(b"\r\n") {
        return Err(ProxyHeaderError::Malformed(
            "v1 line does not end with CRLF".into(),
        ));
    }
    let header = ppp::v1::Header::try_from(line)
        .map_err(|e| ProxyHeaderError::Malformed(format!("v1: {e}")))?;
    // ppp ends the line at the first CR; one earlier than ours hides bytes we would skip.
    if header.header.len() != line.len() {
        return Err(ProxyHeaderError::Malformed(
            "v1: stray CR inside the line".into(),
        ));
    }
    let addrs = match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(ProxiedAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Tcp6(a) => Some(ProxiedAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v1::Addresses::Unknown => None,
    };
    Ok((addrs, line.len()))
}

fn parse_v2(bytes: &[u8]) -> Result<(Option<ProxiedAddrs>, usize), ProxyHeaderError> {
    if bytes.len() >= V2_FIXED_LEN
        && usize::from(u16::from_be_bytes([bytes[14], bytes[15]])) > V2_MAX_PAYLOAD
    {
        return Err(ProxyHeaderError::TooLong);
    }
    let header = match ppp::v2::Header::try_from(bytes) {
        Ok(header) => header,
        Err(ppp::v2::ParseError::Incomplete(_) | ppp::v2::ParseError::Partial(..)) => {
            return Err(ProxyHeaderError::Truncated)
        }
        Err(e) => return Err(ProxyHeaderError::Malformed(format!("v2: {e}"))),
    };
    let len = header.len();
    if header.command == ppp::v2::Command::Local || header.protocol != ppp::v2::Protocol::Stream {
        return Ok((None, len));
    }
    let addrs = match header.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(ProxiedAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v2::Addresses::IPv6(a) => Some(ProxiedAddrs {
            source: SocketAddr::from((a.source_address, a.source_port)),
            destination: SocketAddr::from((a.destination_address, a.destination_port)),
        }),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    };
    Ok((addrs, len))
}

// The encoders live with the upstream connections that send them (HTTP clusters and
// health probes send them too).
pub use crate::upstream::proxied::{encode_v1, encode_v2};

#[cfg(test)]
mod tests;
