//! Retry and hedge budgets: token buckets in one atomic each.

use std::sync::atomic::{AtomicI64, Ordering};

/// A token bucket for retries and hedges: every request deposits `ratio` of a token, a
/// floor refills `min_per_second`, and the balance is capped so a quiet hour cannot fund a
/// storm. Milli-tokens in one atomic: no lock.
pub struct Budget {
    milli: AtomicI64,
}

impl Budget {
    pub(crate) fn new() -> Budget {
        Budget {
            milli: AtomicI64::new(10_000),
        }
    }

    pub fn deposit(&self, ratio: f64, cap: i64) {
        let add = (ratio * 1000.0) as i64;
        if add > 0 && self.milli.load(Ordering::Relaxed) < cap * 1000 {
            self.milli.fetch_add(add, Ordering::Relaxed);
        }
    }

    pub fn withdraw(&self) -> bool {
        if self.milli.fetch_sub(1000, Ordering::AcqRel) >= 1000 {
            true
        } else {
            self.milli.fetch_add(1000, Ordering::AcqRel);
            false
        }
    }

    pub(crate) fn refill(&self, milli: i64, cap: i64) {
        let cur = self.milli.load(Ordering::Relaxed);
        if cur < cap * 1000 {
            self.milli
                .fetch_add(milli.min(cap * 1000 - cur), Ordering::Relaxed);
        }
    }
}

/// The most tokens a budget may hold: ten seconds of the floor, and never less than 100.
pub fn budget_cap(min_per_second: u32) -> i64 {
    (min_per_second as i64 * 10).max(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_spends_and_refuses() {
        let b = Budget::new();
        let mut granted = 0;
        for _ in 0..100 {
            if b.withdraw() {
                granted += 1;
            }
        }
        assert_eq!(granted, 10, "starts with ten tokens");
        for _ in 0..10 {
            b.deposit(0.2, 100);
        }
        assert!(
            b.withdraw() && b.withdraw(),
            "ten requests at 20% fund two retries"
        );
        assert!(!b.withdraw(), "and no third");
    }
}
