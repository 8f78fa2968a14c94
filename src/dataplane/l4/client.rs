//! Who the client is: the peer address, or the one a PROXY header from a trusted balancer
//! announces.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::ListenerSpec;
use crate::dataplane::l4::proxy_protocol::{self, Detect, ProxyHeaderError};

/// How long an untrusted connection is watched for a PROXY signature before it is served
/// as it is. Clients of http, https and tls_passthrough speak first, so this costs them
/// nothing; on a tcp listener whose protocol has the server speak first, it delays the
/// connect by at most this much.
const UNTRUSTED_PEEK: Duration = Duration::from_millis(250);

/// The client's address for this connection under the listener's `proxy_protocol` rule, or
/// the reason (a metric label) the connection must close: a trusted source must send a
/// header, an untrusted one must not.
pub async fn client_address(
    stream: &mut TcpStream,
    peer: SocketAddr,
    spec: &ListenerSpec,
    timeout: Duration,
) -> Result<SocketAddr, &'static str> {
    let Some(trusted) = &spec.proxy_protocol else {
        return Ok(peer);
    };
    let ip = peer.ip().to_canonical();
    if trusted.iter().any(|n| n.contains(&ip)) {
        return match proxy_protocol::read_header(stream, timeout).await {
            Ok(Some(a)) => Ok(a.source),
            // LOCAL / UNKNOWN: the balancer's own connection (a health check).
            Ok(None) => Ok(peer),
            Err(ProxyHeaderError::Missing) => Err("proxy_protocol_missing"),
            Err(ProxyHeaderError::Timeout) => Err("proxy_protocol_timeout"),
            Err(_) => Err("proxy_protocol_malformed"),
        };
    }
    let mut buf = [0u8; 16];
    let deadline = tokio::time::Instant::now() + UNTRUSTED_PEEK.min(timeout);
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => return Err("io"),
            Err(_) => return Ok(peer),
        };
        if n == 0 {
            return Ok(peer);
        }
        match proxy_protocol::detect(&buf[..n]) {
            Detect::Header => return Err("proxy_protocol_untrusted"),
            Detect::NotHeader => return Ok(peer),
            // peek returns at once while bytes wait; a short prefix needs more time.
            Detect::NeedMore if n < buf.len() => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Detect::NeedMore => return Ok(peer),
        }
    }
}
