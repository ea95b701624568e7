//! Prometheus metrics of the operator (`thumbup_operator_*`), registered in
//! the default registry that the admin endpoint serves. The failover
//! controller's are in `failover::metrics`, registered the same way.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    Histogram, IntCounterVec, IntGauge, register_histogram, register_int_counter_vec, register_int_gauge,
};

static RECONCILES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("thumbup_operator_reconciles_total", "Reconcile passes by result.", &["result"])
        .expect("metric registers once")
});

static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_operator_reconcile_errors_total",
        "Failed reconcile passes by reason.",
        &["reason"]
    )
    .expect("metric registers once")
});

static DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "thumbup_operator_reconcile_duration_seconds",
        "Duration of a reconcile pass.",
        vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
    )
    .expect("metric registers once")
});

static LEADER: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("thumbup_operator_leader", "1 while this replica holds the leader Lease.")
        .expect("metric registers once")
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
