//! What hedging needs to know about a zone: a recent p95 of time to response headers, kept
//! lock-free in a small decaying histogram that outlives routing tables (like
//! [`crate::state::EndpointState`] does), so a table rebuild does not forget it.
//!
//! Only requests that may be hedged record samples, so the plain request path pays nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;

/// Buckets of the histogram: bucket `i` holds samples in [BASE x R^i, BASE x R^(i+1)) with
/// R = 2^(1/4) (a bucket is 19% wide), from 50 us to 3.3 s; slower samples count in the last.
const BUCKETS: usize = 64;
const BASE_US: f64 = 50.0;
const PER_OCTAVE: f64 = 4.0;
/// Every this long the counts are halved: the estimate follows the last few seconds.
const HALF_LIFE_MS: u64 = 2_000;
/// Fewer samples than this and the p95 is not trusted.
pub const MIN_SAMPLES: u32 = 20;

/// Time-to-headers histogram of one zone, for the hedge delay. All atomics, no lock.
pub struct ZoneStats {
    counts: [AtomicU32; BUCKETS],
    total: AtomicU32,
    last_decay_ms: AtomicU64,
    /// The last computed p95 in microseconds; 0 while there are too few samples.
    p95_us: AtomicU32,
}

impl Default for ZoneStats {
    fn default() -> Self {
        ZoneStats {
            counts: std::array::from_fn(|_| AtomicU32::new(0)),
            total: AtomicU32::new(0),
            last_decay_ms: AtomicU64::new(now_ms()),
            p95_us: AtomicU32::new(0),
        }
    }
}

fn bucket_of(us: f64) -> usize {
    if us <= BASE_US {
        return 0;
    }
    ((us / BASE_US).log2() * PER_OCTAVE).min((BUCKETS - 1) as f64) as usize
}

fn lower_edge_us(i: usize) -> f64 {
    BASE_US * (i as f64 / PER_OCTAVE).exp2()
}

impl ZoneStats {
    /// One time to response headers (or, for an attempt cancelled by its hedge, the time it
    /// had waited: a lower bound that lies above the current p95 anyway).
    pub fn record(&self, sample: Duration) {
        let us = sample.as_secs_f64() * 1e6;
        self.counts[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
        let n = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        let last = self.last_decay_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= HALF_LIFE_MS
            && self
                .last_decay_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            // One thread halves; adds racing with it are kept (they land before or after).
            let mut sum = 0u32;
            for c in &self.counts {
                let v = c.load(Ordering::Relaxed);
                c.fetch_sub(v / 2, Ordering::Relaxed);
                sum += v - v / 2;
            }
            self.total.store(sum, Ordering::Relaxed);
            self.refresh();
        } else if n % 8 == 0 || n <= MIN_SAMPLES {
            self.refresh();
        }
    }

    /// Recomputes the cached p95 from the buckets (64 loads).
    fn refresh(&self) {
        let counts: [u32; BUCKETS] =
            std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed));
        let total: u64 = counts.iter().map(|&c| c as u64).sum();
        if total < MIN_SAMPLES as u64 {
            self.p95_us.store(0, Ordering::Relaxed);
            return;
        }
        let target = (total as f64 * 0.95).ceil();
        let mut cum = 0f64;
        for (i, &c) in counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if cum + c as f64 >= target {
                // Interpolate inside the bucket.
                let (lo, hi) = (lower_edge_us(i), lower_edge_us(i + 1));
                let frac = ((target - cum) / c as f64).clamp(0.0, 1.0);
                let us = lo + (hi - lo) * frac;
                self.p95_us
                    .store(us.clamp(1.0, u32::MAX as f64) as u32, Ordering::Relaxed);
                return;
            }
            cum += c as f64;
        }
    }

    /// The zone's recent p95 of time to headers; `None` before [`MIN_SAMPLES`] samples.
    pub fn p95(&self) -> Option<Duration> {
        match self.p95_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us as u64)),
        }
    }

    pub fn samples(&self) -> u32 {
        self.total.load(Ordering::Relaxed)
    }
}

type ZoneKey = (Arc<str>, Arc<str>);

/// The zone statistics of one cluster, by (region, zone). Touched only by the table builder;
/// the request path reaches a zone's stats through its routing table.
#[derive(Default)]
pub struct ZoneRegistry {
    zones: Mutex<HashMap<ZoneKey, Arc<ZoneStats>>>,
}

impl ZoneRegistry {
    pub fn get(&self, region: &Arc<str>, zone: &Arc<str>) -> Arc<ZoneStats> {
        let mut m = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((region.clone(), zone.clone())).or_default().clone()
    }

    /// Forgets zones that left the cluster.
    pub fn retain(&self, keep: &[ZoneKey]) {
        let mut m = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() > keep.len() {
            m.retain(|k, _| keep.contains(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p95_of_a_known_distribution() {
        let s = ZoneStats::default();
        assert_eq!(s.p95(), None);
        // 90 samples at 2 ms, 10 at 100 ms: the p95 lies in the slow group.
        for i in 0..100 {
            let ms = if i % 10 == 0 { 100 } else { 2 };
            s.record(Duration::from_millis(ms));
        }
        let p = s.p95().expect("enough samples").as_secs_f64() * 1e3;
        assert!((80.0..125.0).contains(&p), "p95 {p} ms");
        // 98 fast, 2 slow: the p95 is a fast one (within a bucket's width of 2 ms).
        let s = ZoneStats::default();
        for i in 0..100 {
            let ms = if i % 50 == 0 { 100 } else { 2 };
            s.record(Duration::from_millis(ms));
        }
        let p = s.p95().expect("enough samples").as_secs_f64() * 1e3;
        assert!((1.6..2.5).contains(&p), "p95 {p} ms");
    }

    #[test]
    fn few_samples_give_no_p95() {
        let s = ZoneStats::default();
        for _ in 0..MIN_SAMPLES - 1 {
            s.record(Duration::from_millis(3));
        }
        assert_eq!(s.p95(), None);
        s.record(Duration::from_millis(3));
        assert!(s.p95().is_some());
    }

    #[test]
    fn buckets_cover_the_range() {
        assert_eq!(bucket_of(10.0), 0);
        assert_eq!(bucket_of(1e9), BUCKETS - 1);
        for us in [60.0, 1_000.0, 20_000.0, 1_000_000.0] {
            let b = bucket_of(us);
            assert!(lower_edge_us(b) <= us && us < lower_edge_us(b + 1), "{us}");
        }
    }
}
