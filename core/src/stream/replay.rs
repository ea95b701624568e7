//! Replaying the recent stream window onto a promoted DB.
//!
//! Replication to the standby is asynchronous: when the active DB dies, the
//! job may have committed (and acknowledged) windows there that never
//! reached the standby. Those events are still in the tenant's stream shards
//! (the job trims only past the stream retention), so the controller reads
//! every entry newer than the replay window, from where the new primary's
//! watermark says its DB stops holding them, and applies it to the new
//! primary with the job's own [`db::apply_events`], reading the shards in
//! parallel. Records carry versions:
//! what did replicate is skipped, what did not is applied with its count
//! deltas, so the replay recovers the lost windows and changes nothing else.
//!
//! Items whose counts the replay changed have their cached counts and
//! received likes deleted (the next read or job window refills them from the
//! new primary): the cached versions came from the old primary, and a
//! version-checked refresh would never replace them.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use crate::conn::Conn;
use sqlx::MySqlPool;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

use futures::StreamExt;
use tokio::sync::mpsc;

use super::{Batch, Cursor, range_page};
use crate::db;
use crate::event::LikeEvent;
use crate::keys::Keys;
use crate::retry::Backoff;

/// Entries read per XRANGE call.
const PAGE: usize = 1_000;
/// Shards read at once.
pub const PARALLEL: u32 = 8;
/// Events per apply transaction.
const CHUNK: usize = 5_000;
/// Tries per chunk (a deadlock with the job's own window is retried).
const TRIES: u32 = 5;
/// The delays between those tries.
const CHUNK_RETRY: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_millis(1_600));

/// A replay that failed; the text names the tenant and step.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Reading a stream failed.
    #[error("tenant {tenant}: reading {key}: {source}")]
    Read {
        /// Tenant.
        tenant: String,
        /// Stream key.
        key: String,
        /// Redis error.
        source: redis::RedisError,
    },
    /// Applying to the new primary failed.
    #[error("tenant {tenant}: applying to the new primary: {source}")]
    Apply {
        /// Tenant.
        tenant: String,
        /// DB error.
        source: sqlx::Error,
    },
    /// Deleting cached values failed.
    #[error("tenant {tenant}: dropping cached counts: {source}")]
    Invalidate {
        /// Tenant.
        tenant: String,
        /// Redis error.
        source: redis::RedisError,
    },
}

/// What the replay needs of a tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayTenant {
    /// Tenant name.
    pub name: String,
    /// Stream shards.
    pub shards: u32,
    /// DB schema.
    pub schema: String,
}

/// What one tenant's replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Entries read from the streams.
    pub events: usize,
    /// Entries that did not decode (skipped; the job dead-letters them).
    pub malformed: usize,
    /// Transitions the new primary took: writes that had not replicated.
    pub applied: usize,
    /// Cached keys deleted.
    pub invalidated: usize,
    /// The cached keys of what the replay changed (deleted once already;
    /// the caller deletes them again a moment later, see [`invalidate`]).
    pub stale: Vec<String>,
}

/// Replays `tenant`'s stream entries newer than `since_ms`, and not below
/// the new primary's watermark of their shard, from `redis` (an admin
/// connection to a Redis holding the tenant's streams) onto the DB at
/// `db_admin_url`. The shards are read in parallel (up to [`PARALLEL`] at
/// once, a page at a time) and applied by one writer, [`CHUNK`] events per
/// transaction, so memory stays bounded however long the window. One
/// writer, because fresh records are locked as gaps: parallel transactions
/// inserting next to each other deadlock (InnoDB), and the DB's CPU is the
/// limit anyway.
pub async fn replay(
    tenant: &ReplayTenant,
    redis: &mut Conn,
    db_admin_url: &str,
    since_ms: i64,
) -> Result<Replayed, ReplayError> {
    let keys = Keys::new(&tenant.name, tenant.shards);
    let apply_err = |source| ReplayError::Apply { tenant: tenant.name.clone(), source };
    let opts = MySqlConnectOptions::from_str(db_admin_url).map_err(apply_err)?.database(&tenant.schema);
    let pool: MySqlPool = MySqlPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await
        .map_err(apply_err)?;
    // What the new primary already holds needs no replay: per shard, every
    // entry below its watermark is applied there (the job raises a
    // watermark after it applied the entries below it, and replication
    // keeps that order), so a shard is read from its watermark on when that
    // is later than the window's start.
    let marks = crate::fence::watermarks(&pool).await.map_err(apply_err)?;
    let from = |shard: u32| marks.get(&shard).map_or(since_ms, |w| since_ms.max(*w));
    let (tx, mut rx) = mpsc::channel::<Vec<LikeEvent>>(PARALLEL as usize);
    // One sender per shard: the channel closes when the last reader ends.
    let senders: Vec<_> = (0..tenant.shards).map(|shard| (shard, tx.clone())).collect();
    drop(tx);
    let keys = &keys;
    let readers = futures::stream::iter(senders)
        .map(|(shard, tx)| read_shard(tenant, keys, redis.clone(), shard, from(shard), tx))
        .buffer_unordered(PARALLEL as usize)
        .collect::<Vec<_>>();
    let writer = async move {
        let mut out = Replayed::default();
        let mut stale = BTreeSet::new();
        while let Some(events) = rx.recv().await {
            let applied = apply_chunk(tenant, &pool, &events).await?;
            out.applied += applied.transitions.len();
            for (e, _) in &applied.transitions {
                stale.insert(keys.counts(e.business_id, e.message_id));
                stale.insert(keys.received(e.business_id, e.up_mid));
            }
        }
        pool.close().await;
        out.stale = stale.into_iter().collect();
        Ok::<_, ReplayError>(out)
    };
    let (read, written) = tokio::join!(readers, writer);
    // A failed write ends the readers (their sends fail): its error first.
    let mut out = written?;
    for shard in read {
        let (events, malformed) = shard?;
        out.events += events;
        out.malformed += malformed;
    }
    out.invalidated = invalidate(&tenant.name, redis, &out.stale).await?;
    Ok(out)
}

/// Reads shard `shard` from `since_ms` on, a page at a time, and hands its
/// events to the writer [`CHUNK`] at a time. Returns the entries read and
/// how many of them were malformed.
async fn read_shard(
    tenant: &ReplayTenant,
    keys: &Keys,
    mut redis: Conn,
    shard: u32,
    since_ms: i64,
    writer: mpsc::Sender<Vec<LikeEvent>>,
) -> Result<(usize, usize), ReplayError> {
    let (mut events, mut malformed) = (0, 0);
    let mut cursor = Cursor::since(since_ms);
    let mut batch = Batch::default();
    loop {
        let got = range_page(&mut redis, keys, shard, &mut cursor, PAGE, &mut batch)
            .await
            .map_err(|source| ReplayError::Read { tenant: tenant.name.clone(), key: keys.stream(shard), source })?;
        events += got;
        malformed += std::mem::take(&mut batch.malformed).len();
        let end = got < PAGE;
        if batch.entries.len() >= CHUNK || (end && !batch.entries.is_empty()) {
            let chunk = std::mem::take(&mut batch.entries).into_iter().map(|e| e.event).collect();
            if writer.send(chunk).await.is_err() {
                // The writer stopped on an error; it reports it.
                return Ok((events, malformed));
            }
        }
        if end {
            return Ok((events, malformed));
        }
    }
}

/// Applies one chunk, retrying a failure (a deadlock with the job's own
/// window) up to [`TRIES`] times.
async fn apply_chunk(
    tenant: &ReplayTenant,
    pool: &MySqlPool,
    events: &[LikeEvent],
) -> Result<db::Applied, ReplayError> {
    let mut attempt = 0;
    loop {
        match db::apply_events(pool, events).await {
            Ok(a) => return Ok(a),
            Err(e) if attempt + 1 < TRIES => {
                tracing::warn!(tenant = %tenant.name, error = %e, attempt, "replay chunk failed; retrying");
                attempt += 1;
                tokio::time::sleep(CHUNK_RETRY.delay(attempt - 1)).await;
            }
            Err(source) => return Err(ReplayError::Apply { tenant: tenant.name.clone(), source }),
        }
    }
}

/// Deletes cached keys. The controller calls it right after the replay and
/// again a moment later: a job window or a read that loaded counts from the
/// new primary before the replay committed may still write them back
/// (their versions come from the new primary, so a later refresh would not
/// replace them).
pub async fn invalidate(tenant: &str, redis: &mut Conn, keys: &[String]) -> Result<usize, ReplayError> {
    let mut n = 0;
    for chunk in keys.chunks(500) {
        let deleted: usize = redis::cmd("DEL")
            .arg(chunk)
            .query_async(redis)
            .await
            .map_err(|source| ReplayError::Invalidate { tenant: tenant.to_string(), source })?;
        n += deleted;
    }
    Ok(n)
}
