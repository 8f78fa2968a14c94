//! The ring of notable events (health flips, ejections, table swaps, reloads) behind
//! /events, the dashboard and `edge-router status`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bounded ring of notable events for /events and the dashboard.
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
}

#[derive(Clone, serde::Serialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: &'static str,
    pub message: String,
}

impl Events {
    pub const CAPACITY: usize = 256;

    pub fn new() -> Events {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
        }
    }

    pub fn push(&self, kind: &'static str, message: String) {
        let ts_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut r) = self.ring.lock() {
            if r.len() == Self::CAPACITY {
                r.pop_front();
            }
            r.push_back(Event {
                ts_ms,
                kind,
                message,
            });
        }
    }

    pub fn snapshot(&self) -> Vec<Event> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}
