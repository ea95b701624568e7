//! Scenario f: memory. What a retained like costs in Redis (the cache
//! structures, apart from the stream) and in the DB, measured over
//! `--memory-likes` likes by `--memory-users` users over `--memory-items`
//! items, with a projection to Bilibili's write rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use thumbup_core::cache::Conn;
use thumbup_core::keys::Keys;
use thumbup_core::names::schema_for;
use thumbup_service::pb;
use tokio::task::JoinSet;

use super::Context;
use super::writes::wait_drained;
use crate::Args;
use crate::report::{Metric, Section, Target};

/// Bilibili's write rate (likes/s) and the state retention (7 days) of the
/// projection.
const BILIBILI_WRITES_PER_SEC: f64 = 15_000.0;
const RETENTION_SECS: f64 = 7.0 * 86_400.0;

/// `used_memory` of the server, or summed over a cluster's masters.
async fn used_memory(con: &mut Conn) -> anyhow::Result<i64> {
    let mut total = 0;
    let masters = if con.is_cluster() { con.masters().await? } else { vec![(String::new(), 0)] };
    for (host, port) in masters {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("memory");
        let info: String = redis::from_redis_value(con.on_node(&host, port, cmd).await.context("INFO memory")?)?;
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse::<i64>().ok())
            .context("INFO memory has no used_memory")?;
    }
    Ok(total)
}

/// Bytes and entries of the tenant's streams now: the event stream's shards
/// and the downstream stream (one entry per applied transition, kept up to
/// its cap), which are not cache structures.
/// (`downstream`: with the downstream stream.)
async fn stream_bytes(con: &mut Conn, keys: &Keys, downstream: bool) -> anyhow::Result<(i64, i64)> {
    let (mut bytes, mut entries) = (0, 0);
    let extra = downstream.then(|| keys.downstream());
    for key in (0..keys.shards()).map(|s| keys.stream(s)).chain(extra) {
        let b: Option<i64> = redis::cmd("MEMORY").arg("USAGE").arg(&key).arg("SAMPLES").arg(0).query_async(con).await?;
        let n: i64 = redis::cmd("XLEN").arg(&key).query_async(con).await?;
        bytes += b.unwrap_or(0);
        entries += n;
    }
    Ok((bytes, entries))
}

/// What the scenario's keys hold: (keys, bytes by MEMORY USAGE) of the
/// user caches and the counts keys of its users and items.
#[derive(Debug, Default)]
struct Breakdown {
    users: (i64, i64),
    counts: (i64, i64),
}

/// The class of key `key` of the tenant (prefix `prefix`) when it belongs to
/// the scenario's users `mids` or items `msgs`: 0 a user's cache, 1 counts.
fn classify(key: &str, prefix: &str, mids: &std::ops::Range<i64>, msgs: &std::ops::Range<i64>) -> Option<usize> {
    let rest = key.strip_prefix(prefix)?;
    let parts: Vec<&str> = rest.split(':').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<i64>().ok());
    match parts.as_slice() {
        [_, "u", ..] => num(3).filter(|m| mids.contains(m)).map(|_| 0),
        ["cnt", ..] => num(2).filter(|m| msgs.contains(m)).map(|_| 1),
        _ => None,
    }
}

async fn breakdown(
    con: &mut Conn,
    keys: &Keys,
    mids: std::ops::Range<i64>,
    msgs: std::ops::Range<i64>,
) -> anyhow::Result<Breakdown> {
    let prefix = keys.prefix();
    let pattern = format!("{prefix}*");
    let mut out = Breakdown::default();
    let mut cursor: u64 = 0;
    loop {
        let (next, found): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(5000).query_async(con).await?;
        let mine: Vec<(usize, String)> =
            found.into_iter().filter_map(|k| classify(&k, &prefix, &mids, &msgs).map(|c| (c, k))).collect();
        if !mine.is_empty() {
            let mut pipe = redis::pipe();
            for (_, k) in &mine {
                pipe.cmd("MEMORY").arg("USAGE").arg(k).arg("SAMPLES").arg(0);
            }
            let sizes: Vec<Option<i64>> = pipe.query_async(con).await.context("MEMORY USAGE")?;
            for ((class, _), size) in mine.iter().zip(sizes) {
                let slot = if *class == 0 { &mut out.users } else { &mut out.counts };
                slot.0 += 1;
                slot.1 += size.unwrap_or(0);
            }
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// The item of like `k`: user `k % users`'s `k / users`-th like, on
/// distinct items per user (`per_user` likes each, spread over `items`).
pub fn memory_item(k: u64, users: u64, items: u64, per_user: u64) -> u64 {
    let (user, j) = (k % users, k / users);
    (user * 7 + j * (items / per_user.max(1)).max(1)) % items
}

/// Scenario f, run once (its figures are sizes, not rates).
pub async fn memory(ctx: &Context, args: &Args) -> anyhow::Result<Section> {
    let (likes, users, items) = (args.memory_likes.max(1), args.memory_users.max(1), args.memory_items.max(1));
    let per_user = likes.div_ceil(users);
    anyhow::ensure!(per_user <= items, "--memory-likes / --memory-users must not exceed --memory-items");
    anyhow::ensure!(
        users <= 10_000_000 && items <= 10_000_000,
        "--memory-users and --memory-items are at most 10,000,000"
    );
    let stamp = jiff::Timestamp::now().as_second();
    // New users and items in every invocation (ids below 2^53).
    let mid_base = 6_000_000_000_000 + (stamp % 100_000) * 10_000_000;
    let msg_base = 6_200_000_000_000 + (stamp % 100_000) * 10_000_000;
    let keys = Keys::new(&args.tenant, args.shards.max(1));
    let mut con = ctx.redis.clone();
    let drain = Duration::from_secs(600);
    wait_drained(ctx, args, drain).await?;
    let used_before = used_memory(&mut con).await?;
    let (stream_before, _) = stream_bytes(&mut con, &keys, true).await?;

    let next = Arc::new(AtomicU64::new(0));
    let (acked, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (svc, next, acked, failed) =
            (ctx.service.clone(), Arc::clone(&next), Arc::clone(&acked), Arc::clone(&failed));
        set.spawn(async move {
            let mut first_error = None;
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= likes {
                    return first_error;
                }
                let mid = mid_base + (k % users) as i64;
                let msg = msg_base + memory_item(k, users, items, per_user) as i64;
                match svc.act(mid, msg, pb::Action::Like).await {
                    Ok(_) => acked.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.get_or_insert(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        });
    }
    let mut first_error = None;
    while let Some(done) = set.join_next().await {
        first_error = first_error.or(done.expect("memory load task panicked"));
    }
    let load_secs = started.elapsed().as_secs_f64();
    let (acked, failed) = (acked.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    // The event stream while it holds the newest entries: bytes per
    // retained entry (the downstream stream is filled by the job later).
    let (stream_peak, entries_peak) = stream_bytes(&mut con, &keys, false).await?;
    eprintln!(
        "thumbup-bench: f: {acked} likes acknowledged ({failed} failed{}) in {load_secs:.0} s; the stream holds \
         {entries_peak} entries in {stream_peak} bytes",
        first_error.as_deref().map(|e| format!(", first: {e}")).unwrap_or_default()
    );
    wait_drained(ctx, args, drain).await?;
    let used_after = used_memory(&mut con).await?;
    let (stream_after, _) = stream_bytes(&mut con, &keys, true).await?;
    let growth = (used_after - stream_after) - (used_before - stream_before);
    let per_like = growth as f64 / acked.max(1) as f64;
    let mids = mid_base..mid_base + users as i64;
    let msgs = msg_base..msg_base + items as i64;
    let b = breakdown(&mut con, &keys, mids.clone(), msgs).await?;
    let keys_per_like = (b.users.1 + b.counts.1) as f64 / acked.max(1) as f64;
    let stream_per_entry = stream_peak as f64 / entries_peak.max(1) as f64;

    let schema = schema_for(&args.tenant);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("ANALYZE TABLE `{schema}`.like_records")))
        .execute(&ctx.admin_db)
        .await
        .context("ANALYZE TABLE like_records")?;
    let (data, index): (i64, i64) = sqlx::query_as(
        "SELECT CAST(DATA_LENGTH AS SIGNED), CAST(INDEX_LENGTH AS SIGNED) FROM information_schema.TABLES \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'like_records'",
    )
    .bind(&schema)
    .fetch_one(&ctx.admin_db)
    .await
    .context("read like_records' size")?;
    let rows: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM `{schema}`.like_records")))
        .fetch_one(&ctx.admin_db)
        .await
        .context("count like_records")?;
    let mine: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM `{schema}`.like_records WHERE mid >= ? AND mid < ?"
    )))
    .bind(mids.start)
    .bind(mids.end)
    .fetch_one(&ctx.admin_db)
    .await
    .context("count the scenario's like_records")?;
    let db_per_record = (data + index) as f64 / rows.max(1) as f64;
    let retained = BILIBILI_WRITES_PER_SEC * RETENTION_SECS;
    let tb = |bytes: f64| bytes * retained / 1e12;
    let section = Section {
        title: "f. Memory per like: Redis cache structures and DB records".into(),
        about: format!(
            "One run: {likes} likes by {users} new users ({per_user} each, on distinct items) over {items} new \
             items, {c} clients, through the service; then the job applies them. Redis growth is INFO \
             `used_memory` after the job applied everything minus before, with the tenant's streams \
             (the event stream's shards and the downstream stream, MEMORY USAGE) taken out, per acknowledged like; beside it the MEMORY USAGE sum of the scenario's \
             own user caches ({uk} keys, {ub} bytes) and counts keys ({ck} keys, {cb} bytes), which leaves out \
             the expiry entries. The stream is measured at the end of the load, while \
             it holds the newest window: {ep} entries. DB: `like_records` data + index length after ANALYZE \
             TABLE over all its {rows} rows ({mine} of them this scenario's). Projection to Bilibili's rate \
             ({w:.0} likes/s kept {d} days = {r:.2e} likes): Redis {rt:.2} TB by used_memory, DB {dt:.2} TB.",
            c = args.concurrency,
            uk = b.users.0,
            ub = b.users.1,
            ck = b.counts.0,
            cb = b.counts.1,
            ep = entries_peak,
            w = BILIBILI_WRITES_PER_SEC,
            d = RETENTION_SECS / 86_400.0,
            r = retained,
            rt = tb(per_like),
            dt = tb(db_per_record),
        ),
        metrics: vec![
            Metric::new("likes acknowledged", vec![acked as f64]),
            Metric::new("failed likes", vec![failed as f64]),
            Metric::new("Redis used_memory growth per like, stream apart (bytes)", vec![per_like]),
            Metric::new("MEMORY USAGE of the scenario's keys per like (bytes)", vec![keys_per_like]),
            Metric::new("event stream per retained entry (bytes)", vec![stream_per_entry]),
            Metric::new("DB like_records bytes per record (data + index)", vec![db_per_record]),
        ],
        targets: vec![Target {
            name: "Redis bytes per cached like".into(),
            measured: per_like,
            target: "<= 50 bytes".into(),
            pass: per_like <= 50.0 && failed == 0,
        }],
    };
    Ok(section)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_likes_distinct_items_and_the_keys_of_the_scenario_are_recognised() {
        let (users, items, per_user) = (100, 100, 10);
        for user in 0..users {
            let mut seen: Vec<u64> =
                (0..per_user).map(|j| memory_item(j * users + user, users, items, per_user)).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), per_user as usize, "user {user}");
        }
        let k = Keys::new("bench", 4);
        let (mids, msgs) = (10..20, 100..200);
        let p = k.prefix();
        assert_eq!(classify(&k.user(12, 1), &p, &mids, &msgs), Some(0));
        assert_eq!(classify(&k.counts(1, 150), &p, &mids, &msgs), Some(1));
        assert_eq!(classify(&k.user(30, 1), &p, &mids, &msgs), None);
        assert_eq!(classify(&k.counts(1, 20), &p, &mids, &msgs), None);
        assert_eq!(classify(&k.stream(1), &p, &mids, &msgs), None);
    }
}
