//! Latency samples and the figures derived from them.

use std::time::Duration;

/// The percentiles every scenario reports.
pub const PERCENTILES: [(f64, &str); 4] = [(0.50, "p50"), (0.90, "p90"), (0.99, "p99"), (0.999, "p999")];

/// Latencies of one measurement, in microseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    micros: Vec<u64>,
    sorted: bool,
}

impl Samples {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        self.micros.push(d.as_micros() as u64);
        self.sorted = false;
    }

    /// Adds another task's samples.
    pub fn merge(&mut self, other: Samples) {
        self.micros.extend(other.micros);
        self.sorted = false;
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.micros.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.micros.is_empty()
    }

    /// The `q` quantile (nearest rank) in milliseconds; 0 when empty.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.micros.is_empty() {
            return 0.0;
        }
        if !self.sorted {
            self.micros.sort_unstable();
            self.sorted = true;
        }
        let n = self.micros.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.micros[rank - 1] as f64 / 1000.0
    }

    /// p50, p90, p99, p999 in milliseconds.
    pub fn percentiles_ms(&mut self) -> [f64; 4] {
        PERCENTILES.map(|(q, _)| self.quantile_ms(q))
    }
}

/// The median of `xs` (mean of the middle two for an even count); 0 when empty.
pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut s = Samples::default();
        for ms in (1..=1000).rev() {
            s.record(Duration::from_millis(ms));
        }
        assert_eq!(s.percentiles_ms(), [500.0, 900.0, 990.0, 999.0]);
        assert_eq!(s.quantile_ms(1.0), 1000.0);
        assert_eq!(s.quantile_ms(0.0), 1.0);
    }

    #[test]
    fn percentiles_of_nothing_are_zero_and_merge_adds_samples() {
        let mut s = Samples::default();
        assert_eq!(s.quantile_ms(0.99), 0.0);
        let mut t = Samples::default();
        t.record(Duration::from_micros(1500));
        s.merge(t);
        assert_eq!(s.len(), 1);
        assert_eq!(s.quantile_ms(0.5), 1.5);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
