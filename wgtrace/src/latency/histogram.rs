//! Latency histograms: hdrhistogram in microseconds (1 µs to 60 s, 3
//! significant digits), summarised as percentiles and drawn as log2 bars.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

const LOWEST_US: u64 = 1;
const HIGHEST_US: u64 = 60_000_000;
const SIGNIFICANT_DIGITS: u8 = 3;

#[derive(Clone)]
pub struct LatencyHistogram(Histogram<u64>);

/// The JSON form: percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self(Histogram::new_with_bounds(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS).expect("valid histogram bounds"))
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LatencyHistogram({:?})", self.summary())
    }
}

impl LatencyHistogram {
    /// Records a sample in nanoseconds; values outside 1 µs..60 s are clamped
    /// so a clock oddity never loses the sample silently.
    pub fn record_ns(&mut self, nanoseconds: u64) {
        let micros = (nanoseconds / 1000).clamp(LOWEST_US, HIGHEST_US);
        self.0.saturating_record(micros);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn summary(&self) -> Summary {
        if self.0.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.0.len(),
            p50: self.0.value_at_quantile(0.50),
            p90: self.0.value_at_quantile(0.90),
            p99: self.0.value_at_quantile(0.99),
            max: self.0.max(),
        }
    }

    /// Samples of at most `us` microseconds (cumulative, as Prometheus
    /// buckets count them). Exact up to hdrhistogram's 3-digit resolution.
    pub fn count_at_most(&self, us: u64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.count_between(0, us.clamp(LOWEST_US, HIGHEST_US))
    }

    /// Sum of all samples in microseconds (from the histogram's mean, so
    /// within its 3-digit resolution).
    pub fn sum_us(&self) -> f64 {
        self.0.mean() * self.0.len() as f64
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// bcc-style log2 histogram of microseconds, from the first to the last
    /// non-empty bucket.
    pub fn render_log2(&self, indent: &str) -> String {
        const WIDTH: u64 = 40;
        let mut buckets = Vec::new();
        for power in 0..27u32 {
            let low = if power == 0 { 0 } else { 1u64 << power };
            let high = (1u64 << (power + 1)) - 1;
            buckets.push((low, high, self.0.count_between(low.max(LOWEST_US), high)));
        }
        let (Some(first), Some(last)) = (buckets.iter().position(|b| b.2 > 0), buckets.iter().rposition(|b| b.2 > 0))
        else {
            return String::new();
        };
        let peak = buckets.iter().map(|b| b.2).max().unwrap_or(1).max(1);
        let mut out = format!("{indent}{:>10} {:<14}: {:<8} distribution\n", "usecs", "", "count");
        for (low, high, count) in &buckets[first..=last] {
            let bar = "*".repeat((count * WIDTH / peak) as usize);
            let _ = writeln!(out, "{indent}{low:>10} -> {high:<10} : {count:<8} |{bar:<40}|");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_known_samples() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=100u64 {
            h.record_ns(ms * 1_000_000);
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        // 3 significant digits: within 0.1% of the exact value.
        let near = |got: u64, want: u64| (got as f64 - want as f64).abs() <= want as f64 * 0.001 + 1.0;
        assert!(near(s.p50, 50_000), "{s:?}");
        assert!(near(s.p90, 90_000), "{s:?}");
        assert!(near(s.p99, 99_000), "{s:?}");
        assert!(near(s.max, 100_000), "{s:?}");
    }

    #[test]
    fn cumulative_counts_and_sum() {
        let mut h = LatencyHistogram::default();
        for us in [100, 200, 40_000, 41_000] {
            h.record_ns(us * 1000);
        }
        assert_eq!(h.count_at_most(99), 0);
        assert_eq!(h.count_at_most(250), 2);
        assert_eq!(h.count_at_most(50_000), 4);
        assert!((h.sum_us() - 81_300.0).abs() < 81_300.0 * 0.001, "{}", h.sum_us());
        assert_eq!(LatencyHistogram::default().count_at_most(1_000), 0);
    }

    #[test]
    fn empty_and_out_of_range() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.summary(), Summary::default());
        assert_eq!(h.render_log2(""), "");
        h.record_ns(10); // below 1 µs
        h.record_ns(3_600_000_000_000); // an hour
        let s = h.summary();
        assert_eq!(s.count, 2);
        assert_eq!(s.p50, 1);
        assert!(s.max >= 59_000_000);
    }

    #[test]
    fn log2_rendering_shows_the_mode() {
        let mut h = LatencyHistogram::default();
        for _ in 0..30 {
            h.record_ns(40_000_000); // 40 ms
        }
        h.record_ns(500_000); // 0.5 ms
        let text = h.render_log2("");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("usecs") && lines[0].contains("distribution"));
        let mode = lines.iter().find(|l| l.contains("32768 -> 65535")).expect("40 ms bucket");
        assert!(mode.contains(&format!("|{}|", "*".repeat(40))), "{text}");
        let low = lines.iter().find(|l| l.contains("256 -> 511")).expect("0.5 ms bucket");
        assert!(low.contains(": 1 "), "{text}");
        assert_eq!(lines.len(), 1 + (15 - 8 + 1), "rows from 2^8 to 2^15 only:\n{text}");
    }
}
