//! Outages of the real servers: MariaDB stopped (writes of cached states
//! buffer in the stream; a state only the DB knows is UNAVAILABLE) and Redis
//! stopped or stalled (writes take the synchronous DB path once the write
//! fence opens it). These stop the shared local servers, so they run one at
//! a time.

use std::time::Duration;

use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_test_support::stack::{admin_redis, redis_data_nodes, redis_instance, stack};
use tokio::sync::Mutex;

const BIZ: i64 = 1;

/// Serializes the tests of this file: each stops a shared server.
static SERVERS: Mutex<()> = Mutex::const_new(());

/// Every (record, version) in the tenant's stream shards.
async fn stream_versions(k: &Keys) -> std::collections::HashSet<((i64, i64, i64), i64)> {
    let mut admin = admin_redis().await;
    let mut out = std::collections::HashSet::new();
    for shard in 0..k.shards() {
        let r: redis::streams::StreamRangeReply =
            redis::cmd("XRANGE").arg(k.stream(shard)).arg("-").arg("+").query_async(&mut admin).await.unwrap();
        for e in r.ids {
            let f = |n: &str| e.get::<i64>(n).unwrap();
            out.insert(((f("mid"), f("biz"), f("msg")), f("ver")));
        }
    }
    out
}

/// Retries `f` while it answers UNAVAILABLE (as its RetryInfo asks), for up
/// to 30 s.
async fn retry_unavailable<F, Fut>(f: F) -> pb::LikeReply
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<pb::LikeReply, tonic::Status>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match f().await {
            Ok(r) => return r,
            Err(s) if s.code() == tonic::Code::Unavailable && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}

/// Restarts the server even when the test fails half-way.
struct Restart(&'static str);

impl Drop for Restart {
    fn drop(&mut self) {
        stack(&["start", self.0, if self.0 == "redis" { redis_instance() } else { "a" }]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_down_likes_buffer_in_the_stream_and_apply_after_restart() {
    let _one = SERVERS.lock().await;
    let w = World::start("dbdown", &tenant_yaml("e2e-dbdown", &[BIZ], "")).await;
    let t = w.tenant("e2e-dbdown").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let _job = w.job("e2e-dbdown", 200);
    let c = w.client_of("e2e-dbdown").await;
    let before =
        run_load(&c, Load { clients: 8, actions: 2_000, users: 50, items: 20, business: BIZ, double_clicks: 0.1 })
            .await;
    wait_drained(&k, Duration::from_secs(60)).await;
    // Warm the counts cache of the items.
    let items: Vec<i64> = (1..=20).collect();
    let counts_before = c.counts(BIZ, &items).await.unwrap();

    stack(&["stop", "mariadb"]);
    let guard = Restart("mariadb");
    // Records whose state Redis caches keep taking writes; a record it does
    // not cache has a state that only the unreachable DB knows: refused
    // with UNAVAILABLE (and RetryInfo), never decided blind.
    let mut during = LoadOutcome::default();
    let mut blind = Vec::new();
    let mut cached_pairs = 0;
    for mid in 1..=60 {
        for msg in [1, 2, 3] {
            let action = if mid % 2 == 0 { pb::Action::Like } else { pb::Action::Dislike };
            // Redis knows a record's state when it caches the record's
            // user: every user the load acted for (the user's cache holds
            // all of the user's likes and dislikes, so a record it lacks is
            // NONE).
            let cached = before.acked.keys().any(|(m, _, _)| *m == mid);
            cached_pairs += usize::from(cached);
            match c.act(BIZ, msg, mid, owner_of(msg), action).await {
                Ok(r) => {
                    assert!(cached, "({mid}, {msg}) is not cached, yet its write was decided while the DB is down");
                    during.ok += 1;
                    during.acked.insert((mid, BIZ, msg), (r.version, r.state));
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => during.refused += 1,
                Err(s) if s.code() == tonic::Code::Unavailable && !cached => {
                    assert!(has_retry_info(&s), "{s:?}");
                    blind.push((mid, msg));
                }
                Err(s) => panic!("Like of a cached state failed while the DB is down: {s:?}"),
            }
        }
    }
    for mid in 1000..1020 {
        let s = c
            .act(BIZ, 5, mid, owner_of(5), pb::Action::Like)
            .await
            .expect_err("a new user's like is not decided while the DB is down");
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        assert!(has_retry_info(&s), "UNAVAILABLE says when to retry: {s:?}");
        blind.push((mid, 5));
    }
    assert_eq!(during.ok + during.refused, cached_pairs, "every cached state was decided: {during:?}");
    assert!(during.ok > 50, "{during:?}");
    // Cached counts are still served.
    assert_eq!(c.counts(BIZ, &items).await.unwrap(), counts_before, "counts served from the cache");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(undelivered(&k).await + pending(&k).await > 0, "the stream buffers while the DB is down");
    drop(guard);

    wait_drained(&k, Duration::from_secs(90)).await;
    // The refused writes wrote nothing, and succeed once the DB is back.
    let recs = records(&t).await;
    for (mid, msg) in &blind {
        assert!(!recs.contains_key(&(*mid, BIZ, *msg)), "refused ({mid}, {msg}) left a record");
    }
    for mid in 1000..1020 {
        let r = retry_unavailable(|| c.act(BIZ, 5, mid, owner_of(5), pb::Action::Like)).await;
        during.acked.insert((mid, BIZ, 5), (r.version, r.state));
    }
    wait_drained(&k, Duration::from_secs(90)).await;
    wait_drained(&k, Duration::from_secs(90)).await;
    check_exact(&t).await;
    let mut acked = before.acked;
    acked.extend(during.acked);
    check_acked_and_states(&c, &t, &acked).await;
    w.stop().await;
}

/// A user id above every other of the outage tests.
const NEW_USER: i64 = 1_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_writes_and_reads_take_the_db_and_nothing_stale_is_served_after() {
    let _one = SERVERS.lock().await;
    let w = World::start("redisdown", &tenant_yaml("e2e-redisdown", &[BIZ], "")).await;
    let t = w.tenant("e2e-redisdown").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let mut job = w.job("e2e-redisdown", 200);
    let c = w.client_of("e2e-redisdown").await;
    let before =
        run_load(&c, Load { clients: 8, actions: 2_000, users: 50, items: 20, business: BIZ, double_clicks: 0.1 })
            .await;
    // Records whose state Redis caches: user 500 likes items 1..=3.
    for msg in 1..=3 {
        c.act(BIZ, msg, 500, owner_of(msg), pb::Action::Like).await.unwrap();
    }
    // A newest-user bound: users above it are taken as new without a DB read.
    let shard = k.shard_of(NEW_USER);
    let (bound, _) = establish_newest_bound(&c, &k, BIZ, shard, 9_000, 4).await;
    assert!(bound < NEW_USER);
    wait_drained(&k, Duration::from_secs(60)).await;
    let items: Vec<i64> = (1..=20).collect();
    let counts_before = c.counts(BIZ, &items).await.unwrap();

    stack(&["stop", "redis", redis_instance()]);
    let guard = Restart("redis");
    // The service notices (no request of this test was in flight, so no
    // record is unsettled), every writer publishes, the DB path opens.
    wait_db_path_open(&t.name).await;
    // Flip user 500's states through the DB path.
    c.act(BIZ, 1, 500, owner_of(1), pb::Action::Unlike).await.expect("unlike via the DB");
    c.act(BIZ, 2, 500, owner_of(2), pb::Action::Dislike).await.expect("dislike via the DB");
    let refused = c.act(BIZ, 3, 500, owner_of(3), pb::Action::Like).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "state rules hold on the DB path");
    // A user above the bound gets a record that no bound saw.
    let new_like = c.act(BIZ, 4, NEW_USER, owner_of(4), pb::Action::Like).await.expect("a new user's like via the DB");
    let during =
        run_load(&c, Load { clients: 4, actions: 300, users: 50, items: 20, business: BIZ, double_clicks: 0.1 }).await;
    assert!(during.ok > 50, "{during:?}");
    let counts = c.counts(BIZ, &items).await.expect("GetCounts from the DB");
    assert_ne!(counts, counts_before, "counts served from the DB follow the writes");
    let states = c.states(BIZ, 500, &[1, 2, 3]).await.expect("GetStates from the DB");
    assert_eq!(states[&1], pb::State::None as i32);
    assert_eq!(states[&2], pb::State::Dislike as i32);
    let degraded = thumbup_service::metrics::DEGRADED_WRITES.with_label_values(&[&t.name]).get();
    assert!(degraded >= 3, "writes took the DB path ({degraded})");
    drop(guard);

    // Once Redis is back (and the invalidations drained), the cached states
    // of user 500 must not be the stale ones.
    wait_redis_back(&t.name).await;
    let states = c.states(BIZ, 500, &[1, 2, 3]).await.unwrap();
    assert_eq!(states[&1], pb::State::None as i32, "stale LIKE served after Redis returned");
    assert_eq!(states[&2], pb::State::Dislike as i32);
    let relike = c.act(BIZ, 1, 500, owner_of(1), pb::Action::Like).await.expect("re-like after the DB-path unlike");
    assert_eq!(relike.state, pb::State::Like as i32);
    // The bound that did not see the DB path's record is gone: the new
    // user's second like is read from the DB and refused, not taken as new.
    assert!(
        newest_bound(&k, shard, BIZ).await.is_none_or(|b| b >= NEW_USER),
        "a bound below a user the DB path wrote survived Redis's return"
    );
    let twice = c.act(BIZ, 4, NEW_USER, owner_of(4), pb::Action::Like).await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "a second like of the DB path's new user: {twice:?}");
    let after =
        run_load(&c, Load { clients: 8, actions: 1_000, users: 50, items: 20, business: BIZ, double_clicks: 0.1 })
            .await;

    wait_drained(&k, Duration::from_secs(60)).await;
    assert!(job.log().contains("reading the stream failed"), "the job saw the outage and kept going");
    check_exact(&t).await;
    let served = c.counts(BIZ, &items).await.unwrap();
    for (msg, served) in &served {
        assert_eq!(
            counts_in_db(&t, *msg).await,
            *served,
            "served counts of item {msg} equal the DB after Redis returned"
        );
    }
    let mut acked = before.acked;
    for (key, v) in during.acked.into_iter().chain(after.acked) {
        keep_newest(&mut acked, key, v);
    }
    acked.insert((500, BIZ, 1), (relike.version, relike.state));
    acked.insert((NEW_USER, BIZ, 4), (new_like.version, new_like.state));
    check_acked_and_states(&c, &t, &acked).await;
    job.terminate();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stall_mid_load_takes_the_db_path_without_ghost_writes_or_stale_cache() {
    let _one = SERVERS.lock().await;
    let w = World::start("stall", &tenant_yaml("e2e-stall", &[BIZ], "")).await;
    let t = w.tenant("e2e-stall").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let _job = w.job("e2e-stall", 200);
    let c = w.client_of("e2e-stall").await;
    let load = Load { clients: 16, actions: 6_000, users: 40, items: 10, business: BIZ, double_clicks: 0.1 };
    let loader = tokio::spawn({
        let c = c.clone();
        async move { run_load_through_faults(&c, load).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Every command waits 2.5 s: longer than the service's 1 s Redis timeout,
    // so in-flight scripts time out (UNAVAILABLE: their outcome is unknown)
    // and run, or not, after the stall; the DB path takes the other records.
    let mut admin = admin_redis().await;
    for (host, port) in redis_data_nodes(&mut admin).await {
        let mut pause = redis::cmd("CLIENT");
        pause.arg("PAUSE").arg(2_500).arg("ALL");
        admin.on_node(&host, port, pause).await.unwrap();
    }
    let out = loader.await.unwrap();
    let degraded = thumbup_service::metrics::DEGRADED_WRITES.with_label_values(&[&t.name]).get();
    assert!(degraded > 0, "the stall sent writes to the DB path");
    wait_redis_back(&t.name).await;
    wait_drained(&k, Duration::from_secs(60)).await;
    check_exact(&t).await;
    check_acked_and_states_except(&c, &t, &out.acked, &out.ambiguous).await;
    println!(
        "stall: sent {} ok {} refused {} unavailable {}, {degraded} on the DB path",
        out.sent, out.ok, out.refused, out.unavailable
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_right_after_acknowledged_writes_loses_none_of_them() {
    let _one = SERVERS.lock().await;
    let w = World::start("rediskill", &tenant_yaml("e2e-rediskill", &[BIZ], "")).await;
    let t = w.tenant("e2e-rediskill").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    // A long window: the acknowledged writes exist only in Redis when it dies.
    let mut job = w.job("e2e-rediskill", 30_000);
    let c = w.client_of("e2e-rediskill").await;
    let out =
        run_load(&c, Load { clients: 8, actions: 1_500, users: 30, items: 10, business: BIZ, double_clicks: 0.1 })
            .await;
    assert_eq!(records(&t).await.len(), 0, "nothing was applied before the crash");
    // SIGKILL: no shutdown, no save; only the append-only file
    // (appendfsync always) holds the acknowledged writes. (While Redis is
    // down the service also puts what it acknowledged into the DB before
    // its DB path opens; the stream check below does not rely on that.)
    stack(&["kill", "redis", redis_instance()]);
    job.kill();
    stack(&["start", "redis", redis_instance()]);
    let kept = stream_versions(&k).await;
    for (key, (version, _)) in &out.acked {
        assert!(
            kept.contains(&(*key, *version)),
            "acknowledged {key:?} v{version} is not in the stream after the crash"
        );
    }
    // The same consumer, now with a short window.
    let _job = w.job("e2e-rediskill", 200);
    wait_drained(&k, Duration::from_secs(60)).await;
    check_exact(&t).await;
    check_acked_and_states(&c, &t, &out.acked).await;
    println!("redis kill: {} acknowledged records survived", out.acked.len());
    w.stop().await;
}

/// The DB path opens only once every process that may have acknowledged
/// writes through Redis has published them: a writer that neither published
/// nor let its lease end below the watermarks (here a row standing for a
/// process that died mid-lease) keeps it shut, and writes are UNAVAILABLE
/// instead of being decided on a DB that may miss its acknowledged writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_that_has_not_published_keeps_the_db_path_shut() {
    let _one = SERVERS.lock().await;
    let w = World::start("holdout", &tenant_yaml("e2e-holdout", &[BIZ], "")).await;
    let t = w.tenant("e2e-holdout").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let _job = w.job("e2e-holdout", 200);
    let c = w.client_of("e2e-holdout").await;
    c.act(BIZ, 1, 1, owner_of(1), pb::Action::Like).await.unwrap();
    wait_drained(&k, Duration::from_secs(60)).await;
    // Another writer, mid-lease, that will never publish.
    let mut db = admin_db(&t).await;
    let until = thumbup_core::version::now_ms() + 600_000;
    sqlx::query("INSERT INTO fence_writers (instance, lease_until_ms, published_epoch) VALUES ('crashed', ?, -1)")
        .bind(until)
        .execute(&mut db)
        .await
        .unwrap();

    stack(&["stop", "redis", redis_instance()]);
    let guard = Restart("redis");
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut refused = 0;
    while std::time::Instant::now() < deadline {
        match c.act(BIZ, 2, 1, owner_of(2), pb::Action::Like).await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                assert!(has_retry_info(&s), "{s:?}");
                refused += 1;
            }
            other => panic!("decided while a writer has not published: {other:?}"),
        }
        assert_eq!(thumbup_service::metrics::DB_PATH_OPEN.with_label_values(&[&t.name]).get(), 0);
    }
    assert!(refused > 0);
    assert!(!records(&t).await.contains_key(&(1, BIZ, 2)), "a refused write left a record");
    // Its lease ends below the watermarks: all it acknowledged is applied.
    sqlx::query("UPDATE fence_writers SET lease_until_ms = 1 WHERE instance = 'crashed'")
        .execute(&mut db)
        .await
        .unwrap();
    wait_db_path_open(&t.name).await;
    let r = c.act(BIZ, 2, 1, owner_of(2), pb::Action::Like).await.expect("the DB path decides once nothing holds it");
    assert_eq!(r.state, pb::State::Like as i32);
    assert_eq!(
        c.act(BIZ, 1, 1, owner_of(1), pb::Action::Like).await.unwrap_err().code(),
        tonic::Code::FailedPrecondition,
        "the DB path decides on the applied state"
    );
    drop(guard);
    wait_redis_back(&t.name).await;
    w.stop().await;
    // A service that shuts down ends its leases: it holds no DB path shut.
    let longest: i64 =
        sqlx::query_scalar("SELECT MAX(lease_until_ms) FROM fence_writers").fetch_one(&mut db).await.unwrap();
    let now = thumbup_core::version::now_ms();
    assert!(longest <= now + 2_000, "a stopped service still holds a lease until {longest} (now {now})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transition_still_in_the_stream_keeps_its_cached_state_when_the_db_path_changed_another_record_of_its_user() {
    use thumbup_core::cache::{self, Scripts, Seed, Transition, TransitionArgs};
    use thumbup_core::domain::Action;
    let _one = SERVERS.lock().await;
    let w = World::start("unknownkept", &tenant_yaml("e2e-unknownkept", &[BIZ], "")).await;
    let t = w.tenant("e2e-unknownkept").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let mut job = w.job("e2e-unknownkept", 200);
    let c = w.client_of("e2e-unknownkept").await;
    const USER: i64 = 700;
    for msg in [1, 2] {
        c.act(BIZ, msg, USER, owner_of(msg), pb::Action::Like).await.unwrap();
    }
    wait_drained(&k, Duration::from_secs(60)).await;

    // With the job stopped, a transition reaches Redis whose reply no
    // service saw (as a call that timed out after Redis ran it): the user
    // dislikes item 3. Only Redis knows it: the user's cache and the stream.
    job.kill();
    let mut con = cache::connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let a = TransitionArgs {
        mid: USER,
        business_id: BIZ,
        message_id: 3,
        up_mid: owner_of(3),
        action: Action::Dislike,
        seed: Seed::NotLoaded,
        deadline_ms: thumbup_core::version::now_ms() + 60_000,
    };
    let done = Scripts::default().transition(&mut con, &k, &t, a).await.unwrap();
    assert!(matches!(done, Transition::Applied { .. }), "{done:?}");
    drop(con);

    // Redis goes down and the DB path unlikes item 1 of the same user.
    stack(&["stop", "redis", redis_instance()]);
    let guard = Restart("redis");
    wait_db_path_open(&t.name).await;
    c.act(BIZ, 1, USER, owner_of(1), pb::Action::Unlike).await.expect("unlike via the DB");
    drop(guard);
    wait_redis_back(&t.name).await;

    // Back on Redis, before the job has applied the dislike: every state is
    // the newest, and the table holds against it.
    let states = c.states(BIZ, USER, &[1, 2, 3]).await.unwrap();
    assert_eq!(states[&1], pb::State::None as i32, "the DB path's unlike");
    assert_eq!(states[&2], pb::State::Like as i32);
    assert_eq!(states[&3], pb::State::Dislike as i32, "the dislike still in the stream was lost from the cache");
    let twice = c.act(BIZ, 3, USER, owner_of(3), pb::Action::Dislike).await.unwrap_err();
    assert_eq!(twice.code(), tonic::Code::FailedPrecondition, "a second dislike was taken: {twice:?}");

    // The record the DB path wrote is read from the DB once the job has
    // applied past Redis's return.
    job.restart();
    let relike = retry_unavailable(|| c.act(BIZ, 1, USER, owner_of(1), pb::Action::Like)).await;
    assert_eq!(relike.state, pb::State::Like as i32);
    wait_drained(&k, Duration::from_secs(60)).await;
    let recs = records(&t).await;
    assert_eq!(recs.get(&(USER, BIZ, 3)).copied(), Some(2), "the dislike reached the DB");
    assert_eq!(recs.get(&(USER, BIZ, 1)).copied(), Some(1), "the re-like reached the DB");
    check_exact(&t).await;
    job.terminate();
    w.stop().await;
}

/// A GetCounts miss reads the DB and then writes what it read to Redis. A
/// failover can hold that write up for seconds: it may reach Redis after
/// the DB path changed the count and Redis came back. The write it sends
/// then (the count as it was, with its older version) is sent here by hand,
/// right after the service went back to Redis: the cache must keep the
/// DB's count.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_count_filled_from_before_the_db_path_changed_it_does_not_stick_once_redis_is_back() {
    use thumbup_core::cache::{self, Scripts};
    let _one = SERVERS.lock().await;
    let w = World::start("latefill", &tenant_yaml("e2e-latefill", &[BIZ], "")).await;
    let t = w.tenant("e2e-latefill").clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let mut job = w.job("e2e-latefill", 200);
    let c = w.client_of("e2e-latefill").await;
    const ITEM: i64 = 7;
    for user in 800..805 {
        c.act(BIZ, ITEM, user, owner_of(ITEM), pb::Action::Like).await.unwrap();
    }
    wait_drained(&k, Duration::from_secs(60)).await;
    // The count as a fill would have read it, before the DB path.
    let served = c.counts(BIZ, &[ITEM]).await.unwrap()[&ITEM];
    assert_eq!(served, (5, 0));
    let mut admin = admin_redis().await;
    let cached: String = redis::cmd("GET").arg(k.counts(BIZ, ITEM)).query_async(&mut admin).await.unwrap();
    let (likes, dislikes, version) = cache::parse_pair(&cached).expect("a cached count");

    stack(&["stop", "redis", redis_instance()]);
    let guard = Restart("redis");
    wait_db_path_open(&t.name).await;
    for user in 800..803 {
        c.act(BIZ, ITEM, user, owner_of(ITEM), pb::Action::Unlike).await.expect("unlike via the DB");
    }
    drop(guard);
    wait_redis_back(&t.name).await;

    // The late fill arrives.
    let mut admin = admin_redis().await;
    let scripts = Scripts::default();
    let key = k.counts(BIZ, ITEM);
    let written = scripts.set_if_newer(&mut admin, &key, (likes, dislikes), version, 3600).await.unwrap();
    let db = counts_in_db(&t, ITEM).await;
    assert_eq!(db, (2, 0), "the DB path's unlikes");
    let served = c.counts(BIZ, &[ITEM]).await.unwrap()[&ITEM];
    assert_eq!(
        served, db,
        "GetCounts serves the DB's count, not the late fill's (the late fill was written: {written})"
    );
    assert!(!written, "the late fill's older version was refused");
    check_exact(&t).await;
    job.terminate();
    w.stop().await;
}

/// `(likes, dislikes)` of an item of [`BIZ`] in the DB.
async fn counts_in_db(t: &thumbup_core::config::TenantConfig, msg: i64) -> (i64, i64) {
    let mut con = admin_db(t).await;
    let row: Option<(i64, i64)> =
        sqlx::query_as("SELECT likes, dislikes FROM like_counts WHERE business_id = ? AND message_id = ?")
            .bind(BIZ)
            .bind(msg)
            .fetch_optional(&mut con)
            .await
            .unwrap();
    row.unwrap_or_default()
}
