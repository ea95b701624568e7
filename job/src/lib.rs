//! thumbup-job: the per-tenant consumer of the event stream.
//!
//! Each window (250 ms by default, closed early by size) it reads the
//! tenant's stream shards through the consumer group (its own pending
//! entries first, then entries that dead consumers left pending, then new
//! ones), applies them to the DB in ONE transaction ([`db::apply_events`]:
//! records by version, counts and received likes by the summed deltas the DB
//! sees), then publishes downstream events, refreshes the cached counts
//! (never replacing a newer value) and only then acknowledges. Any failure
//! retries the whole flush, which is idempotent, so nothing is lost or
//! counted twice. SIGTERM flushes the open window before exit.
//!
//! After every window it also records in the DB, per shard, how far the
//! stream is applied ([`thumbup_core::fence`]'s watermarks, read from the
//! consumer group's own state): the service's DB path and its cache-miss
//! seeds rely on them to know that the DB holds the newest state.

use anyhow::Context as _;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use prometheus::{
    Histogram, IntCounterVec, IntGaugeVec, register_histogram, register_int_counter_vec, register_int_gauge_vec,
};
use sqlx::MySqlPool;
use thumbup_core::cache::Conn;
use thumbup_core::cache::{self, Scripts};
use thumbup_core::config::TenantConfig;
use thumbup_core::db::{self, Applied};
use thumbup_core::fence;
use thumbup_core::keys::{JOB_GROUP, Keys};
use thumbup_core::retry::Backoff;
use thumbup_core::stream::{self, Batch, Downstream};
use thumbup_core::version::now_ms;
use tracing::{debug, error, info, instrument, warn};

/// Tuning of the job.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long events are gathered before one DB transaction applies them.
    pub window: Duration,
    /// Events that close a window early.
    pub max_batch: usize,
    /// Entries read per shard per call.
    pub read_count: usize,
    /// This consumer's name in the group (stable across restarts, so its own
    /// pending entries are read back first).
    pub consumer: String,
    /// Entries pending this long on another consumer are claimed.
    pub claim_idle: Duration,
    /// Set once the consumer groups exist and the job consumes (`/readyz`).
    pub ready: Arc<AtomicBool>,
}

static BATCH: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "thumbup_job_batch_events",
        "events per applied window",
        vec![1.0, 10.0, 100.0, 500.0, 1000.0, 5000.0, 20000.0]
    )
    .expect("metric registers once")
});
static FLUSH: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!("thumbup_job_flush_duration_seconds", "time to apply, publish, refresh and ack one window")
        .expect("metric registers once")
});
static EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("thumbup_job_events_total", "stream events by outcome", &["tenant", "outcome"])
        .expect("metric registers once")
});
static ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!("thumbup_job_errors_total", "failed steps by step", &["tenant", "step"])
        .expect("metric registers once")
});
static LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_job_stream_lag_events",
        "entries not yet delivered to the group",
        &["tenant", "shard"]
    )
    .expect("metric registers once")
});

static DOWNSTREAM_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_job_downstream_lag_seconds",
        "age of the last downstream entry delivered to a consumer group, while it has entries to read (0: caught up)",
        &["tenant", "group"]
    )
    .expect("metric registers once")
});
static DOWNSTREAM_BEHIND: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "thumbup_job_downstream_behind_retention",
        "1 when a downstream consumer group's position is older than the oldest entry kept (stream.downstream_retention_secs): it has missed entries",
        &["tenant", "group"]
    )
    .expect("metric registers once")
});

/// The consumer of one tenant.
pub struct Job {
    tenant: TenantConfig,
    keys: Keys,
    opts: Options,
    /// On a cluster it replaces itself when its calls keep failing
    /// (`conn::Cluster`).
    redis: Conn,
    db: MySqlPool,
    scripts: Scripts,
    /// The failover controller's word that the Redis stands alone.
    solo: cache::Solo,
}

/// Retry delay: 50 ms doubling to 2 s. A DB flip (db-proxy moving to the
/// other datacenter) lasts seconds; entries wait in the stream meanwhile, so
/// a short cap resumes applying soon after the new primary takes writes.
fn backoff(attempt: u32) -> Duration {
    const RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    RETRY.delay(attempt)
}

/// How long a Redis call of the job may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(5);

impl Job {
    /// The Redis connection (a clone shares it).
    fn con(&self) -> Conn {
        self.redis.clone()
    }

    /// A job for `tenant`; connects lazily.
    pub fn new(tenant: TenantConfig, opts: Options) -> anyhow::Result<Job> {
        let keys = Keys::new(&tenant.name, tenant.stream.shards);
        Ok(Job {
            solo: cache::Solo::new(&keys),
            keys,
            redis: cache::connect_lazy(&tenant.redis, REDIS_TIMEOUT)?,
            db: db::connect_lazy(&tenant)?,
            scripts: Scripts::default(),
            tenant,
            opts,
        })
    }

    fn err(&self, step: &str) {
        ERRORS.with_label_values(&[&self.tenant.name, step]).inc();
    }

    async fn ensure_groups(&self) -> Result<(), redis::RedisError> {
        stream::ensure_groups(&mut self.con(), &self.keys).await
    }

    /// Reads from every shard starting at `from` (`">"` for new entries,
    /// an id for this consumer's pending ones). Returns entries read.
    async fn read(&self, from: &str, out: &mut Batch) -> Result<usize, redis::RedisError> {
        let (consumer, count) = (&self.opts.consumer, self.opts.read_count);
        stream::read_group(&mut self.con(), &self.keys, consumer, from, count, out).await
    }

    /// Claims entries pending on other (dead) consumers for longer than `claim_idle`.
    async fn claim(&self, out: &mut Batch) -> Result<usize, redis::RedisError> {
        let idle_ms = self.opts.claim_idle.as_millis() as u64;
        let (consumer, count) = (&self.opts.consumer, self.opts.read_count);
        let n = stream::claim_stale(&mut self.con(), &self.keys, consumer, idle_ms, count, out).await?;
        if n > 0 {
            info!(tenant = %self.tenant.name, claimed = n, "claimed entries left pending by another consumer");
        }
        Ok(n)
    }

    /// Applies, publishes, refreshes and acknowledges one batch.
    #[instrument(skip_all, fields(tenant = %self.tenant.name, events = batch.entries.len()))]
    async fn flush_once(&self, batch: &Batch) -> anyhow::Result<Applied> {
        let events: Vec<_> = batch.entries.iter().map(|e| e.event.clone()).collect();
        let applied = db::apply_events(&self.db, &events).await.inspect_err(|_| self.err("apply")).context("apply")?;
        let mut con = self.con();
        // The refresh and the WAIT go through this one connection: a WAIT
        // counts the writes of the connection it is sent on.
        let generation = con.generation();
        // Downstream first: a crash before the ack replays the batch, which
        // republishes (consumers deduplicate by version).
        let republished = applied.already_applied.iter().map(|e| Downstream { event: e.clone(), from: e.prev });
        let published: Vec<Downstream> = applied
            .transitions
            .iter()
            .map(|(e, from)| Downstream { event: e.clone(), from: *from })
            .chain(republished)
            .collect();
        let keep_from = now_ms() - (self.tenant.stream.downstream_retention_secs as i64) * 1000;
        stream::publish_downstream(&mut con, &self.keys, &published, keep_from)
            .await
            .inspect_err(|_| self.err("downstream"))
            .context("downstream")?;
        self.refresh(&mut con, &applied).await.inspect_err(|_| self.err("refresh")).context("refresh")?;
        stream::dead_letter(&mut con, &self.keys, &batch.malformed).await.context("dead letter")?;
        // The refreshed caches on the replicas before the ack: a master lost
        // after the ack must not take a refreshed count with it (the entries
        // would not be delivered again to refresh it).
        // Strict: a refreshed count that only a master holds is lost with
        // that master, and the entries that made it would not be delivered
        // again to refresh it (the cluster test caught a cached count one
        // window behind the DB). Until the replicas confirm, the flush fails
        // and is retried; a master without a replica (its replica promoted,
        // none joined yet) holds the job up until one joins.
        let mut acks = (self.tenant.redis.replica_acks, self.tenant.redis.replica_timeout_ms);
        if acks.0 > 0 && self.solo.is_set(&mut con).await {
            acks.0 = 0;
        }
        cache::replicated_everywhere(&mut con, acks.0, acks.1)
            .await
            .inspect_err(|_| self.err("replicas"))
            .context("replicas")?;
        if acks.0 > 0 && con.generation() != generation {
            self.err("replicas");
            anyhow::bail!("replicas: the redis cluster connection was replaced during the window's writes");
        }
        let ids = batch.entries.iter().map(|e| (e.shard, e.id.as_str()));
        let ids = ids.chain(batch.malformed.iter().map(|l| (l.shard, l.id.as_str())));
        stream::ack(&mut con, &self.keys, ids).await.inspect_err(|_| self.err("ack")).context("ack")?;
        Ok(applied)
    }

    /// Sets the cached counts and received likes from the DB, never over a
    /// newer cached value.
    async fn refresh(&self, con: &mut Conn, applied: &Applied) -> anyhow::Result<()> {
        let ttl = self.tenant.cache.counts_ttl_secs;
        let (items, owners) = (&applied.items, &applied.owners);
        cache::refresh_from_db(&self.scripts, con, &self.db, &self.keys, items, owners, ttl).await?;
        Ok(())
    }

    /// Flushes until it succeeds; gives up only after `give_up` (shutdown),
    /// leaving the entries pending for the next run.
    async fn flush(&self, batch: &Batch, give_up: Option<Instant>) -> bool {
        let entries = &batch.entries;
        if batch.is_empty() {
            return true;
        }
        let start = Instant::now();
        let mut attempt = 0;
        loop {
            match self.flush_once(batch).await {
                Ok(applied) => {
                    BATCH.observe(entries.len() as f64);
                    FLUSH.observe(start.elapsed().as_secs_f64());
                    let t = &self.tenant.name;
                    EVENTS.with_label_values(&[t, "applied"]).inc_by(applied.transitions.len() as u64);
                    let skipped = entries.len() - applied.transitions.len();
                    EVENTS.with_label_values(&[t, "skipped"]).inc_by(skipped as u64);
                    debug!(tenant = %t, events = entries.len(), applied = applied.transitions.len(), "window flushed");
                    return true;
                }
                Err(e) => {
                    warn!(tenant = %self.tenant.name, error = format!("{e:#}"), attempt, "flush failed; retrying");
                    if give_up.is_some_and(|g| Instant::now() > g) {
                        error!(tenant = %self.tenant.name, "giving up at shutdown: entries stay pending for the next run");
                        return false;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// Trims applied entries older than the retention; never past anything
    /// pending or undelivered. Also exports the lag.
    async fn maintain(&self) -> Result<(), redis::RedisError> {
        let mut con = self.con();
        let keep_from = now_ms() - (self.tenant.stream.retention_secs as i64) * 1000;
        for shard in 0..self.keys.shards() {
            let key = self.keys.stream(shard);
            let Some(g) = stream::group_progress(&mut con, &key).await? else { continue };
            if let Some(lag) = g.lag {
                LAG.with_label_values(&[&self.tenant.name, &shard.to_string()]).set(lag);
            }
            let min_ms = keep_from.min(g.delivered_ms).min(g.oldest_pending_ms.unwrap_or(i64::MAX));
            if min_ms > 0 {
                stream::trim_before(&mut con, &key, min_ms).await?;
            }
        }
        // The downstream consumers: how far behind, and whether entries
        // they never read were dropped by the retention.
        let (groups, oldest) = stream::downstream_groups(&mut con, &self.keys).await?;
        let now = now_ms();
        for g in groups {
            let labels = [self.tenant.name.as_str(), g.name.as_str()];
            DOWNSTREAM_LAG.with_label_values(&labels).set(g.behind_secs(now));
            DOWNSTREAM_BEHIND.with_label_values(&labels).set(i64::from(g.missed(oldest)));
        }
        Ok(())
    }

    /// Records in the DB how far each shard is applied: every entry below
    /// the group's watermark was acknowledged, which happens only after its
    /// DB commit.
    async fn record_watermarks(&self) -> anyhow::Result<()> {
        let mut con = self.con();
        let mut marks = Vec::with_capacity(self.keys.shards() as usize);
        for shard in 0..self.keys.shards() {
            let ms = self.scripts.watermark(&mut con, &self.keys.stream(shard), JOB_GROUP).await?;
            marks.push((shard, ms));
        }
        fence::advance_watermarks(&self.db, &marks).await?;
        Ok(())
    }

    /// Runs until `shutdown` resolves, then flushes the open window.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let mut attempt = 0;
        while let Err(e) = self.ensure_groups().await {
            warn!(tenant = %self.tenant.name, error = %e, "creating the consumer groups failed; retrying");
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(backoff(attempt)) => {}
            }
            attempt += 1;
        }
        self.opts.ready.store(true, Ordering::Relaxed);
        info!(tenant = %self.tenant.name, consumer = %self.opts.consumer, shards = self.keys.shards(), window = ?self.opts.window, "job running");
        let mut own_pending = true;
        let mut last_claim = Instant::now();
        let mut last_maintain = Instant::now();
        let mut stopping = false;
        while !stopping {
            let deadline = Instant::now() + self.opts.window;
            let mut batch = Batch::default();
            let mut attempt = 0;
            loop {
                let step = async {
                    let mut n = 0;
                    if own_pending {
                        n += self.read("0", &mut batch).await?;
                        n += self.claim(&mut batch).await?;
                    } else if last_claim.elapsed() >= self.opts.claim_idle {
                        n += self.claim(&mut batch).await?;
                        last_claim = Instant::now();
                    }
                    n += self.read(">", &mut batch).await?;
                    Ok::<usize, redis::RedisError>(n)
                };
                let pause = match step.await {
                    Ok(n) => {
                        own_pending = false;
                        attempt = 0;
                        if n > 0 { Duration::ZERO } else { Duration::from_millis(20) }
                    }
                    Err(e) => {
                        warn!(tenant = %self.tenant.name, error = %e, "reading the stream failed; retrying");
                        self.err("read");
                        attempt += 1;
                        backoff(attempt)
                    }
                };
                let now = Instant::now();
                if batch.len() >= self.opts.max_batch || now >= deadline {
                    break;
                }
                let pause = pause.min(deadline - now);
                tokio::select! {
                    _ = &mut shutdown, if !stopping => { stopping = true; break; }
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let give_up = stopping.then(|| Instant::now() + Duration::from_secs(10));
            self.flush(&batch, give_up).await;
            if let Err(e) = self.record_watermarks().await {
                self.err("watermark");
                debug!(tenant = %self.tenant.name, error = %e, "recording the applied watermarks failed");
            }
            if last_maintain.elapsed() > Duration::from_secs(10) {
                if let Err(e) = self.maintain().await {
                    warn!(tenant = %self.tenant.name, error = %e, "stream maintenance failed");
                }
                last_maintain = Instant::now();
            }
        }
        self.opts.ready.store(false, Ordering::Relaxed);
        info!(tenant = %self.tenant.name, "job stopped after flushing its window");
        Ok(())
    }
}
