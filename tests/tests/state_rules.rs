//! Model check of DESIGN.md invariant 3: "a write is acknowledged only if
//! decided against the newest acknowledged state of its record".
//!
//! Many concurrent clients send zipf-skewed LIKE / UNLIKE / DISLIKE /
//! UNDISLIKE actions (with exact duplicates fired at once and double clicks)
//! while Redis is paused, SIGSTOPped, SIGKILLed and restarted, and MariaDB is
//! stopped and started, three rounds of each. Every reply is kept; afterwards
//! each record's acknowledged replies, ordered by version, must form a chain
//! allowed by the state table, where a request that ended in an ambiguous
//! error may or may not have taken effect in between. Then the system must
//! quiesce to exact counts, GetStates and the DB must agree with the model.
//!
//! Stops and kills the shared local servers: it is the only test of its
//! binary. `THUMBUP_SEED=<n>` replays a seed (timing still varies).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sqlx::Row;
use thumbup_core::domain::{Action, State, transition};
use thumbup_core::keys::Keys;
use thumbup_e2e::*;
use thumbup_service::pb;
use thumbup_test_support::stack::{admin_redis, redis_data_nodes, redis_instance, root, stack};
use tonic::Code;

const BIZ: i64 = 1;
const TENANT: &str = "e2e-staterules";
/// Concurrent client tasks (each sends its requests one batch at a time).
const TASKS: usize = 40;
/// Distinct gRPC connections the tasks share.
const CONNECTIONS: usize = 40;
const USERS: usize = 240;
const ITEMS: usize = 60;
const SKEW: f64 = 1.0;
/// Per cent of batches that are one request fired 2-3 times at once.
const DUP_PCT: u32 = 10;
/// Per cent of batches that are two different actions on one record, the
/// second sent without waiting for the first.
const DOUBLE_PCT: u32 = 12;
/// A request not answered within this is abandoned (and counted as a
/// request that may take effect at any later time).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Hard bounds of the load.
const MAX_OPS_PER_TASK: usize = 60_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(480);
const MIN_ACTIONS: usize = 20_000;
/// Load between faults.
const GAP: Duration = Duration::from_secs(3);
const ROUNDS: usize = 3;

// ------------------------------------------------------------------ model

/// What came back.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok { state: State, version: i64 },
    Err { code: Code, retry_info: bool, client_timeout: bool },
}

/// How a request was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Single,
    /// One of 2-3 copies of one request fired at once.
    Duplicate,
    /// One of two different actions on one record, sent back to back.
    DoubleClick,
}

/// One request and its reply.
#[derive(Debug, Clone, Copy)]
struct Sent {
    task: usize,
    kind: Kind,
    mid: i64,
    msg: i64,
    action: Action,
    send: Instant,
    reply: Instant,
    outcome: Outcome,
}

type Rec = (i64, i64, i64);

impl Sent {
    fn rec(&self) -> Rec {
        (self.mid, BIZ, self.msg)
    }

    fn ack(&self) -> Option<(State, i64)> {
        match self.outcome {
            Outcome::Ok { state, version } => Some((state, version)),
            Outcome::Err { .. } => None,
        }
    }

    /// May have taken effect without being acknowledged.
    fn ambiguous(&self) -> bool {
        match self.outcome {
            Outcome::Ok { .. } => false,
            Outcome::Err { code, client_timeout, .. } => client_timeout || is_ambiguous(code),
        }
    }

    /// The latest instant at which this request may take effect: its reply,
    /// or never bounded if the client gave up on it.
    fn effect_until(&self, far: Instant) -> Instant {
        match self.outcome {
            Outcome::Err { client_timeout: true, .. } => far,
            _ => self.reply,
        }
    }
}

/// Codes after which a write may or may not have landed.
fn is_ambiguous(code: Code) -> bool {
    !matches!(
        code,
        Code::Ok
            | Code::FailedPrecondition
            | Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::NotFound
            | Code::Unauthenticated
    )
}

const STATES: [State; 3] = [State::None, State::Like, State::Dislike];
const ACTIONS: [Action; 4] = [Action::Like, Action::Unlike, Action::Dislike, Action::Undislike];

fn action_index(a: Action) -> usize {
    ACTIONS.iter().position(|x| *x == a).unwrap()
}

fn state_index(s: State) -> usize {
    STATES.iter().position(|x| *x == s).unwrap()
}

fn to_pb(a: Action) -> pb::Action {
    match a {
        Action::Like => pb::Action::Like,
        Action::Unlike => pb::Action::Unlike,
        Action::Dislike => pb::Action::Dislike,
        Action::Undislike => pb::Action::Undislike,
    }
}

/// The states reachable from `from` by applying some of `usable` (each at
/// most once, any order). A BFS over (state, set of action kinds used): a
/// shortest path never revisits a state, and every action has a single
/// target state, so no path to a new state uses one action kind twice.
fn reachable(from: State, usable: &[Action]) -> [bool; 3] {
    let mut avail = [false; 4];
    for a in usable {
        avail[action_index(*a)] = true;
    }
    let mut out = [false; 3];
    let mut seen = [[false; 16]; 3];
    let mut queue = std::collections::VecDeque::from([(from, 0usize)]);
    seen[state_index(from)][0] = true;
    while let Some((s, used)) = queue.pop_front() {
        out[state_index(s)] = true;
        for (i, a) in ACTIONS.iter().enumerate() {
            if !avail[i] || used & (1 << i) != 0 {
                continue;
            }
            if let Ok(n) = transition(s, *a) {
                let u = used | (1 << i);
                if !seen[state_index(n)][u] {
                    seen[state_index(n)][u] = true;
                    queue.push_back((n, u));
                }
            }
        }
    }
    out
}

fn states_of(set: [bool; 3]) -> Vec<State> {
    STATES.iter().zip(set).filter(|(_, b)| *b).map(|(s, _)| *s).collect()
}

/// A broken rule found by the checker.
#[derive(Debug)]
struct Violation {
    rec: Rec,
    kind: &'static str,
    /// The offending acknowledged request.
    at: Sent,
    detail: String,
}

/// The final states the model allows per touched record, and its newest ack.
struct Final {
    allowed: [bool; 3],
    newest: Option<(State, i64)>,
}

/// Checks every record's acknowledged chain; returns the violations and the
/// allowed final states of every touched record.
fn check_model(all: &[Sent], t0: Instant, far: Instant) -> (Vec<Violation>, BTreeMap<Rec, Final>) {
    let mut by_rec: BTreeMap<Rec, Vec<&Sent>> = BTreeMap::new();
    for s in all {
        by_rec.entry(s.rec()).or_default().push(s);
    }
    let ms = |i: Instant| i.saturating_duration_since(t0).as_millis();
    let mut violations = Vec::new();
    let mut finals = BTreeMap::new();
    for (rec, reqs) in by_rec {
        let mut acks: Vec<&Sent> = reqs.iter().copied().filter(|s| s.ack().is_some()).collect();
        acks.sort_by_key(|s| s.ack().unwrap().1);
        let amb: Vec<&Sent> = reqs.iter().copied().filter(|s| s.ambiguous()).collect();
        let usable_in = |lo: Option<Instant>, hi: Instant| -> Vec<&Sent> {
            amb.iter().copied().filter(|a| a.send <= hi && lo.is_none_or(|lo| a.effect_until(far) >= lo)).collect()
        };
        let mut prev: Option<&Sent> = None;
        for ack in &acks {
            let (state, version) = ack.ack().unwrap();
            let (prev_state, prev_version) = prev.map_or((State::None, 0), |p| p.ack().unwrap());
            if let Some(p) = prev
                && prev_version == version
            {
                violations.push(Violation {
                    rec,
                    kind: "duplicate version",
                    at: **ack,
                    detail: format!(
                        "v{version} acknowledged twice: {} -> {} at +{}..{} ms and {} -> {} at +{}..{} ms",
                        p.action,
                        prev_state,
                        ms(p.send),
                        ms(p.reply),
                        ack.action,
                        state,
                        ms(ack.send),
                        ms(ack.reply)
                    ),
                });
            }
            let usable = usable_in(prev.map(|p| p.send), ack.reply);
            let actions: Vec<Action> = usable.iter().map(|a| a.action).collect();
            let from = reachable(prev_state, &actions);
            let ok = states_of(from).into_iter().any(|s| transition(s, ack.action) == Ok(state));
            if !ok {
                let prev_desc = match prev {
                    Some(p) => {
                        format!("v{prev_version} {} -> {prev_state} (+{}..{} ms)", p.action, ms(p.send), ms(p.reply))
                    }
                    None => "no earlier ack (NONE)".to_string(),
                };
                let amb_desc: Vec<String> = usable
                    .iter()
                    .map(|a| {
                        let code = match a.outcome {
                            Outcome::Err { code, .. } => format!("{code:?}"),
                            Outcome::Ok { .. } => unreachable!(),
                        };
                        format!("{}:{code}(+{}..{})", a.action, ms(a.send), ms(a.reply))
                    })
                    .collect();
                violations.push(Violation {
                    rec,
                    kind: "forbidden transition acknowledged",
                    at: **ack,
                    detail: format!(
                        "{prev_desc}, then v{version} {} -> {state} (+{}..{} ms, task {}, {:?}); reachable before it: {:?}; ambiguous in between: [{}]",
                        ack.action,
                        ms(ack.send),
                        ms(ack.reply),
                        ack.task,
                        ack.kind,
                        states_of(from),
                        amb_desc.join(", ")
                    ),
                });
            }
            prev = Some(ack);
        }
        // Real-time order: an ack sent after another was acknowledged must
        // be decided after it, so carry a newer version.
        let mut min_reply: Option<&Sent> = None;
        for ack in acks.iter().rev() {
            if let Some(m) = min_reply
                && m.reply < ack.send
            {
                let (s, v) = ack.ack().unwrap();
                let (ms_, mv) = m.ack().unwrap();
                violations.push(Violation {
                    rec,
                    kind: "acknowledged out of real-time order",
                    at: **ack,
                    detail: format!(
                        "v{mv} {} -> {ms_} was acknowledged at +{} ms, but v{v} {} -> {s} sent later (+{} ms) got an older version",
                        m.action,
                        ms(m.reply),
                        ack.action,
                        ms(ack.send)
                    ),
                });
            }
            if min_reply.is_none_or(|m| ack.reply < m.reply) {
                min_reply = Some(ack);
            }
        }
        let newest = acks.last().map(|a| a.ack().unwrap());
        let allowed = match acks.last() {
            Some(last) => {
                let usable: Vec<Action> = usable_in(Some(last.send), far).iter().map(|a| a.action).collect();
                reachable(newest.unwrap().0, &usable)
            }
            None => reachable(State::None, &amb.iter().map(|a| a.action).collect::<Vec<_>>()),
        };
        finals.insert(rec, Final { allowed, newest });
    }
    (violations, finals)
}

// ------------------------------------------------------------------ load

/// Zipf over 1..=n with exponent `s`, by inverse CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut acc = 0.0;
        let cdf = (1..=n)
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut StdRng) -> i64 {
        let x = rng.random::<f64>() * self.cdf.last().unwrap();
        (self.cdf.partition_point(|c| *c <= x).min(self.cdf.len() - 1) + 1) as i64
    }
}

/// LIKE 35 %, UNLIKE 20 %, DISLIKE 25 %, UNDISLIKE 20 %: with skew, hot
/// records see both allowed and forbidden actions all the time.
fn random_action(rng: &mut StdRng) -> Action {
    match rng.random_range(0..100) {
        0..35 => Action::Like,
        35..55 => Action::Unlike,
        55..80 => Action::Dislike,
        _ => Action::Undislike,
    }
}

async fn send(c: &Client, task: usize, kind: Kind, mid: i64, msg: i64, action: Action) -> Sent {
    let send = Instant::now();
    let r = tokio::time::timeout(REQUEST_TIMEOUT, c.act(BIZ, msg, mid, owner_of(msg), to_pb(action))).await;
    let reply = Instant::now();
    let outcome = match r {
        Err(_) => Outcome::Err { code: Code::DeadlineExceeded, retry_info: false, client_timeout: true },
        Ok(Ok(rep)) => match State::from_code(rep.state as i64) {
            Some(state) => Outcome::Ok { state, version: rep.version },
            None => panic!("reply with an unknown state {} for {action} by {mid} on {msg}", rep.state),
        },
        Ok(Err(s)) => Outcome::Err { code: s.code(), retry_info: has_retry_info(&s), client_timeout: false },
    };
    Sent { task, kind, mid, msg, action, send, reply, outcome }
}

#[allow(clippy::too_many_arguments)]
async fn load_task(
    task: usize,
    c: Client,
    seed: u64,
    users: Arc<Zipf>,
    items: Arc<Zipf>,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Vec<Sent> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_add((task as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && out.len() < MAX_OPS_PER_TASK {
        let mid = users.sample(&mut rng);
        let msg = items.sample(&mut rng);
        let roll = rng.random_range(0..100);
        if roll < DUP_PCT {
            let action = random_action(&mut rng);
            let n = rng.random_range(2..=3);
            let futs = (0..n).map(|_| send(&c, task, Kind::Duplicate, mid, msg, action));
            out.extend(futures::future::join_all(futs).await);
        } else if roll < DUP_PCT + DOUBLE_PCT {
            let a = random_action(&mut rng);
            let b = loop {
                let b = random_action(&mut rng);
                if b != a {
                    break b;
                }
            };
            let (x, y) = tokio::join!(
                send(&c, task, Kind::DoubleClick, mid, msg, a),
                send(&c, task, Kind::DoubleClick, mid, msg, b)
            );
            out.push(x);
            out.push(y);
        } else {
            out.push(send(&c, task, Kind::Single, mid, msg, random_action(&mut rng)).await);
        }
        // A little think time keeps the total volume bounded.
        let pause = rng.random_range(0..4);
        if pause > 0 {
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }
    out
}

// ------------------------------------------------------------------ faults

/// `scripts/stack.sh <args>` without asserting (for Drop guards).
fn stack_quiet(args: &[&str]) {
    let _ = Command::new("bash").arg(root().join("scripts/stack.sh")).args(args).status();
}

/// Starts the server again if the test fails while it is down.
struct Restart(&'static str);

impl Restart {
    /// Starts it now (asserting) and disarms the guard.
    async fn restore(self) {
        let server = self.0;
        std::mem::forget(self);
        tokio::task::spawn_blocking(move || stack(&["start", server, instance_of(server)])).await.expect("stack start");
    }
}

impl Drop for Restart {
    fn drop(&mut self) {
        stack_quiet(&["start", self.0, instance_of(self.0)]);
    }
}

/// The instance of `server` that the faults hit: dc-a's, and for Redis in
/// cluster mode every node of the cluster.
fn instance_of(server: &str) -> &'static str {
    if server == "redis" { redis_instance() } else { "a" }
}

/// Sends SIGCONT to a stopped process if the test fails while it is stopped.
struct Cont(u32);

impl Drop for Cont {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// The pids of the redis-servers holding dc-a's data (the masters in
/// cluster mode), from `INFO server`, each checked to be one.
async fn redis_pids() -> Vec<u32> {
    let mut r = admin_redis().await;
    let mut pids = Vec::new();
    for (host, port) in redis_data_nodes(&mut r).await {
        let mut cmd = redis::cmd("INFO");
        cmd.arg("server");
        let info: String = redis::from_redis_value(r.on_node(&host, port, cmd).await.expect("INFO server")).unwrap();
        let pid: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("process_id in INFO server");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "redis-server", "pid {pid} from INFO server is not a local redis-server");
        pids.push(pid);
    }
    pids
}

async fn blocking_stack(args: Vec<&'static str>) {
    tokio::task::spawn_blocking(move || stack(&args)).await.expect("stack.sh");
}

/// One injected fault: from its start to one second after the server was back.
struct Window {
    name: String,
    round: usize,
    start: Instant,
    back: Instant,
}

impl Window {
    fn end(&self) -> Instant {
        self.back + Duration::from_secs(1)
    }
}

async fn pause(ms: u64, round: usize) -> Window {
    let start = Instant::now();
    let mut admin = admin_redis().await;
    for (host, port) in redis_data_nodes(&mut admin).await {
        let mut pause = redis::cmd("CLIENT");
        pause.arg("PAUSE").arg(ms).arg("ALL");
        admin.on_node(&host, port, pause).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Window { name: format!("CLIENT PAUSE {ms} ms"), round, start, back: Instant::now() }
}

async fn sigstop(round: usize) -> Window {
    let pids = redis_pids().await;
    let start = Instant::now();
    let guards: Vec<Cont> = pids.iter().map(|p| Cont(*p)).collect();
    for pid in &pids {
        signal(*pid, "STOP");
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(guards);
    Window { name: "SIGSTOP redis 1.5 s".into(), round, start, back: Instant::now() }
}

async fn kill_redis(round: usize) -> Window {
    let start = Instant::now();
    blocking_stack(vec!["kill", "redis", redis_instance()]).await;
    let guard = Restart("redis");
    guard.restore().await;
    Window { name: "SIGKILL redis + restart".into(), round, start, back: Instant::now() }
}

async fn restart_mariadb(round: usize) -> Window {
    let start = Instant::now();
    blocking_stack(vec!["stop", "mariadb"]).await;
    let guard = Restart("mariadb");
    tokio::time::sleep(Duration::from_secs(3)).await;
    guard.restore().await;
    Window { name: "MariaDB stop 3 s + start".into(), round, start, back: Instant::now() }
}

// ------------------------------------------------------------------ checks

/// Records in the DB: record -> (state, version).
async fn db_records(t: &thumbup_core::config::TenantConfig) -> BTreeMap<Rec, (i64, i64)> {
    let mut con = admin_db(t).await;
    sqlx::query("SELECT mid, business_id, message_id, state, version FROM like_records")
        .fetch_all(&mut con)
        .await
        .unwrap()
        .iter()
        .map(|r| ((r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2)), (r.get::<i8, _>(3) as i64, r.get(4))))
        .collect()
}

/// Waits until the stream is drained; false (no panic) after `within`.
async fn drained(keys: &Keys, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let (u, p) = (undelivered(keys).await, pending(keys).await);
        if u == 0 && p == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            println!("not drained: {u} undelivered, {p} pending");
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The service's write counters of the test tenant, by name (whatever
/// metrics the service has: looked up in the default registry).
fn write_metrics() -> Vec<String> {
    let mut out = Vec::new();
    for fam in prometheus::gather() {
        if !fam.name().starts_with("thumbup_service_") || !fam.name().contains("write") {
            continue;
        }
        for m in fam.get_metric() {
            let labels: Vec<String> = m
                .get_label()
                .iter()
                .filter(|l| l.name() != "tenant")
                .map(|l| format!("{}={}", l.name(), l.value()))
                .collect();
            if m.get_label().iter().any(|l| l.name() == "tenant" && l.value() == TENANT) {
                let v = if fam.get_field_type() == prometheus::proto::MetricType::COUNTER {
                    m.get_counter().get_value()
                } else {
                    m.get_gauge().get_value()
                };
                out.push(format!("{}{{{}}} {v}", fam.name(), labels.join(",")));
            }
        }
    }
    out
}

fn code_counts<'a>(it: impl Iterator<Item = &'a Sent>) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in it {
        if let Outcome::Err { code, client_timeout, .. } = s.outcome {
            let name = if client_timeout { "ClientTimeout".to_string() } else { format!("{code:?}") };
            *m.entry(name).or_default() += 1;
        }
    }
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_forbidden_transition_is_acknowledged_through_redis_stalls_kills_and_db_restarts() {
    let seed: u64 = std::env::var("THUMBUP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("state_rules: seed {seed} (THUMBUP_SEED={seed} to replay)");
    let w = World::start("staterules", &tenant_yaml(TENANT, &[BIZ], "")).await;
    let t = w.tenant(TENANT).clone();
    let k = Keys::new(&t.name, t.stream.shards);
    let job = w.job(TENANT, 200);
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(w.client_of(TENANT).await);
    }
    let users = Arc::new(Zipf::new(USERS, SKEW));
    let items = Arc::new(Zipf::new(ITEMS, SKEW));
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let load_deadline = t0 + MAX_LOAD_TIME;
    let tasks: Vec<_> = (0..TASKS)
        .map(|i| {
            tokio::spawn(load_task(
                i,
                clients[i % CONNECTIONS].clone(),
                seed,
                users.clone(),
                items.clone(),
                stop.clone(),
                load_deadline,
            ))
        })
        .collect();

    // Faults, in turn, while the load runs.
    tokio::time::sleep(GAP).await;
    let mut windows = Vec::new();
    for round in 1..=ROUNDS {
        for ms in [1000, 2000, 3000] {
            windows.push(pause(ms, round).await);
            tokio::time::sleep(GAP).await;
        }
        windows.push(sigstop(round).await);
        tokio::time::sleep(GAP).await;
        windows.push(kill_redis(round).await);
        tokio::time::sleep(GAP).await;
        windows.push(restart_mariadb(round).await);
        tokio::time::sleep(GAP).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Sent> = Vec::new();
    for task in tasks {
        all.extend(tokio::time::timeout(REQUEST_TIMEOUT * 3, task).await.expect("load task stops").expect("load task"));
    }
    let load_secs = t0.elapsed().as_secs_f64();
    let far = Instant::now() + Duration::from_secs(86_400);

    // Totals.
    let acked = all.iter().filter(|s| s.ack().is_some()).count();
    let unavailable: Vec<&Sent> =
        all.iter().filter(|s| matches!(s.outcome, Outcome::Err { code: Code::Unavailable, .. })).collect();
    let with_retry = unavailable.iter().filter(|s| matches!(s.outcome, Outcome::Err { retry_info: true, .. })).count();
    let touched_users: std::collections::HashSet<i64> = all.iter().map(|s| s.mid).collect();
    let touched_items: std::collections::HashSet<i64> = all.iter().map(|s| s.msg).collect();
    println!(
        "load: {} requests in {load_secs:.1} s from {TASKS} tasks ({} users, {} items touched; {} duplicates, {} double clicks): \
         {acked} acknowledged, errors {:?}",
        all.len(),
        touched_users.len(),
        touched_items.len(),
        all.iter().filter(|s| s.kind == Kind::Duplicate).count(),
        all.iter().filter(|s| s.kind == Kind::DoubleClick).count(),
        code_counts(all.iter()),
    );
    println!("UNAVAILABLE replies: {}, of which with google.rpc.RetryInfo: {with_retry}", unavailable.len());
    println!("service write metrics: {}", write_metrics().join(", "));
    assert!(all.len() >= MIN_ACTIONS, "only {} actions were sent", all.len());

    // The model check.
    let (violations, finals) = check_model(&all, t0, far);
    let forbidden = |v: &&Violation| v.kind == "forbidden transition acknowledged";
    let in_window = |s: &Sent, w: &Window| s.reply >= w.start && s.send <= w.end();
    let at = |i: Instant| i.saturating_duration_since(t0).as_secs_f64();
    for win in &windows {
        let len = win.end() - win.start;
        let during: Vec<&Sent> = all.iter().filter(|s| s.reply >= win.start && s.reply <= win.end()).collect();
        let before_start = win.start.checked_sub(len).unwrap_or(t0);
        let before = all.iter().filter(|s| s.ack().is_some() && s.reply >= before_start && s.reply < win.start).count();
        let acks = during.iter().filter(|s| s.ack().is_some()).count();
        let bad = violations.iter().filter(forbidden).filter(|v| in_window(&v.at, win)).count();
        let other = violations.iter().filter(|v| !forbidden(v)).filter(|v| in_window(&v.at, win)).count();
        println!(
            "fault {:<24} round {}: +{:.1}..{:.1} s, acked {acks} ({:.0}/s vs {:.0}/s before), refused {:?}, \
             forbidden-acked {bad}, other violations {other}",
            win.name,
            win.round,
            at(win.start),
            at(win.end()),
            acks as f64 / len.as_secs_f64(),
            before as f64 / (win.start - before_start).as_secs_f64().max(0.001),
            code_counts(during.iter().copied()),
        );
    }
    let outside = violations.iter().filter(|v| !windows.iter().any(|w| in_window(&v.at, w))).count();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for v in &violations {
        *by_kind.entry(v.kind).or_default() += 1;
    }
    println!("model check: {} records, violations {by_kind:?} ({outside} outside every fault window)", finals.len());
    // Up to 20, spread over the run.
    let mut by_time: Vec<&Violation> = violations.iter().collect();
    by_time.sort_by_key(|v| v.at.send);
    for v in by_time.iter().step_by(by_time.len().div_ceil(20).max(1)) {
        let win = windows
            .iter()
            .find(|w| in_window(&v.at, w))
            .map_or("no fault".to_string(), |w| format!("{} round {}", w.name, w.round));
        println!("  violation {} on record {:?} [{win}]: {}", v.kind, v.rec, v.detail);
    }

    // Quiesce.
    wait_redis_back(&t.name).await;
    let is_drained = drained(&k, Duration::from_secs(120)).await;
    if !is_drained {
        let log = job.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        println!("job log tail:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }

    // Counts, states and records.
    let exact = {
        let t = t.clone();
        tokio::spawn(async move { check_exact(&t).await }).await
    };
    let exact_ok = match &exact {
        Ok(e) => {
            println!("exact: {e:?}");
            true
        }
        Err(e) => {
            println!("check_exact failed: {e}");
            false
        }
    };
    let recs = db_records(&t).await;
    let c = &clients[0];
    let mut by_user: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (mid, _, msg) in finals.keys() {
        by_user.entry(*mid).or_default().push(*msg);
    }
    let mut state_mismatch = Vec::new();
    let mut db_mismatch = Vec::new();
    let mut read_vs_db = Vec::new();
    for (mid, msgs) in &by_user {
        for chunk in msgs.chunks(100) {
            let states = c.states(BIZ, *mid, chunk).await.expect("GetStates after the faults");
            for msg in chunk {
                let rec = (*mid, BIZ, *msg);
                let f = &finals[&rec];
                let got = State::from_code(states.get(msg).copied().unwrap_or(0) as i64).expect("known state");
                if !f.allowed[state_index(got)] {
                    state_mismatch.push(format!(
                        "{rec:?}: GetStates {got}, model allows {:?} (newest ack {:?})",
                        states_of(f.allowed),
                        f.newest
                    ));
                }
                let row = recs.get(&rec).copied();
                let db_state = row.map_or(State::None, |(s, _)| State::from_code(s).expect("known state"));
                if db_state != got {
                    read_vs_db.push(format!("{rec:?}: GetStates {got}, DB {db_state}"));
                }
                let db_ok = match (f.newest, row) {
                    (Some((_, v)), None) => {
                        db_mismatch.push(format!("{rec:?}: acknowledged v{v} but no record in the DB"));
                        continue;
                    }
                    (None, None) => true,
                    (Some((s, v)), Some((_, dv))) if dv == v => db_state == s,
                    (Some((_, v)), Some((_, dv))) if dv < v => {
                        db_mismatch.push(format!("{rec:?}: DB at v{dv}, older than acknowledged v{v}"));
                        continue;
                    }
                    (_, Some(_)) => f.allowed[state_index(db_state)],
                };
                if !db_ok {
                    db_mismatch.push(format!(
                        "{rec:?}: DB {db_state} at v{}, model allows {:?} (newest ack {:?})",
                        row.unwrap().1,
                        states_of(f.allowed),
                        f.newest
                    ));
                }
            }
        }
    }
    println!(
        "final: {} records touched, {} in the DB; GetStates outside the model {}, DB outside the model {}, GetStates != DB {}",
        finals.len(),
        recs.len(),
        state_mismatch.len(),
        db_mismatch.len(),
        read_vs_db.len()
    );
    for m in state_mismatch.iter().chain(&db_mismatch).chain(&read_vs_db).take(20) {
        println!("  {m}");
    }
    drop(job);
    w.stop().await;

    assert!(violations.is_empty(), "{} state-rule violations: {by_kind:?} (details above)", violations.len());
    assert!(is_drained, "stream not drained within 120 s after the faults");
    assert!(exact_ok, "counts not exact after the faults");
    assert!(state_mismatch.is_empty(), "{} GetStates outside the model", state_mismatch.len());
    assert!(db_mismatch.is_empty(), "{} DB records outside the model", db_mismatch.len());
    assert!(read_vs_db.is_empty(), "{} GetStates differ from the DB", read_vs_db.len());
}
