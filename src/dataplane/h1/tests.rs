mod head {
    use super::super::*;
    use crate::dataplane::h1::buffers::BUFS;

    #[test]
    fn the_end_of_a_head_is_found_across_reads_of_any_size() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for step in 1..head.len() {
            let mut scanned = 0;
            let mut seen_at = None;
            for end in (step..=head.len()).step_by(step).chain([head.len()]) {
                if head_end_seen(&head[..end], &mut scanned) {
                    seen_at = Some(end);
                    break;
                }
            }
            assert_eq!(seen_at, Some(head.len()), "reads of {step} bytes");
        }
        let mut scanned = 0;
        assert!(head_end_seen(b"GET / HTTP/1.1\nHost: a\n\n", &mut scanned));
        let mut scanned = 0;
        assert!(!head_end_seen(
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            &mut scanned
        ));
    }

    #[test]
    fn a_buffer_read_from_goes_back_to_the_cache_whole() {
        let cached = || BUFS.with(|b| b.borrow().len());
        let mut buf = take_buf();
        buf.extend_from_slice(&[b'x'; 5000]);
        buf.advance(5000);
        let before = cached();
        give_buf(buf);
        assert_eq!(cached(), before + 1, "kept for the next request, not freed");
        assert!(take_buf().capacity() >= BUF_SIZE);
    }
}

mod fuzz {
    use super::super::*;
    #[allow(unused_imports)]
    use crate::dataplane::h1::upstream::response_start;

    /// A deterministic generator (xorshift): `next(n)` is in 0..n, the same sequence every run.
    fn below(seed: u64) -> impl FnMut(usize) -> usize {
        let mut x = seed;
        move |n| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n as u64) as usize
        }
    }

    /// The state a connection needs, with a routing table built from `toml` by the real
    /// builder. Its probers start but the endpoint (port 9, discard) does not answer HTTP, and
    /// the tests use the table as first built: endpoints of unknown health.
    pub(super) fn test_state(toml: &str) -> ProxyState {
        let cfg = crate::config::parse("test", toml, &|_| None).expect("config");
        let metrics = std::sync::Arc::new(crate::telemetry::metrics::Metrics::new());
        let events = std::sync::Arc::new(crate::telemetry::Events::new());
        let health =
            std::sync::Arc::new(crate::control::probe::Health::new(metrics.clone(), events));
        let mut builder = crate::control::reconcile::Builder::new(health, metrics.clone());
        let table = builder.build(1, std::sync::Arc::new(cfg)).expect("table");
        ProxyState {
            table: arc_swap::ArcSwap::from_pointee(table),
            metrics,
        }
    }

    /// Upstream response heads made of valid and broken pieces: parsing one never panics, and
    /// a head it accepts is rewritten into a head that parses again with the same status.
    #[test]
    fn response_heads_of_any_shape_are_parsed_or_refused_without_panic() {
        const PIECES: [&[u8]; 16] = [
            b"HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 404 Not Found\r\n",
            b"HTTP/1.1 100 Continue\r\n",
            b"HTTP/1.1 204 \r\n",
            b"Content-Length: 5\r\n",
            b"Content-Length: 5, 6\r\n",
            b"Content-Length: x\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Connection: close, x-a\r\n",
            b"X-A: 1\r\n",
            b"Date: Thu, 26 Nov 2026 19:00:00 GMT\r\n",
            b"\r\n",
            b"garbage",
            b": no name\r\n",
            b"\n",
        ];
        let mut next = below(0x2545_f491_4f6c_dd1d);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut head = Vec::new();
            for _ in 0..next(7) + 1 {
                head.extend_from_slice(PIECES[next(PIECES.len())]);
            }
            let head_method = next(2) == 0;
            if let Ok(Some(start)) =
                response_start(&head, head_method, &crate::routing::rewrite::NO_EDITS)
            {
                accepted += 1;
                let mut out = start.out.to_vec();
                out.extend_from_slice(b"\r\n");
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut again = httparse::Response::new(&mut headers);
                assert!(
                    matches!(again.parse(&out), Ok(httparse::Status::Complete(_))),
                    "{:?}",
                    String::from_utf8_lossy(&out)
                );
                assert_eq!(again.code, Some(start.status));
                let hop = again.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("x-a")
                });
                // Only a Connection line inside the head (not in the bytes after it) counts.
                let named =
                    String::from_utf8_lossy(&head[..start.head_len]).contains("close, x-a\r\n");
                assert!(!(hop && named), "{:?}", String::from_utf8_lossy(&out));
            }
        }
        assert!(
            accepted > 100,
            "the generator makes valid heads too ({accepted})"
        );
    }

    /// Client request heads made of valid and broken pieces, against a real routing table:
    /// every one is answered (forwarded, refused, replied to or handed to hyper) without a
    /// panic, and a forwarded one becomes an upstream head that parses, with no hop-by-hop
    /// header and exactly one framing header.
    #[tokio::test]
    async fn request_heads_of_any_shape_get_an_answer_without_panic() {
        let text = r#"
[locality]
region = "r0"
zone = "r0-z0"
[[cluster]]
name = "api"
affinity = { header = "x-session" }
[cluster.health_check]
interval = "1h"
[[cluster.endpoint]]
address = "127.0.0.1:9"
region = "r0"
zone = "r0-z0"
[[route]]
host = "api.test"
path_prefix = "/api"
cluster = "api"
"#;
        let state = test_state(text);
        const PIECES: [&[u8]; 22] = [
            b"GET /api/x HTTP/1.1\r\n",
            b"POST /api?q=1 HTTP/1.1\r\n",
            b"GET http://api.test/ HTTP/1.1\r\n",
            b"GET / HTTP/1.0\r\n",
            b"PRI * HTTP/2.0\r\n",
            b"Host: api.test\r\n",
            b"Host: API.test:80\r\n",
            b"Content-Length: 3\r\n",
            b"Content-Length: 3, 4\r\n",
            b"Transfer-Encoding: chunked\r\n",
            b"Transfer-Encoding: gzip\r\n",
            b"Connection: close, x-a\r\n",
            b"Upgrade: websocket\r\nConnection: upgrade\r\n",
            b"Expect: 100-continue\r\n",
            b"X-A: 1\r\n",
            b"X-Session: s1\r\n",
            b"X-Forwarded-For: 10.0.0.1\r\n",
            b"X-Request-Id: abc\r\n",
            b"\r\n",
            b"abc",
            b"3\r\nabc\r\n0\r\n\r\n",
            b"\x00\xff",
        ];
        let mut next = below(0x9e37_79b9_7f4a_7c15);
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let table = state.table.load_full();
        let mut forwarded = 0;
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 64 * 1024,
            listener: 0,
            https: false,
        };
        for _ in 0..20_000 {
            let mut buf = Vec::new();
            if next(2) == 0 {
                // Shaped like a request: a request line, a Host, headers, the blank line, a body.
                buf.extend_from_slice(PIECES[next(5)]);
                buf.extend_from_slice(PIECES[5 + next(2)]);
                for _ in 0..next(5) {
                    buf.extend_from_slice(PIECES[7 + next(11)]);
                }
                buf.extend_from_slice(b"\r\n");
                buf.extend_from_slice(PIECES[18 + next(4)]);
            } else {
                for _ in 0..next(8) + 1 {
                    buf.extend_from_slice(PIECES[next(PIECES.len())]);
                }
            }
            if let Step::Forward(f) = prepare(&buf, &table, peer, &limits, &state) {
                forwarded += 1;
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut up = httparse::Request::new(&mut headers);
                assert!(
                    matches!(up.parse(&f.upstream_head), Ok(httparse::Status::Complete(n)) if n == f.upstream_head.len()),
                    "{:?}",
                    String::from_utf8_lossy(&f.upstream_head)
                );
                let count = |name: &str| {
                    up.headers
                        .iter()
                        .filter(|h| h.name.eq_ignore_ascii_case(name))
                        .count()
                };
                let shown = String::from_utf8_lossy(&f.upstream_head).to_string();
                assert_eq!(count("connection") + count("upgrade"), 0, "{shown}");
                let head = String::from_utf8_lossy(&buf[..f.head_len]).to_string();
                if head.contains("close, x-a\r\n") {
                    assert_eq!(count("x-a"), 0, "{head:?} -> {shown}");
                }
                assert!(count("content-length") + count("transfer-encoding") <= 1);
                assert_eq!(count("host"), 1);
                assert_eq!(count("x-request-id"), 1);
            }
        }
        assert!(
            forwarded > 100,
            "the generator makes valid requests too ({forwarded})"
        );
    }
}

mod size {
    use super::super::*;
    #[allow(unused_imports)]
    use crate::dataplane::h1::upstream::response_start;

    /// Every open connection holds its `serve` future, idle or not: 10 000 idle connections
    /// hold 10 000 of them. Guards against a large value creeping into it (an inline `Step`
    /// once made it 1 512 bytes).
    #[tokio::test]
    async fn an_idle_connection_s_future_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let s = TcpStream::connect(l.local_addr().expect("addr"))
            .await
            .expect("connect");
        let text = "[locality]\nregion = \"r\"\nzone = \"z\"\n[[cluster]]\nname = \"a\"\n\
                    [[cluster.endpoint]]\naddress = \"127.0.0.1:9\"\nregion = \"r\"\nzone = \"z\"\n\
                    [[route]]\ncluster = \"a\"\n";
        let state = super::fuzz::test_state(text);
        let (_tx, mut rx) = watch::channel(Signal::Run);
        let limits = Limits {
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 65536,
            listener: 0,
            https: false,
        };
        let peer = "127.0.0.1:1".parse().expect("addr");
        let fut = serve(s, peer, &state, &mut rx, limits);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "the serve future is {size} bytes");
    }
}
