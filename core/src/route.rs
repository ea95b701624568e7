//! The DB route: which datacenter's DB takes the tenants' sessions, under
//! which epoch.
//!
//! The operator's failover controller owns the route and publishes it as a
//! YAML document: the key [`ROUTE_KEY`] of the ConfigMap `thumbup-route` in
//! a cluster, a file out of a cluster. Every db-proxy follows it. The epoch
//! only grows: a proxy adopts a route with a newer epoch (and drops every
//! session it opened under an older one) and refuses an older epoch, or the
//! same epoch naming another datacenter or address.
//!
//! ```yaml
//! epoch: 2
//! activeDatacenter: dc-b
//! datacenters: { dc-a: "mariadb-dc-a:3306", dc-b: "mariadb-dc-b:3306" }
//! redis: { dc-a: "redis-dc-a:6379", dc-b: "redis-dc-b:6379" }   # only when the Redis tier moves too
//! failover:                      # the controller's own record; proxies ignore it
//!   requestedDatacenter: dc-a
//!   failingSince: null
//!   lastTransition: { at: "2026-11-22T20:00:00Z", kind: Failover, from: dc-a, to: dc-b, epoch: 2, reason: "..." }
//!   blocked: null
//!   flips: ["2026-11-22T20:00:00Z"]
//!   promotionPending: false
//! ```

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// The ConfigMap key (and the usual file name) of the route document.
pub const ROUTE_KEY: &str = "route.yaml";

/// The default name of the route ConfigMap.
pub const ROUTE_CONFIG_MAP: &str = "thumbup-route";

/// A route document that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The YAML does not parse into a route.
    #[error("route does not parse: {0}")]
    Parse(String),
    /// A value breaks a rule.
    #[error("invalid route: {0}")]
    Invalid(String),
}

/// The route: the active datacenter and the epoch that names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Raised by one on every flip; never lowered.
    pub epoch: u64,
    /// The datacenter whose DB takes every new session.
    pub active_datacenter: String,
    /// Each datacenter's DB address (`host:port`) as the proxies reach it.
    pub datacenters: BTreeMap<String, String>,
    /// Each datacenter's Redis address (`host:port`), when the Redis tier
    /// moves with the route (operator config `failover.redis_tier`): the
    /// proxies then forward Redis sessions to the active datacenter's
    /// Redis too. Empty: Redis stays where each tenant's URL points.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub redis: BTreeMap<String, String>,
    /// The failover controller's own record (proxies ignore it).
    #[serde(default)]
    pub failover: FailoverRecord,
}

/// What the failover controller keeps next to the route: it survives an
/// operator restart, so the cap and the last transition do too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverRecord {
    /// The datacenter that the operator config named when last read; a planned
    /// switchover starts when the config names another one.
    #[serde(default)]
    pub requested_datacenter: Option<String>,
    /// When the active DB's current run of failed probes began.
    #[serde(default)]
    pub failing_since: Option<Timestamp>,
    /// The newest flip.
    #[serde(default)]
    pub last_transition: Option<Transition>,
    /// Why a failover that the probes call for is not happening.
    #[serde(default)]
    pub blocked: Option<Blocked>,
    /// When each recent unplanned failover happened (for the cap).
    #[serde(default)]
    pub flips: Vec<Timestamp>,
    /// The route names a datacenter whose promotion (drain the relay log,
    /// stop replicating, replay the streams, make it writable) has not
    /// finished yet; the controller resumes it.
    #[serde(default)]
    pub promotion_pending: bool,
    /// The id of the switchover request (`kubectl thumbup switchover`) last
    /// acted on: a request is acted on once, so a request left in place
    /// never undoes a later failover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_request: Option<String>,
}

/// One flip of the route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Transition {
    /// When the route flipped.
    pub at: Timestamp,
    /// Failover (probes failed) or Switchover (planned).
    pub kind: TransitionKind,
    /// The datacenter that was active.
    pub from: String,
    /// The datacenter that is active now.
    pub to: String,
    /// The epoch of the new route.
    pub epoch: u64,
    /// Why, in words.
    pub reason: String,
}

/// The kinds of flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransitionKind {
    /// Unplanned: the active DB failed its probes.
    Failover,
    /// Planned: the operator config named another datacenter.
    Switchover,
}

/// A failover that the probes call for but that does not happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Blocked {
    /// A CamelCase reason (`StandbyUnhealthy`, `FailoverCapReached`, ...).
    pub reason: String,
    /// Details for a human.
    pub message: String,
    /// Since when.
    pub since: Timestamp,
}

/// How a proxy treats an offered route, given the one it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Newer epoch: adopt it and drop the sessions of older epochs.
    Adopt,
    /// The same epoch, datacenter and addresses: nothing to do.
    Same,
    /// An older epoch.
    Stale,
    /// The same epoch with another datacenter or address: a bug or a forgery.
    Conflict,
}

impl Route {
    /// Parses and validates a route document.
    pub fn parse(text: &str) -> Result<Route, RouteError> {
        let route: Route = serde_yaml::from_str(text).map_err(|e| RouteError::Parse(e.to_string()))?;
        route.validate()?;
        Ok(route)
    }

    /// The document, as YAML.
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("a route serializes")
    }

    /// Epoch at least 1, the active datacenter listed, every address `host:port`.
    pub fn validate(&self) -> Result<(), RouteError> {
        if self.epoch == 0 {
            return Err(RouteError::Invalid("epoch must be at least 1".into()));
        }
        if !self.datacenters.contains_key(&self.active_datacenter) {
            return Err(RouteError::Invalid(format!(
                "activeDatacenter {:?} is not one of the datacenters {:?}",
                self.active_datacenter,
                self.datacenters.keys().collect::<Vec<_>>()
            )));
        }
        if !self.redis.is_empty() && !self.redis.contains_key(&self.active_datacenter) {
            return Err(RouteError::Invalid(format!(
                "redis names no address for the active datacenter {:?}",
                self.active_datacenter
            )));
        }
        for (tier, map) in [("datacenter", &self.datacenters), ("redis of datacenter", &self.redis)] {
            for (dc, addr) in map {
                let ok = addr
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                if !ok {
                    return Err(RouteError::Invalid(format!("{tier} {dc:?}: address {addr:?} is not host:port")));
                }
            }
        }
        Ok(())
    }

    /// The active datacenter's DB address.
    pub fn active_address(&self) -> &str {
        &self.datacenters[&self.active_datacenter]
    }

    /// The active datacenter's Redis address, when the Redis tier moves
    /// with the route.
    pub fn active_redis_address(&self) -> Option<&str> {
        self.redis.get(&self.active_datacenter).map(String::as_str)
    }

    /// How a holder of `self` treats `offered`.
    pub fn offer(&self, offered: &Route) -> Offer {
        use std::cmp::Ordering::*;
        match offered.epoch.cmp(&self.epoch) {
            Greater => Offer::Adopt,
            Less => Offer::Stale,
            Equal
                if offered.active_datacenter == self.active_datacenter
                    && offered.active_address() == self.active_address()
                    && offered.active_redis_address() == self.active_redis_address() =>
            {
                Offer::Same
            }
            Equal => Offer::Conflict,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(epoch: u64, active: &str) -> Route {
        Route {
            epoch,
            active_datacenter: active.into(),
            datacenters: [("dc-a".to_string(), "db-a:3306".to_string()), ("dc-b".into(), "db-b:3306".into())].into(),
            redis: BTreeMap::new(),
            failover: FailoverRecord::default(),
        }
    }

    #[test]
    fn route_round_trips_through_yaml() {
        let mut r = route(2, "dc-b");
        r.failover.last_transition = Some(Transition {
            at: "2026-11-22T20:00:00Z".parse().unwrap(),
            kind: TransitionKind::Failover,
            from: "dc-a".into(),
            to: "dc-b".into(),
            epoch: 2,
            reason: "3 probes failed".into(),
        });
        assert_eq!(Route::parse(&r.to_yaml()).unwrap(), r);
        assert!(r.to_yaml().contains("activeDatacenter: dc-b"), "{}", r.to_yaml());
    }

    #[test]
    fn proxy_fields_alone_are_a_route() {
        let r = Route::parse("epoch: 1\nactiveDatacenter: dc-a\ndatacenters: {dc-a: 'h:1', dc-b: 'h:2'}\n").unwrap();
        assert_eq!(r.active_address(), "h:1");
    }

    #[test]
    fn bad_routes_are_refused_with_the_reason() {
        let bad = [
            ("epoch: 0\nactiveDatacenter: a\ndatacenters: {a: 'h:1'}", "epoch"),
            ("epoch: 1\nactiveDatacenter: c\ndatacenters: {a: 'h:1'}", "not one of"),
            ("epoch: 1\nactiveDatacenter: a\ndatacenters: {a: 'h'}", "host:port"),
            ("epoch: 1\nactiveDatacenter: a\ndatacenters: {a: ':1'}", "host:port"),
            ("epoch: -1\nactiveDatacenter: a\ndatacenters: {a: 'h:1'}", "parse"),
            ("epoch: 1\n", "parse"),
            ("epoch: 1\nactiveDatacenter: a\ndatacenters: {a: 'h:1'}\nredis: {b: 'r:1'}", "no address for the active"),
            ("epoch: 1\nactiveDatacenter: a\ndatacenters: {a: 'h:1'}\nredis: {a: 'r'}", "redis of datacenter"),
        ];
        for (text, want) in bad {
            let e = Route::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn only_a_newer_epoch_is_adopted() {
        let held = route(2, "dc-b");
        assert_eq!(held.offer(&route(3, "dc-a")), Offer::Adopt);
        assert_eq!(held.offer(&route(3, "dc-b")), Offer::Adopt);
        assert_eq!(held.offer(&route(2, "dc-b")), Offer::Same);
        assert_eq!(held.offer(&route(2, "dc-a")), Offer::Conflict);
        assert_eq!(held.offer(&route(1, "dc-a")), Offer::Stale);
        let mut moved = route(2, "dc-b");
        moved.datacenters.insert("dc-b".into(), "elsewhere:3306".into());
        assert_eq!(held.offer(&moved), Offer::Conflict);
        let mut with_redis = route(2, "dc-b");
        with_redis.redis.insert("dc-b".into(), "redis-b:6379".into());
        assert_eq!(held.offer(&with_redis), Offer::Conflict, "the same epoch cannot move the Redis tier");
        let mut status_only = route(2, "dc-b");
        status_only.failover.failing_since = Some(Timestamp::now());
        assert_eq!(held.offer(&status_only), Offer::Same);
    }
}
