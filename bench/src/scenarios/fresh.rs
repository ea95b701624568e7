//! Scenario d: likes by users never seen before (every like is a new
//! user's first), through the service against the naive design; and
//! scenario e: thumbup's like against a Redis-only like (one script doing
//! the state check and a counter increment, no stream, no DB), the ceiling
//! of a Redis-backed write.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use anyhow::Context as _;
use thumbup_core::cache::Conn;
use thumbup_service::pb;

use super::Context;
use super::measure::{Percentiles, progress};
use super::naive::{NAIVE_SCHEMA, naive_like, naive_pool};
use super::writes::hot_action;
use crate::Args;
use crate::load::closed_loop;
use crate::report::{Latency, Metric, Section, Target};
use crate::stats::median;

/// The first user id of scenario d's run `run`: above every other
/// scenario's users (c's grow from 3e12 by 1e5 a second, about 1.8e14 in
/// 2026), and new in every invocation (a run takes a million ids; every id
/// stays below 2^53, exact in any client's doubles). New users get the
/// largest ids, as with a sequential id allocator (Bilibili's mids): the
/// shard's newest-user bound then proves them new without a DB read. With
/// ids at random, every new user costs one DB read (1.0x the naive design
/// here, docs/performance.md).
fn fresh_base(stamp: i64, run: usize) -> i64 {
    2_000_000_000_000_000 + (stamp % 100_000) * 10_000_000 + run as i64 * 1_000_000
}

/// Scenario d: every like by a user never seen, on zipf items; service vs
/// naive.
pub async fn fresh_writes(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    let naive = naive_pool(args).await?;
    let stamp = jiff::Timestamp::now().as_second();
    let (mut svc_rate, mut naive_rate, mut ratio, mut errors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ls, mut ln) = (Percentiles::default(), Percentiles::default());
    let items: Vec<i64> = (1..=args.items.max(1) as i64).map(|k| args.item_base + k).collect();
    for run in 0..args.runs.max(1) {
        // Each run starts with the job idle (it applies the new users'
        // records after each run, while the naive side runs and then).
        super::quiesce(ctx, args).await?;
        // Service: each request takes the next user id, so the service has
        // never seen its user (no cached state, no liked list).
        let next = Arc::new(AtomicI64::new(fresh_base(stamp, run)));
        let svc = ctx.service.clone();
        let mids = Arc::clone(&next);
        let mut m = closed_loop(&args.load(1), move |_, _, ids| {
            let svc = svc.clone();
            let mid = mids.fetch_add(1, Ordering::Relaxed);
            async move { svc.act(mid, ids[0], pb::Action::Like).await }
        })
        .await;
        progress("d service Like (fresh users)", run, &m);
        svc_rate.push(m.rate());
        ls.push(&mut m);

        // Naive: the same, one transaction per like; every item's counts row
        // exists, as it would for items that have been liked before.
        sqlx::raw_sql("DELETE FROM records; DELETE FROM counts;").execute(&naive).await?;
        for chunk in items.chunks(1000) {
            let mut q = sqlx::QueryBuilder::new("INSERT INTO counts (business_id, message_id, likes, dislikes) ");
            q.push_values(chunk, |mut b, m| {
                b.push_bind(args.business).push_bind(*m).push_bind(0i64).push_bind(0i64);
            });
            q.build().execute(&naive).await.context("prefill the naive counts rows")?;
        }
        let next = Arc::new(AtomicI64::new(fresh_base(stamp, run)));
        let updates = Arc::new(AtomicU64::new(0));
        let (pool, biz) = (naive.clone(), args.business);
        let mut n = closed_loop(&args.load(1), move |_, _, ids| {
            let (pool, upd) = (pool.clone(), Arc::clone(&updates));
            let mid = next.fetch_add(1, Ordering::Relaxed);
            async move { naive_like(&pool, &upd, biz, ids[0], mid, true).await.map_err(|e| e.to_string()) }
        })
        .await;
        progress("d naive DB like (fresh users)", run, &n);
        naive_rate.push(n.rate());
        ratio.push(m.rate() / n.rate().max(1e-9));
        ln.push(&mut n);
        errors.push((m.errors + n.errors) as f64);
    }
    let r = median(&ratio);
    let section = Section {
        title: "d. Fresh users' likes: Like RPC vs naive DB".into(),
        about: format!(
            "Closed loop, {c} clients; every request is the first like of a user never seen before, on a zipf \
             s={z} item of {i}. thumbup warms such a user from the DB before its transition; the naive design \
             (schema `{NAIVE_SCHEMA}`, one transaction of the record upsert and the counts-row UPDATE per like) \
             does what it always does.",
            c = args.concurrency,
            z = args.zipf,
            i = args.items,
        ),
        metrics: vec![
            Metric::new("service likes/s", svc_rate),
            Metric::new("naive DB likes/s", naive_rate),
            Metric::new("ratio service/naive", ratio),
            Metric::new("failed requests (both)", errors),
        ],
        targets: vec![Target {
            name: "fresh-user likes/s service / naive".into(),
            measured: r,
            target: ">= 5x".into(),
            pass: r >= 5.0,
        }],
    };
    Ok((section, vec![ls.latency("d service Like (fresh)"), ln.latency("d naive DB like (fresh)")]))
}

/// The Redis-only like: the state of (user, item) in one key, the item's
/// count in another, both in one hash slot (`{e}`), checked and changed by
/// one script. ARGV[1] is 1 for like, 0 for unlike. Replies the new count,
/// or -1 when the transition is not allowed.
const REDIS_ONLY_LIKE: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur == '1' then return -1 end
  redis.call('SET', KEYS[1], '1')
  return redis.call('INCR', KEYS[2])
end
if cur ~= '1' then return -1 end
redis.call('DEL', KEYS[1])
return redis.call('DECR', KEYS[2])
";

/// The prefix of the Redis-only baseline's keys (outside every tenant's).
const REDIS_ONLY_PREFIX: &str = "thumbup-bench-redis-only:{e}:";

async fn redis_only_like(
    con: &mut Conn,
    script: &redis::Script,
    message: i64,
    mid: i64,
    like: bool,
) -> Result<usize, String> {
    let state = format!("{REDIS_ONLY_PREFIX}st:{mid}:{message}");
    let count = format!("{REDIS_ONLY_PREFIX}cnt:{message}");
    let n: i64 = script
        .key(state)
        .key(count)
        .arg(i32::from(like))
        .invoke_async(con)
        .await
        .map_err(|e| format!("Redis-only like: {e}"))?;
    if n < 0 { Err(format!("Redis-only like refused for user {mid}")) } else { Ok(1) }
}

/// Deletes the Redis-only baseline's keys.
async fn redis_only_clean(con: &mut Conn) -> anyhow::Result<()> {
    let pattern = format!("{REDIS_ONLY_PREFIX}*");
    thumbup_core::cache::unlink_matching(con, &pattern, 1000).await.context("delete the Redis-only baseline's keys")?;
    Ok(())
}

/// Scenario e: the hot-item workload of b through the service and through
/// the Redis-only like.
pub async fn redis_only(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    let per_task = (args.users / args.concurrency.max(1)).max(1);
    let stamp = jiff::Timestamp::now().as_second();
    let script = Arc::new(redis::Script::new(REDIS_ONLY_LIKE));
    let (mut svc_rate, mut base_rate, mut ratio, mut errors) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut floor_rate, mut floor_ratio) = (Vec::new(), Vec::new());
    let (mut ls, mut lb) = (Percentiles::default(), Percentiles::default());
    for run in 0..args.runs.max(1) {
        let message = 7_100_000_000_000 + stamp * 10 + run as i64;
        let svc = ctx.service.clone();
        let mut m = closed_loop(&args.load(1), move |task, seq, _| {
            let svc = svc.clone();
            let (mid, like) = hot_action(task, seq, per_task);
            let action = if like { pb::Action::Like } else { pb::Action::Unlike };
            async move { svc.act(mid, message, action).await }
        })
        .await;
        progress("e service Like (hot item)", run, &m);
        svc_rate.push(m.rate());
        ls.push(&mut m);

        let mut con = ctx.redis.clone();
        redis_only_clean(&mut con).await?;
        let (con, script) = (ctx.redis.clone(), Arc::clone(&script));
        let mut b = closed_loop(&args.load(1), move |task, seq, _| {
            let (mut con, script) = (con.clone(), Arc::clone(&script));
            let (mid, like) = hot_action(task, seq, per_task);
            async move { redis_only_like(&mut con, &script, message, mid, like).await }
        })
        .await;
        progress("e Redis-only like (hot item)", run, &b);
        // The ceiling of any RPC here: the empty one, at the same load.
        let f = super::reads::grpc_floor(ctx, &args.load(1)).await;
        progress("e gRPC floor (Health/Check)", run, &f);
        floor_rate.push(f.rate());
        floor_ratio.push(f.rate() / b.rate().max(1e-9));
        base_rate.push(b.rate());
        ratio.push(m.rate() / b.rate().max(1e-9));
        lb.push(&mut b);
        errors.push((m.errors + b.errors) as f64);
        redis_only_clean(&mut ctx.redis.clone()).await?;
    }
    let r = median(&ratio);
    let section = Section {
        title: "e. Like RPC vs a Redis-only like (the ceiling of a Redis-backed write)".into(),
        about: format!(
            "The workload of b ({c} clients on one message, each walking its own {per_task} users, liking then \
             unliking), through the service and through the design of Redis-only like services: one Lua script \
             (EVALSHA on the admin connection, the bench's one multiplexed connection as in a) that checks the \
             (user, item) state key and increments or decrements the item's counter, no stream, no DB, no \
             durability beyond Redis's own. The gRPC floor (an empty RPC of the same server, same load) is \
             the ceiling of any RPC on this machine, beside the Redis-only rate.",
            c = args.concurrency,
        ),
        metrics: vec![
            Metric::new("service likes/s", svc_rate),
            Metric::new("Redis-only likes/s", base_rate),
            Metric::new("ratio service/Redis-only", ratio),
            Metric::new("gRPC floor (Health/Check, same load) requests/s", floor_rate),
            Metric::new("ratio gRPC floor/Redis-only", floor_ratio),
            Metric::new("failed requests (both)", errors),
        ],
        targets: vec![Target {
            name: "likes/s service / Redis-only".into(),
            measured: r,
            target: ">= 0.5x".into(),
            pass: r >= 0.5,
        }],
    };
    Ok((section, vec![ls.latency("e service Like (hot)"), lb.latency("e Redis-only like (hot)")]))
}
