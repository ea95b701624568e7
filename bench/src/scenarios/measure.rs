//! Figures of one measurement across runs, and the progress line of a run.

use crate::load::Measurement;
use crate::report::Latency;
use crate::stats::median;

pub(super) fn progress(what: &str, run: usize, m: &Measurement) {
    eprintln!(
        "thumbup-bench: {what} run {}: {:.0} req/s, {:.0} items/s, p99 {:.3} ms, {} errors{}",
        run + 1,
        m.rate(),
        m.item_rate(),
        m.samples.clone().quantile_ms(0.99),
        m.errors,
        m.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
}

/// Collects the percentiles of one measurement across runs.
#[derive(Default)]
pub(super) struct Percentiles {
    runs: Vec<[f64; 4]>,
}

impl Percentiles {
    pub(super) fn push(&mut self, m: &mut Measurement) {
        self.runs.push(m.samples.percentiles_ms());
    }

    pub(super) fn at(&self, i: usize) -> Vec<f64> {
        self.runs.iter().map(|p| p[i]).collect()
    }

    pub(super) fn latency(&self, label: &str) -> Latency {
        Latency { label: label.into(), ms: [0, 1, 2, 3].map(|i| median(&self.at(i))) }
    }
}
