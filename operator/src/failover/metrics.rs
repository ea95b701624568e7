//! The failover controller's Prometheus metrics (`thumbup_operator_*`),
//! registered in the default registry that the admin endpoint serves.

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};

pub(super) static EPOCH: LazyLock<IntGauge> = LazyLock::new(|| {
    let g = IntGauge::new("thumbup_operator_failover_epoch", "epoch of the DB route").expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("registered once");
    g
});
pub(super) static FLIPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_failovers_total", "route flips by kind (Failover, Switchover)"),
        &["kind"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
pub(super) static BLOCKED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_failover_blocked_total", "failovers due but not done, by reason"),
        &["reason"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
pub(super) static PROBE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_db_probe_failures_total", "failed DB probes by datacenter"),
        &["datacenter"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
pub(super) static STANDBY_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        prometheus::Opts::new(
            "thumbup_operator_standby_lag_seconds",
            "Seconds_Behind_Master of each replicating DB at its last probe; -1: not replicating (its SQL or IO \
             thread stopped, or no lag reported)",
        ),
        &["datacenter"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("registered once");
    g
});
pub(super) static REPLAYED: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new(
        "thumbup_operator_failover_replayed_transitions_total",
        "writes that a replay applied to a promoted DB (they had not replicated)",
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
