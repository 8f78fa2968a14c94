//! The tcp listener under many concurrent connections, with the router as its own process
//! so that the memory it reports is its own: every byte must come back intact, and the
//! router's resident memory is printed (run with `--nocapture` to see it).

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::wait_until;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BIN: &str = env!("CARGO_BIN_EXE_edge-router");
/// Concurrent connections, and bytes each way on each.
const CONNECTIONS: usize = 1000;
const PAYLOAD: usize = 1024 * 1024;
/// File descriptors one connection costs: the router holds two sockets per connection
/// (client and upstream), and so does this process (the client and the echo server's side).
const FDS_PER_CONNECTION: u64 = 2;
/// Descriptors for everything else (runtime, listeners, probes, the admin API, logs).
const FDS_SPARE: u64 = 200;
/// The whole transfer, on a loaded 2-core machine with a debug build.
const TRANSFER_DEADLINE: Duration = Duration::from_secs(240);

/// Raises this process's soft limit on open files to the hard limit (at least `want` when
/// the hard limit is unlimited); the router child inherits it. The limit now in force.
fn raise_fd_limit(want: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    let target = now.maximum.unwrap_or(want.max(1 << 20));
    if now.current.is_some_and(|soft| soft < target) {
        let raised = Rlimit {
            current: Some(target),
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            eprintln!("could not raise RLIMIT_NOFILE to {target}: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// An upstream that echoes every byte and, once the client half-closes, writes `END`.
async fn echo() -> SocketAddr {
    // A thousand connects arrive at once, while this process is busy being their clients:
    // tokio's default backlog (1024) can fill, and a full accept queue drops SYNs.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind");
    let l = socket.listen(8192).expect("listen");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let mut s = match l.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: connections wait in the backlog meanwhile.
                    eprintln!("echo upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.write_all(b"END").await;
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

/// The router binary with a tcp listener in front of `upstream`; killed when dropped.
struct RouterProcess {
    child: Child,
    admin: SocketAddr,
    dir: tempfile::TempDir,
}

impl RouterProcess {
    async fn start(upstream: SocketAddr) -> RouterProcess {
        let admin: SocketAddr = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        };
        // The connect timeout is generous: a loaded machine may be slow to accept, and a slow
        // connect is not what this test is about.
        let text = format!(
            r#"
[[listener]]
name = "t"
address = "127.0.0.1:0"
protocol = "tcp"
cluster = "c"

[admin]
address = "{admin}"

[locality]
region = "r1"
zone = "r1a"

[[cluster]]
name = "c"
connect_timeout = "10s"
[cluster.health_check]
interval = "200ms"
timeout = "1s"
healthy_threshold = 1
[[cluster.endpoint]]
address = "{upstream}"
region = "r1"
zone = "r1a"
"#
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("L4_LOAD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn edge-router");
        RouterProcess { child, admin, dir }
    }

    /// The last lines the router logged.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Admin GET; `None` while the router is not answering yet.
    async fn admin_get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(self.admin).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&out).into_owned();
        let (_, body) = text.split_once("\r\n\r\n")?;
        Some(body.to_string())
    }

    /// The tcp listener's address, once the router is up with its endpoint healthy.
    async fn ready(&self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(addr) = self.listener_if_healthy().await {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "router not up with its endpoint healthy within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn listener_if_healthy(&self) -> Option<SocketAddr> {
        let body = self.admin_get("/routes").await?;
        let v = serde_json::from_str::<serde_json::Value>(&body).ok()?;
        if v["clusters"][0]["endpoints"][0]["healthy"] != true {
            return None;
        }
        v["listeners"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == "t")?["address"]
            .as_str()?
            .parse()
            .ok()
    }

    /// `VmHWM` (peak) and `VmRSS` (now) of the router process, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("router /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc status"))
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bytes connection `id` sends: `base` rotated by an offset of its own, so a byte
/// delivered on the wrong connection or at the wrong place does not match.
fn offset_of(id: usize, len: usize) -> usize {
    id.wrapping_mul(7919) % len
}

/// Sends `base` rotated for `id`, half-closes, and checks that exactly those bytes come
/// back, in order, followed by the upstream's `END`.
async fn transfer(addr: SocketAddr, base: Arc<Vec<u8>>, id: usize) -> Result<(), String> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut r, mut w) = s.into_split();
    let off = offset_of(id, base.len());
    let b = base.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&b[off..]).await?;
        w.write_all(&b[..off]).await?;
        w.shutdown().await
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let mut tail = Vec::new();
    loop {
        let n = r.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        while !chunk.is_empty() && got < base.len() {
            let at = (off + got) % base.len();
            let take = chunk.len().min(base.len() - at).min(base.len() - got);
            if chunk[..take] != base[at..at + take] {
                return Err(format!("bytes differ within [{got}, {})", got + take));
            }
            got += take;
            chunk = &chunk[take..];
        }
        tail.extend_from_slice(chunk);
    }
    writer
        .await
        .map_err(|e| format!("writer: {e}"))?
        .map_err(|e| format!("write: {e}"))?;
    if got != base.len() || tail != b"END" {
        return Err(format!("{got} bytes back then {tail:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_1000_concurrent_connections_of_1_mib_each_way_intact() {
    let want = CONNECTIONS as u64 * FDS_PER_CONNECTION + FDS_SPARE;
    let limit = raise_fd_limit(want);
    let connections = if limit >= want {
        CONNECTIONS
    } else {
        let fit =
            usize::try_from(limit.saturating_sub(FDS_SPARE) / FDS_PER_CONNECTION).unwrap_or(0);
        eprintln!(
            "WARNING: the hard limit on open files is {limit}, below the {want} that \
             {CONNECTIONS} connections need: running {fit} connections, NOT {CONNECTIONS}"
        );
        assert!(
            fit >= 100,
            "an fd limit of {limit} is too low for this test"
        );
        fit
    };
    let upstream = echo().await;
    let router = RouterProcess::start(upstream).await;
    let addr = router.ready().await;
    let (_, idle_rss) = router.memory_kib();

    // Made before any connection, so the clients do not compete with the router for CPU.
    let mut x = 2_654_435_761u32;
    let base: Arc<Vec<u8>> = Arc::new(
        (0..PAYLOAD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect(),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|id| tokio::spawn(transfer(addr, base.clone(), id)))
        .collect();
    let all = async {
        let mut failed = Vec::new();
        for (id, t) in tasks.into_iter().enumerate() {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push(format!("connection {id}: {e}")),
                Err(e) => failed.push(format!("connection {id}: task {e}")),
            }
        }
        failed
    };
    let failed = tokio::time::timeout(TRANSFER_DEADLINE, all)
        .await
        .unwrap_or_else(|_| panic!("the transfer took over {TRANSFER_DEADLINE:?}"));
    let took = started.elapsed();
    let (peak, now) = router.memory_kib();
    eprintln!(
        "{connections} connections x {} KiB each way in {:.1} s; router RSS: {} KiB idle, \
         {} KiB peak (VmHWM), {} KiB after (VmRSS)",
        PAYLOAD / 1024,
        took.as_secs_f64(),
        idle_rss,
        peak,
        now
    );
    assert!(
        failed.is_empty(),
        "{} of {connections} connections lost or changed bytes: {:#?}\nrouter log:\n{}",
        failed.len(),
        &failed[..failed.len().min(10)],
        router.log_tail()
    );

    // Each connection's bytes are counted when it ends, a moment after the client saw it end.
    let expected = (connections * PAYLOAD) as f64;
    let router_ref = &router;
    wait_until(
        "every byte counted both ways",
        Duration::from_secs(30),
        || async move {
            let Some(metrics) = router_ref.admin_get("/metrics").await else {
                return false;
            };
            let bytes = |direction: &str| -> f64 {
                metrics
                    .lines()
                    .filter(|l| {
                        l.starts_with("edge_router_l4_bytes_total")
                            && l.contains(&format!("direction=\"{direction}\""))
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum()
            };
            bytes("to_upstream") >= expected && bytes("to_client") >= expected
        },
    )
    .await;
    // The copy holds two fixed buffers per connection; memory that grew with the bytes
    // carried (a gigabyte each way) would be a leak or unbounded buffering.
    let per_connection_kib = peak.saturating_sub(idle_rss) / connections as u64;
    assert!(
        per_connection_kib < 256,
        "router peak RSS grew by {per_connection_kib} KiB per connection ({idle_rss} -> {peak} KiB)"
    );
}
