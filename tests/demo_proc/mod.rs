//! Runs the real `edge-router` binary (the demo, status) as a child process on free loopback
//! ports, with every wait bounded. Shared by tests/dashboard.rs and tests/demo_cli.rs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_edge-router");

/// A running `edge-router demo`; killed on drop.
pub struct DemoProc {
    child: Child,
    /// host:port of the admin listener and of the data plane.
    pub admin: String,
    pub data: String,
    /// Every stdout line so far.
    pub out: Arc<Mutex<Vec<String>>>,
    pub err: Arc<Mutex<Vec<String>>>,
}

fn pump(r: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if let Ok(mut s) = sink.lock() {
                s.push(line);
            }
        }
    })
}

/// "http://127.0.0.1:PORT/..." after `label` in a line -> "127.0.0.1:PORT".
fn addr_after(line: &str, label: &str) -> Option<String> {
    let rest = &line[line.find(label)? + label.len()..];
    let rest = rest.trim_start();
    let rest = rest.strip_prefix("http://")?;
    let end = rest.find('/').unwrap_or(rest.len());
    Some(rest[..end].to_string())
}

impl DemoProc {
    /// Starts `edge-router demo --listen 127.0.0.1:0 --admin 127.0.0.1:0 EXTRA...` and reads
    /// the addresses it prints.
    pub fn start(extra: &[&str]) -> DemoProc {
        let mut child = Command::new(BIN)
            .args(["demo", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start edge-router demo");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let _ = pump(child.stdout.take().unwrap(), out.clone());
        let _ = pump(child.stderr.take().unwrap(), err.clone());
        let deadline = Instant::now() + Duration::from_secs(60);
        let (mut admin, mut data) = (None, None);
        while admin.is_none() || data.is_none() {
            for l in out.lock().unwrap().iter() {
                if admin.is_none() {
                    admin = addr_after(l, "Dashboard:");
                }
                if data.is_none() {
                    data = l
                        .find("curl -i ")
                        .and_then(|i| addr_after(&l[i..], "curl -i "));
                }
            }
            if let Ok(Some(st)) = child.try_wait() {
                panic!(
                    "the demo exited ({st}) before printing its addresses; stderr: {:?}",
                    err.lock().unwrap()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the demo printed no addresses within 60 s; stdout: {:?}",
                out.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(50));
        }
        DemoProc {
            child,
            admin: admin.unwrap(),
            data: data.unwrap(),
            out,
            err,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.admin)
    }

    /// Waits until /readyz answers 200 and every demo zone has all its endpoints healthy.
    pub fn wait_all_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, body)) = http(&self.admin, "GET", "/routes") {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let zones = v["clusters"][0]["zones"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if !zones.is_empty()
                    && zones
                        .iter()
                        .all(|z| z["healthy"].as_u64().is_some() && z["healthy"] == z["endpoints"])
                    && matches!(http(&self.admin, "GET", "/readyz"), Ok((200, _)))
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the demo's endpoints were not all healthy within {within:?}"
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Let the pumps read the last lines.
                thread::sleep(Duration::from_millis(200));
                return st;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "the demo did not exit within {within:?}; stdout: {:#?}",
                    self.out.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stdout(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }
}

impl Drop for DemoProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A one-shot HTTP/1.1 request with `Connection: close`: (status, body).
pub fn http(addr: &str, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The output of a finished command.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs a command to completion, killing it after `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let out = Arc::new(Mutex::new(Vec::new()));
    let err = Arc::new(Mutex::new(Vec::new()));
    let pumps = [
        pump(child.stdout.take().unwrap(), out.clone()),
        pump(child.stderr.take().unwrap(), err.clone()),
    ];
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish within {limit:?}; stdout: {:?}; stderr: {:?}",
                out.lock().unwrap(),
                err.lock().unwrap()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    // Read to the end of both pipes (bounded: a grandchild might keep one open).
    let drained = Instant::now() + Duration::from_secs(5);
    while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < drained {
        thread::sleep(Duration::from_millis(20));
    }
    let join = |v: &Arc<Mutex<Vec<String>>>| v.lock().unwrap().join("\n");
    Output {
        code: status.code(),
        stdout: join(&out),
        stderr: join(&err),
    }
}

/// A loopback port nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}
