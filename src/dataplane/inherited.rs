//! Listening sockets handed over by the process this one replaces (a binary upgrade):
//! [`super::listener::bind`] takes one from here instead of binding, so the socket, and the
//! connections already queued on it, carry on without a moment where nothing listens.
//!
//! The list is process-wide because the hand-over is: it is filled once, before the router
//! starts, and emptied as the listeners are bound.

use std::net::{SocketAddr, TcpListener};
use std::sync::Mutex;

/// One inherited listening socket and what it was bound for.
#[derive(Debug)]
pub struct Inherited {
    /// The config key of the address (`listener.address`, `admin.address`).
    pub key: String,
    /// Where it listens (the real port, when the config says 0).
    pub addr: SocketAddr,
    /// Bound with SO_REUSEPORT (one of several sockets of a thread-per-core data plane).
    pub reuseport: bool,
    pub listener: TcpListener,
}

static INHERITED: Mutex<Vec<Inherited>> = Mutex::new(Vec::new());

/// Makes `sockets` available to [`take`].
pub fn provide(sockets: Vec<Inherited>) {
    if let Ok(mut l) = INHERITED.lock() {
        l.extend(sockets);
    }
}

/// The inherited socket for `key` at `addr`, if there is one. Port 0 in `addr` matches any
/// port on the same IP: the config said "any free port" and the old process picked it.
///
/// A plain bind asked of an address held by SO_REUSEPORT sockets gets a duplicate of one of
/// them and leaves it in place: the thread-per-core start-up binds once without the option
/// only to learn the port and check that nothing else holds it, then drops that socket.
pub fn take(key: &str, addr: SocketAddr, reuseport: bool) -> Option<TcpListener> {
    let mut list = INHERITED.lock().ok()?;
    let matches = |s: &Inherited| {
        s.key == key && (s.addr == addr || (addr.port() == 0 && s.addr.ip() == addr.ip()))
    };
    if let Some(i) = list
        .iter()
        .position(|s| matches(s) && s.reuseport == reuseport)
    {
        return Some(list.swap_remove(i).listener);
    }
    if !reuseport {
        return list
            .iter()
            .find(|s| matches(s))
            .and_then(|s| s.listener.try_clone().ok());
    }
    None
}

/// Empties the list: the sockets no listener took (the new config moved or dropped them).
/// Closing them closes the old process's listeners too once it exits.
pub fn unclaimed() -> Vec<Inherited> {
    INHERITED
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default()
}
