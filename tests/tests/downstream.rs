//! The downstream stream's retention against the real Redis: entries older
//! than `stream.downstream_retention_secs` are dropped as new ones are
//! published, and a consumer group whose position is older than the oldest
//! entry kept is reported as having missed entries (what the job exports as
//! `thumbup_job_downstream_behind_retention`), while one that keeps up is not.
//! The job's calls run as the tenant's Redis ACL user, as in production (the
//! user may run only the commands the provisioning grants it), and so does
//! the read of the solo flag that service and job make.

use std::time::Duration;

use thumbup_core::cache;
use thumbup_core::config::Config;
use thumbup_core::domain::State;
use thumbup_core::event::LikeEvent;
use thumbup_core::keys::Keys;
use thumbup_core::stream::{self, Downstream};
use thumbup_core::version::now_ms;
use thumbup_e2e::{reset_tenant, tenant_yaml};
use thumbup_test_support::stack::admin_redis;

/// The tenant `name`, provisioned afresh, and a connection as its ACL user.
async fn tenant_user(name: &str) -> (Keys, cache::Conn) {
    let config = Config::parse(&format!("tenants:\n{}", tenant_yaml(name, &[1], "")), "test").unwrap();
    let t = config.tenant(name).unwrap().clone();
    reset_tenant(&t).await;
    let con = cache::connect(&t.redis, Duration::from_secs(5)).await.expect("the tenant's ACL user");
    (Keys::new(&t.name, 1), con)
}

fn entries(from_mid: i64, n: i64) -> Vec<Downstream> {
    (from_mid..from_mid + n)
        .map(|mid| Downstream {
            event: LikeEvent {
                mid,
                business_id: 1,
                message_id: 7,
                up_mid: 9,
                state: State::Like,
                prev: State::None,
                version: mid,
                mtime_ms: now_ms(),
            },
            from: State::None,
        })
        .collect()
}

#[tokio::test]
async fn entries_past_the_retention_are_dropped_and_a_group_left_behind_is_reported_as_missing_them() {
    let (keys, mut job) = tenant_user("ds-retention").await;
    let mut con = admin_redis().await;
    let _: i64 = redis::cmd("DEL").arg(keys.downstream()).query_async(&mut con).await.unwrap();
    // A consumer that never reads, and one that reads everything (other
    // systems, with accounts of their own: here the admin).
    for group in ["sleepy", "eager"] {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(keys.downstream())
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut con)
            .await
            .unwrap();
    }
    // 1,000 entries, then 1 s later 1,000 more with a retention of 0.5 s:
    // the first ones are older than the retention (dropped in whole nodes
    // of the stream, 100 entries each by default).
    stream::publish_downstream(&mut job, &keys, &entries(1, 1_000), 0).await.unwrap();
    let first_published = now_ms();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let keep_from = now_ms() - 500;
    stream::publish_downstream(&mut job, &keys, &entries(1_001, 1_000), keep_from).await.unwrap();
    let len: i64 = redis::cmd("XLEN").arg(keys.downstream()).query_async(&mut con).await.unwrap();
    assert!(len < 2_000, "nothing was dropped: {len} entries");
    assert!(len >= 1_000, "entries within the retention were dropped: {len} left");
    // The eager consumer reads all that is there.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("eager")
        .arg("c1")
        .arg("COUNT")
        .arg(10_000)
        .arg("STREAMS")
        .arg(keys.downstream())
        .arg(">")
        .query_async(&mut con)
        .await
        .unwrap();

    let (groups, oldest) = stream::downstream_groups(&mut job, &keys).await.expect("the job's reads, as the tenant");
    let oldest = oldest.expect("the stream has entries");
    assert!(oldest >= first_published - 1_000, "oldest kept entry {oldest}");
    let group = |name: &str| groups.iter().find(|g| g.name == name).unwrap_or_else(|| panic!("{name}: {groups:?}"));
    let (sleepy, eager) = (group("sleepy"), group("eager"));
    assert!(sleepy.missed(Some(oldest)), "the group that never read missed entries: {sleepy:?}");
    assert!(sleepy.behind_secs(now_ms()) > 0, "{sleepy:?}");
    assert!(!eager.missed(Some(oldest)), "the group that read everything missed nothing: {eager:?}");
    assert_eq!(eager.behind_secs(now_ms()), 0, "{eager:?}");
    let _: i64 = redis::cmd("DEL").arg(keys.downstream()).query_async(&mut con).await.unwrap();
}

#[tokio::test]
async fn the_solo_flag_is_read_as_the_tenants_acl_user() {
    let (keys, mut tenant) = tenant_user("ds-solo").await;
    let mut admin = admin_redis().await;
    let solo = cache::Solo::new(&keys);
    assert!(!solo.read(&mut tenant).await, "no flag: not solo");
    // The failover controller sets it with its admin account.
    let _: () = redis::cmd("SET").arg(keys.solo()).arg("1").query_async(&mut admin).await.unwrap();
    assert!(solo.read(&mut tenant).await, "the flag set by the controller is seen by the tenant's user");
    assert!(solo.is_set(&mut tenant).await, "and by the cached read once it is due");
    let _: () = redis::cmd("DEL").arg(keys.solo()).query_async(&mut admin).await.unwrap();
    assert!(!solo.read(&mut tenant).await, "cleared");
}
