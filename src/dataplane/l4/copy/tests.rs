use super::*;

use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

const GUARD: Duration = Duration::from_secs(20);

/// Two ends of one loopback TCP connection.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (connected.unwrap(), accepted.unwrap().0)
}

/// client_app <-> [proxy: splice] <-> upstream_app, all over loopback TCP. Returns the two
/// application ends and the proxy's result.
async fn proxied(
    initial: &'static [u8],
    idle: Duration,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(io::Result<(u64, u64)>, std::sync::Arc<ByteCounters>)>,
) {
    let (client_app, mut proxy_client) = tcp_pair().await;
    let (mut proxy_upstream, upstream_app) = tcp_pair().await;
    let counters = std::sync::Arc::new(ByteCounters::new());
    let proxy = tokio::spawn(async move {
        let r = splice(
            &mut proxy_client,
            &mut proxy_upstream,
            initial,
            idle,
            &counters,
            &|_| {},
        )
        .await;
        (r, counters)
    });
    (client_app, upstream_app, proxy)
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

#[tokio::test]
async fn half_close_still_delivers_the_whole_reply() {
    tokio::time::timeout(GUARD, async {
        let (mut client, mut upstream, proxy) = proxied(b"", Duration::from_secs(10)).await;
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();

        // The upstream sees the client's EOF: the shutdown was passed on.
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");

        // It answers after that, and the client, already half-closed, reads it all.
        let reply = pattern(300_000, 7);
        upstream.write_all(&reply).await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut received = Vec::new();
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(checksum(&received), checksum(&reply));
        assert_eq!(received.len(), reply.len());

        let (result, counters) = proxy.await.unwrap();
        assert_eq!(result.unwrap(), (7, 300_000));
        assert_eq!((counters.to_upstream(), counters.to_client()), (7, 300_000));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn one_mib_each_way_concurrently() {
    tokio::time::timeout(GUARD, async {
        const MIB: usize = 1 << 20;
        let (client, upstream, proxy) = proxied(b"", Duration::from_secs(10)).await;
        let up_data = pattern(MIB, 1);
        let down_data = pattern(MIB, 2);

        let side = |mut stream: TcpStream, send: Vec<u8>| async move {
            let (mut rd, mut wr) = stream.split();
            let write = async {
                wr.write_all(&send).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut got = Vec::with_capacity(MIB);
            let read = rd.read_to_end(&mut got);
            let ((), n) = tokio::join!(write, read);
            n.unwrap();
            got
        };
        let (at_upstream, at_client) = tokio::join!(
            side(upstream, down_data.clone()),
            side(client, up_data.clone())
        );
        assert_eq!(
            (at_upstream.len(), checksum(&at_upstream)),
            (MIB, checksum(&up_data))
        );
        assert_eq!(
            (at_client.len(), checksum(&at_client)),
            (MIB, checksum(&down_data))
        );

        let (result, _) = proxy.await.unwrap();
        assert_eq!(result.unwrap(), (MIB as u64, MIB as u64));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn initial_bytes_go_first_and_are_counted() {
    tokio::time::timeout(GUARD, async {
        let (mut client, mut upstream, proxy) =
            proxied(b"PROXY UNKNOWN\r\n", Duration::from_secs(10)).await;
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"PROXY UNKNOWN\r\nhello");
        drop(upstream);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        let (result, counters) = proxy.await.unwrap();
        assert_eq!(result.unwrap(), (20, 0));
        assert_eq!(counters.to_upstream(), 20);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn idle_timeout_fires_when_nothing_moves() {
    tokio::time::timeout(GUARD, async {
        let idle = Duration::from_millis(150);
        let started = std::time::Instant::now();
        let (_client, _upstream, proxy) = proxied(b"", idle).await;
        let (result, _) = proxy.await.unwrap();
        let err = result.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= idle, "{:?}", started.elapsed());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn traffic_in_one_direction_keeps_the_connection_alive() {
    tokio::time::timeout(GUARD, async {
        let idle = Duration::from_millis(200);
        let (mut client, mut upstream, proxy) = proxied(b"", idle).await;
        // A download to a silent client for well over the idle period...
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        while started.elapsed() < idle * 4 {
            upstream.write_all(b"tick").await.unwrap();
            sent += 4;
            let mut buf = [0u8; 4];
            client.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(idle / 4).await;
        }
        assert!(!proxy.is_finished(), "timed out while bytes were moving");
        // ...then silence: the timeout fires.
        let (result, counters) = proxy.await.unwrap();
        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!(counters.to_client(), sent);
        assert_eq!(counters.to_upstream(), 0);
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_reset_side_ends_the_splice_with_an_error_or_eof() {
    tokio::time::timeout(GUARD, async {
        let (client, upstream, proxy) = proxied(b"", Duration::from_secs(10)).await;
        // Closing both application ends: the splice must end, not hang.
        drop(client);
        drop(upstream);
        let (result, _) = proxy.await.unwrap();
        if let Ok(counts) = result {
            assert_eq!(counts, (0, 0));
        }
    })
    .await
    .unwrap();
}

#[test]
fn splice_can_run_on_a_spawned_task() {
    fn assert_send<F: std::future::Future + Send>(_: F) {}
    let counters = ByteCounters::new();
    let _ = |mut a: TcpStream, mut b: TcpStream| {
        assert_send(async move {
            splice(
                &mut a,
                &mut b,
                b"",
                Duration::from_secs(1),
                &counters,
                &|_| {},
            )
            .await
        })
    };
}

/// How long the client stays silent before it speaks.
const SILENCE: Duration = Duration::from_secs(1);

/// Runs a splice whose upstream waits `delay` after its first read (or, when it speaks
/// first, after the connection) before it answers; the reply times reported.
async fn reply_times(server_speaks_first: bool, delay: Duration) -> Vec<Duration> {
    let (mut client_app, mut proxy_client) = tcp_pair().await;
    let (mut proxy_upstream, mut upstream_app) = tcp_pair().await;
    let upstream = tokio::spawn(async move {
        if !server_speaks_first {
            let mut b = [0u8; 5];
            upstream_app.read_exact(&mut b).await.unwrap();
        }
        tokio::time::sleep(delay).await;
        upstream_app.write_all(b"reply").await.unwrap();
        upstream_app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = upstream_app.read_to_end(&mut rest).await;
    });
    let client = tokio::spawn(async move {
        // A client that takes its time to speak: not the upstream's time.
        tokio::time::sleep(SILENCE).await;
        client_app.write_all(b"hello").await.unwrap();
        client_app.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
    });
    let times = std::sync::Mutex::new(Vec::new());
    let counters = ByteCounters::new();
    let report = |d: Duration| times.lock().unwrap().push(d);
    tokio::time::timeout(
        GUARD,
        splice(
            &mut proxy_client,
            &mut proxy_upstream,
            b"",
            GUARD,
            &counters,
            &report,
        ),
    )
    .await
    .unwrap()
    .unwrap();
    upstream.await.unwrap();
    client.await.unwrap();
    times.into_inner().unwrap()
}

#[tokio::test]
async fn the_reply_time_runs_from_the_first_forwarded_bytes_to_the_first_reply_byte() {
    let delay = Duration::from_millis(150);
    let times = reply_times(false, delay).await;
    assert_eq!(times.len(), 1, "reported once: {times:?}");
    assert!(times[0] >= delay, "{times:?}");
    // The client's silence before it spoke is not counted: the reply came `delay` after
    // the client's bytes, `SILENCE` + `delay` after the copy began.
    assert!(times[0] < SILENCE, "{times:?}");
}

#[tokio::test]
async fn a_server_that_speaks_first_is_timed_from_the_start_of_the_copy() {
    let delay = Duration::from_millis(150);
    let times = reply_times(true, delay).await;
    assert_eq!(times.len(), 1, "reported once: {times:?}");
    assert!(times[0] >= delay, "{times:?}");
}
