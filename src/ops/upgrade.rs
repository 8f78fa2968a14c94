//! Binary upgrade without downtime. On SIGUSR2 the router starts its binary again (the path
//! it was started from, so a file replaced since then is the one that runs) with the same
//! arguments, and hands over its listening sockets, data and admin. Once the new process
//! says it is ready (listening, first routing table built), this one stops accepting and
//! drains as on SIGTERM; until then both accept from the same sockets, so no connection is
//! refused. A new process that exits, or is not ready within [`READY_TIMEOUT`], is killed
//! and this one keeps serving.
//!
//! The sockets travel over a Unix socket as SCM_RIGHTS: the new process receives them as
//! owned descriptors, so neither side needs unsafe code (inheriting descriptors across exec
//! would mean clearing FD_CLOEXEC between fork and exec and adopting raw descriptor numbers
//! in the child, both unsafe). The socket has an abstract name (no file to clean up, works on
//! a read-only filesystem) given to the new process in [`ENV`]; each side checks that its
//! peer is the other process (SO_PEERCRED) before anything is sent. The same socket carries
//! the new process's answer: `ready`, or `error <why>`.

use std::ffi::OsString;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, Interest};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::dataplane::inherited::{self, Inherited};
use crate::ops::router::Router;

/// Names the hand-over socket in the environment of the new process.
pub const ENV: &str = "EDGE_ROUTER_UPGRADE_SOCKET";
/// How long the new process may take to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Descriptors in one hand-over: the kernel passes at most 253 in one message.
const MAX_SOCKETS: usize = 250;
/// Room for the socket list that goes with them.
const MAX_LIST: usize = 64 * 1024;

/// What an upgrade starts: this binary's path as it was at start-up (by the time of the
/// upgrade, /proc/self/exe names the replaced file, which still runs the old code) and the
/// arguments it was started with.
#[derive(Clone, Debug)]
pub struct Relaunch {
    exe: PathBuf,
    args: Vec<OsString>,
}

impl Relaunch {
    /// This process, as it was started.
    pub fn current() -> io::Result<Relaunch> {
        Ok(Relaunch {
            exe: std::env::current_exe()?,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// A listening socket as the socket list describes it; the descriptor travels beside it.
#[derive(Serialize, Deserialize)]
struct Described {
    key: String,
    addr: SocketAddr,
    reuseport: bool,
}

struct Kept {
    what: Described,
    fd: OwnedFd,
}

/// The listening sockets a running router would hand over: duplicates taken at start-up,
/// because the listeners themselves move into the tasks that accept on them. They are
/// dropped when the router drains, so a router stopped by SIGTERM refuses new connections
/// at once instead of leaving them queued on a socket nothing accepts from.
pub struct Handover {
    kept: Mutex<Result<Vec<Kept>, String>>,
    busy: AtomicBool,
    handed_over: watch::Sender<bool>,
}

impl Default for Handover {
    fn default() -> Self {
        Handover {
            kept: Mutex::new(Ok(Vec::new())),
            busy: AtomicBool::new(false),
            handed_over: watch::channel(false).0,
        }
    }
}

impl Handover {
    /// Keeps a duplicate of `listener`, bound for the config key `key`.
    pub fn keep(&self, key: &str, listener: &tokio::net::TcpListener, reuseport: bool) {
        let dup = listener
            .local_addr()
            .and_then(|addr| Ok((addr, listener.as_fd().try_clone_to_owned()?)));
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        match (&mut *kept, dup) {
            (Ok(list), Ok((addr, fd))) => list.push(Kept {
                what: Described {
                    key: key.to_string(),
                    addr,
                    reuseport,
                },
                fd,
            }),
            // A hand-over missing one socket would close it, and reset what is queued on
            // it, when this process exits: no hand-over at all then.
            (k, Err(e)) => *k = Err(format!("{key}: cannot keep the socket: {e}")),
            (Err(_), _) => {}
        }
    }

    /// Drops the duplicates: nothing is handed over from now on.
    /// Closes the kept copies of a listener a reload removed: a kept copy would keep its
    /// socket listening (the kernel would queue connections nobody accepts).
    pub fn forget(&self, addr: std::net::SocketAddr) {
        if let Ok(mut kept) = self.kept.lock() {
            if let Ok(list) = &mut *kept {
                list.retain(|k| k.what.addr != addr);
            }
        }
    }

    pub fn release(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            *kept = Err("the router is draining".into());
        }
    }

    /// Turns true once another process took over the sockets: the admin listener stops
    /// accepting then (the data listeners stop with the drain).
    pub fn handed_over(&self) -> watch::Receiver<bool> {
        self.handed_over.subscribe()
    }

    /// Fresh duplicates of the kept sockets, for one attempt.
    fn duplicates(&self) -> Result<Vec<Kept>, String> {
        let kept = self.kept.lock().map_err(|_| "poisoned lock".to_string())?;
        let list = kept.as_ref().map_err(Clone::clone)?;
        list.iter()
            .map(|k| {
                Ok(Kept {
                    what: Described {
                        key: k.what.key.clone(),
                        addr: k.what.addr,
                        reuseport: k.what.reuseport,
                    },
                    fd: k
                        .fd
                        .try_clone()
                        .map_err(|e| format!("{}: {e}", k.what.key))?,
                })
            })
            .collect()
    }
}

/// Upgrades to a new process started as `relaunch` says; on success this router drains
/// (the caller waits for that as for SIGTERM), on failure it keeps serving. Logs either way.
pub async fn upgrade(router: Arc<Router>, relaunch: Relaunch) {
    let me = std::process::id();
    if router.draining.load(Ordering::SeqCst) {
        warn!(target: "upgrade", "upgrade ignored: this process ({me}) is draining");
        return;
    }
    if router.handover.busy.swap(true, Ordering::SeqCst) {
        warn!(target: "upgrade", "upgrade ignored: one is already under way");
        return;
    }
    info!(target: "upgrade", "starting {} (this process: {me})", relaunch.exe.display());
    match hand_over(&router, &relaunch).await {
        Ok(pid) => {
            let msg =
                format!("new process {pid} is serving; this one ({me}) stops accepting and drains");
            info!(target: "upgrade", new_pid = pid, "{msg}");
            router.events.push("reload", format!("upgrade: {msg}"));
            let _ = router.handover.handed_over.send(true);
            router.shutdown();
        }
        Err(e) => {
            error!(target: "upgrade", "upgrade failed, this process ({me}) keeps serving: {e}");
            router
                .events
                .push("reload", format!("upgrade failed, still serving: {e}"));
            router
                .metrics
                .upgrades
                .with_label_values(&["failure"])
                .inc();
            router.handover.busy.store(false, Ordering::SeqCst);
        }
    }
}

/// Starts the new process and hands it the sockets; its pid once it is ready.
async fn hand_over(router: &Router, relaunch: &Relaunch) -> Result<u32, String> {
    let sockets = router.handover.duplicates()?;
    if sockets.is_empty() || sockets.len() > MAX_SOCKETS {
        return Err(format!(
            "{} listening sockets to hand over; 1 to {MAX_SOCKETS} can be",
            sockets.len()
        ));
    }
    let name = format!(
        "edge-router-upgrade-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    let listener = UnixAddr::from_abstract_name(name.as_bytes())
        .and_then(|a| UnixListener::bind_addr(&a))
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .map_err(|e| format!("hand-over socket: {e}"))?;
    let mut child = std::process::Command::new(&relaunch.exe)
        .args(&relaunch.args)
        .env(ENV, &name)
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", relaunch.exe.display()))?;
    let pid = child.id();
    let outcome = tokio::time::timeout(READY_TIMEOUT, async {
        tokio::select! {
            r = talk(&listener, pid, &sockets) => r,
            status = exited(&mut child) => Err(status),
        }
    })
    .await
    .unwrap_or_else(|_| Err(format!("not ready within {READY_TIMEOUT:?}")));
    drop(sockets);
    match outcome {
        Ok(()) => Ok(pid),
        Err(why) => {
            // A process that gave up is exiting on its own: a moment for its status. Then it
            // must not keep the sockets, nor serve from them, behind this one's back.
            let exit = tokio::time::timeout(Duration::from_secs(1), exited(&mut child)).await;
            let status = match child.try_wait() {
                Ok(Some(s)) if exit.is_ok() => s.to_string(),
                _ => {
                    let _ = child.kill();
                    "killed".to_string()
                }
            };
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
            Err(format!("new process {pid} ({status}): {why}"))
        }
    }
}

/// Resolves once the child has exited (or cannot be watched): why the hand-over ended.
async fn exited(child: &mut std::process::Child) -> String {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return "exited before it was ready".into(),
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return format!("cannot watch it: {e}"),
        }
    }
}

fn peer_pid(fd: impl AsFd) -> Option<u32> {
    let cred = rustix::net::sockopt::socket_peercred(fd).ok()?;
    u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
}

/// The old process's side: waits for the new one, sends the sockets, waits for its answer.
async fn talk(
    listener: &tokio::net::UnixListener,
    pid: u32,
    sockets: &[Kept],
) -> Result<(), String> {
    let mut stream = loop {
        let (s, _) = listener
            .accept()
            .await
            .map_err(|e| format!("hand-over socket: {e}"))?;
        match peer_pid(&s) {
            Some(p) if p == pid => break s,
            other => warn!(
                target: "upgrade",
                "hand-over socket: ignored a connection from pid {other:?}, not the new process"
            ),
        }
    };
    let list: Vec<&Described> = sockets.iter().map(|k| &k.what).collect();
    let mut text = serde_json::to_vec(&list).map_err(|e| e.to_string())?;
    text.push(b'\n');
    let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|k| k.fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err("the socket list does not fit one message".into());
    }
    let sent = stream
        .async_io(Interest::WRITABLE, || {
            rustix::net::sendmsg(
                &stream,
                &[IoSlice::new(&text)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        })
        .await
        .map_err(|e| format!("sending the sockets: {e}"))?;
    stream
        .write_all(&text[sent..])
        .await
        .map_err(|e| format!("sending the sockets: {e}"))?;
    let mut answer = String::new();
    tokio::io::BufReader::new(&mut stream)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("waiting for it: {e}"))?;
    match answer.trim_end() {
        "ready" => Ok(()),
        "" => Err("it closed the hand-over socket before it was ready".into()),
        other => Err(other
            .strip_prefix("error ")
            .map_or_else(|| format!("unexpected answer {other:?}"), str::to_string)),
    }
}

/// The new process's side of the hand-over socket; it tells the old process how the start
/// went.
pub struct Takeover {
    stream: UnixStream,
}

/// In a process started by an upgrade ([`ENV`] set): receives the old process's listening
/// sockets and gives them to [`crate::dataplane::listener::bind`]. `None` otherwise. Call it
/// before any other thread starts: it removes [`ENV`] from the environment, so a later
/// upgrade of this process is not mistaken for this one.
pub fn receive() -> Result<Option<Takeover>, String> {
    let Some(name) = std::env::var_os(ENV) else {
        return Ok(None);
    };
    std::env::remove_var(ENV);
    let fail = |e: io::Error| format!("upgrade: receiving the listening sockets: {e}");
    let addr = UnixAddr::from_abstract_name(name.as_encoded_bytes()).map_err(fail)?;
    let mut stream = UnixStream::connect_addr(&addr).map_err(fail)?;
    stream.set_read_timeout(Some(READY_TIMEOUT)).map_err(fail)?;
    let parent = std::os::unix::process::parent_id();
    if peer_pid(&stream) != Some(parent) {
        return Err(format!(
            "upgrade: the hand-over socket {ENV} does not belong to the parent process ({parent})"
        ));
    }
    let mut buf = vec![0u8; MAX_LIST];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| fail(e.into()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if got.flags.contains(ReturnFlags::CTRUNC) {
        return Err("upgrade: more sockets than one message holds".into());
    }
    let mut len = got.bytes;
    while !buf[..len].contains(&b'\n') {
        if len == buf.len() {
            return Err("upgrade: the socket list is too long".into());
        }
        match stream.read(&mut buf[len..]).map_err(fail)? {
            0 => return Err("upgrade: the old process closed the hand-over socket".into()),
            n => len += n,
        }
    }
    let list: Vec<Described> = serde_json::from_slice(&buf[..len])
        .map_err(|e| format!("upgrade: the socket list: {e}"))?;
    if list.len() != fds.len() {
        return Err(format!(
            "upgrade: {} sockets described, {} received",
            list.len(),
            fds.len()
        ));
    }
    inherited::provide(
        list.into_iter()
            .zip(fds)
            .map(|(d, fd)| Inherited {
                key: d.key,
                addr: d.addr,
                reuseport: d.reuseport,
                listener: std::net::TcpListener::from(fd),
            })
            .collect(),
    );
    Ok(Some(Takeover { stream }))
}

impl Takeover {
    /// The router is listening and has its first table: the old process may stop.
    pub fn ready(mut self, router: &Router) {
        for s in inherited::unclaimed() {
            // The new config no longer listens there: the old process's connections on it
            // drain, and new ones are refused once it exits.
            warn!(target: "upgrade", "{} {}: handed over but no longer in the config; closed", s.key, s.addr);
        }
        router
            .metrics
            .upgrades
            .with_label_values(&["success"])
            .inc();
        if let Err(e) = self.stream.write_all(b"ready\n") {
            // The old process is gone, or gave up waiting and is about to kill this one:
            // nothing to undo here either way.
            warn!(target: "upgrade", "cannot tell the old process it may stop: {e}");
        }
        router.events.push(
            "reload",
            format!(
                "upgrade: took over from process {}",
                std::os::unix::process::parent_id()
            ),
        );
    }

    /// The start failed: the old process logs `why` and keeps serving.
    pub fn failed(mut self, why: &str) {
        let line = why.replace('\n', " ");
        let _ = self.stream.write_all(format!("error {line}\n").as_bytes());
    }
}

/// Tells systemd (when it started this process with `NotifyAccess`) that this process is
/// ready and is the service's main process: the same message at a normal start and when a
/// process started by an upgrade takes over, so `Type=notify` follows the upgrade.
pub fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name),
        None => UnixAddr::from_pathname(PathBuf::from(&path)),
    };
    let msg = format!("READY=1\nMAINPID={}\n", std::process::id());
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(msg.as_bytes(), &a));
    if let Err(e) = sent {
        warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy());
    }
}
