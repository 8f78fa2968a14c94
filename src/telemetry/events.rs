//! The ring of notable events (health flips, ejections, table swaps, reloads) behind
//! /events, the dashboard and `edge-router status`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bounded ring of notable events for /events and the dashboard.
pub struct Events {
    ring: Mutex<VecDeque<Event>>,
}

/// How an event reads to an operator. Set where the event happens, which knows whether an
/// endpoint went down or came back: readers colour by it and never guess from the words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Nothing to act on: a table swap, a reload that did what was asked.
    Info,
    /// Something recovered: an endpoint healthy again, an ejection over.
    Ok,
    /// Worth a look: a reload that kept part of the old config, a drain, an injected fault.
    Warning,
    /// Capacity lost or a change refused: an endpoint down or ejected, a failed reload.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

#[derive(Clone, serde::Serialize)]
pub struct Event {
    pub ts_ms: u64,
    pub kind: &'static str,
    pub severity: Severity,
    pub message: String,
}

impl Events {
    pub const CAPACITY: usize = 256;

    pub fn new() -> Events {
        Events {
            ring: Mutex::new(VecDeque::with_capacity(Self::CAPACITY)),
        }
    }

    /// An event of severity [`Severity::Info`].
    pub fn push(&self, kind: &'static str, message: String) {
        self.push_with(kind, Severity::Info, message)
    }

    pub fn push_with(&self, kind: &'static str, severity: Severity, message: String) {
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
                severity,
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
