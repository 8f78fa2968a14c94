//! Decaying latency averages, lock-free: one atomic word each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::clock::now_ms;

/// An exponentially decaying latency average whose weights follow time, not sample count:
/// a sample moves it by `1 - exp(-elapsed / decay)`, so 10 or 10 000 samples a second give
/// the same time constant. Estimate and timestamp share one atomic word, so updates from
/// many requests never tear and never lock.
///
/// With `PEAK` (the idea of tower's PeakEwma) a sample above the estimate replaces it at
/// once: a slowdown counts immediately and recovery decays in. That is right for choosing
/// between endpoints of one zone, which all get traffic. Ranking zones uses the symmetric
/// form, because only the nearest zone gets traffic and a peak-biased average would make
/// the busy zone look slower than idle ones and flap.
#[derive(Default)]
pub struct Average<const PEAK: bool> {
    /// High 32 bits: estimate in microseconds as f32 bits (0 = no sample yet);
    /// low 32 bits: `now_ms()` of the last update, truncated.
    word: AtomicU64,
}

pub type PeakEwma = Average<true>;
pub type Ewma = Average<false>;

impl<const PEAK: bool> Average<PEAK> {
    fn pack(est_us: f32, at_ms: u64) -> u64 {
        ((est_us.to_bits() as u64) << 32) | (at_ms & 0xffff_ffff)
    }

    pub fn observe(&self, sample: Duration, decay: Duration) {
        self.observe_value(sample.as_secs_f64() * 1e6, decay);
    }

    /// One sample of any positive quantity (the unit is the caller's; `get_us` returns it).
    pub fn observe_value(&self, value: f64, decay: Duration) {
        let s = value.max(1.0) as f32;
        let now = now_ms();
        let decay_ms = decay.as_millis().max(1) as f64;
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let est = f32::from_bits((cur >> 32) as u32);
            let next = if cur == 0 || est <= 0.0 || (PEAK && s >= est) {
                s
            } else {
                let elapsed = (now as u32).wrapping_sub(cur as u32) as f64;
                let w = (-elapsed / decay_ms).exp() as f32;
                est * w + s * (1.0 - w)
            };
            match self.word.compare_exchange_weak(
                cur,
                Self::pack(next, now),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// The estimate in microseconds, `None` before the first sample.
    pub fn get_us(&self) -> Option<f64> {
        let w = self.word.load(Ordering::Relaxed);
        let est = f32::from_bits((w >> 32) as u32);
        (w != 0 && est > 0.0).then_some(est as f64)
    }

    /// Milliseconds since the last sample, `None` before the first.
    pub fn age_ms(&self) -> Option<u64> {
        let w = self.word.load(Ordering::Relaxed);
        (w != 0).then(|| (now_ms() as u32).wrapping_sub(w as u32) as u64)
    }

    /// Forgets every sample (tests and benches that script latencies, and estimates gone
    /// stale).
    pub fn reset(&self) {
        self.word.store(0, Ordering::Relaxed);
    }

    /// Seeds a state from another (reload keeps averages of endpoints that stayed).
    pub fn copy_from(&self, other: &Average<PEAK>) {
        self.word
            .store(other.word.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let e = PeakEwma::default();
        assert_eq!(e.get_us(), None);
        let decay = Duration::from_secs(5);
        e.observe(Duration::from_millis(10), decay);
        assert!((e.get_us().unwrap_or(0.0) - 10_000.0).abs() < 1.0);
        e.observe(Duration::from_millis(50), decay);
        assert!(
            (e.get_us().unwrap_or(0.0) - 50_000.0).abs() < 1.0,
            "a peak counts at once"
        );
        // A lower sample right away barely moves it: recovery decays in over time.
        e.observe(Duration::from_millis(10), decay);
        assert!(e.get_us().unwrap_or(0.0) > 45_000.0);
    }
}
