//! The per-request pick over a routing table: no lock, no allocation, and a cost that does
//! not grow with the number of endpoints (one random draw over a few zone slices, then two
//! random candidates in the zone).

use std::cell::Cell;
use std::sync::atomic::Ordering;

use crate::routing::table::{ClusterTable, EndpointEntry, Reason, ZoneTable};
use crate::state::EndpointState;

/// Where a request goes, and why.
pub struct Pick<'t> {
    pub zone: usize,
    pub endpoint: &'t EndpointEntry,
    pub reason: Reason,
}

thread_local! {
    static RNG: Cell<u64> = Cell::new({
        let mut seed = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut seed);
        u64::from_le_bytes(seed) | 1
    });
}

/// xorshift64*: a few instructions, thread-local, plenty for load balancing.
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    })
}

/// Seeds this thread's generator: a test gets the same draws on every run.
#[cfg(test)]
pub(crate) fn seed(s: u64) {
    RNG.with(|c| c.set(s | 1));
}

/// Uniform in [0, 1).
pub fn random_unit() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The nearest-healthy pick: a zone by the table's traffic slices, then power of two choices
/// inside it. `None` when the cluster has nothing to offer (no endpoint, every candidate
/// saturated, or the draw fell in the share a strict dial refuses).
pub fn pick<'t, C>(cluster: &'t ClusterTable<C>, max_in_flight: u32) -> Option<Pick<'t>> {
    slice_pick(cluster, random_unit(), max_in_flight)
}

/// The pick for a draw `u` in [0, 1).
fn slice_pick<'t, C>(cluster: &'t ClusterTable<C>, u: f64, max_in_flight: u32) -> Option<Pick<'t>> {
    // Slices cover [0, served); a draw past `served` is traffic the table refuses (a dial
    // with dial_fallback = false and nowhere else to go).
    let slice = *cluster.slices.iter().find(|s| u < s.upto)?;
    if let Some(endpoint) = p2c(&cluster.zones[slice.zone], None, max_in_flight) {
        return Some(Pick {
            zone: slice.zone,
            endpoint,
            reason: slice.reason,
        });
    }
    // The zone's candidates are all at their concurrency limit: the next zone takes it.
    let reason = if cluster.panic {
        Reason::Panic
    } else {
        Reason::Spillover
    };
    next_zone(cluster, slice.zone, None, max_in_flight, reason)
}

/// A second attempt (retry or hedge): another endpoint, preferably in another zone, nearest
/// first. Zones of regions dialled to 0 are drained: they come after every other zone.
pub fn pick_other<'t, C>(
    cluster: &'t ClusterTable<C>,
    failed: &EndpointState,
    max_in_flight: u32,
    reason: Reason,
) -> Option<Pick<'t>> {
    let failed_zone = cluster.zones.iter().position(|z| z.zone == failed.zone);
    let others = |drained: bool| {
        cluster
            .zones
            .iter()
            .enumerate()
            .filter(move |(i, z)| Some(*i) != failed_zone && (z.dial == 0) == drained)
    };
    let same = failed_zone.map(|i| (i, &cluster.zones[i]));
    others(false)
        .chain(others(true))
        .chain(same)
        .find_map(|(i, z)| {
            p2c(z, Some(failed), max_in_flight).map(|endpoint| Pick {
                zone: i,
                endpoint,
                reason,
            })
        })
}

fn next_zone<'t, C>(
    cluster: &'t ClusterTable<C>,
    after: usize,
    exclude: Option<&EndpointState>,
    max_in_flight: u32,
    reason: Reason,
) -> Option<Pick<'t>> {
    cluster
        .zones
        .iter()
        .enumerate()
        .skip(after + 1)
        .chain(cluster.zones.iter().enumerate().take(after))
        .find_map(|(i, z)| {
            p2c(z, exclude, max_in_flight).map(|endpoint| Pick {
                zone: i,
                endpoint,
                reason,
            })
        })
}

/// Client affinity: the same key lands on the same endpoint of the same zone as long as it
/// is available. The zone comes from the table's slices (the key's hash stands in for the
/// random draw) and the endpoint by rendezvous hashing, so removing one endpoint moves only
/// the keys that were on it.
pub fn pick_affinity<'t, C>(
    cluster: &'t ClusterTable<C>,
    key: &[u8],
    max_in_flight: u32,
) -> Option<Pick<'t>> {
    let h = hash64(key, 0x9e37_79b9_7f4a_7c15);
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    // The key's hash stands in for the random draw: a client keeps its zone too.
    let slice = cluster.slices.iter().find(|s| u < s.upto)?;
    let zone = &cluster.zones[slice.zone];
    let best = zone
        .candidates
        .iter()
        .filter(|e| e.state.in_flight.load(Ordering::Relaxed) < max_in_flight)
        .map(|e| {
            // Weighted rendezvous: score = -w / ln(u) with u uniform from the pair's hash.
            let hu = hash64(key, hash_addr(&e.state));
            let unit = ((hu >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (-(e.weight as f64) / unit.ln(), e)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, endpoint)) => Some(Pick {
            zone: slice.zone,
            endpoint,
            reason: if cluster.panic {
                Reason::Panic
            } else {
                Reason::Affinity
            },
        }),
        None => pick(cluster, max_in_flight),
    }
}

fn hash_addr(e: &EndpointState) -> u64 {
    match e.addr {
        std::net::SocketAddr::V4(a) => (u32::from(*a.ip()) as u64) << 16 | a.port() as u64,
        std::net::SocketAddr::V6(a) => (u128::from(*a.ip()) as u64) ^ ((a.port() as u64) << 48),
    }
}

/// FNV-1a, seeded: stable across processes and versions, so affinity survives restarts.
fn hash64(data: &[u8], seed: u64) -> u64 {
    let mut x: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    for b in data {
        x ^= *b as u64;
        x = x.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // Finalise (splitmix64) so nearby keys spread.
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Power of two choices over latency x (in-flight + 1), candidates drawn by weight.
/// Costs within 20% of each other count as equal and the first draw wins, which keeps the
/// weighted draw in charge when endpoints are alike (so weights hold) and lets load and
/// latency decide when they are not.
fn p2c<'t>(
    zone: &'t ZoneTable,
    exclude: Option<&EndpointState>,
    max_in_flight: u32,
) -> Option<&'t EndpointEntry> {
    let n = zone.candidates.len();
    let usable = |e: &EndpointEntry| {
        !exclude.is_some_and(|x| std::ptr::eq(x, &*e.state))
            && e.state.in_flight.load(Ordering::Relaxed) < max_in_flight
            && !e.state.is_ejected()
    };
    match n {
        0 => return None,
        1 => return zone.candidates.first().filter(|e| usable(e)),
        _ => {}
    }
    let a = draw(zone);
    let mut b = draw(zone);
    if b == a {
        b = (a + 1 + (random_u64() as usize % (n - 1))) % n;
    }
    let (ea, eb) = (&zone.candidates[a], &zone.candidates[b]);
    let chosen = match (usable(ea), usable(eb)) {
        (true, true) => {
            // With unequal weights the draw carries the weights, so the other candidate
            // must be cheaper by a wider margin before it overrides the draw.
            let margin = if zone.cum_weights.is_empty() {
                1.2
            } else {
                1.5
            };
            if clearly_cheaper(eb, ea, margin) {
                eb
            } else {
                ea
            }
        }
        (true, false) => ea,
        (false, true) => eb,
        // Both drawn candidates are out: scan once so a saturated pair does not fail a
        // request that another endpoint could take.
        (false, false) => {
            return zone
                .candidates
                .iter()
                .filter(|e| usable(e))
                .min_by(|x, y| cost(x).total_cmp(&cost(y)))
        }
    };
    Some(chosen)
}

fn draw(zone: &ZoneTable) -> usize {
    let n = zone.candidates.len();
    if zone.cum_weights.is_empty() {
        return (random_u64() % n as u64) as usize;
    }
    let total = *zone.cum_weights.last().unwrap_or(&1) as u64;
    let r = (random_u64() % total.max(1)) as u32;
    zone.cum_weights.partition_point(|&c| c <= r).min(n - 1)
}

fn load(e: &EndpointEntry) -> f64 {
    e.state.in_flight.load(Ordering::Relaxed) as f64 + 1.0
}

fn cost(e: &EndpointEntry) -> f64 {
    // Before any sample an endpoint costs like a 30 ms one (linkerd's default RTT), so it
    // is tried but does not swallow traffic on hope.
    let s = &e.state;
    let lat = s
        .latency
        .get_us()
        .or_else(|| s.probe_latency.get_us())
        .unwrap_or(30_000.0);
    lat * load(e)
}

/// Is `b` cheaper than `a` (latency x (in-flight + 1)) by more than `margin`, comparing
/// like with like and only on differences that are real?
///
/// - Latency counts only when both endpoints have recent real requests. An endpoint without
///   them (it only gets probes) is taken as alike in latency: neither punished nor favoured
///   for being idle; its first requests tell.
/// - When latency and load agree, that is the answer (the common case, and cheap).
/// - When they disagree, latency wins only if the peak and the smoothed averages both say
///   so and the smoothed gap exceeds the spread of single answers (their standard
///   deviations together): one slow answer, or a jittery backend, does not cost an endpoint
///   its share. Otherwise the in-flight counts, which are exact, decide.
fn clearly_cheaper(b: &EndpointEntry, a: &EndpointEntry, margin: f64) -> bool {
    let (la, lb) = (load(a), load(b));
    let load_says = lb * margin < la;
    let (sa, sb) = (&a.state, &b.state);
    let (Some(pa), Some(pb)) = (sa.latency.get_us(), sb.latency.get_us()) else {
        return load_says;
    };
    let cost_says = pb * lb * margin < pa * la;
    if cost_says == load_says {
        return cost_says;
    }
    let (Some(ma), Some(mb)) = (sa.smoothed.get_us(), sb.smoothed.get_us()) else {
        return load_says;
    };
    let spread =
        sa.request_variance_us2().unwrap_or(0.0) + sb.request_variance_us2().unwrap_or(0.0);
    let real = (ma - mb) * (ma - mb) > spread && (mb * lb * margin < ma * la) == cost_says;
    if real {
        cost_says
    } else {
        load_says
    }
}

#[cfg(test)]
#[path = "balancer_tests.rs"]
mod tests;
