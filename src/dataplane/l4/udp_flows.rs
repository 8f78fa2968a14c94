//! The table of live UDP flows on a listener: which client address (address and port) is
//! bound to which upstream socket/endpoint, and when it last sent or received anything.
//!
//! UDP has no connection to close, so a flow lives until it idles out; a listener drives
//! [`FlowTable::expire`] from a timer. Every datagram from an unknown client would open a
//! flow (an upstream socket, a task), and those addresses are trivially spoofed, so the
//! table has a hard cap: [`FlowTable::insert`] refuses a new flow beyond it and hands the
//! value back, so the caller can drop the datagram, count it and release what it built.
//!
//! The table is plain synchronous data with the clock passed in, so the caller chooses the
//! locking (one task owning it needs none) and tests need no runtime or sleeping.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Flow<V> {
    value: V,
    last_active: Instant,
}

/// Live flows keyed by client address, with a cap and last-activity stamps.
#[derive(Debug)]
pub struct FlowTable<V> {
    flows: HashMap<SocketAddr, Flow<V>>,
    max_flows: usize,
}

/// A new flow refused because the table is full; carries the value back to the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct FlowTableFull<V>(pub V);

impl<V> fmt::Display for FlowTableFull<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("too many UDP flows; datagram dropped")
    }
}

impl<V: fmt::Debug> std::error::Error for FlowTableFull<V> {}

impl<V> FlowTable<V> {
    /// An empty table admitting at most `max_flows` flows (0 admits none).
    pub fn new(max_flows: usize) -> Self {
        Self {
            flows: HashMap::new(),
            max_flows,
        }
    }

    pub fn max_flows(&self) -> usize {
        self.max_flows
    }

    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    /// The flow for `client`, without counting this as activity.
    pub fn get(&self, client: &SocketAddr) -> Option<&V> {
        self.flows.get(client).map(|f| &f.value)
    }

    pub fn get_mut(&mut self, client: &SocketAddr) -> Option<&mut V> {
        self.flows.get_mut(client).map(|f| &mut f.value)
    }

    /// The flow for `client`, stamping it active at `now`: the per-datagram lookup, in
    /// either direction.
    pub fn touch(&mut self, client: &SocketAddr, now: Instant) -> Option<&mut V> {
        self.flows.get_mut(client).map(|f| {
            f.last_active = f.last_active.max(now);
            &mut f.value
        })
    }

    pub fn last_active(&self, client: &SocketAddr) -> Option<Instant> {
        self.flows.get(client).map(|f| f.last_active)
    }

    /// Adds a flow active at `now`, returning the one it replaced for the same client.
    /// Replacing never counts against the cap (the endpoint of a flow may change when it
    /// leaves the table); a new client beyond the cap is refused.
    pub fn insert(
        &mut self,
        client: SocketAddr,
        value: V,
        now: Instant,
    ) -> Result<Option<V>, FlowTableFull<V>> {
        if let Some(flow) = self.flows.get_mut(&client) {
            flow.last_active = flow.last_active.max(now);
            return Ok(Some(std::mem::replace(&mut flow.value, value)));
        }
        if self.flows.len() >= self.max_flows {
            return Err(FlowTableFull(value));
        }
        self.flows.insert(
            client,
            Flow {
                value,
                last_active: now,
            },
        );
        Ok(None)
    }

    pub fn remove(&mut self, client: &SocketAddr) -> Option<V> {
        self.flows.remove(client).map(|f| f.value)
    }

    /// Removes every flow idle for at least `idle` at `now`, returning them so the caller
    /// can stop their tasks and close their sockets. O(flows): call it from a timer, not
    /// per datagram.
    pub fn expire(&mut self, now: Instant, idle: Duration) -> Vec<(SocketAddr, V)> {
        let expired: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, f)| now.saturating_duration_since(f.last_active) >= idle)
            .map(|(k, _)| *k)
            .collect();
        expired
            .into_iter()
            .filter_map(|k| self.flows.remove(&k).map(|f| (k, f.value)))
            .collect()
    }

    /// Keeps only the flows for which `keep` is true, e.g. to drop flows whose endpoint
    /// left the routing table.
    pub fn retain(&mut self, mut keep: impl FnMut(&SocketAddr, &mut V) -> bool) {
        self.flows.retain(|k, f| keep(k, &mut f.value));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&SocketAddr, &V)> {
        self.flows.iter().map(|(k, f)| (k, &f.value))
    }
}

#[cfg(test)]
mod tests;
