//! This process's side of the write fence ([`thumbup_core::fence`]): whether
//! a tenant's writes may go through Redis here, the DB path's opening, and
//! the writes this process acknowledged that the DB may not hold yet.
//!
//! A write is acknowledged only if it was decided against the newest
//! acknowledged state of its record. Through Redis that holds while this
//! process holds a write lease (renewed in the DB while the fence says
//! Redis) and sends transition calls whose deadline ends with the lease.
//! When Redis fails here (a timeout, a broken connection, a call that started after
//! its deadline), this process asks for the DB path (a new fence epoch).
//! Then every process stops writing through Redis, waits for its calls in
//! flight, and publishes: it applies to the DB the writes it acknowledged
//! that the job's watermarks do not cover yet, and marks unsettled the
//! records whose call has an unknown outcome. The DB path opens once every
//! writer has published (or its lease ended below the watermarks), and
//! decides only records that are not unsettled. When Redis answers again,
//! the DB path is closed (waiting for its transactions), the cache entries
//! it changed are dropped, and Redis decides again.
//!
//! While the state cannot be known (the fence is moving, a record is
//! unsettled, the lease could not be renewed, a cache miss while the DB is
//! behind or down), a write is refused with UNAVAILABLE: never decided on
//! a state that may be stale.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use thumbup_core::event::LikeEvent;
use thumbup_core::fence::{self, Mode, RecordKey, View};
use thumbup_core::version::now_ms;
use tokio::sync::{Notify, RwLock, RwLockReadGuard, watch};
use tracing::{info, warn};

use crate::metrics;

/// How long a write lease lasts. A process that cannot reach the DB keeps
/// writing through Redis for at most this long; a process that died holds
/// the DB path shut for at most this long plus the job's lag.
pub const LEASE: Duration = Duration::from_secs(60);

/// How often a lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(1);

/// How often the fence is read while Redis decides (to notice another
/// process's request for the DB path), and while it does not.
pub const POLL_SERVING: Duration = Duration::from_millis(250);
/// See [`POLL_SERVING`].
pub const POLL_MOVING: Duration = Duration::from_millis(50);

/// How long a write waits for a path to decide it (the DB path to open, or
/// Redis to decide again) before UNAVAILABLE.
pub const PATH_WAIT: Duration = Duration::from_millis(500);

/// Which path decides this process's writes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Redis (under the lease).
    Redis,
    /// The DB path of this fence epoch.
    Db(i64),
    /// Neither: the fence is moving.
    Moving,
}

/// Allowed difference between this process's clock and Redis's, for the
/// cache-miss rule (a state key that expired was last written at least a
/// TTL ago, by Redis's clock).
const CLOCK_SKEW_MS: i64 = 2_000;

/// Acknowledged writes kept per tenant while the watermarks do not cover
/// them (about one job window of this process's writes). Past this the
/// oldest are dropped, and the DB path stays shut until the watermarks pass
/// what was dropped.
const MAX_TRACKED: usize = 1_000_000;

/// Where this process is in the fence's cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Local {
    /// Not yet registered as a writer.
    Starting,
    /// Writing through Redis under a lease.
    Redis,
    /// Redis failed here; the DB path is to be asked for.
    Suspect,
    /// Stopped writing through Redis for this epoch, not yet published.
    Fencing(i64),
    /// Published for this epoch; waiting for the other writers.
    Published(i64),
    /// The DB path of this epoch decides writes.
    Open(i64),
    /// The DB path is closed; the cache is being cleaned.
    Closing,
    /// No longer served by this process: its lease was shortened.
    Released,
}

/// Writes acknowledged through Redis whose stream entries may not be
/// applied yet, and records whose last call has an unknown outcome.
#[derive(Default)]
struct Tracked {
    /// Per shard: (stream entry ms, event), in acknowledgement order.
    acked: Vec<VecDeque<(i64, LikeEvent)>>,
    /// Per shard: (deadline ms, record) of calls with unknown outcome.
    unknown: Vec<VecDeque<(i64, RecordKey)>>,
    /// Per shard: the newest entry ms dropped for lack of room.
    dropped_up_to: Vec<i64>,
    len: usize,
}

impl Tracked {
    fn new(shards: u32) -> Tracked {
        let n = shards as usize;
        Tracked {
            acked: vec![VecDeque::new(); n],
            unknown: vec![VecDeque::new(); n],
            dropped_up_to: vec![i64::MIN; n],
            len: 0,
        }
    }

    fn prune(&mut self, view: &View) {
        for shard in 0..self.acked.len() {
            let w = view.watermark(shard as u32);
            while self.acked[shard].front().is_some_and(|(ms, _)| *ms < w) {
                self.acked[shard].pop_front();
                self.len -= 1;
            }
            while self.unknown[shard].front().is_some_and(|(deadline, _)| *deadline < w) {
                self.unknown[shard].pop_front();
                self.len -= 1;
            }
        }
    }

    fn make_room(&mut self) {
        while self.len >= MAX_TRACKED {
            // Drop the oldest entry of the fullest shard.
            let Some(shard) = (0..self.acked.len()).max_by_key(|s| self.acked[*s].len()) else { return };
            match self.acked[shard].pop_front() {
                Some((ms, _)) => self.dropped_up_to[shard] = self.dropped_up_to[shard].max(ms),
                None => {
                    let Some(u) = (0..self.unknown.len()).max_by_key(|s| self.unknown[*s].len()) else { return };
                    if let Some((deadline, _)) = self.unknown[u].pop_front() {
                        self.dropped_up_to[u] = self.dropped_up_to[u].max(deadline);
                    }
                }
            }
            self.len -= 1;
        }
    }

    /// What to publish: the acknowledged events and unknown records not
    /// covered by `view`'s watermarks; `None` when some were dropped.
    fn publication(&self, view: &View) -> Option<(Vec<LikeEvent>, Vec<RecordKey>)> {
        let mut events = Vec::new();
        let mut unknown = Vec::new();
        for shard in 0..self.acked.len() {
            let w = view.watermark(shard as u32);
            if self.dropped_up_to[shard] >= w {
                return None;
            }
            events.extend(self.acked[shard].iter().filter(|(ms, _)| *ms >= w).map(|(_, e)| e.clone()));
            unknown.extend(self.unknown[shard].iter().filter(|(d, _)| *d >= w).map(|(_, r)| *r));
        }
        Some((events, unknown))
    }
}

static NEXT_WRITER: AtomicU64 = AtomicU64::new(0);

/// A name for this process's writer of one tenant, unique across processes
/// and across config reloads in one process.
fn writer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let n = NEXT_WRITER.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("{host}/{}/{}/{n}", std::process::id(), now_ms());
    name.truncate(128);
    name
}

/// One tenant's fence state in this process.
pub struct Fence {
    tenant: String,
    shards: u32,
    instance: String,
    local: Mutex<Local>,
    /// Writes may go through Redis (local mode Redis).
    redis_writes: AtomicBool,
    /// Reads may go through Redis (the fence says Redis and Redis answered).
    redis_reads: AtomicBool,
    /// End of this process's lease (Unix ms; 0: none).
    lease_until: AtomicI64,
    last_renew: Mutex<Option<Instant>>,
    /// Redis-path writes hold it shared for their call; fencing takes it
    /// exclusively to wait for the calls in flight.
    in_flight: RwLock<()>,
    tracked: Mutex<Tracked>,
    view: Mutex<Option<View>>,
    /// Which path decides writes, for writes waiting for one.
    path: watch::Sender<Path>,
    /// Wakes the fence loop early (a failure seen by a request).
    pub(crate) wake: Notify,
    /// When a holdout or an unreadable fence was last logged.
    last_holdout_log: Mutex<Option<Instant>>,
}

/// What a Redis-path write may do: send transition calls with this deadline cap
/// while holding the guard.
pub struct Permit<'a> {
    _guard: RwLockReadGuard<'a, ()>,
    /// Calls must not take effect after this (Unix ms).
    pub lease_until: i64,
}

impl Fence {
    /// The fence of `tenant` (with `shards` stream shards), not yet registered.
    pub fn new(tenant: &str, shards: u32) -> Fence {
        let shards = shards.max(1);
        Fence {
            tenant: tenant.to_string(),
            shards,
            instance: writer_name(),
            local: Mutex::new(Local::Starting),
            redis_writes: AtomicBool::new(false),
            // Reads may use Redis until the fence is known to say otherwise
            // (a process starting while the DB is down still serves them).
            redis_reads: AtomicBool::new(true),
            lease_until: AtomicI64::new(0),
            last_renew: Mutex::new(None),
            in_flight: RwLock::new(()),
            tracked: Mutex::new(Tracked::new(shards)),
            view: Mutex::new(None),
            path: watch::channel(Path::Moving).0,
            wake: Notify::new(),
            last_holdout_log: Mutex::new(None),
        }
    }

    /// This process's writer name in `fence_writers`.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn local(&self) -> Local {
        *self.local.lock().expect("fence lock")
    }

    fn set_local(&self, l: Local) {
        let mut cur = self.local.lock().expect("fence lock");
        // Released is final: a step still running must not revive it.
        if *cur != l && *cur != Local::Released {
            let redis = l == Local::Redis;
            self.redis_writes.store(redis, Ordering::Release);
            self.redis_reads.store(redis, Ordering::Release);
            metrics::REDIS_DOWN.with_label_values(&[&self.tenant]).set(if redis { 0 } else { 1 });
            let path = match l {
                Local::Redis => Path::Redis,
                Local::Open(e) => Path::Db(e),
                _ => Path::Moving,
            };
            self.path.send_replace(path);
            metrics::DB_PATH_OPEN.with_label_values(&[&self.tenant]).set(i64::from(matches!(path, Path::Db(_))));
            info!(tenant = %self.tenant, from = ?*cur, to = ?l, "write fence");
            *cur = l;
        }
    }

    /// True while reads may be served from Redis.
    pub fn redis_reads(&self) -> bool {
        self.redis_reads.load(Ordering::Acquire)
    }

    /// A permit to write through Redis, or `None` when writes do not go
    /// through Redis here now (the fence is moving, or the lease is about
    /// to end).
    pub async fn redis_permit(&self) -> Option<Permit<'_>> {
        if !self.redis_writes.load(Ordering::Acquire) {
            return None;
        }
        let guard = self.in_flight.read().await;
        // Checked again under the guard: fencing clears the flag, then waits
        // for every guard, so no call starts after it stopped waiting.
        let lease_until = self.lease_until.load(Ordering::Acquire);
        if !self.redis_writes.load(Ordering::Acquire) || lease_until <= now_ms() + 10 {
            return None;
        }
        Some(Permit { _guard: guard, lease_until })
    }

    /// Notes a write acknowledged through Redis (call with the permit held).
    pub fn acknowledged(&self, shard: u32, stream_ms: i64, event: LikeEvent) {
        let mut t = self.tracked.lock().expect("tracked lock");
        t.make_room();
        t.acked[shard as usize % self.shards as usize].push_back((stream_ms, event));
        t.len += 1;
    }

    /// Notes a call whose outcome is unknown (call with the permit held):
    /// it may take effect up to `deadline_ms`.
    pub fn unknown_outcome(&self, shard: u32, deadline_ms: i64, record: RecordKey) {
        let mut t = self.tracked.lock().expect("tracked lock");
        t.make_room();
        t.unknown[shard as usize % self.shards as usize].push_back((deadline_ms, record));
        t.len += 1;
    }

    /// Redis failed here: stop writing and reading through it, and ask for
    /// the DB path.
    pub fn redis_failed(&self, why: &dyn std::fmt::Display) {
        let mut cur = self.local.lock().expect("fence lock");
        if *cur == Local::Redis || *cur == Local::Starting {
            warn!(tenant = %self.tenant, error = %why, "redis failed: stopping writes through it and asking for the DB path");
            self.redis_writes.store(false, Ordering::Release);
            metrics::REDIS_DOWN.with_label_values(&[&self.tenant]).set(1);
            self.path.send_replace(Path::Moving);
            *cur = Local::Suspect;
        }
        self.redis_reads.store(false, Ordering::Release);
        drop(cur);
        self.wake.notify_one();
    }

    /// The path that decides writes, waiting up to `wait` while the fence
    /// is moving.
    pub async fn wait_path(&self, wait: Duration) -> Path {
        let mut rx = self.path.subscribe();
        match tokio::time::timeout(wait, rx.wait_for(|p| *p != Path::Moving)).await {
            Ok(Ok(p)) => *p,
            _ => Path::Moving,
        }
    }

    /// The path that decides writes now.
    pub fn path(&self) -> Path {
        *self.path.borrow()
    }

    /// Redis answered late or not at all for one call: have the fence loop
    /// check it now (a PING that fails asks for the DB path; one slow
    /// answer does not).
    pub fn check_soon(&self) {
        self.wake.notify_one();
    }

    /// True when a state that Redis does not cache can be read from the DB
    /// as the newest acknowledged one: every stream entry of `shard` old
    /// enough for its state key to have expired (`ttl_secs`) is applied.
    /// Absent keys are never written, expired, or dropped after the DB path
    /// wrote them (the DB holds the newest); eviction must be off.
    pub fn seed_provable(&self, shard: u32, ttl_secs: u64) -> bool {
        let view = self.view.lock().expect("view lock");
        let Some(v) = view.as_ref() else { return false };
        let ttl_ms = (ttl_secs as i64).saturating_mul(1000);
        v.watermark(shard) > now_ms().saturating_sub(ttl_ms).saturating_add(CLOCK_SKEW_MS)
    }

    /// True when the job has provably applied every entry of `shard` up to
    /// Unix ms `at` (Redis clock, with the clock-skew margin).
    pub fn applied_past(&self, shard: u32, at: i64) -> bool {
        let view = self.view.lock().expect("view lock");
        view.as_ref().is_some_and(|v| v.watermark(shard) > at.saturating_add(CLOCK_SKEW_MS))
    }

    /// One step of the fence loop; `ping` tells whether Redis answers.
    pub(crate) async fn step<P, D>(&self, pool: &sqlx::MySqlPool, ping: P, drain: D)
    where
        P: AsyncFnOnce() -> bool,
        D: AsyncFnOnce() -> Result<usize, String>,
    {
        if self.local() == Local::Released {
            return;
        }
        let mut view = match fence::view(pool).await {
            Ok(v) => v,
            Err(e) => {
                // Without the DB nothing can move. A process that saw Redis
                // fail goes back to it if it answers and the lease holds: any
                // process that asked for the DB path meanwhile waits for this
                // one's publication, which it makes once the DB answers.
                if self.local() == Local::Suspect
                    && self.lease_until.load(Ordering::Acquire) > now_ms() + 1_000
                    && ping().await
                {
                    info!(tenant = %self.tenant, "redis answers again (database unreachable; writing under the lease)");
                    self.set_local(Local::Redis);
                } else {
                    let mut last = self.last_holdout_log.lock().expect("log lock");
                    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        warn!(tenant = %self.tenant, error = %e, "write fence unreadable (is the schema migrated?)");
                        *last = Some(Instant::now());
                    }
                }
                return;
            }
        };
        self.tracked.lock().expect("tracked lock").prune(&view);
        *self.view.lock().expect("view lock") = Some(view.clone());
        metrics::FENCE_EPOCH.with_label_values(&[&self.tenant]).set(view.epoch);
        let local = self.local();
        // Redis answers again before anyone asked for the DB path (a flip
        // of the Redis tier moved this process's sessions to the promoted
        // replica, which holds every acknowledged write): go back to it
        // under the lease, as when the DB is unreachable, rather than send
        // every process through the DB path.
        let ping = if local == Local::Suspect
            && view.mode == Mode::Redis
            && self.lease_until.load(Ordering::Acquire) > now_ms() + 1_000
        {
            if ping().await {
                info!(tenant = %self.tenant, "redis answers again before the DB path was asked for; writing under the lease");
                self.set_local(Local::Redis);
                return;
            }
            None
        } else {
            Some(ping)
        };
        // Pinged just now without an answer: that stands for this step.
        let ping = async move || match ping {
            Some(p) => p().await,
            None => false,
        };
        if local == Local::Suspect && view.mode == Mode::Redis {
            match fence::raise(pool).await {
                Ok(epoch) => {
                    warn!(tenant = %self.tenant, epoch, "asked for the DB path");
                    view.mode = Mode::Db;
                    view.epoch = epoch;
                }
                Err(e) => {
                    warn!(tenant = %self.tenant, error = %e, "asking for the DB path failed");
                    return;
                }
            }
        }
        match view.mode {
            Mode::Redis => self.serve_redis(pool, local, ping).await,
            Mode::Db => self.toward_db(pool, local, &view, ping).await,
            Mode::Closing => {
                self.set_local(Local::Closing);
                if ping().await {
                    match drain().await {
                        Ok(n) => match fence::reopen_redis(pool, view.epoch).await {
                            Ok(true) => {
                                info!(tenant = %self.tenant, epoch = view.epoch, invalidated = n, "writes back on redis")
                            }
                            Ok(false) => {}
                            Err(e) => warn!(tenant = %self.tenant, error = %e, "handing writes back to redis failed"),
                        },
                        Err(e) => warn!(tenant = %self.tenant, error = %e, "dropping what the DB path changed failed"),
                    }
                }
            }
        }
    }

    async fn renew(&self, pool: &sqlx::MySqlPool) -> Result<bool, sqlx::Error> {
        let until = now_ms() + LEASE.as_millis() as i64;
        let (mode, _) = fence::renew_lease(pool, &self.instance, until).await?;
        if mode == Mode::Redis {
            self.lease_until.fetch_max(until, Ordering::AcqRel);
            *self.last_renew.lock().expect("renew lock") = Some(Instant::now());
        }
        Ok(mode == Mode::Redis)
    }

    async fn serve_redis<P: AsyncFnOnce() -> bool>(&self, pool: &sqlx::MySqlPool, local: Local, ping: P) {
        if local == Local::Redis {
            // Notice an outage without a request paying for it.
            if !ping().await {
                self.redis_failed(&"redis does not answer PING");
                return;
            }
            let due = self.last_renew.lock().expect("renew lock").is_none_or(|t| t.elapsed() >= RENEW_EVERY);
            if due && let Err(e) = self.renew(pool).await {
                warn!(tenant = %self.tenant, error = %e, "renewing the write lease failed");
            }
            return;
        }
        // Redis decides (again): come back once Redis answers.
        if ping().await {
            match self.renew(pool).await {
                Ok(true) => self.set_local(Local::Redis),
                Ok(false) => {}
                Err(e) => warn!(tenant = %self.tenant, error = %e, "taking a write lease failed"),
            }
        } else if local == Local::Starting {
            // Redis is down at start: ask for the DB path.
            self.redis_failed(&"redis not reachable at start");
        }
    }

    async fn toward_db<P: AsyncFnOnce() -> bool>(&self, pool: &sqlx::MySqlPool, local: Local, view: &View, ping: P) {
        let epoch = view.epoch;
        match local {
            Local::Open(e) if e == epoch => {
                if ping().await {
                    match fence::close(pool, epoch).await {
                        Ok(true) => {
                            info!(tenant = %self.tenant, epoch, "redis answers: closed the DB path");
                            self.set_local(Local::Closing);
                        }
                        Ok(false) => {}
                        Err(e) => warn!(tenant = %self.tenant, error = %e, "closing the DB path failed"),
                    }
                }
                return;
            }
            Local::Published(e) if e == epoch => {}
            _ => {
                self.set_local(Local::Fencing(epoch));
                // Wait for this process's calls in flight: each ends within
                // the Redis timeout, and none can act after that.
                drop(self.in_flight.write().await);
                let publication = self.tracked.lock().expect("tracked lock").publication(view);
                let Some((events, unknown)) = publication else {
                    warn!(tenant = %self.tenant, epoch, "too many unapplied writes were tracked to publish; the DB path stays shut until redis returns");
                    return;
                };
                match fence::publish(pool, &self.instance, epoch, &events, &unknown).await {
                    Ok(true) => {
                        info!(tenant = %self.tenant, epoch, applied = events.len(), unsettled = unknown.len(), "published for the DB path");
                        self.set_local(Local::Published(epoch));
                    }
                    Ok(false) => return,
                    Err(e) => {
                        warn!(tenant = %self.tenant, error = %e, "publishing for the DB path failed");
                        return;
                    }
                }
            }
        }
        match fence::holdouts(pool, epoch, view.min_watermark(self.shards)).await {
            Ok(h) if h.is_empty() => self.set_local(Local::Open(epoch)),
            Ok(h) => {
                let mut last = self.last_holdout_log.lock().expect("log lock");
                if last.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    warn!(tenant = %self.tenant, epoch, holdouts = ?h, "the DB path waits for writers that have not published");
                    *last = Some(Instant::now());
                }
            }
            Err(e) => warn!(tenant = %self.tenant, error = %e, "reading the writers failed"),
        }
    }

    /// Forgets writers whose writes are all applied (while Redis decides).
    pub(crate) async fn forget_expired(&self, pool: &sqlx::MySqlPool) {
        let min = self.view.lock().expect("view lock").as_ref().map(|v| v.min_watermark(self.shards));
        if let Some(min) = min
            && let Err(e) = fence::forget_expired_writers(pool, min).await
        {
            tracing::debug!(tenant = %self.tenant, error = %e, "forgetting expired writers failed");
        }
    }

    /// Stops writing through Redis and ends the lease soon (this tenant is
    /// no longer served by this process): once the job has applied what it
    /// acknowledged, it no longer holds the DB path shut.
    pub(crate) async fn release(&self, pool: &sqlx::MySqlPool, redis_timeout: Duration) {
        self.set_local(Local::Released);
        drop(self.in_flight.write().await);
        let until = now_ms() + redis_timeout.as_millis() as i64;
        if let Err(e) = fence::release_lease(pool, &self.instance, until).await {
            warn!(tenant = %self.tenant, error = %e, "releasing the write lease failed");
        }
    }

    /// True while this process's local view is that Redis decides writes.
    pub fn redis_writes(&self) -> bool {
        self.redis_writes.load(Ordering::Acquire)
    }

    /// How soon the fence loop should run again.
    pub(crate) fn pause(&self) -> Duration {
        if self.local() == Local::Redis { POLL_SERVING } else { POLL_MOVING }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thumbup_core::domain::State;

    fn event(mid: i64, version: i64) -> LikeEvent {
        LikeEvent {
            mid,
            business_id: 1,
            message_id: 2,
            up_mid: 3,
            state: State::Like,
            prev: State::None,
            version,
            mtime_ms: 0,
        }
    }

    #[test]
    fn publication_holds_what_the_watermarks_do_not_cover_and_refuses_after_a_drop() {
        let mut t = Tracked::new(2);
        t.acked[0].push_back((100, event(2, 1)));
        t.acked[0].push_back((200, event(4, 2)));
        t.unknown[1].push_back((150, (3, 1, 2)));
        t.len = 3;
        let view = View::new(Mode::Redis, 0, 0, [(0, 150), (1, 100)].into());
        let (events, unknown) = t.publication(&view).unwrap();
        assert_eq!(events.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2]);
        assert_eq!(unknown, vec![(3, 1, 2)]);
        t.prune(&view);
        assert_eq!(t.len, 2);
        t.dropped_up_to[1] = 120;
        assert!(t.publication(&view).is_none(), "a dropped entry above the watermark makes the publication incomplete");
        let later = View::new(Mode::Redis, 0, 0, [(0, 150), (1, 121)].into());
        assert!(t.publication(&later).is_some());
    }
}
