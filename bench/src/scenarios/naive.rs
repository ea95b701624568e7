//! The naive design that scenario b measures the service against: one DB
//! transaction per action, a records row and a counts row, in a scratch
//! schema.

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};

use crate::Args;

/// The scratch schema of the naive design.
pub const NAIVE_SCHEMA: &str = "thumbup_bench_naive";

pub(super) async fn naive_pool(args: &Args) -> anyhow::Result<MySqlPool> {
    let mut admin = MySqlPoolOptions::new().max_connections(1).connect(&args.db_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE IF NOT EXISTS `{NAIVE_SCHEMA}`")))
        .execute(&admin)
        .await
        .context("create the naive schema")?;
    admin.close().await;
    admin = MySqlPoolOptions::new()
        .max_connections(args.concurrency.max(1) as u32)
        .connect_with(MySqlConnectOptions::from_str(&args.db_url)?.database(NAIVE_SCHEMA))
        .await
        .context("connect to the naive schema")?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS records (
            mid BIGINT NOT NULL, business_id BIGINT NOT NULL, message_id BIGINT NOT NULL,
            state TINYINT NOT NULL, mtime BIGINT NOT NULL,
            PRIMARY KEY (mid, business_id, message_id));
         CREATE TABLE IF NOT EXISTS counts (
            business_id BIGINT NOT NULL, message_id BIGINT NOT NULL,
            likes BIGINT NOT NULL, dislikes BIGINT NOT NULL,
            PRIMARY KEY (business_id, message_id));",
    )
    .execute(&admin)
    .await
    .context("create the naive tables")?;
    Ok(admin)
}

pub(super) async fn naive_like(
    pool: &MySqlPool,
    updates: &AtomicU64,
    business: i64,
    message: i64,
    mid: i64,
    like: bool,
) -> Result<usize, sqlx::Error> {
    let now = jiff::Timestamp::now().as_millisecond();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO records (mid, business_id, message_id, state, mtime) VALUES (?, ?, ?, ?, ?) \
         ON DUPLICATE KEY UPDATE state = VALUES(state), mtime = VALUES(mtime)",
    )
    .bind(mid)
    .bind(business)
    .bind(message)
    .bind(if like { 1i8 } else { 0i8 })
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let r = sqlx::query("UPDATE counts SET likes = likes + ? WHERE business_id = ? AND message_id = ?")
        .bind(if like { 1i64 } else { -1i64 })
        .bind(business)
        .bind(message)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    updates.fetch_add(r.rows_affected(), Ordering::Relaxed);
    Ok(1)
}
