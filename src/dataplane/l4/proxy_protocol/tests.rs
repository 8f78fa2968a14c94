use super::*;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;

const SECOND: Duration = Duration::from_secs(1);

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn v4_pair() -> (SocketAddr, SocketAddr) {
    (sa("192.0.2.10:51234"), sa("198.51.100.1:443"))
}

fn v6_pair() -> (SocketAddr, SocketAddr) {
    (sa("[2001:db8::10]:51234"), sa("[2001:db8:1::1]:443"))
}

fn v2_local() -> Vec<u8> {
    use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
    Builder::new(
        Version::Two | Command::Local,
        AddressFamily::Unspecified | Protocol::Unspecified,
    )
    .build()
    .unwrap()
}

/// Reads a header from `bytes` followed by `rest`, returning the result and what is left.
async fn read_from(
    bytes: &[u8],
    rest: &[u8],
) -> (Result<Option<ProxiedAddrs>, ProxyHeaderError>, Vec<u8>) {
    let mut input = bytes.to_vec();
    input.extend_from_slice(rest);
    let mut reader: &[u8] = &input;
    let result = read_header(&mut reader, SECOND).await;
    (result, reader.to_vec())
}

#[test]
fn detect_signatures() {
    assert_eq!(detect(b""), Detect::NeedMore);
    assert_eq!(detect(b"PRO"), Detect::NeedMore);
    assert_eq!(detect(b"PROXY "), Detect::Header);
    assert_eq!(detect(b"PROXY TCP4"), Detect::Header);
    assert_eq!(detect(b"PROXYX"), Detect::NotHeader);
    assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Detect::NotHeader);
    assert_eq!(detect(b"\x16\x03\x01"), Detect::NotHeader);
    assert_eq!(detect(&V2_SIGNATURE[..5]), Detect::NeedMore);
    assert_eq!(detect(&encode_v2(v4_pair().0, v4_pair().1)), Detect::Header);
}

#[test]
fn v1_roundtrip_both_families() {
    for (src, dst) in [v4_pair(), v6_pair()] {
        let header = encode_v1(src, dst);
        assert!(header.ends_with(b"\r\n"));
        let (addrs, len) = parse_header(&header).unwrap();
        assert_eq!(
            addrs,
            Some(ProxiedAddrs {
                source: src,
                destination: dst
            })
        );
        assert_eq!(len, header.len());
    }
    let (src, dst) = v4_pair();
    assert_eq!(
        encode_v1(src, dst),
        b"PROXY TCP4 192.0.2.10 198.51.100.1 51234 443\r\n"
    );
}

#[test]
fn v2_roundtrip_both_families() {
    for (src, dst) in [v4_pair(), v6_pair()] {
        let header = encode_v2(src, dst);
        assert!(!header.is_empty());
        let (addrs, len) = parse_header(&header).unwrap();
        assert_eq!(
            addrs,
            Some(ProxiedAddrs {
                source: src,
                destination: dst
            })
        );
        assert_eq!(len, header.len());
    }
    assert_eq!(encode_v2(v4_pair().0, v4_pair().1).len(), 16 + 12);
    assert_eq!(encode_v2(v6_pair().0, v6_pair().1).len(), 16 + 36);
}

#[test]
fn encode_maps_mixed_families_to_ipv6_and_mapped_pairs_to_ipv4() {
    let src = sa("192.0.2.10:1000");
    let dst = sa("[2001:db8::1]:443");
    let mapped_src = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(192, 0, 2, 10).to_ipv6_mapped()),
        1000,
    );
    for encode in [encode_v1, encode_v2] {
        let (addrs, _) = parse_header(&encode(src, dst)).unwrap();
        assert_eq!(
            addrs,
            Some(ProxiedAddrs {
                source: mapped_src,
                destination: dst
            })
        );
    }

    // A dual-stack socket reports IPv4 peers as mapped; the header says what they are.
    let mapped_dst = SocketAddr::new(
        IpAddr::V6(Ipv4Addr::new(198, 51, 100, 1).to_ipv6_mapped()),
        443,
    );
    let header = encode_v1(mapped_src, mapped_dst);
    assert!(header.starts_with(b"PROXY TCP4 192.0.2.10 198.51.100.1 "));
    let (addrs, _) = parse_header(&encode_v2(mapped_src, mapped_dst)).unwrap();
    assert_eq!(
        addrs,
        Some(ProxiedAddrs {
            source: sa("192.0.2.10:1000"),
            destination: sa("198.51.100.1:443")
        })
    );
}

#[tokio::test]
async fn read_header_leaves_the_following_bytes_unread() {
    let (src, dst) = v6_pair();
    let payload = b"\x16\x03\x01\x00\x05hello GET / HTTP/1.1\r\n\r\n";
    for header in [
        encode_v1(src, dst),
        encode_v2(src, dst),
        b"PROXY UNKNOWN\r\n".to_vec(),
        v2_local(),
    ] {
        let (result, rest) = read_from(&header, payload).await;
        result.unwrap();
        assert_eq!(rest, payload);
    }
}

#[tokio::test]
async fn read_header_one_byte_at_a_time() {
    let (src, dst) = v4_pair();
    for header in [
        encode_v1(src, dst),
        encode_v2(src, dst),
        encode_v1(v6_pair().0, v6_pair().1),
    ] {
        // A one-byte pipe: every read returns at most one byte.
        let (mut client, mut server) = tokio::io::duplex(1);
        let mut input = header.clone();
        input.extend_from_slice(b"after");
        let writer = tokio::spawn(async move {
            for b in input {
                client.write_all(&[b]).await.unwrap();
                tokio::task::yield_now().await;
            }
            client
        });
        let addrs = read_header(&mut server, 5 * SECOND).await.unwrap().unwrap();
        assert_eq!(addrs.source.port(), src.port());
        // The writer can only finish once the rest is read: the pipe holds one byte.
        let mut rest = [0u8; 5];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"after");
        let _client = writer.await.unwrap();
    }
}

#[tokio::test]
async fn local_command_and_unknown_family_give_none() {
    assert!(read_from(&v2_local(), b"").await.0.unwrap().is_none());
    assert!(read_from(b"PROXY UNKNOWN\r\n", b"")
        .await
        .0
        .unwrap()
        .is_none());
    let long_unknown = b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(long_unknown.len(), V1_MAX_LEN);
    assert!(read_from(long_unknown, b"x").await.0.unwrap().is_none());

    // PROXY command with an unspecified family, and a datagram (UDP) header on a stream.
    use ppp::v2::{AddressFamily, Builder, Command, Protocol, Version};
    let unspec = Builder::new(
        Version::Two | Command::Proxy,
        AddressFamily::Unspecified | Protocol::Stream,
    )
    .build()
    .unwrap();
    assert!(read_from(&unspec, b"").await.0.unwrap().is_none());
    let (src, dst) = v4_pair();
    let dgram = Builder::with_addresses(
        Version::Two | Command::Proxy,
        Protocol::Datagram,
        (src, dst),
    )
    .build()
    .unwrap();
    assert!(read_from(&dgram, b"").await.0.unwrap().is_none());
}

#[tokio::test]
async fn v2_tlvs_are_skipped() {
    use ppp::v2::{Builder, Command, Protocol, Type, Version};
    let (src, dst) = v4_pair();
    let header =
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
            .write_tlv(Type::UniqueId, b"0123456789")
            .unwrap()
            .write_tlv(Type::Authority, b"a.example.com")
            .unwrap()
            .build()
            .unwrap();
    let (result, rest) = read_from(&header, b"data").await;
    assert_eq!(
        result.unwrap(),
        Some(ProxiedAddrs {
            source: src,
            destination: dst
        })
    );
    assert_eq!(rest, b"data");
}

#[tokio::test]
async fn errors_for_bad_input() {
    let (src, dst) = v4_pair();
    let v1 = encode_v1(src, dst);
    let v2 = encode_v2(src, dst);

    let (r, _) = read_from(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"").await;
    assert!(matches!(r, Err(ProxyHeaderError::Missing)), "{r:?}");

    // Truncated anywhere, both versions.
    for header in [&v1, &v2] {
        for cut in 0..header.len() {
            let (r, _) = read_from(&header[..cut], b"").await;
            assert!(
                matches!(r, Err(ProxyHeaderError::Truncated)),
                "cut {cut}: {r:?}"
            );
            assert!(
                matches!(
                    parse_header(&header[..cut]),
                    Err(ProxyHeaderError::Truncated)
                ),
                "cut {cut}"
            );
        }
    }

    // A v1 line with no end.
    let long = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
    let (r, _) = read_from(&long, b"").await;
    assert!(matches!(r, Err(ProxyHeaderError::TooLong)), "{r:?}");
    assert!(matches!(
        parse_header(&long),
        Err(ProxyHeaderError::TooLong)
    ));

    // A v2 header announcing more than we accept, though it would fit in the protocol.
    let mut big = v2.clone();
    big[14..16].copy_from_slice(&4000u16.to_be_bytes());
    big.resize(16 + 4000, 0);
    let (r, rest) = read_from(&big, b"").await;
    assert!(matches!(r, Err(ProxyHeaderError::TooLong)), "{r:?}");
    assert_eq!(rest.len(), 4000, "nothing past the fixed part is read");

    let malformed: [&[u8]; 7] = [
        b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.1 1 99999\r\n",
        b"PROXY TCP6 192.0.2.1 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.1 1 2\n",
        b"PROXY TCP4 192.0.2.1\r198.51.100.1 1 2\r\n",
        b"PROXY UDP4 192.0.2.1 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.1 01 2\r\n",
    ];
    for input in malformed {
        let (r, _) = read_from(input, b"").await;
        assert!(
            matches!(r, Err(ProxyHeaderError::Malformed(_))),
            "{:?}: {r:?}",
            String::from_utf8_lossy(input)
        );
    }
    let mut bad_version = v2.clone();
    bad_version[12] = 0x31;
    let mut bad_family = v2.clone();
    bad_family[13] = 0x41;
    let mut short_addrs = v2.clone();
    short_addrs[14..16].copy_from_slice(&4u16.to_be_bytes());
    short_addrs.truncate(20);
    for input in [bad_version, bad_family, short_addrs] {
        let (r, _) = read_from(&input, b"").await;
        assert!(matches!(r, Err(ProxyHeaderError::Malformed(_))), "{r:?}");
    }
}

#[tokio::test]
async fn timeout_when_the_header_never_completes() {
    let (mut client, mut server) = tokio::io::duplex(64);
    client.write_all(b"PROXY TCP4 192.0.2.1").await.unwrap();
    let started = std::time::Instant::now();
    let r = read_header(&mut server, Duration::from_millis(50)).await;
    assert!(matches!(r, Err(ProxyHeaderError::Timeout)), "{r:?}");
    assert!(started.elapsed() < SECOND);
    drop(client);
}

#[test]
fn errors_display_what_went_wrong() {
    let texts = [
        ProxyHeaderError::Missing.to_string(),
        ProxyHeaderError::Malformed("v1: bad".into()).to_string(),
        ProxyHeaderError::Truncated.to_string(),
        ProxyHeaderError::TooLong.to_string(),
        ProxyHeaderError::Timeout.to_string(),
        ProxyHeaderError::Io(io::Error::other("boom")).to_string(),
    ];
    for text in &texts {
        assert!(text.contains("PROXY header"), "{text}");
    }
    assert!(texts[1].contains("v1: bad") && texts[5].contains("boom"));
}

/// Random input, raw and behind each signature: any result but a panic, and a header that
/// parses never claims more bytes than it was given.
#[tokio::test]
async fn random_bytes_never_panic() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0f1a_7e00);
    let prefixes: [&[u8]; 5] = [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", V2_SIGNATURE];
    for i in 0..20_000 {
        let prefix = prefixes[i % prefixes.len()];
        let len = rng.gen_range(0..160);
        let mut input = prefix.to_vec();
        let mut noise = vec![0u8; len];
        rng.fill(&mut noise[..]);
        // Half of them bytes the parsers care about, so the search goes past the first check.
        const INTERESTING: &[u8] = b"0123456789.: \r\nTCPUNKOWfa\x21\x11\x00";
        input.extend(noise.iter().map(|&b| {
            if b & 1 == 0 {
                INTERESTING[usize::from(b >> 1) % INTERESTING.len()]
            } else {
                b
            }
        }));
        if prefix == V2_SIGNATURE && input.len() >= 16 && rng.gen_bool(0.7) {
            // Keep the announced length plausible so the address parsing is reached.
            input[12] = 0x20 | rng.gen_range(0..3u8);
            input[13] = [0x00, 0x11, 0x21, 0x31, 0x12][rng.gen_range(0..5)];
            let rest = (input.len() - 16) as u16;
            input[14..16].copy_from_slice(&rng.gen_range(0..=rest).to_be_bytes());
        }
        if let Ok((_, n)) = parse_header(&input) {
            assert!(n <= input.len());
        }
        if i % 10 == 0 {
            let mut reader: &[u8] = &input;
            let _ = read_header(&mut reader, SECOND).await;
        }
    }
    // The longest v1 forms still fit.
    let v6max = SocketAddr::new(IpAddr::V6(Ipv6Addr::from([0xffff; 8])), 65535);
    assert!(encode_v1(v6max, v6max).len() <= V1_MAX_LEN);
    assert!(parse_header(&encode_v1(v6max, v6max)).is_ok());
}

#[test]
fn read_header_can_run_on_a_spawned_task() {
    fn assert_send<F: std::future::Future + Send>(_: F) {}
    let _ = |mut s: tokio::net::TcpStream| {
        assert_send(async move { read_header(&mut s, SECOND).await })
    };
}
