//! TLS passthrough routing: read the client's ClientHello to learn the server name it asks
//! for, without terminating TLS, and pick a target by that name.
//!
//! Why rustls' [`Acceptor`] instead of a hand parser: a ClientHello may span several TLS
//! records and many TCP segments, and its extension list is exactly where hand parsers go
//! wrong; the `Acceptor` reassembles and validates it the same way our TLS listeners do.
//! Nothing is answered to the client: every byte read is also kept in
//! [`ClientHello::buffered`], and the caller replays those bytes to the chosen upstream,
//! which then does the real handshake. Reads are bounded in bytes and in total time, since
//! the peer is unauthenticated until the upstream says otherwise.
//!
//! Limits inherited from rustls, fine for any TLS 1.2/1.3 client: a ClientHello without the
//! signature_algorithms extension (TLS 1.0/1.1-only clients) or without null compression is
//! refused as malformed, and an IP address sent as SNI counts as no SNI.
//!
//! [`SniTable`] holds the contract's matching rules: an exact host beats a wildcard whatever
//! their order, `*.example.com` matches exactly one more label, names compare
//! case-insensitively with any trailing dot ignored, and no SNI or no match means the
//! default (if any).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The default cap on the bytes read while looking for a ClientHello. Real ones are a few
/// hundred bytes; post-quantum key shares bring them near 2 KiB.
pub const DEFAULT_MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 4096;
/// The content type of a TLS handshake record, the only way a TLS connection can start.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What the client asked for, and every byte read to find out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The SNI host name, lowercase, or `None` when the client sent none.
    pub server_name: Option<String>,
    /// Every byte read from the stream, in order, to replay to the upstream.
    pub buffered: Vec<u8>,
}

/// Why no ClientHello could be read. Every variant means the connection should close.
#[derive(Debug)]
pub enum SniError {
    /// The first byte is not a TLS handshake record.
    NotTls,
    /// TLS records, but not a valid ClientHello.
    Malformed(String),
    /// The peer closed the connection before a whole ClientHello arrived.
    Eof,
    /// More than the allowed bytes without a complete ClientHello.
    TooLarge,
    /// The ClientHello did not arrive within the allowed time.
    Timeout,
    /// Reading from the connection failed.
    Io(io::Error),
}

impl fmt::Display for SniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotTls => f.write_str("not a TLS connection (expected a ClientHello)"),
            Self::Malformed(why) => write!(f, "malformed TLS ClientHello: {why}"),
            Self::Eof => f.write_str("connection closed before the TLS ClientHello ended"),
            Self::TooLarge => f.write_str("TLS ClientHello too large"),
            Self::Timeout => f.write_str("timed out waiting for the TLS ClientHello"),
            Self::Io(e) => write!(f, "reading the TLS ClientHello: {e}"),
        }
    }
}

impl std::error::Error for SniError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io(e) => Some(e),
            _ => None,
        }
    }
}

/// Reads from `stream` until a complete ClientHello has arrived, at most `max_bytes`
/// (see [`DEFAULT_MAX_CLIENT_HELLO`]) and within `timeout` in total.
pub async fn read_client_hello<S>(
    stream: &mut S,
    max_bytes: usize,
    timeout: Duration,
) -> Result<ClientHello, SniError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    match tokio::time::timeout(timeout, read_inner(stream, max_bytes)).await {
        Ok(result) => result,
        Err(_) => Err(SniError::Timeout),
    }
}

async fn read_inner<S>(stream: &mut S, max_bytes: usize) -> Result<ClientHello, SniError>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut acceptor = Acceptor::default();
    let mut buffered = Vec::with_capacity(max_bytes.min(READ_CHUNK));
    loop {
        let start = buffered.len();
        if start >= max_bytes {
            return Err(SniError::TooLarge);
        }
        buffered.resize(start + (max_bytes - start).min(READ_CHUNK), 0);
        let n = stream
            .read(&mut buffered[start..])
            .await
            .map_err(SniError::Io)?;
        buffered.truncate(start + n);
        if n == 0 {
            return Err(SniError::Eof);
        }
        if start == 0 && buffered[0] != HANDSHAKE_RECORD {
            return Err(SniError::NotTls);
        }
        let mut fresh = &buffered[start..];
        while !fresh.is_empty() {
            match acceptor.read_tls(&mut fresh) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => return Err(SniError::Malformed(e.to_string())),
            }
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(str::to_owned);
                return Ok(ClientHello {
                    server_name,
                    buffered,
                });
            }
            Err((e, _alert)) => return Err(SniError::Malformed(e.to_string())),
        }
    }
}

/// SNI host name to target, with the contract's precedence rules.
#[derive(Debug, Clone)]
pub struct SniTable<T> {
    exact: HashMap<String, T>,
    /// Keyed by the parent domain: `*.example.com` is stored as `example.com`.
    wildcard: HashMap<String, T>,
    default: Option<T>,
}

impl<T> SniTable<T> {
    /// Builds the table from `(host, target)` entries, each host exact (`a.example.com`) or
    /// a wildcard (`*.example.com`). When the same host appears twice the first entry
    /// wins; config validation is the place to refuse duplicates and bad names.
    pub fn new(entries: Vec<(String, T)>, default: Option<T>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (host, target) in entries {
            let host = normalize(&host).into_owned();
            match host.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_string()).or_insert(target),
                None => exact.entry(host).or_insert(target),
            };
        }
        Self {
            exact,
            wildcard,
            default,
        }
    }

    /// The target for a ClientHello's server name; no name or no match gives the default.
    pub fn lookup(&self, server_name: Option<&str>) -> Option<&T> {
        server_name
            .and_then(|name| self.lookup_name(&normalize(name)))
            .or(self.default.as_ref())
    }

    fn lookup_name(&self, name: &str) -> Option<&T> {
        if name.is_empty() {
            return None;
        }
        if let Some(target) = self.exact.get(name) {
            return Some(target);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() || parent.is_empty() {
            return None;
        }
        self.wildcard.get(parent)
    }
}

/// Lowercase, without one trailing dot: the form names are compared in.
fn normalize(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

#[cfg(test)]
mod tests;
