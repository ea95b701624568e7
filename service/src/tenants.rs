//! Tenant runtimes: per tenant its config, Redis and DB clients, rate
//! limiters and its write fence ([`crate::fence`]); the registry swaps them
//! on config reload.
//!
//! The registry re-reads the config file and the credential files it
//! references every [`POLL_INTERVAL`] and on SIGHUP, and installs the
//! resolved config when it differs from the last one read. Comparing
//! contents, not mtimes, follows Kubernetes' ConfigMap and Secret updates,
//! which swap a `..data` symlink. Or it follows the registry ConfigMap and
//! Secret through the Kubernetes API ([`crate::registry_api`]), which sees
//! a new tenant as soon as the operator writes it, not when the kubelet
//! syncs the files; both sources install through [`Registry::offer`].

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use sqlx::MySqlPool;
use thumbup_core::cache::Conn;
use thumbup_core::cache::{self, Scripts};
use thumbup_core::config::{Config, ConfigError, RedisConfig, TenantConfig};
use thumbup_core::db;
use thumbup_core::keys::Keys;
use thumbup_core::version::VersionClock;
use tracing::{info, warn};

use crate::fence::Fence;
use crate::metrics;

/// Rate limits of one tenant in this process: token buckets (governor's
/// GCRA) that start full, hold at most one second's tokens and refill at
/// the configured rate. The tenant-wide and DB-path limits are one atomic
/// each; the per-user limit is a sharded map of users, swept of users whose
/// bucket is full again by the tenant's fence loop ([`Limiter::sweep`], every
/// second), off the request path: it holds only users seen in the last
/// two seconds or so (a user stays two refill intervals after its last
/// write, at most 2 s), however many users come.
pub struct Limiter {
    tenant: DefaultDirectRateLimiter,
    /// None when `limits.db_fallback_per_sec` is 0: no write takes the DB path.
    fallback: Option<DefaultDirectRateLimiter>,
    users: DefaultKeyedRateLimiter<i64>,
}

/// A quota of `rate` per second with a burst of `rate`; None for 0.
fn per_second(rate: u32) -> Option<Quota> {
    NonZeroU32::new(rate).map(Quota::per_second)
}

impl Limiter {
    fn new(t: &TenantConfig) -> Limiter {
        // Config validation refuses a zero tenant or per-user limit.
        let at_least_one = |rate: u32| per_second(rate).unwrap_or(Quota::per_second(NonZeroU32::MIN));
        Limiter {
            tenant: RateLimiter::direct(at_least_one(t.limits.per_tenant_per_sec)),
            fallback: per_second(t.limits.db_fallback_per_sec).map(RateLimiter::direct),
            users: RateLimiter::keyed(at_least_one(t.limits.per_mid_per_sec)),
        }
    }

    /// Drops the users whose bucket is full again (they are as if never
    /// seen) and gives their memory back; returns how many users are left.
    pub fn sweep(&self) -> usize {
        self.users.retain_recent();
        self.users.shrink_to_fit();
        self.users.len()
    }
}

/// How often the fence loop sweeps the per-user limiter.
const LIMITER_SWEEP: Duration = Duration::from_secs(1);

/// One tenant as this process serves it.
pub struct Tenant {
    /// Its config.
    pub cfg: TenantConfig,
    /// Its key layout.
    pub keys: Keys,
    /// Redis with the tenant's ACL user.
    pub redis: Conn,
    /// The replicas a transition waits for before its reply
    /// (`redis.replica_acks`; group commit per stream shard).
    pub replication: std::sync::Arc<thumbup_core::conn::Replication>,
    /// The failover controller's word that the Redis stands alone (no
    /// replica to wait for).
    pub solo: cache::Solo,
    /// The tenant schema with the tenant's DB user.
    pub db: MySqlPool,
    /// Version source for the DB path.
    pub clock: VersionClock,
    /// The local hot-key cache of counts; None when `cache.hot_ttl_ms` is 0.
    pub hot: Option<crate::hot::HotKeys>,
    /// Whether writes go through Redis here, and the DB path's opening.
    pub fence: Fence,
    /// Signs and checks the tenant's page tokens.
    pub page_key: crate::page::PageKey,
    /// This datacenter's Redis and DB for reads (`local_reads`).
    local: Option<Local>,
    limiter: Limiter,
    /// Until when (ms since `born`) the DB counts as down after a connection
    /// failure, so that requests fail fast instead of each waiting out the
    /// pool's acquire timeout.
    db_down_until: AtomicU64,
    born: Instant,
}

/// How long the DB is skipped after a connection failure.
const DB_BREAK: Duration = Duration::from_secs(1);

/// This datacenter's servers, for reads: replicas of the active
/// datacenter's (or the active ones themselves). While either failed to
/// answer within the last [`DB_BREAK`], reads go to the tenant's own.
struct Local {
    redis: Conn,
    db: MySqlPool,
    /// Until when (ms since the tenant's `born`) reads skip these.
    down_until: AtomicU64,
}

/// Where a read goes: this datacenter's servers, or the tenant's own (the
/// active datacenter's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `local_reads`.
    Local,
    /// `redis` and `db`.
    Own,
}

impl Tenant {
    fn new(cfg: TenantConfig, redis_timeout: Duration) -> Result<Tenant, String> {
        // A WAIT holds the (multiplexed) connection it is sent on for up to
        // replica_timeout_ms: a health check queued behind it must not time
        // out, or every missed wait would take the tenant off Redis.
        if cfg.redis.replica_acks > 0 && Duration::from_millis(cfg.redis.replica_timeout_ms) >= redis_timeout {
            return Err(format!(
                "redis.replica_timeout_ms ({} ms) must be below this service's Redis timeout ({} ms, \
                 --redis-timeout-ms): a replica wait holds the connection, and a PING queued behind it would time out",
                cfg.redis.replica_timeout_ms,
                redis_timeout.as_millis()
            ));
        }
        let redis = cache::connect_lazy(&cfg.redis, redis_timeout).map_err(|e| format!("redis: {e}"))?;
        let db = db::connect_lazy(&cfg).map_err(|e| format!("db: {e}"))?;
        let local = match &cfg.local_reads {
            None => None,
            Some(l) => {
                let redis_cfg = RedisConfig { url: l.redis_url.clone(), ..cfg.redis.clone() };
                let redis = cache::connect_lazy(&redis_cfg, redis_timeout)
                    .map_err(|e| format!("local_reads.redis_url: {e}"))?;
                let mut db_cfg = cfg.clone();
                db_cfg.db.url = l.db_url.clone();
                let db = db::connect_lazy(&db_cfg).map_err(|e| format!("local_reads.db_url: {e}"))?;
                Some(Local { redis, db, down_until: AtomicU64::new(0) })
            }
        };
        let keys = Keys::new(&cfg.name, cfg.stream.shards);
        Ok(Tenant {
            local,
            solo: cache::Solo::new(&keys),
            keys,
            limiter: Limiter::new(&cfg),
            clock: VersionClock::default(),
            hot: crate::hot::HotSettings::of(&cfg.cache).map(crate::hot::HotKeys::new),
            fence: Fence::new(&cfg.name, cfg.stream.shards),
            replication: thumbup_core::conn::Replication::new(
                cfg.redis.replica_acks,
                Duration::from_millis(cfg.redis.replica_timeout_ms),
                cfg.stream.shards,
            ),
            page_key: crate::page::PageKey::for_tenant(&cfg),
            db_down_until: AtomicU64::new(0),
            born: Instant::now(),
            cfg,
            redis,
            db,
        })
    }

    /// The tenant's name.
    pub fn name(&self) -> &str {
        &self.cfg.name
    }

    /// True when `token` is one of the tenant's.
    pub fn accepts(&self, token: &str) -> bool {
        self.cfg.tokens.iter().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    }

    /// Takes a token of the tenant-wide limit.
    pub fn allow_request(&self) -> bool {
        self.limiter.tenant.check().is_ok()
    }

    /// Takes a token of the per-user write limit.
    pub fn allow_write(&self, mid: i64) -> bool {
        self.limiter.users.check_key(&mid).is_ok()
    }

    /// Takes a token of the DB-path write limit.
    pub fn allow_fallback(&self) -> bool {
        self.limiter.fallback.as_ref().is_some_and(|l| l.check().is_ok())
    }

    /// False for a moment after the DB could not be reached.
    pub fn db_available(&self) -> bool {
        (self.born.elapsed().as_millis() as u64) >= self.db_down_until.load(Ordering::Relaxed)
    }

    /// Notes a DB error; a connection failure skips the DB for [`DB_BREAK`].
    pub fn db_failed(&self, e: &sqlx::Error) {
        if db::is_down(e) {
            let until = (self.born.elapsed() + DB_BREAK).as_millis() as u64;
            if self.db_available() {
                warn!(tenant = %self.cfg.name, error = %e, "database unreachable: failing fast for {DB_BREAK:?}");
            }
            self.db_down_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// True while reads may be served from Redis.
    pub fn redis_up(&self) -> bool {
        self.fence.redis_reads()
    }

    fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Where reads go now: this datacenter's servers when `local_reads` is
    /// set and they answered lately, else the tenant's own.
    pub fn read_source(&self) -> Source {
        match &self.local {
            Some(l) if self.now_ms() >= l.down_until.load(Ordering::Relaxed) => Source::Local,
            _ => Source::Own,
        }
    }

    /// The Redis connection of reads from `source`.
    pub fn read_redis(&self, source: Source) -> Conn {
        match (&self.local, source) {
            (Some(l), Source::Local) => l.redis.clone(),
            _ => self.redis.clone(),
        }
    }

    /// The DB pool of reads from `source`.
    pub fn read_db(&self, source: Source) -> &MySqlPool {
        match (&self.local, source) {
            (Some(l), Source::Local) => &l.db,
            _ => &self.db,
        }
    }

    /// Notes that this datacenter's servers failed a read: reads go to the
    /// tenant's own for [`DB_BREAK`].
    pub fn local_failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let Some(l) = &self.local else { return };
        let until = (self.born.elapsed() + DB_BREAK).as_millis() as u64;
        if l.down_until.fetch_max(until, Ordering::Relaxed) <= self.now_ms() {
            warn!(tenant = %self.cfg.name, %error, "this datacenter's {what} failed a read: reading from the active datacenter for {DB_BREAK:?}");
        }
        crate::metrics::LOCAL_READ_FAILURES.with_label_values(&[&self.cfg.name, what]).inc();
    }

    /// Records that Redis could not be reached: writes stop going through
    /// it here and the fence asks for the DB path; reads take the DB.
    pub fn mark_redis_down(&self, why: &redis::RedisError) {
        self.fence.redis_failed(why);
    }

    /// Drops the cache entries of records the DB path changed and caches
    /// the DB's counts of their items and owners afresh; returns how many.
    /// A user's cache forgets only those records (the rest of it stays, and
    /// may hold states newer than the DB's: transitions whose outcome the
    /// DB path could not know, still in the stream). The counts are deleted
    /// (a cached value of an older DB primary may be newer than this one's)
    /// and then written from the DB with their versions, so that a fill
    /// that read the DB before the DB path changed it, and reaches Redis
    /// only now (held up by a failover), is refused instead of filling the
    /// deleted key with a stale count for good.
    async fn drain_invalidations(&self) -> Result<usize, String> {
        let mut con = self.redis.clone();
        let scripts = cache::Scripts::default();
        let mut total = 0;
        loop {
            let batch = db::pending_invalidations(&self.db, 500).await.map_err(|e| format!("db: {e}"))?;
            let Some(max_id) = batch.iter().map(|r| r.0).max() else { return Ok(total) };
            let mut keys = Vec::with_capacity(batch.len() * 3);
            let mut users: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            let mut items = Vec::with_capacity(batch.len());
            let mut owners = Vec::with_capacity(batch.len());
            for &(_, mid, biz, msg, up) in &batch {
                users.entry(self.keys.user(mid, biz)).or_default().push(msg);
                items.push((biz, msg));
                keys.push(self.keys.counts(biz, msg));
                // Owners whose likes the DB path moved: their received likes.
                owners.push((biz, up));
                keys.push(self.keys.received(biz, up));
                // The DB path wrote a record that no newest-user bound saw.
                keys.push(self.keys.newest(self.keys.shard_of(mid), biz));
            }
            keys.sort_unstable();
            keys.dedup();
            for v in [&mut items, &mut owners] {
                v.sort_unstable();
                v.dedup();
            }
            let users: Vec<(String, Vec<i64>)> = users.into_iter().collect();
            scripts.forget(&mut con, &users).await.map_err(|e| format!("redis: {e}"))?;
            cache::delete(&mut con, &keys).await.map_err(|e| format!("redis: {e}"))?;
            let ttl = self.cfg.cache.counts_ttl_secs;
            cache::refresh_from_db(&scripts, &mut con, &self.db, &self.keys, &items, &owners, ttl)
                .await
                .map_err(|e| e.to_string())?;
            db::clear_invalidations(&self.db, max_id).await.map_err(|e| format!("db: {e}"))?;
            total += batch.len();
        }
    }

    async fn ping(&self) -> bool {
        let mut con = self.redis.clone();
        cache::ping(&mut con).await
    }

    /// One pass of the fence loop.
    async fn step(&self) {
        self.fence.step(&self.db, async || self.ping().await, async || self.drain_invalidations().await).await;
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a tenant's write fence for as long as the tenant is served (after
/// the first step, which [`Registry::install`] runs before the tenant
/// serves); then releases its write lease.
async fn fence_loop(tenant: Weak<Tenant>) {
    let mut last_sweep = Instant::now();
    let mut last_limiter_sweep = Instant::now();
    loop {
        let Some(t) = tenant.upgrade() else { return };
        t.step().await;
        if last_limiter_sweep.elapsed() >= LIMITER_SWEEP {
            metrics::LIMITER_USERS.with_label_values(&[t.name()]).set(t.limiter.sweep() as i64);
            last_limiter_sweep = Instant::now();
        }
        if t.fence.redis_writes() && last_sweep.elapsed() > Duration::from_secs(5) {
            // Leftovers of a process that died while the DB path was open,
            // and writers whose writes are all applied.
            if let Err(e) = t.drain_invalidations().await {
                warn!(tenant = %t.cfg.name, error = %e, "sweeping cache invalidations failed");
            }
            t.fence.forget_expired(&t.db).await;
            last_sweep = Instant::now();
        }
        let pause = t.fence.pause();
        let wake = async { t.fence.wake.notified().await };
        tokio::select! {
            _ = wake => {}
            _ = tokio::time::sleep(pause) => {}
        }
        if Arc::strong_count(&t) == 1 {
            // Only this loop holds the tenant: it is no longer served.
            t.fence.release(&t.db, Duration::from_secs(1)).await;
            return;
        }
    }
}

/// How often the config file and its credential files are re-read.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the tenants come from.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    /// The tenant config file.
    pub path: PathBuf,
    /// The directory relative `password_file` / `tokens_file` paths resolve
    /// against (default: the config file's directory).
    pub secrets_dir: Option<PathBuf>,
    /// Start with no tenants while the config file does not exist, and
    /// serve it once it appears (a ConfigMap created after the service).
    pub optional: bool,
}

impl ConfigSource {
    /// Reads the config and its credential files.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load_with(&self.path, self.secrets_dir.as_deref())
    }
}

/// Logs what [`Registry::offer`] did with a read of `source`.
pub(crate) fn report(source: &str, outcome: Option<Result<(), String>>) {
    match outcome {
        None => {}
        Some(Ok(())) => info!(source, "config reloaded"),
        Some(Err(e)) => warn!(source, error = %e, "config reload failed; keeping the old config"),
    }
}

/// What the last read of the source gave: the resolved config, or the
/// error. A poll acts only when this changes, so a broken file is reported
/// once, not every poll.
type LastRead = Option<Result<Config, String>>;

/// The tenants served, swapped whole on reload.
pub struct Registry {
    source: Option<ConfigSource>,
    redis_timeout: Duration,
    current: RwLock<Arc<HashMap<String, Arc<Tenant>>>>,
    scripts: Scripts,
    /// Held through a reload, so reloads do not interleave.
    last_read: tokio::sync::Mutex<LastRead>,
    /// Set once the registry is followed through the Kubernetes API: the
    /// files are no longer read.
    followed: std::sync::atomic::AtomicBool,
}

impl Registry {
    /// Builds the registry from a config; `source`, if any, is re-read by
    /// [`Registry::reload`] and [`Registry::watch`].
    pub async fn new(
        config: Config,
        source: Option<ConfigSource>,
        redis_timeout: Duration,
    ) -> Result<Arc<Registry>, String> {
        let last_read = Some(Ok(config.clone()));
        let reg = Registry::empty(source, redis_timeout, last_read);
        reg.install(config).await?;
        Ok(reg)
    }

    /// Builds the registry from its source. A config file that does not
    /// exist is an error, unless the source is optional: then the registry
    /// starts with no tenants.
    pub async fn open(source: ConfigSource, redis_timeout: Duration) -> Result<Arc<Registry>, String> {
        match source.load() {
            Ok(config) => Registry::new(config, Some(source), redis_timeout).await,
            Err(ConfigError::Read { path, source: e })
                if source.optional && e.kind() == std::io::ErrorKind::NotFound =>
            {
                warn!(%path, "config file does not exist yet: serving no tenants until it appears");
                let last = Some(Err(ConfigError::Read { path, source: e }.to_string()));
                Ok(Registry::empty(Some(source), redis_timeout, last))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    fn empty(source: Option<ConfigSource>, redis_timeout: Duration, last_read: LastRead) -> Arc<Registry> {
        Arc::new(Registry {
            source,
            redis_timeout,
            current: RwLock::new(Arc::new(HashMap::new())),
            scripts: Scripts::default(),
            last_read: tokio::sync::Mutex::new(last_read),
            followed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// How long a Redis command may take before Redis counts as down.
    pub fn redis_timeout(&self) -> Duration {
        self.redis_timeout
    }

    /// The shared Redis scripts.
    pub fn scripts(&self) -> &Scripts {
        &self.scripts
    }

    /// Stops writing through Redis for every tenant and shortens this
    /// process's write leases to the Redis timeout (at shutdown): once the
    /// job has applied what this process acknowledged, it no longer holds
    /// any tenant's DB path shut.
    pub async fn release_all(&self) {
        let tenants: Vec<Arc<Tenant>> = self.current.read().expect("registry lock").values().cloned().collect();
        for t in tenants {
            t.fence.release(&t.db, self.redis_timeout).await;
        }
    }

    /// The tenant named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Tenant>> {
        self.current.read().expect("registry lock").get(name).cloned()
    }

    async fn install(&self, config: Config) -> Result<(), String> {
        let old = self.current.read().expect("registry lock").clone();
        let mut next = HashMap::new();
        let mut started = Vec::new();
        for cfg in config.tenants {
            match old.get(&cfg.name) {
                Some(t) if t.cfg == cfg => {
                    next.insert(cfg.name.clone(), t.clone());
                }
                _ => {
                    let name = cfg.name.clone();
                    let t = Arc::new(Tenant::new(cfg, self.redis_timeout).map_err(|e| format!("tenant {name}: {e}"))?);
                    started.push(t.clone());
                    next.insert(name, t);
                }
            }
        }
        // Take the new tenants' write leases before they serve.
        for t in &started {
            t.step().await;
            tokio::spawn(fence_loop(Arc::downgrade(t)));
        }
        let names: Vec<_> = next.keys().cloned().collect();
        *self.current.write().expect("registry lock") = Arc::new(next);
        info!(tenants = ?names, new = started.len(), "tenants installed");
        Ok(())
    }

    /// Re-reads the config and its credential files; on error keeps
    /// serving the old config.
    pub async fn reload(&self) -> Result<(), String> {
        self.reload_if(true).await.unwrap_or(Ok(()))
    }

    /// Re-reads the source; installs it when `forced` or when it differs
    /// from the last read. `None` when nothing was done.
    async fn reload_if(&self, forced: bool) -> Option<Result<(), String>> {
        let source = self.source.as_ref()?;
        if self.followed.load(Ordering::Relaxed) {
            // The registry comes through the Kubernetes API: the files,
            // which the kubelet syncs later, would bring older contents back.
            return None;
        }
        self.offer(source.load().map_err(|e| e.to_string()), forced).await
    }

    /// Installs `read` (a resolved config, or why the source could not be
    /// read) when `forced` or when it differs from the last read; an error
    /// keeps the old config. The one path of every source: the files and
    /// the Kubernetes API ([`crate::registry_api`]). `None` when nothing
    /// was done.
    pub(crate) async fn offer(&self, read: Result<Config, String>, forced: bool) -> Option<Result<(), String>> {
        let mut last = self.last_read.lock().await;
        if !forced && last.as_ref() == Some(&read) {
            return None;
        }
        *last = Some(read.clone());
        let result = match read {
            Ok(config) => self.install(config).await,
            Err(e) => Err(e),
        };
        metrics::RELOADS.with_label_values(&[if result.is_ok() { "ok" } else { "error" }]).inc();
        Some(result)
    }

    /// Stops reading the files: the registry is followed through the
    /// Kubernetes API from now on.
    pub(crate) fn follow_api(&self) {
        self.followed.store(true, Ordering::Relaxed);
    }

    /// Reloads on SIGHUP and when the config or a credential file it names
    /// changes (polled every [`POLL_INTERVAL`]).
    pub async fn watch(self: Arc<Self>) {
        let Some(path) = self.source.as_ref().map(|s| s.path.clone()) else { return };
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let hup_fired = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let forced = tokio::select! {
                _ = hup_fired => true,
                _ = tokio::time::sleep(POLL_INTERVAL) => false,
            };
            report(&path.display().to_string(), self.reload_if(forced).await);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicated_tenant(replica_timeout_ms: u64) -> TenantConfig {
        let text = format!(
            "tenants:\n  - name: waits\n    businesses: [{{ name: video, id: 1 }}]\n    tokens: [token-0001]\n    \
             redis: {{ url: 'redis://127.0.0.1:1', username: u, password: pw, replica_acks: 1, \
             replica_timeout_ms: {replica_timeout_ms} }}\n    \
             db: {{ url: 'mysql://127.0.0.1:1', username: u, password: pw }}\n"
        );
        Config::parse(&text, "test").expect("config").tenants.remove(0)
    }

    #[tokio::test]
    async fn a_replica_wait_as_long_as_the_redis_timeout_is_refused_with_the_reason() {
        let timeout = Duration::from_millis(500);
        let err = Tenant::new(replicated_tenant(500), timeout).err().expect("refused");
        assert!(err.contains("replica_timeout_ms (500 ms) must be below") && err.contains("(500 ms"), "{err}");
        assert!(Tenant::new(replicated_tenant(499), timeout).is_ok());
    }

    fn limiter(limits: &str) -> Limiter {
        let text = format!(
            "tenants:\n  - name: limits\n    businesses: [{{ name: video, id: 1 }}]\n    tokens: [token-0001]\n    \
             redis: {{ url: 'redis://127.0.0.1:1', username: u, password: pw }}\n    \
             db: {{ url: 'mysql://127.0.0.1:1', username: u, password: pw }}\n    limits: {limits}\n"
        );
        Limiter::new(&Config::parse(&text, "test").expect("config").tenants.remove(0))
    }

    fn allowed(l: &DefaultKeyedRateLimiter<i64>, mid: i64, n: usize) -> usize {
        (0..n).filter(|_| l.check_key(&mid).is_ok()).count()
    }

    #[test]
    fn each_user_gets_a_burst_of_one_seconds_rate_and_users_do_not_share_it() {
        let l = limiter("{ per_mid_per_sec: 3, per_tenant_per_sec: 5, db_fallback_per_sec: 0 }");
        assert_eq!(allowed(&l.users, 7, 10), 3, "a burst of 10 against 3/s");
        assert_eq!(allowed(&l.users, 8, 10), 3, "another user has a budget of its own");
        assert_eq!((0..10).filter(|_| l.tenant.check().is_ok()).count(), 5, "the tenant-wide limit");
        assert!(l.fallback.is_none(), "db_fallback_per_sec 0: no DB-path write is allowed");
        // A token of 3/s comes back every third of a second: as many as
        // the thirds that passed since the burst, measured around the checks
        // so that a slow scheduler cannot make the test wrong.
        let burst = Instant::now();
        std::thread::sleep(Duration::from_millis(400));
        let before = burst.elapsed();
        let got = allowed(&l.users, 7, 10);
        let after = burst.elapsed();
        let thirds = |d: Duration| ((d.as_secs_f64() * 3.0) as usize).min(3);
        assert!((thirds(before)..=thirds(after)).contains(&got), "{got} tokens back after {before:?}..{after:?}");
        assert!(got >= 1, "400 ms refills at least one token of 3/s");
    }

    #[test]
    fn a_sweep_keeps_only_users_seen_within_two_seconds_however_many_came() {
        // At 1/s one like empties a user's bucket for a second.
        let l = limiter("{ per_mid_per_sec: 1, per_tenant_per_sec: 1000000 }");
        for mid in 1..=120_000 {
            assert!(l.users.check_key(&mid).is_ok());
        }
        assert_eq!(l.sweep(), 120_000, "users whose buckets are not full again stay");
        // A sweep keeps a user for up to two refill intervals after its
        // last write (governor's retain_recent): 2 s at 1/s.
        std::thread::sleep(Duration::from_millis(2100));
        assert!(l.users.check_key(&1).is_ok());
        assert_eq!(l.sweep(), 1, "only the user seen in the last two seconds is left");
    }
}
