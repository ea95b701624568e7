//! The write fence: the SQL that decides whether Redis or the DB decides a
//! tenant's writes, so that a write is only ever decided against the newest
//! acknowledged state of its record.
//!
//! While Redis serves, a record's newest acknowledged state is in Redis and
//! the DB lags it by up to a job window (the stream holds the rest). The DB
//! path may decide a record only when the DB is proven to hold every write
//! acknowledged on it. The proof has three parts, all in the tenant schema:
//!
//! - **Watermarks** (`stream_watermarks`, written by the job): per stream
//!   shard, every entry whose id is below `applied_ms` is applied.
//! - **Writer leases** (`fence_writers`): a service process acknowledges
//!   through Redis only while it holds a lease, renewed under the fence row
//!   while the fence says Redis; its scripts carry a deadline no later than
//!   the lease, so nothing it sends can take effect after the lease ends.
//! - **Publication**: once the fence moves to the DB path (a new epoch), no
//!   lease is renewed; each writer stops writing through Redis, waits for its
//!   calls in flight, applies to the DB every write it acknowledged that the
//!   watermarks do not cover yet (the job's idempotent apply), marks the
//!   records whose last call has an unknown outcome as unsettled, and records
//!   that it published for the epoch.
//!
//! The DB path opens for an epoch when every writer either published for it
//! or holds a lease that ended below every shard's watermark (so a crashed
//! writer blocks it until its writes are known applied); it still refuses
//! unsettled records. Every DB-path transaction reads the fence row in share
//! mode, so closing the fence waits for them, and none runs after it. Before
//! Redis decides again, the cache entries of what the DB path changed are
//! dropped (`cache_invalidations`), and only then does the fence say Redis.

use std::collections::HashMap;

use sqlx::{MySql, MySqlPool, QueryBuilder, Row};

use crate::event::LikeEvent;

/// Which path decides writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Redis decides; writers renew their leases.
    Redis,
    /// The DB path decides, once every writer has published for the epoch.
    Db,
    /// The DB path is closed; the cache entries it changed are being dropped.
    Closing,
}

impl Mode {
    fn from_code(c: i64) -> Result<Mode, sqlx::Error> {
        match c {
            0 => Ok(Mode::Redis),
            1 => Ok(Mode::Db),
            2 => Ok(Mode::Closing),
            other => Err(sqlx::Error::Decode(format!("write_fence.mode {other}").into())),
        }
    }

    fn code(self) -> i64 {
        match self {
            Mode::Redis => 0,
            Mode::Db => 1,
            Mode::Closing => 2,
        }
    }
}

/// The fence row and the watermarks, as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// Who decides writes.
    pub mode: Mode,
    /// Grows each time the DB path is asked for.
    pub epoch: i64,
    /// Per shard: entries below this (Unix ms, Redis clock) are applied.
    /// A shard without a watermark yet has the schema's creation time.
    watermarks: HashMap<u32, i64>,
    floor_ms: i64,
}

impl View {
    /// A view made of its parts (tests and tools; [`view`] reads the real one).
    pub fn new(mode: Mode, epoch: i64, floor_ms: i64, watermarks: HashMap<u32, i64>) -> View {
        View { mode, epoch, watermarks, floor_ms }
    }

    /// The watermark of `shard`: every stream entry of it whose id is below
    /// this many Unix ms is applied to the DB.
    pub fn watermark(&self, shard: u32) -> i64 {
        self.watermarks.get(&shard).copied().unwrap_or(0).max(self.floor_ms)
    }

    /// The lowest watermark over `shards` shards.
    pub fn min_watermark(&self, shards: u32) -> i64 {
        (0..shards).map(|s| self.watermark(s)).min().unwrap_or(self.floor_ms)
    }
}

async fn lock_fence(tx: &mut sqlx::Transaction<'_, MySql>, share: bool) -> Result<(Mode, i64), sqlx::Error> {
    // Share mode for DB-path writes (they run side by side), exclusive for
    // changes of the fence and for lease renewals.
    let sql = if share {
        "SELECT mode, epoch FROM write_fence WHERE id = 1 LOCK IN SHARE MODE"
    } else {
        "SELECT mode, epoch FROM write_fence WHERE id = 1 FOR UPDATE"
    };
    let row = sqlx::query(sql).fetch_one(&mut **tx).await?;
    Ok((Mode::from_code(row.try_get::<i8, _>("mode")? as i64)?, row.try_get("epoch")?))
}

async fn set_mode(tx: &mut sqlx::Transaction<'_, MySql>, mode: Mode, epoch: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE write_fence SET mode = ?, epoch = ? WHERE id = 1")
        .bind(mode.code())
        .bind(epoch)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Reads the fence and the watermarks.
pub async fn view(pool: &MySqlPool) -> Result<View, sqlx::Error> {
    let row = sqlx::query("SELECT mode, epoch, floor_ms FROM write_fence WHERE id = 1").fetch_one(pool).await?;
    let mode = Mode::from_code(row.try_get::<i8, _>("mode")? as i64)?;
    let epoch = row.try_get("epoch")?;
    let floor_ms = row.try_get("floor_ms")?;
    let watermarks = watermarks(pool).await?;
    Ok(View { mode, epoch, watermarks, floor_ms })
}

/// The watermarks: per stream shard, every entry whose id is below it is
/// applied to this DB (shards the job never marked are absent).
pub async fn watermarks(pool: &MySqlPool) -> Result<HashMap<u32, i64>, sqlx::Error> {
    let mut out = HashMap::new();
    for r in sqlx::query("SELECT shard, applied_ms FROM stream_watermarks").fetch_all(pool).await? {
        out.insert(r.try_get::<i32, _>("shard")? as u32, r.try_get("applied_ms")?);
    }
    Ok(out)
}

/// Raises the watermarks of shards (the job, after it applied and
/// acknowledged entries); a watermark never goes down.
pub async fn advance_watermarks(pool: &MySqlPool, marks: &[(u32, i64)]) -> Result<(), sqlx::Error> {
    if marks.is_empty() {
        return Ok(());
    }
    let mut q = QueryBuilder::<MySql>::new("INSERT INTO stream_watermarks (shard, applied_ms) ");
    q.push_values(marks, |mut b, (shard, ms)| {
        b.push_bind(*shard as i32).push_bind(*ms);
    });
    q.push(" ON DUPLICATE KEY UPDATE applied_ms = GREATEST(applied_ms, VALUES(applied_ms))");
    q.build().execute(pool).await?;
    Ok(())
}

/// Extends `instance`'s lease to `until_ms` if the fence says Redis.
/// Returns the fence as it was: a lease was granted only when its mode is
/// [`Mode::Redis`].
pub async fn renew_lease(pool: &MySqlPool, instance: &str, until_ms: i64) -> Result<(Mode, i64), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (mode, epoch) = lock_fence(&mut tx, false).await?;
    if mode == Mode::Redis {
        sqlx::query(
            "INSERT INTO fence_writers (instance, lease_until_ms, published_epoch) VALUES (?, ?, -1) \
             ON DUPLICATE KEY UPDATE lease_until_ms = GREATEST(lease_until_ms, VALUES(lease_until_ms))",
        )
        .bind(instance)
        .bind(until_ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok((mode, epoch))
}

/// Shortens `instance`'s lease to `until_ms` (a process that stops): once
/// the watermarks pass it, it no longer holds the DB path back.
pub async fn release_lease(pool: &MySqlPool, instance: &str, until_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE fence_writers SET lease_until_ms = LEAST(lease_until_ms, ?) WHERE instance = ?")
        .bind(until_ms)
        .bind(instance)
        .execute(pool)
        .await?;
    Ok(())
}

/// Forgets writers whose lease ended below `min_watermark`: everything they
/// acknowledged is applied.
pub async fn forget_expired_writers(pool: &MySqlPool, min_watermark: i64) -> Result<u64, sqlx::Error> {
    let done =
        sqlx::query("DELETE FROM fence_writers WHERE lease_until_ms < ?").bind(min_watermark).execute(pool).await?;
    Ok(done.rows_affected())
}

/// Asks for the DB path: moves the fence from Redis (or from closing) to a
/// new DB epoch, which ends every lease renewal. Returns the epoch the DB
/// path now has (the current one if it already had it).
pub async fn raise(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let (mode, epoch) = lock_fence(&mut tx, false).await?;
    let epoch = match mode {
        Mode::Db => epoch,
        Mode::Redis | Mode::Closing => {
            set_mode(&mut tx, Mode::Db, epoch + 1).await?;
            epoch + 1
        }
    };
    tx.commit().await?;
    Ok(epoch)
}

/// A record key: (mid, business, message).
pub type RecordKey = (i64, i64, i64);

/// Publishes `instance` for `epoch`: applies `acknowledged` (writes it
/// acknowledged through Redis that may not be applied yet; idempotent, as
/// the job's apply), marks `unknown` records unsettled for the epoch, and
/// records the publication. Returns false, publishing nothing, when the
/// fence is no longer at that DB epoch.
pub async fn publish(
    pool: &MySqlPool,
    instance: &str,
    epoch: i64,
    acknowledged: &[LikeEvent],
    unknown: &[RecordKey],
) -> Result<bool, sqlx::Error> {
    if !acknowledged.is_empty() {
        crate::db::apply_events(pool, acknowledged).await?;
    }
    let mut tx = pool.begin().await?;
    if lock_fence(&mut tx, true).await? != (Mode::Db, epoch) {
        return Ok(false);
    }
    for chunk in unknown.chunks(500) {
        let mut q = QueryBuilder::<MySql>::new("INSERT INTO unsettled_records (epoch, mid, business_id, message_id) ");
        q.push_values(chunk, |mut b, (mid, biz, msg)| {
            b.push_bind(epoch).push_bind(*mid).push_bind(*biz).push_bind(*msg);
        });
        q.push(" ON DUPLICATE KEY UPDATE epoch = VALUES(epoch)");
        q.build().execute(&mut *tx).await?;
    }
    sqlx::query(
        "INSERT INTO fence_writers (instance, lease_until_ms, published_epoch) VALUES (?, 0, ?) \
         ON DUPLICATE KEY UPDATE published_epoch = VALUES(published_epoch)",
    )
    .bind(instance)
    .bind(epoch)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The writers that keep the DB path of `epoch` shut: not published for it,
/// with a lease that ends at or above `min_watermark` (they may have
/// acknowledged writes that are not applied). Empty: the DB path may open.
pub async fn holdouts(pool: &MySqlPool, epoch: i64, min_watermark: i64) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query("SELECT instance FROM fence_writers WHERE published_epoch <> ? AND lease_until_ms >= ?")
        .bind(epoch)
        .bind(min_watermark)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| r.try_get("instance")).collect()
}

/// Closes the DB path of `epoch`: waits for its transactions in flight (they
/// hold the fence row in share mode) and lets no other start. Returns false
/// when the fence is not at that DB epoch.
pub async fn close(pool: &MySqlPool, epoch: i64) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if lock_fence(&mut tx, false).await? != (Mode::Db, epoch) {
        return Ok(false);
    }
    set_mode(&mut tx, Mode::Closing, epoch).await?;
    tx.commit().await?;
    Ok(true)
}

/// Hands the writes back to Redis after the cache entries that the DB path
/// of `epoch` changed were dropped; forgets the unsettled records. Returns
/// false when the fence is not closing that epoch.
pub async fn reopen_redis(pool: &MySqlPool, epoch: i64) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    if lock_fence(&mut tx, false).await? != (Mode::Closing, epoch) {
        return Ok(false);
    }
    sqlx::query("DELETE FROM unsettled_records WHERE epoch <= ?").bind(epoch).execute(&mut *tx).await?;
    set_mode(&mut tx, Mode::Redis, epoch).await?;
    tx.commit().await?;
    Ok(true)
}

/// Why the DB path refused a write without deciding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Shut {
    /// The fence is no longer at the DB epoch the caller saw open.
    #[error("the DB path of epoch {epoch} is closed (the fence is now {mode:?} at epoch {now})")]
    Closed {
        /// The epoch the caller saw open.
        epoch: i64,
        /// The fence's mode now.
        mode: Mode,
        /// The fence's epoch now.
        now: i64,
    },
    /// The record's last write through Redis has an unknown outcome.
    #[error(
        "the record's last write through Redis has an unknown outcome; its state is known again once Redis answers"
    )]
    Unsettled,
}

/// Inside a DB-path transaction: holds the fence row in share mode for the
/// rest of the transaction and checks that the DB path of `epoch` is open
/// and that `record` is not unsettled.
pub async fn check_open(
    tx: &mut sqlx::Transaction<'_, MySql>,
    epoch: i64,
    (mid, business, message): RecordKey,
) -> Result<Result<(), Shut>, sqlx::Error> {
    let (mode, now) = lock_fence(tx, true).await?;
    if (mode, now) != (Mode::Db, epoch) {
        return Ok(Err(Shut::Closed { epoch, mode, now }));
    }
    let unsettled = sqlx::query(
        "SELECT 1 FROM unsettled_records WHERE epoch = ? AND mid = ? AND business_id = ? AND message_id = ?",
    )
    .bind(epoch)
    .bind(mid)
    .bind(business)
    .bind(message)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(if unsettled.is_some() { Err(Shut::Unsettled) } else { Ok(()) })
}
