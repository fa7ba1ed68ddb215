//! Latency recording: a thin wrapper over HdrHistogram so every subscriber records locally
//! (no shared lock on the hot path) and the coordinator merges them into p50/p99/p99.9/max.

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::{BenchError, Result};

/// Highest latency we resolve; slower deliveries are clamped to it (and still counted).
const MAX_TRACKABLE_US: u64 = 60_000_000;

/// Latency histogram in microseconds.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    inner: Histogram<u32>,
}

/// The percentiles the reports print, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest sample (clamped at 60 s).
    pub max_us: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl LatencyHistogram {
    /// A histogram with `sigfig` significant decimal digits (2 or 3: 3 costs ~8x the memory,
    /// which matters with a thousand subscribers each holding one).
    pub fn new(sigfig: u8) -> Result<Self> {
        let inner = Histogram::new_with_bounds(1, MAX_TRACKABLE_US, sigfig).map_err(|e| {
            BenchError::Config(format!(
                "latency histogram with {sigfig} significant figures: {e}"
            ))
        })?;
        Ok(LatencyHistogram { inner })
    }

    /// Records one latency in nanoseconds (rounded to microseconds, clamped to the range).
    pub fn record_ns(&mut self, ns: u64) {
        let us = (ns / 1_000).clamp(1, MAX_TRACKABLE_US);
        self.inner.saturating_record(us);
    }

    /// Adds all samples of `other` into `self`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both sides share bounds, so `add` cannot fail on range; saturation is harmless.
        let _ = self.inner.add(&other.inner);
    }

    /// Number of samples recorded.
    pub fn len(&self) -> u64 {
        self.inner.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    /// Value at quantile `q` (0.0..=1.0) in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.inner.is_empty() {
            return 0;
        }
        self.inner.value_at_quantile(q)
    }

    /// The percentiles the reports show.
    pub fn summary(&self) -> LatencySummary {
        if self.inner.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.inner.len(),
            p50_us: self.quantile_us(0.50),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: self.inner.max(),
            mean_us: self.inner.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(actual: u64, expected: u64, tolerance: f64) -> bool {
        (actual as f64 - expected as f64).abs() <= expected as f64 * tolerance
    }

    #[test]
    fn uniform_samples_give_expected_percentiles() {
        let mut h = LatencyHistogram::new(3).expect("histogram");
        for us in 1..=10_000u64 {
            h.record_ns(us * 1_000);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert!(within(s.p50_us, 5_000, 0.002), "p50 {}", s.p50_us);
        assert!(within(s.p99_us, 9_900, 0.002), "p99 {}", s.p99_us);
        assert!(within(s.p999_us, 9_990, 0.002), "p99.9 {}", s.p999_us);
        assert!(within(s.max_us, 10_000, 0.002), "max {}", s.max_us);
    }

    #[test]
    fn tail_is_not_hidden_by_the_median() {
        let mut h = LatencyHistogram::new(2).expect("histogram");
        for _ in 0..990 {
            h.record_ns(100_000);
        }
        for _ in 0..10 {
            h.record_ns(50_000_000);
        }
        let s = h.summary();
        assert!(within(s.p50_us, 100, 0.01));
        assert!(within(s.p999_us, 50_000, 0.01), "p99.9 {}", s.p999_us);
    }

    #[test]
    fn merge_adds_counts_and_out_of_range_values_are_clamped() {
        let mut a = LatencyHistogram::new(2).expect("histogram");
        let mut b = LatencyHistogram::new(2).expect("histogram");
        a.record_ns(0);
        b.record_ns(u64::MAX);
        a.merge(&b);
        assert_eq!(a.len(), 2);
        assert_eq!(a.quantile_us(0.0), 1);
        assert!(a.summary().max_us >= MAX_TRACKABLE_US * 99 / 100);
    }

    #[test]
    fn empty_histogram_reports_zeroes() {
        assert_eq!(
            LatencyHistogram::new(3).expect("histogram").summary(),
            LatencySummary::default()
        );
    }
}
