//! `thumbup-bench --reset` against the real servers: it empties the bench
//! tenants (schema, Redis keys) and the naive design's schema, and touches no
//! other tenant. Its own test binary, because it drops the naive schema that
//! the bench smoke test uses.

use clap::Parser;
use sqlx::Connection;
use sqlx::mysql::MySqlConnection;
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_test_support::stack::{admin_db_url, admin_redis, admin_redis_url};

async fn schema_exists(con: &mut MySqlConnection, schema: &str) -> bool {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.schemata WHERE schema_name = ?")
        .bind(schema)
        .fetch_one(&mut *con)
        .await
        .expect("read information_schema");
    n == 1
}

async fn keys_of(tenant: &str) -> usize {
    let mut r = admin_redis().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(thumbup_core::names::key_pattern(tenant)).query_async(&mut r).await.unwrap();
    keys.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_empties_the_bench_tenants_and_leaves_other_tenants_alone() {
    let (hot, cold, other) = ("bench-reset", "bench-reset-cold", "bench-reset-other");
    let yaml = [hot, cold, other].map(|t| tenant_yaml(t, &[1], "")).concat();
    let w = World::start("bench-reset", &yaml).await;
    // Records and cached keys in all three tenants.
    for t in [hot, cold, other] {
        let c = w.client_of(t).await;
        for mid in 1..=5 {
            c.act(1, 7, mid, 99, pb::Action::Like).await.expect("like");
        }
        c.counts(1, &[7]).await.expect("counts");
        assert!(keys_of(t).await > 0, "{t} has keys");
    }
    let mut admin = MySqlConnection::connect(&admin_db_url()).await.expect("admin DB");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE IF NOT EXISTS `{0}`; CREATE TABLE IF NOT EXISTS `{0}`.probe (id INT)",
        thumbup_bench::scenarios::NAIVE_SCHEMA
    )))
    .execute(&mut admin)
    .await
    .expect("naive schema");
    let other_schema = w.tenant(other).schema();
    let other_keys = keys_of(other).await;

    let args = thumbup_bench::Args::parse_from([
        "thumbup-bench".to_string(),
        "--reset".into(),
        format!("--tenant={hot}"),
        format!("--cold-tenant={cold}"),
        format!("--redis-url={}", admin_redis_url()),
        format!("--db-url={}", admin_db_url()),
    ]);
    thumbup_bench::reset::reset(&args).await.expect("reset");

    for t in [hot, cold] {
        assert!(!schema_exists(&mut admin, &w.tenant(t).schema()).await, "{t}'s schema is dropped");
        assert_eq!(keys_of(t).await, 0, "{t}'s keys are deleted");
    }
    assert!(!schema_exists(&mut admin, thumbup_bench::scenarios::NAIVE_SCHEMA).await, "naive schema dropped");
    assert!(schema_exists(&mut admin, &other_schema).await, "another tenant's schema stays");
    assert_eq!(keys_of(other).await, other_keys, "another tenant's keys stay");
    let mut r = admin_redis().await;
    let info: String = redis::cmd("INFO").arg("persistence").query_async(&mut r).await.unwrap();
    assert!(info.contains("aof_rewrite_in_progress:0"), "the AOF rewrite has finished: {info}");
    w.stop().await;
}
