//! Zone latency estimates that carry their own noise: the last few probe round trips of
//! each endpoint, and from them a zone's median with an uncertainty, so the ranking can
//! tell a real difference from jitter.
//!
//! Only probes feed these windows. Every zone is probed alike (same interval, same request,
//! busy or idle), so comparing zones on probes compares like with like; real requests are
//! compared only with other real requests, inside a zone.

use std::sync::Mutex;

use crate::clock::now_ms;

/// Probe round trips kept per endpoint. Eight at the default 1 s interval is 8 s of history;
/// fewer would let two outliers move the median, more would slow a real shift down.
pub const WINDOW: usize = 8;
/// A zone estimate from fewer samples than this is too uncertain to win anything.
pub const MIN_SAMPLES: usize = 3;
/// The newest probes of each endpoint that can, all together, signal a shift.
const SHIFT_SAMPLES: usize = 2;
/// How far (in noise widths) every newest sample must lie from the median to count as a
/// shift rather than jitter.
const SHIFT_SIGMAS: f64 = 3.0;
/// The uncertainty is this many standard errors of the median (about 95% two-sided).
const CONFIDENCE: f64 = 2.0;
/// Noise below this is clock resolution, not a measurement (ms).
const NOISE_FLOOR_MS: f64 = 0.05;

/// The last [`WINDOW`] probe round trips of one endpoint, newest last, with when they came.
/// One prober writes and the table builder reads, a few times a second each: a mutex is
/// simpler than atomics here and it is never on the request path.
#[derive(Default)]
pub struct ProbeWindow {
    inner: Mutex<Ring>,
}

#[derive(Default, Clone, Copy)]
struct Ring {
    /// Round trips in ms.
    samples: [f32; WINDOW],
    len: usize,
    next: usize,
    last_ms: u64,
}

impl ProbeWindow {
    pub fn push(&self, rtt_ms: f64) {
        let mut r = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let i = r.next;
        r.samples[i] = rtt_ms as f32;
        r.next = (i + 1) % WINDOW;
        r.len = (r.len + 1).min(WINDOW);
        r.last_ms = now_ms();
    }

    /// Oldest first.
    pub fn samples(&self) -> Vec<f64> {
        let r = *self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let start = (r.next + WINDOW - r.len) % WINDOW;
        (0..r.len)
            .map(|k| r.samples[(start + k) % WINDOW] as f64)
            .collect()
    }

    /// `now_ms()` of the newest sample; 0 before any.
    pub fn last_ms(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).last_ms
    }

    pub fn copy_from(&self, other: &ProbeWindow) {
        let r = *other.inner.lock().unwrap_or_else(|e| e.into_inner());
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    pub fn clear(&self) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()) = Ring::default();
    }
}

/// A zone's latency with its noise.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Median probe round trip, ms.
    pub ms: f64,
    /// Half-width of the estimate's confidence interval, ms: differences smaller than the
    /// two zones' uncertainties together are not taken as real.
    pub uncertainty_ms: f64,
    /// Spread of single samples (robust standard deviation from the MAD), ms.
    pub noise_ms: f64,
    /// Samples the estimate stands on.
    pub samples: usize,
    /// The newest samples of every endpoint all moved away from the median: the zone has
    /// shifted, and the estimate follows the newest samples rather than the window.
    pub shifted: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The estimate of a zone from its endpoints' windows (each oldest first); `None` without
/// a sample. `rel_floor` is the smallest difference (relative to the median) that a shift
/// must also exceed: the ranking's hysteresis, so a shift is never smaller than a move.
///
/// The estimate is the median of every sample in the windows, with the median absolute
/// deviation as the noise: one slow or fast probe moves neither. A real step shows as the
/// newest [`SHIFT_SAMPLES`] samples of every endpoint all lying more than
/// [`SHIFT_SIGMAS`] noise widths on the same side; then the estimate is their median, so a
/// zone that gets slow, or fast again, is followed within two probe intervals instead of
/// half a window.
pub fn zone_estimate<'a>(
    windows: impl Iterator<Item = &'a [f64]>,
    rel_floor: f64,
) -> Option<Estimate> {
    let mut all: Vec<f64> = Vec::with_capacity(WINDOW * 2);
    let mut newest: Vec<f64> = Vec::new();
    let mut complete = true;
    for w in windows {
        if w.is_empty() {
            continue;
        }
        all.extend_from_slice(w);
        if w.len() >= SHIFT_SAMPLES + 1 {
            newest.extend_from_slice(&w[w.len() - SHIFT_SAMPLES..]);
        } else {
            complete = false;
        }
    }
    if all.is_empty() {
        return None;
    }
    let n = all.len();
    let m = median(&mut all);
    let mut dev: Vec<f64> = all.iter().map(|x| (x - m).abs()).collect();
    let noise = (1.4826 * median(&mut dev)).max(NOISE_FLOOR_MS);
    let se = |k: usize| CONFIDENCE * 1.2533 * noise / (k as f64).sqrt();
    if n < MIN_SAMPLES {
        return Some(Estimate {
            ms: m,
            // Too few samples to know the spread: as uncertain as the value itself.
            uncertainty_ms: m.max(se(n)),
            noise_ms: noise,
            samples: n,
            shifted: false,
        });
    }
    let gap = SHIFT_SIGMAS * noise + rel_floor * m;
    let shifted = complete
        && !newest.is_empty()
        && (newest.iter().all(|x| *x > m + gap) || newest.iter().all(|x| *x < m - gap));
    if shifted {
        let k = newest.len();
        let ms = median(&mut newest);
        return Some(Estimate {
            ms,
            uncertainty_ms: se(k),
            noise_ms: noise,
            samples: k,
            shifted: true,
        });
    }
    Some(Estimate {
        ms: m,
        uncertainty_ms: se(n),
        noise_ms: noise,
        samples: n,
        shifted: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn est(ws: &[Vec<f64>]) -> Estimate {
        zone_estimate(ws.iter().map(|w| w.as_slice()), 0.1).expect("samples")
    }

    #[test]
    fn window_keeps_the_newest_samples_in_order() {
        let w = ProbeWindow::default();
        for i in 0..(WINDOW + 3) {
            w.push(i as f64);
        }
        let s = w.samples();
        assert_eq!(s.len(), WINDOW);
        assert_eq!(s[0], 3.0);
        assert_eq!(s[WINDOW - 1], (WINDOW + 2) as f64);
    }

    #[test]
    fn one_outlier_moves_neither_the_median_nor_the_noise_much() {
        let calm = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 2.8, 3.1]]);
        let spiky = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 2.8, 150.0]]);
        assert!((calm.ms - spiky.ms).abs() < 0.1, "{calm:?} {spiky:?}");
        assert!(!spiky.shifted);
        assert!(spiky.uncertainty_ms < 0.5, "{spiky:?}");
    }

    #[test]
    fn two_newest_probes_beyond_the_noise_are_a_shift_both_ways() {
        let slow = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 153.0, 151.0]]);
        assert!(slow.shifted && slow.ms > 150.0, "{slow:?}");
        let back = est(&[vec![153.0, 150.0, 152.0, 151.0, 153.0, 152.0, 3.1, 2.9]]);
        assert!(back.shifted && back.ms < 3.5, "{back:?}");
        // One fast probe among slow ones is not a shift.
        let one = est(&[vec![153.0, 150.0, 152.0, 151.0, 153.0, 152.0, 151.0, 3.0]]);
        assert!(!one.shifted && one.ms > 150.0, "{one:?}");
        // Every endpoint must agree: one slow endpoint of two is not the zone shifting.
        let half = est(&[
            vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 153.0, 151.0],
            vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 3.0, 3.1],
        ]);
        assert!(!half.shifted, "{half:?}");
    }

    #[test]
    fn few_samples_are_as_uncertain_as_their_value() {
        let e = est(&[vec![2.0]]);
        assert_eq!(e.samples, 1);
        assert!(e.uncertainty_ms >= 2.0);
        assert_eq!(zone_estimate(std::iter::empty(), 0.1), None);
    }

    #[test]
    fn uncertainty_shrinks_with_samples_and_grows_with_noise() {
        let quiet = est(&[vec![3.0, 3.1, 2.9, 3.0, 3.05, 2.95, 3.0, 3.1]]);
        let noisy = est(&[vec![2.0, 5.0, 3.0, 4.5, 2.2, 3.8, 4.9, 2.5]]);
        assert!(
            noisy.uncertainty_ms > 4.0 * quiet.uncertainty_ms,
            "{quiet:?} {noisy:?}"
        );
        let two = est(&[
            vec![2.0, 5.0, 3.0, 4.5, 2.2, 3.8, 4.9, 2.5],
            vec![2.0, 5.0, 3.0, 4.5, 2.2, 3.8, 4.9, 2.5],
        ]);
        assert!(two.uncertainty_ms < noisy.uncertainty_ms);
    }
}
