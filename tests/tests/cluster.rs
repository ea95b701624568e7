//! The data plane on the stack's Redis Cluster (`scripts/stack.sh
//! cluster-up`: three masters, a replica each): a master lost with its data
//! under 16 writers, a live resharding under 16 writers, and isolation on
//! every node. The rest of the data-plane suite runs on the cluster too
//! (scripts/test.sh, `THUMBUP_E2E_REDIS_CLUSTER=1`).
//!
//! The tests of this file share the cluster's topology: they take turns
//! (one lock) and leave it with three masters, each with a replica.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use thumbup_core::cache::Conn;
use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_test_support::stack::{admin_redis, cluster_nodes, stack, use_cluster};
use thumbup_test_support::wait::wait_until;
use tokio::sync::Mutex;

const BIZ: i64 = 1;

/// One test at a time changes the cluster.
static TOPOLOGY: Mutex<()> = Mutex::const_new(());

fn keys_of(w: &World, name: &str) -> Keys {
    let t = w.tenant(name);
    Keys::new(&t.name, t.stream.shards)
}

/// `(port, node id, slots)` of each master holding slots.
async fn masters(con: &mut Conn) -> Vec<(u16, String, usize)> {
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(con).await.unwrap();
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if !f[2].contains("master") || f[2].contains("fail") || f.len() < 9 {
            continue;
        }
        let port: u16 = f[1].split('@').next().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
        let slots = f[8..]
            .iter()
            .filter(|r| !r.starts_with('['))
            .map(|r| match r.split_once('-') {
                Some((a, b)) => b.parse::<usize>().unwrap() - a.parse::<usize>().unwrap() + 1,
                None => 1,
            })
            .sum();
        out.push((port, f[0].to_string(), slots));
    }
    out.sort();
    out
}

/// The port of the master that holds `key`'s slot.
async fn master_of(con: &mut Conn, key: &str) -> u16 {
    let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(con).await.unwrap();
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER").arg("SLOTS").query_async(con).await.unwrap();
    for r in ranges {
        let lo: i64 = redis::from_redis_value_ref(&r[0]).unwrap();
        let hi: i64 = redis::from_redis_value_ref(&r[1]).unwrap();
        if (lo..=hi).contains(&slot) {
            let redis::Value::Array(node) = &r[2] else { panic!("CLUSTER SLOTS node") };
            return redis::from_redis_value_ref::<u16>(&node[1]).unwrap();
        }
    }
    panic!("slot {slot} of {key} is not served")
}

/// The port of the replica of the master at `master_port`.
async fn replica_of(con: &mut Conn, master_port: u16) -> u16 {
    let text: String = redis::cmd("CLUSTER").arg("NODES").query_async(con).await.unwrap();
    let port = |f: &[&str]| -> u16 { f[1].split('@').next().unwrap().rsplit_once(':').unwrap().1.parse().unwrap() };
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    let master = lines.iter().find(|f| port(f) == master_port).expect("the master in CLUSTER NODES");
    let replica = lines.iter().find(|f| f[2].contains("slave") && f[3] == master[0]).expect("the master has a replica");
    port(replica)
}

/// Sends `signal` (STOP, CONT) to the cluster node at `port`.
fn signal_node(port: u16, signal: &str) {
    let dir = std::env::var("THUMBUP_STACK_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| thumbup_test_support::stack::root().join(".stack"));
    let pid =
        std::fs::read_to_string(dir.join(format!("redis-cluster-{port}/redis.pid"))).expect("the node's pid file");
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.trim()).status().unwrap();
    assert!(status.success(), "kill -{signal} of the node on {port}");
}

/// Acknowledged records whose newest acknowledged state is not the DB's
/// (ambiguous records: older than acknowledged), after quiescing.
async fn lost(t: &thumbup_core::config::TenantConfig, acked: &Acked, ambiguous: &BTreeSet<(i64, i64, i64)>) -> usize {
    let recs = records(t).await;
    acked
        .iter()
        .filter(|(k, (_, state))| !ambiguous.contains(*k) && recs.get(*k).copied() != Some(*state as i64))
        .count()
}

/// Writes that a fault answered UNAVAILABLE, by metric reason.
fn refused(tenant: &str) -> String {
    let mut parts = Vec::new();
    for reason in ["unknown_outcome", "redis_late", "fence_moving", "seed_unprovable", "db_unavailable"] {
        let n = thumbup_service::metrics::WRITES_REFUSED.with_label_values(&[tenant, reason]).get();
        if n > 0 {
            parts.push(format!("{reason} {n}"));
        }
    }
    for outcome in ["sent", "covered", "missed", "replaced", "failed"] {
        let n = thumbup_service::metrics::REPLICA_WAITS.with_label_values(&[tenant, outcome]).get();
        parts.push(format!("replica wait {outcome} {n}"));
    }
    parts.join(", ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_a_master_with_its_data_under_16_writers_loses_no_acknowledged_like() {
    use_cluster();
    let _turn = TOPOLOGY.lock().await;
    stack(&["cluster-wait-ok"]);
    for run in 1..=3 {
        let name = format!("cl-loss-{run}");
        let w = World::start(&format!("cluster-loss-{run}"), &tenant_yaml(&name, &[BIZ], "")).await;
        let keys = keys_of(&w, &name);
        let t = w.tenant(&name).clone();
        let mut job = w.job(&name, 200);
        let c = w.client_of(&name).await;
        let mut admin = admin_redis().await;
        // The master of stream shard 0 (its users' caches and their stream).
        let victim = master_of(&mut admin, &keys.stream(0)).await;
        let load = Load { clients: 16, actions: 8_000, users: 400, items: 40, business: BIZ, double_clicks: 0.1 };
        let client = c.clone();
        let loader = tokio::spawn(async move { run_load_through_faults(&client, load).await });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The job dies, and the replica lags behind (stopped for a second,
        // as a stalled replica or a slow link would): what the master took
        // in that second is in its stream alone when it dies. Without the
        // wait for a replica (THUMBUP_E2E_REPLICA_ACKS=0) likes acknowledged
        // then are lost; with it they were never acknowledged.
        let replica = replica_of(&mut admin, victim).await;
        job.kill();
        signal_node(replica, "STOP");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let killed = Instant::now();
        stack(&["cluster-kill", &victim.to_string()]);
        signal_node(replica, "CONT");
        stack(&["cluster-wipe", &victim.to_string()]);
        stack(&["cluster-wait-ok"]);
        let promoted = killed.elapsed();
        job.restart();
        // The promoted master has no replica: its likes wait (UNAVAILABLE,
        // never acknowledged unreplicated) until the wiped node comes back
        // empty as its replica, while the load runs.
        stack(&["cluster-start", &victim.to_string()]);
        let rejoined = killed.elapsed();
        let out = loader.await.unwrap();
        wait_drained(&keys, Duration::from_secs(90)).await;
        let seen = check_exact(&t).await;
        let lost = lost(&t, &out.acked, &out.ambiguous).await;
        println!(
            "run {run}: job killed and replica {replica} stopped for 1 s, then master {victim} killed and wiped; replica promoted after {promoted:?}, the wiped node its replica after {rejoined:?}; sent {} ok {} refused {} unavailable {} ({}); {} records acknowledged, {lost} lost; {} items, {} cached counts equal the DB",
            out.sent,
            out.ok,
            out.refused,
            out.unavailable,
            refused(&name),
            out.acked.len(),
            seen.items,
            seen.cached_counts
        );
        assert_eq!(lost, 0, "acknowledged likes lost with master {victim}");
        assert!(out.ok > 1_000, "the load ran: {out:?}");
        check_acked_and_states_except(&c, &t, &out.acked, &out.ambiguous).await;
        w.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_live_resharding_of_a_third_of_the_slots_under_16_writers_loses_nothing() {
    use_cluster();
    let _turn = TOPOLOGY.lock().await;
    stack(&["cluster-wait-ok"]);
    rebalance();
    let name = "cl-reshard";
    let w = World::start("cluster-reshard", &tenant_yaml(name, &[BIZ], "")).await;
    let keys = keys_of(&w, name);
    let t = w.tenant(name).clone();
    let _job = w.job(name, 200);
    let c = w.client_of(name).await;
    let mut admin = admin_redis().await;
    let before = masters(&mut admin).await;
    assert_eq!(before.len(), 3, "three masters: {before:?}");
    // Everything of the two smaller masters, 5,600 slots (more than a
    // third), moves to the largest.
    let (to, from) = {
        let mut by_size = before.clone();
        by_size.sort_by_key(|m| std::cmp::Reverse(m.2));
        (by_size[0].clone(), [by_size[1].1.clone(), by_size[2].1.clone()].join(","))
    };
    let moved = 5_600;
    let load = Load { clients: 16, actions: 16_000, users: 400, items: 60, business: BIZ, double_clicks: 0.1 };
    let client = c.clone();
    let loader = tokio::spawn(async move { run_load_through_faults(&client, load).await });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    let seed = format!("127.0.0.1:{}", to.0);
    let to_id = to.1.clone();
    let reshard = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .env("REDISCLI_AUTH", std::env::var("THUMBUP_REDIS_ADMIN_PASSWORD").unwrap_or("thumbup-admin".into()))
            .args(["--user", "default", "--no-auth-warning", "--cluster", "reshard", &seed])
            .args(["--cluster-from", &from, "--cluster-to", &to_id, "--cluster-slots", &moved.to_string()])
            .args(["--cluster-yes", "--cluster-pipeline", "100"])
            .output()
            .expect("run redis-cli --cluster reshard")
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(reshard.status.success(), "reshard failed: {}", String::from_utf8_lossy(&reshard.stderr));
    let out = loader.await.unwrap();
    let after = masters(&mut admin).await;
    // Back to an even spread for the next test, whatever is found below.
    rebalance();
    let moved_now = after.iter().find(|m| m.1 == to.1).unwrap().2 - to.2;
    println!(
        "resharding moved {moved_now} of 16384 slots to {} in {took:?} under load (masters before {:?}, after {:?})",
        to.0,
        before.iter().map(|m| (m.0, m.2)).collect::<Vec<_>>(),
        after.iter().map(|m| (m.0, m.2)).collect::<Vec<_>>()
    );
    assert!(moved_now * 3 >= 16_384, "at least a third of the slots moved: {moved_now}");
    wait_drained(&keys, Duration::from_secs(90)).await;
    let seen = check_exact(&t).await;
    let lost = lost(&t, &out.acked, &out.ambiguous).await;
    let stderr_lines = |text: &[u8]| String::from_utf8_lossy(text).lines().filter(|l| l.contains("ERR")).count();
    println!(
        "reshard load: sent {} ok {} refused {} unavailable {} (errors and retries: {}); reshard errors {}; {} records acknowledged, {lost} lost; {} items, {} cached counts equal the DB",
        out.sent,
        out.ok,
        out.refused,
        out.unavailable,
        refused(name),
        stderr_lines(&reshard.stdout) + stderr_lines(&reshard.stderr),
        out.acked.len(),
        seen.items,
        seen.cached_counts
    );
    assert_eq!(lost, 0, "acknowledged likes lost in the resharding");
    check_acked_and_states_except(&c, &t, &out.acked, &out.ambiguous).await;
    w.stop().await;
}

/// Spreads the slots evenly over the masters again (`stack.sh
/// cluster-rebalance`: retried until the nodes agree on the slots, which a
/// resharding leaves behind for a moment; nothing to do when they are even).
fn rebalance() {
    stack(&["cluster-rebalance"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_user_is_refused_another_tenants_keys_on_every_node_masters_and_replicas() {
    use_cluster();
    let _turn = TOPOLOGY.lock().await;
    stack(&["cluster-wait-ok"]);
    let yaml = format!("{}{}", tenant_yaml("cl-iso-a", &[BIZ], ""), tenant_yaml("cl-iso-b", &[BIZ], ""));
    let w = World::start("cluster-iso", &yaml).await;
    let a = w.tenant("cl-iso-a").clone();
    let b_keys = keys_of(&w, "cl-iso-b");
    let a_keys = keys_of(&w, "cl-iso-a");
    let lib = thumbup_core::functions::library();
    let transition = lib.function(thumbup_core::functions::Function::Transition);
    let mut checked = 0;
    for url in cluster_nodes() {
        // Straight to the node (no cluster client): what this node's ACL says.
        let (_, port) = url.rsplit_once(':').unwrap();
        let info = format!("redis://{}:{}@127.0.0.1:{port}", a.redis.username, a.redis.password);
        let mut con = redis::Client::open(info).unwrap().get_multiplexed_async_connection().await.unwrap_or_else(|e| {
            panic!("tenant A's user authenticates on node {port} (provisioned on every node): {e}")
        });
        for (what, cmd) in [
            ("GET of B's counts", redis::cmd("GET").arg(b_keys.counts(BIZ, 1)).clone()),
            ("XADD to B's stream", redis::cmd("XADD").arg(b_keys.stream(0)).arg("*").arg("f").arg("v").clone()),
            (
                "FCALL on B's keys",
                redis::cmd("FCALL")
                    .arg(&transition)
                    .arg(3)
                    .arg(b_keys.user(1, BIZ))
                    .arg(b_keys.stream_of(1))
                    .arg(b_keys.newest(b_keys.shard_of(1), BIZ))
                    .clone(),
            ),
            ("CLUSTER RESET", redis::cmd("CLUSTER").arg("RESET").clone()),
            ("FLUSHALL", redis::cmd("FLUSHALL").clone()),
        ] {
            let e = cmd.query_async::<redis::Value>(&mut con).await.expect_err(what);
            assert_eq!(e.code(), Some("NOPERM"), "node {port}: {what}: {e}");
            checked += 1;
        }
        // Its own keys pass the ACL: the node answers, or redirects to the
        // slot's master (MOVED), never NOPERM.
        let own = redis::cmd("GET").arg(a_keys.counts(BIZ, 1)).query_async::<Option<String>>(&mut con).await;
        if let Err(e) = own {
            assert_eq!(e.code(), Some("MOVED"), "node {port}: tenant A's own key: {e}");
        }
    }
    println!("{checked} refusals checked on {} nodes", cluster_nodes().len());
    w.stop().await;
}

/// A cluster connection whose calls keep failing with the cluster
/// unreachable is replaced by a fresh one, which serves once the cluster is
/// back (a stuck cluster client was seen failing every call for minutes
/// after a master loss while a fresh client worked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_connection_whose_calls_keep_failing_is_replaced_and_serves_again() {
    use thumbup_core::conn::{REPLACE_AFTER, REPLACE_EVERY};
    use_cluster();
    let _turn = TOPOLOGY.lock().await;
    stack(&["cluster-wait-ok"]);
    let mut con =
        thumbup_core::cache::admin_connect(&thumbup_test_support::stack::admin_redis_url(), Duration::from_secs(1))
            .await
            .expect("admin cluster connection");
    let Conn::Cluster(cluster) = con.clone() else { panic!("a cluster connection: {con:?}") };
    assert!(thumbup_core::cache::ping(&mut con).await, "PING through the cluster");
    // A connection younger than REPLACE_EVERY is kept.
    tokio::time::sleep(REPLACE_EVERY).await;
    stack(&["stop", "redis", "cluster"]);
    struct Start;
    impl Drop for Start {
        fn drop(&mut self) {
            stack(&["start", "redis", "cluster"]);
        }
    }
    let start = Start;
    for i in 1..=REPLACE_AFTER {
        assert_eq!(cluster.replaced(), 0, "replaced after {} failed calls, before {REPLACE_AFTER}", i - 1);
        assert!(!thumbup_core::cache::ping(&mut con).await, "PING {i} with every node stopped");
    }
    assert_eq!(cluster.replaced(), 1, "{REPLACE_AFTER} failed calls in a row replace the connection");
    drop(start);
    stack(&["cluster-wait-ok"]);
    let mut pings = 0;
    wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        pings += 1;
        let mut con = con.clone();
        async move { if thumbup_core::cache::ping(&mut con).await { Ok(()) } else { Err("no PONG".to_string()) } }
    })
    .await;
    println!("the replaced cluster connection answered after {pings} PINGs (replaced {} times)", cluster.replaced());
}

/// A node added to a running cluster (one more replica) does not know the
/// tenants' ACL users until they are provisioned again (as the operator's
/// next reconcile does): then the tenant's user works there, and is refused
/// another tenant's keys there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_added_to_the_cluster_gets_the_tenant_users_at_the_next_provisioning() {
    use_cluster();
    let _turn = TOPOLOGY.lock().await;
    stack(&["cluster-wait-ok"]);
    let yaml = format!("{}{}", tenant_yaml("cl-add-a", &[BIZ], ""), tenant_yaml("cl-add-b", &[BIZ], ""));
    let w = World::start("cluster-add", &yaml).await;
    let a = w.tenant("cl-add-a").clone();
    let b_keys = keys_of(&w, "cl-add-b");
    let c = w.client_of("cl-add-a").await;
    let port = cluster_nodes().iter().map(|u| u.rsplit_once(':').unwrap().1.parse::<u16>().unwrap()).max().unwrap() + 1;
    let port_arg = port.to_string();
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            stack(&["cluster-remove", &self.0]);
        }
    }
    let remove = Remove(port_arg.clone());
    stack(&["cluster-add", &port_arg]);
    let node = |user: &str, password: &str| format!("redis://{user}:{password}@127.0.0.1:{port}");
    let open = |url: String| async move { redis::Client::open(url).unwrap().get_multiplexed_async_connection().await };
    let before = open(node(&a.redis.username, &a.redis.password)).await;
    let Err(e) = before else { panic!("tenant A's user authenticated on the new node before any provisioning") };
    assert_eq!(e.kind(), redis::ErrorKind::AuthenticationFailed, "the new node does not know tenant A's user yet: {e}");

    // The next provisioning (the operator's reconcile) reaches the new node.
    thumbup_core::provision::provision_redis(&thumbup_test_support::stack::admin_redis_url(), &a).await.unwrap();
    let mut con = open(node(&a.redis.username, &a.redis.password)).await.expect("tenant A's user on the new node");
    let pong: String = redis::cmd("PING").query_async(&mut con).await.unwrap();
    assert_eq!(pong, "PONG");
    let refused: Result<Option<String>, _> = redis::cmd("GET").arg(b_keys.counts(BIZ, 1)).query_async(&mut con).await;
    let e = refused.expect_err("tenant A reads B's key on the new node");
    assert_eq!(e.code(), Some("NOPERM"), "refused by the ACL: {e}");
    // Likes still go through (the new node is a second replica of a master).
    for user in 1..=20 {
        c.act(BIZ, 1, user, owner_of(1), thumbup_service::pb::Action::Like).await.expect("a like with the node added");
    }
    drop(remove);
    stack(&["cluster-wait-ok"]);
    w.stop().await;
}
