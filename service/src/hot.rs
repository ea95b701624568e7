//! The local hot-key cache: the counts of the items read most often lately,
//! served from this process's memory for a short TTL.
//!
//! A viral item is read far more than the rest; without this, every read of
//! it is a Redis round trip to the one shard holding its key. Each lookup
//! counts a hit for its key in the current half of a sliding window (two
//! buckets of `window / 2`). When a bucket closes, the top K keys of the
//! whole window with at least `min_hits` hits become the hot set (per shard
//! of the key space, so lookups on different shards never contend). Hot keys
//! keep the counts last read from Redis or the DB for `ttl`. When an entry
//! expires, the first reader refreshes it and concurrent readers get the
//! expired value meanwhile: one Redis query per hot key per TTL, however
//! many readers (single flight). The first load of a key that just turned
//! hot is single flight too, by the read path's one mechanism
//! ([`crate::flight`], one table per shard): readers that come while it runs
//! wait for its answer (at most a TTL, then they read for themselves).
//! Counts served from here are at most `ttl` plus one refresh old.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thumbup_core::config::CacheSettings;
use thumbup_core::db::Counts;
use tokio::sync::watch;

use crate::flight::Flights;

/// Shards of the key space (one lock each).
const SHARDS: usize = 16;

/// The cache's settings, from the tenant's `cache:` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotSettings {
    /// How long a hot key's counts are served from memory.
    pub ttl: Duration,
    /// The sliding window over which hits are counted.
    pub window: Duration,
    /// Hot keys at most (over all shards).
    pub top_k: usize,
    /// Hits within the window that make a key a candidate.
    pub min_hits: u64,
}

impl HotSettings {
    /// The settings of a tenant; None when the cache is off (`hot_ttl_ms: 0`).
    pub fn of(c: &CacheSettings) -> Option<HotSettings> {
        (c.hot_ttl_ms > 0).then(|| HotSettings {
            ttl: Duration::from_millis(c.hot_ttl_ms),
            window: Duration::from_millis(c.hot_window_ms.max(2)),
            top_k: c.hot_top_k.max(1) as usize,
            min_hits: c.hot_min_hits.max(1),
        })
    }
}

/// What a lookup found.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Fresh counts of a hot key.
    Fresh(Counts),
    /// Expired counts of a hot key that another reader is refreshing.
    Stale(Counts),
    /// A hot key with nothing cached yet that another reader is loading:
    /// its answer comes on this channel (`None` until then; closed if the
    /// load failed).
    Loading(watch::Receiver<Option<Counts>>),
    /// Not served from here; `refresh` is true when the caller is the one
    /// refresher of an expired hot key (it must `fill` or `abandon` it).
    Miss {
        /// The caller refreshes this hot key.
        refresh: bool,
    },
}

struct Entry {
    counts: Counts,
    fresh_until: Instant,
    /// Since when a reader refreshes it. A refresher that never comes back
    /// (its request was cancelled) is replaced after `ttl`.
    refreshing: Option<Instant>,
}

impl PartialEq for Lookup {
    fn eq(&self, other: &Lookup) -> bool {
        match (self, other) {
            (Lookup::Fresh(a), Lookup::Fresh(b)) | (Lookup::Stale(a), Lookup::Stale(b)) => a == b,
            (Lookup::Loading(_), Lookup::Loading(_)) => true,
            (Lookup::Miss { refresh: a }, Lookup::Miss { refresh: b }) => a == b,
            _ => false,
        }
    }
}

struct Shard {
    /// Hits in the open half of the window and in the one before.
    now: HashMap<String, u64>,
    before: HashMap<String, u64>,
    opened: Instant,
    hot: HashSet<String>,
    values: HashMap<String, Entry>,
    /// First loads of hot keys under way (a loader is replaced after `ttl`).
    loading: Flights<Counts>,
}

/// The hot-key cache of one tenant.
pub struct HotKeys {
    settings: HotSettings,
    hasher: RandomState,
    shards: Vec<Mutex<Shard>>,
    reads: AtomicU64,
}

/// Keys tracked per shard and half window at most: a scan over many
/// distinct keys must not grow memory without bound. Keys seen after that
/// are not counted until the next half window (a hot key is seen early).
const MAX_TRACKED: usize = 50_000;

impl HotKeys {
    /// An empty cache.
    pub fn new(settings: HotSettings) -> HotKeys {
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    now: HashMap::new(),
                    before: HashMap::new(),
                    opened: now,
                    hot: HashSet::new(),
                    values: HashMap::new(),
                    loading: Flights::new(settings.ttl),
                })
            })
            .collect();
        HotKeys { settings, hasher: RandomState::new(), shards, reads: AtomicU64::new(0) }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Closes the open half window when it is over and recomputes the hot set.
    fn rotate(&self, s: &mut Shard, now: Instant) {
        let half = self.settings.window / 2;
        if now.duration_since(s.opened) < half {
            return;
        }
        // The window that just ended is the half before and the one closing
        // now. Two halves or more passed since the last rotation: every hit
        // of the closing half is older than half a window, and the half
        // before it out of the window.
        let stale = now.duration_since(s.opened) >= half * 2;
        let closed = std::mem::take(&mut s.now);
        let older = std::mem::take(&mut s.before);
        s.before = if stale { HashMap::new() } else { closed };
        s.opened = now;
        let mut hits: HashMap<&String, u64> = HashMap::new();
        if !stale {
            for (k, n) in older.iter().chain(s.before.iter()) {
                *hits.entry(k).or_default() += n;
            }
        }
        let mut ranked: Vec<(&String, u64)> = hits.into_iter().filter(|(_, n)| *n >= self.settings.min_hits).collect();
        ranked.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        ranked.truncate(self.settings.top_k.div_ceil(SHARDS));
        let hot: HashSet<String> = ranked.into_iter().map(|(k, _)| k.clone()).collect();
        s.values.retain(|k, _| hot.contains(k));
        s.loading.retain(|k| hot.contains(k));
        s.hot = hot;
    }

    /// Counts a read of `key` and answers it from memory when it can.
    pub fn lookup(&self, key: &str, now: Instant) -> Lookup {
        let mut s = self.shard(key).lock().expect("hot cache lock");
        self.rotate(&mut s, now);
        if let Some(n) = s.now.get_mut(key) {
            *n += 1;
        } else if s.now.len() < MAX_TRACKED {
            s.now.insert(key.to_string(), 1);
        }
        if !s.hot.contains(key) {
            return Lookup::Miss { refresh: false };
        }
        let ttl = self.settings.ttl;
        match s.values.get_mut(key) {
            Some(e) if now < e.fresh_until => Lookup::Fresh(e.counts),
            Some(e) if e.refreshing.is_some_and(|since| now < since + ttl) => Lookup::Stale(e.counts),
            Some(e) => {
                e.refreshing = Some(now);
                Lookup::Miss { refresh: true }
            }
            // The first reader since the key turned hot loads it; the others
            // wait for its answer. A loader that never comes back (its
            // request was cancelled) is replaced after `ttl`.
            None => match s.loading.join_detached(key, now) {
                Some(rx) => Lookup::Loading(rx),
                None => Lookup::Miss { refresh: true },
            },
        }
    }

    /// Keeps the counts just read for `key` if it is hot.
    pub fn fill(&self, key: &str, counts: Counts, now: Instant) {
        let mut s = self.shard(key).lock().expect("hot cache lock");
        s.loading.settle(key, Some(counts));
        if s.hot.contains(key) {
            let fresh_until = now + self.settings.ttl;
            s.values.insert(key.to_string(), Entry { counts, fresh_until, refreshing: None });
        }
    }

    /// Gives up a refresh (the read failed): the next reader tries again.
    pub fn abandon(&self, key: &str) {
        let mut s = self.shard(key).lock().expect("hot cache lock");
        // No answer: the waiters read for themselves.
        s.loading.settle(key, None);
        if let Some(e) = s.values.get_mut(key) {
            e.refreshing = None;
        }
    }

    /// How long counts are served from memory; also how long a reader waits
    /// for another's first load.
    pub fn ttl(&self) -> Duration {
        self.settings.ttl
    }

    /// True once every 1024 calls: when to refresh the hot-keys gauge.
    pub fn sample(&self) -> bool {
        self.reads.fetch_add(1, Ordering::Relaxed).is_multiple_of(1024)
    }

    /// Keys in the hot set at `now`.
    pub fn hot_keys(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let mut s = s.lock().expect("hot cache lock");
                self.rotate(&mut s, now);
                s.hot.len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> HotSettings {
        HotSettings { ttl: Duration::from_secs(1), window: Duration::from_secs(10), top_k: 32, min_hits: 3 }
    }

    fn counts(likes: i64) -> Counts {
        Counts { likes, dislikes: 0, version: likes }
    }

    /// `n` reads of `key` at `at`.
    fn read(h: &HotKeys, key: &str, n: usize, at: Instant) -> Lookup {
        let mut last = Lookup::Miss { refresh: false };
        for _ in 0..n {
            last = h.lookup(key, at);
        }
        last
    }

    #[test]
    fn a_key_read_often_in_the_window_turns_hot_and_is_served_from_memory_until_the_ttl() {
        let h = HotKeys::new(settings());
        let t0 = Instant::now();
        assert_eq!(read(&h, "viral", 10, t0), Lookup::Miss { refresh: false });
        h.fill("viral", counts(5), t0);
        assert_eq!(h.lookup("viral", t0), Lookup::Miss { refresh: false }, "not hot before the bucket closes");
        // The half window closes: the hot set is what the window saw.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(h.lookup("viral", t1), Lookup::Miss { refresh: true }, "hot, nothing cached: this reader loads");
        h.fill("viral", counts(6), t1);
        assert_eq!(h.lookup("viral", t1 + Duration::from_millis(999)), Lookup::Fresh(counts(6)));
        assert_eq!(h.hot_keys(t1), 1);
        // Expired: the first reader refreshes, the others get the old counts.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(h.lookup("viral", t2), Lookup::Miss { refresh: true });
        assert_eq!(h.lookup("viral", t2), Lookup::Stale(counts(6)));
        assert_eq!(h.lookup("viral", t2), Lookup::Stale(counts(6)));
        h.fill("viral", counts(7), t2);
        assert_eq!(h.lookup("viral", t2), Lookup::Fresh(counts(7)));
    }

    #[test]
    fn readers_of_a_key_that_just_turned_hot_wait_for_the_first_load() {
        let h = HotKeys::new(settings());
        let t0 = Instant::now();
        read(&h, "viral", 5, t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(h.lookup("viral", t1), Lookup::Miss { refresh: true });
        let waiters: Vec<_> = (0..3)
            .map(|_| match h.lookup("viral", t1) {
                Lookup::Loading(rx) => rx,
                other => panic!("expected Loading, got {other:?}"),
            })
            .collect();
        assert!(waiters.iter().all(|rx| rx.borrow().is_none()));
        h.fill("viral", counts(4), t1);
        assert!(waiters.iter().all(|rx| *rx.borrow() == Some(counts(4))), "every waiter gets the answer");
        assert_eq!(h.lookup("viral", t1), Lookup::Fresh(counts(4)));

        // A failed first load closes the channel: the waiters read for themselves.
        read(&h, "other", 5, t1);
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(h.lookup("other", t2), Lookup::Miss { refresh: true });
        let Lookup::Loading(rx) = h.lookup("other", t2) else { panic!("expected Loading") };
        h.abandon("other");
        assert!(rx.has_changed().is_err(), "closed");
        assert_eq!(h.lookup("other", t2), Lookup::Miss { refresh: true }, "the next reader loads");
        // A loader that never comes back is replaced after a TTL.
        assert_eq!(h.lookup("other", t2 + Duration::from_millis(500)), Lookup::Loading(rx));
        assert_eq!(h.lookup("other", t2 + Duration::from_secs(1)), Lookup::Miss { refresh: true });
    }

    #[test]
    fn a_failed_refresh_lets_the_next_reader_try() {
        let h = HotKeys::new(settings());
        let t0 = Instant::now();
        read(&h, "k", 5, t0);
        let t1 = t0 + Duration::from_secs(5);
        h.lookup("k", t1);
        h.fill("k", counts(1), t1);
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(h.lookup("k", t2), Lookup::Miss { refresh: true });
        h.abandon("k");
        assert_eq!(h.lookup("k", t2), Lookup::Miss { refresh: true }, "the next reader refreshes");
        // That one never comes back (cancelled): after a TTL another takes over.
        assert_eq!(h.lookup("k", t2 + Duration::from_millis(500)), Lookup::Stale(counts(1)));
        assert_eq!(h.lookup("k", t2 + Duration::from_secs(1)), Lookup::Miss { refresh: true });
    }

    #[test]
    fn hits_in_both_halves_of_the_window_count_together() {
        // 2 reads in each half: 4 in the window, above min_hits 3, though
        // neither half alone reaches it.
        let h = HotKeys::new(settings());
        let t0 = Instant::now();
        read(&h, "steady", 2, t0);
        let t1 = t0 + Duration::from_secs(5);
        read(&h, "steady", 2, t1);
        assert_eq!(h.hot_keys(t1), 0, "one half alone is not enough");
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(h.hot_keys(t2), 1, "the window's 4 hits make it hot");
        // The next half without reads: the window holds only the 2 hits of
        // the half before, so it leaves.
        let t3 = t2 + Duration::from_secs(5);
        assert_eq!(h.hot_keys(t3), 0);
    }

    #[test]
    fn rarely_read_keys_stay_cold_and_are_never_cached() {
        let h = HotKeys::new(settings());
        let t0 = Instant::now();
        read(&h, "cold", 2, t0);
        let t1 = t0 + Duration::from_secs(5);
        h.lookup("cold", t1);
        h.fill("cold", counts(1), t1);
        assert_eq!(h.lookup("cold", t1), Lookup::Miss { refresh: false });
        assert_eq!(h.hot_keys(t1), 0);
    }

    #[test]
    fn only_the_top_k_become_hot_and_keys_leave_when_the_window_moves_on() {
        let h = HotKeys::new(HotSettings { top_k: SHARDS, ..settings() });
        let t0 = Instant::now();
        // 200 keys read 3..=202 times; at most one hot key per shard.
        for i in 0..200 {
            read(&h, &format!("k{i}"), 3 + i, t0);
        }
        let t1 = t0 + Duration::from_secs(5);
        let hot = h.hot_keys(t1);
        assert!(hot > 0 && hot <= SHARDS, "{hot} hot keys");
        // The most read key is the hottest of its shard.
        h.fill("k199", counts(9), t1);
        assert_eq!(h.lookup("k199", t1), Lookup::Fresh(counts(9)));
        // A whole window later without reads, nothing is hot.
        let t3 = t1 + Duration::from_secs(15);
        assert_eq!(h.hot_keys(t3), 0);
        assert_eq!(h.lookup("k199", t3), Lookup::Miss { refresh: false });
    }

    #[test]
    fn off_when_the_ttl_is_zero() {
        let mut c = CacheSettings::default();
        assert_eq!(c.hot_ttl_ms, 0);
        assert!(HotSettings::of(&c).is_none());
        c.hot_ttl_ms = 1000;
        let s = HotSettings::of(&c).unwrap();
        assert_eq!(s.ttl, Duration::from_secs(1));
    }
}
