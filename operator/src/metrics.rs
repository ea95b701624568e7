//! Prometheus metrics of the operator (`thumbup_operator_*`), registered in
//! the default registry that the admin endpoint serves.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};

static RECONCILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c =
        IntCounterVec::new(Opts::new("thumbup_operator_reconciles_total", "Reconcile passes by result."), &["result"])
            .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new("thumbup_operator_reconcile_errors_total", "Failed reconcile passes by reason."),
        &["reason"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});

static DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    let h = Histogram::with_opts(
        HistogramOpts::new("thumbup_operator_reconcile_duration_seconds", "Duration of a reconcile pass.")
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
    )
    .expect("valid metric");
    prometheus::register(Box::new(h.clone())).expect("registered once");
    h
});

static LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    let g = IntGauge::new("thumbup_operator_leader", "1 while this replica holds the leader Lease.").expect("valid");
    prometheus::register(Box::new(g.clone())).expect("registered once");
    g
});

/// Handle to the operator's metrics.
#[derive(Clone, Default)]
pub struct Metrics;

impl Metrics {
    /// Records one reconcile pass: its duration and, when it failed, why.
    pub fn observe(&self, took: Duration, error: Option<&'static str>) {
        DURATION.observe(took.as_secs_f64());
        match error {
            None => RECONCILES.with_label_values(&["ok"]).inc(),
            Some(reason) => {
                RECONCILES.with_label_values(&["error"]).inc();
                ERRORS.with_label_values(&[reason]).inc();
            }
        }
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        LEADER.set(leading as i64);
    }

    /// Failed passes with `reason` so far (for tests).
    pub fn errors(&self, reason: &str) -> u64 {
        ERRORS.with_label_values(&[reason]).get()
    }
}
