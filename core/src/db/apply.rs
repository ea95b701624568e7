//! The job's batched apply of stream events: records, counts and received
//! likes of a window in one transaction.

use std::collections::{BTreeMap, HashMap};

use sqlx::mysql::MySqlPool;
use sqlx::{MySql, QueryBuilder, Row};

use super::{Record, push_key_join, rows_per_statement, state_of};
use crate::domain::{Delta, State};
use crate::event::LikeEvent;

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
pub(super) struct Sums {
    counts: BTreeMap<(i64, i64), Delta>,
    received: BTreeMap<(i64, i64), i64>,
}

impl Sums {
    pub(super) fn add(&mut self, business: i64, message: i64, from: Record, to_state: State, to_up: i64) {
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

    pub(super) async fn write(&self, tx: &mut sqlx::Transaction<'_, MySql>) -> Result<(), sqlx::Error> {
        let counts: Vec<_> = self.counts.iter().filter(|(_, d)| !d.is_zero()).collect();
        for chunk in counts.chunks(rows_per_statement(5)) {
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
        for chunk in received.chunks(rows_per_statement(4)) {
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

pub(super) async fn lock_records(
    tx: &mut sqlx::Transaction<'_, MySql>,
    keys: &[(i64, i64, i64)],
) -> Result<HashMap<(i64, i64, i64), Record>, sqlx::Error> {
    let mut out = HashMap::new();
    for chunk in keys.chunks(rows_per_statement(3)) {
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

pub(super) async fn upsert_records(
    tx: &mut sqlx::Transaction<'_, MySql>,
    events: &[&LikeEvent],
) -> Result<(), sqlx::Error> {
    for chunk in events.chunks(rows_per_statement(7)) {
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
