//! The synchronous DB path of a write while Redis is down, and the queue of
//! cache keys it invalidates.

use sqlx::Row;
use sqlx::mysql::MySqlPool;

use super::apply::{Sums, lock_records, upsert_records};
use super::{Counts, Record};
use crate::domain::{Action, Forbidden, State, transition};
use crate::event::LikeEvent;
use crate::version::{VersionClock, now_ms};

/// Result of the synchronous fallback transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FallbackOutcome {
    /// State before.
    pub prev: State,
    /// State after.
    pub state: State,
    /// The new record version.
    pub version: i64,
    /// The item's counts after the transition.
    pub counts: Counts,
}

/// Error of the fallback transition.
#[derive(Debug, thiserror::Error)]
pub enum FallbackError {
    /// The table forbids the action.
    #[error(transparent)]
    Forbidden(#[from] Forbidden),
    /// The DB failed.
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// The DB path may not decide this write (see [`crate::fence`]).
    #[error(transparent)]
    Shut(#[from] crate::fence::Shut),
}

/// Runs one transition as a synchronous DB transaction (Redis unreachable),
/// on the DB path of fence epoch `epoch`.
///
/// The transaction holds the fence row in share mode and first checks that
/// the DB path of `epoch` is still open and the record is not unsettled
/// ([`crate::fence::check_open`]): only then is the stored record the newest
/// acknowledged state. Counts move in the same transaction: this path is
/// rate-limited, so the per-like counts update that the normal path avoids
/// is bounded here. The record is queued for cache invalidation, so Redis
/// serves nothing stale once it returns.
pub async fn fallback_transition(
    pool: &MySqlPool,
    clock: &VersionClock,
    epoch: i64,
    (mid, business, message, up_mid): (i64, i64, i64, i64),
    action: Action,
) -> Result<FallbackOutcome, FallbackError> {
    let mut tx = pool.begin().await?;
    crate::fence::check_open(&mut tx, epoch, (mid, business, message)).await??;
    let stored = lock_records(&mut tx, &[(mid, business, message)]).await?;
    let cur = stored.values().next().copied().unwrap_or(Record { state: State::None, version: 0, up_mid });
    let state = transition(cur.state, action)?;
    let event = LikeEvent {
        mid,
        business_id: business,
        message_id: message,
        up_mid,
        state,
        prev: cur.state,
        version: clock.next_after(cur.version),
        mtime_ms: now_ms(),
    };
    upsert_records(&mut tx, &[&event]).await?;
    let mut sums = Sums::default();
    sums.add(business, message, cur, state, up_mid);
    sums.write(&mut tx).await?;
    sqlx::query("INSERT INTO cache_invalidations (mid, business_id, message_id, up_mid) VALUES (?, ?, ?, ?)")
        .bind(mid)
        .bind(business)
        .bind(message)
        .bind(cur.up_mid)
        .execute(&mut *tx)
        .await?;
    let row = sqlx::query("SELECT likes, dislikes, version FROM like_counts WHERE business_id = ? AND message_id = ?")
        .bind(business)
        .bind(message)
        .fetch_optional(&mut *tx)
        .await?;
    tx.commit().await?;
    let counts = match row {
        Some(r) => {
            Counts { likes: r.try_get("likes")?, dislikes: r.try_get("dislikes")?, version: r.try_get("version")? }
        }
        None => Counts::default(),
    };
    Ok(FallbackOutcome { prev: cur.state, state, version: event.version, counts })
}

/// A queued cache invalidation: (id, mid, business, message, previous up_mid).
pub type Invalidation = (i64, i64, i64, i64, i64);

/// The oldest queued invalidations.
pub async fn pending_invalidations(pool: &MySqlPool, limit: u32) -> Result<Vec<Invalidation>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT id, mid, business_id, message_id, up_mid FROM cache_invalidations ORDER BY id LIMIT ?")
            .bind(limit)
            .fetch_all(pool)
            .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                r.try_get("mid")?,
                r.try_get("business_id")?,
                r.try_get("message_id")?,
                r.try_get("up_mid")?,
            ))
        })
        .collect()
}

/// Removes invalidations up to and including `max_id`, once their keys are gone.
pub async fn clear_invalidations(pool: &MySqlPool, max_id: i64) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM cache_invalidations WHERE id <= ?").bind(max_id).execute(pool).await?;
    Ok(())
}
