//! Which server a listener's sessions dial: a tier (DB or Redis) of a
//! datacenter, either the route's active one or the proxy's own
//! (`--datacenter`, for the local-read listeners).
//!
//! The two kinds differ in what a flip does to their sessions. A session to
//! the active datacenter is closed by any newer epoch: it may be writing,
//! and the old primary must stop taking writes. A session to the proxy's own
//! datacenter only reads, from servers that are replicas of the active ones
//! or the active ones themselves; it keeps reading across a flip, and is
//! closed only when an adopted route names another address for that
//! datacenter's tier (or none), since then its server is no longer the one
//! the route means.

use thumbup_core::route::Route;

/// Which of a datacenter's servers a listener forwards to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// The DB (`route.datacenters`).
    Db,
    /// The Redis (`route.redis`), when the route moves the Redis tier too.
    Redis,
}

impl Tier {
    /// The address of `datacenter`'s server of this tier in `route`, if the
    /// route names one.
    pub fn address_in<'r>(self, route: &'r Route, datacenter: &str) -> Option<&'r str> {
        let map = match self {
            Tier::Db => &route.datacenters,
            Tier::Redis => &route.redis,
        };
        map.get(datacenter).map(String::as_str)
    }

    /// The address a session opened under `route` dials on a listener of
    /// the active datacenter, if the route has one for this tier.
    pub fn address(self, route: &Route) -> Option<&str> {
        self.address_in(route, &route.active_datacenter)
    }

    /// `db` or `redis`, for logs.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Db => "db",
            Tier::Redis => "redis",
        }
    }
}

/// The server of a listener: a tier of the active datacenter, or of a
/// fixed one (the proxy's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// DB or Redis.
    pub tier: Tier,
    /// None: the route's active datacenter, whichever it is. Some: this
    /// datacenter, whichever is active (a local-read listener).
    pub datacenter: Option<String>,
}

impl Target {
    /// The active datacenter's `tier`.
    pub fn active(tier: Tier) -> Target {
        Target { tier, datacenter: None }
    }

    /// `datacenter`'s `tier`, whichever datacenter is active.
    pub fn local(tier: Tier, datacenter: impl Into<String>) -> Target {
        Target { tier, datacenter: Some(datacenter.into()) }
    }

    /// Whether a newer epoch ends every session of this target (the active
    /// datacenter's listeners) rather than only those whose address it
    /// changes (a fixed datacenter's).
    pub fn follows_flips(&self) -> bool {
        self.datacenter.is_none()
    }

    /// The datacenter whose server a session opened under `route` dials.
    pub fn datacenter<'r>(&'r self, route: &'r Route) -> &'r str {
        self.datacenter.as_deref().unwrap_or(&route.active_datacenter)
    }

    /// The address a session opened under `route` dials, if the route names
    /// one for this target.
    pub fn address<'r>(&self, route: &'r Route) -> Option<&'r str> {
        self.tier.address_in(route, self.datacenter(route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(active: &str, redis: bool) -> Route {
        let redis = if redis { "\nredis: {dc-a: 'redis-a:6379', dc-b: 'redis-b:6379'}" } else { "" };
        Route::parse(&format!(
            "epoch: 1\nactiveDatacenter: {active}\ndatacenters: {{dc-a: 'db-a:3306', dc-b: 'db-b:3306'}}{redis}"
        ))
        .unwrap()
    }

    #[test]
    fn an_active_target_follows_the_route_and_a_local_one_stays_in_its_datacenter() {
        let db = Target::active(Tier::Db);
        let local_db = Target::local(Tier::Db, "dc-b");
        let local_redis = Target::local(Tier::Redis, "dc-b");
        for active in ["dc-a", "dc-b"] {
            let r = route(active, true);
            assert_eq!(db.address(&r), Some(if active == "dc-a" { "db-a:3306" } else { "db-b:3306" }));
            assert_eq!(db.datacenter(&r), active);
            assert_eq!(local_db.address(&r), Some("db-b:3306"), "active {active}");
            assert_eq!(local_redis.address(&r), Some("redis-b:6379"), "active {active}");
            assert_eq!(local_db.datacenter(&r), "dc-b");
        }
        assert!(db.follows_flips() && !local_db.follows_flips());
    }

    #[test]
    fn a_route_that_does_not_name_the_datacenter_or_its_redis_gives_no_address() {
        assert_eq!(Target::local(Tier::Db, "dc-z").address(&route("dc-a", true)), None);
        assert_eq!(Target::local(Tier::Redis, "dc-b").address(&route("dc-a", false)), None);
        assert_eq!(Target::active(Tier::Redis).address(&route("dc-a", false)), None);
    }
}
