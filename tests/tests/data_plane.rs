//! End-to-end tests of the data plane against the real MariaDB and Redis of
//! `scripts/stack.sh`: exact counts under concurrent load, job crashes,
//! bad input, tenant isolation, graceful shutdown, paging and reload.

use std::time::Duration;

use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_test_support::stack::admin_redis;
use tonic::Code;

const BIZ: i64 = 1;

fn keys(w: &World, name: &str) -> Keys {
    let t = w.tenant(name);
    Keys::new(&t.name, t.stream.shards)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counts_are_exact_under_concurrent_load_with_double_clicks() {
    let w = World::start("load", &tenant_yaml("e2e-load", &[BIZ], "")).await;
    let _job = w.job("e2e-load", 200);
    let c = w.client_of("e2e-load").await;
    let load = Load { clients: 32, actions: 20_000, users: 200, items: 50, business: BIZ, double_clicks: 0.1 };
    // A loaded machine can stall Redis past the service's timeout: such a
    // call is UNAVAILABLE with an unknown outcome (never decided on stale
    // data), so its record is only checked to hold its acknowledged version
    // or a newer one.
    let out = run_load_through_faults(&c, load).await;
    assert!(out.sent >= 20_000 && out.ok > 5_000 && out.refused > 0, "{out:?}");
    wait_drained(&keys(&w, "e2e-load"), Duration::from_secs(60)).await;
    let t = w.tenant("e2e-load");
    let seen = check_exact(t).await;
    check_acked_and_states_except(&c, t, &out.acked, &out.ambiguous).await;
    // Served counts (cache or DB) equal the DB too.
    let items: Vec<i64> = (1..=50).collect();
    let served = c.counts(BIZ, &items).await.unwrap();
    let total: i64 = served.values().map(|v| v.0).sum();
    assert_eq!(total, seen.likes, "GetCounts sums to the liked records");
    let degraded = thumbup_service::metrics::DEGRADED_WRITES.with_label_values(&["e2e-load"]).get();
    println!(
        "load: sent {} ok {} refused {} unavailable {} (degraded to the DB path: {degraded}); {} items, {} owners, {} cached counts checked",
        out.sent, out.ok, out.refused, out.unavailable, seen.items, seen.owners, seen.cached_counts
    );
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_killed_mid_batch_loses_and_doubles_nothing() {
    let w = World::start("crash", &tenant_yaml("e2e-crash", &[BIZ], "")).await;
    let k = keys(&w, "e2e-crash");
    let mut job = w.job("e2e-crash", 300);
    let c = w.client_of("e2e-crash").await;
    let load = Load { clients: 32, actions: 20_000, users: 200, items: 50, business: BIZ, double_clicks: 0.1 };
    let loader = tokio::spawn({
        let c = c.clone();
        // UNAVAILABLE allowed (a Redis stall on a loaded machine), as above.
        async move { run_load_through_faults(&c, load).await }
    });
    let mut kills = 0;
    while kills < 3 || !loader.is_finished() {
        // Kill only while entries are delivered but not acknowledged: in the
        // middle of a batch.
        if pending(&k).await > 0 {
            job.kill();
            kills += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            job.restart();
            tokio::time::sleep(Duration::from_millis(700)).await;
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if kills >= 6 {
            break;
        }
    }
    let out = loader.await.unwrap();
    assert!(kills >= 3, "killed the job {kills} times");
    wait_drained(&k, Duration::from_secs(60)).await;
    let t = w.tenant("e2e-crash");
    check_exact(t).await;
    check_acked_and_states_except(&c, t, &out.acked, &out.ambiguous).await;
    println!("crash: {kills} kills mid-batch, {} starts; sent {} ok {}", job.starts, out.sent, out.ok);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_the_open_window() {
    let w = World::start("term", &tenant_yaml("e2e-term", &[BIZ], "")).await;
    let k = keys(&w, "e2e-term");
    // A window far longer than the test: only the shutdown flush can apply it.
    let mut job = w.job("e2e-term", 60_000);
    let c = w.client_of("e2e-term").await;
    for mid in 1..=20 {
        c.act(BIZ, 1, mid, 77, pb::Action::Like).await.unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending(&k).await < 20 {
        assert!(std::time::Instant::now() < deadline, "the job never read the events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(records(w.tenant("e2e-term")).await.len(), 0, "nothing applied before the window closes");
    assert!(job.terminate(), "job exits 0 on SIGTERM; log:\n{}", job.log());
    assert_eq!(pending(&k).await, 0);
    assert_eq!(records(w.tenant("e2e-term")).await.len(), 20);
    let seen = check_exact(w.tenant("e2e-term")).await;
    assert_eq!(seen.likes, 20);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_their_status_and_change_nothing() {
    let yaml = format!("{}{}", tenant_yaml("e2e-bad", &[BIZ], ""), tenant_yaml("e2e-bad2", &[2], ""));
    let w = World::start("bad", &yaml).await;
    let _job = w.job("e2e-bad", 100);
    let c = w.client_of("e2e-bad").await;
    c.act(BIZ, 1, 1, 9, pb::Action::Like).await.unwrap();
    c.act(BIZ, 2, 1, 9, pb::Action::Dislike).await.unwrap();
    wait_drained(&keys(&w, "e2e-bad"), Duration::from_secs(30)).await;
    let t = w.tenant("e2e-bad");
    let (db_before, redis_before) = (db_snapshot(t).await, redis_snapshot("e2e-bad").await);

    let no_tenant = w.client("", "tok-e2e-bad-0001").await;
    let no_token = w.client("e2e-bad", "").await;
    let wrong_token = w.client("e2e-bad", "tok-e2e-bad2-0001").await;
    let unknown = w.client("nobody", "tok-e2e-bad-0001").await;
    let like =
        |biz, msg, mid, up, action| pb::LikeRequest { business_id: biz, message_id: msg, mid, up_mid: up, action };
    let l = pb::Action::Like as i32;
    type Case = (&'static str, Code, Result<(), tonic::Status>);
    let mut cases: Vec<Case> = Vec::new();
    let lk = |name, code, client: &Client, r: pb::LikeRequest| {
        let client = client.clone();
        async move { (name, code, client.inner.clone().like(client.req(r)).await.map(|_| ())) }
    };
    cases.push(lk("zero message id", Code::InvalidArgument, &c, like(BIZ, 0, 5, 9, l)).await);
    cases.push(lk("negative mid", Code::InvalidArgument, &c, like(BIZ, 3, -5, 9, l)).await);
    cases.push(lk("zero up_mid", Code::InvalidArgument, &c, like(BIZ, 3, 5, 0, l)).await);
    cases.push(lk("unspecified action", Code::InvalidArgument, &c, like(BIZ, 3, 5, 9, 0)).await);
    cases.push(lk("unknown action number", Code::InvalidArgument, &c, like(BIZ, 3, 5, 9, 42)).await);
    cases.push(lk("unknown business", Code::NotFound, &c, like(7, 3, 5, 9, l)).await);
    cases.push(lk("another tenant's business", Code::NotFound, &c, like(2, 3, 5, 9, l)).await);
    cases.push(lk("missing tenant metadata", Code::Unauthenticated, &no_tenant, like(BIZ, 3, 5, 9, l)).await);
    cases.push(lk("missing token", Code::Unauthenticated, &no_token, like(BIZ, 3, 5, 9, l)).await);
    cases.push(lk("another tenant's token", Code::Unauthenticated, &wrong_token, like(BIZ, 3, 5, 9, l)).await);
    cases.push(lk("unknown tenant", Code::Unauthenticated, &unknown, like(BIZ, 3, 5, 9, l)).await);
    cases.push(lk("like twice", Code::FailedPrecondition, &c, like(BIZ, 1, 1, 9, l)).await);
    let unlike = pb::Action::Unlike as i32;
    cases.push(lk("unlike a disliked item", Code::FailedPrecondition, &c, like(BIZ, 2, 1, 9, unlike)).await);
    cases.push(lk("unlike never liked", Code::FailedPrecondition, &c, like(BIZ, 4, 2, 9, unlike)).await);
    cases.push(
        lk("undislike a liked item", Code::FailedPrecondition, &c, like(BIZ, 1, 1, 9, pb::Action::Undislike as i32))
            .await,
    );
    let wrap = |name, code, r: Result<(), tonic::Status>| (name, code, r);
    cases.push(wrap("empty batch", Code::InvalidArgument, c.states(BIZ, 1, &[]).await.map(|_| ())));
    let many: Vec<i64> = (1..=101).collect();
    cases.push(wrap("batch over 100", Code::InvalidArgument, c.counts(BIZ, &many).await.map(|_| ())));
    cases.push(wrap("zero id in batch", Code::InvalidArgument, c.counts(BIZ, &[1, 0]).await.map(|_| ())));
    let list = |size, token: &str| pb::ListUserLikesRequest {
        business_id: BIZ,
        mid: 1,
        page_size: size,
        page_token: token.into(),
    };
    for (name, size, token) in
        [("page_size 0", 0, ""), ("page_size over 100", 101, ""), ("garbage page_token", 10, "not-a-token")]
    {
        cases.push(wrap(
            name,
            Code::InvalidArgument,
            c.inner.clone().list_user_likes(c.req(list(size, token))).await.map(|_| ()),
        ));
    }
    let likers =
        pb::ListItemLikersRequest { business_id: BIZ, message_id: 1, page_size: 10, page_token: "7a7a".into() };
    cases.push(wrap(
        "garbage likers token",
        Code::InvalidArgument,
        c.inner.clone().list_item_likers(c.req(likers)).await.map(|_| ()),
    ));
    let rcv = pb::GetReceivedLikesRequest { business_id: BIZ, up_mid: 0 };
    cases.push(wrap(
        "zero up_mid read",
        Code::InvalidArgument,
        c.inner.clone().get_received_likes(c.req(rcv)).await.map(|_| ()),
    ));

    assert!(cases.len() >= 12);
    for (name, code, result) in &cases {
        match result {
            Err(s) => {
                assert_eq!(s.code(), *code, "{name}: {s:?}");
                assert!(!s.message().is_empty(), "{name}: the status explains itself");
            }
            Ok(()) => panic!("{name}: accepted, expected {code:?}"),
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(db_snapshot(t).await, db_before, "bad requests changed the DB");
    assert_eq!(redis_snapshot("e2e-bad").await, redis_before, "bad requests changed Redis");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_isolated_by_tokens_acl_and_grants() {
    let yaml = format!("{}{}", tenant_yaml("e2e-iso-a", &[BIZ], ""), tenant_yaml("e2e-iso-b", &[BIZ], ""));
    let w = World::start("iso", &yaml).await;
    let _ja = w.job("e2e-iso-a", 100);
    let _jb = w.job("e2e-iso-b", 100);
    let a = w.client_of("e2e-iso-a").await;
    let b = w.client_of("e2e-iso-b").await;
    b.act(BIZ, 1, 1, 9, pb::Action::Like).await.unwrap();
    a.act(BIZ, 1, 2, 9, pb::Action::Dislike).await.unwrap();
    wait_drained(&keys(&w, "e2e-iso-b"), Duration::from_secs(30)).await;
    wait_drained(&keys(&w, "e2e-iso-a"), Duration::from_secs(30)).await;

    // The gateway: A's token is refused on B, and A sees only A's data.
    let a_on_b = w.client("e2e-iso-b", "tok-e2e-iso-a-0001").await;
    let err = a_on_b.counts(BIZ, &[1]).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = a_on_b.act(BIZ, 1, 3, 9, pb::Action::Like).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(a.counts(BIZ, &[1]).await.unwrap()[&1], (0, 1));
    assert_eq!(b.counts(BIZ, &[1]).await.unwrap()[&1], (1, 0));

    // Redis: A's ACL user cannot touch B's keys.
    let ta = w.tenant("e2e-iso-a");
    let tb = w.tenant("e2e-iso-b");
    let mut ra = thumbup_core::cache::connect(&ta.redis, Duration::from_secs(2)).await.unwrap();
    let kb = Keys::new(&tb.name, tb.stream.shards);
    let ka = Keys::new(&ta.name, ta.stream.shards);
    let own: Option<String> = redis::cmd("GET").arg(ka.counts(BIZ, 1)).query_async(&mut ra).await.unwrap();
    assert!(own.is_some(), "A reads its own keys");
    for cmd in [
        redis::cmd("GET").arg(kb.counts(BIZ, 1)).clone(),
        redis::cmd("SET").arg(kb.counts(BIZ, 1)).arg("9:9:9").clone(),
    ] {
        let e = cmd.query_async::<Option<String>>(&mut ra).await.unwrap_err();
        assert_eq!(e.code(), Some("NOPERM"), "{e}");
    }
    let e = redis::cmd("XADD")
        .arg(kb.stream(0))
        .arg("*")
        .arg("x")
        .arg("1")
        .query_async::<String>(&mut ra)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("NOPERM"), "{e}");
    let e = redis::cmd("FLUSHALL").query_async::<String>(&mut ra).await.unwrap_err();
    assert_eq!(e.code(), Some("NOPERM"), "{e}");

    // DB: A's user is refused on B's schema.
    use sqlx::{ConnectOptions, Connection};
    let opts = thumbup_core::db::connect_options(ta).unwrap();
    let mut da = opts.clone().connect().await.unwrap();
    let sql = format!("SELECT COUNT(*) FROM `{}`.like_records", tb.schema());
    let e = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_one(&mut da).await.unwrap_err();
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
    assert!(matches!(code.as_deref(), Some("42000")), "A's DB user refused on B's schema: {e}");
    let refused = opts.database(&tb.schema()).connect().await;
    assert!(refused.is_err(), "A's DB user cannot even open B's schema");
    da.close().await.unwrap();
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_likes_page_beyond_the_cached_length_newest_first() {
    let w = World::start("list", &tenant_yaml("e2e-list", &[BIZ], "    cache: { liked_list_max: 5 }\n")).await;
    let _job = w.job("e2e-list", 100);
    let c = w.client_of("e2e-list").await;
    for msg in 1..=12 {
        c.act(BIZ, msg, 42, 9, pb::Action::Like).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    c.act(BIZ, 4, 42, 9, pb::Action::Unlike).await.unwrap();
    c.act(BIZ, 11, 42, 9, pb::Action::Dislike).await.unwrap();
    let want: Vec<i64> = (1..=12).rev().filter(|m| *m != 4 && *m != 11).collect();
    // Right away (the job may not have applied yet) and after it has.
    assert_eq!(c.user_likes(BIZ, 42, 4).await.unwrap()[..3], want[..3], "newest likes show at once");
    wait_drained(&keys(&w, "e2e-list"), Duration::from_secs(30)).await;
    for size in [1, 3, 4, 100] {
        assert_eq!(c.user_likes(BIZ, 42, size).await.unwrap(), want, "page size {size}");
    }
    let mut r = admin_redis().await;
    // The user's cache: its entries and one member for the version floor.
    let cached: i64 = redis::cmd("ZCARD").arg(keys(&w, "e2e-list").user(42, BIZ)).query_async(&mut r).await.unwrap();
    assert!(cached <= 5 + 1, "the Redis list is trimmed to its maximum ({cached})");
    // Likers of an item, newest first.
    for mid in [1, 2, 3] {
        c.act(BIZ, 1, mid, 9, pb::Action::Like).await.unwrap();
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    wait_drained(&keys(&w, "e2e-list"), Duration::from_secs(30)).await;
    let req = pb::ListItemLikersRequest { business_id: BIZ, message_id: 1, page_size: 2, page_token: String::new() };
    let page = c.inner.clone().list_item_likers(c.req(req)).await.unwrap().into_inner();
    assert_eq!(page.likers.iter().map(|l| l.mid).collect::<Vec<_>>(), vec![3, 2]);
    let req =
        pb::ListItemLikersRequest { business_id: BIZ, message_id: 1, page_size: 2, page_token: page.next_page_token };
    let page = c.inner.clone().list_item_likers(c.req(req)).await.unwrap().into_inner();
    assert_eq!(page.likers.iter().map(|l| l.mid).collect::<Vec<_>>(), vec![1, 42]);
    assert!(page.next_page_token.is_empty());
    let rcv = pb::GetReceivedLikesRequest { business_id: BIZ, up_mid: 9 };
    let got = c.inner.clone().get_received_likes(c.req(rcv)).await.unwrap().into_inner().likes;
    assert_eq!(got, want.len() as i64 + 3);
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_tenant_is_served_without_restart() {
    let w = World::start("reload", &tenant_yaml("e2e-rl-a", &[BIZ], "")).await;
    let added = w.client_of("e2e-rl-b").await;
    assert_eq!(added.counts(BIZ, &[1]).await.unwrap_err().code(), Code::Unauthenticated);
    let yaml = format!("tenants:\n{}{}", tenant_yaml("e2e-rl-a", &[BIZ], ""), tenant_yaml("e2e-rl-b", &[BIZ], ""));
    let cfg = thumbup_core::config::Config::parse(&yaml, "test").unwrap();
    reset_tenant(cfg.tenant("e2e-rl-b").unwrap()).await;
    std::fs::write(&w.config_path, yaml).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match added.act(BIZ, 1, 1, 9, pb::Action::Like).await {
            Ok(r) => {
                assert_eq!(r.state, pb::State::Like as i32);
                break;
            }
            Err(s) if s.code() == Code::Unauthenticated && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("added tenant not served: {s:?}"),
        }
    }
    // A broken file keeps the old tenants serving.
    std::fs::write(&w.config_path, "tenants: [ {").unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(added.counts(BIZ, &[1]).await.is_ok(), "a broken config does not drop tenants");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_script_matches_the_state_table() {
    use thumbup_core::cache::{Scripts, Seed, Transition, TransitionArgs, connect};
    use thumbup_core::domain::{Action, State, transition};
    let w = World::start("lua", &tenant_yaml("e2e-lua", &[BIZ], "")).await;
    let t = w.tenant("e2e-lua");
    let k = keys(&w, "e2e-lua");
    let mut con = connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let scripts = Scripts::default();
    let mut msg = 0;
    for from in [State::None, State::Like, State::Dislike] {
        for action in [Action::Like, Action::Unlike, Action::Dislike, Action::Undislike] {
            msg += 1;
            let deadline_ms = thumbup_core::version::now_ms() + 60_000;
            let args = |seed| TransitionArgs {
                mid: 5,
                business_id: BIZ,
                message_id: msg,
                up_mid: 9,
                action,
                seed,
                deadline_ms,
            };
            // The user is not cached at first (warm it), then partly (the
            // seeds below): an unknown record needs a seed.
            let need = scripts.transition(&mut con, &k, t, args(Seed::NotLoaded)).await.unwrap();
            assert!(matches!(need, Transition::NeedSeed { .. } | Transition::NeedWarm { .. }), "{need:?}");
            let got = scripts.transition(&mut con, &k, t, args(Seed::Loaded(from, 1000))).await.unwrap();
            match (transition(from, action), got) {
                (Ok(to), Transition::Applied { prev, state, version, .. }) => {
                    assert_eq!((prev, state), (from, to), "{from} {action}");
                    assert!(version > 1000, "version grows past the seed's");
                    // The state is cached: the next call needs no seed and
                    // the same action again follows the table from `to`.
                    let again = scripts.transition(&mut con, &k, t, args(Seed::NotLoaded)).await.unwrap();
                    match transition(to, action) {
                        Ok(_) => assert!(matches!(again, Transition::Applied { version: v, .. } if v > version)),
                        Err(_) => assert_eq!(again, Transition::Refused(to)),
                    }
                }
                (Err(_), Transition::Refused(s)) => assert_eq!(s, from, "{from} {action}"),
                (want, got) => panic!("{from} {action}: table says {want:?}, script did {got:?}"),
            }
        }
    }
    // The reply names the stream entry the event went to (its millisecond
    // part), which the write fence compares with the job's watermarks.
    msg += 1;
    let a = TransitionArgs {
        mid: 5,
        business_id: BIZ,
        message_id: msg,
        up_mid: 9,
        action: Action::Like,
        seed: Seed::Loaded(State::None, 0),
        deadline_ms: thumbup_core::version::now_ms() + 60_000,
    };
    let Transition::Applied { stream_ms, .. } = scripts.transition(&mut con, &k, t, a).await.unwrap() else {
        panic!("a like from NONE applies")
    };
    let mut admin = admin_redis().await;
    let newest: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
        .arg(k.stream_of(5))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut admin)
        .await
        .unwrap();
    let id = &newest.ids[0].id;
    assert_eq!(thumbup_core::cache::entry_ms(id), Some(stream_ms), "stream entry {id}");
    // A user cache whose version floor is not a number is an error, never a
    // state to decide on.
    msg += 1;
    let _: () = redis::cmd("ZADD").arg(k.user(6, BIZ)).arg(0).arg("vU").query_async(&mut admin).await.unwrap();
    let a = TransitionArgs { mid: 6, message_id: msg, seed: Seed::NotLoaded, ..a };
    let err = scripts.transition(&mut con, &k, t, a).await.unwrap_err();
    assert!(err.to_string().contains("malformed state"), "{err}");
    // Past its deadline the script does nothing.
    msg += 1;
    let before = redis_snapshot("e2e-lua").await;
    let late = TransitionArgs {
        mid: 5,
        business_id: BIZ,
        message_id: msg,
        up_mid: 9,
        action: Action::Like,
        seed: Seed::Loaded(State::None, 0),
        deadline_ms: thumbup_core::version::now_ms() - 1,
    };
    assert_eq!(scripts.transition(&mut con, &k, t, late).await.unwrap(), Transition::Expired);
    assert_eq!(redis_snapshot("e2e-lua").await, before, "an expired script changes nothing");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_claimed_and_malformed_ones_dead_lettered() {
    let w = World::start("claim", &tenant_yaml("e2e-claim", &[BIZ], "")).await;
    let k = keys(&w, "e2e-claim");
    let c = w.client_of("e2e-claim").await;
    // A consumer that reads a long window and dies before applying it.
    let mut first = w.job_named("e2e-claim", 60_000, "doomed");
    for mid in 1..=12 {
        c.act(BIZ, 3, mid, 77, pb::Action::Like).await.unwrap();
    }
    let mut admin = admin_redis().await;
    let _: String =
        redis::cmd("XADD").arg(k.stream(1)).arg("*").arg("mid").arg("x").query_async(&mut admin).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while pending(&k).await < 13 {
        assert!(std::time::Instant::now() < deadline, "the first consumer never read the entries");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill();
    assert_eq!(records(w.tenant("e2e-claim")).await.len(), 0);
    // Another consumer claims what the dead one left pending.
    let _second = w.job_named("e2e-claim", 100, "heir");
    wait_drained(&k, Duration::from_secs(30)).await;
    assert_eq!(check_exact(w.tenant("e2e-claim")).await.likes, 12, "all 12 likes applied by the heir");
    let dead: i64 = redis::cmd("XLEN").arg(format!("{}deadletter", k.prefix())).query_async(&mut admin).await.unwrap();
    assert_eq!(dead, 1, "the malformed entry went to the dead-letter stream");
    let downstream: i64 = redis::cmd("XLEN").arg(k.downstream()).query_async(&mut admin).await.unwrap();
    assert_eq!(downstream, 12, "one downstream event per applied transition");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_user_rate_limit_refuses_with_resource_exhausted_and_writes_nothing() {
    let extra = "    limits: { per_mid_per_sec: 3, per_tenant_per_sec: 1000, db_fallback_per_sec: 10 }\n";
    let yaml = tenant_yaml("e2e-limit", &[BIZ], "").replace(
        "    limits: { per_mid_per_sec: 1000000, per_tenant_per_sec: 1000000, db_fallback_per_sec: 100000 }\n",
        extra,
    );
    let w = World::start("limit", &yaml).await;
    let _job = w.job("e2e-limit", 100);
    let c = w.client_of("e2e-limit").await;
    let mut limited = Vec::new();
    for msg in 1..=10 {
        match c.act(BIZ, msg, 5, 9, pb::Action::Like).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::ResourceExhausted => limited.push(msg),
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert!(limited.len() >= 5, "a burst of 10 against 3/s: {limited:?}");
    // Another user is not limited by user 5's burst.
    c.act(BIZ, 1, 6, 9, pb::Action::Like).await.expect("other users keep their own budget");
    wait_drained(&keys(&w, "e2e-limit"), Duration::from_secs(30)).await;
    let recs = records(w.tenant("e2e-limit")).await;
    for msg in &limited {
        assert!(!recs.contains_key(&(5, BIZ, *msg)), "a refused write was stored: {msg}");
    }
    assert_eq!(recs.len(), 10 - limited.len() + 1);
    w.stop().await;
}

/// The job's watermark (every entry below it is acknowledged, so applied)
/// follows the consumer group: the oldest pending entry, the Redis clock
/// once everything is acknowledged, the last delivered entry while newer
/// ones wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_applied_watermark_never_passes_an_unacknowledged_entry() {
    use thumbup_core::cache::{Scripts, entry_ms};
    use thumbup_core::keys::JOB_GROUP;
    let w = World::start("watermark", &tenant_yaml("e2e-watermark", &[BIZ], "")).await;
    let k = keys(&w, "e2e-watermark");
    let t = w.tenant("e2e-watermark");
    let mut con = thumbup_core::cache::connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let scripts = Scripts::default();
    let shard = k.stream(0);
    let before = thumbup_core::version::now_ms();
    let none = scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap();
    assert!(none >= before, "a shard without a stream has nothing unapplied ({none} < {before})");
    let mut admin = admin_redis().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let id: String = redis::cmd("XADD").arg(&shard).arg("*").arg("n").arg(i).query_async(&mut admin).await.unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    assert_eq!(scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap(), 0, "no group yet: nothing is applied");
    let _: () =
        redis::cmd("XGROUP").arg("CREATE").arg(&shard).arg(JOB_GROUP).arg("0").query_async(&mut admin).await.unwrap();
    let first = entry_ms(&ids[0]).unwrap();
    assert!(scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap() <= first, "undelivered entries hold it");
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(JOB_GROUP)
        .arg("c")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(&shard)
        .arg(">")
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap(), first, "the oldest pending entry");
    let _: i64 = redis::cmd("XACK").arg(&shard).arg(JOB_GROUP).arg(&ids[0]).query_async(&mut admin).await.unwrap();
    assert_eq!(scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap(), entry_ms(&ids[1]).unwrap());
    let _: i64 = redis::cmd("XACK").arg(&shard).arg(JOB_GROUP).arg(&ids[1..]).query_async(&mut admin).await.unwrap();
    let all = scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap();
    assert!(all > entry_ms(&ids[2]).unwrap(), "everything acknowledged: the Redis clock");
    let late: String = redis::cmd("XADD").arg(&shard).arg("*").arg("n").arg(9).query_async(&mut admin).await.unwrap();
    let w_now = scripts.watermark(&mut con, &shard, JOB_GROUP).await.unwrap();
    assert!(w_now <= entry_ms(&late).unwrap(), "an undelivered entry is not below the watermark");
    assert_eq!(w_now, entry_ms(&ids[2]).unwrap(), "the last delivered entry");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_above_the_newest_user_bound_is_proved_new_without_a_db_read_and_one_below_is_read_from_the_db() {
    use thumbup_service::metrics::USER_WARMS;
    let w = World::start("newest", &tenant_yaml("e2e-newest", &[BIZ], "")).await;
    let _job = w.job("e2e-newest", 200);
    let c = w.client_of("e2e-newest").await;
    let k = keys(&w, "e2e-newest");
    let warms = |how: &str| USER_WARMS.with_label_values(&["e2e-newest", how]).get();
    let shard = k.shard_of(1_000);

    // Before the bound exists, a user who is not cached is read from the DB.
    let (db0, proved0) = (warms("db"), warms("proved_new"));
    c.act(BIZ, 1, 1_000, owner_of(1), pb::Action::Like).await.unwrap();
    assert_eq!((warms("db"), warms("proved_new")), (db0 + 1, proved0), "no bound yet: the DB was read");
    let (bound, next) = establish_newest_bound(&c, &k, BIZ, shard, 2_000, 2).await;
    assert!(bound >= 1_000, "the bound covers every user with a record: {bound}");

    // Users above it: each like is one Redis call, no DB read, and moves
    // the bound; every reply is checked.
    let (db1, proved1) = (warms("db"), warms("proved_new"));
    let mut mid = next.max(bound + 1);
    mid += (i64::from(shard) - mid.rem_euclid(i64::from(k.shards()))).rem_euclid(i64::from(k.shards()));
    let first = mid;
    for i in 0..20 {
        let r = c.act(BIZ, 3 + i % 3, mid, owner_of(3 + i % 3), pb::Action::Like).await.unwrap();
        assert_eq!(r.state, pb::State::Like as i32, "user {mid}");
        assert_eq!(newest_bound(&k, shard, BIZ).await, Some(mid), "the bound follows the newest user");
        mid += i64::from(k.shards());
    }
    assert_eq!((warms("db"), warms("proved_new")), (db1, proved1 + 20), "proved new: no DB read");
    // A proved user is cached like any other: the table still holds.
    let again = c.act(BIZ, 3, first, owner_of(3), pb::Action::Like).await.unwrap_err();
    assert_eq!(again.code(), Code::FailedPrecondition, "a second like of a proved user is refused");

    // A user at or below the bound whose cache is gone is read from the DB,
    // which holds its like: a second like is refused, not taken as new.
    wait_drained(&k, Duration::from_secs(60)).await;
    let mut r = admin_redis().await;
    let _: () = redis::cmd("DEL").arg(k.user(first, BIZ)).arg(k.user(1_000, BIZ)).query_async(&mut r).await.unwrap();
    for (msg, user) in [(3, first), (1, 1_000)] {
        let refused = c.act(BIZ, msg, user, owner_of(msg), pb::Action::Like).await.unwrap_err();
        assert_eq!(refused.code(), Code::FailedPrecondition, "user {user} liked item {msg} before: {refused:?}");
    }
    assert_eq!(warms("db"), db1 + 2, "users at or below the bound were read from the DB");
    wait_drained(&k, Duration::from_secs(60)).await;
    check_exact(w.tenant("e2e-newest")).await;
    w.stop().await;
}
