//! thumbup-e2e: end-to-end tests of thumbup (in `tests/`), and this, their
//! harness: real MariaDB and Redis started by `scripts/stack.sh` (reached
//! through `thumbup-test-support`), tenants provisioned with the admin
//! accounts, the service run in-process on port 0 and the job run as a
//! child process (so it can be SIGKILLed), clients, load, and the checks of
//! the invariants against the DB and Redis.
//!
//! TLS mode (`THUMBUP_E2E_TLS=1`, a second pass of scripts/test.sh): the
//! service serves TLS only with the stack's server certificate, clients
//! trust the stack's CA, and tenants reach Redis on its TLS port
//! (`rediss://`) and the DB with `tls: verify-identity`, as DB users created
//! `REQUIRE SSL`; [`World::start`] checks that each tenant's DB session is
//! encrypted and that a plaintext one is refused.

pub mod datacenters;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::{ConnectOptions, Connection, MySqlConnection, Row};
use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::keys::{JOB_GROUP, Keys};
use thumbup_core::{db, provision};
use thumbup_service::pb;
use thumbup_service::pb::thumbup_client::ThumbupClient;
use thumbup_test_support::dirs::{fresh_test_dir, test_dir};
use thumbup_test_support::stack::{
    admin_db_url, admin_redis, admin_redis_url, cluster_mode, cluster_nodes, db_port, redis_port, redis_tls_port,
    server_cert_file, server_key_file, stack_ca,
};
use thumbup_test_support::wait::{wait_until, wait_until_blocking};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

/// The directory of test `test`'s [`World`] (its config is `config.yaml` there).
pub fn world_dir(test: &str) -> PathBuf {
    test_dir(&format!("e2e-{test}"))
}

/// Every record's version, on the server at admin URL `url`.
async fn record_versions_at(url: &str, t: &TenantConfig) -> BTreeMap<(i64, i64, i64), i64> {
    let mut con = admin_db_at(url, t).await;
    let rows: Vec<(i64, i64, i64, i64)> =
        sqlx::query_as("SELECT mid, business_id, message_id, version FROM like_records")
            .fetch_all(&mut con)
            .await
            .expect("read record versions");
    rows.into_iter().map(|(m, b, g, v)| ((m, b, g), v)).collect()
}

/// True in TLS mode: `THUMBUP_E2E_TLS=1`.
pub fn tls_mode() -> bool {
    std::env::var("THUMBUP_E2E_TLS").is_ok_and(|v| v == "1")
}

/// The stack's server certificate and key (for 127.0.0.1 and localhost).
pub fn stack_server_tls() -> thumbup_service::ServerTls {
    thumbup_service::ServerTls { cert_file: server_cert_file(), key_file: server_key_file() }
}

/// The YAML of a test tenant; `extra` is appended to the tenant's mapping.
/// In TLS mode ([`tls_mode`]) the tenant reaches Redis and the DB over TLS.
pub fn tenant_yaml(name: &str, businesses: &[i64], extra: &str) -> String {
    let user = name.replace('-', "_");
    let biz: Vec<String> = businesses.iter().map(|b| format!("{{ name: b{b}, id: {b} }}")).collect();
    let (redis_url, redis_tls, db_tls) = if tls_mode() {
        let ca = stack_ca().display().to_string();
        (
            format!("rediss://127.0.0.1:{}", redis_tls_port()),
            format!(", tls: {{ ca_file: \"{ca}\" }}"),
            format!(", tls: {{ mode: verify-identity, ca_file: \"{ca}\" }}"),
        )
    } else if cluster_mode() {
        // The cluster: seed nodes, and a like waits for its master's replica.
        let seeds: Vec<String> = cluster_nodes().iter().skip(1).map(|u| format!("\"{u}\"")).collect();
        // THUMBUP_E2E_REPLICA_ACKS=0 shows what the wait is for: the master
        // loss test then finds acknowledged likes missing.
        let acks = std::env::var("THUMBUP_E2E_REPLICA_ACKS").unwrap_or_else(|_| "1".into());
        let cluster = format!(", cluster: true, seeds: [{}], replica_acks: {acks}", seeds.join(", "));
        (cluster_nodes()[0].clone(), cluster, String::new())
    } else {
        (format!("redis://127.0.0.1:{}", redis_port()), String::new(), String::new())
    };
    format!(
        r#"  - name: {name}
    businesses: [{biz}]
    tokens: [tok-{name}-0001]
    redis: {{ url: "{redis_url}", username: thumbup-{name}, password: pw-{name}-redis{redis_tls} }}
    db: {{ url: "mysql://127.0.0.1:{dp}", username: thumbup_{user}, password: pw-{name}-db, max_connections: 24{db_tls} }}
    limits: {{ per_mid_per_sec: 1000000, per_tenant_per_sec: 1000000, db_fallback_per_sec: 100000 }}
    stream: {{ shards: 4, retention_secs: 3600 }}
{extra}"#,
        biz = biz.join(", "),
        dp = db_port(),
    )
}

/// Drops everything a tenant has (schema and keys), then provisions and
/// migrates it afresh, so a test starts from nothing.
pub async fn reset_tenant(t: &TenantConfig) {
    let mut con = thumbup_test_support::stack::admin_db().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS `{}`", t.schema())))
        .execute(&mut con)
        .await
        .expect("drop schema");
    let mut r = admin_redis().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(thumbup_core::names::key_pattern(&t.name)).query_async(&mut r).await.unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(&keys).query_async(&mut r).await.unwrap();
    }
    provision::provision_db(&admin_db_url(), t).await.expect("provision DB");
    provision::provision_redis(&admin_redis_url(), t).await.expect("provision Redis");
    let pool = db::connect_lazy(t).unwrap();
    db::migrate(&pool).await.expect("migrate");
    db::migrate(&pool).await.expect("migrate is idempotent");
    if t.db.tls.is_some() {
        assert_db_tls_enforced(t).await;
    }
}

/// The tenant's DB session is encrypted, and the server refuses the tenant's
/// user a plaintext one (it is `REQUIRE SSL`).
pub async fn assert_db_tls_enforced(t: &TenantConfig) {
    let mut con = db::connect_options(t).unwrap().connect().await.expect("tenant DB session over TLS");
    let row = sqlx::query("SHOW SESSION STATUS LIKE 'Ssl_cipher'").fetch_one(&mut con).await.unwrap();
    let cipher: String = row.get(1);
    assert!(!cipher.is_empty(), "tenant {}: DB session not encrypted", t.name);
    con.close().await.unwrap();
    let plain = db::connect_options(t).unwrap().ssl_mode(sqlx::mysql::MySqlSslMode::Disabled).connect().await;
    let e = plain.err().unwrap_or_else(|| panic!("tenant {}: a plaintext DB session was accepted", t.name));
    let code = e.as_database_error().and_then(|d| d.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("28000"), "tenant {}: plaintext refused as access denied: {e}", t.name);
}

/// A test world: a config file with the given tenants, reset and provisioned,
/// and the service serving it in-process.
pub struct World {
    /// The world's directory ([`world_dir`]): its config, the jobs' logs.
    pub dir: PathBuf,
    /// The config file the service and the jobs read.
    pub config_path: PathBuf,
    /// That config, parsed.
    pub config: Config,
    /// The service's address, `http://127.0.0.1:<port>` (`https` in TLS mode).
    pub addr: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The in-process service logs to stderr when `THUMBUP_E2E_LOG` holds a
/// filter (`info`, `thumbup_service=debug`, ...); quiet otherwise.
fn log_if_asked() {
    if let Ok(filter) = std::env::var("THUMBUP_E2E_LOG") {
        let filter = tracing_subscriber::EnvFilter::new(filter);
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
}

impl World {
    /// `tenants_yaml` is the list under `tenants:` (from [`tenant_yaml`]).
    pub async fn start(test: &str, tenants_yaml: &str) -> World {
        World::start_with(test, tenants_yaml, thumbup_service::limits::ServerLimits::default()).await
    }

    /// [`World::start`] with a server bounded by `limits`.
    pub async fn start_with(test: &str, tenants_yaml: &str, limits: thumbup_service::limits::ServerLimits) -> World {
        log_if_asked();
        let dir = fresh_test_dir(&format!("e2e-{test}"));
        let config_path = dir.join("config.yaml");
        let text = format!("tenants:\n{tenants_yaml}");
        std::fs::write(&config_path, &text).unwrap();
        let config = Config::parse(&text, "test").expect("test config parses");
        for t in &config.tenants {
            reset_tenant(t).await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls_mode() { "https" } else { "http" };
        let addr = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let opts = thumbup_service::Options {
            config: config_path.clone(),
            redis_timeout: Duration::from_millis(1000),
            ready: None,
            limits,
        };
        let files = thumbup_service::ConfigFiles { tls: tls_mode().then(stack_server_tls), ..Default::default() };
        let server = tokio::spawn(thumbup_service::run_with(opts, files, listener, async {
            let _ = rx.await;
        }));
        World { dir, config_path, config, addr, shutdown: Some(tx), server: Some(server) }
    }

    /// The config of tenant `name`.
    pub fn tenant(&self, name: &str) -> &TenantConfig {
        self.config.tenant(name).expect("tenant in test config")
    }

    /// A client sending `tenant` and `token` metadata.
    pub async fn client(&self, tenant: &str, token: &str) -> Client {
        let ca = tls_mode().then(stack_ca);
        let endpoint = thumbup_service::client_endpoint(&self.addr, ca.as_deref()).unwrap();
        let channel = endpoint.connect().await.expect("connect to service");
        Client { inner: ThumbupClient::new(channel), tenant: tenant.to_string(), token: token.to_string() }
    }

    /// A client of tenant `name` with its own token.
    pub async fn client_of(&self, name: &str) -> Client {
        self.client(name, &format!("tok-{name}-0001")).await
    }

    /// Starts the job of `tenant` as a child process.
    pub fn job(&self, tenant: &str, window_ms: u64) -> Job {
        Job::start(self, tenant, window_ms, "e2e-job")
    }

    /// Starts a job of `tenant` under another consumer name.
    pub fn job_named(&self, tenant: &str, window_ms: u64, consumer: &str) -> Job {
        Job::start(self, tenant, window_ms, consumer)
    }

    /// Stops the in-process service.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), s).await;
        }
    }
}

/// A gRPC client bound to a tenant and token.
#[derive(Clone)]
pub struct Client {
    /// The generated client.
    pub inner: ThumbupClient<Channel>,
    /// Sent as `x-thumbup-tenant` (not at all when empty).
    pub tenant: String,
    /// Sent as `authorization: Bearer <token>` (not at all when empty).
    pub token: String,
}

impl Client {
    /// Wraps `msg` with this client's metadata.
    pub fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if !self.tenant.is_empty() {
            r.metadata_mut().insert("x-thumbup-tenant", MetadataValue::try_from(self.tenant.as_str()).unwrap());
        }
        if !self.token.is_empty() {
            r.metadata_mut()
                .insert("authorization", MetadataValue::try_from(format!("Bearer {}", self.token)).unwrap());
        }
        r
    }

    /// Sends one action.
    pub async fn act(
        &self,
        biz: i64,
        msg: i64,
        mid: i64,
        up: i64,
        action: pb::Action,
    ) -> Result<pb::LikeReply, tonic::Status> {
        let req = pb::LikeRequest { business_id: biz, message_id: msg, mid, up_mid: up, action: action as i32 };
        let what = || format!("{action:?} by {mid} on ({biz}, {msg})");
        answered(what, self.inner.clone().like(self.req(req))).await.map(|r| r.into_inner())
    }

    /// States of `mid` on `msgs`.
    pub async fn states(&self, biz: i64, mid: i64, msgs: &[i64]) -> Result<HashMap<i64, i32>, tonic::Status> {
        let req = pb::GetStatesRequest { business_id: biz, mid, message_ids: msgs.to_vec() };
        let what = || format!("GetStates of {mid} on {} items", msgs.len());
        answered(what, self.inner.clone().get_states(self.req(req))).await.map(|r| r.into_inner().states)
    }

    /// Counts of `msgs`.
    pub async fn counts(&self, biz: i64, msgs: &[i64]) -> Result<HashMap<i64, (i64, i64)>, tonic::Status> {
        let req = pb::GetCountsRequest { business_id: biz, message_ids: msgs.to_vec() };
        let what = || format!("GetCounts of {} items", msgs.len());
        let reply = answered(what, self.inner.clone().get_counts(self.req(req))).await?.into_inner();
        Ok(reply.counts.into_iter().map(|(m, c)| (m, (c.likes, c.dislikes))).collect())
    }

    /// All of a user's liked items, following page tokens.
    pub async fn user_likes(&self, biz: i64, mid: i64, page_size: u32) -> Result<Vec<i64>, tonic::Status> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let req = pb::ListUserLikesRequest { business_id: biz, mid, page_size, page_token: token };
            let reply = self.inner.clone().list_user_likes(self.req(req)).await?.into_inner();
            out.extend(reply.items.iter().map(|i| i.message_id));
            if reply.next_page_token.is_empty() {
                return Ok(out);
            }
            token = reply.next_page_token;
        }
    }
}

/// The server answers every unary request within its request timeout
/// ([`thumbup_service::limits::ServerLimits::request_timeout`], 5 s by
/// default): a request still open 10 s after that is a hang, and fails the
/// test naming it (instead of a test that never ends).
async fn answered<T>(
    what: impl FnOnce() -> String,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    let limit = thumbup_service::limits::ServerLimits::default().request_timeout + Duration::from_secs(10);
    match tokio::time::timeout(limit, call).await {
        Ok(out) => out,
        Err(_) => panic!("{} got no answer within {limit:?}", what()),
    }
}

/// The job as a child process.
pub struct Job {
    child: Child,
    args: Vec<String>,
    log: PathBuf,
    /// How many times the job was started (1, then one more per [`Job::restart`]).
    pub starts: u32,
}

/// The job binary next to the test binary (`cargo build --workspace --bins`).
pub fn job_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("thumbup-job");
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

impl Job {
    fn start(w: &World, tenant: &str, window_ms: u64, consumer: &str) -> Job {
        let args = vec![
            "--config".to_string(),
            w.config_path.display().to_string(),
            "--tenant".into(),
            tenant.into(),
            "--window-ms".into(),
            window_ms.to_string(),
            "--consumer".into(),
            consumer.into(),
            "--claim-idle-ms".into(),
            "1000".into(),
            "--read-count".into(),
            "200".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
        ];
        let log = w.dir.join(format!("job-{tenant}-{consumer}.log"));
        let child = Self::spawn(&args, &log);
        Job { child, args, log, starts: 1 }
    }

    fn spawn(args: &[String], log: &Path) -> Child {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Command::new(job_binary())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn thumbup-job")
    }

    /// SIGKILLs the job (no flush).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same consumer name.
    pub fn restart(&mut self) {
        self.child = Self::spawn(&self.args, &self.log);
        self.starts += 1;
    }

    /// SIGTERMs the job and waits for it to exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status =
            wait_until_blocking(Duration::from_secs(30), Duration::from_millis(50), || match self.child.try_wait() {
                Ok(Some(status)) => Ok(status),
                _ => Err(format!("job did not exit within 30 s of SIGTERM; log: {}", self.log.display())),
            });
        status.success()
    }

    /// The job's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service binary as a child process: a datacenter's own instance,
/// which a test can SIGKILL with the datacenter's servers. Plain gRPC (the
/// failover suites run without TLS).
pub struct ServiceProcess {
    child: Child,
    /// `http://127.0.0.1:<port>`.
    pub addr: String,
    /// The admin endpoint, `127.0.0.1:<port>`.
    pub admin: String,
    /// Its log (stderr).
    pub log: PathBuf,
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl ServiceProcess {
    /// Starts `thumbup-service` on `config`, logging to `<dir>/<name>.log`;
    /// returns once it serves gRPC.
    pub async fn start(dir: &Path, name: &str, config: &Path) -> ServiceProcess {
        let (grpc, admin) = (free_port(), free_port());
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(job_binary().with_file_name("thumbup-service"))
            .arg("--config")
            .arg(config)
            .args(["--listen", &format!("127.0.0.1:{grpc}"), "--admin-listen", &format!("127.0.0.1:{admin}")])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn thumbup-service");
        let p = ServiceProcess {
            child,
            addr: format!("http://127.0.0.1:{grpc}"),
            admin: format!("127.0.0.1:{admin}"),
            log,
        };
        let addr = format!("127.0.0.1:{grpc}");
        wait_until(Duration::from_secs(30), Duration::from_millis(50), || async {
            tokio::net::TcpStream::connect(&addr).await.map_err(|e| format!("{name} does not serve on {addr}: {e}"))
        })
        .await;
        p
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A client sending `tenant` and `token` metadata.
    pub async fn client(&self, tenant: &str, token: &str) -> Client {
        let endpoint = thumbup_service::client_endpoint(&self.addr, None).unwrap();
        let channel = endpoint.connect().await.expect("connect to the service process");
        Client { inner: ThumbupClient::new(channel), tenant: tenant.to_string(), token: token.to_string() }
    }

    /// The sum of the samples of metric `name` with `labels`, from its
    /// /metrics.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.admin).await.expect("admin endpoint");
        let req = format!("GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.admin);
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGKILLs it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The newest-user bound of `shard` and `biz` (`Keys::newest`) as Redis
/// holds it: `Some(bound)` once established, `None` while absent or being
/// established.
pub async fn newest_bound(keys: &Keys, shard: u32, biz: i64) -> Option<i64> {
    let mut r = admin_redis().await;
    let v: Option<String> = redis::cmd("GET").arg(keys.newest(shard, biz)).query_async(&mut r).await.unwrap();
    v.and_then(|v| v.parse().ok())
}

/// Likes `msg` by users never seen, of `shard` (mids from `from` on, one
/// per shard step), until the newest-user bound of `shard` and `biz` is
/// established (the job must run: it is established once the job has
/// applied the shard past the moment it began). Returns the bound and the
/// next unused mid of the shard.
pub async fn establish_newest_bound(
    client: &Client,
    keys: &Keys,
    biz: i64,
    shard: u32,
    from: i64,
    msg: i64,
) -> (i64, i64) {
    let step = i64::from(keys.shards());
    let mut mid = from + (i64::from(shard) - from.rem_euclid(step)).rem_euclid(step);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert_eq!(keys.shard_of(mid), shard);
        client.act(biz, msg, mid, owner_of(msg), pb::Action::Like).await.expect("a new user's like");
        mid += step;
        if let Some(bound) = newest_bound(keys, shard, biz).await {
            return (bound, mid);
        }
        assert!(
            std::time::Instant::now() < until,
            "the newest-user bound of shard {shard} was not established in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Entries delivered to the job but not acknowledged, over all shards.
pub async fn pending(keys: &Keys) -> i64 {
    let mut r = admin_redis().await;
    let mut total = 0;
    for shard in 0..keys.shards() {
        let reply: redis::RedisResult<(i64, redis::Value, redis::Value, redis::Value)> =
            redis::cmd("XPENDING").arg(keys.stream(shard)).arg(JOB_GROUP).query_async(&mut r).await;
        if let Ok((n, ..)) = reply {
            total += n;
        }
    }
    total
}

/// Entries not yet delivered to the job's group (or all, before the group
/// exists), counted by id after the group's last delivered id: the group's
/// `lag` field is not exact after Redis restarts from its append-only file.
pub async fn undelivered(keys: &Keys) -> i64 {
    let mut r = admin_redis().await;
    let mut total = 0;
    for shard in 0..keys.shards() {
        let key = keys.stream(shard);
        let groups: Vec<HashMap<String, redis::Value>> =
            redis::cmd("XINFO").arg("GROUPS").arg(&key).query_async(&mut r).await.unwrap_or_default();
        let last = groups
            .iter()
            .find(|g| {
                g.get("name").and_then(|v| redis::from_redis_value_ref::<String>(v).ok()).as_deref() == Some(JOB_GROUP)
            })
            .and_then(|g| g.get("last-delivered-id").and_then(|v| redis::from_redis_value_ref::<String>(v).ok()));
        total += match last {
            Some(id) => {
                let after: Vec<redis::Value> = redis::cmd("XRANGE")
                    .arg(&key)
                    .arg(format!("({id}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(100_000)
                    .query_async(&mut r)
                    .await
                    .unwrap_or_default();
                after.len() as i64
            }
            None => redis::cmd("XLEN").arg(&key).query_async::<i64>(&mut r).await.unwrap_or(0),
        };
    }
    total
}

/// Waits until the job has applied and acknowledged everything.
pub async fn wait_drained(keys: &Keys, within: Duration) {
    wait_until(within, Duration::from_millis(100), || async {
        let (u, p) = (undelivered(keys).await, pending(keys).await);
        if u == 0 && p == 0 { Ok(()) } else { Err(format!("stream not drained: {u} undelivered, {p} pending")) }
    })
    .await
}

/// A tenant's DB as the admin sees it.
pub async fn admin_db(t: &TenantConfig) -> MySqlConnection {
    admin_db_at(&admin_db_url(), t).await
}

/// A tenant's DB on the server at admin URL `url` (another datacenter's).
pub async fn admin_db_at(url: &str, t: &TenantConfig) -> MySqlConnection {
    let opts: sqlx::mysql::MySqlConnectOptions = url.parse().unwrap();
    opts.database(&t.schema()).connect().await.expect("admin DB connection")
}

/// Final states of all records: (mid, business, message) -> state code.
pub async fn records(t: &TenantConfig) -> BTreeMap<(i64, i64, i64), i64> {
    records_at(&admin_db_url(), t).await
}

/// [`records`] on the server at admin URL `url`.
async fn records_at(url: &str, t: &TenantConfig) -> BTreeMap<(i64, i64, i64), i64> {
    let mut con = admin_db_at(url, t).await;
    let rows =
        sqlx::query("SELECT mid, business_id, message_id, state FROM like_records").fetch_all(&mut con).await.unwrap();
    rows.iter()
        .map(|r| ((r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2)), r.get::<i8, _>(3) as i64))
        .collect()
}

/// What [`check_exact`] saw.
#[derive(Debug, Default)]
pub struct Exactness {
    /// Items with a counts row.
    pub items: usize,
    /// Owners with a received-likes row.
    pub owners: usize,
    /// Counts rows whose value is cached in Redis.
    pub cached_counts: usize,
    /// Records in LIKE.
    pub likes: i64,
}

/// Invariant 1: every counts row equals the number of records in LIKE
/// (resp. DISLIKE), received likes equal the sum over the owner's items, and
/// every cached count and received-likes value equals the DB.
pub async fn check_exact(t: &TenantConfig) -> Exactness {
    check_exact_at(&admin_db_url(), t).await
}

/// [`check_exact`] with the DB on the server at admin URL `url`.
pub async fn check_exact_at(url: &str, t: &TenantConfig) -> Exactness {
    let mut con = admin_db_at(url, t).await;
    let want: BTreeMap<(i64, i64), (i64, i64)> = sqlx::query(
        "SELECT business_id, message_id, CAST(SUM(state = 1) AS SIGNED), CAST(SUM(state = 2) AS SIGNED) \
         FROM like_records GROUP BY business_id, message_id",
    )
    .fetch_all(&mut con)
    .await
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
    .collect();
    let got: BTreeMap<(i64, i64), (i64, i64, i64)> =
        sqlx::query("SELECT business_id, message_id, likes, dislikes, version FROM like_counts")
            .fetch_all(&mut con)
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3), r.get(4))))
            .collect();
    for (item, (likes, dislikes)) in &want {
        let (gl, gd, _) = got.get(item).copied().unwrap_or_default();
        assert_eq!((gl, gd), (*likes, *dislikes), "counts row of item {item:?} differs from its records");
    }
    for (item, (l, d, _)) in &got {
        if !want.contains_key(item) {
            assert_eq!((*l, *d), (0, 0), "counts row of item {item:?} has no records");
        }
    }
    let want_rcv: BTreeMap<(i64, i64), i64> = sqlx::query(
        "SELECT business_id, up_mid, CAST(SUM(state = 1) AS SIGNED) FROM like_records GROUP BY business_id, up_mid",
    )
    .fetch_all(&mut con)
    .await
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
    .collect();
    let got_rcv: BTreeMap<(i64, i64), (i64, i64)> =
        sqlx::query("SELECT business_id, up_mid, likes, version FROM received_likes")
            .fetch_all(&mut con)
            .await
            .unwrap()
            .iter()
            .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
            .collect();
    for (owner, likes) in &want_rcv {
        assert_eq!(
            got_rcv.get(owner).map_or(0, |v| v.0),
            *likes,
            "received likes of {owner:?} differ from the records"
        );
    }
    for (owner, (likes, _)) in &got_rcv {
        assert_eq!(want_rcv.get(owner).copied().unwrap_or(0), *likes, "received likes of {owner:?} without records");
    }
    let keys = Keys::new(&t.name, t.stream.shards);
    let mut r = admin_redis().await;
    let mut cached_counts = 0;
    for ((biz, msg), (l, d, v)) in &got {
        let cached: Option<String> = redis::cmd("GET").arg(keys.counts(*biz, *msg)).query_async(&mut r).await.unwrap();
        if let Some(c) = cached {
            cached_counts += 1;
            assert_eq!(c, format!("{l}:{d}:{v}"), "cached counts of item ({biz}, {msg}) differ from the DB");
        }
    }
    for ((biz, up), (l, v)) in &got_rcv {
        let cached: Option<String> = redis::cmd("GET").arg(keys.received(*biz, *up)).query_async(&mut r).await.unwrap();
        if let Some(c) = cached {
            assert_eq!(c, format!("{l}:0:{v}"), "cached received likes of ({biz}, {up}) differ from the DB");
        }
    }
    Exactness { items: got.len(), owners: got_rcv.len(), cached_counts, likes: want.values().map(|v| v.0).sum() }
}

/// Every key of a tenant with its serialized value (DUMP): a snapshot to
/// prove that a request changed nothing in Redis.
pub async fn redis_snapshot(tenant: &str) -> BTreeMap<String, Vec<u8>> {
    let mut r = admin_redis().await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(thumbup_core::names::key_pattern(tenant)).query_async(&mut r).await.unwrap();
    let mut out = BTreeMap::new();
    for k in keys {
        let v: Option<Vec<u8>> = redis::cmd("DUMP").arg(&k).query_async(&mut r).await.unwrap();
        out.insert(k, v.unwrap_or_default());
    }
    out
}

/// All rows of a tenant's tables, as text: a snapshot to prove that a
/// request changed nothing in the DB.
pub async fn db_snapshot(t: &TenantConfig) -> Vec<String> {
    let mut con = admin_db(t).await;
    let mut out = Vec::new();
    for (table, cols) in [
        ("like_records", "mid, business_id, message_id, up_mid, state, version, mtime"),
        ("like_counts", "business_id, message_id, likes, dislikes, version"),
        ("received_likes", "business_id, up_mid, likes, version"),
        ("cache_invalidations", "id, mid, business_id, message_id, up_mid"),
    ] {
        let sql = format!("SELECT CONCAT_WS(',', {cols}) FROM {table} ORDER BY 1");
        for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut con).await.unwrap() {
            out.push(format!("{table}:{}", row.get::<String, _>(0)));
        }
    }
    out
}

/// Per record, the acknowledged reply with the newest version: (version, state).
pub type Acked = HashMap<(i64, i64, i64), (i64, i32)>;

/// Records an acknowledged reply, keeping the newest version per record.
pub fn keep_newest(acked: &mut Acked, record: (i64, i64, i64), reply: (i64, i32)) {
    let e = acked.entry(record).or_insert(reply);
    if reply.0 > e.0 {
        *e = reply;
    }
}

/// Waits until the in-process service serves tenant `name` from Redis again.
pub async fn wait_redis_back(name: &str) {
    wait_until(Duration::from_secs(30), Duration::from_millis(100), || async {
        let down = thumbup_service::metrics::REDIS_DOWN.with_label_values(&[name]).get() != 0;
        if down { Err("service never went back to Redis".to_string()) } else { Ok(()) }
    })
    .await
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Per record, the acknowledged reply with the newest version.
    pub acked: Acked,
    /// OK replies.
    pub ok: usize,
    /// FAILED_PRECONDITION replies.
    pub refused: usize,
    /// Calls made.
    pub sent: usize,
    /// UNAVAILABLE replies ([`run_load_through_faults`] only).
    pub unavailable: usize,
    /// Records with an UNAVAILABLE reply: nothing was acknowledged, but a
    /// call whose outcome the service could not know may have taken effect.
    pub ambiguous: std::collections::BTreeSet<(i64, i64, i64)>,
}

/// True when an UNAVAILABLE status says when to retry (google.rpc.RetryInfo).
pub fn has_retry_info(s: &tonic::Status) -> bool {
    use tonic_types::StatusExt;
    s.get_details_retry_info().is_some_and(|r| r.retry_delay.is_some())
}

/// Waits until the service decides tenant `name`'s writes on the DB path.
pub async fn wait_db_path_open(name: &str) {
    wait_until(Duration::from_secs(30), Duration::from_millis(20), || async {
        let open = thumbup_service::metrics::DB_PATH_OPEN.with_label_values(&[name]).get() == 1;
        if open { Ok(()) } else { Err("the DB path never opened".to_string()) }
    })
    .await
}

/// Load shape.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Concurrent clients.
    pub clients: usize,
    /// Actions sent, over all clients.
    pub actions: usize,
    /// Users 1..=users act.
    pub users: i64,
    /// Items 1..=items are acted on (item 1 the most).
    pub items: i64,
    /// The business of every action.
    pub business: i64,
    /// Fraction of actions sent twice at once (a double click).
    pub double_clicks: f64,
}

/// The owner of item `msg` in the tests (a few owners share the items).
pub fn owner_of(msg: i64) -> i64 {
    9_000 + msg % 7
}

/// Sends `load.actions` random actions from `load.clients` concurrent clients
/// with a zipf-like item choice. Every reply must be OK or
/// FAILED_PRECONDITION; anything else fails the test.
pub async fn run_load(client: &Client, load: Load) -> LoadOutcome {
    load_with(client, load, false).await
}

/// [`run_load`] while a server fails: UNAVAILABLE is allowed too (counted,
/// its record noted as ambiguous), and must carry RetryInfo.
pub async fn run_load_through_faults(client: &Client, load: Load) -> LoadOutcome {
    load_with(client, load, true).await
}

async fn load_with(client: &Client, load: Load, faults: bool) -> LoadOutcome {
    use rand::Rng;
    let weights: Vec<f64> = (0..load.items).map(|i| 1.0 / ((i + 1) as f64).powf(1.1)).collect();
    let total: f64 = weights.iter().sum();
    let per_client = load.actions.div_ceil(load.clients);
    let mut tasks = Vec::new();
    for _ in 0..load.clients {
        let c = client.clone();
        let weights = weights.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = LoadOutcome::default();
            let mut sent = 0;
            while sent < per_client {
                let (mid, msg, action, twice) = {
                    let mut rng = rand::rng();
                    let mut x = rng.random::<f64>() * total;
                    let mut msg = load.items;
                    for (i, w) in weights.iter().enumerate() {
                        if x < *w {
                            msg = i as i64 + 1;
                            break;
                        }
                        x -= w;
                    }
                    let action = match rng.random_range(0..10) {
                        0..=3 => pb::Action::Like,
                        4..=5 => pb::Action::Unlike,
                        6..=7 => pb::Action::Dislike,
                        _ => pb::Action::Undislike,
                    };
                    (rng.random_range(1..=load.users), msg, action, rng.random::<f64>() < load.double_clicks)
                };
                let replies = if twice {
                    let (a, b) = tokio::join!(
                        c.act(load.business, msg, mid, owner_of(msg), action),
                        c.act(load.business, msg, mid, owner_of(msg), action)
                    );
                    sent += 2;
                    vec![a, b]
                } else {
                    sent += 1;
                    vec![c.act(load.business, msg, mid, owner_of(msg), action).await]
                };
                for r in replies {
                    out.sent += 1;
                    match r {
                        Ok(reply) => {
                            out.ok += 1;
                            keep_newest(&mut out.acked, (mid, load.business, msg), (reply.version, reply.state));
                        }
                        Err(s) if s.code() == tonic::Code::FailedPrecondition => out.refused += 1,
                        Err(s) if faults && s.code() == tonic::Code::Unavailable => {
                            assert!(has_retry_info(&s), "UNAVAILABLE without RetryInfo: {s:?}");
                            out.unavailable += 1;
                            out.ambiguous.insert((mid, load.business, msg));
                        }
                        Err(s) => panic!("unexpected status for {action:?} by {mid} on {msg}: {s:?}"),
                    }
                }
            }
            out
        }));
    }
    let mut all = LoadOutcome::default();
    for t in tasks {
        let o = t.await.expect("load task");
        all.ok += o.ok;
        all.refused += o.refused;
        all.sent += o.sent;
        all.unavailable += o.unavailable;
        all.ambiguous.extend(o.ambiguous);
        for (k, v) in o.acked {
            keep_newest(&mut all.acked, k, v);
        }
    }
    all
}

/// Invariant 2 and 3 from the client's side: every record's final state is
/// the state of its newest acknowledged write, and GetStates agrees with the
/// records for every (user, item) touched.
pub async fn check_acked_and_states(client: &Client, t: &TenantConfig, acked: &Acked) {
    check_acked_and_states_at(&admin_db_url(), client, t, acked).await
}

/// [`check_acked_and_states`] with the DB on the server at admin URL `url`.
pub async fn check_acked_and_states_at(url: &str, client: &Client, t: &TenantConfig, acked: &Acked) {
    check_settled_at(url, client, t, acked, &Default::default()).await
}

/// [`check_acked_and_states`], except that a record in `ambiguous` (a call
/// with an unknown outcome) may have moved past its newest acknowledged
/// write: it must hold that version or a newer one.
pub async fn check_acked_and_states_except(
    client: &Client,
    t: &TenantConfig,
    acked: &Acked,
    ambiguous: &std::collections::BTreeSet<(i64, i64, i64)>,
) {
    check_settled_at(&admin_db_url(), client, t, acked, ambiguous).await
}

async fn check_settled_at(
    url: &str,
    client: &Client,
    t: &TenantConfig,
    acked: &Acked,
    ambiguous: &std::collections::BTreeSet<(i64, i64, i64)>,
) {
    let recs = records_at(url, t).await;
    let versions = record_versions_at(url, t).await;
    for (key, (version, state)) in acked {
        if ambiguous.contains(key) {
            let v = versions.get(key).copied().unwrap_or(0);
            assert!(v >= *version, "record {key:?}: holds v{v}, older than its acknowledged v{version}");
            continue;
        }
        assert_eq!(
            recs.get(key).copied(),
            Some(*state as i64),
            "record {key:?}: newest acknowledged write (v{version}) lost"
        );
    }
    let mut by_user: BTreeMap<(i64, i64), Vec<i64>> = BTreeMap::new();
    for (mid, biz, msg) in recs.keys() {
        by_user.entry((*mid, *biz)).or_default().push(*msg);
    }
    for ((mid, biz), msgs) in by_user {
        for chunk in msgs.chunks(100) {
            let states = client.states(biz, mid, chunk).await.expect("GetStates");
            for msg in chunk {
                assert_eq!(
                    states.get(msg).map(|s| *s as i64),
                    recs.get(&(mid, biz, *msg)).copied(),
                    "GetStates of user {mid} on ({biz}, {msg}) differs from the record"
                );
            }
        }
    }
}
