//! The server role: a request head parsed in place and decided on (refuse, answer, hand to
//! hyper, or forward with the upstream head already written).

use super::*;
use crate::routing::rewrite;

/// Whether `buf` holds the blank line that ends a head (CRLF CRLF, or bare LFs as httparse
/// accepts them). `scanned` carries over what was already searched.
pub(super) fn head_end_seen(buf: &[u8], scanned: &mut usize) -> bool {
    let from = scanned.saturating_sub(2);
    *scanned = buf.len();
    let tail = &buf[from..];
    tail.iter().enumerate().any(|(i, b)| {
        *b == b'\n'
            && (tail.get(i + 1) == Some(&b'\n')
                || (tail.get(i + 1) == Some(&b'\r') && tail.get(i + 2) == Some(&b'\n')))
    })
}

// Only ever on the stack between parsing and the first await: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub(super) enum Step<'t> {
    /// The head is not complete yet.
    Partial,
    /// The head is complete; the (small) body is not: the request needs this many bytes.
    MoreBody(usize),
    /// Not for this path: hand the connection to hyper.
    Hyper,
    /// A malformed head: this status, then close.
    Refuse(StatusCode),
    /// A response the router makes itself (404, 503).
    Reply(Reply),
    Forward(Forward<'t>),
}

/// A response the router makes itself, with its access-log record.
pub(super) struct Reply {
    pub(super) head_len: usize,
    /// The request has a body this path did not read: close after answering.
    pub(super) close: bool,
    /// A HEAD request: the reply has no body (RFC 9110 9.3.2).
    pub(super) head_method: bool,
    pub(super) reply: ErrorReply,
    pub(super) request_id: RequestId,
}

/// The bytes of a reply the router makes itself (the body and access-log line come from
/// [`ErrorReply`], as on the hyper engine). To a HEAD request, the head alone: a body
/// would be read as the next response on a kept-alive connection.
pub(super) fn error_bytes(
    r: ErrorReply,
    request_id: &RequestId,
    close: bool,
    head_method: bool,
) -> Vec<u8> {
    let status = r.status();
    let kind = r.kind.as_str();
    let body = r.body();
    let mut out = Vec::with_capacity(256 + body.len());
    status_line(&mut out, status);
    wire::put_header(&mut out, b"x-edge-error", kind.as_bytes());
    wire::put_header(&mut out, b"content-type", b"text/plain; charset=utf-8");
    wire::put_header(&mut out, b"x-request-id", request_id.as_bytes());
    out.extend_from_slice(b"content-length: ");
    wire::put_u64(&mut out, body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    wire::put_date(&mut out);
    out.extend_from_slice(b"\r\n");
    if !head_method {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A request's id, inline: the client's `x-request-id` (up to 128 bytes) or a new one.
/// Made into a `HeaderValue` (an allocation) only for the access log.
pub(super) struct RequestId {
    pub(super) buf: [u8; 128],
    pub(super) len: u8,
}

impl RequestId {
    pub(super) fn new(client: Option<&[u8]>) -> RequestId {
        let mut id = RequestId {
            buf: [0; 128],
            len: 0,
        };
        // httparse let the value through, so its bytes are valid in a header value.
        match client {
            Some(v) if !v.is_empty() && v.len() <= 128 => {
                id.buf[..v.len()].copy_from_slice(v);
                id.len = v.len() as u8;
            }
            _ => {
                let mut hex = [0u8; 32];
                shared::fill_request_id(&mut hex);
                id.buf[..32].copy_from_slice(&hex);
                id.len = 32;
            }
        }
        id
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }

    pub(super) fn header(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }
}

pub(super) fn status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The answer to a head that could not be parsed (as hyper answers it: no body, close).
pub(super) fn refusal(status: StatusCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    status_line(&mut out, status);
    out.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
    wire::put_date(&mut out);
    out.extend_from_slice(b"\r\n");
    out
}

/// A request on its way upstream: its head already rewritten for the upstream.
pub(super) struct Forward<'t> {
    pub(super) head_len: usize,
    pub(super) upstream_head: Scratch,
    pub(super) body: Framing,
    /// The body's length without framing (it is all in the buffer).
    pub(super) body_bytes: u64,
    pub(super) head_method: bool,
    /// The client asked to close after this request.
    pub(super) client_close: bool,
    pub(super) exchange: Exchange<'t>,
    pub(super) request_id: RequestId,
    pub(super) route_header: bool,
}

/// Parses the head at the start of `buf` and decides what to do with the request. Sync, so
/// the parser's header array never lives in the connection's task between requests.
pub(super) fn prepare<'t>(
    buf: &[u8],
    table: &'t Table,
    peer: SocketAddr,
    limits: &Limits,
    state: &ProxyState,
) -> Step<'t> {
    let Limits {
        max_header_bytes,
        listener,
        https,
        ..
    } = *limits;
    // HTTP/2 with prior knowledge starts "PRI * HTTP/2.0".
    if buf.starts_with(b"PRI ") || (buf.len() < 4 && b"PRI ".starts_with(buf)) {
        return if buf.len() < 4 {
            Step::Partial
        } else {
            Step::Hyper
        };
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        }
        Err(_) => return Step::Refuse(StatusCode::BAD_REQUEST),
    };
    if head_len > max_header_bytes {
        return Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        // HTTP/1.0 (keep-alive rules of its own) goes to hyper.
        return Step::Hyper;
    };
    if !(target.starts_with('/') || (target == "*" && method == "OPTIONS")) || method == "CONNECT" {
        return Step::Hyper;
    }
    let started = Instant::now();

    let mut host: Option<&[u8]> = None;
    let mut hosts = 0;
    let mut length: Option<u64> = None;
    let mut chunked = None;
    let mut conn = ConnectionOptions::default();
    let mut upgrade = false;
    let mut xff: Option<&[u8]> = None;
    let mut rid: Option<&[u8]> = None;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => {
                hosts += 1;
                host = Some(value);
            }
            6 if name.eq_ignore_ascii_case(b"expect") => return Step::Hyper,
            7 if name.eq_ignore_ascii_case(b"upgrade") => upgrade = true,
            10 if name.eq_ignore_ascii_case(b"connection") => conn.add(value),
            12 if name.eq_ignore_ascii_case(b"x-request-id") => {
                rid.get_or_insert(value);
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                match wire::content_length(length, value) {
                    Ok(n) => length = Some(n),
                    Err(_) => return Step::Refuse(StatusCode::BAD_REQUEST),
                }
            }
            15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => {
                xff.get_or_insert(value);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                if chunked.is_some() {
                    // Two Transfer-Encoding headers: refuse rather than guess.
                    return Step::Refuse(StatusCode::BAD_REQUEST);
                }
                match wire::ends_chunked(value) {
                    Ok(true) => chunked = Some(true),
                    _ => return Step::Refuse(StatusCode::BAD_REQUEST),
                }
            }
            _ => {}
        }
    }
    if upgrade && conn.upgrade {
        return Step::Hyper;
    }
    // RFC 9112 section 6.3: both framings at once is a bad request.
    if chunked.is_some() && length.is_some() {
        return Step::Refuse(StatusCode::BAD_REQUEST);
    }
    let body = match (chunked, length) {
        (Some(_), _) => Framing::Chunked,
        (None, Some(n)) if n > 0 => Framing::Length(n),
        _ => Framing::None,
    };
    // This path sends a request whole: the body must be in hand. A small one is awaited; a
    // larger one, or a chunked one still arriving, is streamed by hyper, which sends and
    // receives at once (an upstream may answer while the body is still coming).
    let avail = buf.len() - head_len;
    let body_bytes = match body {
        Framing::Length(n) if (avail as u64) < n => {
            return if n <= SMALL_BODY {
                Step::MoreBody(head_len + n as usize)
            } else {
                Step::Hyper
            };
        }
        Framing::Length(n) => n,
        Framing::Chunked => {
            let mut scanner = wire::ChunkScanner::default();
            match scanner.scan(&buf[head_len..]) {
                Ok(Some(_)) => scanner.data,
                Ok(None) => return Step::Hyper,
                Err(()) => return Step::Refuse(StatusCode::BAD_REQUEST),
            }
        }
        _ => 0,
    };
    let path = target.split('?').next().unwrap_or(target);
    let request_id = RequestId::new(rid);
    let head_method = method == "HEAD";
    let log = |host: Option<&str>| {
        table.config.listener.access_log.then(|| {
            let m = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
            AccessLog::new(m, host, path, started, &request_id.header(), peer)
        })
    };
    // A body this path will not read: answer, then close.
    let close = body != Framing::None || conn.close;
    // One Host, valid (RFC 9112 3.2): anything else is refused before routing.
    let valid = host
        .filter(|_| hosts == 1)
        .and_then(|h| shared::route_host(h).map(|r| (h, r)));
    let Some((host_raw, route_host)) = valid else {
        state
            .metrics
            .errors
            .with_label_values(&["", "bad_host"])
            .inc();
        let reply = ErrorReply::new(ErrorKind::BadHost, log(None));
        return Step::Reply(Reply {
            head_len,
            close,
            head_method,
            reply,
            request_id,
        });
    };

    let log = log(Some(&route_host));
    let Some(route) = table.match_route(listener, Some(&route_host), path) else {
        state.metrics.no_route.inc();
        return Step::Reply(Reply {
            head_len,
            close,
            head_method,
            reply: ErrorReply::new(ErrorKind::NoRoute, log),
            request_id,
        });
    };
    // A redirect is answered by the hyper engine, which renders it.
    if route.redirect.is_some() {
        return Step::Hyper;
    }
    let cluster = &table.clusters[route.cluster];
    let cfg = &cluster.config;
    if cfg.http2 || cfg.tls.is_some() || route.hedge {
        return Step::Hyper;
    }
    let affinity_key = match &cfg.affinity {
        crate::config::Affinity::Header(h) => req
            .headers
            .iter()
            .find(|x| x.name.eq_ignore_ascii_case(h.as_str()))
            .map(|x| x.value),
        _ => None,
    };
    let begin = Begin {
        client: peer,
        affinity_key,
        method: method.as_bytes(),
        // The body is in hand (or there is none): it can be sent again.
        replayable: true,
        started,
        timeout: route.timeout,
    };
    let mut exchange = match Exchange::begin(cluster, begin, log) {
        Ok(x) => x,
        Err(reply) => {
            return Step::Reply(Reply {
                head_len,
                close,
                head_method,
                reply,
                request_id,
            })
        }
    };

    exchange.request_headers = &route.request_headers;
    exchange.response_headers = &route.response_headers;

    // The upstream head: the request line, the end-to-end headers as sent (names in their
    // case, Host kept) less the route's removals, then the route's additions, the
    // forwarding headers and the framing this path writes itself.
    let mut up = Scratch::take();
    up.extend_from_slice(method.as_bytes());
    up.push(b' ');
    match &route.rewrite_prefix {
        Some(r) => up.extend_from_slice(rewrite::path(target, &route.path_prefix, r).as_bytes()),
        None => up.extend_from_slice(target.as_bytes()),
    }
    up.extend_from_slice(b" HTTP/1.1\r\n");
    let edits = exchange.request_headers;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let host_line = name.eq_ignore_ascii_case(b"host");
        if wire::is_hop_by_hop(name, h.value)
            || (!edits.is_empty() && rewrite::drops(edits, name))
            // Connection may not remove Host: the upstream must see what was routed.
            || (conn.names(name) && !host_line)
            || shared::is_forwarding_lookalike(name)
            || name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"x-forwarded-for")
            || name.eq_ignore_ascii_case(b"x-forwarded-proto")
            || name.eq_ignore_ascii_case(b"x-forwarded-host")
            || name.eq_ignore_ascii_case(b"x-request-id")
        {
            continue;
        }
        wire::put_header(&mut up, name, h.value);
    }
    for (n, v) in rewrite::written(edits) {
        wire::put_header(&mut up, n.as_ref(), v.as_bytes());
    }
    up.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = xff.filter(|v| !v.is_empty()) {
        up.extend_from_slice(prev);
        up.extend_from_slice(b", ");
    }
    {
        use std::io::Write;
        let _ = write!(up, "{}", peer.ip().to_canonical());
    }
    let proto: &[u8] = if https { b"https" } else { b"http" };
    up.extend_from_slice(b"\r\n");
    wire::put_header(&mut up, b"x-forwarded-proto", proto);
    wire::put_header(&mut up, b"x-forwarded-host", host_raw);
    wire::put_header(&mut up, b"x-request-id", request_id.as_bytes());
    match body {
        Framing::Chunked => up.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Length(n) => {
            up.extend_from_slice(b"content-length: ");
            wire::put_u64(&mut up, n);
            up.extend_from_slice(b"\r\n");
        }
        _ => {
            if length == Some(0) {
                up.extend_from_slice(b"content-length: 0\r\n");
            }
        }
    }
    up.extend_from_slice(b"\r\n");

    Step::Forward(Forward {
        head_len,
        upstream_head: up,
        body,
        body_bytes,
        head_method,
        client_close: conn.close,
        exchange,
        request_id,
        route_header: table.config.listener.route_header,
    })
}
