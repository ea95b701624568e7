//! The read path: counts of hot items from this process's memory
//! ([`crate::hot`]), then Redis (falling back to the DB while Redis is
//! down), the DB on a miss, filling the cache with versioned values.
//! Concurrent loads of one key make one load, by one mechanism
//! ([`crate::flight`]): a key that just turned hot has its first load (Redis,
//! then the DB) made by one reader of this process, and concurrent Redis
//! misses of any other key make one DB query.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use sqlx::MySqlPool;
use thumbup_core::cache;
use thumbup_core::db::{self, Counts, ListEntry};
use thumbup_core::domain::State;

use crate::error::Error;
use crate::flight::{Flights, Join};
use crate::hot::Lookup;
use crate::metrics;
use crate::tenants::{Registry, Source, Tenant};

/// A DB failure of `t`'s request, noted (a connection failure makes the
/// tenant skip the DB for a moment).
pub(crate) fn db_err(t: &Tenant, source: impl Into<Arc<sqlx::Error>>) -> Error {
    let source = source.into();
    t.db_failed(&source);
    Error::Db { tenant: t.name().to_string(), source }
}

/// Fails fast while the DB is known to be down.
fn db_ready(t: &Tenant) -> Result<(), Error> {
    if t.db_available() { Ok(()) } else { Err(Error::DbDown(t.name().to_string())) }
}

/// Fails fast while the DB that `source` reads from falls back on is
/// known to be down (this datacenter's DB is tried regardless).
fn db_ready_for(t: &Tenant, source: Source) -> Result<(), Error> {
    if source == Source::Local { Ok(()) } else { db_ready(t) }
}

/// Runs the DB read `f` on `source`'s DB; when this datacenter's DB fails
/// it, on the tenant's own. Pass an error to [`db_err`].
async fn db_read<T, F, Fut>(t: &Tenant, source: Source, f: F) -> Result<T, Arc<sqlx::Error>>
where
    F: Fn(MySqlPool) -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    if source == Source::Local {
        match f(t.read_db(source).clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => t.local_failed("db", &e),
        }
    }
    f(t.db.clone()).await.map_err(Arc::new)
}

fn redis_err(t: &Tenant, source: redis::RedisError) -> Error {
    Error::Redis { tenant: t.name().to_string(), source }
}

/// Runs `f` against `source`'s Redis; an outage yields `None`, so the
/// caller serves from the DB. A broken connection takes the tenant off
/// Redis; a slow answer only has the fence loop check Redis now. A failure
/// of this datacenter's Redis only sends reads to the tenant's own for a
/// moment. While the tenant is off Redis (its writes on the DB path) no
/// Redis answers reads, this datacenter's included: the DB path's changes
/// are not in the cache.
async fn try_redis<T, F>(t: &Tenant, source: Source, f: F) -> Result<Option<T>, Error>
where
    F: Future<Output = Result<T, redis::RedisError>>,
{
    if !t.redis_up() {
        return Ok(None);
    }
    match f.await {
        Ok(v) => Ok(Some(v)),
        Err(e) if source == Source::Local => {
            t.local_failed("redis", &e);
            Ok(None)
        }
        Err(e) if cache::is_unreachable(&e) => {
            if e.is_timeout() {
                t.fence.check_soon();
            } else {
                t.mark_redis_down(&e);
            }
            Ok(None)
        }
        Err(e) => Err(redis_err(t, e)),
    }
}

fn hit(cache: &str, hits: usize, misses: usize) {
    metrics::CACHE.with_label_values(&[cache, "hit"]).inc_by(hits as u64);
    metrics::CACHE.with_label_values(&[cache, "miss"]).inc_by(misses as u64);
}

/// States of a user on items.
pub async fn states(t: &Tenant, mid: i64, business: i64, messages: &[i64]) -> Result<HashMap<i64, State>, Error> {
    let key = t.keys.user(mid, business);
    let source = t.read_source();
    let mut con = t.read_redis(source);
    let cached = try_redis(t, source, cache::user_view(&mut con, &key, messages)).await?;
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    match cached.flatten() {
        Some(view) => {
            for (i, m) in messages.iter().enumerate() {
                match view.state(i) {
                    Some(s) => {
                        out.insert(*m, s);
                    }
                    None => missing.push(*m),
                }
            }
        }
        None => missing.extend_from_slice(messages),
    }
    hit("state", out.len(), missing.len());
    if !missing.is_empty() {
        db_ready_for(t, source)?;
        let ids = &missing;
        let found = db_read(t, source, |db| async move { db::load_states(&db, mid, business, ids).await })
            .await
            .map_err(|e| db_err(t, e))?;
        for m in missing {
            out.insert(m, found.get(&m).map_or(State::None, |r| r.state));
        }
    }
    Ok(out)
}

/// In-flight DB loads of counts, keyed by cache key: the first miss of a key
/// queries, later misses of the same key wait for its answer. (A hot key's
/// readers already wait for its one loader in [`crate::hot`]'s flights, so
/// its DB load has no followers from this process.)
static FLIGHTS: LazyLock<Flights<Result<Counts, Arc<sqlx::Error>>>> = LazyLock::new(|| Flights::new(FLIGHT_PATIENCE));

/// How long followers wait for a DB load of counts before loading for
/// themselves (a session stuck on a dead DB).
const FLIGHT_PATIENCE: Duration = Duration::from_secs(5);

/// Counts of items.
pub async fn counts(
    reg: &Registry,
    t: &Tenant,
    business: i64,
    messages: &[i64],
) -> Result<HashMap<i64, Counts>, Error> {
    let all: Vec<String> = messages.iter().map(|m| t.keys.counts(business, *m)).collect();
    // Hot items first, from this process's memory.
    let mut out = HashMap::new();
    let mut refreshing = Vec::new();
    let (messages, keys): (Vec<i64>, Vec<String>) = match &t.hot {
        None => (messages.to_vec(), all),
        Some(hot) => {
            let now = Instant::now();
            let mut rest = (Vec::new(), Vec::new());
            let mut waiting = Vec::new();
            for (m, key) in messages.iter().zip(all) {
                match hot.lookup(&key, now) {
                    Lookup::Fresh(c) | Lookup::Stale(c) => {
                        out.insert(*m, c);
                    }
                    Lookup::Loading(rx) => waiting.push((*m, key, rx)),
                    Lookup::Miss { refresh } => {
                        if refresh {
                            refreshing.push(key.clone());
                        }
                        rest.0.push(*m);
                        rest.1.push(key);
                    }
                }
            }
            // Another reader is loading these: take its answer, or read for
            // ourselves if it failed or takes longer than a TTL.
            for (m, key, rx) in waiting {
                let answer = tokio::time::timeout(hot.ttl(), Flights::answer(rx)).await.ok().flatten();
                match answer {
                    Some(c) => {
                        out.insert(m, c);
                    }
                    None => {
                        rest.0.push(m);
                        rest.1.push(key);
                    }
                }
            }
            hit("local", out.len(), rest.0.len());
            if hot.sample() {
                metrics::HOT_KEYS.with_label_values(&[t.name()]).set(hot.hot_keys(now) as i64);
            }
            rest
        }
    };
    if keys.is_empty() {
        return Ok(out);
    }
    let loaded = counts_shared(reg, t, business, &messages, &keys).await;
    if let Some(hot) = &t.hot {
        let now = Instant::now();
        match &loaded {
            Ok(found) => {
                for (m, key) in messages.iter().zip(&keys) {
                    if let Some(c) = found.get(m) {
                        hot.fill(key, *c, now);
                    }
                }
            }
            Err(_) => refreshing.iter().for_each(|k| hot.abandon(k)),
        }
    }
    out.extend(loaded?);
    Ok(out)
}

/// Counts of items from Redis, then the DB (shared by every process).
async fn counts_shared(
    reg: &Registry,
    t: &Tenant,
    business: i64,
    messages: &[i64],
    keys: &[String],
) -> Result<HashMap<i64, Counts>, Error> {
    let source = t.read_source();
    let mut con = t.read_redis(source);
    let Some(values) = try_redis(t, source, cache::mget(&mut con, keys)).await? else {
        db_ready_for(t, source)?;
        let found = db_read(t, source, |db| async move { db::load_counts(&db, business, messages).await })
            .await
            .map_err(|e| db_err(t, e))?;
        return Ok(messages.iter().map(|m| (*m, found.get(m).copied().unwrap_or_default())).collect());
    };
    let mut out = HashMap::new();
    let mut missing = Vec::new();
    for ((m, key), v) in messages.iter().zip(keys).zip(values) {
        match v.as_deref().and_then(cache::parse_pair) {
            Some((likes, dislikes, version)) => {
                out.insert(*m, Counts { likes, dislikes, version });
            }
            None => missing.push((*m, key.clone())),
        }
    }
    hit("counts", out.len(), missing.len());
    if missing.is_empty() {
        return Ok(out);
    }
    // Lead the keys nobody is loading; follow the others.
    let now = Instant::now();
    let mut lead = Vec::new();
    let mut follow = Vec::new();
    for (m, key) in missing {
        match FLIGHTS.join(&key, now) {
            Join::Lead(leader) => lead.push((m, key, leader)),
            Join::Follow(rx) => follow.push((m, rx)),
        }
    }
    if !lead.is_empty() {
        // Leaders dropped unfinished (here or on an error) let their
        // followers load for themselves.
        db_ready_for(t, source)?;
        let ids: Vec<i64> = lead.iter().map(|(m, _, _)| *m).collect();
        let ids = &ids;
        let loaded = db_read(t, source, |db| async move { db::load_counts(&db, business, ids).await }).await;
        // Fills go to the active datacenter's Redis, whence they replicate.
        let mut con = t.redis.clone();
        let mut filled = Vec::with_capacity(lead.len());
        for (m, key, leader) in lead {
            let answer = loaded.as_ref().map(|found| found.get(&m).copied().unwrap_or_default());
            leader.finish(answer.map_err(Arc::clone));
            filled.push((m, key));
        }
        let found = loaded.map_err(|e| db_err(t, e))?;
        for (m, key) in &filled {
            let c = found.get(m).copied().unwrap_or_default();
            // A failed fill only costs a later miss.
            let _ = reg
                .scripts()
                .set_if_newer(&mut con, key, (c.likes, c.dislikes), c.version, t.cfg.cache.counts_ttl_secs)
                .await;
            out.insert(*m, c);
        }
    }
    for (m, rx) in follow {
        let c = match Flights::answer(rx).await {
            Some(Ok(c)) => c,
            // The leader's error, as it got it (it noted the outage).
            Some(Err(source)) => return Err(Error::Db { tenant: t.name().to_string(), source }),
            // The leader was cancelled: load it ourselves.
            None => db_read(t, source, |db| async move { db::load_counts(&db, business, &[m]).await })
                .await
                .map_err(|e| db_err(t, e))?
                .get(&m)
                .copied()
                .unwrap_or_default(),
        };
        out.insert(m, c);
    }
    Ok(out)
}

/// Likes received by an owner.
pub async fn received(reg: &Registry, t: &Tenant, business: i64, up_mid: i64) -> Result<i64, Error> {
    let key = t.keys.received(business, up_mid);
    let source = t.read_source();
    let mut con = t.read_redis(source);
    let cached = try_redis(t, source, cache::mget(&mut con, std::slice::from_ref(&key))).await?;
    if let Some(Some((likes, _, _))) = cached.as_ref().map(|v| v[0].as_deref().and_then(cache::parse_pair)) {
        hit("received", 1, 0);
        return Ok(likes);
    }
    hit("received", 0, 1);
    db_ready_for(t, source)?;
    let c = db_read(t, source, |db| async move { db::load_received(&db, business, up_mid).await })
        .await
        .map_err(|e| db_err(t, e))?;
    if cached.is_some() {
        let mut con = t.redis.clone();
        let _ = reg.scripts().set_if_newer(&mut con, &key, (c.likes, 0), c.version, t.cfg.cache.counts_ttl_secs).await;
    }
    Ok(c.likes)
}

/// One page of a user's liked items, newest first, strictly after `after`.
/// The Redis list holds the newest likes (including those the job has not
/// applied yet); the DB holds all applied ones. Both are read and merged: a
/// DB entry is dropped when Redis knows better (the item is in the list, or
/// its cached state is no longer LIKE).
pub async fn user_likes(
    t: &Tenant,
    mid: i64,
    business: i64,
    after: Option<ListEntry>,
    page: u32,
) -> Result<(Vec<ListEntry>, bool), Error> {
    let want = page as usize + 1;
    let source = t.read_source();
    db_ready_for(t, source)?;
    let from_db =
        db_read(t, source, |db| async move { db::list_user_likes(&db, mid, business, after, want as u32).await })
            .await
            .map_err(|e| db_err(t, e))?;
    let list_key = t.keys.user(mid, business);
    let mut con = t.read_redis(source);
    let redis_side = try_redis(t, source, async {
        let mut newest: Vec<(i64, i64)> = Vec::new();
        let mut offset = 0;
        // Ties on the time are resolved by id below, so read past them.
        loop {
            let chunk = cache::liked_newest(&mut con, &list_key, after.map(|(ms, _)| ms), offset, want).await?;
            let n = chunk.len();
            newest.extend(chunk);
            offset += n;
            let beyond = newest.iter().filter(|e| after.is_none_or(|a| **e < a)).count();
            if n < want || beyond >= want {
                break;
            }
        }
        let ids: Vec<i64> = from_db.iter().map(|(_, m)| *m).collect();
        // Only the DB's entries need the cache's word on them.
        let view = if ids.is_empty() { None } else { cache::user_view(&mut con, &list_key, &ids).await? };
        Ok((newest, view))
    })
    .await?;
    let mut merged: Vec<ListEntry> = match redis_side {
        None => from_db,
        Some((newest, view)) => {
            let listed: HashSet<i64> = newest.iter().map(|(_, m)| *m).collect();
            let mut v: Vec<ListEntry> = newest.into_iter().filter(|e| after.is_none_or(|a| *e < a)).collect();
            for (i, e) in from_db.into_iter().enumerate() {
                // Redis knows better whenever the user's cache knows the
                // record: LIKE shows from its list, any other state drops it.
                let stale = listed.contains(&e.1) || view.as_ref().and_then(|v| v.state(i)).is_some();
                if !stale {
                    v.push(e);
                }
            }
            v
        }
    };
    // Ids are unique: the list holds each once and DB entries it holds were dropped.
    merged.sort_unstable_by(|a, b| b.cmp(a));
    let more = merged.len() > page as usize;
    merged.truncate(page as usize);
    Ok((merged, more))
}

/// One page of an item's likers, newest first (from the DB: it follows the
/// writes within one job window).
pub async fn item_likers(
    t: &Tenant,
    business: i64,
    message: i64,
    after: Option<ListEntry>,
    page: u32,
) -> Result<(Vec<ListEntry>, bool), Error> {
    let source = t.read_source();
    db_ready_for(t, source)?;
    let mut rows =
        db_read(t, source, |db| async move { db::list_item_likers(&db, business, message, after, page + 1).await })
            .await
            .map_err(|e| db_err(t, e))?;
    let more = rows.len() > page as usize;
    rows.truncate(page as usize);
    Ok((rows, more))
}
