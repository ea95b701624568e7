//! The read path's one single flight: concurrent loads of one key make one
//! load. The first caller of a key leads (it loads and ends the flight with
//! the answer); callers that come while it runs follow (they wait for that
//! answer). A flight that ends without an answer (its leader was cancelled,
//! or failed without an answer to share) is closed: its followers load for
//! themselves and the next caller leads. A leader older than the flights'
//! patience is replaced, so a load that hangs holds nobody for longer than
//! that.
//!
//! Two users, one mechanism: the DB loads of counts ([`crate::read`]) lead
//! with a [`Leader`] guard, which ends the flight when it is dropped; the
//! hot-key cache ([`crate::hot`]) leads the first load of a key that just
//! turned hot across two calls (the lookup that makes the reader the loader,
//! then its `fill` or `abandon`), so it joins with [`Flights::join_detached`]
//! and ends the flight with [`Flights::settle`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Where a flight's answer goes (`None` until it comes). Shared by the
/// running table and a guarded leader, so a leader replaced after the
/// patience still answers the followers it had.
type Answer<V> = Arc<watch::Sender<Option<V>>>;

/// Loads under way, by key: since when, and where the answer goes.
pub struct Flights<V> {
    patience: Duration,
    running: Mutex<HashMap<String, (Instant, Answer<V>)>>,
}

/// What joining a key's flight made of the caller.
pub enum Join<'a, V> {
    /// The caller loads the key and finishes the flight.
    Lead(Leader<'a, V>),
    /// Another caller loads it: its answer comes here (`None` until then;
    /// closed when that load ended without an answer).
    Follow(watch::Receiver<Option<V>>),
}

/// The one loader of a key; dropping it unfinished ends the flight without
/// an answer.
pub struct Leader<'a, V> {
    flights: &'a Flights<V>,
    key: String,
    tx: Answer<V>,
}

impl<V: Clone> Flights<V> {
    /// No flights; a leader is replaced after `patience`.
    pub fn new(patience: Duration) -> Flights<V> {
        Flights { patience, running: Mutex::new(HashMap::new()) }
    }

    /// Starts the flight of `key` (Ok: the caller leads) or joins the
    /// running one (Err: where its answer comes).
    fn start(&self, key: &str, now: Instant) -> Result<Answer<V>, watch::Receiver<Option<V>>> {
        let mut running = self.running.lock().expect("flights lock");
        if let Some((since, tx)) = running.get(key)
            && now.saturating_duration_since(*since) < self.patience
        {
            return Err(tx.subscribe());
        }
        let tx: Answer<V> = Arc::new(watch::channel(None).0);
        running.insert(key.to_string(), (now, Arc::clone(&tx)));
        Ok(tx)
    }

    /// Joins the flight of `key` at `now`: leads it when none runs (or the
    /// running one outlived the patience), follows it otherwise.
    pub fn join(&self, key: &str, now: Instant) -> Join<'_, V> {
        match self.start(key, now) {
            Ok(tx) => Join::Lead(Leader { flights: self, key: key.to_string(), tx }),
            Err(rx) => Join::Follow(rx),
        }
    }

    /// Joins like [`Flights::join`], for a leader that cannot hold a guard
    /// (it leads across calls): `None` makes the caller the leader, which
    /// must [`Flights::settle`] the key (or be replaced after the patience).
    pub fn join_detached(&self, key: &str, now: Instant) -> Option<watch::Receiver<Option<V>>> {
        self.start(key, now).err()
    }

    /// Ends the flight of `key`, whoever leads it: with `Some` answer its
    /// followers get it, with `None` they load for themselves.
    pub fn settle(&self, key: &str, answer: Option<V>) {
        let ended = self.running.lock().expect("flights lock").remove(key);
        if let (Some((_, tx)), Some(v)) = (ended, answer) {
            tx.send_replace(Some(v));
        }
    }

    /// Ends, without an answer, the flights of the keys `keep` refuses.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.running.lock().expect("flights lock").retain(|k, _| keep(k));
    }

    /// Waits for a followed flight's answer: `None` when it ended without
    /// one (then the caller loads for itself).
    pub async fn answer(mut rx: watch::Receiver<Option<V>>) -> Option<V> {
        rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone())
    }

    /// Keys being loaded now.
    pub fn len(&self) -> usize {
        self.running.lock().expect("flights lock").len()
    }

    /// True when nothing is being loaded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<V> Leader<'_, V> {
    /// Ends the flight with `answer`, which every follower gets.
    pub fn finish(self, answer: V) {
        self.tx.send_replace(Some(answer));
        // Drop ends the flight.
    }
}

impl<V> Drop for Leader<'_, V> {
    fn drop(&mut self) {
        let mut running = self.flights.running.lock().expect("flights lock");
        // Only this leader's flight: a newer leader may have replaced it.
        if running.get(&self.key).is_some_and(|(_, tx)| Arc::ptr_eq(tx, &self.tx)) {
            running.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lead<'a>(f: &'a Flights<i64>, key: &str, now: Instant) -> Leader<'a, i64> {
        match f.join(key, now) {
            Join::Lead(l) => l,
            Join::Follow(_) => panic!("expected to lead {key}"),
        }
    }

    fn follow(f: &Flights<i64>, key: &str, now: Instant) -> watch::Receiver<Option<i64>> {
        match f.join(key, now) {
            Join::Follow(rx) => rx,
            Join::Lead(_) => panic!("expected to follow {key}"),
        }
    }

    #[tokio::test]
    async fn followers_wait_for_the_leaders_answer() {
        let f = Flights::new(Duration::from_secs(1));
        let t = Instant::now();
        let leader = lead(&f, "viral", t);
        let waiters: Vec<_> = (0..3).map(|_| follow(&f, "viral", t)).collect();
        assert!(waiters.iter().all(|rx| rx.borrow().is_none()));
        leader.finish(4);
        for rx in waiters {
            assert_eq!(Flights::answer(rx).await, Some(4), "every waiter gets the answer");
        }
        assert!(f.is_empty(), "a finished flight is gone: the next caller leads");
        drop(lead(&f, "viral", t));
    }

    #[tokio::test]
    async fn a_leader_gone_without_an_answer_lets_the_others_load() {
        let f = Flights::new(Duration::from_secs(1));
        let t = Instant::now();
        let leader = lead(&f, "other", t);
        let rx = follow(&f, "other", t);
        drop(leader);
        assert!(rx.has_changed().is_err(), "closed");
        assert_eq!(Flights::answer(rx).await, None, "the follower loads for itself");
        let _next = lead(&f, "other", t);
    }

    #[test]
    fn a_leader_that_never_comes_back_is_replaced_after_the_patience() {
        let f = Flights::new(Duration::from_secs(1));
        let t = Instant::now();
        let stuck = lead(&f, "slow", t);
        drop(follow(&f, "slow", t + Duration::from_millis(500)));
        let fresh = lead(&f, "slow", t + Duration::from_secs(1));
        drop(stuck);
        assert_eq!(f.len(), 1, "the stuck leader's end leaves the new flight alone");
        drop(fresh);
        assert!(f.is_empty());
    }

    #[tokio::test]
    async fn a_detached_leader_settles_its_flight_itself() {
        let f = Flights::new(Duration::from_secs(1));
        let t = Instant::now();
        assert!(f.join_detached("hot", t).is_none(), "the first caller leads");
        let rx = f.join_detached("hot", t).expect("the second follows");
        f.settle("hot", Some(7));
        assert_eq!(Flights::answer(rx).await, Some(7));
        assert!(f.is_empty());
        // Settled without an answer: the followers load for themselves.
        assert!(f.join_detached("hot", t).is_none());
        let rx = f.join_detached("hot", t).expect("follows");
        f.settle("hot", None);
        assert_eq!(Flights::answer(rx).await, None);
        // Dropped by `retain`: the same.
        assert!(f.join_detached("cold", t).is_none());
        let rx = f.join_detached("cold", t).expect("follows");
        f.retain(|k| k != "cold");
        assert_eq!(Flights::answer(rx).await, None);
        assert!(f.is_empty());
    }
}
