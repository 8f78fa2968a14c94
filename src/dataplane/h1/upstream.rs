//! The client role: one attempt to an endpoint up to its response head, on a pooled
//! connection or a new one, and the response head rewritten for the client.

use super::*;
use crate::config::{HeaderActions, ProxyVersion};
use crate::routing::rewrite;

/// Why an upstream attempt failed before a response head arrived.
pub(super) enum Failure {
    /// Nothing was sent: the connect failed (or timed out).
    Connect(io::Error),
    /// The connection broke (or the upstream sent garbage) after the request went out.
    Reset(io::Error),
}

/// What the first part of an attempt gives: the upstream connection and the response head
/// parsed and already rewritten for the client.
pub(super) struct Head {
    pub(super) conn: TcpStream,
    pub(super) rbuf: BytesMut,
    pub(super) start: ResponseStart,
}

/// One attempt up to the response head: a pooled connection (or a new one), the request
/// head and body, the response head. A pooled connection the upstream closed meanwhile is
/// replaced by a new one when the write failed (nothing was taken) or, for idempotent
/// requests, when it closed without a byte of answer.
/// With `private` (the cluster sends PROXY headers of this version), the connection is the
/// client connection's own, never one from the endpoint's pool.
#[allow(clippy::too_many_arguments)]
pub(super) async fn send(
    first: &[u8],
    ep: &crate::state::EndpointState,
    connect_timeout: Duration,
    head_method: bool,
    idempotent: bool,
    edits: &HeaderActions,
    private: Option<(ProxyVersion, &mut Private)>,
) -> Result<Head, Failure> {
    let announce = private.as_ref().map(|(v, p)| (*v, p.client, p.local));
    let (mut conn, mut reused) = match private {
        None => ep
            .idle
            .acquire(ep.addr, connect_timeout)
            .await
            .map_err(Failure::Connect)?,
        Some((_, private)) => match private.conn.take() {
            Some((addr, c)) if addr == ep.addr && crate::upstream::looks_open(&c) => (c, true),
            _ => (redial(ep, connect_timeout, announce).await?, false),
        },
    };
    loop {
        if let Err(e) = conn.write_all(first).await {
            // Nothing reached a pooled connection the upstream had closed: a new one.
            if reused {
                conn = redial(ep, connect_timeout, announce).await?;
                reused = false;
                continue;
            }
            return Err(Failure::Reset(e));
        }
        let mut rbuf = take_buf();
        loop {
            match response_start(&rbuf, head_method, edits) {
                Ok(Some(start)) if start.informational => {
                    // 100 Continue and friends: not for the client of this path.
                    rbuf.advance(start.head_len);
                    continue;
                }
                Ok(Some(start)) => return Ok(Head { conn, rbuf, start }),
                Ok(None) => {}
                Err(e) => return Err(Failure::Reset(e)),
            }
            if rbuf.len() >= MAX_RESPONSE_HEAD {
                return Err(Failure::Reset(io::Error::other("response head too large")));
            }
            if rbuf.capacity() - rbuf.len() < 1024 {
                rbuf.reserve(BUF_SIZE);
            }
            match conn.read_buf(&mut rbuf).await {
                Ok(0) if reused && idempotent && rbuf.is_empty() => break,
                Ok(0) => {
                    return Err(Failure::Reset(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response head",
                    )))
                }
                Err(_) if reused && idempotent && rbuf.is_empty() => break,
                Err(e) => return Err(Failure::Reset(e)),
                Ok(_) => {}
            }
        }
        // The pooled connection was closed under us: once more on a new one.
        give_buf(rbuf);
        conn = redial(ep, connect_timeout, announce).await?;
        reused = false;
    }
}

/// A new connection to the endpoint; with `announce` (version, client, listener address)
/// it starts with a PROXY header.
pub(super) async fn redial(
    ep: &crate::state::EndpointState,
    connect_timeout: Duration,
    announce: Option<(ProxyVersion, SocketAddr, SocketAddr)>,
) -> Result<TcpStream, Failure> {
    match announce {
        None => crate::upstream::IdlePool::dial(ep.addr, connect_timeout).await,
        Some((v, client, local)) => {
            let connect =
                crate::upstream::proxied::dial(ep.addr, connect_timeout, v, Some((client, local)));
            ep.idle.in_dial_turn(connect).await
        }
    }
    .map_err(Failure::Connect)
}

/// A client connection's own upstream connection, for clusters that send PROXY headers:
/// the header names this client, so the connection serves no other (HAProxy marks such
/// connections private). Kept between its requests while it goes to the same endpoint.
pub(super) struct Private {
    pub(super) client: SocketAddr,
    /// The address the client connected to.
    pub(super) local: SocketAddr,
    pub(super) conn: Option<(SocketAddr, TcpStream)>,
}

/// A parsed upstream response head, rewritten for the client.
pub(super) struct ResponseStart {
    pub(super) head_len: usize,
    pub(super) status: u16,
    pub(super) informational: bool,
    pub(super) framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub(super) upstream_keep_alive: bool,
    /// The client head without the router's own headers and the final CRLF.
    pub(super) out: Scratch,
    pub(super) has_date: bool,
}

/// An upstream response head as parsed, with what both engines need to relay it.
pub(super) struct ParsedHead<'h, 'b> {
    pub(super) head_len: usize,
    pub(super) status: u16,
    pub(super) reason: &'b str,
    pub(super) informational: bool,
    pub(super) framing: Framing,
    /// The upstream keeps the connection open after this response.
    pub(super) upstream_keep_alive: bool,
    pub(super) has_date: bool,
    /// Transfer-Encoding came: any Content-Length is stale (RFC 9112 6.3).
    te: bool,
    conn: ConnectionOptions<'b>,
    headers: &'h [httparse::Header<'b>],
}

impl<'b> ParsedHead<'_, 'b> {
    /// The end-to-end headers to relay: hop-by-hop ones (and those Connection names) left
    /// out, and Content-Length when it does not frame the body the client gets as sent.
    pub(super) fn relayed(&self) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + '_ {
        self.headers.iter().filter_map(move |h| {
            let name = h.name.as_bytes();
            let framing_header = name.eq_ignore_ascii_case(b"content-length")
                && (self.te || matches!(self.framing, Framing::Length(_)));
            (!(wire::is_hop_by_hop(name, h.value) || self.conn.names(name) || framing_header))
                .then_some((name, h.value))
        })
    }
}

/// Parses a response head in `rbuf` (`None`: not complete yet) and decides its framing:
/// RFC 9112 6.3, with no body for HEAD, 1xx, 204 and 304; a bad Content-Length is an error.
pub(super) fn parse_head<'h, 'b>(
    rbuf: &'b [u8],
    head_method: bool,
    headers: &'h mut [httparse::Header<'b>],
) -> io::Result<Option<ParsedHead<'h, 'b>>> {
    let mut resp = httparse::Response::new(headers);
    let head_len = match resp.parse(rbuf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(io::Error::other(format!("bad response head: {e}"))),
    };
    let (Some(version), Some(status)) = (resp.version, resp.code) else {
        return Err(io::Error::other("bad response head"));
    };
    if status == 101 {
        return Err(io::Error::other(
            "101 to a request that did not ask to upgrade",
        ));
    }
    let informational = (100..200).contains(&status);
    let mut conn = ConnectionOptions::default();
    let mut length = None;
    let mut chunked = false;
    let mut te = false;
    let mut has_date = false;
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"connection") {
            conn.add(h.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            length = Some(
                wire::content_length(length, h.value)
                    .map_err(|_| io::Error::other("bad content-length from upstream"))?,
            );
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
            chunked = wire::ends_chunked(h.value).unwrap_or(false);
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        }
    }
    let framing = if head_method || informational || status == 204 || status == 304 {
        Framing::None
    } else if te {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    Ok(Some(ParsedHead {
        head_len,
        status,
        reason: resp.reason.unwrap_or(""),
        informational,
        framing,
        // Both framings at once is how a smuggled response looks (RFC 9112 6.3): its
        // connection is not reused, whatever the body turns out to be.
        upstream_keep_alive: version == 1 && !conn.close && !(te && length.is_some()),
        has_date,
        te,
        conn,
        headers: resp.headers,
    }))
}

/// Parses a response head and writes it for the client: hop-by-hop and framing headers
/// dropped, the route's `edits` applied.
pub(super) fn response_start(
    rbuf: &[u8],
    head_method: bool,
    edits: &HeaderActions,
) -> io::Result<Option<ResponseStart>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Some(head) = parse_head(rbuf, head_method, &mut headers)? else {
        return Ok(None);
    };
    let mut out = Scratch::take();
    out.extend_from_slice(b"HTTP/1.1 ");
    wire::put_u64(&mut out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(head.reason.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in head.relayed() {
        // The router's own headers come from the router alone.
        if name.eq_ignore_ascii_case(b"x-request-id")
            || name.eq_ignore_ascii_case(b"x-edge-route")
            || (!edits.is_empty() && rewrite::drops(edits, name))
        {
            continue;
        }
        wire::put_header(&mut out, name, value);
    }
    for (n, v) in rewrite::written(edits) {
        wire::put_header(&mut out, n.as_ref(), v.as_bytes());
    }
    match head.framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            wire::put_u64(&mut out, n);
            out.extend_from_slice(b"\r\n");
        }
        // A body that ends with the upstream's connection is re-framed as chunked, so the
        // client's connection outlives it.
        Framing::Chunked | Framing::Close => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n")
        }
        Framing::None => {}
    }
    Ok(Some(ResponseStart {
        head_len: head.head_len,
        status: head.status,
        informational: head.informational,
        framing: head.framing,
        upstream_keep_alive: head.upstream_keep_alive,
        out,
        has_date: head.has_date,
    }))
}
