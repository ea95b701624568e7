//! Prometheus metrics of the service, registered in the default registry
//! that the admin endpoint serves.

use std::sync::LazyLock;

use prometheus::{
    HistogramVec, IntCounterVec, IntGaugeVec, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
};

/// Requests by RPC, tenant and gRPC code. The tenant is the one the
/// request authenticated as, or [`crate::api::UNAUTHENTICATED_TENANT`]: never a name
/// taken from an unauthenticated request, so that callers cannot add
/// label values.
pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_requests_total",
        "gRPC requests by RPC, authenticated tenant (_unauthenticated: none) and status code",
        &["rpc", "tenant", "code"]
    )
    .expect("metric registers once")
});

/// Request latency by RPC and tenant (labelled as [`REQUESTS`]).
pub static LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "thumbup_service_request_duration_seconds",
        "gRPC request latency by RPC and authenticated tenant (_unauthenticated: none)",
        &["rpc", "tenant"],
        vec![0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
    )
    .expect("metric registers once")
});

/// Users who were not cached when they wrote, by how the service learnt
/// their states: `db` (one DB read to warm the user's cache) or
/// `proved_new` (an acknowledged write of a user whom the shard's
/// newest-user bound proved new, with no DB read).
pub static USER_WARMS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_user_warms_total",
        "users not cached when they wrote, by how their states were learnt",
        &["tenant", "how"]
    )
    .expect("metric registers once")
});

/// Cache lookups by cache and result (hit, miss).
pub static CACHE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_cache_lookups_total",
        "cache lookups by cache and result",
        &["cache", "result"]
    )
    .expect("metric registers once")
});

/// Keys in the local hot-key cache's hot set, per tenant (sampled on reads).
pub static HOT_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("thumbup_service_hot_keys", "items in the local hot-key cache's hot set", &["tenant"])
        .expect("metric registers once")
});

/// Users the per-user write limiter tracks, per tenant (after each sweep).
pub static LIMITER_USERS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_service_limiter_users",
        "users the per-user write limiter tracks (seen in the last two seconds or so)",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// Writes that took the synchronous DB path because Redis was unreachable.
pub static DEGRADED_WRITES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_degraded_writes_total",
        "writes run as a synchronous DB transaction while Redis was unreachable",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// Transitions that waited for their replicas (`redis.replica_acks`), by
/// outcome (`sent`, `covered`, `missed`, `replaced`, `failed`).
pub static REPLICA_WAITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_replica_waits_total",
        "transitions that waited for redis.replica_acks replicas before the reply (outcome: sent: this write's WAIT was sent; covered: another write's WAIT covered it; missed: fewer replicas confirmed within redis.replica_timeout_ms, answered UNAVAILABLE; replaced: the cluster connection was replaced between the write and its WAIT, answered UNAVAILABLE; failed: the WAIT failed; solo: not waited for, the failover controller says the Redis stands alone)",
        &["tenant", "outcome"]
    )
    .expect("metric registers once")
});

/// Writes answered UNAVAILABLE because their record's newest acknowledged
/// state could not be known, by reason (`unknown_outcome`: the Redis call
/// failed midway and may have acted; every other reason wrote nothing).
pub static WRITES_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_writes_refused_total",
        "writes answered UNAVAILABLE because the record's newest state could not be known (unknown_outcome: the redis call failed midway; other reasons wrote nothing)",
        &["tenant", "reason"]
    )
    .expect("metric registers once")
});

/// 1 while the DB path decides a tenant's writes in this process.
pub static DB_PATH_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_service_db_path_open",
        "1 while the tenant's writes are decided by the synchronous DB path in this process",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// The tenant's write-fence epoch as last read.
pub static FENCE_EPOCH: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_service_write_fence_epoch",
        "the tenant's write-fence epoch (grows each time the DB path is asked for)",
        &["tenant"]
    )
    .expect("metric registers once")
});

/// 1 while writes of a tenant do not go through Redis in this process.
pub static REDIS_DOWN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!("thumbup_service_redis_down", "1 while the tenant's Redis is considered down", &["tenant"])
        .expect("metric registers once")
});

/// Config reloads by result.
pub static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("thumbup_service_config_reloads_total", "tenant config reloads by result", &["result"])
        .expect("metric registers once")
});

/// Requests the server refused before any tenant saw them, or answered
/// at its deadline, by reason (`metadata_too_large`, `write_timeout`).
pub static SERVER_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_server_refused_total",
        "requests refused by the server's own limits, by reason",
        &["reason"]
    )
    .expect("metric registers once")
});

/// Reads that this datacenter's servers (`local_reads`) failed, so that
/// reads went to the active datacenter's for a moment.
pub static LOCAL_READ_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "thumbup_service_local_read_failures_total",
        "reads that this datacenter's Redis or DB (local_reads) failed, by tier; reads then go to the active datacenter's for 1 s",
        &["tenant", "tier"]
    )
    .expect("metric registers once")
});
