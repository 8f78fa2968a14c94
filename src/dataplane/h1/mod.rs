//! The native HTTP/1.1 data path: HTTP/1.1 clients, over plain TCP or TLS, to plain HTTP/1.1
//! upstreams, with no hyper in between.
//!
//! Why: hyper's server and pooled client cost a channel hand-off between tasks, a `HeaderMap`
//! per message each way and 16 KiB of buffers held by every connection, idle or not. Here one
//! task per client connection parses the head in place (httparse), rewrites it straight into
//! the upstream request, drives a pooled upstream connection inline and copies the response
//! through. Buffers are taken from a per-thread cache only while a request is in flight, so
//! an idle keep-alive connection holds its socket and its task, nothing more (and, over TLS,
//! its rustls session). The engine is one, generic over the client's stream ([`Client`]).
//!
//! Anything this path does not do is handed to hyper on the same connection, with the bytes
//! already read replayed first ([`Prefixed`]): HTTP/2 prior knowledge (h2c), HTTP/1.0
//! clients, `Expect`, Upgrade (WebSocket), absolute-form targets, and routes whose cluster
//! speaks TLS or HTTP/2 upstream or hedges. HTTP/1.1 carries no state between requests, so the
//! hand-off is seamless; the rest of that connection stays with hyper.

mod buffers;
mod client;
mod request;
mod respond;
pub mod streamed;
mod upstream;

pub use buffers::Prefixed;
use buffers::{give_buf, take_buf, Scratch};
pub use client::Client;
use client::{close, write_all};
use request::{error_bytes, head_end_seen, prepare, refusal, Forward, RequestId, Step};
use respond::respond;
use upstream::{send, Failure, Head, Private};

pub mod wire;

use std::borrow::Cow;
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::{HeaderValue, Method, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::control::{ProxyState, Table};
use crate::dataplane::request::{
    self as shared, AccessLog, AttemptError, Begin, Completion, ErrorKind, ErrorReply, Exchange,
    Next,
};
use crate::dataplane::watchdog::{End, Signal};
use crate::routing::table::Reason;
use crate::state::InFlight;
use crate::upstream::IdlePool;
use wire::{BodyEnd, ConnectionOptions, Framing};

/// The most headers a request or response head may carry (hyper's limit too).
const MAX_HEADERS: usize = 100;

/// The largest upstream response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Buffer size for heads and for copying bodies.
const BUF_SIZE: usize = 8 * 1024;

/// A request body up to this size is read whole before the request goes upstream.
const SMALL_BODY: u64 = 16 * 1024;

/// The listener's limits, as the connection loop uses them.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    /// The listener's id, for its routes.
    pub listener: u64,
    /// The listener terminates TLS: `x-forwarded-proto: https`.
    pub https: bool,
}

/// How [`serve`] ends.
pub enum Served<C> {
    Ended(End),
    /// Hand the connection to hyper: it starts with bytes already read.
    Hyper(Prefixed<C>),
}

/// Serves one connection for as long as it stays HTTP/1.1 this path can carry.
pub async fn serve<C: Client>(
    mut stream: C,
    peer: SocketAddr,
    state: &ProxyState,
    signal: &mut watch::Receiver<Signal>,
    limits: Limits,
) -> Served<C> {
    let accepted = Instant::now();
    let mut buf = BytesMut::new();
    // Made on the first request to a cluster that sends PROXY headers: the others never
    // pay for it, and an idle connection holds one pointer.
    let mut private: Option<Box<Private>> = None;
    let mut served = 0u64;
    loop {
        if buf.is_empty() {
            // Idle: the buffer goes back to the cache, so idle connections hold none.
            give_buf(std::mem::take(&mut buf));
            // A connection that has not sent its first request was accepted before the
            // drain began: its request is awaited (within the header timeout) and answered,
            // not cut. Idle keep-alive connections close at once.
            match *signal.borrow_and_update() {
                Signal::Run => {}
                Signal::Drain if served == 0 => {}
                _ => return Served::Ended(End::Drained),
            }
            let wait = if served == 0 {
                limits.header_timeout.saturating_sub(accepted.elapsed())
            } else {
                limits.idle_timeout
            };
            tokio::select! {
                r = stream.readable() => if r.is_err() {
                    return Served::Ended(End::Closed);
                },
                _ = tokio::time::sleep(wait) => {
                    return Served::Ended(if served == 0 { End::SlowHead } else { End::Idle });
                }
                _ = signal.changed() => if served > 0 || *signal.borrow() == Signal::Close {
                    return Served::Ended(End::Drained);
                },
            }
            buf = take_buf();
        }
        // The head must be complete within the header timeout of its first byte (of the
        // connection's start, for the first request).
        let since = if served == 0 {
            accepted
        } else {
            Instant::now()
        };
        let head_deadline = since + limits.header_timeout;
        let table = state.table.load_full();
        // The head is parsed once its end is in the buffer, and a small body awaited by
        // length: a client trickling bytes costs a scan of each byte once, not a parse.
        let mut scanned = 0usize;
        let mut need = 0usize;
        // What to do next is decided in this block, and the parsed request (a `Step`, about
        // 500 bytes) ends with it: a value alive across an await below would be part of every
        // connection's task, idle or not.
        let next: Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> = {
            let step = loop {
                let ready = if need > 0 {
                    buf.len() >= need
                } else {
                    head_end_seen(&buf, &mut scanned)
                };
                if ready {
                    match prepare(&buf, &table, peer, &limits, state) {
                        Step::Partial => {}
                        Step::MoreBody(total) => need = total,
                        step => break step,
                    }
                }
                if need == 0 && buf.len() >= limits.max_header_bytes {
                    break Step::Refuse(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
                }
                if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(BUF_SIZE);
                }
                match tokio::time::timeout_at(head_deadline.into(), stream.read_buf(&mut buf)).await
                {
                    Err(_) => return Served::Ended(End::SlowHead),
                    Ok(Ok(0)) | Ok(Err(_)) => return Served::Ended(End::Closed),
                    Ok(Ok(_)) => {}
                }
            };
            served += 1;
            match step {
                Step::Partial | Step::MoreBody(_) => {
                    unreachable!("the loop above ends only on a complete request")
                }
                Step::Hyper => {
                    return Served::Hyper(Prefixed {
                        prefix: buf,
                        stream,
                    })
                }
                // The head itself is bad: say so and close; nothing went upstream.
                Step::Refuse(status) => {
                    let out = refusal(status);
                    let stream = &mut stream;
                    Box::pin(async move {
                        let _ = write_all(stream, &out, limits.idle_timeout).await;
                        false
                    })
                }
                Step::Reply(r) => {
                    buf.advance(r.head_len);
                    let close = r.close || *signal.borrow() != Signal::Run;
                    let out = error_bytes(r.reply, &r.request_id, close, r.head_method);
                    let stream = &mut stream;
                    Box::pin(async move {
                        write_all(stream, &out, limits.idle_timeout).await.is_ok() && !close
                    })
                }
                // Boxed: a request's state is only needed while it is in flight. (A drain
                // that times out ends with the runtime, which drops in-flight requests.)
                Step::Forward(f) => Box::pin(forward(
                    &mut stream,
                    &mut buf,
                    f,
                    limits,
                    signal,
                    (peer, &mut private),
                )),
            }
        };
        let keep = next.await;
        if !keep {
            close(&mut stream, limits.idle_timeout).await;
            give_buf(buf);
            return Served::Ended(End::Closed);
        }
    }
}

/// Sends `f` upstream (retrying as the cluster allows) and copies the response to the
/// client. Returns whether the client connection stays open.
async fn forward<C: Client>(
    client: &mut C,
    buf: &mut BytesMut,
    f: Forward<'_>,
    limits: Limits,
    signal: &watch::Receiver<Signal>,
    (peer, private): (SocketAddr, &mut Option<Box<Private>>),
) -> bool {
    // Read when the answer is written: a drain that began meanwhile closes the connection
    // with `connection: close`.
    let draining = || *signal.borrow() != Signal::Run;
    let Forward {
        head_len,
        upstream_head,
        body,
        body_bytes,
        head_method,
        client_close,
        mut exchange,
        request_id,
        route_header,
    } = f;
    let x = &mut exchange;
    buf.advance(head_len);
    let cm = x.metrics();
    if body_bytes > 0 {
        cm.request_bytes.inc_by(body_bytes);
    }
    // The body is in hand (see `prepare`): it goes out with the head, in one write, and
    // stays here for a retry.
    let mut request_body = BodyEnd::new(body);
    let first: Cow<'_, [u8]> = match request_body.take(buf) {
        Ok((0, _)) => Cow::Borrowed(&upstream_head[..]),
        Ok((n, _)) => {
            let mut v = Vec::with_capacity(upstream_head.len() + n);
            v.extend_from_slice(&upstream_head);
            v.extend_from_slice(&buf[..n]);
            buf.advance(n);
            Cow::Owned(v)
        }
        Err(()) => return false,
    };
    let connect_timeout = x.config().connect_timeout;
    let proxy = x.config().send_proxy_protocol;
    let mut private = proxy.map(|_| {
        &mut **private.get_or_insert_with(|| {
            Box::new(Private {
                client: peer,
                local: client.local_addr().unwrap_or(peer),
                conn: None,
            })
        })
    });
    loop {
        let (ep, _) = x.target();
        let in_flight = InFlight::new(ep.clone());
        let sent = Instant::now();
        let attempt = send(
            &first,
            ep,
            connect_timeout,
            head_method,
            x.idempotent(),
            x.response_headers,
            proxy.zip(private.as_deref_mut()),
        );
        let failure = match tokio::time::timeout_at(x.deadline.into(), attempt).await {
            Ok(Ok(head)) => {
                x.responded(head.start.status, sent);
                let route = x.route_header(route_header);
                // The client's connection stays open only if its request was read whole.
                let keep = !client_close && !draining() && request_body.is_done();
                let done = exchange.completion(in_flight);
                return respond(
                    client,
                    head,
                    done,
                    ep,
                    &request_id,
                    route,
                    keep,
                    limits,
                    private,
                )
                .await;
            }
            Err(_) => AttemptError::Timeout,
            Ok(Err(Failure::Connect(e))) => AttemptError::Connect {
                detail: format!("connect: {e}"),
                tls: false,
            },
            Ok(Err(Failure::Reset(e))) => AttemptError::Reset(format!("upstream connection: {e}")),
        };
        drop(in_flight);
        match x.failed(failure, true) {
            Next::Retry => continue,
            Next::Reply(r) => {
                // After an error the client's connection stays open only if its request
                // was read whole.
                let keep = request_body.is_done() && !client_close && !draining();
                let out = error_bytes(r, &request_id, !keep, head_method);
                return write_all(client, &out, limits.idle_timeout).await.is_ok() && keep;
            }
            Next::Abort => return false,
        }
    }
}

#[cfg(test)]
mod tests;
