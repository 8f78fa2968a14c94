//! The process clock the lock-free state uses: milliseconds in a u64 that fits an atomic.

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds since the process started: a cheap, monotonic clock that fits in 32 bits
/// for 49 days and wraps harmlessly (only differences are used).
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}
