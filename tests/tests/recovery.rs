//! The replay after a flip, against the real servers: the failover
//! controller's replay of a tenant's stream window onto a promoted DB that
//! lacks the window's last part (a standby that lagged). Its speed at the
//! production scale (1,800,000 events) is bench scenario h; here a smaller
//! window checks what it does: it applies exactly what the DB lacked, reads
//! each shard only from the DB's watermark on, and leaves the counts exact.

use thumbup_bench::scenarios::recovery::Window;
use thumbup_core::config::Config;
use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_test_support::stack::{admin_db_url, admin_redis};

/// 20 s at 6,000 likes a second, the last 5 s missing on the standby.
const EVENTS: i64 = 120_000;
const WINDOW_MS: i64 = 20_000;
const LAG_MS: i64 = 5_000;
const SHARDS: u32 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replay_applies_exactly_what_the_promoted_db_lacked_reading_each_shard_from_its_watermark() {
    let name = "recovery-replay";
    let yaml = tenant_yaml(name, &[1], "").replace("shards: 4", &format!("shards: {SHARDS}"));
    let config = Config::parse(&format!("tenants:\n{yaml}"), "test").expect("test config");
    let t = config.tenant(name).unwrap().clone();
    reset_tenant(&t).await;
    let w = Window::new(Keys::new(&t.name, SHARDS), &t.schema(), EVENTS, WINDOW_MS, LAG_MS, 70_000_000);
    let redis = admin_redis().await;
    w.write_stream(&redis).await.expect("the window in the streams");
    let admin = sqlx::MySqlPool::connect(&admin_db_url()).await.unwrap();
    w.write_standby(&admin).await.expect("the standby's tables");
    let missing = w.missing();
    assert!(missing > 0 && missing < EVENTS);

    let (r, took) = w.replay(&redis, &admin_db_url()).await.expect("the replay");
    println!(
        "replay: {} events read, {} applied (the DB lacked {missing}) in {took:.2?}; {} cached keys dropped",
        r.events, r.applied, r.invalidated
    );
    assert_eq!(r.applied as i64, missing, "exactly the events the DB lacked");
    // Each shard from its watermark: the missing events, and at most the
    // few that share the watermark's millisecond with an applied one.
    let slack = SHARDS as i64 * (EVENTS / WINDOW_MS + 1);
    assert!(
        r.events as i64 >= missing && (r.events as i64) <= missing + slack,
        "read {} events for {missing} missing: the watermarks were not used",
        r.events
    );
    assert_eq!(r.malformed, 0);
    let ex = check_exact_at(&admin_db_url(), &t).await;
    assert_eq!(ex.likes, EVENTS, "every like of the window in the DB once");

    // Again, without watermarks (a DB whose job never marked them): every
    // event of the window is read, none applied twice.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DELETE FROM `{}`.stream_watermarks", t.schema())))
        .execute(&admin)
        .await
        .unwrap();
    let (again, _) = w.replay(&redis, &admin_db_url()).await.expect("the replay again");
    assert_eq!((again.events as i64, again.applied), (EVENTS, 0), "the whole window read, nothing applied twice");
    let ex = check_exact_at(&admin_db_url(), &t).await;
    assert_eq!(ex.likes, EVENTS);
    w.drop_stream(&redis).await.unwrap();
}
