//! Prometheus histogram buckets from wgtrace's latency histograms.
//!
//! Bounds run 1-2.5-5 per decade from 50 µs to 10 s: fine enough to tell a
//! direct tunnel (tens to hundreds of µs) from one riding another (tens of
//! ms), wide enough for handshake retries. Counts are read from the
//! hdrhistogram (3 significant digits), which accumulates from the start of
//! the run, so the cumulative bucket counts only grow, as Prometheus expects.

use crate::latency::LatencyHistogram;

/// Upper bounds of the finite buckets, in microseconds.
const BOUNDS_US: [u64; 18] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 25_000_000,
];

/// Upper bounds of the finite buckets, in seconds.
pub fn bounds_seconds() -> impl Iterator<Item = f64> {
    BOUNDS_US.iter().map(|us| *us as f64 / 1e6)
}

/// Samples of one or more latency histograms, cumulative per bound.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets {
    at_most: [u64; BOUNDS_US.len()],
    count: u64,
    sum_us: f64,
}

impl Buckets {
    pub fn from_histogram(histogram: &LatencyHistogram) -> Self {
        let mut buckets = Self::default();
        buckets.add(histogram);
        buckets
    }

    /// Adds a histogram's samples (merging peers of a tunnel).
    pub fn add(&mut self, histogram: &LatencyHistogram) {
        if histogram.is_empty() {
            return;
        }
        for (slot, bound) in self.at_most.iter_mut().zip(BOUNDS_US) {
            *slot += histogram.count_at_most(bound);
        }
        self.count += histogram.summary().count;
        self.sum_us += histogram.sum_us();
    }

    pub fn merge(&mut self, other: &Buckets) {
        for (mine, theirs) in self.at_most.iter_mut().zip(other.at_most) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum_us += other.sum_us;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us / 1e6
    }

    /// `(upper bound in seconds, samples in this bucket only)`, ending with
    /// `+Inf`: the form `prometheus_client` encodes (it accumulates them into
    /// the cumulative `_bucket` series).
    pub fn per_bucket(&self) -> Vec<(f64, u64)> {
        let mut previous = 0;
        let mut out: Vec<(f64, u64)> = bounds_seconds()
            .zip(self.at_most)
            .map(|(le, at_most)| {
                let in_bucket = at_most.saturating_sub(previous);
                previous = at_most;
                (le, in_bucket)
            })
            .collect();
        out.push((f64::INFINITY, self.count.saturating_sub(previous)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(samples_us: &[u64]) -> LatencyHistogram {
        let mut h = LatencyHistogram::default();
        for us in samples_us {
            h.record_ns(us * 1000);
        }
        h
    }

    #[test]
    fn counts_land_in_their_buckets() {
        // 10 and 50 µs in le 50 µs, 51 µs in le 100 µs, 41 ms in le 50 ms,
        // 30 s beyond the last finite bound.
        let b = Buckets::from_histogram(&histogram(&[10, 50, 51, 41_000, 41_000, 30_000_000]));
        assert_eq!(b.count(), 6);
        let buckets = b.per_bucket();
        assert_eq!(buckets.len(), BOUNDS_US.len() + 1);
        assert_eq!(buckets[0], (0.00005, 2));
        assert_eq!(buckets[1], (0.0001, 1));
        let at = |le: f64| buckets.iter().find(|(bound, _)| (*bound - le).abs() < 1e-9).unwrap().1;
        assert_eq!(at(0.05), 2);
        assert_eq!(at(0.025), 0);
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert_eq!(buckets.iter().map(|b| b.1).sum::<u64>(), 6);
    }

    #[test]
    fn sum_follows_the_samples() {
        let b = Buckets::from_histogram(&histogram(&[41_000; 10]));
        let mean = b.sum_seconds() / b.count() as f64;
        assert!((0.0409..=0.0411).contains(&mean), "{mean}");
        assert_eq!(Buckets::default().sum_seconds(), 0.0);
        assert_eq!(Buckets::from_histogram(&LatencyHistogram::default()), Buckets::default());
    }

    #[test]
    fn merging_adds_counts() {
        let mut a = Buckets::from_histogram(&histogram(&[100, 200]));
        a.merge(&Buckets::from_histogram(&histogram(&[100])));
        assert_eq!(a.count(), 3);
        let mut direct = Buckets::default();
        direct.add(&histogram(&[100, 200]));
        direct.add(&histogram(&[100]));
        assert_eq!(a, direct);
    }
}
