//! Zipf sampler over items `1..=n`: item k is drawn with probability
//! proportional to `1 / k^s`. The CDF is computed once, a draw is a binary
//! search, so sampling costs O(log n) and no allocation.

use rand::Rng;

/// A Zipf(s) distribution over `1..=n`; `s = 0` is uniform.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    /// The distribution over `n` items (at least one) with skew `s` (>= 0).
    pub fn new(n: usize, s: f64) -> Zipf {
        let n = n.max(1);
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// The probability of item `k` (1-based).
    pub fn probability(&self, k: usize) -> f64 {
        let hi = self.cdf[k - 1];
        if k == 1 { hi } else { hi - self.cdf[k - 2] }
    }

    /// Draws an item in `1..=n`.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> usize {
        let u: f64 = rng.random();
        // The first index whose cumulative probability exceeds u.
        let i = self.cdf.partition_point(|&c| c <= u);
        i.min(self.cdf.len() - 1) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn zipf_draws_the_top_item_as_often_as_theory_says() {
        let z = Zipf::new(1000, 1.1);
        let h: f64 = (1..=1000).map(|k| 1.0 / (k as f64).powf(1.1)).sum();
        let expected = 1.0 / h;
        assert!((z.probability(1) - expected).abs() < 1e-12);
        let mut rng = StdRng::seed_from_u64(7);
        let draws = 200_000;
        let mut ones = 0;
        let mut twos = 0;
        for _ in 0..draws {
            match z.sample(&mut rng) {
                1 => ones += 1,
                2 => twos += 1,
                _ => {}
            }
        }
        let share = ones as f64 / draws as f64;
        assert!((share - expected).abs() < 0.01, "item 1 share {share}, theory {expected}");
        // Item 1 is 2^1.1 times as likely as item 2.
        let ratio = ones as f64 / twos as f64;
        assert!((ratio - 2f64.powf(1.1)).abs() < 0.15, "ratio {ratio}");
    }

    #[test]
    fn zipf_with_zero_skew_is_uniform_and_stays_in_range() {
        let z = Zipf::new(10, 0.0);
        assert!((z.probability(1) - 0.1).abs() < 1e-12);
        assert!((z.probability(10) - 0.1).abs() < 1e-12);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..10_000 {
            let k = z.sample(&mut rng);
            assert!((1..=10).contains(&k));
        }
    }
}
