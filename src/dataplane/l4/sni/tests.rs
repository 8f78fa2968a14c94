use super::*;

use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const SECOND: Duration = Duration::from_secs(1);
const GUARD: Duration = Duration::from_secs(20);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(roots: RootCertStore) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// Starts a real rustls client handshake for `name` over `io`; it sends a ClientHello and
/// then waits for an answer that, in most tests, never comes.
fn start_client<IO>(io: IO, name: &str) -> tokio::task::JoinHandle<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let name = ServerName::try_from(name.to_string()).unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(RootCertStore::empty()));
    tokio::spawn(async move {
        let _ = connector.connect(name, io).await;
    })
}

async fn hello_for(name: &str) -> ClientHello {
    let (client, mut server) = tokio::io::duplex(64 * 1024);
    let _client = start_client(client, name);
    read_client_hello(&mut server, DEFAULT_MAX_CLIENT_HELLO, SECOND)
        .await
        .unwrap()
}

#[tokio::test]
async fn reads_the_server_name_from_a_real_client_hello() {
    let hello = hello_for("a.example.com").await;
    assert_eq!(hello.server_name.as_deref(), Some("a.example.com"));
    assert_eq!(hello.buffered[0], HANDSHAKE_RECORD);
    // The replayed bytes are a whole ClientHello on their own.
    let again = read_client_hello(
        &mut hello.buffered.as_slice(),
        DEFAULT_MAX_CLIENT_HELLO,
        SECOND,
    )
    .await
    .unwrap();
    assert_eq!(again, hello);
}

#[tokio::test]
async fn server_name_is_lowercase_and_ip_names_count_as_none() {
    assert_eq!(
        hello_for("API.Example.COM").await.server_name.as_deref(),
        Some("api.example.com")
    );
    assert_eq!(hello_for("192.0.2.1").await.server_name, None);
    assert_eq!(hello_for("2001:db8::1").await.server_name, None);
}

#[tokio::test]
async fn client_hello_arriving_one_byte_at_a_time() {
    tokio::time::timeout(GUARD, async {
        // A one-byte pipe: the reader gets the ClientHello in as many reads as it has bytes.
        let (client, mut server) = tokio::io::duplex(1);
        let _client = start_client(client, "b.example.com");
        let hello = read_client_hello(&mut server, DEFAULT_MAX_CLIENT_HELLO, 5 * SECOND)
            .await
            .unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("b.example.com"));
        // Exactly the record(s) the client sent, nothing more: it waits for an answer.
        let mut record_end = 0;
        while record_end < hello.buffered.len() {
            let len = u16::from_be_bytes([
                hello.buffered[record_end + 3],
                hello.buffered[record_end + 4],
            ]);
            record_end += 5 + usize::from(len);
        }
        assert_eq!(record_end, hello.buffered.len());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bytes_after_the_client_hello_are_kept_for_replay() {
    let hello = hello_for("a.example.com").await;
    let mut input = hello.buffered.clone();
    input.extend_from_slice(b"\x17\x03\x03\x00\x02hi");
    let got = read_client_hello(&mut input.as_slice(), DEFAULT_MAX_CLIENT_HELLO, SECOND)
        .await
        .unwrap();
    assert_eq!(got.buffered, input);
    assert_eq!(got.server_name.as_deref(), Some("a.example.com"));
}

#[tokio::test]
async fn errors_for_non_tls_truncated_oversized_and_slow_streams() {
    let hello = hello_for("a.example.com").await.buffered;

    let r = read_client_hello(
        &mut &b"GET / HTTP/1.1\r\n\r\n"[..],
        DEFAULT_MAX_CLIENT_HELLO,
        SECOND,
    )
    .await;
    assert!(matches!(r, Err(SniError::NotTls)), "{r:?}");

    for cut in [0, 1, 5, hello.len() / 2, hello.len() - 1] {
        let r = read_client_hello(&mut &hello[..cut], DEFAULT_MAX_CLIENT_HELLO, SECOND).await;
        assert!(matches!(r, Err(SniError::Eof)), "cut {cut}: {r:?}");
    }

    let r = read_client_hello(&mut hello.as_slice(), 100, SECOND).await;
    assert!(matches!(r, Err(SniError::TooLarge)), "{r:?}");

    // A handshake message announcing 64 KiB, sent in full-size records, stops at the cap.
    let mut huge = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
    huge.resize(5 + 0x4000, 0);
    huge.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
    huge.resize(2 * (5 + 0x4000), 0);
    let r = read_client_hello(&mut huge.as_slice(), DEFAULT_MAX_CLIENT_HELLO, SECOND).await;
    assert!(matches!(r, Err(SniError::TooLarge)), "{r:?}");

    let malformed: [&[u8]; 3] = [
        // A ClientHello with an empty body.
        &[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00],
        // A ServerHello where a ClientHello must be.
        &[
            0x16, 0x03, 0x03, 0x00, 0x06, 0x02, 0x00, 0x00, 0x02, 0x03, 0x03,
        ],
        // A record longer than TLS allows.
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
    ];
    for input in malformed {
        let r = read_client_hello(&mut &input[..], DEFAULT_MAX_CLIENT_HELLO, SECOND).await;
        assert!(matches!(r, Err(SniError::Malformed(_))), "{input:?}: {r:?}");
    }

    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(&hello[..10]).await.unwrap();
    let r = read_client_hello(
        &mut server,
        DEFAULT_MAX_CLIENT_HELLO,
        Duration::from_millis(50),
    )
    .await;
    assert!(matches!(r, Err(SniError::Timeout)), "{r:?}");
    for e in [
        SniError::NotTls,
        SniError::Eof,
        SniError::TooLarge,
        SniError::Timeout,
    ] {
        assert!(e.to_string().contains("TLS"), "{e}");
    }
}

/// Random records: any result but a panic.
#[tokio::test]
async fn random_bytes_never_panic() {
    let hello = hello_for("a.example.com").await.buffered;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0005_1c1e);
    for i in 0..3_000 {
        let mut input = if i % 2 == 0 {
            // A real ClientHello with a few bytes flipped.
            let mut h = hello.clone();
            for _ in 0..rng.gen_range(1..8) {
                let at = rng.gen_range(0..h.len());
                h[at] = rng.gen();
            }
            h
        } else {
            let len = rng.gen_range(0..600);
            let mut v: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            v.splice(0..0, [0x16, 0x03, 0x01, 0x01, rng.gen()]);
            v
        };
        input.truncate(rng.gen_range(0..=input.len()));
        let _ = read_client_hello(&mut input.as_slice(), 2048, SECOND).await;
    }
}

/// Passthrough end to end over loopback: a real client and a real TLS server complete a
/// handshake through a proxy that only read the ClientHello, replayed it and spliced.
#[tokio::test]
async fn passthrough_replay_completes_a_real_handshake() {
    tokio::time::timeout(GUARD, async {
        let rcgen::CertifiedKey { cert, key_pair } =
            rcgen::generate_simple_self_signed(vec!["a.example.com".to_string()]).unwrap();
        let cert_der: CertificateDer<'static> = cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pair.serialize_der()));
        let server_config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert_der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = upstream.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).await.unwrap();
            tls.write_all(b"pong").await.unwrap();
            tls.shutdown().await.unwrap();
        });

        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let table = SniTable::new(vec![("*.example.com".to_string(), upstream_addr)], None);
        let proxy = tokio::spawn(async move {
            let (mut client, _) = front.accept().await.unwrap();
            let hello = read_client_hello(&mut client, DEFAULT_MAX_CLIENT_HELLO, SECOND)
                .await
                .unwrap();
            let target = *table.lookup(hello.server_name.as_deref()).unwrap();
            let mut upstream = TcpStream::connect(target).await.unwrap();
            let counters = crate::dataplane::l4::copy::ByteCounters::new();
            crate::dataplane::l4::copy::splice(
                &mut client,
                &mut upstream,
                &hello.buffered,
                SECOND * 5,
                &counters,
                &|_| {},
            )
            .await
        });

        let mut roots = RootCertStore::empty();
        roots.add(cert_der).unwrap();
        let connector = tokio_rustls::TlsConnector::from(client_config(roots));
        let tcp = TcpStream::connect(front_addr).await.unwrap();
        let mut tls = connector
            .connect(ServerName::try_from("a.example.com").unwrap(), tcp)
            .await
            .unwrap();
        tls.write_all(b"ping").await.unwrap();
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"pong");
        drop(tls);
        let _ = proxy.await.unwrap();
    })
    .await
    .unwrap();
}

fn table(entries: &[(&str, u32)], default: Option<u32>) -> SniTable<u32> {
    SniTable::new(
        entries.iter().map(|(h, t)| (h.to_string(), *t)).collect(),
        default,
    )
}

#[test]
fn exact_host_beats_wildcard_whatever_the_order() {
    for t in [
        table(&[("a.example.com", 1), ("*.example.com", 2)], None),
        table(&[("*.example.com", 2), ("a.example.com", 1)], None),
    ] {
        assert_eq!(t.lookup(Some("a.example.com")), Some(&1));
        assert_eq!(t.lookup(Some("b.example.com")), Some(&2));
    }
}

#[test]
fn wildcard_matches_exactly_one_more_label() {
    let t = table(&[("*.example.com", 2)], None);
    assert_eq!(t.lookup(Some("x.example.com")), Some(&2));
    assert_eq!(t.lookup(Some("a.b.example.com")), None);
    assert_eq!(t.lookup(Some("example.com")), None);
    assert_eq!(t.lookup(Some(".example.com")), None);
    assert_eq!(t.lookup(Some("xexample.com")), None);
    // A deeper wildcard is its own entry.
    let t = table(&[("*.example.com", 2), ("*.b.example.com", 3)], None);
    assert_eq!(t.lookup(Some("a.b.example.com")), Some(&3));
}

#[test]
fn names_compare_case_insensitively_without_trailing_dot() {
    let t = table(&[("A.Example.com.", 1), ("*.EXAMPLE.org", 2)], None);
    for name in ["a.example.com", "A.EXAMPLE.COM", "a.example.com."] {
        assert_eq!(t.lookup(Some(name)), Some(&1), "{name}");
    }
    assert_eq!(t.lookup(Some("Www.Example.Org.")), Some(&2));
}

#[test]
fn no_sni_or_no_match_goes_to_the_default() {
    let t = table(&[("a.example.com", 1)], Some(9));
    assert_eq!(t.lookup(None), Some(&9));
    assert_eq!(t.lookup(Some("other.test")), Some(&9));
    assert_eq!(t.lookup(Some("")), Some(&9));
    assert_eq!(t.lookup(Some(".")), Some(&9));
    let t = table(&[("a.example.com", 1)], None);
    assert_eq!(t.lookup(None), None);
    assert_eq!(t.lookup(Some("other.test")), None);
}

#[test]
fn duplicate_hosts_keep_the_first() {
    let t = table(
        &[
            ("a.example.com", 1),
            ("A.example.com", 2),
            ("*.x.test", 3),
            ("*.X.test.", 4),
        ],
        None,
    );
    assert_eq!(t.lookup(Some("a.example.com")), Some(&1));
    assert_eq!(t.lookup(Some("q.x.test")), Some(&3));
}

#[test]
fn read_client_hello_can_run_on_a_spawned_task() {
    fn assert_send<F: std::future::Future + Send>(_: F) {}
    let _ = |mut s: TcpStream| {
        assert_send(
            async move { read_client_hello(&mut s, DEFAULT_MAX_CLIENT_HELLO, SECOND).await },
        )
    };
}
