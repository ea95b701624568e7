//! The proxy's Prometheus metrics, in a registry of their own (so that
//! several proxies can live in one test process).

use prometheus::{
    IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry, TextEncoder, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_vec_with_registry, register_int_gauge_with_registry,
};

/// `direction` of bytes read from a client and written to the DB.
pub const CLIENT_TO_DB: &str = "client_to_db";
/// `direction` of bytes read from the DB and written to a client.
pub const DB_TO_CLIENT: &str = "db_to_client";
/// `reason` of a connection closed because no route is held yet.
pub const REFUSED_NO_ROUTE: &str = "no_route";
/// `reason` of a connection closed because `--max-sessions` are open.
pub const REFUSED_MAX_SESSIONS: &str = "max_sessions";
/// `refused_total` reason: a Redis connection under a route that does not
/// move the Redis tier.
pub const REFUSED_NO_REDIS_ROUTE: &str = "no_redis_route";
/// `refused_total` reason: a connection to a local-read listener under a
/// route that names no server of that tier for the proxy's datacenter.
pub const REFUSED_NO_LOCAL_ROUTE: &str = "no_local_route";

/// Every `thumbup_db_proxy_*` metric.
pub struct Metrics {
    registry: Registry,
    /// Open client sessions, by the datacenter they were opened to.
    pub sessions: IntGaugeVec,
    /// Client sessions opened, by datacenter.
    pub sessions_total: IntCounterVec,
    /// Bytes forwarded, by direction.
    pub bytes_total: IntCounterVec,
    /// The epoch of the held route (0 before any).
    pub route_epoch: IntGauge,
    /// Newer routes adopted over a held one.
    pub flips_total: IntCounter,
    /// Sessions closed by the proxy because a newer epoch was adopted.
    pub sessions_killed_total: IntCounter,
    /// Offered routes refused, by reason (`stale`, `conflict`, `invalid`,
    /// `unauthenticated`: a `PUT /route` without the route token).
    pub route_rejected_total: IntCounterVec,
    /// Failed dials of a datacenter's DB (refused or timed out).
    pub connect_errors_total: IntCounterVec,
    /// Client connections closed on arrival, by reason (`no_route`,
    /// `max_sessions`, `no_redis_route`, `no_local_route`).
    pub refused_total: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics; the label values known in advance
    /// start at zero, so that a dashboard sees them before they first move.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        thumbup_core::admin::register_build_info(&registry, "thumbup-db-proxy", env!("CARGO_PKG_VERSION"))?;
        let sessions = register_int_gauge_vec_with_registry!(
            "thumbup_db_proxy_sessions",
            "Open client sessions, by datacenter.",
            &["datacenter"],
            registry
        )?;
        let sessions_total = register_int_counter_vec_with_registry!(
            "thumbup_db_proxy_sessions_total",
            "Client sessions opened, by datacenter.",
            &["datacenter"],
            registry
        )?;
        let bytes_total = register_int_counter_vec_with_registry!(
            "thumbup_db_proxy_bytes_total",
            "Bytes forwarded, by direction.",
            &["direction"],
            registry
        )?;
        let route_epoch = register_int_gauge_with_registry!(
            "thumbup_db_proxy_route_epoch",
            "Epoch of the held route (0: none).",
            registry
        )?;
        let flips_total = register_int_counter_with_registry!(
            "thumbup_db_proxy_flips_total",
            "Newer routes adopted over a held one.",
            registry
        )?;
        let sessions_killed_total = register_int_counter_with_registry!(
            "thumbup_db_proxy_sessions_killed_total",
            "Sessions closed because a newer epoch was adopted.",
            registry
        )?;
        let route_rejected_total = register_int_counter_vec_with_registry!(
            "thumbup_db_proxy_route_rejected_total",
            "Offered routes refused, by reason.",
            &["reason"],
            registry
        )?;
        let connect_errors_total = register_int_counter_vec_with_registry!(
            "thumbup_db_proxy_connect_errors_total",
            "Failed dials of a datacenter's DB.",
            &["datacenter"],
            registry
        )?;
        let refused_total = register_int_counter_vec_with_registry!(
            "thumbup_db_proxy_refused_total",
            "Client connections closed on arrival, by reason.",
            &["reason"],
            registry
        )?;
        for direction in [CLIENT_TO_DB, DB_TO_CLIENT] {
            bytes_total.with_label_values(&[direction]);
        }
        for reason in ["stale", "conflict", "invalid", "unauthenticated"] {
            route_rejected_total.with_label_values(&[reason]);
        }
        for reason in [REFUSED_NO_ROUTE, REFUSED_MAX_SESSIONS, REFUSED_NO_REDIS_ROUTE, REFUSED_NO_LOCAL_ROUTE] {
            refused_total.with_label_values(&[reason]);
        }
        Ok(Metrics {
            registry,
            sessions,
            sessions_total,
            bytes_total,
            route_epoch,
            flips_total,
            sessions_killed_total,
            route_rejected_total,
            connect_errors_total,
            refused_total,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        TextEncoder::new().encode_to_string(&self.registry.gather())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_for_the_proxy_and_the_fixed_labels_start_at_zero() {
        let m = Metrics::new().unwrap();
        m.sessions.with_label_values(&["dc-a"]).set(0);
        m.sessions_total.with_label_values(&["dc-a"]);
        m.connect_errors_total.with_label_values(&["dc-a"]);
        let text = m.render().unwrap();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("thumbup_db_proxy_") || line.starts_with("thumbup_build_info{"), "{line}");
        }
        let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
        assert!(
            text.lines().any(|l| l.starts_with("thumbup_build_info{")
                && l.contains("binary=\"thumbup-db-proxy\"")
                && l.contains(&version)
                && l.ends_with("} 1")),
            "the proxy's build info: {text}"
        );
        for want in [
            "thumbup_db_proxy_sessions{datacenter=\"dc-a\"} 0",
            "thumbup_db_proxy_sessions_total{datacenter=\"dc-a\"} 0",
            "thumbup_db_proxy_bytes_total{direction=\"client_to_db\"} 0",
            "thumbup_db_proxy_bytes_total{direction=\"db_to_client\"} 0",
            "thumbup_db_proxy_route_epoch 0",
            "thumbup_db_proxy_flips_total 0",
            "thumbup_db_proxy_sessions_killed_total 0",
            "thumbup_db_proxy_route_rejected_total{reason=\"stale\"} 0",
            "thumbup_db_proxy_route_rejected_total{reason=\"conflict\"} 0",
            "thumbup_db_proxy_route_rejected_total{reason=\"invalid\"} 0",
            "thumbup_db_proxy_route_rejected_total{reason=\"unauthenticated\"} 0",
            "thumbup_db_proxy_connect_errors_total{datacenter=\"dc-a\"} 0",
            "thumbup_db_proxy_refused_total{reason=\"no_route\"} 0",
            "thumbup_db_proxy_refused_total{reason=\"max_sessions\"} 0",
            "thumbup_db_proxy_refused_total{reason=\"no_redis_route\"} 0",
            "thumbup_db_proxy_refused_total{reason=\"no_local_route\"} 0",
        ] {
            assert!(text.lines().any(|l| l == want), "missing {want:?} in\n{text}");
        }
    }
}
