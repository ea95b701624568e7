//! The two datacenters of the stack as the failover suites see them
//! (failover.rs, cluster_flip.rs): each one's admin URLs, what its servers
//! report (roles, replication, the tenant's sessions), a real
//! `thumbup-db-proxy` following a route file, and the guard that puts the
//! servers back as every suite expects them.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::{Connection, MySqlConnection, Row};
use thumbup_test_support::stack::{
    admin_db_url, admin_db_url_b, admin_redis_at, admin_redis_url, admin_redis_url_b, stack,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::job_binary;

/// The admin URL of datacenter `dc`'s MariaDB ('a' or 'b').
pub fn admin_url(dc: char) -> String {
    if dc == 'a' { admin_db_url() } else { admin_db_url_b() }
}

/// The admin URL of datacenter `dc`'s Redis.
pub fn admin_redis_of(dc: char) -> String {
    if dc == 'a' { admin_redis_url() } else { admin_redis_url_b() }
}

/// `@@read_only` of `dc`'s MariaDB; None when it does not answer.
pub async fn read_only(dc: char) -> Option<bool> {
    let mut con = MySqlConnection::connect(&admin_url(dc)).await.ok()?;
    let v: i64 = sqlx::query_scalar("SELECT @@read_only").fetch_one(&mut con).await.ok()?;
    Some(v != 0)
}

/// Whether `dc`'s MariaDB replication threads run: (IO, SQL); both false
/// when it is no replica or does not answer.
pub async fn replication_threads(dc: char) -> (bool, bool) {
    let Ok(mut con) = MySqlConnection::connect(&admin_url(dc)).await else { return (false, false) };
    let Ok(Some(row)) = sqlx::raw_sql("SHOW SLAVE STATUS").fetch_optional(&mut con).await else {
        return (false, false);
    };
    let running = |k: &str| row.try_get::<String, _>(k).is_ok_and(|v| v == "Yes");
    (running("Slave_IO_Running"), running("Slave_SQL_Running"))
}

/// `INFO replication` of `dc`'s Redis: (role, master port, link up).
pub async fn redis_role(dc: char) -> (String, Option<u16>, bool) {
    let mut con = admin_redis_at(&admin_redis_of(dc)).await;
    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut con).await.unwrap();
    let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)?.strip_prefix(':')).map(|v| v.trim().to_string());
    (
        field("role").unwrap_or_default(),
        field("master_port").and_then(|p| p.parse().ok()),
        field("master_link_status").as_deref() == Some("up"),
    )
}

/// Connections of ACL user `user` to `dc`'s Redis (CLIENT LIST).
pub async fn redis_clients_of(dc: char, user: &str) -> usize {
    let mut con = admin_redis_at(&admin_redis_of(dc)).await;
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut con).await.unwrap();
    list.lines().filter(|l| l.split(' ').any(|f| f == format!("user={user}"))).count()
}

/// Sessions of DB user `user` on `dc`'s MariaDB (processlist).
pub async fn db_sessions_of(dc: char, user: &str) -> i64 {
    let mut db = MySqlConnection::connect(&admin_url(dc)).await.expect("admin DB");
    sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = ?")
        .bind(user)
        .fetch_one(&mut db)
        .await
        .unwrap()
}

/// Leaves the MariaDB pair as every scenario expects it: both servers up,
/// dc-a primary, dc-b a fresh replica.
pub fn restore_stack() {
    stack(&["start", "mariadb", "a"]);
    stack(&["start", "mariadb", "b"]);
    stack(&["reseed", "a", "b"]);
}

/// Puts the two datacenters' Redis and MariaDB back as every scenario
/// expects them (both up, each Redis a master, dc-a's MariaDB primary),
/// also when a scenario fails halfway: the next test binaries share them.
pub struct RestoreTiers;

impl Drop for RestoreTiers {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| {
            stack(&["start", "redis", "a"]);
            stack(&["redis-follow", "a", "none"]);
            stack(&["redis-follow", "b", "none"]);
            restore_stack();
        });
    }
}

/// The token the proxies of these tests take `PUT /route` with.
pub const PROXY_ROUTE_TOKEN: &str = "failover-route-token-0001";

/// One HTTP/1.0 request: (status, body); a `PUT` carries the proxies'
/// route token. (0, "") when the server does not answer.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr).await else { return (0, String::new()) };
    let auth = if method == "PUT" { format!("Authorization: Bearer {PROXY_ROUTE_TOKEN}\r\n") } else { String::new() };
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/yaml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

/// A `thumbup-db-proxy` child process following a route file.
pub struct Proxy {
    child: Child,
    /// Its DB listener.
    pub listen: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
    /// Its Redis listener (used when the route moves the Redis tier).
    pub redis: SocketAddr,
}

impl Proxy {
    /// A proxy on free loopback ports, named `name` in `dir` (its log and
    /// ready file).
    pub fn start(dir: &Path, name: &str, route_file: &Path) -> Proxy {
        let args = ["--listen=127.0.0.1:0", "--redis-listen=127.0.0.1:0", "--admin-listen=127.0.0.1:0"];
        Proxy::with_args(dir, name, route_file, &args.map(String::from))
    }

    /// A proxy started with `args` (e.g. a pod spec's sidecar arguments,
    /// each `--flag=value`), following `route_file` instead of a route
    /// ConfigMap, its admin endpoint moved to the loopback.
    pub fn with_args(dir: &Path, name: &str, route_file: &Path, args: &[String]) -> Proxy {
        let bin = job_binary().with_file_name("thumbup-db-proxy");
        assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
        let ready = dir.join(format!("{name}.ready"));
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log"))).unwrap();
        let token_file = dir.join(format!("{name}.route-token"));
        std::fs::write(&token_file, format!("{PROXY_ROUTE_TOKEN}\n")).unwrap();
        let args = args.iter().filter(|a| !a.starts_with("--route-config-map=")).map(|a| {
            match a.strip_prefix("--admin-listen=0.0.0.0:") {
                Some(port) => format!("--admin-listen=127.0.0.1:{port}"),
                None => a.clone(),
            }
        });
        let child = Command::new(bin)
            .args(args)
            .arg("--route-file")
            .arg(route_file)
            .arg("--route-token-file")
            .arg(&token_file)
            .arg("--ready-file")
            .arg(&ready)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn thumbup-db-proxy");
        let deadline = Instant::now() + Duration::from_secs(15);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&ready)
                && t.contains("admin=")
            {
                break t;
            }
            assert!(Instant::now() < deadline, "db-proxy {name} did not write {}", ready.display());
            std::thread::sleep(Duration::from_millis(50));
        };
        let field = |k: &str| -> SocketAddr {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("{k} in the ready file: {text}"))
        };
        Proxy { child, listen: field("listen="), admin: field("admin="), redis: field("redis=") }
    }

    /// The epoch the proxy holds (0 before any route).
    pub async fn epoch(&self) -> u64 {
        let (status, body) = http(self.admin, "GET", "/route", "").await;
        if status != 200 {
            return 0;
        }
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["epoch"].as_u64()).unwrap_or(0)
    }

    /// Waits until the proxy holds `epoch`.
    pub async fn wait_epoch(&self, epoch: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.epoch().await < epoch {
            assert!(Instant::now() < deadline, "db-proxy never adopted epoch {epoch}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
