//! The downstream stream's retention against the real Redis: entries older
//! than `stream.downstream_retention_secs` are dropped as new ones are
//! published, and a consumer group whose position is older than the oldest
//! entry kept is reported as having missed entries (what the job exports as
//! `thumbup_job_downstream_behind_retention`), while one that keeps up is not.

use std::time::Duration;

use thumbup_core::domain::State;
use thumbup_core::event::LikeEvent;
use thumbup_core::keys::Keys;
use thumbup_core::stream::{self, Downstream};
use thumbup_core::version::now_ms;
use thumbup_test_support::stack::admin_redis;

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
    let keys = Keys::new("ds-retention", 1);
    let mut con = admin_redis().await;
    let _: i64 = redis::cmd("DEL").arg(keys.downstream()).query_async(&mut con).await.unwrap();
    // A consumer that never reads, and one that reads everything.
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
    stream::publish_downstream(&mut con, &keys, &entries(1, 1_000), 0).await.unwrap();
    let first_published = now_ms();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let keep_from = now_ms() - 500;
    stream::publish_downstream(&mut con, &keys, &entries(1_001, 1_000), keep_from).await.unwrap();
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

    let (groups, oldest) = stream::downstream_groups(&mut con, &keys).await.unwrap();
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
