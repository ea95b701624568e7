//! Issue 18's cluster-mode acceptance: with the mocked API server and the
//! real two-datacenter stack, a planned flip to dc-b leaves no service or
//! job process on dc-a's Redis or MariaDB, and the registry is not
//! rewritten.
//!
//! - The operator's tenant controller (`controller::reconcile`) runs
//!   in-process against the in-memory API server (`FakeApi`), with an
//!   operator config that has `db_proxy` on and `failover.redis_tier` on
//!   (once with `topology.per_datacenter` off, once on). The `db_proxy`
//!   ports of that config are those of a real `thumbup-db-proxy` process
//!   that the test starts, so the registry entry the controller writes
//!   names that proxy, as it names the pod's sidecar in a cluster. The
//!   proxy follows a route file (it cannot reach the mocked API).
//! - The failover controller runs out of cluster with the same operator
//!   config file and that route file; the tenant controller is given the
//!   route it publishes, as in a cluster.
//! - The service runs in-process following the registry ConfigMap and
//!   Secret in the fake API (list and watch requests answered from its
//!   store); the job runs as a child process with the files that the job
//!   Deployment's Secret volume mounts (the tenant Secret's keys under the
//!   paths its items name), with the Deployment's own arguments. Both
//!   reach DB and Redis only through the proxy.
//!
//! With `per_datacenter` on, the proxy is started with `--datacenter dc-b`
//! and the local-read listeners, as the sidecar of dc-b's pods: the
//! service and the job here are dc-b's. (A pod of dc-a keeps its local
//! read sessions on dc-a's servers after a flip by design, docs/operator.md
//! "Per datacenter": they are replicas then, and its own datacenter's.)
//!
//! Likes flow; then the operator config's `active_datacenter` is changed
//! to dc-b (a planned switchover of both tiers). The test checks with
//! `CLIENT LIST` and the processlist that no session of the tenant's Redis
//! ACL user or DB user is left on dc-a's servers and that there are some on
//! dc-b's; that neither the flip nor the tenant controller's pass after it
//! wrote the registry ConfigMap or Secret anew (the pass sends the same
//! bytes, and the stored objects are unchanged); and that every acknowledged
//! like is on dc-b. The stack is put back (both Redis masters, dc-a's
//! MariaDB primary with dc-b a fresh replica) even when a check fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::keys::Keys;
use thumbup_core::names;
use thumbup_core::route::{Route, TransitionKind};
use thumbup_e2e::datacenters::*;
use thumbup_e2e::{
    Acked, Client, check_acked_and_states_at, check_exact_at, free_port, keep_newest, owner_of, wait_drained,
};
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::controller::{self, Context};
use thumbup_operator::crd::{FINALIZER, LikeTenant};
use thumbup_operator::failover;
use thumbup_operator::metrics::Metrics;
use thumbup_operator::resources::{DB_PROXY_CONTAINER, JOB_CONFIG_DIR};
use thumbup_service::pb;
use thumbup_service::registry_api::{REGISTRY_KEY, RegistryApi, SERVICE_API_PERMISSIONS};
use thumbup_test_support::api::{FakeApi, lt_path, permission};
use thumbup_test_support::operator::{forget, tenant};
use thumbup_test_support::stack::{split, stack};
use thumbup_test_support::wait::wait_until;

/// The operator's namespace, where the registry is.
const NS: &str = "thumbup";
const REGISTRY_CM: &str = "thumbup-tenants";
const REGISTRY_SECRET: &str = "thumbup-tenant-credentials";

fn cm_path() -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/{REGISTRY_CM}")
}

fn secret_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{REGISTRY_SECRET}")
}

fn tenant_secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/team/secrets/{}", names::tenant_secret(name))
}

/// The admin URL of datacenter `dc`'s MariaDB ('a' or 'b').
/// `host:port` of datacenter `dc`'s Redis.
fn redis_addr(dc: char) -> String {
    split(&admin_redis_of(dc)).0.trim_start_matches("redis://").to_string()
}

/// The tenant's sessions on each server: (Redis a, DB a, Redis b, DB b).
async fn sessions(redis_user: &str, db_user: &str) -> (usize, i64, usize, i64) {
    (
        redis_clients_of('a', redis_user).await,
        db_sessions_of('a', db_user).await,
        redis_clients_of('b', redis_user).await,
        db_sessions_of('b', db_user).await,
    )
}

/// The sidecar's ports, chosen before the operator config is written (the
/// config names them, as the chart's `dbProxy.*Port` do).
struct Ports {
    db: u16,
    admin: u16,
    redis: u16,
    local: u16,
    local_redis: u16,
}

impl Ports {
    fn pick() -> Ports {
        loop {
            let p = Ports {
                db: free_port(),
                admin: free_port(),
                redis: free_port(),
                local: free_port(),
                local_redis: free_port(),
            };
            let mut all = [p.db, p.admin, p.redis, p.local, p.local_redis];
            all.sort_unstable();
            if all.windows(2).all(|w| w[0] != w[1]) {
                return p;
            }
        }
    }
}

/// The operator config (one file for both controllers): dc-a and dc-b of
/// the stack, the sidecar on `ports`, the Redis tier moving with the route,
/// and one job Deployment per datacenter when `per_datacenter`.
fn operator_yaml(active: &str, ports: &Ports, per_datacenter: bool) -> String {
    let dc = |name: &str, dc: char| {
        let (db, db_user, db_pw) = split(&admin_url(dc));
        let (redis, r_user, r_pw) = split(&admin_redis_of(dc));
        format!(
            "  - name: {name}\n    db: {{ url: \"{db}\", admin_username: \"{db_user}\", admin_password: \"{db_pw}\" }}\n    redis: {{ url: \"{redis}\", admin_username: \"{r_user}\", admin_password: \"{r_pw}\", replica_acks: 1 }}\n"
        )
    };
    format!(
        "active_datacenter: {active}\n\
         registry: {{ config_map: {REGISTRY_CM}, secret: {REGISTRY_SECRET} }}\n\
         job: {{ image: \"thumbup/thumbup:test\", image_pull_policy: IfNotPresent }}\n\
         db_proxy: {{ enabled: true, port: {}, admin_port: {}, redis_port: {}, local_port: {}, local_redis_port: {} }}\n\
         topology: {{ per_datacenter: {per_datacenter} }}\n\
         failover:\n  probe_period_ms: 300\n  probe_timeout_ms: 1000\n  failure_threshold: 3\n  grace_period_ms: 1500\n  catch_up_timeout_ms: 10000\n  redis_tier: true\n\
         datacenters:\n{}{}",
        ports.db,
        ports.admin,
        ports.redis,
        ports.local,
        ports.local_redis,
        dc("dc-a", 'a'),
        dc("dc-b", 'b'),
    )
}

/// A `thumbup-db-proxy` child process on `ports`, following a route file;
/// with `datacenter`, also the local-read listeners of that datacenter.
fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

fn decode(s: &str) -> String {
    s.replace("%3D", "=").replace("%3d", "=").replace("%2F", "/").replace("%2f", "/")
}

/// The API server as the service sees it (as in onboarding.rs): its list
/// and watch requests of the registry ConfigMap and Secret, answered from
/// `FakeApi`'s store; a watch is held until the stored object differs from
/// what the service was last sent. Requests RBAC would not grant are
/// refused and recorded.
fn registry_watch(objects: Arc<Mutex<BTreeMap<String, Value>>>) -> (kube::Client, Arc<Mutex<Vec<String>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let refused: Arc<Mutex<Vec<String>>> = Default::default();
    let refused_log = refused.clone();
    tokio::spawn(async move {
        let sent: Arc<Mutex<BTreeMap<String, Value>>> = Default::default();
        let version = Arc::new(std::sync::atomic::AtomicU64::new(10));
        let reply = |code: u16, body: Value| {
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap()
        };
        while let Some((req, respond)) = handle.next_request().await {
            let path = req.uri().path().to_string();
            let query = decode(req.uri().query().unwrap_or_default());
            let p = permission(req.method().as_str(), &path, &query);
            let granted = SERVICE_API_PERMISSIONS
                .iter()
                .any(|(g, r, verbs)| *g == p.0 && *r == p.1 && verbs.contains(&p.2.as_str()));
            let name = query.split('&').find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name="));
            let object = match (path.as_str(), name) {
                (p, Some(n)) if p == format!("/api/v1/namespaces/{NS}/configmaps") && n == REGISTRY_CM => cm_path(),
                (p, Some(n)) if p == format!("/api/v1/namespaces/{NS}/secrets") && n == REGISTRY_SECRET => {
                    secret_path()
                }
                _ => String::new(),
            };
            if !granted || object.is_empty() {
                refused_log.lock().unwrap().push(format!("{} {path}?{query}", req.method()));
                respond.send_response(reply(403, status(403, "Forbidden")));
                continue;
            }
            if p.2 == "list" {
                let now = objects.lock().unwrap().get(&object).cloned();
                let rv = version.load(Ordering::Relaxed).to_string();
                let items: Vec<Value> = now
                    .clone()
                    .map(|mut v| {
                        v["metadata"]["resourceVersion"] = json!(rv);
                        v
                    })
                    .into_iter()
                    .collect();
                sent.lock().unwrap().insert(object.clone(), now.unwrap_or(Value::Null));
                respond.send_response(reply(
                    200,
                    json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items}),
                ));
                continue;
            }
            let (objects, sent, version) = (objects.clone(), sent.clone(), version.clone());
            tokio::spawn(async move {
                loop {
                    let now = objects.lock().unwrap().get(&object).cloned().unwrap_or(Value::Null);
                    let last = sent.lock().unwrap().get(&object).cloned().unwrap_or(Value::Null);
                    if now != last {
                        let n = version.fetch_add(1, Ordering::Relaxed) + 1;
                        let (kind, mut obj) = match (&last, &now) {
                            (Value::Null, _) => ("ADDED", now.clone()),
                            (_, Value::Null) => ("DELETED", last.clone()),
                            _ => ("MODIFIED", now.clone()),
                        };
                        obj["metadata"]["resourceVersion"] = json!(n.to_string());
                        sent.lock().unwrap().insert(object.clone(), now);
                        let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
                        line.push(b'\n');
                        let response = Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Body::from(line))
                            .unwrap();
                        respond.send_response(response);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    (client, refused)
}

/// The service in-process on port 0, following the registry in the API
/// (its registry files are never synced here).
async fn service(dir: &Path, api: kube::Client) -> (String, tokio::sync::oneshot::Sender<()>) {
    // The registry files' directory, which the kubelet has not synced.
    std::fs::create_dir_all(dir.join("service-unsynced")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let opts = thumbup_service::Options {
        config: dir.join("service-unsynced").join(REGISTRY_KEY),
        redis_timeout: Duration::from_millis(1000),
        ready: None,
        limits: Default::default(),
    };
    let registry_api = Some(RegistryApi {
        client: api,
        namespace: NS.into(),
        config_map: REGISTRY_CM.into(),
        secret: REGISTRY_SECRET.into(),
    });
    let files = thumbup_service::ConfigFiles { optional: true, registry_api, ..Default::default() };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(thumbup_service::run_with(opts, files, listener, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

async fn client(addr: &str, name: &str, token: &str) -> Client {
    let endpoint = thumbup_service::client_endpoint(addr, None).unwrap();
    let channel = endpoint.connect().await.expect("connect to service");
    Client { inner: pb::thumbup_client::ThumbupClient::new(channel), tenant: name.into(), token: token.into() }
}

/// A stored object of the fake API.
fn stored(fake: &FakeApi, path: &str) -> Value {
    fake.objects.lock().unwrap().get(path).cloned().unwrap_or_else(|| panic!("{path} is not stored"))
}

/// The bytes of one key of a stored Secret.
fn secret_key(secret: &Value, key: &str) -> Vec<u8> {
    let b: k8s_openapi::ByteString =
        serde_json::from_value(secret["data"][key].clone()).unwrap_or_else(|e| panic!("key {key}: {e}"));
    b.0
}

/// The writes (POST, PUT, PATCH) the operator sent to `path`, as JSON text.
fn writes(fake: &FakeApi, path: &str) -> Vec<String> {
    let log = fake.requests.lock().unwrap();
    log.iter()
        .filter(|(m, p, _)| p == path && ["POST", "PUT", "PATCH"].contains(&m.as_str()))
        .map(|(m, _, b)| format!("{m} {b}"))
        .collect()
}

/// One pass of the tenant controller, retried while it fails (the first
/// pass may find dc-b's Redis, a replica, not yet holding what dc-a's was
/// just given).
async fn reconcile(ctx: &Arc<Context>, lt: &LikeTenant) {
    let mut last = None;
    for _ in 0..10 {
        match controller::reconcile(Arc::new(lt.clone()), ctx.clone()).await {
            Ok(_) => return,
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("the tenant controller's pass failed: {last:?}");
}

/// `kubectl apply` of LikeTenant `name`: stored, the finalizer pass, then
/// the provisioning pass.
async fn apply(fake: &FakeApi, ctx: &Arc<Context>, name: &str) -> LikeTenant {
    let store = |lt: &LikeTenant| {
        fake.objects.lock().unwrap().insert(lt_path(&lt.tenant()), serde_json::to_value(lt).unwrap());
    };
    let fresh = tenant(name);
    store(&fresh);
    controller::reconcile(Arc::new(fresh), ctx.clone()).await.expect("the finalizer is added");
    let mut lt = tenant(name);
    lt.metadata.finalizers = Some(vec![FINALIZER.into()]);
    store(&lt);
    reconcile(ctx, &lt).await;
    lt
}

/// What the kubelet mounts for the job container: the job Deployment's
/// `tenant` Secret volume (the tenant Secret's keys under its items'
/// paths) in `dir`, and the container's arguments with `dir` for the mount
/// and a loopback admin port. Returns those and the db-proxy sidecar's
/// arguments.
fn job_mount(fake: &FakeApi, name: &str, deployment: &str, dir: &Path) -> (Vec<String>, Vec<String>) {
    let d = stored(fake, &format!("/apis/apps/v1/namespaces/team/deployments/{deployment}"));
    let pod = &d["spec"]["template"]["spec"];
    let volume = pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == "tenant").expect("tenant volume");
    let secret = stored(fake, &tenant_secret_path(name));
    assert_eq!(volume["secret"]["secretName"].as_str(), Some(names::tenant_secret(name).as_str()));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    for item in volume["secret"]["items"].as_array().unwrap() {
        let (key, path) = (item["key"].as_str().unwrap(), item["path"].as_str().unwrap());
        std::fs::write(dir.join(path), secret_key(&secret, key)).unwrap();
    }
    let job = pod["containers"].as_array().unwrap().iter().find(|c| c["name"] == "job").expect("job container");
    let job_args = job["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap().replace(JOB_CONFIG_DIR, &dir.display().to_string());
            if a.starts_with("--admin-listen=") { "--admin-listen=127.0.0.1:0".to_string() } else { a }
        })
        .collect();
    let sidecar = pod["initContainers"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == DB_PROXY_CONTAINER))
        .expect("the db-proxy sidecar");
    let sidecar_args = sidecar["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect();
    (job_args, sidecar_args)
}

/// The job process, SIGKILLed when dropped (a failed check leaves none running).
struct JobProcess(Child);

impl Drop for JobProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The failover controller's task, aborted when dropped: a failed check
/// must not leave it probing while the stack is put back.
struct FailoverTask(tokio::task::JoinHandle<Result<(), failover::FailoverError>>);

impl Drop for FailoverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spawn_job(args: &[String], consumer: &str, log: &Path) -> JobProcess {
    let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(thumbup_e2e::job_binary())
        .args(args)
        .args(["--claim-idle-ms", "1000"])
        .env("THUMBUP_CONSUMER", consumer)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(out)
        .spawn()
        .map(JobProcess)
        .expect("spawn thumbup-job")
}

/// SIGTERMs the job and waits for it; true when it exited 0.
fn terminate(job: &mut JobProcess) -> bool {
    let job = &mut job.0;
    let _ = Command::new("kill").arg("-TERM").arg(job.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(s)) = job.try_wait() {
            return s.success();
        }
        if Instant::now() > deadline {
            let _ = job.kill();
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writers of fresh likes (and some dislikes) and readers of counts and
/// states, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<tokio::task::JoinHandle<(Acked, u64, u64)>>,
    readers: Vec<tokio::task::JoinHandle<(u64, u64)>>,
}

impl Load {
    fn start(c: &Client, writers: i64, readers: i64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let writers = (0..writers)
            .map(|i| {
                let (c, stop) = (c.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut acked, mut ok, mut unavailable) = (Acked::new(), 0u64, 0u64);
                    let mut n = 0i64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let mid = 10_000 + i * 1_000_000 + n;
                        let msg = 1 + n % 50;
                        let action = if n % 5 == 0 { pb::Action::Dislike } else { pb::Action::Like };
                        match c.act(1, msg, mid, owner_of(msg), action).await {
                            Ok(r) => {
                                ok += 1;
                                keep_newest(&mut acked, (mid, 1, msg), (r.version, r.state));
                            }
                            // Allowed across a flip: fail fast, nothing written.
                            Err(s) if s.code() == tonic::Code::Unavailable => {
                                unavailable += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(s) => panic!("unexpected status for {action:?} by {mid} on {msg}: {s:?}"),
                        }
                    }
                    (acked, ok, unavailable)
                })
            })
            .collect();
        let readers = (0..readers)
            .map(|i| {
                let (c, stop) = (c.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u64, 0u64);
                    let mut n = i;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let msgs: Vec<i64> = (0..5).map(|k| 1 + (n * 7 + k) % 50).collect();
                        let counts = c.counts(1, &msgs).await;
                        let states = c.states(1, 10_000 + (n % 4) * 1_000_000 + n % 100, &msgs).await;
                        if counts.is_ok() && states.is_ok() {
                            ok += 1;
                        } else {
                            failed += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, writers, readers }
    }

    async fn stop(self) -> (Acked, u64, u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut acked, mut ok, mut unavailable) = (Acked::new(), 0, 0);
        for w in self.writers {
            let (a, o, u) = w.await.expect("writer");
            ok += o;
            unavailable += u;
            for (k, v) in a {
                keep_newest(&mut acked, k, v);
            }
        }
        let (mut reads, mut failed) = (0, 0);
        for r in self.readers {
            let (o, f) = r.await.expect("reader");
            reads += o;
            failed += f;
        }
        (acked, ok, unavailable, reads, failed)
    }
}

async fn wait_route(file: &Path, epoch: u64, within: Duration) -> Route {
    wait_until(within, Duration::from_millis(20), || async {
        match std::fs::read_to_string(file).ok().and_then(|t| Route::parse(&t).ok()) {
            Some(r) if r.epoch >= epoch && !r.failover.promotion_pending => Ok(r),
            r => Err(format!("the route never reached epoch {epoch} with its promotion done: {r:?}")),
        }
    })
    .await
}

/// One flip of both tiers from dc-a to dc-b under load, with the operator
/// config's `topology.per_datacenter` as given.
async fn flip_scenario(per_datacenter: bool) {
    let layout = if per_datacenter { "per_datacenter" } else { "one job Deployment" };
    let name = if per_datacenter { "cflip-zones" } else { "cflip-plain" };
    let _restore = RestoreTiers;
    // Both Redis masters while the leftovers of an earlier run are removed
    // (dc-b's included), then dc-b a replica of dc-a in both tiers.
    stack(&["start", "mariadb", "a"]);
    stack(&["start", "mariadb", "b"]);
    stack(&["redis-follow", "a", "none"]);
    stack(&["redis-follow", "b", "none"]);
    forget(name).await;
    // dc-b a fresh replica of dc-a's MariaDB, unless it already replicates
    // a writable dc-a (as `RestoreTiers` leaves them): a reseed copies all
    // of dc-a, a minute here.
    if read_only('a').await != Some(false) || replication_threads('b').await != (true, true) {
        stack(&["reseed", "a", "b"]);
    }
    stack(&["redis-follow", "b", "a"]);

    let dir = std::env::temp_dir().join(format!("thumbup-cluster-flip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ports = Ports::pick();
    let op_config = dir.join("operator.yaml");
    std::fs::write(&op_config, operator_yaml("dc-a", &ports, per_datacenter)).unwrap();
    let cfg = OperatorConfig::load(&op_config).expect("the operator config is valid");
    assert!(cfg.db_proxy.enabled && cfg.failover.redis_tier && cfg.topology.per_datacenter == per_datacenter);

    // The failover controller, out of cluster: the route file. Its replay
    // reads the registry as the kubelet syncs it (written below).
    let route_file = dir.join("route.yaml");
    let registry_dir = dir.join("registry");
    std::fs::create_dir_all(&registry_dir).unwrap();
    let tenants_file = registry_dir.join(REGISTRY_KEY);
    std::fs::write(&tenants_file, "tenants: []\n").unwrap();
    let opts = failover::Options::local(op_config.clone(), route_file.clone(), tenants_file.clone()).unwrap();
    let (stop_failover, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut failover_task = FailoverTask(tokio::spawn(failover::run(opts, async {
        let _ = stopped.await;
    })));
    let route = wait_route(&route_file, 1, Duration::from_secs(10)).await;
    assert_eq!(
        (route.active_datacenter.as_str(), route.active_redis_address()),
        ("dc-a", Some(redis_addr('a').as_str()))
    );

    // The tenant controller against the mocked API server, given the route.
    let (op_client, fake) = FakeApi::start(BTreeMap::new());
    let (route_tx, route_rx) = tokio::sync::watch::channel(Some(route.clone()));
    let ctx = Context::new(op_client.clone(), Arc::new(cfg.clone()), NS.into(), Metrics, route_rx);
    let lt = apply(&fake, &ctx, name).await;
    let cm = stored(&fake, &cm_path());
    let registry_text = cm["data"][REGISTRY_KEY].as_str().expect("tenants.yaml in the registry ConfigMap").to_string();
    // The entry names the proxy for both tiers (and its local listeners).
    let parsed: Value = serde_yaml::from_str(&registry_text).unwrap();
    let e = &parsed["tenants"][0];
    assert_eq!(e["name"].as_str(), Some(name));
    assert_eq!(e["db"]["url"].as_str(), Some(format!("mysql://127.0.0.1:{}", ports.db).as_str()), "{registry_text}");
    assert_eq!(
        e["redis"]["url"].as_str(),
        Some(format!("redis://127.0.0.1:{}", ports.redis).as_str()),
        "{registry_text}"
    );
    assert_eq!(e["redis"]["replica_acks"].as_u64(), Some(1), "{registry_text}");
    if per_datacenter {
        assert_eq!(
            (e["local_reads"]["redis_url"].as_str(), e["local_reads"]["db_url"].as_str()),
            (
                Some(format!("redis://127.0.0.1:{}", ports.local_redis).as_str()),
                Some(format!("mysql://127.0.0.1:{}", ports.local).as_str())
            ),
            "{registry_text}"
        );
    } else {
        assert!(e.get("local_reads").is_none(), "{registry_text}");
    }
    println!(
        "[{layout}] registry entry written by the tenant controller names the proxy: db mysql://127.0.0.1:{}, redis \
         redis://127.0.0.1:{}{}",
        ports.db,
        ports.redis,
        if per_datacenter {
            format!(", local_reads redis://127.0.0.1:{} mysql://127.0.0.1:{}", ports.local_redis, ports.local)
        } else {
            String::new()
        }
    );
    // The registry as the kubelet would sync it, for the failover
    // controller's replay (it needs no credential).
    let registry_secret = stored(&fake, &secret_path());
    for key in names::registry_secret_keys(name) {
        std::fs::write(registry_dir.join(&key), secret_key(&registry_secret, &key)).unwrap();
    }
    std::fs::write(&tenants_file, &registry_text).unwrap();
    let loaded = Config::load_with(&tenants_file, Some(&registry_dir));
    assert!(loaded.is_ok(), "the registry does not load with its Secret's keys: {:?}", loaded.err());

    // The job as the job Deployment runs it (dc-b's, per datacenter).
    let (deployment, consumer) = if per_datacenter {
        (names::job_deployment_in(name, "dc-b"), format!("{}-pod-0", names::job_deployment_in(name, "dc-b")))
    } else {
        (names::job_deployment(name), format!("{}-pod-0", names::job_deployment(name)))
    };
    let job_dir = dir.join("job-mount");
    let (job_args, sidecar_args) = job_mount(&fake, name, &deployment, &job_dir);
    // The sidecar of that pod: the proxy both the job and the service use.
    let at = |port: u16| format!("127.0.0.1:{port}");
    let mut want = vec![format!("--listen={}", at(ports.db)), format!("--redis-listen={}", at(ports.redis))];
    if per_datacenter {
        want.extend([
            "--datacenter=dc-b".to_string(),
            format!("--local-listen={}", at(ports.local)),
            format!("--local-redis-listen={}", at(ports.local_redis)),
        ]);
    }
    assert!(want.iter().all(|w| sidecar_args.contains(w)), "[{layout}] sidecar args {sidecar_args:?}, want {want:?}");
    let proxy = Proxy::with_args(&dir, "proxy", &route_file, &sidecar_args);
    proxy.wait_epoch(1, Duration::from_secs(5)).await;
    println!(
        "[{layout}] db-proxy started with the job Deployment's sidecar arguments {sidecar_args:?} (route file for the ConfigMap)"
    );
    let config_arg = job_args.iter().find_map(|a| a.strip_prefix("--config=")).expect("--config").to_string();
    let t: TenantConfig =
        Config::load_tenant(Path::new(&config_arg), Some(&job_dir), name).expect("the job's mounted config loads");
    let (redis_user, db_user) = (t.redis.username.clone(), t.db.username.clone());

    // The service following the registry in the API.
    let (svc_api, refused) = registry_watch(fake.objects.clone());
    let (addr, stop_service) = service(&dir, svc_api).await;
    let token = String::from_utf8(secret_key(&stored(&fake, &tenant_secret_path(name)), "token")).unwrap();
    let c = client(&addr, name, &token).await;
    let first = wait_until(Duration::from_secs(30), Duration::from_millis(50), || async {
        match c.act(1, 1, 1, owner_of(1), pb::Action::Like).await {
            Ok(r) => Ok(r),
            Err(s) => Err(format!("the service does not serve {name} from the registry in the API: {s:?}")),
        }
    })
    .await;
    let mut job = spawn_job(&job_args, &consumer, &dir.join("job.log"));

    let load = Load::start(&c, 8, 4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = sessions(&redis_user, &db_user).await;
    println!(
        "[{layout}] before the flip, sessions of {redis_user} / {db_user}: dc-a Redis {} DB {}, dc-b Redis {} DB {}",
        before.0, before.1, before.2, before.3
    );
    assert!(before.0 > 0 && before.1 > 0, "[{layout}] the processes hold no session on dc-a's servers: {before:?}");

    // What the registry is before the flip.
    let (cm_before, secret_before) = (stored(&fake, &cm_path()), stored(&fake, &secret_path()));
    let tenant_secret_before = stored(&fake, &tenant_secret_path(name));
    let (cm_writes, secret_writes) = (writes(&fake, &cm_path()), writes(&fake, &secret_path()));
    let tenant_secret_writes = writes(&fake, &tenant_secret_path(name));

    // A planned switchover of both tiers to dc-b.
    std::fs::write(&op_config, operator_yaml("dc-b", &ports, per_datacenter)).unwrap();
    let asked = Instant::now();
    let route = wait_route(&route_file, 2, Duration::from_secs(30)).await;
    let flipped = asked.elapsed();
    proxy.wait_epoch(2, Duration::from_secs(5)).await;
    assert_eq!(route.failover.last_transition.as_ref().map(|l| l.kind), Some(TransitionKind::Switchover));
    assert_eq!(route.active_redis_address(), Some(redis_addr('b').as_str()));
    assert_eq!(read_only('a').await, Some(true), "the old primary DB is fenced");
    assert_eq!(redis_role('b').await.0, "master", "dc-b's Redis is promoted");
    let proxy_after = asked.elapsed();

    // No session of the tenant's users is left on dc-a's servers; some are on dc-b's.
    let after = wait_until(Duration::from_secs(5), Duration::from_millis(100), || async {
        let s = sessions(&redis_user, &db_user).await;
        if (s.0, s.1) == (0, 0) && s.2 > 0 && s.3 > 0 {
            Ok((s, asked.elapsed()))
        } else {
            Err(format!(
                "[{layout}] after the switchover: dc-a Redis {} DB {}, dc-b Redis {} DB {} sessions of the tenant",
                s.0, s.1, s.2, s.3
            ))
        }
    })
    .await;
    println!(
        "[{layout}] switchover to dc-b: route epoch 2 {flipped:?} after the config change, the proxy held it after \
         {proxy_after:?}; {:?} after the change, sessions of {redis_user} / {db_user}: dc-a Redis {} DB {}, dc-b \
         Redis {} DB {}",
        after.1, after.0.0, after.0.1, after.0.2, after.0.3
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut acked, ok, unavailable, reads, reads_failed) = load.stop().await;
    keep_newest(&mut acked, (1, 1, 1), (first.version, first.state));
    // Still none on dc-a once the load after the flip has run.
    let later = sessions(&redis_user, &db_user).await;
    assert_eq!((later.0, later.1), (0, 0), "[{layout}] sessions back on dc-a's servers: {later:?}");

    // (1) The flip wrote nothing to the registry objects.
    assert_eq!(writes(&fake, &cm_path()), cm_writes, "[{layout}] the registry ConfigMap was written by the flip");
    assert_eq!(writes(&fake, &secret_path()), secret_writes, "[{layout}] the registry Secret was written by the flip");
    assert_eq!(stored(&fake, &cm_path()), cm_before);
    assert_eq!(stored(&fake, &secret_path()), secret_before);
    // The tenant controller's pass after the flip (the route names dc-b, the
    // config too) sends the same bytes and changes no stored object.
    let cfg_b = OperatorConfig::load(&op_config).expect("the operator config after the switchover");
    assert_eq!(cfg_b.active_datacenter, "dc-b");
    route_tx.send(Some(route.clone())).unwrap();
    let ctx_b = Context::new(op_client, Arc::new(cfg_b), NS.into(), Metrics, route_tx.subscribe());
    let stored_lt: LikeTenant = serde_json::from_value(stored(&fake, &lt_path(name))).unwrap();
    assert_eq!(stored_lt.metadata.finalizers, lt.metadata.finalizers);
    reconcile(&ctx_b, &stored_lt).await;
    let status: Value = stored(&fake, &lt_path(name))["status"].clone();
    assert_eq!(status["activeDatacenter"].as_str(), Some("dc-b"), "the pass saw the route: {status}");
    let cm_after = writes(&fake, &cm_path());
    let secret_after = writes(&fake, &secret_path());
    let tenant_secret_after = writes(&fake, &tenant_secret_path(name));
    assert_eq!(cm_after, cm_writes, "[{layout}] the pass after the flip wrote the registry ConfigMap");
    let new_secret: Vec<&String> = secret_after[secret_writes.len()..].iter().collect();
    assert!(
        !new_secret.is_empty() && new_secret.iter().all(|w| *w == secret_writes.last().unwrap()),
        "[{layout}] the pass after the flip sent other registry Secret bytes"
    );
    let new_tenant_secret: Vec<&String> = tenant_secret_after[tenant_secret_writes.len()..].iter().collect();
    assert!(
        new_tenant_secret.iter().all(|w| *w == tenant_secret_writes.last().unwrap()),
        "[{layout}] the pass after the flip sent another tenant Secret (the job's config)"
    );
    assert_eq!(stored(&fake, &cm_path()), cm_before, "[{layout}] the registry ConfigMap changed");
    assert_eq!(stored(&fake, &secret_path()), secret_before, "[{layout}] the registry Secret changed");
    assert_eq!(stored(&fake, &tenant_secret_path(name)), tenant_secret_before, "[{layout}] the tenant Secret changed");
    println!(
        "[{layout}] registry: ConfigMap written {} time(s) before the flip, 0 by the flip and 0 by the controller's \
         pass after it (tenants.yaml {} bytes, equal); registry Secret applied {} time(s) before, 0 by the flip, {} \
         by the pass after it with the same {} bytes, stored object equal; tenant Secret (the job's config) re-applied \
         {} time(s) with the same bytes",
        cm_writes.len(),
        registry_text.len(),
        secret_writes.len(),
        new_secret.len(),
        secret_writes.last().unwrap().len(),
        new_tenant_secret.len()
    );
    assert!(refused.lock().unwrap().is_empty(), "requests RBAC would refuse: {:?}", refused.lock().unwrap());

    // (3) Every acknowledged like is on dc-b, with its newest state.
    wait_drained(&Keys::new(&t.name, t.stream.shards), Duration::from_secs(90)).await;
    check_acked_and_states_at(&admin_url('b'), &c, &t, &acked).await;
    let ex = check_exact_at(&admin_url('b'), &t).await;
    println!(
        "[{layout}] {ok} likes acknowledged ({unavailable} UNAVAILABLE), all {} records on dc-b with their newest \
         state; reads {reads} ok, {reads_failed} failed; {} counts rows and {} likes exact on dc-b, {} cached counts equal",
        acked.len(),
        ex.items,
        ex.likes,
        ex.cached_counts
    );
    assert!(ok > 200, "[{layout}] too little load to mean anything: {ok}");

    assert!(terminate(&mut job), "[{layout}] the job exits cleanly");
    let _ = stop_service.send(());
    drop(proxy);
    let _ = stop_failover.send(());
    (&mut failover_task.0).await.expect("failover controller task").expect("the failover controller ended cleanly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flip_leaves_no_process_on_the_old_redis_or_db_and_rewrites_no_registry() {
    flip_scenario(false).await;
    flip_scenario(true).await;
}
