//! Scenario b: every client likes and unlikes one hot message, through the
//! service (the job applies the windows) against the naive baseline; with
//! the DB row updates each design costs.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use thumbup_core::cache::Conn;
use thumbup_core::keys::{JOB_GROUP, Keys};
use thumbup_core::names::schema_for;
use thumbup_service::pb;

use super::Context;
use super::measure::{Percentiles, progress};
use super::naive::{NAIVE_SCHEMA, naive_like, naive_pool};
use crate::Args;
use crate::load::closed_loop;
use crate::report::{Latency, Metric, Section, Target};
use crate::stats::median;

async fn counts_version(ctx: &Context, args: &Args, message: i64) -> anyhow::Result<i64> {
    let sql = format!(
        "SELECT version FROM `{}`.like_counts WHERE business_id = ? AND message_id = ?",
        schema_for(&args.tenant)
    );
    let v: Option<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(args.business)
        .bind(message)
        .fetch_optional(&ctx.admin_db)
        .await
        .context("read the tenant's like_counts version")?;
    Ok(v.unwrap_or(0))
}

/// Whether the job has applied and acknowledged every entry of `stream`:
/// its group has been handed the stream's last entry and nothing is pending.
async fn stream_drained(con: &mut Conn, stream: &str) -> anyhow::Result<bool> {
    let field = |m: &HashMap<String, redis::Value>, k: &str| -> Option<String> {
        m.get(k).and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
    };
    let exists: bool = redis::cmd("EXISTS").arg(stream).query_async(con).await?;
    if !exists {
        return Ok(true);
    }
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO").arg("STREAM").arg(stream).query_async(con).await?;
    let groups: Vec<HashMap<String, redis::Value>> =
        redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(con).await?;
    let Some(group) = groups.iter().find(|g| field(g, "name").as_deref() == Some(JOB_GROUP)) else {
        return Ok(false);
    };
    let pending: i64 = group.get("pending").and_then(|v| redis::from_redis_value_ref(v).ok()).unwrap_or(-1);
    Ok(pending == 0 && field(group, "last-delivered-id") == field(&info, "last-generated-id"))
}

/// Waits until the job has applied every stream shard of the tenant.
pub(super) async fn wait_drained(ctx: &Context, args: &Args, within: Duration) -> anyhow::Result<()> {
    let keys = Keys::new(&args.tenant, args.shards.max(1));
    let mut con = ctx.redis.clone();
    let deadline = Instant::now() + within;
    loop {
        let mut all = true;
        for shard in 0..keys.shards() {
            all &= stream_drained(&mut con, &keys.stream(shard)).await.context("read the job's stream progress")?;
        }
        if all {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "thumbup-job has not applied tenant {}'s streams within {within:?} (is it running?)",
            args.tenant
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits (up to 15 minutes) until the job has applied everything the
/// scenarios before wrote, so that the next one starts from a quiet
/// system: the job applying an earlier scenario's backlog would share the
/// CPUs with it and, in g, delay what g measures.
pub async fn quiesce(ctx: &Context, args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    wait_drained(ctx, args, Duration::from_secs(900)).await?;
    if started.elapsed() > Duration::from_secs(1) {
        eprintln!(
            "thumbup-bench: waited {:.1} s for the job to apply the earlier scenarios' writes",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Rows that MariaDB counted as changed in `schema`.`table` so far
/// (`information_schema.TABLE_STATISTICS`, kept while `userstat` is on).
async fn rows_changed(ctx: &Context, schema: &str, table: &str) -> anyhow::Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(SUM(ROWS_CHANGED) AS SIGNED) FROM information_schema.TABLE_STATISTICS \
         WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
    )
    .bind(schema)
    .bind(table)
    .fetch_one(&ctx.admin_db)
    .await
    .with_context(|| format!("read MariaDB's TABLE_STATISTICS of {schema}.{table}"))?;
    Ok(n.unwrap_or(0))
}

/// Turns on MariaDB's per-table statistics (`userstat`); returns whether
/// they were on already, to restore afterwards.
async fn userstat_on(ctx: &Context) -> anyhow::Result<bool> {
    let was: i64 = sqlx::query_scalar("SELECT CAST(@@GLOBAL.userstat AS SIGNED)")
        .fetch_one(&ctx.admin_db)
        .await
        .context("read @@GLOBAL.userstat")?;
    sqlx::query("SET GLOBAL userstat = 1").execute(&ctx.admin_db).await.context(
        "SET GLOBAL userstat = 1 (MariaDB's table statistics count the counts-row UPDATEs; the admin user needs SUPER)",
    )?;
    Ok(was != 0)
}

/// The action of client `task`'s `seq`-th request in the hot-write scenario:
/// the client walks its own users, liking on even passes and unliking on odd
/// ones, so every transition is valid. Returns (mid, like?).
pub fn hot_action(task: usize, seq: u64, users_per_task: usize) -> (i64, bool) {
    let u = users_per_task.max(1) as u64;
    let mid = 1 + (task as u64 * u + seq % u) as i64;
    (mid, (seq / u).is_multiple_of(2))
}

/// Scenario b: every client likes and unlikes one message, service vs naive.
pub async fn hot_writes(ctx: &Context, args: &Args) -> anyhow::Result<(Section, Vec<Latency>)> {
    let naive = naive_pool(args).await?;
    let per_task = (args.users / args.concurrency.max(1)).max(1);
    let stamp = jiff::Timestamp::now().as_second();
    let (mut svc_rate, mut naive_rate, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let (mut svc_upd, mut naive_upd, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let (mut svc_version, mut naive_issued) = (Vec::new(), Vec::new());
    let schema = schema_for(&args.tenant);
    let userstat_was_on = userstat_on(ctx).await?;
    let (mut ls, mut ln) = (Percentiles::default(), Percentiles::default());
    for run in 0..args.runs.max(1) {
        // A message of its own per run: the users start from NONE on it.
        let message = 7_000_000_000_000 + stamp * 10 + run as i64;
        let before = counts_version(ctx, args, message).await?;
        let changed_before = rows_changed(ctx, &schema, "like_counts").await?;
        let svc = ctx.service.clone();
        let mut m = closed_loop(&args.load(1), move |task, seq, _| {
            let svc = svc.clone();
            let (mid, like) = hot_action(task, seq, per_task);
            let action = if like { pb::Action::Like } else { pb::Action::Unlike };
            async move { svc.act(mid, message, action).await }
        })
        .await;
        let svc_done = Instant::now();
        progress("b service Like (hot item)", run, &m);
        let svc_ok = m.total_ok;
        svc_rate.push(m.rate());
        ls.push(&mut m);
        let mut errs = m.errors;

        sqlx::raw_sql("DELETE FROM records; DELETE FROM counts;").execute(&naive).await?;
        sqlx::query("INSERT INTO counts (business_id, message_id, likes, dislikes) VALUES (?, ?, 0, 0)")
            .bind(args.business)
            .bind(message)
            .execute(&naive)
            .await?;
        let naive_before = rows_changed(ctx, NAIVE_SCHEMA, "counts").await?;
        let updates = Arc::new(AtomicU64::new(0));
        let (pool, upd, biz) = (naive.clone(), Arc::clone(&updates), args.business);
        let mut n = closed_loop(&args.load(1), move |task, seq, _| {
            let (pool, upd) = (pool.clone(), Arc::clone(&upd));
            let (mid, like) = hot_action(task, seq, per_task);
            async move { naive_like(&pool, &upd, biz, message, mid, like).await.map_err(|e| e.to_string()) }
        })
        .await;
        progress("b naive DB like (hot item)", run, &n);
        naive_rate.push(n.rate());
        ratio.push(m.rate() / n.rate().max(1e-9));
        let naive_changed = rows_changed(ctx, NAIVE_SCHEMA, "counts").await? - naive_before;
        naive_upd.push(naive_changed as f64 / n.total_ok.max(1) as f64 * 10_000.0);
        naive_issued.push(updates.load(Ordering::Relaxed) as f64 / n.total_ok.max(1) as f64 * 10_000.0);
        ln.push(&mut n);
        errs += n.errors;
        errors.push(errs as f64);

        // Let the job apply the last window before reading the version.
        let settle = Duration::from_millis(args.job_window_ms + 3000);
        tokio::time::sleep(settle.saturating_sub(svc_done.elapsed())).await;
        wait_drained(ctx, args, Duration::from_millis(args.job_window_ms * 6).max(Duration::from_secs(60))).await?;
        let after = counts_version(ctx, args, message).await?;
        let changed = rows_changed(ctx, &schema, "like_counts").await? - changed_before;
        let per10k = changed as f64 / svc_ok.max(1) as f64 * 10_000.0;
        eprintln!(
            "thumbup-bench: b run {}: {changed} like_counts row changes (MariaDB TABLE_STATISTICS), version \
             {before} -> {after}, over {svc_ok} likes: {per10k:.2} counts-row UPDATEs per 10,000 likes",
            run + 1
        );
        svc_upd.push(per10k);
        svc_version.push((after - before) as f64 / svc_ok.max(1) as f64 * 10_000.0);
    }
    if !userstat_was_on {
        sqlx::query("SET GLOBAL userstat = 0").execute(&ctx.admin_db).await.context("restore userstat")?;
    }
    let r = median(&ratio);
    let u = median(&svc_upd);
    let section = Section {
        title: "b. Hot-item writes: Like RPC vs naive DB".into(),
        about: format!(
            "Closed loop, {c} clients, all on one message (a new one per run); each client walks its own {per_task} \
             users, liking then unliking. Naive design: schema `{NAIVE_SCHEMA}` in the same MariaDB, per like one \
             transaction of `INSERT ... ON DUPLICATE KEY UPDATE` of the record and \
             `UPDATE counts SET likes = likes +/- 1` of the one counts row, pool of {c} connections. \
             Counts-row UPDATEs are MariaDB's own count of changed rows of the counts table \
             (`information_schema.TABLE_STATISTICS`, `userstat` on for the scenario): `like_counts` of the \
             tenant's schema, read {w} ms + 3 s after the load, once the job has applied every entry of the tenant's streams, and the \
             naive `counts`. The cross-check rows are the growth of `like_counts.version` (one per job window \
             that changes the row) and the rows the naive UPDATEs reported changed.",
            c = args.concurrency,
            w = args.job_window_ms,
        ),
        metrics: vec![
            Metric::new("service likes/s", svc_rate),
            Metric::new("naive DB likes/s", naive_rate),
            Metric::new("ratio service/naive", ratio),
            Metric::new("thumbup counts-row UPDATEs per 10,000 likes", svc_upd),
            Metric::new("naive counts-row UPDATEs per 10,000 likes", naive_upd),
            Metric::new("thumbup counts-row version growth per 10,000 likes (cross-check)", svc_version),
            Metric::new("naive UPDATEs that changed a row per 10,000 likes (cross-check)", naive_issued),
            Metric::new("failed requests (both)", errors),
        ],
        targets: vec![
            Target { name: "likes/s service / naive".into(), measured: r, target: ">= 10x".into(), pass: r >= 10.0 },
            Target {
                name: "thumbup counts-row UPDATEs per 10,000 likes".into(),
                measured: u,
                target: format!("<= 10 ({} ms window)", args.job_window_ms),
                pass: u <= 10.0,
            },
        ],
    };
    Ok((section, vec![ls.latency("b service Like (hot)"), ln.latency("b naive DB like (hot)")]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_action_alternates_like_and_unlike_per_user_and_keeps_clients_apart() {
        assert_eq!(hot_action(0, 0, 3), (1, true));
        assert_eq!(hot_action(0, 2, 3), (3, true));
        assert_eq!(hot_action(0, 3, 3), (1, false));
        assert_eq!(hot_action(0, 6, 3), (1, true));
        assert_eq!(hot_action(1, 0, 3), (4, true));
    }
}
