//! `--reset`: empties the bench tenants before a benchmark, so that every
//! `make bench` starts from the same state.
//!
//! Without it each run inherits the records, state keys and streams of the
//! runs before it: after a few runs the local Redis held ~770,000 keys
//! (~200 MB), its AOF rewrites (a fork and a full rewrite of the data set,
//! every minute or two under the write scenarios) grew with them, and their
//! disk and CPU bursts landed inside the measurements.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::mysql::MySqlPool;
use thumbup_core::names::schema_for;
use thumbup_core::provision;

use crate::Args;
use crate::scenarios::NAIVE_SCHEMA;

/// The longest wait for the AOF rewrite that compacts the emptied data set.
const REWRITE_WAIT: Duration = Duration::from_secs(120);

/// Drops the schemas of `--tenant`, `--cold-tenant` and the naive design
/// (tables and rows; DB users and grants stay for `provision`), deletes the
/// tenants' Redis keys, then rewrites the AOF and waits for the rewrite.
pub async fn reset(args: &Args) -> anyhow::Result<()> {
    let tenants: Vec<&str> = std::iter::once(args.tenant.as_str()).chain(args.cold_tenant.as_deref()).collect();
    let db = MySqlPool::connect(&args.db_url).await.context("connect to MariaDB with the admin URL")?;
    let schemas = tenants.iter().map(|t| schema_for(t)).chain([NAIVE_SCHEMA.to_string()]);
    for schema in schemas {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{schema}`")))
            .execute(&db)
            .await
            .with_context(|| format!("drop schema {schema}"))?;
    }
    db.close().await;
    for t in &tenants {
        let n = provision::delete_keys(&args.redis_url, t).await?;
        eprintln!("thumbup-bench: reset tenant {t}: schema dropped, {n} Redis keys deleted");
    }
    let mut con = thumbup_core::cache::admin_connect(&args.redis_url, Duration::from_secs(30))
        .await
        .context("connect to Redis with the admin URL")?;
    if !con.is_cluster() {
        // A rewrite may already be running (it refuses a second one): wait
        // for it, then start ours and wait for that.
        wait_rewrite(&mut con).await?;
        redis::cmd("BGREWRITEAOF").exec_async(&mut con).await.context("BGREWRITEAOF")?;
        return wait_rewrite(&mut con).await;
    }
    // Every server of a cluster, masters and replicas: each has its AOF.
    for (host, port) in con.nodes().await? {
        let mut node =
            thumbup_core::cache::admin_node_connect(&args.redis_url, &host, port, Duration::from_secs(30)).await?;
        wait_rewrite(&mut node).await?;
        redis::cmd("BGREWRITEAOF").exec_async(&mut node).await.context("BGREWRITEAOF")?;
        wait_rewrite(&mut node).await?;
    }
    Ok(())
}

async fn wait_rewrite<C: redis::aio::ConnectionLike + Send>(con: &mut C) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let info: String = redis::cmd("INFO").arg("persistence").query_async(con).await.context("INFO persistence")?;
        // A rewrite requested while a save runs is scheduled: wait for both.
        let busy = info.lines().any(|l| {
            matches!(l.trim(), "aof_rewrite_in_progress:1" | "aof_rewrite_scheduled:1" | "rdb_bgsave_in_progress:1")
        });
        if !busy {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < REWRITE_WAIT,
            "the Redis AOF rewrite is still running after {REWRITE_WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
