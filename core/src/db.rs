//! The tenant database: connecting with the tenant's DB user, migrations,
//! reads, the job's batched apply and the synchronous fallback transition.
//!
//! Only SQL that MySQL 8, TiDB and MariaDB share: no RETURNING, and
//! `ON DUPLICATE KEY UPDATE ... VALUES(col)` for upserts.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow, MySqlSslMode};
use sqlx::{MySql, QueryBuilder, Row};

use crate::config::{DbTls, DbTlsMode, TenantConfig};
use crate::domain::{Action, Delta, Forbidden, State, transition};
use crate::event::LikeEvent;
use crate::version::{VersionClock, now_ms};

/// Rows per statement in batched statements.
const CHUNK: usize = 500;

/// Pushes `(SELECT ? AS c1, ? AS c2 UNION ALL SELECT ?, ? ...) k JOIN <table> r
/// ON r.c1 = k.c1 AND r.c2 = k.c2`: `table` (alias `r`) joined to the derived
/// table of `keys` (at least one), which looks every key up by `columns`, the
/// table's primary key.
///
/// Why not `WHERE (c1, c2) IN ((?, ?), ...)`: with bound parameters MariaDB
/// plans such a list as one index range per tuple, and 500 tuples spend
/// about 100 ms of optimizer CPU in "Statistics" (measured on the local
/// stack) where this join takes about 5 ms. The job runs one such statement
/// per 500 records every window, so the IN list made each window a CPU burst
/// on the DB. `UNION ALL` of SELECTs is SQL that MySQL 8, TiDB and MariaDB
/// all accept, unlike table value constructors.
fn push_key_join<const N: usize>(
    q: &mut QueryBuilder<MySql>,
    table: &'static str,
    columns: [&'static str; N],
    keys: impl IntoIterator<Item = [i64; N]>,
) {
    q.push("(");
    for (i, key) in keys.into_iter().enumerate() {
        q.push(if i == 0 { "SELECT " } else { " UNION ALL SELECT " });
        for (j, (v, col)) in key.into_iter().zip(columns).enumerate() {
            if j > 0 {
                q.push(", ");
            }
            q.push_bind(v);
            if i == 0 {
                q.push(" AS ").push(col);
            }
        }
    }
    q.push(") k JOIN ").push(table).push(" r ON ");
    for (j, col) in columns.iter().enumerate() {
        q.push(if j == 0 { "r." } else { " AND r." }).push(col).push(" = k.").push(col);
    }
}

/// The embedded migrations of a tenant schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the TLS settings `tls` to `opts` (nothing when None: the
/// client's default, TLS when the server offers it, unverified).
pub fn with_tls(opts: MySqlConnectOptions, tls: Option<&DbTls>) -> MySqlConnectOptions {
    let Some(tls) = tls else { return opts };
    let opts = opts.ssl_mode(match tls.mode {
        DbTlsMode::Required => MySqlSslMode::Required,
        DbTlsMode::VerifyCa => MySqlSslMode::VerifyCa,
        DbTlsMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
    });
    // The content read with the config, else the file itself (read by
    // the client at each connect: a config built in code).
    match (&tls.ca_pem, &tls.ca_file) {
        (Some(pem), _) => opts.ssl_ca_from_pem(pem.clone()),
        (None, Some(file)) => opts.ssl_ca(file),
        (None, None) => opts,
    }
}

/// The options of a session on the tenant schema with the tenant's DB user
/// and its TLS settings.
pub fn connect_options(t: &TenantConfig) -> Result<MySqlConnectOptions, sqlx::Error> {
    let opts = MySqlConnectOptions::from_str(&t.db.url)?
        .username(&t.db.username)
        .password(&t.db.password)
        .database(&t.schema());
    Ok(with_tls(opts, t.db.tls.as_ref()))
}

/// Connects a pool to the tenant schema with the tenant's DB user. Lazy: the
/// first query connects, so a process starts while the DB is down.
pub fn connect_lazy(t: &TenantConfig) -> Result<MySqlPool, sqlx::Error> {
    let opts = connect_options(t)?;
    Ok(MySqlPoolOptions::new()
        .max_connections(t.db.max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(opts))
}

/// Brings the tenant schema up to date; idempotent.
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A record as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Current state.
    pub state: State,
    /// Newest applied version (0: never written).
    pub version: i64,
    /// The item owner.
    pub up_mid: i64,
}

/// Counts of an item (or received likes, with `dislikes` 0) and their version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Likes.
    pub likes: i64,
    /// Dislikes.
    pub dislikes: i64,
    /// Grows with every change; 0 for an item never counted.
    pub version: i64,
}

/// One entry of a newest-first list: (Unix ms, id).
pub type ListEntry = (i64, i64);

fn state_of(row: &MySqlRow, col: &str) -> Result<State, sqlx::Error> {
    let code: i8 = row.try_get(col)?;
    State::from_code(code as i64).ok_or_else(|| sqlx::Error::Decode(format!("bad state {code}").into()))
}

/// States of one user on several items of a business.
pub async fn load_states(
    pool: &MySqlPool,
    mid: i64,
    business: i64,
    messages: &[i64],
) -> Result<HashMap<i64, Record>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in messages.chunks(CHUNK) {
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
    for chunk in messages.chunks(CHUNK) {
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
    for chunk in owners.chunks(CHUNK) {
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

/// What one batch apply did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Transitions the DB took in this batch, with the state the DB had
    /// before: one downstream event each.
    pub transitions: Vec<(LikeEvent, State)>,
    /// Events whose version the DB already holds (applied by an earlier
    /// attempt that died before acknowledging): downstream is at-least-once,
    /// so they are published again; consumers deduplicate by version.
    pub already_applied: Vec<LikeEvent>,
    /// Items whose cached counts should be refreshed.
    pub items: Vec<(i64, i64)>,
    /// Owners whose cached received likes should be refreshed.
    pub owners: Vec<(i64, i64)>,
}

/// Sums of deltas per key, ordered so that concurrent writers lock rows in
/// the same order.
#[derive(Default)]
struct Sums {
    counts: BTreeMap<(i64, i64), Delta>,
    received: BTreeMap<(i64, i64), i64>,
}

impl Sums {
    fn add(&mut self, business: i64, message: i64, from: Record, to_state: State, to_up: i64) {
        let d = Delta::between(from.state, to_state);
        if !d.is_zero() {
            let e = self.counts.entry((business, message)).or_default();
            e.likes += d.likes;
            e.dislikes += d.dislikes;
        }
        if from.state == State::Like {
            *self.received.entry((business, from.up_mid)).or_default() -= 1;
        }
        if to_state == State::Like {
            *self.received.entry((business, to_up)).or_default() += 1;
        }
    }

    async fn write(&self, tx: &mut sqlx::Transaction<'_, MySql>) -> Result<(), sqlx::Error> {
        let counts: Vec<_> = self.counts.iter().filter(|(_, d)| !d.is_zero()).collect();
        for chunk in counts.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new(
                "INSERT INTO like_counts (business_id, message_id, likes, dislikes, version) ",
            );
            q.push_values(chunk, |mut b, ((biz, msg), d)| {
                b.push_bind(*biz).push_bind(*msg).push_bind(d.likes).push_bind(d.dislikes).push_bind(1i64);
            });
            q.push(
                " ON DUPLICATE KEY UPDATE likes = likes + VALUES(likes), \
                 dislikes = dislikes + VALUES(dislikes), version = version + 1",
            );
            q.build().execute(&mut **tx).await?;
        }
        let received: Vec<_> = self.received.iter().filter(|(_, d)| **d != 0).collect();
        for chunk in received.chunks(CHUNK) {
            let mut q = QueryBuilder::<MySql>::new("INSERT INTO received_likes (business_id, up_mid, likes, version) ");
            q.push_values(chunk, |mut b, ((biz, up), d)| {
                b.push_bind(*biz).push_bind(*up).push_bind(**d).push_bind(1i64);
            });
            q.push(" ON DUPLICATE KEY UPDATE likes = likes + VALUES(likes), version = version + 1");
            q.build().execute(&mut **tx).await?;
        }
        Ok(())
    }
}

async fn lock_records(
    tx: &mut sqlx::Transaction<'_, MySql>,
    keys: &[(i64, i64, i64)],
) -> Result<HashMap<(i64, i64, i64), Record>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in keys.chunks(CHUNK) {
        let mut q =
            QueryBuilder::<MySql>::new("SELECT r.mid, r.business_id, r.message_id, r.up_mid, r.state, r.version FROM ");
        let key = ["mid", "business_id", "message_id"];
        push_key_join(&mut q, "like_records", key, chunk.iter().map(|(m, b, g)| [*m, *b, *g]));
        q.push(" FOR UPDATE");
        for row in q.build().fetch_all(&mut **tx).await? {
            let key = (row.try_get("mid")?, row.try_get("business_id")?, row.try_get("message_id")?);
            out.insert(
                key,
                Record {
                    state: state_of(&row, "state")?,
                    version: row.try_get("version")?,
                    up_mid: row.try_get("up_mid")?,
                },
            );
        }
    }
    Ok(out)
}

async fn upsert_records(tx: &mut sqlx::Transaction<'_, MySql>, events: &[&LikeEvent]) -> Result<(), sqlx::Error> {
    for chunk in events.chunks(CHUNK) {
        let mut q = QueryBuilder::<MySql>::new(
            "INSERT INTO like_records (mid, business_id, message_id, up_mid, state, version, mtime) ",
        );
        q.push_values(chunk, |mut b, e| {
            b.push_bind(e.mid)
                .push_bind(e.business_id)
                .push_bind(e.message_id)
                .push_bind(e.up_mid)
                .push_bind(e.state.code())
                .push_bind(e.version)
                .push_bind(e.mtime_ms);
        });
        q.push(
            " ON DUPLICATE KEY UPDATE up_mid = VALUES(up_mid), state = VALUES(state), \
             mtime = VALUES(mtime), version = VALUES(version)",
        );
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}

/// Applies a batch of events in ONE transaction: each record takes the newest
/// event of the batch if it is newer than the stored version, and the counts
/// and received likes move by the summed deltas of the state changes the DB
/// saw. Replaying any events again changes nothing.
pub async fn apply_events(pool: &MySqlPool, events: &[LikeEvent]) -> Result<Applied, sqlx::Error> {
    let mut newest: BTreeMap<(i64, i64, i64), &LikeEvent> = BTreeMap::new();
    for e in events {
        let slot = newest.entry(e.record()).or_insert(e);
        if e.version > slot.version {
            *slot = e;
        }
    }
    let keys: Vec<_> = newest.keys().copied().collect();
    let mut tx = pool.begin().await?;
    let stored = lock_records(&mut tx, &keys).await?;
    let mut sums = Sums::default();
    let mut applied = Applied::default();
    let mut writes = Vec::new();
    for (key, e) in &newest {
        let cur = stored.get(key).copied().unwrap_or(Record { state: State::None, version: 0, up_mid: e.up_mid });
        if e.version > cur.version {
            sums.add(e.business_id, e.message_id, cur, e.state, e.up_mid);
            writes.push(*e);
            applied.transitions.push(((*e).clone(), cur.state));
        } else if e.version == cur.version {
            applied.already_applied.push((*e).clone());
        }
    }
    upsert_records(&mut tx, &writes).await?;
    sums.write(&mut tx).await?;
    tx.commit().await?;
    let mut items: Vec<_> = newest.values().map(|e| (e.business_id, e.message_id)).collect();
    items.sort_unstable();
    items.dedup();
    let mut owners: Vec<_> = newest.values().map(|e| (e.business_id, e.up_mid)).collect();
    owners.extend(sums.received.keys().copied());
    owners.sort_unstable();
    owners.dedup();
    applied.items = items;
    applied.owners = owners;
    Ok(applied)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_join_names_the_columns_once_and_joins_on_every_one() {
        let mut q = QueryBuilder::<MySql>::new("SELECT r.likes FROM ");
        push_key_join(&mut q, "received_likes", ["business_id", "up_mid"], [[1, 7], [1, 8]]);
        assert_eq!(
            q.sql().as_str(),
            "SELECT r.likes FROM (SELECT ? AS business_id, ? AS up_mid UNION ALL SELECT ?, ?) k \
             JOIN received_likes r ON r.business_id = k.business_id AND r.up_mid = k.up_mid"
        );
    }
}
