//! The held route and the live sessions, under one lock.
//!
//! Keeping both under the same lock is what makes a flip exact: a session is
//! registered with the route it will dial in the same critical section that
//! reads that route, and an adopted route replaces the held one in the same
//! critical section that takes every session of an older epoch out of the
//! registry to be aborted. So no session opened under an old epoch escapes
//! the kill, and none opened after the swap dials the old datacenter.
//!
//! Sessions of a local-read listener ([`Target::local`]) are the exception:
//! they read from the proxy's own datacenter whichever is active, so a newer
//! epoch closes them only when it names another address for their server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use thumbup_core::route::{Offer, Route};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::target::Target;

/// What an accepted offer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// The route was adopted.
    Adopted {
        /// Its epoch.
        epoch: u64,
        /// Its active datacenter.
        datacenter: String,
        /// Whether it replaced a held route (a flip) rather than being the
        /// first one.
        flip: bool,
        /// Sessions of older epochs that were closed.
        killed: usize,
    },
    /// The held route already says the same.
    Same,
}

struct Live {
    epoch: u64,
    abort: AbortHandle,
    /// A local-read session: its target and the address it dials (None when
    /// the route names none). None: a session of the active datacenter.
    pinned: Option<(Target, Option<String>)>,
}

impl Live {
    /// Whether adopting `route` (of a newer epoch) ends this session.
    fn ended_by(&self, route: &Route) -> bool {
        match &self.pinned {
            None => self.epoch < route.epoch,
            Some((target, address)) => target.address(route) != address.as_deref(),
        }
    }
}

#[derive(Default)]
struct Inner {
    held: Option<Arc<Route>>,
    sessions: HashMap<u64, Live>,
    next_id: u64,
}

/// The held route and the sessions opened under it.
pub struct Routes {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

/// What a session is opened with: its route, and a guard that deregisters
/// the session (and lowers the session gauge) when the session task ends,
/// however it ends.
pub struct Ticket {
    /// The session's number (for logs).
    pub id: u64,
    /// The route the session was opened under.
    pub route: Arc<Route>,
    /// Dropped when the session ends.
    pub guard: SessionGuard,
}

/// Deregisters a session when dropped.
pub struct SessionGuard {
    id: u64,
    datacenter: String,
    routes: Arc<Routes>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        // Already gone when a flip or the shutdown took it out to abort it.
        self.routes.lock().sessions.remove(&self.id);
        self.routes.metrics.sessions.with_label_values(&[&self.datacenter]).dec();
    }
}

/// No route is held yet: the connection is refused.
#[derive(Debug)]
pub struct NoRoute;

impl Routes {
    /// No route yet, no sessions.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Routes> {
        Arc::new(Routes { inner: Mutex::new(Inner::default()), metrics })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing under this lock panics halfway through a change.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The held route.
    pub fn held(&self) -> Option<Arc<Route>> {
        self.lock().held.clone()
    }

    /// Open sessions.
    pub fn session_count(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Parses `text` and offers the route (see [`Routes::offer`]); a text
    /// that does not parse is refused as `invalid`.
    pub fn offer_text(&self, text: &str, source: &str) -> Result<Accepted, Error> {
        match Route::parse(text) {
            Ok(route) => self.offer(route, source),
            Err(e) => Err(self.refuse(Error::from(e), source)),
        }
    }

    /// Applies the route rules of [`Route::offer`]: a newer epoch is adopted
    /// and every session of an older epoch closed at once; the same route
    /// changes nothing; an older epoch or a conflicting one is refused,
    /// counted and logged, and the held route stays.
    pub fn offer(&self, route: Route, source: &str) -> Result<Accepted, Error> {
        if let Err(e) = route.validate() {
            return Err(self.refuse(Error::from(e), source));
        }
        let mut inner = self.lock();
        let verdict = inner.held.as_ref().map_or(Offer::Adopt, |held| held.offer(&route));
        match verdict {
            Offer::Same => {
                debug!(source, epoch = route.epoch, "route unchanged");
                Ok(Accepted::Same)
            }
            Offer::Stale | Offer::Conflict => {
                let held = inner.held.clone().expect("only a held route makes an offer stale or conflicting");
                drop(inner);
                let e = if verdict == Offer::Stale {
                    Error::RouteStale { offered: route.epoch, held: held.epoch }
                } else {
                    Error::RouteConflict {
                        epoch: route.epoch,
                        offered_datacenter: route.active_datacenter.clone(),
                        offered_address: route.active_address().to_string(),
                        held_datacenter: held.active_datacenter.clone(),
                        held_address: held.active_address().to_string(),
                    }
                };
                Err(self.refuse(e, source))
            }
            Offer::Adopt => {
                let epoch = route.epoch;
                let datacenter = route.active_datacenter.clone();
                let address = route.active_address().to_string();
                let previous = inner.held.replace(Arc::new(route));
                let held = inner.held.clone().expect("just replaced");
                let doomed: Vec<AbortHandle> =
                    inner.sessions.extract_if(|_, s| s.ended_by(&held)).map(|(_, s)| s.abort).collect();
                // Under the lock, so that of two adoptions racing the gauge
                // ends on the newer epoch.
                self.metrics.route_epoch.set(i64::try_from(epoch).unwrap_or(i64::MAX));
                drop(inner);
                // Aborting drops each session task's future, and with it
                // both of its sockets.
                for abort in &doomed {
                    abort.abort();
                }
                self.metrics.sessions_killed_total.inc_by(doomed.len() as u64);
                let flip = previous.is_some();
                if flip {
                    self.metrics.flips_total.inc();
                }
                info!(
                    source,
                    epoch,
                    %datacenter,
                    %address,
                    previous_epoch = previous.as_ref().map(|p| p.epoch),
                    previous_datacenter = previous.as_ref().map(|p| p.active_datacenter.as_str()),
                    killed = doomed.len(),
                    "route adopted"
                );
                Ok(Accepted::Adopted { epoch, datacenter, flip, killed: doomed.len() })
            }
        }
    }

    fn refuse(&self, e: Error, source: &str) -> Error {
        self.metrics.route_rejected_total.with_label_values(&[e.reason()]).inc();
        let held_epoch = self.held().map(|r| r.epoch);
        warn!(source, reason = e.reason(), held_epoch, error = %e, "route refused; keeping the held one");
        e
    }

    /// Registers a session of `target` under the held route and starts it
    /// with `start`, which spawns the session task. Refused while no route
    /// is held.
    pub fn admit(
        self: &Arc<Self>,
        target: &Target,
        start: impl FnOnce(Ticket) -> JoinHandle<()>,
    ) -> Result<(), NoRoute> {
        let mut inner = self.lock();
        let route = inner.held.clone().ok_or(NoRoute)?;
        inner.next_id += 1;
        let id = inner.next_id;
        let datacenter = target.datacenter(&route).to_string();
        let pinned = (!target.follows_flips()).then(|| (target.clone(), target.address(&route).map(str::to_string)));
        self.metrics.sessions.with_label_values(&[&datacenter]).inc();
        self.metrics.sessions_total.with_label_values(&[&datacenter]).inc();
        let epoch = route.epoch;
        let guard = SessionGuard { id, datacenter, routes: self.clone() };
        // Spawned under the lock, so a flip cannot slip in between reading
        // the route and registering the session. The task's guard locks to
        // deregister, so it waits for the insert even if the task ends at once.
        let task = start(Ticket { id, route, guard });
        inner.sessions.insert(id, Live { epoch, abort: task.abort_handle(), pinned });
        Ok(())
    }

    /// Closes every session (at shutdown); returns how many there were.
    pub fn close_all(&self) -> usize {
        let doomed: Vec<Live> = self.lock().sessions.drain().map(|(_, s)| s).collect();
        for s in &doomed {
            s.abort.abort();
        }
        doomed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::target::Tier;

    fn route(epoch: u64, active: &str) -> Route {
        let text = format!(
            "epoch: {epoch}\nactiveDatacenter: {active}\ndatacenters: {{dc-a: 'db-a:3306', dc-b: 'db-b:3306'}}"
        );
        Route::parse(&text).unwrap()
    }

    fn rejected(m: &Metrics, reason: &str) -> u64 {
        m.route_rejected_total.with_label_values(&[reason]).get()
    }

    /// A session task of the active datacenter's DB that runs until aborted.
    fn idle(routes: &Arc<Routes>) {
        idle_at(routes, &Target::active(Tier::Db));
    }

    /// A session task of `target` that runs until aborted.
    fn idle_at(routes: &Arc<Routes>, target: &Target) {
        let start = |ticket: Ticket| {
            tokio::spawn(async move {
                let _ticket = ticket;
                std::future::pending::<()>().await
            })
        };
        routes.admit(target, start).unwrap();
    }

    #[test]
    fn the_first_route_is_adopted_without_a_flip() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let routes = Routes::new(metrics.clone());
        assert!(routes.held().is_none());
        let got = routes.offer(route(3, "dc-a"), "test").unwrap();
        assert_eq!(got, Accepted::Adopted { epoch: 3, datacenter: "dc-a".into(), flip: false, killed: 0 });
        assert_eq!(metrics.route_epoch.get(), 3);
        assert_eq!(metrics.flips_total.get(), 0);
    }

    #[test]
    fn an_older_or_conflicting_route_is_refused_and_the_held_one_stays() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let routes = Routes::new(metrics.clone());
        routes.offer(route(2, "dc-b"), "test").unwrap();
        assert_eq!(routes.offer(route(2, "dc-b"), "test").unwrap(), Accepted::Same);
        let stale = routes.offer(route(1, "dc-a"), "test").unwrap_err();
        assert!(matches!(stale, Error::RouteStale { offered: 1, held: 2 }), "{stale}");
        let conflict = routes.offer(route(2, "dc-a"), "test").unwrap_err();
        assert_eq!(conflict.reason(), "conflict");
        assert!(conflict.to_string().contains("dc-a (db-a:3306)"), "{conflict}");
        let invalid = routes.offer_text("epoch: 9\nactiveDatacenter: dc-z\ndatacenters: {dc-a: 'h:1'}", "test");
        assert_eq!(invalid.unwrap_err().reason(), "invalid");
        assert_eq!(routes.offer_text("not a route", "test").unwrap_err().reason(), "invalid");
        assert_eq!(*routes.held().unwrap(), route(2, "dc-b"));
        assert_eq!(metrics.route_epoch.get(), 2);
        assert_eq!(
            (rejected(&metrics, "stale"), rejected(&metrics, "conflict"), rejected(&metrics, "invalid")),
            (1, 1, 2)
        );
    }

    #[test]
    fn no_session_is_admitted_before_a_route() {
        let routes = Routes::new(Arc::new(Metrics::new().unwrap()));
        let mut started = false;
        let got = routes.admit(&Target::active(Tier::Db), |_| {
            started = true;
            unreachable!()
        });
        assert!(got.is_err() && !started);
    }

    #[tokio::test]
    async fn a_newer_epoch_aborts_every_older_session_and_only_those() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let routes = Routes::new(metrics.clone());
        routes.offer(route(1, "dc-a"), "test").unwrap();
        idle(&routes);
        idle(&routes);
        assert_eq!(metrics.sessions.with_label_values(&["dc-a"]).get(), 2);
        let got = routes.offer(route(2, "dc-b"), "test").unwrap();
        assert_eq!(got, Accepted::Adopted { epoch: 2, datacenter: "dc-b".into(), flip: true, killed: 2 });
        idle(&routes);
        assert_eq!(routes.session_count(), 1);
        // The aborted tasks drop their guards once the runtime gets to them.
        for _ in 0..100 {
            if metrics.sessions.with_label_values(&["dc-a"]).get() == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(metrics.sessions.with_label_values(&["dc-a"]).get(), 0);
        assert_eq!(metrics.sessions.with_label_values(&["dc-b"]).get(), 1);
        assert_eq!(metrics.sessions_total.with_label_values(&["dc-a"]).get(), 2);
        assert_eq!((metrics.flips_total.get(), metrics.sessions_killed_total.get()), (1, 2));
        assert_eq!(routes.close_all(), 1);
        assert_eq!(routes.session_count(), 0);
    }

    #[tokio::test]
    async fn a_flip_leaves_local_sessions_reading_and_an_address_change_ends_them() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let routes = Routes::new(metrics.clone());
        routes.offer(route(1, "dc-a"), "test").unwrap();
        let local = Target::local(Tier::Db, "dc-b");
        idle(&routes);
        idle_at(&routes, &local);
        idle_at(&routes, &local);
        assert_eq!(metrics.sessions.with_label_values(&["dc-b"]).get(), 2, "labelled by the datacenter they dial");
        // The flip ends the active session and leaves dc-b's readers alone.
        let got = routes.offer(route(2, "dc-b"), "test").unwrap();
        assert_eq!(got, Accepted::Adopted { epoch: 2, datacenter: "dc-b".into(), flip: true, killed: 1 });
        assert_eq!(routes.session_count(), 2);
        // A route that moves dc-b's DB elsewhere ends them: their server is
        // no longer the one the route means.
        let moved =
            Route::parse("epoch: 3\nactiveDatacenter: dc-b\ndatacenters: {dc-a: 'db-a:3306', dc-b: 'db-b2:3306'}")
                .unwrap();
        let got = routes.offer(moved, "test").unwrap();
        assert_eq!(got, Accepted::Adopted { epoch: 3, datacenter: "dc-b".into(), flip: true, killed: 2 });
        assert_eq!(routes.session_count(), 0);
        assert_eq!(metrics.sessions_killed_total.get(), 3);
    }
}
