//! The service's local hot-key cache against the real Redis: an item read
//! often turns hot and its counts come from the service's memory for the
//! TTL (a change in Redis shows only after it), a cold item is always read
//! from Redis, and both the first load of an item that just turned hot and
//! the refresh of an expired one cost one Redis read however many readers
//! come at once (single flight). Alone in its test binary, so the Redis
//! command counters it reads see its own reads only.

use std::time::Duration;

use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_test_support::stack::admin_redis;

const HOT: i64 = 7;
const COLD: i64 = 8;

async fn set_counts(keys: &Keys, msg: i64, likes: i64, version: i64) {
    let mut r = admin_redis().await;
    let _: () = redis::cmd("SET")
        .arg(keys.counts(1, msg))
        .arg(format!("{likes}:0:{version}"))
        .query_async(&mut r)
        .await
        .unwrap();
}

/// Redis counts reads served so far: MGET calls (the service reads a batch
/// of counts with one MGET) plus GET calls (its fallback for a tenant user
/// provisioned before MGET was allowed).
async fn redis_gets() -> u64 {
    let mut r = admin_redis().await;
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut r).await.unwrap();
    let calls = |cmd: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")).map(str::to_owned))
            .and_then(|v| v.split(',').next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    calls("get") + calls("mget")
}

async fn likes(c: &Client, msg: i64) -> i64 {
    c.counts(1, &[msg]).await.expect("GetCounts")[&msg].0
}

/// The likes of `msg` as `n` concurrent readers see them.
async fn concurrent_likes(c: &Client, msg: i64, n: usize) -> Vec<i64> {
    let reads: Vec<_> = (0..n)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { likes(&c, msg).await })
        })
        .collect();
    let mut answers = Vec::new();
    for r in reads {
        answers.push(r.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_items_are_served_from_memory_for_the_ttl_and_a_first_load_or_an_expiry_costs_one_redis_read() {
    let name = "hot-cache";
    // A window (4 s) longer than the TTL (1 s), as in production (10 s, 1 s).
    let extra = "    cache: { hot_ttl_ms: 1000, hot_window_ms: 4000, hot_top_k: 10, hot_min_hits: 5 }\n";
    let w = World::start("hot-cache", &tenant_yaml(name, &[1], extra)).await;
    let keys = Keys::new(name, w.tenant(name).stream.shards);
    let c = w.client_of(name).await;
    set_counts(&keys, HOT, 5, 1).await;
    set_counts(&keys, COLD, 1, 1).await;

    // 20 reads in one half window make the item hot when the bucket closes;
    // the cold one is read twice.
    for _ in 0..20 {
        assert_eq!(likes(&c, HOT).await, 5);
    }
    for _ in 0..2 {
        assert_eq!(likes(&c, COLD).await, 1);
    }
    // The half window (2 s) closes: the hot set is what it saw. 64
    // concurrent first reads of the item that just turned hot make one
    // Redis read; the others wait for its answer.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let gets = redis_gets().await;
    let answers = concurrent_likes(&c, HOT, 64).await;
    let spent = redis_gets().await - gets;
    assert!(answers.iter().all(|l| *l == 5), "{answers:?}");
    assert_eq!(spent, 1, "Redis reads for 64 concurrent first reads of an item that just turned hot");
    assert_eq!(likes(&c, HOT).await, 5, "the first load filled the local entry");

    // Redis changes: the hot item keeps its remembered counts for the TTL,
    // the cold one shows the change at once.
    set_counts(&keys, HOT, 6, 2).await;
    set_counts(&keys, COLD, 2, 2).await;
    let gets = redis_gets().await;
    for _ in 0..10 {
        assert_eq!(likes(&c, HOT).await, 5, "served from memory within the TTL");
    }
    assert_eq!(redis_gets().await, gets, "no Redis read for a fresh hot entry");
    assert_eq!(likes(&c, COLD).await, 2, "a cold item is read from Redis every time");

    // After the TTL the hot entry is refreshed (the item is still hot: it is read all along).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut seen = likes(&c, HOT).await;
    for _ in 0..10 {
        if seen == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        seen = likes(&c, HOT).await;
    }
    assert_eq!(seen, 6, "refreshed after the TTL");

    // Single flight: after the next expiry, 64 concurrent reads make one
    // Redis read of the item; the others get the expiring value meanwhile.
    set_counts(&keys, HOT, 7, 3).await;
    for _ in 0..10 {
        likes(&c, HOT).await; // stay hot
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let gets = redis_gets().await;
    let answers = concurrent_likes(&c, HOT, 64).await;
    let spent = redis_gets().await - gets;
    assert!(answers.iter().all(|l| *l == 6 || *l == 7), "only the old or the new counts: {answers:?}");
    assert!(answers.contains(&7) || likes(&c, HOT).await == 7, "the refresh landed");
    assert!(spent <= 2, "{spent} Redis reads for 64 concurrent reads of one expired hot item");
    println!("64 concurrent reads of an expired hot item: {spent} Redis read(s)");

    let hot_hits = thumbup_service::metrics::CACHE.with_label_values(&["local", "hit"]).get();
    assert!(hot_hits >= 70, "local hits counted: {hot_hits}");
    w.stop().await;
}
