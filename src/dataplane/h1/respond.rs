//! Relaying the response: the head, then the body copied through (re-framed as chunked
//! when it ends with the upstream's connection); the upstream connection back to its pool.

use super::*;

/// Writes the response head and copies the body through; returns the upstream connection
/// to its pool when the response ended cleanly. Returns whether the client stays open.
#[allow(clippy::too_many_arguments)]
pub(super) async fn respond<C: Client>(
    client: &mut C,
    head: Head,
    mut done: Completion,
    ep: &crate::state::EndpointState,
    request_id: &RequestId,
    route: Option<(&crate::routing::table::ZoneTable, &str, Reason)>,
    keep: bool,
    limits: Limits,
    private: Option<&mut Private>,
) -> bool {
    let Head {
        mut conn,
        mut rbuf,
        start,
    } = head;
    let rechunk = start.framing == Framing::Close;
    let mut out = start.out;
    wire::put_header(&mut out, b"x-request-id", request_id.as_bytes());
    if let Some((zone, endpoint, reason)) = route {
        out.extend_from_slice(b"x-edge-route: region=");
        out.extend_from_slice(zone.region.as_bytes());
        out.extend_from_slice(b"; zone=");
        out.extend_from_slice(zone.zone.as_bytes());
        out.extend_from_slice(b"; endpoint=");
        out.extend_from_slice(endpoint.as_bytes());
        out.extend_from_slice(b"; reason=");
        out.extend_from_slice(reason.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !start.has_date {
        wire::put_date(&mut out);
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    rbuf.advance(start.head_len);
    let mut body = BodyEnd::new(start.framing);
    let mut ok = true;
    // Raw body bytes copied (chunk framing included).
    let mut raw = 0u64;
    let mut ended = match body.take(&rbuf) {
        Ok((n, ended)) => {
            if rechunk {
                put_chunk(&mut out, &rbuf[..n]);
            } else {
                out.extend_from_slice(&rbuf[..n]);
            }
            raw += n as u64;
            rbuf.advance(n);
            ended || body.is_done()
        }
        Err(()) => {
            done.upstream_broke();
            ok = false;
            false
        }
    };
    if write_all(client, &out, limits.idle_timeout).await.is_err() {
        give_buf(rbuf);
        return false;
    }
    drop(out);
    while ok && !ended {
        rbuf.clear();
        if rbuf.capacity() < BUF_SIZE {
            rbuf.reserve(BUF_SIZE);
        }
        match conn.read_buf(&mut rbuf).await {
            Ok(0) if rechunk => {
                ended = write_all(client, b"0\r\n\r\n", limits.idle_timeout)
                    .await
                    .is_ok();
                ok = ended;
                break;
            }
            Ok(0) | Err(_) => {
                // The upstream broke off mid-body: its fault, counted against it.
                done.upstream_broke();
                ok = false;
                break;
            }
            Ok(_) => {}
        }
        let Ok((n, end)) = body.take(&rbuf) else {
            done.upstream_broke();
            ok = false;
            break;
        };
        let written = if rechunk {
            let mut chunk = Vec::with_capacity(n + 16);
            put_chunk(&mut chunk, &rbuf[..n]);
            write_all(client, &chunk, limits.idle_timeout).await
        } else {
            write_all(client, &rbuf[..n], limits.idle_timeout).await
        };
        if written.is_err() {
            done.sent(body.payload(raw));
            give_buf(rbuf);
            return false;
        }
        raw += n as u64;
        rbuf.advance(n);
        ended = end;
    }
    done.sent(body.payload(raw));
    if ended {
        done.complete();
    }
    // Reused only after a clean end with nothing unasked behind it.
    if ended && rbuf.is_empty() && start.upstream_keep_alive && start.framing != Framing::Close {
        match private {
            Some(p) => p.conn = Some((ep.addr, conn)),
            None => ep.idle.put(conn),
        }
    }
    give_buf(rbuf);
    drop(done);
    // A response cut short leaves the client's framing broken: close.
    ok && ended && keep
}

/// Appends `data` as one chunk of a chunked body (nothing for no data: an empty chunk
/// would end the body).
pub(super) fn put_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}
