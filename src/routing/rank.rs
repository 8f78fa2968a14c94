//! How zones are ranked: on their probe estimates with their noise, locality breaking ties,
//! and a hold time before an order changes.
//!
//! Each build computes the order the estimates ask for now (the *desired* order):
//! 1. start from locality: own zone, then zones of own region, then the rest; inside each
//!    class, the order held so far, then the name;
//! 2. a zone moves ahead of the one before it only when it is *clearly* faster: by more than
//!    both zones' uncertainties, plus the hysteresis (relative, at least 0.25 ms), plus
//!    `cross_region_margin` when it would take traffic out of this router's region.
//!
//! The held order becomes the desired one once the desired order has stood unchanged for
//! `rank_hold`, or at once when its nearest zone is at least twice as fast as the held
//! nearest one (both with their uncertainty), so a dead-slow zone is left immediately, or
//! when a zone gets its first estimate (the held order was made without it).
//! Zones with no available endpoint come after every zone with one, without waiting.
//! Zones equal within noise therefore always settle in locality order, whatever happened
//! before: the ranking has no memory of drifts.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::config::{Locality, RoutingConfig};
use crate::routing::table::EndpointEntry;
use crate::state::estimate::MIN_SAMPLES;
use crate::state::{zone_estimate, Estimate};

pub type ZoneKey = (Arc<str>, Arc<str>);

/// Below this a latency difference is scheduler noise, not distance (ms).
const MIN_LEAD_MS: f64 = 0.25;

/// A zone's probe estimate: from its available endpoints, or from all of them when none is
/// available (so a dead zone keeps a place among the dead).
pub fn zone_estimate_of<'a>(
    endpoints: impl Iterator<Item = &'a EndpointEntry> + Clone,
    routing: &RoutingConfig,
) -> Option<Estimate> {
    let windows = |avail: bool| -> Vec<Vec<f64>> {
        endpoints
            .clone()
            .filter(|e| !avail || e.state.is_available())
            .map(|e| e.state.probes.samples())
            .filter(|w| !w.is_empty())
            .collect()
    };
    let mut w = windows(true);
    if w.is_empty() {
        w = windows(false);
    }
    zone_estimate(w.iter().map(|v| v.as_slice()), routing.hysteresis)
}

/// 0 own zone, 1 own region, 2 elsewhere.
pub fn locality_class(k: &ZoneKey, locality: &Locality) -> u8 {
    if *k.1 == locality.zone {
        0
    } else if *k.0 == locality.region {
        1
    } else {
        2
    }
}

/// The lead (ms) `challenger` needs over `incumbent` to pass it: both uncertainties, the
/// hysteresis, and the cross-region margin when it would take traffic out of our region.
/// An incumbent with too few samples to know its noise does not hide behind that: a zone
/// clearly faster than its first probes passes it (while a challenger that new must lead
/// by more than its own estimate, its uncertainty being as large as that). Two zones both
/// that new keep their locality order: one slow first probe (a cold connection, a busy
/// host) is indistinguishable from distance, and must not send a router's traffic out of
/// its own zone at start-up. They take their places once their estimates are settled.
pub fn required_lead_ms(
    challenger: (&ZoneKey, &Estimate),
    incumbent: (&ZoneKey, &Estimate),
    locality: &Locality,
    routing: &RoutingConfig,
) -> f64 {
    let (ck, ce) = challenger;
    let (ik, ie) = incumbent;
    let cross = if *ck.0 != locality.region && *ik.0 == locality.region {
        routing.cross_region_margin.as_secs_f64() * 1e3
    } else {
        0.0
    };
    let (c_new, i_new) = (ce.samples < MIN_SAMPLES, ie.samples < MIN_SAMPLES);
    if c_new && i_new {
        return f64::INFINITY;
    }
    let iu = if i_new { 0.0 } else { ie.uncertainty_ms };
    ce.uncertainty_ms + iu + (routing.hysteresis * ie.ms).max(MIN_LEAD_MS) + cross
}

fn clearly_faster(
    c: &ZoneKey,
    i: &ZoneKey,
    est: &HashMap<ZoneKey, Option<Estimate>>,
    locality: &Locality,
    routing: &RoutingConfig,
) -> bool {
    match (est.get(c).copied().flatten(), est.get(i).copied().flatten()) {
        (Some(ce), Some(ie)) => {
            ie.ms - ce.ms > required_lead_ms((c, &ce), (i, &ie), locality, routing)
        }
        _ => false,
    }
}

/// Remembers, per cluster, the held order and the desired order waiting out its hold.
#[derive(Default)]
pub struct Ranker {
    held: HashMap<String, Vec<ZoneKey>>,
    /// The zones that had an estimate when the held order was taken, and whether it was
    /// settled (enough samples): a zone measured for the first time, or settled for the
    /// first time, takes its place at once (the held order knew nothing of it).
    measured: HashMap<String, Vec<(ZoneKey, bool)>>,
    pending: HashMap<String, (Vec<ZoneKey>, Instant)>,
}

impl Ranker {
    /// Zones nearest first, and whether a zone with nothing available was nearer than every
    /// zone with something (its traffic is then failover). `available` says which zones
    /// have an available endpoint.
    #[allow(clippy::too_many_arguments)]
    pub fn rank(
        &mut self,
        cluster: &str,
        keys: &[ZoneKey],
        est: &HashMap<ZoneKey, Option<Estimate>>,
        available: &dyn Fn(&ZoneKey) -> bool,
        locality: &Locality,
        routing: &RoutingConfig,
        now: Instant,
    ) -> (Vec<ZoneKey>, bool) {
        let prev: Vec<ZoneKey> = self.held.get(cluster).cloned().unwrap_or_default();
        let pos = |k: &ZoneKey| prev.iter().position(|p| p == k).unwrap_or(usize::MAX);
        let mut desired: Vec<ZoneKey> = keys.to_vec();
        desired.sort_by(|a, b| {
            locality_class(a, locality)
                .cmp(&locality_class(b, locality))
                .then(pos(a).cmp(&pos(b)))
                .then(a.1.cmp(&b.1))
        });
        // Bubble clear wins forward. Each swap puts a strictly lower estimate first, so this
        // ends; the bound only guards against float surprises.
        for _ in 0..desired.len() * desired.len() {
            let mut swapped = false;
            for j in 1..desired.len() {
                if clearly_faster(&desired[j], &desired[j - 1], est, locality, routing) {
                    desired.swap(j, j - 1);
                    swapped = true;
                }
            }
            if !swapped {
                break;
            }
        }

        let same_zones = prev.len() == keys.len() && keys.iter().all(|k| prev.contains(k));
        let knowledge = |k: &ZoneKey| {
            est.get(k)
                .copied()
                .flatten()
                .map(|e| (k.clone(), e.samples >= MIN_SAMPLES))
        };
        let known = self.measured.get(cluster);
        let newly_measured = keys
            .iter()
            .filter_map(knowledge)
            .any(|m| !known.is_some_and(|known| known.contains(&m)));
        let at_once =
            !same_zones || newly_measured || prev == desired || self.urgent(&prev, &desired, est);
        if at_once {
            let m = keys.iter().filter_map(knowledge).collect();
            self.measured.insert(cluster.to_string(), m);
        }
        let held = if at_once {
            self.pending.remove(cluster);
            desired
        } else {
            match self.pending.get(cluster) {
                Some((p, since)) if *p == desired => {
                    if now.duration_since(*since) >= routing.rank_hold {
                        self.pending.remove(cluster);
                        desired
                    } else {
                        prev
                    }
                }
                _ => {
                    self.pending.insert(cluster.to_string(), (desired, now));
                    prev
                }
            }
        };
        self.held.insert(cluster.to_string(), held.clone());
        let dead_ahead = held.first().is_some_and(|k| !available(k));
        // Dead zones last, at once; among themselves and among the living the held order.
        let mut out = held;
        out.sort_by(|a, b| match (available(a), available(b)) {
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            _ => Ordering::Equal,
        });
        (out, dead_ahead)
    }

    /// The desired nearest zone is at least twice as fast as the held one, even giving each
    /// the benefit of its uncertainty.
    fn urgent(
        &self,
        held: &[ZoneKey],
        desired: &[ZoneKey],
        est: &HashMap<ZoneKey, Option<Estimate>>,
    ) -> bool {
        let (Some(h), Some(d)) = (held.first(), desired.first()) else {
            return false;
        };
        if h == d {
            return false;
        }
        match (est.get(d).copied().flatten(), est.get(h).copied().flatten()) {
            (Some(de), Some(he)) => 2.0 * (de.ms + de.uncertainty_ms) <= he.ms - he.uncertainty_ms,
            _ => false,
        }
    }

    /// Forgets clusters that left the config.
    pub fn retain(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.held.retain(|k, _| keep(k));
        self.measured.retain(|k, _| keep(k));
        self.pending.retain(|k, _| keep(k));
    }
}
