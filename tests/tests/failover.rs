//! Dual-datacenter failover against the real two-datacenter stack (MariaDB
//! dc-a primary, dc-b its GTID replica; Redis of each), out of a cluster:
//! the failover controller runs in-process with a route file, the service
//! in-process and the job as a child process both reach the DB only through
//! a real `thumbup-db-proxy` that follows the route file.
//!
//! The controller probes each DB through a small TCP relay that the test can
//! make refuse connections: probe failures of an exact count or length
//! without restarting a server. An unplanned failover kills dc-a's MariaDB
//! for real (SIGKILL).
//!
//! Every scenario starts with `scripts/stack.sh reseed a b` (dc-a primary,
//! dc-b a fresh replica) and ends with it, so the scenarios run one at a
//! time (a lock) in any order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use rand::Rng;
use sqlx::{Connection, MySqlConnection};
use thumbup_core::config::TenantConfig;
use thumbup_core::keys::Keys;
use thumbup_core::route::{Route, TransitionKind};
use thumbup_e2e::datacenters::*;
use thumbup_e2e::*;
use thumbup_operator::failover::{self, Notice};
use thumbup_service::pb;
use thumbup_test_support::stack::{cluster_half, cluster_mode_scope, cluster_node_pid, server_pid, stack};
use thumbup_test_support::wait::wait_until;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

/// One scenario at a time: they kill, fence and reseed the shared servers.
static SERIAL: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

fn db_port(dc: char) -> u16 {
    let (var, default) = if dc == 'a' { ("THUMBUP_DB_PORT", "23306") } else { ("THUMBUP_DB_PORT_B", "23307") };
    env_or(var, default).parse().expect("DB port")
}

fn redis_port(dc: char) -> u16 {
    let (var, default) = if dc == 'a' { ("THUMBUP_REDIS_PORT", "26379") } else { ("THUMBUP_REDIS_PORT_B", "26380") };
    env_or(var, default).parse().expect("Redis port")
}

fn db_admin_password() -> String {
    env_or("THUMBUP_DB_ADMIN_PASSWORD", "thumbup-admin")
}

/// A TCP relay in front of a DB that refuses connections on demand.
struct Relay {
    addr: SocketAddr,
    /// 0: forward; n > 0: refuse the next n connections; -1: refuse all.
    refuse: Arc<AtomicI64>,
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let refuse = Arc::new(AtomicI64::new(0));
        let refused = Arc::new(AtomicU64::new(0));
        let (r, n) = (refuse.clone(), refused.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let take = r.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| (v > 0).then(|| v - 1)).is_ok();
                if take || r.load(Ordering::SeqCst) < 0 {
                    n.fetch_add(1, Ordering::SeqCst);
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(("127.0.0.1", target_port)).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Relay { addr, refuse, refused, task }
    }

    fn refuse_next(&self, n: i64) {
        self.refuse.store(n, Ordering::SeqCst);
    }

    fn refuse_all(&self) {
        self.refuse.store(-1, Ordering::SeqCst);
    }

    fn heal(&self) {
        self.refuse.store(0, Ordering::SeqCst);
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The failover settings of a scenario (operator config `failover:`).
struct Timing {
    period_ms: u64,
    threshold: u32,
    grace_ms: u64,
    /// `failover.redis_tier`: the Redis tier moves with the route.
    redis_tier: bool,
    /// The Redis tier is the stack's Redis Cluster spanning both
    /// datacenters (`stack.sh cluster-split`), not one server each.
    cluster: bool,
}

/// The defaults of the operator config.
fn defaults() -> Timing {
    let f = thumbup_operator::config::Failover::default();
    Timing {
        period_ms: f.probe_period_ms,
        threshold: f.failure_threshold,
        grace_ms: f.grace_period_ms,
        redis_tier: false,
        cluster: false,
    }
}
/// Quicker probing for the scenarios that only watch the controller.
const QUICK: Timing = Timing { period_ms: 300, threshold: 3, grace_ms: 1_500, redis_tier: false, cluster: false };

/// The controller, its relays, its files and a db-proxy.
struct Site {
    dir: PathBuf,
    op_config: PathBuf,
    route_file: PathBuf,
    relay_a: Relay,
    relay_b: Relay,
    proxy: Proxy,
    notices: mpsc::UnboundedReceiver<Notice>,
    stop: Option<oneshot::Sender<()>>,
    controller: Option<tokio::task::JoinHandle<Result<(), failover::FailoverError>>>,
}

impl Site {
    /// Reseeds dc-b from dc-a and starts the controller (dc-a active) and a
    /// proxy. `tenants_file` is the service's config (for the replay).
    async fn start(test: &str, timing: Timing, tenants_file: PathBuf) -> Site {
        stack(&["start", "mariadb", "a"]);
        stack(&["start", "mariadb", "b"]);
        stack(&["reseed", "a", "b"]);
        let dir = std::env::temp_dir().join(format!("thumbup-failover-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let relay_a = Relay::start(db_port('a')).await;
        let relay_b = Relay::start(db_port('b')).await;
        let op_config = dir.join("operator.yaml");
        let route_file = dir.join("route.yaml");
        std::fs::write(&op_config, operator_yaml("dc-a", &relay_a, &relay_b, &timing)).unwrap();
        if !tenants_file.exists() {
            // No service in this scenario: nothing to replay.
            std::fs::create_dir_all(tenants_file.parent().unwrap()).unwrap();
            std::fs::write(&tenants_file, "tenants: []\n").unwrap();
        }
        let (tx, notices) = mpsc::unbounded_channel();
        let mut opts = failover::Options::local(op_config.clone(), route_file.clone(), tenants_file).unwrap();
        opts.notices = Some(tx);
        let (stop, stopped) = oneshot::channel::<()>();
        let controller = tokio::spawn(failover::run(opts, async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !route_file.exists() {
            assert!(Instant::now() < deadline, "the controller wrote no route file");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let proxy = Proxy::start(&dir, "proxy", &route_file);
        proxy.wait_epoch(1, Duration::from_secs(5)).await;
        Site {
            dir,
            op_config,
            route_file,
            relay_a,
            relay_b,
            proxy,
            notices,
            stop: Some(stop),
            controller: Some(controller),
        }
    }

    fn route(&self) -> Route {
        Route::parse(&std::fs::read_to_string(&self.route_file).unwrap()).unwrap()
    }

    /// Waits for the route file to reach `epoch`; returns when it did.
    async fn wait_epoch(&self, epoch: u64, within: Duration) -> Instant {
        let deadline = Instant::now() + within;
        loop {
            if self.route().epoch >= epoch {
                return Instant::now();
            }
            assert!(Instant::now() < deadline, "the route never reached epoch {epoch}: {:?}", self.route());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_promoted(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.route().failover.promotion_pending {
            assert!(Instant::now() < deadline, "the promotion never finished: {:?}", self.route());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for a notice with `reason`.
    async fn notice(&mut self, reason: &str, within: Duration) -> Notice {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, self.notices.recv()).await {
                Ok(Some(n)) if n.reason == reason => return n,
                Ok(Some(_)) => {}
                _ => panic!("no {reason} notice within {within:?}; route: {:?}", self.route()),
            }
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(c) = self.controller.take() {
            c.await.expect("controller task").expect("controller ended cleanly");
        }
    }
}

fn operator_yaml(active: &str, relay_a: &Relay, relay_b: &Relay, t: &Timing) -> String {
    let pw = db_admin_password();
    let rpw = env_or("THUMBUP_REDIS_ADMIN_PASSWORD", "thumbup-admin");
    let dc = |name: &str, db: u16, relay: &Relay, redis: char| {
        // One server, or the datacenter's nodes of the cluster.
        let redis = if t.cluster {
            let nodes: Vec<String> = cluster_half(redis).iter().map(|p| format!("\"redis://127.0.0.1:{p}\"")).collect();
            format!("url: {}, cluster: true, seeds: [{}], replica_acks: 1", nodes[0], nodes[1..].join(", "))
        } else {
            format!("url: \"redis://127.0.0.1:{}\"", redis_port(redis))
        };
        format!(
            "  - name: {name}\n    db: {{ url: \"mysql://127.0.0.1:{db}\", admin_url: \"mysql://{}\", admin_username: thumbup_admin, admin_password: \"{pw}\" }}\n    redis: {{ {redis}, admin_username: default, admin_password: \"{rpw}\" }}\n",
            relay.addr
        )
    };
    format!(
        "active_datacenter: {active}\ndatacenters:\n{}{}failover:\n  probe_period_ms: {}\n  probe_timeout_ms: 1000\n  failure_threshold: {}\n  grace_period_ms: {}\n  catch_up_timeout_ms: 10000\n  redis_tier: {}\n",
        dc("dc-a", db_port('a'), relay_a, 'a'),
        dc("dc-b", db_port('b'), relay_b, 'b'),
        t.period_ms,
        t.threshold,
        t.grace_ms,
        t.redis_tier
    )
}

/// Tenant `name` whose DB is reached through `proxy`.
fn proxied_tenant(name: &str, proxy: &Proxy) -> String {
    tenant_yaml(name, &[1], "")
        .replace(&format!("mysql://127.0.0.1:{}", db_port('a')), &format!("mysql://{}", proxy.listen))
}

/// Clients that like, unlike, dislike and undislike until stopped.
struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Written>>,
}

#[derive(Default)]
struct Written {
    acked: Acked,
    ok: usize,
    refused: usize,
    unavailable: usize,
}

impl Writers {
    fn start(client: &Client, clients: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (c, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut out = Written::default();
                    while !stop.load(Ordering::Relaxed) {
                        let (mid, msg, action) = {
                            let mut rng = rand::rng();
                            let action = match rng.random_range(0..10) {
                                0..=4 => pb::Action::Like,
                                5..=6 => pb::Action::Unlike,
                                7..=8 => pb::Action::Dislike,
                                _ => pb::Action::Undislike,
                            };
                            (rng.random_range(1..=400), rng.random_range(1..=40), action)
                        };
                        match c.act(1, msg, mid, owner_of(msg), action).await {
                            Ok(r) => {
                                out.ok += 1;
                                keep_newest(&mut out.acked, (mid, 1, msg), (r.version, r.state));
                            }
                            Err(s) if s.code() == tonic::Code::FailedPrecondition => out.refused += 1,
                            // Allowed across a flip: fail fast, nothing written.
                            Err(s) if s.code() == tonic::Code::Unavailable => out.unavailable += 1,
                            Err(s) => panic!("unexpected status for {action:?} by {mid} on {msg}: {s:?}"),
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    out
                })
            })
            .collect();
        Writers { stop, tasks }
    }

    async fn stop(self) -> Written {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Written::default();
        for t in self.tasks {
            let o = t.await.expect("writer");
            all.ok += o.ok;
            all.refused += o.refused;
            all.unavailable += o.unavailable;
            for (k, v) in o.acked {
                keep_newest(&mut all.acked, k, v);
            }
        }
        all
    }
}

/// Invariants 1 and 2 on dc-b after the job has drained the stream.
async fn check_on_dc_b(client: &Client, t: &TenantConfig, acked: &Acked) -> Exactness {
    wait_drained(&Keys::new(&t.name, t.stream.shards), Duration::from_secs(90)).await;
    check_acked_and_states_at(&admin_url('b'), client, t, acked).await;
    check_exact_at(&admin_url('b'), t).await
}

fn replayed_total() -> u64 {
    prometheus::gather()
        .iter()
        .find(|f| f.name() == "thumbup_operator_failover_replayed_transitions_total")
        .and_then(|f| f.get_metric().first().map(|m| m.get_counter().get_value() as u64))
        .unwrap_or(0)
}

/// `@@gtid_binlog_pos` of datacenter `dc`'s MariaDB.
async fn binlog_pos(dc: char) -> String {
    let mut con = MySqlConnection::connect(&admin_url(dc)).await.expect("admin connection");
    sqlx::query_scalar("SELECT @@gtid_binlog_pos").fetch_one(&mut con).await.expect("binlog position")
}

/// The GTID position a replica has received (`Gtid_IO_Pos`).
async fn received_pos(dc: char) -> String {
    use sqlx::Row;
    let mut con = MySqlConnection::connect(&admin_url(dc)).await.expect("admin connection");
    let row = sqlx::raw_sql("SHOW SLAVE STATUS").fetch_one(&mut con).await.expect("replica status");
    row.try_get::<String, _>("Gtid_IO_Pos").expect("Gtid_IO_Pos")
}

/// The sequence number of domain 0 in a GTID list (`0-1-529,...`).
fn gtid_seq(list: &str) -> u64 {
    list.split(',')
        .filter_map(|g| {
            let mut parts = g.trim().split('-');
            (parts.next()? == "0").then_some(())?;
            parts.nth(1)?.parse().ok()
        })
        .max()
        .unwrap_or(0)
}

async fn set_io_thread(dc: char, running: bool) {
    let mut con = MySqlConnection::connect(&admin_url(dc)).await.expect("admin connection");
    let sql = if running { "START SLAVE IO_THREAD" } else { "STOP SLAVE IO_THREAD" };
    sqlx::raw_sql(sql).execute(&mut con).await.expect("replication control");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unplanned_failover_flips_within_10s_and_loses_no_acknowledged_like() {
    let _serial = SERIAL.lock().await;
    for run in 1..=3 {
        let test = format!("fo-unplanned-{run}");
        let mut site = Site::start(&test, defaults(), world_dir(&test).join("config.yaml")).await;
        let name = format!("fo-unplanned-{run}");
        let w = World::start(&test, &proxied_tenant(&name, &site.proxy)).await;
        let t = w.tenant(&name).clone();
        let mut job = w.job(&name, 200);
        let client = w.client_of(&name).await;
        let writers = Writers::start(&client, 16);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let replayed_before = replayed_total();
        let mut unshipped = 0;
        if run >= 2 {
            // Replication lags: dc-b receives nothing of the last second
            // before the crash. Only the stream replay can bring it back.
            set_io_thread('b', false).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            unshipped = gtid_seq(&binlog_pos('a').await) - gtid_seq(&received_pos('b').await);
            assert!(unshipped > 0, "run {run}: the job committed nothing on dc-a while replication was stopped");
        }
        let killed = Instant::now();
        let killed_at = jiff::Timestamp::now();
        stack(&["kill", "mariadb", "a"]);
        let flipped = site.wait_epoch(2, Duration::from_secs(30)).await;
        let flip = flipped - killed;
        site.proxy.wait_epoch(2, Duration::from_secs(5)).await;
        let adopted = killed.elapsed();
        println!(
            "run {run}: route flipped to dc-b {flip:?} after the SIGKILL; the proxy held epoch 2 after {adopted:?}"
        );
        assert!(flip < Duration::from_secs(10), "run {run}: the flip took {flip:?}");
        let route = site.route();
        assert_eq!(route.active_datacenter, "dc-b");
        let last = route.failover.last_transition.clone().expect("last transition recorded");
        assert_eq!(
            (last.kind, last.from.as_str(), last.to.as_str(), last.epoch),
            (TransitionKind::Failover, "dc-a", "dc-b", 2)
        );
        println!("run {run}: killed at {killed_at}; the controller flipped at {}: {}", last.at, last.reason);
        let notice = site.notice("Failover", Duration::from_secs(30)).await;
        assert!(notice.warning && notice.message.contains("dc-a to dc-b"), "{notice:?}");
        site.wait_promoted(Duration::from_secs(30)).await;

        // Like succeeds after the flip, and is kept with the rest.
        let mut extra = Acked::new();
        let r = client.act(1, 1, 1_000_001, owner_of(1), pb::Action::Like).await.expect("Like after the flip");
        keep_newest(&mut extra, (1_000_001, 1, 1), (r.version, r.state));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut written = writers.stop().await;
        for (k, v) in extra {
            keep_newest(&mut written.acked, k, v);
        }
        let ex = check_on_dc_b(&client, &t, &written.acked).await;
        let replayed = replayed_total() - replayed_before;
        println!(
            "run {run}: {} acknowledged ({} refused, {} UNAVAILABLE) over {} records, all on dc-b; at least {unshipped} \
             transactions committed on dc-a never reached dc-b; the replay applied {replayed} writes dc-b did not have \
             (unreplicated, or not yet applied by the job); {} counts rows and {} likes exact on dc-b, {} cached counts equal",
            written.ok,
            written.refused,
            written.unavailable,
            written.acked.len(),
            ex.items,
            ex.likes,
            ex.cached_counts
        );
        assert!(written.ok > 1000, "run {run}: too little load to mean anything: {}", written.ok);

        if run == 1 {
            // Fencing: dc-a comes back writable and is fenced by the controller.
            stack(&["start", "mariadb", "a"]);
            let back = Instant::now();
            let deadline = back + Duration::from_secs(15);
            while read_only('a').await != Some(true) {
                assert!(Instant::now() < deadline, "dc-a came back and was never fenced");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!("dc-a fenced {:?} after it came back", back.elapsed());
            // A proxy still holding epoch 1 sends the tenant's session to dc-a,
            // where the write is refused.
            let stale_route = site.dir.join("stale-route.yaml");
            let mut old = route.clone();
            old.epoch = 1;
            old.active_datacenter = "dc-a".into();
            std::fs::write(&stale_route, old.to_yaml()).unwrap();
            let stale = Proxy::start(&site.dir, "stale-proxy", &stale_route);
            stale.wait_epoch(1, Duration::from_secs(5)).await;
            let url = format!("mysql://{}:{}@{}/{}", t.db.username, t.db.password, stale.listen, t.schema());
            let mut con = MySqlConnection::connect(&url).await.expect("tenant session through the stale proxy");
            let err = sqlx::query(
                "INSERT INTO like_records (mid, business_id, message_id, up_mid, state, version, mtime) \
                 VALUES (7, 1, 7, 7, 1, 1, 1)",
            )
            .execute(&mut con)
            .await
            .expect_err("a write to the fenced dc-a must be refused");
            let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.to_string());
            assert!(err.to_string().contains("read-only") || err.to_string().contains("1290"), "{err} ({code:?})");
            // And the live proxy refuses the old epoch.
            let (status, body) = http(site.proxy.admin, "PUT", "/route", &old.to_yaml()).await;
            assert_eq!(status, 409, "stale route accepted: {body}");
            assert_eq!(site.proxy.epoch().await, 2);
        }

        assert!(job.terminate(), "job exits cleanly");
        w.stop().await;
        site.stop().await;
        restore_stack();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_flapping_below_threshold_or_grace_and_no_second_flip_inside_the_cap_window() {
    let _serial = SERIAL.lock().await;
    let test = "fo-flapping";
    let mut site = Site::start(test, QUICK, world_dir(test).join("config.yaml")).await;
    let period = Duration::from_millis(QUICK.period_ms);

    // One failure fewer than the threshold.
    site.relay_a.refuse_next(QUICK.threshold as i64 - 1);
    tokio::time::sleep(period * 8).await;
    assert_eq!(site.relay_a.refused(), QUICK.threshold as u64 - 1, "the probes did not fail as arranged");
    let r = site.route();
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (1, "dc-a"), "flipped below the threshold");
    assert!(r.failover.failing_since.is_none(), "failingSince not cleared: {r:?}");

    // Enough failures, but shorter than the grace period.
    let before = site.relay_a.refused();
    site.relay_a.refuse_all();
    tokio::time::sleep(period * 4).await;
    site.relay_a.heal();
    let failed = site.relay_a.refused() - before;
    tokio::time::sleep(period * 6).await;
    assert!(failed >= QUICK.threshold as u64, "only {failed} probes failed");
    assert_eq!(site.route().epoch, 1, "flipped on {failed} failures spanning less than the grace period");
    println!(
        "no flip: {} failures (threshold {}), then {failed} failures within {:?} (grace {} ms)",
        QUICK.threshold - 1,
        QUICK.threshold,
        period * 4,
        QUICK.grace_ms
    );

    // A real outage past the grace period flips once.
    site.relay_a.refuse_all();
    site.wait_epoch(2, Duration::from_secs(15)).await;
    site.wait_promoted(Duration::from_secs(15)).await;
    site.relay_a.heal();
    assert_eq!(site.route().active_datacenter, "dc-b");
    // dc-a was still writable behind the refusing relay: once it is reachable
    // again the controller fences it, ending every session but its own. Let
    // that finish before the reseed opens sessions on it, or the fence ends
    // them too.
    let deadline = Instant::now() + Duration::from_secs(15);
    while read_only('a').await != Some(true) {
        assert!(Instant::now() < deadline, "dc-a came back and was never fenced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(period * 3).await;

    // dc-a becomes a healthy standby of dc-b; then dc-b fails inside the cap window.
    stack(&["reseed", "b", "a"]);
    assert!(replication_threads('a').await.1, "dc-a should be a healthy standby of dc-b, so that only the cap blocks");
    site.relay_b.refuse_all();
    let n = site.notice("FailoverCapReached", Duration::from_secs(15)).await;
    assert!(n.warning, "{n:?}");
    tokio::time::sleep(period * 4).await;
    let r = site.route();
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (2, "dc-b"), "a second flip inside the cap window");
    let blocked = r.failover.blocked.clone().expect("status says why there is no flip");
    assert_eq!(blocked.reason, "FailoverCapReached");
    assert!(blocked.message.contains("cap 1"), "{}", blocked.message);
    println!("second failure inside the cap window: no flip; status: {}: {}", blocked.reason, blocked.message);
    site.relay_b.heal();
    site.stop().await;
    restore_stack();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_standby_down_there_is_no_flip_and_status_says_why() {
    let _serial = SERIAL.lock().await;
    let test = "fo-standby-down";
    let mut site = Site::start(test, QUICK, world_dir(test).join("config.yaml")).await;
    stack(&["kill", "mariadb", "b"]);
    site.relay_a.refuse_all();
    let n = site.notice("StandbyUnhealthy", Duration::from_secs(15)).await;
    assert!(n.warning && n.message.contains("dc-b"), "{n:?}");
    tokio::time::sleep(Duration::from_millis(QUICK.period_ms * 4)).await;
    let r = site.route();
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (1, "dc-a"), "flipped to a dead standby");
    let blocked = r.failover.blocked.clone().expect("status says why");
    assert_eq!(blocked.reason, "StandbyUnhealthy");
    assert!(r.failover.failing_since.is_some());
    println!("standby down: no flip; status: {}: {}", blocked.reason, blocked.message);
    // dc-a answers again: the block clears.
    site.relay_a.heal();
    tokio::time::sleep(Duration::from_millis(QUICK.period_ms * 3)).await;
    let r = site.route();
    assert!(r.failover.blocked.is_none() && r.failover.failing_since.is_none(), "{r:?}");
    site.stop().await;
    restore_stack();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_switchover_loses_no_write_and_pauses_db_writes_under_5s() {
    let _serial = SERIAL.lock().await;
    let test = "fo-switchover";
    let name = "fo-switchover";
    let site = Site::start(test, QUICK, world_dir(test).join("config.yaml")).await;
    let w = World::start(test, &proxied_tenant(name, &site.proxy)).await;
    let t = w.tenant(name).clone();
    // A DB writer through the proxy, as the tenant: its longest gap between
    // two acknowledged inserts is the write pause.
    {
        let mut admin = admin_db_at(&admin_url('a'), &t).await;
        sqlx::raw_sql("CREATE TABLE pause_probe (id BIGINT PRIMARY KEY)").execute(&mut admin).await.unwrap();
    }
    let url = format!("mysql://{}:{}@{}/{}", t.db.username, t.db.password, site.proxy.listen, t.schema());
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut longest = Duration::ZERO;
            let mut last = Instant::now();
            let mut con: Option<MySqlConnection> = None;
            let mut id = 0i64;
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                if con.is_none() {
                    con = MySqlConnection::connect(&url).await.ok();
                }
                let ok = match con.as_mut() {
                    Some(c) => sqlx::query("INSERT INTO pause_probe (id) VALUES (?)").bind(id).execute(c).await.is_ok(),
                    None => false,
                };
                if ok {
                    acked.push(id);
                    longest = longest.max(last.elapsed());
                    last = Instant::now();
                } else {
                    con = None;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (acked, longest)
        })
    };
    let mut job = w.job(name, 200);
    let client = w.client_of(name).await;
    let writers = Writers::start(&client, 16);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let relay_a = &site.relay_a;
    let relay_b = &site.relay_b;
    std::fs::write(&site.op_config, operator_yaml("dc-b", relay_a, relay_b, &QUICK)).unwrap();
    let asked = Instant::now();
    site.wait_epoch(2, Duration::from_secs(20)).await;
    site.wait_promoted(Duration::from_secs(20)).await;
    println!("switchover dc-a -> dc-b done {:?} after the config change", asked.elapsed());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = writers.stop().await;
    stop.store(true, Ordering::Relaxed);
    let (probe_acked, pause) = prober.await.unwrap();
    let r = site.route();
    let last = r.failover.last_transition.clone().unwrap();
    assert_eq!((last.kind, r.active_datacenter.as_str()), (TransitionKind::Switchover, "dc-b"));
    assert_eq!(read_only('a').await, Some(true), "the old primary stays fenced");
    assert_eq!(read_only('b').await, Some(false), "the new primary takes writes");

    let ex = check_on_dc_b(&client, &t, &written.acked).await;
    let mut b = admin_db_at(&admin_url('b'), &t).await;
    let on_b: Vec<i64> = sqlx::query_scalar("SELECT id FROM pause_probe ORDER BY id").fetch_all(&mut b).await.unwrap();
    let missing: Vec<_> = probe_acked.iter().filter(|id| on_b.binary_search(id).is_err()).collect();
    assert!(missing.is_empty(), "{} acknowledged DB writes missing on dc-b: {missing:?}", missing.len());
    println!(
        "switchover: DB write pause {pause:?}; {} DB writes and {} likes acknowledged ({} UNAVAILABLE), none lost; \
         {} counts rows exact on dc-b",
        probe_acked.len(),
        written.ok,
        written.unavailable,
        ex.items
    );
    assert!(pause < Duration::from_secs(5), "write pause {pause:?}");
    assert!(job.terminate());
    w.stop().await;
    site.stop().await;
    restore_stack();
}

/// Tenant `name` whose DB and Redis are both reached through `proxy`, and
/// whose likes wait for dc-b's Redis (the replica) before they are
/// acknowledged (the default wait, 200 ms).
fn two_tier_tenant(name: &str, proxy: &Proxy) -> String {
    proxied_tenant(name, proxy)
        .replace(&format!("redis://127.0.0.1:{}", redis_port('a')), &format!("redis://{}", proxy.redis))
        .replace(&format!("password: pw-{name}-redis }}"), &format!("password: pw-{name}-redis, replica_acks: 1 }}"))
}

/// Writers and readers with their successes counted per second, and every
/// acknowledged like kept.
struct Load {
    stop: Arc<AtomicBool>,
    started: Instant,
    /// Acknowledged likes per second since `started`.
    ok_per_sec: Arc<Vec<AtomicU64>>,
    writers: Vec<tokio::task::JoinHandle<Written>>,
    readers: Vec<tokio::task::JoinHandle<(u64, u64)>>,
}

impl Load {
    fn start(client: &Client, writers: usize, readers: usize) -> Load {
        Load::across(client, client, Arc::new(AtomicBool::new(false)), writers, readers)
    }

    /// Half the writers and readers go to `a` (dc-a's instance) and half to
    /// `b`, until `a_lost` is set: then all go to `b`, as the clients'
    /// load balancer would send them once dc-a is dark. A call to `a` that
    /// fails once `a_lost` is set is not acknowledged, whatever its status.
    fn across(a: &Client, b: &Client, a_lost: Arc<AtomicBool>, writers: usize, readers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let ok_per_sec: Arc<Vec<AtomicU64>> = Arc::new((0..600).map(|_| AtomicU64::new(0)).collect());
        let writers = (0..writers)
            .map(|i| {
                let (a, b, lost) = (a.clone(), b.clone(), a_lost.clone());
                let (stop, per_sec) = (stop.clone(), ok_per_sec.clone());
                tokio::spawn(async move {
                    let mut out = Written::default();
                    let mut n: i64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        // Fresh records mostly (a new like each), some flips
                        // of a user's own earlier ones.
                        n += 1;
                        let mid = 10_000 + i as i64 * 1_000_000 + n;
                        let msg = 1 + n % 50;
                        let action = if n % 5 == 0 { pb::Action::Dislike } else { pb::Action::Like };
                        let to_a = i % 2 == 0 && !lost.load(Ordering::Relaxed);
                        let c = if to_a { &a } else { &b };
                        match c.act(1, msg, mid, owner_of(msg), action).await {
                            Ok(r) => {
                                out.ok += 1;
                                keep_newest(&mut out.acked, (mid, 1, msg), (r.version, r.state));
                                let sec = started.elapsed().as_secs() as usize;
                                if let Some(b) = per_sec.get(sec) {
                                    b.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(s)
                                if s.code() == tonic::Code::Unavailable || (to_a && lost.load(Ordering::Relaxed)) =>
                            {
                                out.unavailable += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(s) => panic!("unexpected status for {action:?} by {mid} on {msg}: {s:?}"),
                        }
                    }
                    out
                })
            })
            .collect();
        let readers = (0..readers)
            .map(|i| {
                let (a, b, lost, stop) = (a.clone(), b.clone(), a_lost.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut n = i as i64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let msgs: Vec<i64> = (0..5).map(|k| 1 + (n * 7 + k) % 50).collect();
                        let c = if i % 2 == 0 && !lost.load(Ordering::Relaxed) { &a } else { &b };
                        match c.counts(1, &msgs).await {
                            Ok(_) => ok += 1,
                            Err(_) => {
                                failed += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, started, ok_per_sec, writers, readers }
    }

    /// Acknowledged likes per second over whole seconds `from..to` after the start.
    fn rate(&self, from: Duration, to: Duration) -> f64 {
        let (a, b) = (from.as_secs() as usize, to.as_secs() as usize);
        let n: u64 = self.ok_per_sec[a..b].iter().map(|c| c.load(Ordering::Relaxed)).sum();
        n as f64 / (b - a) as f64
    }

    async fn stop(self) -> (Written, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Written::default();
        for t in self.writers {
            let o = t.await.expect("writer");
            all.ok += o.ok;
            all.unavailable += o.unavailable;
            for (k, v) in o.acked {
                keep_newest(&mut all.acked, k, v);
            }
        }
        let (mut ok, mut failed) = (0, 0);
        for t in self.readers {
            let (o, f) = t.await.expect("reader");
            ok += o;
            failed += f;
        }
        (all, ok, failed)
    }
}

/// A counter of this process's registry (the service runs in-process).
fn counter(name: &str, labels: &[(&str, &str)]) -> u64 {
    prometheus::gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| labels.iter().all(|(k, v)| m.get_label().iter().any(|l| l.name() == *k && l.value() == *v)))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// How the two datacenters' Redis tier is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RedisLayout {
    /// One server each, dc-b's a replica of dc-a's, reached through the
    /// proxy; each service instance reads from its own datacenter's.
    Servers,
    /// The stack's Redis Cluster spanning both: dc-a's three nodes the
    /// masters, each with its replica among dc-b's three.
    Cluster,
}

/// Puts the stack's Redis Cluster back whole (every node running, dc-a's
/// half the masters), also when a scenario fails halfway.
struct RestoreCluster;

impl Drop for RestoreCluster {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            // Every node at once (one at a time waits for a cluster that
            // may need the others).
            stack(&["cluster-up"]);
            stack(&["cluster-split", "a"]);
        });
    }
}

/// The ports of the cluster's masters that serve slots (`stack.sh cluster-masters`).
fn cluster_masters() -> Vec<u16> {
    let out = Command::new("bash")
        .arg(thumbup_test_support::stack::root().join("scripts/stack.sh"))
        .arg("cluster-masters")
        .output()
        .expect("stack.sh cluster-masters");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_datacenter_outage_flips_both_tiers_and_loses_no_acknowledged_like_even_with_its_disks_gone() {
    let _serial = SERIAL.lock().await;
    let runs: u32 = std::env::var("THUMBUP_E2E_DC_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(6);
    whole_datacenter_outage(RedisLayout::Servers, runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_whole_datacenter_outage_with_a_redis_cluster_spanning_both_moves_every_slot_and_loses_no_acknowledged_like()
{
    let _serial = SERIAL.lock().await;
    let _cluster = cluster_mode_scope();
    let runs: u32 = std::env::var("THUMBUP_E2E_DC_CLUSTER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    whole_datacenter_outage(RedisLayout::Cluster, runs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_master_lost_alone_in_a_cluster_spanning_both_moves_to_dc_b_and_back_with_nothing_lost() {
    let _serial = SERIAL.lock().await;
    let _cluster = cluster_mode_scope();
    let _restore = RestoreTiers;
    let _restore_cluster = RestoreCluster;
    stack(&["cluster-split", "a"]);
    let test = "fo-dc-cluster-one";
    let timing = Timing { redis_tier: true, cluster: true, ..QUICK };
    let site = Site::start(test, timing, world_dir(test).join("config.yaml")).await;
    let w = World::start(test, &proxied_tenant(test, &site.proxy)).await;
    let t = w.tenant(test).clone();
    let mut job = w.job_named(test, 500, "job-dc-a");
    let client = w.client_of(test).await;
    let load = Load::start(&client, 16, 16);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = load.rate(Duration::from_secs(1), Duration::from_secs(4));

    // One of dc-a's masters dies alone: the cluster's own failover promotes
    // its replica, a dc-b node without a replica of its own, so the
    // controller sets the solo flags (its likes would wait in vain).
    let lost = cluster_half('a')[0];
    let killed_at = load.started.elapsed();
    stack(&["cluster-kill", &lost.to_string()]);
    tokio::time::sleep(Duration::from_secs(16)).await;
    let k = killed_at.as_secs() + 1;
    let per_sec: Vec<u64> = (k..k + 15).map(|s| load.ok_per_sec[s as usize].load(Ordering::Relaxed)).collect();
    let recovered =
        (k..k + 15).find(|s| load.rate(Duration::from_secs(*s), Duration::from_secs(s + 1)) >= 0.8 * before);
    let masters = cluster_masters();
    assert_eq!(site.route().epoch, 1, "one Redis master is not a datacenter: no flip");
    assert!(
        masters.iter().any(|p| cluster_half('b').contains(p)),
        "the cluster's own failover moved the lost master's slots to dc-b: {masters:?}"
    );
    let recovered =
        recovered.unwrap_or_else(|| panic!("never back to 80% of {before:.0}/s after the master's loss: {per_sec:?}"));
    assert!(recovered + 1 - killed_at.as_secs() <= 15, "back to 80% only {recovered} s in: {per_sec:?}");

    // It comes back as the dc-b node's replica; the controller hands the
    // slots back to it (coordinated CLUSTER FAILOVER, nothing lost).
    stack(&["cluster-start", &lost.to_string()]);
    let started = Instant::now();
    let back = wait_until(Duration::from_secs(30), Duration::from_millis(200), || async {
        let m = cluster_masters();
        if m == cluster_half('a') { Ok(m) } else { Err(format!("the masters are {m:?}")) }
    })
    .await;
    let handed_back = started.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (written, reads_ok, reads_failed) = load.stop().await;
    wait_drained(&Keys::new(&t.name, t.stream.shards), Duration::from_secs(90)).await;
    check_acked_and_states_at(&admin_url('a'), &client, &t, &written.acked).await;
    let ex = check_exact_at(&admin_url('a'), &t).await;
    println!(
        "one dc-a master ({lost}) lost alone: no flip; likes/s before {before:.0}, per second after {per_sec:?}, \
         back to 80% in second {} after; the slots back on dc-a's nodes {back:?} {handed_back:?} after it restarted; \
         {} likes acknowledged ({} UNAVAILABLE), all {} records with their newest state; reads {reads_ok} ok, \
         {reads_failed} failed; {} counts rows and {} likes exact",
        recovered - killed_at.as_secs(),
        written.ok,
        written.unavailable,
        written.acked.len(),
        ex.items,
        ex.likes
    );
    assert!(written.ok > 1000, "too little load to mean anything: {}", written.ok);
    assert!(job.terminate(), "the job exits cleanly");
    w.stop().await;
    site.stop().await;
}

/// The whole-datacenter outage, `runs` times: 16 writers of fresh likes and
/// 16 readers, half through dc-a's service instance (a process) and half
/// through dc-b's (in-process), the jobs of both datacenters running;
/// dc-a's MariaDB, its Redis (every node of it) and its service instance
/// killed with one `kill -KILL`, its job with them; on even runs dc-a's data
/// deleted before it rejoins.
async fn whole_datacenter_outage(layout: RedisLayout, runs: u32) {
    let _restore = RestoreTiers;
    let _restore_cluster = (layout == RedisLayout::Cluster).then_some(RestoreCluster);
    let tag = if layout == RedisLayout::Cluster { "cluster-" } else { "" };
    for run in 1..=runs {
        // Odd runs: dc-a's servers are only killed. Even runs: their data
        // is deleted after the kill (the datacenter is lost with its disks).
        let wipe = run % 2 == 0;
        match layout {
            RedisLayout::Servers => {
                stack(&["redis-follow", "a", "none"]);
                stack(&["redis-follow", "b", "a"]);
            }
            RedisLayout::Cluster => stack(&["cluster-split", "a"]),
        }
        let test = format!("fo-dc-{tag}{run}");
        let timing = Timing { redis_tier: true, cluster: layout == RedisLayout::Cluster, ..defaults() };
        let site = Site::start(&test, timing, world_dir(&test).join("config.yaml")).await;
        let route = site.route();
        match layout {
            RedisLayout::Servers => {
                assert_eq!(route.active_redis_address(), Some(format!("127.0.0.1:{}", redis_port('a')).as_str()))
            }
            // The clients speak to the cluster itself: no Redis address in the route.
            RedisLayout::Cluster => {
                assert!(route.redis.is_empty(), "{route:?}");
                assert_eq!(cluster_masters(), cluster_half('a'), "dc-a's nodes are the masters");
            }
        }
        let name = test.clone();
        // Each datacenter has its own service instance, writing through the
        // proxy (and, with one Redis server each, reading from its own
        // servers): dc-b's runs in-process (its metrics are this process's),
        // dc-a's is a process killed with dc-a's servers.
        let (tenant_b, tenant_a) = match layout {
            RedisLayout::Servers => {
                let tenant = two_tier_tenant(&name, &site.proxy);
                (with_local_reads(&tenant, 'b'), with_local_reads(&tenant, 'a'))
            }
            // Every node of the cluster as a seed, a like waiting for its
            // master's replica (test-support's cluster tenant).
            RedisLayout::Cluster => {
                let tenant = proxied_tenant(&name, &site.proxy);
                let acks = std::env::var("THUMBUP_E2E_REPLICA_ACKS").unwrap_or_else(|_| "1".into());
                assert!(tenant.contains(&format!("replica_acks: {acks}")), "{tenant}");
                (tenant.clone(), tenant)
            }
        };
        let w = World::start(&test, &tenant_b).await;
        let t = w.tenant(&name).clone();
        if layout == RedisLayout::Servers {
            // The tenant's ACL user on dc-b's Redis (ACL users do not
            // replicate; provisioning a cluster reaches every node).
            thumbup_core::provision::provision_redis(&thumbup_test_support::stack::admin_redis_url_b(), &t)
                .await
                .expect("the tenant's user on dc-b's Redis");
        }
        let a_config = w.dir.join("dc-a.yaml");
        std::fs::write(&a_config, format!("tenants:\n{tenant_a}")).unwrap();
        let mut svc_a = ServiceProcess::start(&w.dir, "service-dc-a", &a_config).await;
        let mut job_a = w.job_named(&name, 500, "job-dc-a");
        let mut job_b = w.job_named(&name, 500, "job-dc-b");
        let client = w.client_of(&name).await;
        let client_a = svc_a.client(&name, &format!("tok-{name}-0001")).await;
        let a_lost = Arc::new(AtomicBool::new(false));
        let load = Load::across(&client_a, &client, a_lost.clone(), 16, 16);
        tokio::time::sleep(Duration::from_secs(6)).await;
        let before = load.rate(Duration::from_secs(2), Duration::from_secs(6));
        let degraded_before = counter("thumbup_service_degraded_writes_total", &[("tenant", &name)]);

        // dc-a goes dark: its MariaDB, its Redis, its service instance and
        // its job, at once. One kill(1) for the servers and the service
        // (stack.sh's kills take its lock one after the other), then the
        // job; stack.sh then waits for them. The clients of dc-a's instance
        // move to dc-b's.
        let redis_pids: Vec<u32> = match layout {
            RedisLayout::Servers => vec![server_pid("redis", "a").expect("redis-a has no pid file")],
            RedisLayout::Cluster => cluster_half('a')
                .into_iter()
                .map(|p| cluster_node_pid(p).unwrap_or_else(|| panic!("cluster node {p} has no pid file")))
                .collect(),
        };
        let mut pids: Vec<String> = redis_pids.iter().map(u32::to_string).collect();
        pids.push(server_pid("mariadb", "a").expect("mariadb-a has no pid file").to_string());
        pids.push(svc_a.pid().to_string());
        a_lost.store(true, Ordering::Relaxed);
        let killed = Instant::now();
        let status = Command::new("kill").arg("-KILL").args(&pids).status().expect("kill");
        assert!(status.success(), "kill -KILL {pids:?}");
        job_a.kill();
        svc_a.kill();
        stack(&["kill", "mariadb", "a"]);
        match layout {
            RedisLayout::Servers => stack(&["kill", "redis", "a"]),
            RedisLayout::Cluster => {
                for p in cluster_half('a') {
                    stack(&["cluster-kill", &p.to_string()]);
                }
            }
        }
        let killed_at = load.started.elapsed();
        let flipped = site.wait_epoch(2, Duration::from_secs(30)).await;
        let flip = flipped - killed;
        site.proxy.wait_epoch(2, Duration::from_secs(5)).await;
        let route = site.route();
        assert_eq!(route.active_datacenter, "dc-b");
        match layout {
            RedisLayout::Servers => {
                assert_eq!(route.active_redis_address(), Some(format!("127.0.0.1:{}", redis_port('b')).as_str()))
            }
            // Every slot moved to dc-b's nodes before the route named dc-b.
            RedisLayout::Cluster => assert_eq!(cluster_masters(), cluster_half('b'), "dc-b's nodes took every slot"),
        }
        let counts_hit = || counter("thumbup_service_cache_lookups_total", &[("cache", "counts"), ("result", "hit")]);
        let counts_miss = || counter("thumbup_service_cache_lookups_total", &[("cache", "counts"), ("result", "miss")]);
        let (hit0, miss0) = (counts_hit(), counts_miss());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (hits, misses) = (counts_hit() - hit0, counts_miss() - miss0);
        let wait_until = killed + Duration::from_secs(20);
        tokio::time::sleep(wait_until.saturating_duration_since(Instant::now())).await;
        let degraded = counter("thumbup_service_degraded_writes_total", &[("tenant", &name)]) - degraded_before;
        // The first whole second after the kill at 80% of the rate before.
        let k = killed_at.as_secs() + 1;
        let recovered =
            (k..k + 19).find(|s| load.rate(Duration::from_secs(*s), Duration::from_secs(s + 1)) >= 0.8 * before);
        let per_sec: Vec<u64> = (k..k + 19).map(|s| load.ok_per_sec[s as usize].load(Ordering::Relaxed)).collect();
        let (written, reads_ok, reads_failed) = load.stop().await;
        let ratio = hits as f64 / (hits + misses).max(1) as f64;
        println!(
            "run {run} ({layout:?}, {}): the route (DB and Redis) flipped {flip:?} after the SIGKILL; likes/s before \
             {before:.0}, per second after the kill {per_sec:?}; back to 80% in second {:?} after the kill; {degraded} \
             likes took the DB path; counts-cache hit ratio in the 10 s after the flip {ratio:.3} ({hits} hits, \
             {misses} misses); {} likes acknowledged, {} UNAVAILABLE; reads {reads_ok} ok, {reads_failed} failed",
            if wipe { "dc-a's data deleted" } else { "dc-a's data kept" },
            recovered.map(|s| s - killed_at.as_secs()),
            written.ok,
            written.unavailable,
        );
        assert!(flip < Duration::from_secs(10), "run {run}: the flip took {flip:?}");
        // Within 15 s of the kill, likes through dc-b's Redis at 80% of the
        // rate before; its counts cache warm.
        let recovered =
            recovered.unwrap_or_else(|| panic!("run {run}: never back to 80% of {before:.0}/s: {per_sec:?}"));
        assert!(recovered + 1 - killed_at.as_secs() <= 15, "run {run}: back to 80% only {recovered} s in: {per_sec:?}");
        assert!(ratio >= 0.9, "run {run}: counts-cache hit ratio {ratio:.3} in the 10 s after the flip");

        // dc-a rejoins as the standby of both tiers (from nothing on even
        // runs), with the controller still running: it clears the solo
        // flags once dc-a's Redis is linked.
        match layout {
            RedisLayout::Servers => {
                if wipe {
                    stack(&["wipe", "redis", "a"]);
                    stack(&["wipe", "mariadb", "a"]);
                }
                stack(&["rejoin", "a", "b"]);
            }
            // Each of dc-a's nodes starts again as a replica of the dc-b
            // node that took its slots (a wiped one: of a master without
            // a replica).
            RedisLayout::Cluster => {
                for p in cluster_half('a') {
                    if wipe {
                        stack(&["cluster-wipe", &p.to_string()]);
                    }
                }
                if wipe {
                    stack(&["wipe", "mariadb", "a"]);
                }
                stack(&["rejoin", "a", "b", "cluster"]);
                assert_eq!(cluster_masters(), cluster_half('b'), "dc-a's nodes rejoined as replicas");
            }
        }
        // dc-a's Redis now mirrors dc-b's: the drain and cache checks read it.
        let ex = check_on_dc_b(&client, &t, &written.acked).await;
        println!(
            "run {run} ({layout:?}): all {} acknowledged records on dc-b with their newest state; {} counts rows and \
             {} likes exact, {} cached counts equal",
            written.acked.len(),
            ex.items,
            ex.likes,
            ex.cached_counts
        );
        assert!(written.ok > 1000, "run {run}: too little load to mean anything: {}", written.ok);
        assert!(job_b.terminate(), "dc-b's job exits cleanly");
        w.stop().await;
        site.stop().await;
    }
}

/// Waits until `dc`'s Redis has `role` (and, for a replica, replicates
/// `master` with its link up).
async fn wait_redis_role(dc: char, role: &str, master: Option<char>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (r, port, up) = redis_role(dc).await;
        let ok = r == role && master.is_none_or(|m| port == Some(redis_port(m)) && up);
        if ok {
            return;
        }
        assert!(Instant::now() < deadline, "Redis {dc} is {r} (master port {port:?}, link up {up}), not {role}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_switchover_moves_both_tiers_with_zero_loss_and_switches_back() {
    let _serial = SERIAL.lock().await;
    planned_switchover(RedisLayout::Servers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_switchover_moves_every_slot_of_a_cluster_spanning_both_with_zero_loss_and_switches_back() {
    let _serial = SERIAL.lock().await;
    let _cluster = cluster_mode_scope();
    planned_switchover(RedisLayout::Cluster).await;
}

/// Both tiers to dc-b and back under 16 writers and 16 readers, nothing lost.
async fn planned_switchover(layout: RedisLayout) {
    let _restore = RestoreTiers;
    let _restore_cluster = (layout == RedisLayout::Cluster).then_some(RestoreCluster);
    let cluster = layout == RedisLayout::Cluster;
    match layout {
        RedisLayout::Servers => {
            stack(&["redis-follow", "a", "none"]);
            stack(&["redis-follow", "b", "a"]);
        }
        RedisLayout::Cluster => stack(&["cluster-split", "a"]),
    }
    let test = if cluster { "fo-dc-cluster-switch" } else { "fo-dc-switch" };
    let name = test;
    let timing = Timing { redis_tier: true, cluster, ..QUICK };
    let site = Site::start(test, timing, world_dir(test).join("config.yaml")).await;
    let tenant = if cluster { proxied_tenant(name, &site.proxy) } else { two_tier_tenant(name, &site.proxy) };
    let w = World::start(test, &tenant).await;
    let t = w.tenant(name).clone();
    if !cluster {
        thumbup_core::provision::provision_redis(&thumbup_test_support::stack::admin_redis_url_b(), &t)
            .await
            .expect("the tenant's user on dc-b's Redis");
    }
    let mut job_a = w.job_named(name, 500, "job-dc-a");
    let mut job_b = w.job_named(name, 500, "job-dc-b");
    let client = w.client_of(name).await;
    let load = Load::start(&client, 16, 16);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // dc-a -> dc-b.
    let (relay_a, relay_b) = (&site.relay_a, &site.relay_b);
    let quick = || Timing { redis_tier: true, cluster, ..QUICK };
    std::fs::write(&site.op_config, operator_yaml("dc-b", relay_a, relay_b, &quick())).unwrap();
    let asked = Instant::now();
    site.wait_epoch(2, Duration::from_secs(30)).await;
    site.wait_promoted(Duration::from_secs(30)).await;
    let to_b = asked.elapsed();
    let route = site.route();
    assert_eq!(route.failover.last_transition.as_ref().map(|l| l.kind), Some(TransitionKind::Switchover));
    assert_eq!(read_only('a').await, Some(true), "the old primary DB is fenced");
    let (redis_user, db_user) = (t.redis.username.as_str(), t.db.username.as_str());
    if cluster {
        // Every slot moved before the route named dc-b: no write of the
        // tenant can land on dc-a's nodes, replicas now.
        assert_eq!(cluster_masters(), cluster_half('b'), "dc-b's nodes serve every slot at the flip");
        let left = wait_until(Duration::from_secs(5), Duration::from_millis(100), || async {
            let on = db_sessions_of('a', db_user).await;
            let now = db_sessions_of('b', db_user).await;
            if on == 0 && now > 0 { Ok(now) } else { Err(format!("{on} DB sessions on dc-a, {now} on dc-b")) }
        })
        .await;
        println!("after the switchover to dc-b: every slot on dc-b's nodes, no DB session on dc-a, {left} on dc-b");
    } else {
        assert_eq!(route.active_redis_address(), Some(format!("127.0.0.1:{}", redis_port('b')).as_str()));
        wait_redis_role('b', "master", None, Duration::from_secs(5)).await;
        wait_redis_role('a', "slave", Some('b'), Duration::from_secs(20)).await;
        // No process of the tenant is left on dc-a's servers: the proxy
        // ended the service's and the jobs' sessions of both tiers, and
        // they are on dc-b's now.
        let left = wait_until(Duration::from_secs(5), Duration::from_millis(100), || async {
            let on = (redis_clients_of('a', redis_user).await, db_sessions_of('a', db_user).await);
            let now = (redis_clients_of('b', redis_user).await, db_sessions_of('b', db_user).await);
            if on == (0, 0) && now.0 > 0 && now.1 > 0 {
                Ok(now)
            } else {
                Err(format!(
                    "after the switchover to dc-b: {on:?} Redis connections and DB sessions on dc-a, {now:?} on dc-b"
                ))
            }
        })
        .await;
        println!("after the switchover to dc-b: no connection of the tenant on dc-a's servers, {left:?} on dc-b's");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // dc-a's DB rebuilt as dc-b's replica (its Redis already is one), then back.
    stack(&["reseed", "b", "a"]);
    std::fs::write(&site.op_config, operator_yaml("dc-a", relay_a, relay_b, &quick())).unwrap();
    let asked = Instant::now();
    site.wait_epoch(3, Duration::from_secs(30)).await;
    site.wait_promoted(Duration::from_secs(30)).await;
    let to_a = asked.elapsed();
    if cluster {
        assert_eq!(cluster_masters(), cluster_half('a'), "dc-a's nodes serve every slot again at the flip");
    } else {
        wait_redis_role('a', "master", None, Duration::from_secs(5)).await;
        wait_redis_role('b', "slave", Some('a'), Duration::from_secs(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (written, reads_ok, reads_failed) = load.stop().await;

    wait_drained(&Keys::new(&t.name, t.stream.shards), Duration::from_secs(90)).await;
    check_acked_and_states_at(&admin_url('a'), &client, &t, &written.acked).await;
    let ex = check_exact_at(&admin_url('a'), &t).await;
    println!(
        "switchover ({layout:?}) of both tiers to dc-b done {to_b:?} after the config change, back to dc-a {to_a:?} \
         after; {} likes acknowledged ({} UNAVAILABLE), all {} records on dc-a with their newest state; reads \
         {reads_ok} ok, {reads_failed} failed; {} counts rows and {} likes exact, {} cached counts equal",
        written.ok,
        written.unavailable,
        written.acked.len(),
        ex.items,
        ex.likes,
        ex.cached_counts
    );
    assert!(written.ok > 1000, "too little load to mean anything: {}", written.ok);
    job_a.kill();
    assert!(job_b.terminate(), "dc-b's job exits cleanly");
    w.stop().await;
    site.stop().await;
}

/// `tenant` (a [`tenant_yaml`] entry) with datacenter `dc`'s own Redis and
/// MariaDB for its reads (`local_reads`), as `dc`'s service instance has it.
fn with_local_reads(tenant: &str, dc: char) -> String {
    format!(
        "{tenant}    local_reads: {{ redis_url: \"redis://127.0.0.1:{}\", db_url: \"mysql://127.0.0.1:{}\" }}\n",
        redis_port(dc),
        db_port(dc)
    )
}

/// The stated staleness bound of dc-b's counts: how long after dc-a's
/// instance showed a count dc-b's instance shows it (docs/failover.md,
/// "dc-b serves reads"). States and lists have none: a like is
/// acknowledged once dc-b's Redis holds it.
const STALENESS_BOUND: Duration = Duration::from_secs(1);

/// Sorted samples' quantile `q` (0..=1).
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dc_b_serves_reads_from_its_own_servers_within_the_stated_staleness_bound() {
    let _serial = SERIAL.lock().await;
    let _restore = RestoreTiers;
    stack(&["redis-follow", "a", "none"]);
    stack(&["redis-follow", "b", "a"]);
    let test = "fo-dc-reads";
    let name = test;
    let site = Site::start(test, Timing { redis_tier: true, ..QUICK }, world_dir(test).join("config.yaml")).await;
    let tenant = two_tier_tenant(name, &site.proxy);
    // dc-a's instance: in-process, every read and write through the proxy
    // (dc-a is active).
    let w = World::start(test, &tenant).await;
    let t = w.tenant(name).clone();
    thumbup_core::provision::provision_redis(&thumbup_test_support::stack::admin_redis_url_b(), &t)
        .await
        .expect("the tenant's user on dc-b's Redis");
    // dc-b's instance: a process reading from dc-b's Redis (a replica of
    // dc-a's) and dc-b's MariaDB (a replica of dc-a's), writing through the
    // proxy to the active datacenter.
    let b_config = w.dir.join("dc-b.yaml");
    std::fs::write(&b_config, format!("tenants:\n{}", with_local_reads(&tenant, 'b'))).unwrap();
    let svc_b = ServiceProcess::start(&w.dir, "service-dc-b", &b_config).await;
    let mut job = w.job_named(name, 500, "job-dc-a");
    let token = format!("tok-{name}-0001");
    let a = w.client_of(name).await;
    let b = svc_b.client(name, &token).await;
    let (redis_user, db_user) = (t.redis.username.clone(), t.db.username.clone());

    for run in 1..=3u32 {
        let stop = Arc::new(AtomicBool::new(false));
        // Writers: likes of fresh users on this run's items, half through
        // each instance; each acknowledged like is then read through dc-b's
        // instance until it shows (its state, and every 10th its list).
        let writers: Vec<_> = (0..8i64)
            .map(|i| {
                let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
                tokio::spawn(async move {
                    let via = if i % 2 == 0 { &a } else { &b };
                    let mut seen = Vec::new();
                    let mut n = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mid = 5_000_000 + i64::from(run) * 1_000_000 + i * 100_000 + n;
                        let msg = 1_000 * i64::from(run) + n % 20;
                        let r = via.act(1, msg, mid, owner_of(msg), pb::Action::Like).await.expect("a like");
                        // Acknowledged means dc-b's Redis holds it (the
                        // WAIT): dc-b's first read must show it.
                        let asked = Instant::now();
                        let s = b.states(1, mid, &[msg]).await.expect("GetStates on dc-b");
                        let listed = n % 10 != 0
                            || b.user_likes(1, mid, 50).await.expect("ListUserLikes on dc-b").contains(&msg);
                        assert!(
                            s.get(&msg) == Some(&r.state) && listed,
                            "run {run}: dc-b's first read after the like of {mid} on {msg} was acknowledged does \
                             not show it (state {s:?}, listed {listed})"
                        );
                        seen.push(asked.elapsed());
                    }
                    seen
                })
            })
            .collect();
        // A sampler: a count dc-a's instance shows, then how long until
        // dc-b's shows at least as much (the items only gain likes).
        let sampler = {
            let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
            tokio::spawn(async move {
                let mut lags = Vec::new();
                let mut k = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let msg = 1_000 * i64::from(run) + k % 20;
                    let on_a = a.counts(1, &[msg]).await.expect("GetCounts on dc-a")[&msg].0;
                    let asked = Instant::now();
                    loop {
                        let on_b = b.counts(1, &[msg]).await.expect("GetCounts on dc-b")[&msg].0;
                        if on_b >= on_a {
                            break;
                        }
                        let late = asked.elapsed();
                        assert!(
                            late < STALENESS_BOUND,
                            "run {run}: dc-b shows {on_b} likes of {msg} {late:?} after dc-a showed {on_a}"
                        );
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    lags.push(asked.elapsed());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                lags
            })
        };
        tokio::time::sleep(Duration::from_secs(8)).await;
        // dc-b's instance reads from dc-b's servers, not through the proxy.
        let (on_b_redis, on_b_db) = (redis_clients_of('b', &redis_user).await, db_sessions_of('b', &db_user).await);
        stop.store(true, Ordering::Relaxed);
        let mut states = Vec::new();
        for wr in writers {
            states.extend(wr.await.expect("writer"));
        }
        let likes = states.len();
        let mut counts = sampler.await.expect("sampler");
        states.sort();
        counts.sort();
        let failures = svc_b.metric("thumbup_service_local_read_failures_total", &[("tenant", name)]).await as u64;
        println!(
            "run {run}: {likes} likes acknowledged (half through each instance); dc-b's instance showed each one at \
             its first read (state, and every 10th in the list), which answered in p50 {:?} p99 {:?} max {:?}; counts: dc-b reached dc-a's after \
             p50 {:?} p99 {:?} max {:?} ({} samples); dc-b's instance had {on_b_redis} connections to dc-b's Redis \
             and {on_b_db} sessions on dc-b's MariaDB; {failures} local read failures",
            quantile(&states, 0.5),
            quantile(&states, 0.99),
            quantile(&states, 1.0),
            quantile(&counts, 0.5),
            quantile(&counts, 0.99),
            quantile(&counts, 1.0),
            counts.len()
        );
        assert!(likes > 200 && counts.len() > 50, "run {run}: too little load to mean anything");
        assert!(quantile(&counts, 0.99) < STALENESS_BOUND, "run {run}: counts p99 staleness over the bound");
        assert!(on_b_redis > 0, "run {run}: dc-b's instance has no connection to dc-b's Redis");
        assert!(on_b_db > 0, "run {run}: dc-b's instance has no session on dc-b's MariaDB");
        assert_eq!(failures, 0, "run {run}: dc-b's reads fell back to the active datacenter");
    }
    job.kill();
    drop(svc_b);
    w.stop().await;
    site.stop().await;
}
