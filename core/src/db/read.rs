//! Reads of records, counts, received likes and the newest-first lists.

use std::collections::HashMap;

use sqlx::mysql::MySqlPool;
use sqlx::{MySql, QueryBuilder, Row};

use super::{Counts, ListEntry, Record, push_key_join, rows_per_statement, state_of};
use crate::cache::Warm;
use crate::domain::State;

/// A user's records of a business, to warm the user's cache with: at most
/// `limit` of them, newest version first, in one query. The floor is the
/// newest version of all the user's records (the first row); the entries
/// are complete when the user has no more records than `limit` (then NONE
/// records are left out: a complete cache holds no NONE members).
pub async fn load_user(pool: &MySqlPool, mid: i64, business: i64, limit: u32) -> Result<Warm, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT message_id, state, mtime, version FROM like_records WHERE mid = ? AND business_id = ? \
         ORDER BY version DESC LIMIT ?",
    )
    .bind(mid)
    .bind(business)
    .bind(u64::from(limit) + 1)
    .fetch_all(pool)
    .await?;
    let complete = rows.len() <= limit as usize;
    let mut warm = Warm { floor: 0, complete, entries: Vec::new() };
    for row in rows.iter().take(limit as usize) {
        let version: i64 = row.try_get("version")?;
        warm.floor = warm.floor.max(version);
        let state = state_of(row, "state")?;
        if state != State::None || !complete {
            warm.entries.push((row.try_get("message_id")?, state, row.try_get("mtime")?));
        }
    }
    Ok(warm)
}

/// The largest mid of any record (0 when there is none): one read of the
/// primary key's end. It bounds every shard's and business's users, for a
/// newest-user bound (`Keys::newest`).
pub async fn max_mid(pool: &MySqlPool) -> Result<i64, sqlx::Error> {
    let max: Option<i64> = sqlx::query_scalar("SELECT MAX(mid) FROM like_records").fetch_one(pool).await?;
    Ok(max.unwrap_or(0))
}

/// States of one user on several items of a business.
pub async fn load_states(
    pool: &MySqlPool,
    mid: i64,
    business: i64,
    messages: &[i64],
) -> Result<HashMap<i64, Record>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in messages.chunks(rows_per_statement(1)) {
        let mut q =
            QueryBuilder::<MySql>::new("SELECT message_id, state, version, up_mid FROM like_records WHERE mid = ");
        q.push_bind(mid).push(" AND business_id = ").push_bind(business).push(" AND message_id IN (");
        let mut sep = q.separated(", ");
        for m in chunk {
            sep.push_bind(*m);
        }
        q.push(")");
        for row in q.build().fetch_all(pool).await? {
            let rec = Record {
                state: state_of(&row, "state")?,
                version: row.try_get("version")?,
                up_mid: row.try_get("up_mid")?,
            };
            out.insert(row.try_get("message_id")?, rec);
        }
    }
    Ok(out)
}

/// Counts of several items of a business; items never counted are absent.
pub async fn load_counts(
    pool: &MySqlPool,
    business: i64,
    messages: &[i64],
) -> Result<HashMap<i64, Counts>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in messages.chunks(rows_per_statement(1)) {
        let mut q = QueryBuilder::<MySql>::new(
            "SELECT message_id, likes, dislikes, version FROM like_counts WHERE business_id = ",
        );
        q.push_bind(business).push(" AND message_id IN (");
        let mut sep = q.separated(", ");
        for m in chunk {
            sep.push_bind(*m);
        }
        q.push(")");
        for row in q.build().fetch_all(pool).await? {
            let c = Counts {
                likes: row.try_get("likes")?,
                dislikes: row.try_get("dislikes")?,
                version: row.try_get("version")?,
            };
            out.insert(row.try_get("message_id")?, c);
        }
    }
    Ok(out)
}

/// Likes received by an owner in a business.
pub async fn load_received(pool: &MySqlPool, business: i64, up_mid: i64) -> Result<Counts, sqlx::Error> {
    let row = sqlx::query("SELECT likes, version FROM received_likes WHERE business_id = ? AND up_mid = ?")
        .bind(business)
        .bind(up_mid)
        .fetch_optional(pool)
        .await?;
    match row {
        Some(r) => Ok(Counts { likes: r.try_get("likes")?, dislikes: 0, version: r.try_get("version")? }),
        None => Ok(Counts::default()),
    }
}

/// Received likes of several owners, as `(business, up_mid)` keys; owners
/// never counted are absent.
pub async fn load_received_many(
    pool: &MySqlPool,
    owners: &[(i64, i64)],
) -> Result<HashMap<(i64, i64), Counts>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in owners.chunks(rows_per_statement(2)) {
        let mut q = QueryBuilder::<MySql>::new("SELECT r.business_id, r.up_mid, r.likes, r.version FROM ");
        push_key_join(&mut q, "received_likes", ["business_id", "up_mid"], chunk.iter().map(|(biz, up)| [*biz, *up]));
        for row in q.build().fetch_all(pool).await? {
            let c = Counts { likes: row.try_get("likes")?, dislikes: 0, version: row.try_get("version")? };
            out.insert((row.try_get("business_id")?, row.try_get("up_mid")?), c);
        }
    }
    Ok(out)
}

/// One newest-first page of LIKE records with two columns fixed, listing
/// `(mtime, id)`, strictly after `after`. Column names are constants of this
/// module, never input.
async fn liked_page(
    pool: &MySqlPool,
    fixed: [(&'static str, i64); 2],
    id: &'static str,
    after: Option<ListEntry>,
    limit: u32,
) -> Result<Vec<ListEntry>, sqlx::Error> {
    let (ms, after_id) = after.unwrap_or((i64::MAX, i64::MAX));
    let sql = format!(
        "SELECT mtime, {id} FROM like_records \
         WHERE {a} = ? AND {b} = ? AND state = 1 AND (mtime < ? OR (mtime = ? AND {id} < ?)) \
         ORDER BY mtime DESC, {id} DESC LIMIT ?",
        a = fixed[0].0,
        b = fixed[1].0,
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(fixed[0].1)
        .bind(fixed[1].1)
        .bind(ms)
        .bind(ms)
        .bind(after_id)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
}

/// A user's liked items of a business, newest first, strictly after `after`.
pub async fn list_user_likes(
    pool: &MySqlPool,
    mid: i64,
    business: i64,
    after: Option<ListEntry>,
    limit: u32,
) -> Result<Vec<ListEntry>, sqlx::Error> {
    liked_page(pool, [("mid", mid), ("business_id", business)], "message_id", after, limit).await
}

/// The users who like an item, newest first, strictly after `after`.
pub async fn list_item_likers(
    pool: &MySqlPool,
    business: i64,
    message: i64,
    after: Option<ListEntry>,
    limit: u32,
) -> Result<Vec<ListEntry>, sqlx::Error> {
    liked_page(pool, [("business_id", business), ("message_id", message)], "mid", after, limit).await
}
