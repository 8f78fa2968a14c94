//! Binary upgrade on SIGUSR2, against the real binary: the new process takes over the
//! listening sockets while clients keep sending, the old one drains and exits 0, and a new
//! process that cannot start leaves the old one serving.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, config, endpoint, get, wait_until, Backend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_edge-router");

async fn free_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    l.local_addr().expect("addr").port()
}

/// The router binary, with its config and log (stdout and stderr, of every process the
/// upgrades start too) in a temporary directory.
struct Router {
    child: Child,
    data: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    dir: tempfile::TempDir,
    /// Processes started by upgrades: stopped when the test ends, passed or not.
    successors: Vec<u32>,
}

impl Router {
    async fn start(backend: &Backend, args: &[&str]) -> Router {
        Router::start_env(backend, args, &[]).await
    }

    async fn start_env(backend: &Backend, args: &[&str], env: &[(&str, &Path)]) -> Router {
        Router::start_from(Path::new(BIN), backend, args, env).await
    }

    async fn start_from(
        bin: &Path,
        backend: &Backend,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Router {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: SocketAddr = ([127, 0, 0, 1], free_port().await).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port().await).into();
        let text = config(&[endpoint(backend, "r1", "r1a")], "", "")
            .replacen("127.0.0.1:0", &data.to_string(), 1)
            .replacen("127.0.0.1:0", &admin.to_string(), 1);
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).expect("write config");
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&path)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn edge-router");
        let r = Router {
            child,
            data,
            admin,
            config: path,
            dir,
            successors: Vec::new(),
        };
        let url = format!("http://{admin}/readyz");
        wait_until("router ready", Duration::from_secs(15), || async {
            let req = http::Request::get(url.as_str())
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            matches!(
                tokio::time::timeout(Duration::from_secs(1), client().request(req)).await,
                Ok(Ok(resp)) if resp.status() == 200
            )
        })
        .await;
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Waits for a log line containing `what`; the line.
    async fn log_line(&self, what: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(what)) {
                return l.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {what:?} within {within:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for pid in &self.successors {
            let _ = kill("-KILL", *pid);
        }
    }
}

fn kill(sig: &str, pid: u32) -> bool {
    Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn alive(pid: u32) -> bool {
    kill("-0", pid)
}

/// The pid in "new process N is serving".
fn new_pid(line: &str) -> u32 {
    line.split("new process ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    /// Connections refused (or reset before any answer) on a fresh connection.
    refused: AtomicU64,
    /// Requests without a 200 answer, after the one retry a client makes when a reused
    /// keep-alive connection is closed before the first byte of the answer.
    failed: AtomicU64,
    /// Such retries: the race every HTTP client meets when a server closes an idle
    /// keep-alive connection (RFC 9112 section 9.3.1 lets it retry an idempotent request).
    stale_retries: AtomicU64,
    /// 200 answers after the old process exited.
    after_exit: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, counter: &AtomicU64, why: String) {
        counter.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut e) = self.errors.lock() {
            if e.len() < 20 {
                e.push(why);
            }
        }
    }
}

enum Outcome {
    /// The status, and whether the router keeps the connection open.
    Answer(u16, bool),
    /// Closed or reset before the first byte of an answer.
    NoAnswer(String),
    Broken(String),
}

/// Sends one GET and reads the whole answer (the test backend answers with a length).
async fn exchange(s: &mut TcpStream, path: &str, close: bool) -> Outcome {
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: upgrade.test\r\n{}\r\n",
        if close { "connection: close\r\n" } else { "" }
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return Outcome::NoAnswer(format!("write: {e}"));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Err(_) => return Outcome::Broken("no answer within 10 s".into()),
            Ok(Err(e)) if buf.is_empty() => return Outcome::NoAnswer(format!("read: {e}")),
            Ok(Err(e)) => return Outcome::Broken(format!("read: {e}")),
            Ok(Ok(0)) if buf.is_empty() => return Outcome::NoAnswer("closed".into()),
            Ok(Ok(0)) => return Outcome::Broken("closed mid-answer".into()),
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(h)) => h,
            Ok(httparse::Status::Partial) => continue,
            Err(e) => return Outcome::Broken(format!("bad answer: {e}")),
        };
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let Some(len) = header("content-length").and_then(|v| v.trim().parse::<usize>().ok())
        else {
            return Outcome::Broken("answer without content-length".into());
        };
        if buf.len() < head + len {
            continue;
        }
        let keep = !header("connection").is_some_and(|v| v.contains("close"));
        return Outcome::Answer(resp.code.unwrap_or(0), keep);
    }
}

/// A keep-alive client: one connection for as long as the router keeps it open.
async fn keep_alive_client(
    id: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    exited: Arc<AtomicBool>,
    t: Arc<Tally>,
) {
    let mut conn: Option<TcpStream> = None;
    // Bounded whatever happens.
    for n in 0..200_000u64 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let path = format!("/ka/{id}/{n}");
        let mut tries = 0;
        loop {
            tries += 1;
            let reused = conn.is_some();
            let mut s = match conn.take() {
                Some(s) => s,
                None => match TcpStream::connect(addr).await {
                    Ok(s) => s,
                    Err(e) => {
                        t.fail(&t.refused, format!("keep-alive {id}: connect: {e}"));
                        break;
                    }
                },
            };
            match exchange(&mut s, &path, false).await {
                Outcome::Answer(200, keep) => {
                    t.ok.fetch_add(1, Ordering::SeqCst);
                    if exited.load(Ordering::SeqCst) {
                        t.after_exit.fetch_add(1, Ordering::SeqCst);
                    }
                    if keep {
                        conn = Some(s);
                    }
                }
                Outcome::Answer(status, _) => t.fail(
                    &t.failed,
                    format!("keep-alive {id}: {path}: status {status}"),
                ),
                Outcome::NoAnswer(why) if reused && tries == 1 => {
                    t.stale_retries.fetch_add(1, Ordering::SeqCst);
                    let _ = why;
                    continue;
                }
                Outcome::NoAnswer(why) | Outcome::Broken(why) => t.fail(
                    &t.failed,
                    format!(
                        "keep-alive {id}: {path}: {why} (try {tries}, {} connection, {})",
                        if reused { "reused" } else { "new" },
                        if exited.load(Ordering::SeqCst) {
                            "old process gone"
                        } else {
                            "old process running"
                        }
                    ),
                ),
            }
            break;
        }
    }
}

/// New connections one after another, one request each.
async fn new_connections(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    exited: Arc<AtomicBool>,
    t: Arc<Tally>,
) {
    for n in 0..200_000u64 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let mut s = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                t.fail(&t.refused, format!("new connection {n}: connect: {e}"));
                continue;
            }
        };
        match exchange(&mut s, &format!("/new/{n}"), true).await {
            Outcome::Answer(200, _) => {
                t.ok.fetch_add(1, Ordering::SeqCst);
                if exited.load(Ordering::SeqCst) {
                    t.after_exit.fetch_add(1, Ordering::SeqCst);
                }
            }
            Outcome::Answer(status, _) => {
                t.fail(&t.failed, format!("new connection {n}: status {status}"))
            }
            Outcome::NoAnswer(why) => t.fail(&t.refused, format!("new connection {n}: {why}")),
            Outcome::Broken(why) => t.fail(&t.failed, format!("new connection {n}: {why}")),
        }
    }
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn upgrade_under_load(args: &[&str]) {
    // A little latency keeps requests in flight while the processes change.
    let backend = Backend::start("a1", 2).await;
    let mut router = Router::start(&backend, args).await;
    let old_pid = router.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let exited = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..8 {
        tasks.push(tokio::spawn(keep_alive_client(
            id,
            router.data,
            stop.clone(),
            exited.clone(),
            tally.clone(),
        )));
    }
    tasks.push(tokio::spawn(new_connections(
        router.data,
        stop.clone(),
        exited.clone(),
        tally.clone(),
    )));
    let t = tally.clone();
    wait_until("traffic flows", Duration::from_secs(10), || {
        let t = t.clone();
        async move { t.ok.load(Ordering::SeqCst) >= 200 }
    })
    .await;

    assert!(kill("-USR2", old_pid), "kill -USR2 {old_pid}");
    let line = router.log_line("is serving", Duration::from_secs(30)).await;
    let pid = new_pid(&line);
    router.successors.push(pid);
    assert_ne!(pid, old_pid);
    let code = router.exit_code(Duration::from_secs(30)).await;
    exited.store(true, Ordering::SeqCst);
    assert_eq!(code, Some(0), "old process exit; log:\n{}", router.log());
    let t = tally.clone();
    wait_until(
        "the new process answers after the old one exited",
        Duration::from_secs(10),
        || {
            let t = t.clone();
            async move { t.after_exit.load(Ordering::SeqCst) >= 200 }
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        task.await.expect("client task");
    }

    let errors = tally.errors.lock().expect("errors").clone();
    let (ok, refused, failed, retries) = (
        tally.ok.load(Ordering::SeqCst),
        tally.refused.load(Ordering::SeqCst),
        tally.failed.load(Ordering::SeqCst),
        tally.stale_retries.load(Ordering::SeqCst),
    );
    eprintln!(
        "upgrade {old_pid} -> {pid} ({args:?}): {ok} answered, {refused} refused, {failed} failed, \
         {retries} retried after an idle keep-alive close"
    );
    assert_eq!(
        (refused, failed),
        (0, 0),
        "errors: {errors:#?}\nlog (access lines left out):\n{}",
        router
            .log()
            .lines()
            .filter(|l| !l.contains(" access: "))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The admin socket moved too: the new process answers it.
    assert!(alive(pid), "new process {pid} gone; log:\n{}", router.log());
    let metrics = get(&format!("http://{}/metrics", router.admin)).await;
    assert_eq!(metrics.status, 200);
    assert_eq!(
        metric(
            &metrics.body,
            "edge_router_upgrades_total{result=\"success\"}"
        ),
        Some(1.0),
        "{}",
        metrics.body
    );
    let old_log = router.log();
    assert!(
        old_log.contains("drained"),
        "the old process drained: {old_log}"
    );

    assert!(kill("-TERM", pid));
    wait_until("new process stopped", Duration::from_secs(30), || async {
        !alive(pid)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrade_under_load_refuses_and_fails_nothing() {
    upgrade_under_load(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrade_under_load_with_thread_per_core() {
    upgrade_under_load(&["--workers", "2", "--thread-per-core"]).await;
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_upgrade_leaves_the_old_process_serving() {
    let backend = Backend::start("a1", 1).await;
    let mut router = Router::start(&backend, &[]).await;
    let pid = router.child.id();
    let good = std::fs::read_to_string(&router.config).expect("config");
    write(&router.config, "[listener]\naddress = 5\n");

    assert!(kill("-USR2", pid));
    let line = router
        .log_line("upgrade failed", Duration::from_secs(30))
        .await;
    assert!(line.contains("exit status: 2"), "{line}");
    let log = router.log();
    assert!(
        log.contains("listener.address"),
        "the new process says why: {log}"
    );
    for _ in 0..20 {
        assert_eq!(get(&format!("http://{}/x", router.data)).await.status, 200);
    }
    let metrics = get(&format!("http://{}/metrics", router.admin)).await;
    assert_eq!(
        metric(
            &metrics.body,
            "edge_router_upgrades_total{result=\"failure\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        get(&format!("http://{}/readyz", router.admin)).await.status,
        200
    );
    assert_eq!(router.exit_code(Duration::from_millis(100)).await, None);

    // With the file fixed, the next upgrade goes through.
    write(&router.config, &good);
    assert!(kill("-USR2", pid));
    let line = router.log_line("is serving", Duration::from_secs(30)).await;
    let new = new_pid(&line);
    router.successors.push(new);
    assert_eq!(router.exit_code(Duration::from_secs(30)).await, Some(0));
    assert_eq!(get(&format!("http://{}/x", router.data)).await.status, 200);
    assert!(kill("-TERM", new));
    wait_until("new process stopped", Duration::from_secs(30), || async {
        !alive(new)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notify_names_the_new_main_process() {
    let backend = Backend::start("a1", 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify");
    let sock = tokio::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let mut router = Router::start_env(&backend, &[], &[("NOTIFY_SOCKET", &path)]).await;
    let next = || async {
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(30), sock.recv(&mut buf))
            .await
            .expect("a notification within 30 s")
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let old = router.child.id();
    assert_eq!(next().await, format!("READY=1\nMAINPID={old}\n"));

    assert!(kill("-USR2", old));
    let msg = next().await;
    let line = router.log_line("is serving", Duration::from_secs(30)).await;
    let new = new_pid(&line);
    router.successors.push(new);
    assert_eq!(msg, format!("READY=1\nMAINPID={new}\n"));
    assert_eq!(router.exit_code(Duration::from_secs(30)).await, Some(0));
    assert!(kill("-TERM", new));
    wait_until("new process stopped", Duration::from_secs(30), || async {
        !alive(new)
    })
    .await;
}

/// The usual upgrade: a new file renamed over the binary. The new process runs the file now
/// at the path, not the replaced one the old process still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_runs_the_file_now_at_the_binary_path() {
    let backend = Backend::start("a1", 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let installed = dir.path().join("edge-router");
    std::fs::copy(BIN, &installed).expect("copy the binary");
    let mut router = Router::start_from(&installed, &backend, &[], &[]).await;
    let old = router.child.id();
    let staged = dir.path().join("edge-router.new");
    if std::fs::hard_link(BIN, &staged).is_err() {
        std::fs::copy(BIN, &staged).expect("copy the binary");
    }
    std::fs::rename(&staged, &installed).expect("rename over the binary");
    let exe = |pid: u32| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .expect("/proc/PID/exe")
            .to_string_lossy()
            .into_owned()
    };
    assert!(exe(old).ends_with(" (deleted)"), "{}", exe(old));

    assert!(kill("-USR2", old));
    let line = router.log_line("is serving", Duration::from_secs(30)).await;
    let new = new_pid(&line);
    router.successors.push(new);
    assert_eq!(exe(new), installed.to_string_lossy());
    assert_eq!(router.exit_code(Duration::from_secs(30)).await, Some(0));
    assert_eq!(get(&format!("http://{}/x", router.data)).await.status, 200);
    assert!(kill("-TERM", new));
    wait_until("new process stopped", Duration::from_secs(30), || async {
        !alive(new)
    })
    .await;
}

/// The new process reads the config and cannot bind what it asks for: it says why over the
/// hand-over socket, and the old process logs that and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_logs_why_the_new_process_could_not_start() {
    let backend = Backend::start("a1", 1).await;
    let mut router = Router::start(&backend, &[]).await;
    let pid = router.child.id();
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let busy = taken.local_addr().expect("addr");
    let text = std::fs::read_to_string(&router.config)
        .expect("config")
        .replacen(&router.admin.to_string(), &busy.to_string(), 1);
    write(&router.config, &text);

    assert!(kill("-USR2", pid));
    let line = router
        .log_line("upgrade failed", Duration::from_secs(30))
        .await;
    assert!(
        line.contains(&format!("admin.address {busy}")) && line.contains("exit status: 1"),
        "{line}"
    );
    assert_eq!(get(&format!("http://{}/x", router.data)).await.status, 200);
    assert_eq!(
        get(&format!("http://{}/readyz", router.admin)).await.status,
        200
    );
    assert_eq!(router.exit_code(Duration::from_millis(100)).await, None);
}
