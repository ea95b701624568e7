//! The failover controller's Prometheus metrics (`thumbup_operator_*`),
//! registered in the default registry that the admin endpoint serves.

use std::sync::LazyLock;

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec,
};

pub(super) static EPOCH: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("thumbup_operator_failover_epoch", "epoch of the DB route").expect("metric registers once")
});
pub(super) static FLIPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_operator_failovers_total",
        "route flips by kind (Failover, Switchover)",
        &["kind"]
    )
    .expect("metric registers once")
});
pub(super) static BLOCKED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_operator_failover_blocked_total",
        "failovers due but not done, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});
pub(super) static PROBE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_operator_db_probe_failures_total",
        "failed DB probes by datacenter",
        &["datacenter"]
    )
    .expect("metric registers once")
});
pub(super) static STANDBY_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_operator_standby_lag_seconds",
        "Seconds_Behind_Master of each replicating DB at its last probe; -1: not replicating (its SQL or IO \
         thread stopped, or no lag reported)",
        &["datacenter"]
    )
    .expect("metric registers once")
});
pub(super) static REPLAYED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "thumbup_operator_failover_replayed_transitions_total",
        "writes that a replay applied to a promoted DB (they had not replicated)"
    )
    .expect("metric registers once")
});
