//! The hyper engine's leg to a plain HTTP/1.1 upstream, driven by the request's own task:
//! a connection from the endpoint's pool (the native engine's, with its connect cap), the
//! request head written from `http` parts, the body streamed after it, and the response head
//! parsed here into an `http::Response` whose body ([`UpstreamStream`]) reads the connection
//! itself. No client connection task, no channel, no spawn: the request body is sent from
//! the same polls that read the response, so an upstream that answers while the upload is
//! still coming (an echo) is served as it would be by hyper's client.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HOST};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};

use super::upstream::parse_head;
use super::*;
use crate::state::EndpointState;
use crate::upstream::body::ClientBodyError;
use crate::upstream::RequestBody;

/// Room kept free in the read buffer before a read: one read takes at most about this much,
/// and the body holds one such buffer at a time (what hyper's flow control has not taken).
const READ_SIZE: usize = 16 * 1024;

/// One attempt up to the response head, under the caller's deadline. A pooled connection
/// the upstream closed meanwhile is replaced by a new one, as [`super::upstream::send`]
/// does: when the head could not be written, or (for an idempotent request whose body was
/// not touched) when it closed without a byte of answer.
pub async fn send(
    ep: &Arc<EndpointState>,
    connect_timeout: Duration,
    idempotent: bool,
    req: Request<RequestBody>,
) -> Result<Response<UpstreamStream>, AttemptError> {
    let (parts, body) = req.into_parts();
    let head_method = parts.method == Method::HEAD;
    let mut head = Scratch::take();
    let framing = request_head(&mut head, &parts, &body, ep);
    let (mut conn, mut reused) = ep
        .idle
        .acquire(ep.addr, connect_timeout)
        .await
        .map_err(connect_error)?;
    let mut body = Some(body);
    loop {
        if let Err(e) = conn.write_all(&head).await {
            if reused {
                conn = IdlePool::dial(ep.addr, connect_timeout)
                    .await
                    .map_err(connect_error)?;
                reused = false;
                continue;
            }
            return Err(unanswered(e));
        }
        let upload = body
            .take()
            .filter(|_| framing != Framing::None)
            .map(|b| Box::new(Upload::new(b, framing == Framing::Chunked)));
        let mut leg = Leg {
            conn,
            rbuf: BytesMut::with_capacity(BUF_SIZE),
            upload,
            reusable: true,
        };
        match std::future::poll_fn(|cx| leg.poll_head(cx, head_method)).await {
            Ok(h) => return Ok(UpstreamStream::response(leg, h, ep)),
            // Resent only with the body untouched: none at all, or not a byte taken of it.
            Err(HeadError::Unanswered(_))
                if reused
                    && idempotent
                    && (framing == Framing::None
                        || leg.upload.as_ref().is_some_and(|u| !u.started)) =>
            {
                body = leg.upload.map(|u| u.body);
                conn = IdlePool::dial(ep.addr, connect_timeout)
                    .await
                    .map_err(connect_error)?;
                reused = false;
            }
            Err(HeadError::Unanswered(e)) => return Err(unanswered(e)),
            Err(HeadError::Reset(e)) => {
                return Err(AttemptError::Reset(format!("upstream connection: {e}")))
            }
            Err(HeadError::Client(e)) => {
                return Err(if e.malformed() {
                    AttemptError::ClientBad
                } else {
                    AttemptError::ClientGone
                })
            }
        }
    }
}

fn connect_error(e: io::Error) -> AttemptError {
    AttemptError::Connect {
        detail: format!("connect: {e}"),
        tls: false,
    }
}

/// The upstream closed (or reset) the connection before a byte of answer: `Closed`, as
/// hyper's client reports it, so the engine's one resend on a fresh connection applies.
fn unanswered(e: io::Error) -> AttemptError {
    use io::ErrorKind::*;
    let detail = format!("upstream connection: {e}");
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => {
            AttemptError::Closed(detail)
        }
        _ => AttemptError::Reset(detail),
    }
}

/// Writes the request head for the upstream: the request line (origin form), the headers as
/// the engine prepared them, Host when the client sent none, and the body's framing, which
/// it returns: none, the length the client announced, or chunked.
fn request_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    body: &RequestBody,
    ep: &EndpointState,
) -> Framing {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut announced = false;
    for (name, value) in parts.headers.iter() {
        if name == http::header::CONTENT_LENGTH {
            announced = true;
            continue;
        }
        if name == http::header::TRANSFER_ENCODING {
            continue;
        }
        wire::put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    if !parts.headers.contains_key(HOST) {
        let authority = parts.uri.authority().map_or(&*ep.label, |a| a.as_str());
        wire::put_header(out, b"host", authority.as_bytes());
    }
    let framing = if body.is_end_stream() {
        if announced {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        Framing::None
    } else if let Some(n) = body.size_hint().exact() {
        out.extend_from_slice(b"content-length: ");
        wire::put_u64(out, n);
        out.extend_from_slice(b"\r\n");
        Framing::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Framing::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Why no response head came.
enum HeadError {
    /// Closed or reset before a byte of answer.
    Unanswered(io::Error),
    /// Broke off mid-head, or sent garbage.
    Reset(io::Error),
    /// The client's body broke while it was being sent.
    Client(ClientBodyError),
}

/// The request body on its way up: each frame's data is written as it comes (as one chunk
/// when chunked), never more than one frame held.
struct Upload {
    body: RequestBody,
    chunked: bool,
    /// A frame polled from the body: it can no longer be sent again whole.
    started: bool,
    ended: bool,
    /// Still to write: a chunk's size line, its data, then the line end (or the last chunk).
    line: Vec<u8>,
    data: Bytes,
    tail: &'static [u8],
}

enum UploadError {
    Client(ClientBodyError),
    Upstream,
}

impl Upload {
    fn new(body: RequestBody, chunked: bool) -> Upload {
        Upload {
            body,
            chunked,
            started: false,
            ended: false,
            line: Vec::new(),
            data: Bytes::new(),
            tail: b"",
        }
    }

    /// Sends what the body has; `Ready(Ok)` once all of it is written.
    fn poll(&mut self, io: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), UploadError>> {
        loop {
            while !(self.line.is_empty() && self.data.is_empty() && self.tail.is_empty()) {
                let bufs = [
                    io::IoSlice::new(&self.line),
                    io::IoSlice::new(&self.data),
                    io::IoSlice::new(self.tail),
                ];
                let n = match Pin::new(&mut *io).poll_write_vectored(cx, &bufs) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(UploadError::Upstream)),
                    Poll::Ready(Ok(n)) => n,
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(UploadError::Upstream)),
                    Poll::Pending => return Poll::Pending,
                };
                self.consume(n);
            }
            if self.ended {
                return Poll::Ready(Ok(()));
            }
            self.started = true;
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(UploadError::Client(e))),
                Poll::Ready(Some(Ok(f))) => {
                    // Trailers have no place in a length-framed upstream request: dropped.
                    let Ok(d) = f.into_data() else { continue };
                    if d.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        self.line.clear();
                        let _ = std::io::Write::write_fmt(
                            &mut self.line,
                            format_args!("{:x}\r\n", d.len()),
                        );
                        self.tail = b"\r\n";
                    }
                    self.data = d;
                }
                Poll::Ready(None) => {
                    self.ended = true;
                    if self.chunked {
                        self.tail = b"0\r\n\r\n";
                    }
                }
            }
        }
    }

    /// Drops the first `n` bytes written.
    fn consume(&mut self, mut n: usize) {
        let l = n.min(self.line.len());
        self.line.drain(..l);
        n -= l;
        let d = n.min(self.data.len());
        self.data.advance(d);
        n -= d;
        self.tail = &self.tail[n.min(self.tail.len())..];
    }
}

/// The connection of an attempt, with what is still to do on it.
struct Leg {
    conn: TcpStream,
    rbuf: BytesMut,
    /// The request body, until it is all sent (boxed: most requests have none).
    upload: Option<Box<Upload>>,
    /// False once the upload failed: the upstream's view of the request is unknown.
    reusable: bool,
}

/// A response head, parsed and made into `http` parts.
struct Head {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

impl Leg {
    /// Sends the body while waiting for the response head; 1xx heads are skipped.
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        head_method: bool,
    ) -> Poll<Result<Head, HeadError>> {
        loop {
            if let Err(e) = self.poll_upload(cx) {
                return Poll::Ready(Err(HeadError::Client(e)));
            }
            if !self.rbuf.is_empty() {
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                match parse_head(&self.rbuf, head_method, &mut headers) {
                    Ok(Some(h)) if h.informational => {
                        let n = h.head_len;
                        self.rbuf.advance(n);
                        continue;
                    }
                    Ok(Some(h)) => {
                        let head = response_parts(&h);
                        let n = h.head_len;
                        self.rbuf.advance(n);
                        return Poll::Ready(head.map_err(HeadError::Reset));
                    }
                    Ok(None) => {}
                    Err(e) => return Poll::Ready(Err(HeadError::Reset(e))),
                }
            }
            if self.rbuf.len() >= MAX_RESPONSE_HEAD {
                let e = io::Error::other("response head too large");
                return Poll::Ready(Err(HeadError::Reset(e)));
            }
            let fresh = self.rbuf.is_empty();
            match poll_read(&self.conn, cx, &mut self.rbuf, BUF_SIZE) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed before the response head",
                    );
                    return Poll::Ready(Err(if fresh {
                        HeadError::Unanswered(e)
                    } else {
                        HeadError::Reset(e)
                    }));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) if fresh => return Poll::Ready(Err(HeadError::Unanswered(e))),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(HeadError::Reset(e))),
            }
        }
    }

    /// Moves the upload along. An upstream that stopped reading it (it answered early, or
    /// closed its side) leaves the response to be read; only the client's body breaking
    /// is an error here.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), ClientBodyError> {
        let Some(u) = self.upload.as_mut() else {
            return Ok(());
        };
        match u.poll(&mut self.conn, cx) {
            Poll::Pending => Ok(()),
            Poll::Ready(Ok(())) => {
                self.upload = None;
                Ok(())
            }
            Poll::Ready(Err(UploadError::Upstream)) => {
                self.upload = None;
                self.reusable = false;
                Ok(())
            }
            Poll::Ready(Err(UploadError::Client(e))) => {
                self.upload = None;
                self.reusable = false;
                Err(e)
            }
        }
    }
}

/// Reads what the socket has into `buf`, with at least `room` free first.
fn poll_read(
    conn: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    room: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < room / 4 {
        buf.reserve(room);
    }
    loop {
        match conn.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match conn.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return Poll::Ready(r),
        }
    }
}

/// The response head as `http` parts: end-to-end headers only (see
/// [`super::upstream::ParsedHead::relayed`]), the length when it frames the body; the
/// route's edits are the engine's to apply.
fn response_parts(h: &super::upstream::ParsedHead<'_, '_>) -> io::Result<Head> {
    let bad = |_| io::Error::other("bad response header");
    let mut headers = HeaderMap::with_capacity(16);
    for (name, value) in h.relayed() {
        let name = HeaderName::from_bytes(name).map_err(|_| io::Error::other("bad header name"))?;
        headers.append(name, HeaderValue::from_bytes(value).map_err(bad)?);
    }
    if let Framing::Length(n) = h.framing {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let status = StatusCode::from_u16(h.status).map_err(|_| io::Error::other("bad status"))?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    if !h.reason.is_empty() && Some(h.reason) != status.canonical_reason() {
        if let Ok(r) = hyper::ext::ReasonPhrase::try_from(h.reason.as_bytes()) {
            resp.extensions_mut().insert(r);
        }
    }
    Ok(Head {
        parts: resp.into_parts().0,
        framing: h.framing,
        keep_alive: h.upstream_keep_alive,
    })
}

/// A response body read from the upstream connection: Content-Length, chunked (decoded) or
/// until the upstream closes. After a clean end with the request sent whole and the upstream
/// keeping it open, the connection goes back to the endpoint's pool; after an error, or if
/// the body is dropped early, it is closed.
pub struct UpstreamStream {
    leg: Option<Leg>,
    end: BodyEnd,
    keep_alive: bool,
    ep: Arc<EndpointState>,
    /// A chunked body's framing since its last data: at its end, the last chunk and the
    /// trailers, which go on as a trailers frame (as hyper's client passes them).
    framing: Vec<u8>,
}

impl UpstreamStream {
    fn response(leg: Leg, head: Head, ep: &Arc<EndpointState>) -> Response<UpstreamStream> {
        let mut body = UpstreamStream {
            leg: Some(leg),
            end: BodyEnd::new(head.framing),
            keep_alive: head.keep_alive && head.framing != Framing::Close,
            ep: ep.clone(),
            framing: Vec::new(),
        };
        if head.framing == Framing::None {
            // Nothing will be polled: the connection is done with now.
            body.finish();
        }
        Response::from_parts(head.parts, body)
    }

    /// The body ended cleanly: the connection back to the pool if it can serve another.
    fn finish(&mut self) {
        if let Some(leg) = self.leg.take() {
            if self.keep_alive && leg.reusable && leg.upload.is_none() && leg.rbuf.is_empty() {
                self.ep.idle.put(leg.conn);
            }
        }
    }

    fn fail(&mut self, e: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.leg = None;
        Poll::Ready(Some(Err(e)))
    }
}

/// The trailer fields at the end of a chunked body's framing (`framing`: what came after
/// the last data: its line end, the last chunk's line, the trailers and the final line end).
fn trailers(framing: &[u8]) -> io::Result<Option<HeaderMap>> {
    let rest = framing.strip_prefix(b"\r\n").unwrap_or(framing);
    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let fields = &rest[eol + 2..];
    if fields.len() <= 2 {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let bad = || io::Error::other("bad chunked trailers from upstream");
    let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(fields, &mut headers)
    else {
        return Err(bad());
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        map.append(name, HeaderValue::from_bytes(h.value).map_err(|_| bad())?);
    }
    Ok(Some(map))
}

impl Body for UpstreamStream {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let Some(leg) = this.leg.as_mut() else {
                return Poll::Ready(None);
            };
            if let Err(e) = leg.poll_upload(cx) {
                return this.fail(io::Error::other(e));
            }
            if !leg.rbuf.is_empty() {
                let (data, ended) = match &mut this.end {
                    BodyEnd::Chunked(s) => {
                        let Ok(step) = s.next_data(&leg.rbuf) else {
                            return this.fail(io::Error::other("bad chunked body from upstream"));
                        };
                        if step.data > 0 {
                            this.framing.clear();
                        } else if this.framing.len() + step.framing > MAX_RESPONSE_HEAD {
                            return this.fail(io::Error::other("chunked trailers too large"));
                        } else {
                            this.framing.extend_from_slice(&leg.rbuf[..step.framing]);
                        }
                        leg.rbuf.advance(step.framing);
                        if step.end {
                            this.finish();
                            return match trailers(&this.framing) {
                                Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                                Ok(None) => Poll::Ready(None),
                                Err(e) => this.fail(e),
                            };
                        }
                        (leg.rbuf.split_to(step.data).freeze(), false)
                    }
                    end => {
                        let Ok((n, ended)) = end.take(&leg.rbuf) else {
                            return this.fail(io::Error::other("bad upstream body"));
                        };
                        (leg.rbuf.split_to(n).freeze(), ended)
                    }
                };
                if ended {
                    this.finish();
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                if ended {
                    return Poll::Ready(None);
                }
                continue;
            }
            match poll_read(&leg.conn, cx, &mut leg.rbuf, READ_SIZE) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.end, BodyEnd::Close) => {
                    this.leg = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed the connection mid-body",
                    );
                    return this.fail(e);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.leg.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.end, &self.leg) {
            (_, None) => SizeHint::with_exact(0),
            (BodyEnd::Length(left), _) => SizeHint::with_exact(*left),
            _ => SizeHint::default(),
        }
    }
}
