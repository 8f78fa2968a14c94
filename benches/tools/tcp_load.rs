//! A small TCP load generator and echo upstream for `benches/compare.sh --workload tcp`.
//! Standard library only, so the script compiles it with `rustc -O` in a second, without
//! cargo; it lives under benches/tools/ so that cargo does not take it for a bench target.
//!
//!   tcp_load echo ADDR                      echo every byte; on EOF, close
//!   tcp_load bulk ADDR CONNS SECONDS BYTES  each of CONNS threads, until SECONDS pass:
//!                                           connect, send BYTES, half-close, read
//!                                           BYTES back (checked), close
//!   tcp_load cps ADDR CONNS SECONDS         each thread: connect, send 1 byte,
//!                                           half-close, read it back, close
//!
//! Prints one line: `done N errors E seconds S` (N completed transfers or connections).
//! Every transfer opens a new connection, so bulk measures 1 MiB transfers as a client
//! sees them (connect included) and cps the connection set-up and tear-down.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: tcp_load echo ADDR | bulk ADDR CONNS SECONDS BYTES | cps ADDR CONNS SECONDS";
    let arg = |i: usize| -> &str {
        args.get(i).map(String::as_str).unwrap_or_else(|| {
            eprintln!("{usage}");
            std::process::exit(2)
        })
    };
    let num = |i: usize| -> u64 {
        arg(i).parse().unwrap_or_else(|_| {
            eprintln!("not a number: {}\n{usage}", arg(i));
            std::process::exit(2)
        })
    };
    let addr: SocketAddr = arg(2).parse().unwrap_or_else(|_| {
        eprintln!("not an address: {}\n{usage}", arg(2));
        std::process::exit(2)
    });
    match arg(1) {
        "echo" => echo(addr),
        "bulk" => load(addr, num(3), num(4), Some(num(5) as usize)),
        "cps" => load(addr, num(3), num(4), None),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2)
        }
    }
}

fn echo(addr: SocketAddr) {
    let l = TcpListener::bind(addr).unwrap_or_else(|e| {
        eprintln!("bind {addr}: {e}");
        std::process::exit(1)
    });
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        });
    }
}

/// One transfer on a new connection; `bytes` None is the 1-byte connection test.
fn once(addr: SocketAddr, payload: &Arc<Vec<u8>>, bulk: bool) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let n = if bulk { payload.len() } else { 1 };
    // The echo answers while we send: a writer thread keeps both directions moving so
    // neither side's socket buffer fills and stalls the other.
    let writer = if bulk {
        let mut w = s.try_clone()?;
        let p = payload.clone();
        Some(std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&p)?;
            w.shutdown(Shutdown::Write)
        }))
    } else {
        s.write_all(&payload[..1])?;
        s.shutdown(Shutdown::Write)?;
        None
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    loop {
        let k = s.read(&mut buf)?;
        if k == 0 {
            break;
        }
        if got + k > n || buf[..k] != payload[got..got + k] {
            return Err(std::io::Error::other("bytes differ"));
        }
        got += k;
    }
    if let Some(w) = writer {
        w.join().map_err(|_| std::io::Error::other("writer panicked"))??;
    }
    if got != n {
        return Err(std::io::Error::other(format!("{got} of {n} bytes back")));
    }
    Ok(())
}

fn load(addr: SocketAddr, conns: u64, seconds: u64, bytes: Option<usize>) {
    let mut x = 2_654_435_761u32;
    let payload: Arc<Vec<u8>> = Arc::new(
        (0..bytes.unwrap_or(1).max(1))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect(),
    );
    let (done, errors, stop) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let started = Instant::now();
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (done, errors, stop, payload) =
                (done.clone(), errors.clone(), stop.clone(), payload.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match once(addr, &payload, bytes.is_some()) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("tcp_load: {e}");
                            }
                            0
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    // Transfers under way finish; they count, and the time includes them.
    for t in threads {
        let _ = t.join();
    }
    println!(
        "done {} errors {} seconds {:.3}",
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}
