//! The local stack of `scripts/stack.sh`: what `stack.sh env` exports (admin
//! URLs, ports, TLS files), with the script's own defaults when a variable
//! is not set, admin connections to its servers, and the script itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use thumbup_core::cache::Conn;

fn env_or(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

/// Admin URL of dc-a's MariaDB (the primary).
pub fn admin_db_url() -> String {
    env_or("THUMBUP_ADMIN_DB_URL", "mysql://thumbup_admin:thumbup-admin@127.0.0.1:23306")
}

/// Admin URL of dc-b's MariaDB (dc-a's replica).
pub fn admin_db_url_b() -> String {
    env_or("THUMBUP_ADMIN_DB_URL_B", "mysql://thumbup_admin:thumbup-admin@127.0.0.1:23307")
}

/// True in cluster mode (`THUMBUP_E2E_REDIS_CLUSTER=1`): dc-a's Redis is
/// the stack's Redis Cluster (`scripts/stack.sh cluster-up`) instead of
/// its single Redis, for the tests that run against both.
pub fn cluster_mode() -> bool {
    CLUSTER_MODE.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var("THUMBUP_E2E_REDIS_CLUSTER").is_ok_and(|v| v == "1")
}

static CLUSTER_MODE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turns cluster mode on for this test process (a test binary whose tests
/// all run on the cluster).
pub fn use_cluster() {
    CLUSTER_MODE.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Cluster mode for as long as the returned guard lives, then as before:
/// one test of a binary whose other tests use the single servers (it must
/// hold the binary's lock, the mode is process-wide).
pub fn cluster_mode_scope() -> ClusterModeScope {
    ClusterModeScope(CLUSTER_MODE.swap(true, std::sync::atomic::Ordering::Relaxed))
}

/// See [`cluster_mode_scope`].
pub struct ClusterModeScope(bool);

impl Drop for ClusterModeScope {
    fn drop(&mut self) {
        CLUSTER_MODE.store(self.0, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The ports of datacenter `dc`'s (`'a'` or `'b'`) nodes of the stack's
/// Redis Cluster when it spans the two datacenters (`stack.sh
/// cluster-split`): the first three, or the last three.
pub fn cluster_half(dc: char) -> Vec<u16> {
    let off = if dc == 'b' { 3 } else { 0 };
    (0..3).map(|i| cluster_port() + off + i).collect()
}

/// The pid of a running node of the stack's Redis Cluster.
pub fn cluster_node_pid(port: u16) -> Option<u32> {
    let dir = std::env::var("THUMBUP_STACK_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join(".stack"));
    std::fs::read_to_string(dir.join(format!("redis-cluster-{port}")).join("redis.pid")).ok()?.trim().parse().ok()
}

/// The first port of the stack's Redis Cluster (six nodes from it).
pub fn cluster_port() -> u16 {
    env_or("THUMBUP_REDIS_CLUSTER_PORT", "27001").parse().expect("THUMBUP_REDIS_CLUSTER_PORT")
}

/// The seed URLs of the stack's Redis Cluster, without credentials.
pub fn cluster_nodes() -> Vec<String> {
    (0..6).map(|i| format!("redis://127.0.0.1:{}", cluster_port() + i)).collect()
}

/// Admin URL of the stack's Redis Cluster (one node; the connection
/// discovers the rest).
pub fn admin_cluster_url() -> String {
    format!("redis://default:{}@127.0.0.1:{}?cluster=true", redis_admin_password(), cluster_port())
}

fn redis_admin_password() -> String {
    env_or("THUMBUP_REDIS_ADMIN_PASSWORD", "thumbup-admin")
}

/// The Redis instance that `stack.sh start|stop|kill redis <instance>`
/// acts on for dc-a: `cluster` (every node) in cluster mode, else `a`.
pub fn redis_instance() -> &'static str {
    if cluster_mode() { "cluster" } else { "a" }
}

/// The redis-servers that hold dc-a's data: the masters of the cluster in
/// cluster mode, else the one server; as `(host, port)` for
/// [`thumbup_core::cache::Conn::on_node`] (empty host: the server).
pub async fn redis_data_nodes(con: &mut Conn) -> Vec<(String, u16)> {
    thumbup_core::cache::scan_nodes(con).await.expect("the masters of the cluster")
}

/// Admin URL of dc-a's Redis: the cluster's in cluster mode.
pub fn admin_redis_url() -> String {
    if cluster_mode() {
        return admin_cluster_url();
    }
    env_or("THUMBUP_ADMIN_REDIS_URL", "redis://default:thumbup-admin@127.0.0.1:26379")
}

/// Admin URL of dc-b's Redis.
pub fn admin_redis_url_b() -> String {
    env_or("THUMBUP_ADMIN_REDIS_URL_B", "redis://default:thumbup-admin@127.0.0.1:26380")
}

/// The port of dc-a's MariaDB.
pub fn db_port() -> String {
    env_or("THUMBUP_DB_PORT", "23306")
}

/// The port of dc-a's Redis.
pub fn redis_port() -> String {
    env_or("THUMBUP_REDIS_PORT", "26379")
}

/// The TLS port of dc-a's Redis (scripts/stack.sh: its port + 10 by default).
pub fn redis_tls_port() -> String {
    std::env::var("THUMBUP_REDIS_TLS_PORT")
        .unwrap_or_else(|_| (redis_port().parse::<u16>().expect("THUMBUP_REDIS_PORT") + 10).to_string())
}

/// A file of the stack's TLS material: `THUMBUP_STACK_TLS_<var>` (from
/// `stack.sh env`), else `<stack dir>/tls/<file>`.
fn tls_file(var: &str, file: &str) -> PathBuf {
    if let Ok(p) = std::env::var(format!("THUMBUP_STACK_TLS_{var}")) {
        return PathBuf::from(p);
    }
    let dir = std::env::var("THUMBUP_STACK_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join(".stack"));
    dir.join("tls").join(file)
}

/// The pid of a running stack server (`redis-a`, `mariadb-a`, ...), from
/// its pid file.
pub fn server_pid(server: &str, instance: &str) -> Option<u32> {
    let dir = std::env::var("THUMBUP_STACK_DIR").map(PathBuf::from).unwrap_or_else(|_| root().join(".stack"));
    let file = match server {
        "redis" => dir.join(format!("redis-{instance}")).join("redis.pid"),
        _ => dir.join(format!("mariadb-{instance}")).join("mariadbd.pid"),
    };
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The stack's CA certificate (signs every server's certificate).
pub fn stack_ca() -> PathBuf {
    tls_file("CA", "ca.crt")
}

/// The stack's server certificate (for 127.0.0.1 and localhost).
pub fn server_cert_file() -> PathBuf {
    tls_file("CERT", "server.crt")
}

/// The key of [`server_cert_file`].
pub fn server_key_file() -> PathBuf {
    tls_file("KEY", "server.key")
}

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("test-support/ has a parent").to_path_buf()
}

/// Runs `scripts/stack.sh <args>` and fails the test if it fails.
pub fn stack(args: &[&str]) {
    let status = Command::new("bash").arg(root().join("scripts/stack.sh")).args(args).status().expect("run stack.sh");
    assert!(status.success(), "scripts/stack.sh {args:?} failed");
}

/// `scheme://user:password@host:port` -> (`scheme://host:port`, user, password).
pub fn split(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, host) = rest.rsplit_once('@').unwrap();
    let (user, pw) = auth.split_once(':').unwrap();
    (format!("{scheme}://{host}"), user.into(), pw.into())
}

/// An admin connection to dc-a's MariaDB, in no schema.
pub async fn admin_db() -> MySqlConnection {
    MySqlConnectOptions::from_str(&admin_db_url()).unwrap().connect().await.expect("admin DB connection")
}

/// An admin connection to dc-a's Redis (the cluster in cluster mode).
pub async fn admin_redis() -> Conn {
    admin_redis_at(&admin_redis_url()).await
}

/// An admin connection to the Redis at admin URL `url` (a cluster with
/// `?cluster=true`).
pub async fn admin_redis_at(url: &str) -> Conn {
    // Not the client's default 500 ms: a loaded test machine stalls longer.
    thumbup_core::cache::admin_connect(url, Duration::from_secs(10)).await.expect("admin Redis")
}
