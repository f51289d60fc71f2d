//! Statistics over seed replicates: mean and spread, and bootstrap intervals of a mean with a
//! fixed resampling seed (the same numbers on every run).

use moelab_io::rng::SplitMix64;
use serde::Serialize;

/// Resamples drawn by [`bootstrap_mean_interval`].
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// Seed of the bootstrap's resampling generator: intervals are reproducible.
pub const BOOTSTRAP_SEED: u64 = 0x6d6f_656c_6162;

/// Mean and sample standard deviation of replicate values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Number of values.
    pub n: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator); `None` for a single value, whose
    /// spread cannot be estimated (not 0: that would claim a perfectly repeatable result).
    pub std: Option<f64>,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// Mean, sample standard deviation and range of `values`; `None` when empty.
pub fn spread(values: &[f64]) -> Option<Spread> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let std = (n > 1)
        .then(|| (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    Some(Spread {
        n,
        mean,
        std,
        min,
        max,
    })
}

/// A two-sided interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Interval {
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
}

impl Interval {
    /// Whether `x` lies inside the interval (bounds included).
    pub fn contains(&self, x: f64) -> bool {
        self.lo <= x && x <= self.hi
    }
}

/// Percentile bootstrap interval of the mean of `values` at `level` (e.g. 0.95): the mean of
/// [`BOOTSTRAP_RESAMPLES`] resamples with replacement, drawn with the fixed
/// [`BOOTSTRAP_SEED`]; the bounds are the empirical (1 - level)/2 and (1 + level)/2 quantiles
/// (the smallest resample mean whose empirical CDF reaches the probability). `None` with fewer
/// than two values: every resample of one value is that value, and the zero-width "interval"
/// would claim a certainty one measurement cannot give.
pub fn bootstrap_mean_interval(values: &[f64], level: f64) -> Option<Interval> {
    let n = values.len();
    if n < 2 || !(0.0..1.0).contains(&level) {
        return None;
    }
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let sum: f64 = (0..n).map(|_| values[rng.below(n as u64) as usize]).sum();
            sum / n as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let quantile = |p: f64| {
        // The smallest order statistic with at least p of the resamples at or below it.
        let rank = (p * BOOTSTRAP_RESAMPLES as f64).ceil().max(1.0) as usize;
        means[rank.min(BOOTSTRAP_RESAMPLES) - 1]
    };
    Some(Interval {
        lo: quantile((1.0 - level) / 2.0),
        hi: quantile((1.0 + level) / 2.0),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn spread_of_replicates() {
        let s = spread(&[1.0, 2.0, 3.0, 6.0]).unwrap();
        assert_eq!((s.n, s.mean, s.min, s.max), (4, 3.0, 1.0, 6.0));
        // Squared deviations 4 + 1 + 0 + 9 = 14 over n - 1 = 3.
        assert!((s.std.unwrap() - (14.0f64 / 3.0).sqrt()).abs() < 1e-12);
        // One value has a mean but no spread.
        let one = spread(&[2.5]).unwrap();
        assert_eq!((one.n, one.mean, one.std), (1, 2.5, None));
        assert!(spread(&[]).is_none());
    }

    #[test]
    fn bootstrap_interval_matches_the_hand_computed_distribution() {
        // Resampling [0, 0, 0, 4]: the mean is k, where k ~ Binomial(4, 1/4) counts the 4s drawn.
        // CDF: P(k<=0) = 81/256 = 0.316, P(k<=1) = 189/256 = 0.738, P(k<=2) = 243/256 = 0.949,
        // P(k<=3) = 255/256 = 0.996. The 2.5% quantile is 0 and the 97.5% quantile is 3 (the
        // CDF first reaches 0.975 at k = 3), far enough from the boundaries for 10k resamples.
        let iv = bootstrap_mean_interval(&[0.0, 0.0, 0.0, 4.0], 0.95).unwrap();
        assert_eq!(iv, Interval { lo: 0.0, hi: 3.0 });
        assert!(iv.contains(0.0) && !iv.contains(3.5));
        // One value: no interval (every resample would be that value).
        assert_eq!(bootstrap_mean_interval(&[0.25], 0.95), None);
        // Two values [1, 3]: means 1, 2, 3 with probabilities 1/4, 1/2, 1/4 -> [1, 3].
        let two = bootstrap_mean_interval(&[1.0, 3.0], 0.95).unwrap();
        assert_eq!(two, Interval { lo: 1.0, hi: 3.0 });
        // Deterministic: the fixed seed gives the same interval every time.
        let values = [0.3, -0.1, 0.7, 0.2, 0.05];
        assert_eq!(
            bootstrap_mean_interval(&values, 0.95),
            bootstrap_mean_interval(&values, 0.95)
        );
        assert!(bootstrap_mean_interval(&[], 0.95).is_none());
    }
}
