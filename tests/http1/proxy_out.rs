//! `send_proxy_protocol` on an HTTP cluster: every upstream connection starts with a PROXY
//! header naming the client and the address it connected to, connections are never shared
//! between clients, and health probes carry a header too (the upstream here refuses any
//! connection without one).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::support::*;

/// The PROXY header a connection started with: (version, source, destination).
type Announced = (u8, SocketAddr, SocketAddr);

/// A raw upstream that requires a PROXY header on every connection: it parses it with
/// `ppp`, records it by connection, then serves HTTP/1.1 as [`RawUpstream`] does.
struct ProxyUpstream {
    addr: SocketAddr,
    st: Arc<UpState>,
    headers: Arc<Mutex<HashMap<u64, Announced>>>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProxyUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads exactly one PROXY header (v1 up to its CRLF, v2 by its length field).
async fn read_proxy_header(s: &mut TcpStream) -> Result<Announced, String> {
    let mut buf = vec![0u8; 16];
    s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    if buf.starts_with(b"PROXY ") {
        while !buf.ends_with(b"\r\n") {
            if buf.len() > 107 {
                return Err("v1 header too long".into());
            }
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            buf.push(b[0]);
        }
    } else {
        let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
        let mut rest = vec![0u8; len];
        s.read_exact(&mut rest).await.map_err(|e| e.to_string())?;
        buf.extend_from_slice(&rest);
    }
    match ppp::HeaderResult::parse(&buf) {
        ppp::HeaderResult::V1(Ok(h)) => match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Ok((
                1,
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            other => Err(format!("v1 addresses {other:?}")),
        },
        ppp::HeaderResult::V2(Ok(h)) => match h.addresses {
            ppp::v2::Addresses::IPv4(a) => Ok((
                2,
                SocketAddr::from((a.source_address, a.source_port)),
                SocketAddr::from((a.destination_address, a.destination_port)),
            )),
            other => Err(format!("v2 addresses {other:?}")),
        },
        other => Err(format!("not a PROXY header: {other:?}")),
    }
}

impl ProxyUpstream {
    async fn start() -> ProxyUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let st = Arc::new(UpState::default());
        let headers = Arc::new(Mutex::new(HashMap::new()));
        let refused = Arc::new(AtomicU64::new(0));
        let (st2, h2, r2) = (st.clone(), headers.clone(), refused.clone());
        let handler: Handler = Arc::new(|q: &UpReq| Action::Reply(echo_reply(q)));
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            let mut id = 0u64;
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                id += 1;
                let (st, headers, refused, h) =
                    (st2.clone(), h2.clone(), r2.clone(), handler.clone());
                conns.spawn(async move {
                    let read = tokio::time::timeout(IO, read_proxy_header(&mut s)).await;
                    match read {
                        Ok(Ok(a)) => {
                            headers.lock().expect("lock").insert(id, a);
                            up_conn(s, id, st, h).await;
                        }
                        // No header, or a bad one: refused, as a strict upstream does.
                        _ => {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        ProxyUpstream {
            addr,
            st,
            headers,
            refused,
            task,
        }
    }

    fn announced(&self, conn: u64) -> Announced {
        *self
            .headers
            .lock()
            .expect("lock")
            .get(&conn)
            .expect("the connection sent a header")
    }
}

async fn proxy_headers_name_each_client(engine: Engine, version: u8) {
    let up = ProxyUpstream::start().await;
    let cluster = format!("send_proxy_protocol = \"v{version}\"\n");
    let toml = engine.config_with(&[raw_endpoint(up.addr)], &cluster, "");
    let r = engine.start(&toml).await;
    // Probed healthy through an upstream that refuses connections without a header.
    r.wait_all_healthy().await;
    assert_eq!(
        up.refused.load(Ordering::SeqCst),
        0,
        "a probe went without a header"
    );

    let mut a = Conn::open(r.dial()).await;
    let mut b = Conn::open(r.dial()).await;
    let a_addr = a.local.expect("addr");
    let b_addr = b.local.expect("addr");
    let mut conns: HashMap<SocketAddr, Vec<u64>> = HashMap::new();
    // Interleaved, so a shared pool would hand A's connection to B.
    for i in 0..3 {
        for (c, me) in [(&mut a, a_addr), (&mut b, b_addr)] {
            c.send(get(&format!("/req/{i}"))).await;
            let resp = c.read(false).await;
            assert_eq!(resp.status, 200, "{}", resp.text());
            let conn: u64 = resp
                .header("x-conn")
                .and_then(|v| v.parse().ok())
                .expect("x-conn");
            let (v, src, dst) = up.announced(conn);
            assert_eq!(v, version);
            assert_eq!(src, me, "the header names the client (address and port)");
            assert_eq!(dst, r.addr, "and the address it connected to");
            conns.entry(me).or_default().push(conn);
        }
    }
    let (ca, cb) = (&conns[&a_addr], &conns[&b_addr]);
    assert!(
        ca.iter().all(|c| !cb.contains(c)),
        "two clients shared an upstream connection: {ca:?} {cb:?}"
    );
    if engine != Engine::Hyper {
        // The native engine keeps its own upstream connection per client connection.
        assert!(ca.iter().all(|c| *c == ca[0]), "{ca:?}");
        assert!(cb.iter().all(|c| *c == cb[0]), "{cb:?}");
    }
    assert!(up.st.errors.lock().expect("lock").is_empty());
    assert_eq!(up.refused.load(Ordering::SeqCst), 0);
}

async fn proxy_v1_out(engine: Engine) {
    proxy_headers_name_each_client(engine, 1).await;
}
both_engines!(proxy_v1_out);

async fn proxy_v2_out(engine: Engine) {
    proxy_headers_name_each_client(engine, 2).await;
}
both_engines!(proxy_v2_out);
