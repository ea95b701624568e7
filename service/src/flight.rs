//! The read path's one single flight: concurrent loads of one key make one
//! load. The first caller of a key leads (it loads and [`Leader::finish`]es
//! with the answer); callers that come while it runs follow (they wait for
//! that answer). A leader dropped unfinished (its request was cancelled, or
//! it failed without an answer to share) closes the flight: its followers
//! load for themselves and the next caller leads. A leader older than the
//! flights' patience is replaced, so a load that hangs holds nobody for
//! longer than that.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// A running flight: since when, and where its answer comes.
type Running<V> = (Instant, watch::Receiver<Option<V>>);

/// Loads under way, by key.
pub struct Flights<V> {
    patience: Duration,
    running: Mutex<HashMap<String, Running<V>>>,
}

/// What joining a key's flight made of the caller.
pub enum Join<'a, V> {
    /// The caller loads the key and finishes the flight.
    Lead(Leader<'a, V>),
    /// Another caller loads it: its answer comes here (`None` until then;
    /// closed when that load ended without an answer).
    Follow(watch::Receiver<Option<V>>),
}

/// The one loader of a key.
pub struct Leader<'a, V> {
    flights: &'a Flights<V>,
    key: String,
    tx: watch::Sender<Option<V>>,
}

impl<V: Clone> Flights<V> {
    /// No flights; a leader is replaced after `patience`.
    pub fn new(patience: Duration) -> Flights<V> {
        Flights { patience, running: Mutex::new(HashMap::new()) }
    }

    /// Joins the flight of `key` at `now`: leads it when none runs (or the
    /// running one outlived the patience, or ended without an answer),
    /// follows it otherwise.
    pub fn join(&self, key: &str, now: Instant) -> Join<'_, V> {
        let mut running = self.running.lock().expect("flights lock");
        if let Some((since, rx)) = running.get(key)
            && now.saturating_duration_since(*since) < self.patience
            && rx.has_changed().is_ok()
        {
            return Join::Follow(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        running.insert(key.to_string(), (now, rx));
        Join::Lead(Leader { flights: self, key: key.to_string(), tx })
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
        if running.get(&self.key).is_some_and(|(_, rx)| rx.same_channel(&self.tx.subscribe())) {
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
}
