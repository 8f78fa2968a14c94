//! Zone latency estimates that carry their own noise: the last few probe round trips of
//! each endpoint, and from them a zone's lower quartile with an uncertainty, so the ranking can
//! tell a real difference from jitter.
//!
//! Only probes feed these windows. Every zone is probed alike (same interval, same request,
//! busy or idle), so comparing zones on probes compares like with like; real requests are
//! compared only with other real requests, inside a zone.

use std::sync::Mutex;

use crate::clock::now_ms;

/// Probe round trips kept per endpoint: 32 s of history at the default 1 s interval, 6.4 s
/// at 200 ms. More samples narrow the uncertainty (by their square root); a real shift does
/// not wait for the window (see [`zone_estimate`]).
pub const WINDOW: usize = 32;
/// The quantile that stands for a zone's distance. Queueing, scheduling stalls and a busy
/// backend only ever add time to a round trip, so the low part of the distribution is
/// what the network path costs; the lower quartile keeps most of that while a few lucky
/// probes cannot drag it down as they would the minimum.
const QUANTILE: f64 = 0.25;
/// Standard error of that quantile, per standard deviation over sqrt(n), for a normal
/// distribution: sqrt(p (1 - p)) / pdf(z_p).
const QUANTILE_SE: f64 = 1.3625;
/// A zone estimate from fewer samples than this is too uncertain to win anything.
pub const MIN_SAMPLES: usize = 3;
/// A shift: of each endpoint's newest probes, enough lie beyond the noise on the same side;
/// one contrary probe inside a shift does not end it. Faster: 2 of the newest 3. Slower: 3
/// of the newest 4, since a burst of scheduler stalls on a loaded host can hit two probes in
/// a row (and leaving a zone on it would move traffic for nothing), while a stall never
/// makes a probe faster.
const SHIFT_DOWN: (usize, usize) = (3, 2);
const SHIFT_UP: (usize, usize) = (4, 3);
const SHIFT_OF: usize = 4;
/// How far (in noise widths) every newest sample must lie from the estimate to count as a
/// shift rather than jitter.
const SHIFT_SIGMAS: f64 = 3.0;
/// The uncertainty is this many standard errors of the quantile (about 95% two-sided).
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
    /// Lower quartile of the probe round trips, ms.
    pub ms: f64,
    /// Half-width of the estimate's confidence interval, ms: differences smaller than the
    /// two zones' uncertainties together are not taken as real.
    pub uncertainty_ms: f64,
    /// Spread of single samples (robust standard deviation from consecutive differences), ms.
    pub noise_ms: f64,
    /// Samples the estimate stands on.
    pub samples: usize,
    /// The newest samples of every endpoint all moved away from the estimate: the zone has
    /// shifted, and the estimate follows the newest samples rather than the window.
    pub shifted: bool,
}

/// The `p` quantile of sorted samples, interpolated.
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let pos = p * (sorted.len() - 1) as f64;
    let (i, frac) = (pos.floor() as usize, pos.fract());
    match sorted.get(i + 1) {
        Some(next) => sorted[i] + (next - sorted[i]) * frac,
        None => sorted[i],
    }
}

/// The estimate of a zone from its endpoints' windows (each oldest first); `None` without
/// a sample. `rel_floor` is the smallest difference (relative to the estimate) that a shift
/// must also exceed: the ranking's hysteresis, so a shift is never smaller than a move.
///
/// The estimate is the lower quartile of every sample in the windows, with the noise from
/// the median difference of consecutive samples: one slow or fast probe moves neither. A real step shows
/// as enough of the newest samples of every endpoint ([`SHIFT_DOWN`], [`SHIFT_UP`]) lying
/// more than [`SHIFT_SIGMAS`] noise widths on the same side; then the estimate is the lowest
/// of those, so a zone that gets slow, or fast again, is followed within two probe intervals
/// instead of a quarter of a window, and one contrary probe neither starts nor ends that.
pub fn zone_estimate<'a>(
    windows: impl Iterator<Item = &'a [f64]>,
    rel_floor: f64,
) -> Option<Estimate> {
    let mut all: Vec<f64> = Vec::with_capacity(WINDOW * 2);
    let mut steps: Vec<f64> = Vec::with_capacity(WINDOW * 2);
    let mut newest: Vec<&[f64]> = Vec::new();
    let mut complete = true;
    for w in windows {
        if w.is_empty() {
            continue;
        }
        all.extend_from_slice(w);
        steps.extend(w.windows(2).map(|p| (p[1] - p[0]).abs()));
        if w.len() > SHIFT_OF {
            newest.push(&w[w.len() - SHIFT_OF..]);
        } else {
            complete = false;
        }
    }
    if all.is_empty() {
        return None;
    }
    let n = all.len();
    all.sort_by(|a, b| a.total_cmp(b));
    let m = quantile(&all, QUANTILE);
    // The noise from the differences of consecutive samples (their median, scaled to a
    // standard deviation): a level shift inside the window is one large difference among
    // small ones, so it does not pass for noise and hide itself, as it would in the spread
    // of the samples.
    steps.sort_by(|a, b| a.total_cmp(b));
    let noise = if steps.is_empty() {
        NOISE_FLOOR_MS
    } else {
        (1.4826 * quantile(&steps, 0.5) / std::f64::consts::SQRT_2).max(NOISE_FLOOR_MS)
    };
    let se = |k: usize| CONFIDENCE * QUANTILE_SE * noise / (k as f64).sqrt();
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
    // The samples beyond the noise on one side, if every endpoint has enough of them.
    let beyond = |up: bool| -> Option<Vec<f64>> {
        let mut out = Vec::new();
        let (of, need) = if up { SHIFT_UP } else { SHIFT_DOWN };
        for w in &newest {
            let far: Vec<f64> = w[w.len() - of..]
                .iter()
                .copied()
                .filter(|x| if up { *x > m + gap } else { *x < m - gap })
                .collect();
            if far.len() < need {
                return None;
            }
            out.extend(far);
        }
        Some(out)
    };
    let shift = if complete && !newest.is_empty() {
        beyond(true).or_else(|| beyond(false))
    } else {
        None
    };
    if let Some(far) = shift {
        let k = far.len();
        let ms = far.iter().copied().fold(f64::INFINITY, f64::min);
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
    fn one_outlier_moves_neither_the_estimate_nor_the_noise_much() {
        let calm = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 2.8, 3.1]]);
        let spiky = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 2.8, 150.0]]);
        assert!((calm.ms - spiky.ms).abs() < 0.1, "{calm:?} {spiky:?}");
        assert!(!spiky.shifted);
        assert!(spiky.uncertainty_ms < 0.5, "{spiky:?}");
    }

    #[test]
    fn newest_probes_beyond_the_noise_are_a_shift_both_ways() {
        let two = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 153.0, 151.0]]);
        assert!(
            !two.shifted,
            "two slow probes may be a stall burst: {two:?}"
        );
        let slow = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 152.0, 153.0, 151.0]]);
        assert!(slow.shifted && slow.ms > 150.0, "{slow:?}");
        let back = est(&[vec![153.0, 150.0, 152.0, 151.0, 153.0, 152.0, 3.1, 2.9]]);
        assert!(back.shifted && back.ms < 3.5, "{back:?}");
        // One fast probe among slow ones is not a shift...
        let one = est(&[vec![153.0, 150.0, 152.0, 151.0, 153.0, 152.0, 151.0, 3.0]]);
        assert!(!one.shifted && one.ms > 150.0, "{one:?}");
        // A window half fast, half slow is a shift still under way, not noise.
        let mut mid = vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 3.0, 3.1];
        mid.extend([150.0, 152.0, 151.0, 153.0, 150.0, 152.0, 3.0, 151.0]);
        let mid = est(&[mid]);
        assert!(mid.shifted && mid.ms >= 150.0, "{mid:?}");
        // ...nor does it end one.
        let inside = est(&[vec![3.0, 3.2, 2.9, 3.1, 3.0, 3.3, 152.0, 153.0, 151.0, 3.0]]);
        assert!(inside.shifted && inside.ms > 150.0, "{inside:?}");
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
