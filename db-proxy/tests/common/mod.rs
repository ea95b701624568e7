//! The proxy's test harness: the built `thumbup-db-proxy` as a child
//! process (ports learned from its ready file), its admin endpoint over a
//! bare HTTP/1.1 exchange, its metrics, and sqlx sessions through it to the
//! local stack's MariaDB servers (dc-a on 23306, dc-b on 23307 by default).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::{ConnectOptions, Connection};
use thumbup_test_support::dirs::fresh_test_dir;
use thumbup_test_support::stack::{admin_db_url, admin_db_url_b};
use thumbup_test_support::wait::{wait_until, wait_until_blocking};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `host:port` of a DB URL.
pub fn address(url: &str) -> String {
    let opts = MySqlConnectOptions::from_str(url).unwrap();
    format!("{}:{}", opts.get_host(), opts.get_port())
}

/// The port of a DB URL.
pub fn port(url: &str) -> u16 {
    MySqlConnectOptions::from_str(url).unwrap().get_port()
}

/// A route document with dc-a and dc-b at the given addresses.
pub fn route_yaml(epoch: u64, active: &str, dc_a: &str, dc_b: &str) -> String {
    format!("epoch: {epoch}\nactiveDatacenter: {active}\ndatacenters:\n  dc-a: \"{dc_a}\"\n  dc-b: \"{dc_b}\"\n")
}

/// A route document naming the stack's two MariaDB servers.
pub fn stack_route(epoch: u64, active: &str) -> String {
    route_yaml(epoch, active, &address(&admin_db_url()), &address(&admin_db_url_b()))
}

/// A `thumbup-db-proxy` child process; killed on drop.
pub struct Proxy {
    child: Child,
    dir: PathBuf,
    /// Where DB clients connect.
    pub listen: SocketAddr,
    /// The admin endpoint.
    pub admin: SocketAddr,
    /// Where Redis clients connect (with `--redis-listen`).
    pub redis: Option<SocketAddr>,
}

/// The route token of the proxies that [`Proxy::start`] runs.
pub const ROUTE_TOKEN: &str = "route-token-of-the-tests-0001";
/// In [`Proxy::start`]'s `extra`: run the proxy without a route token file.
pub const NO_ROUTE_TOKEN: &str = "--no-route-token";

impl Proxy {
    /// Starts the proxy on free ports with `extra` arguments. With `route`,
    /// it follows a route file that starts with that document; without,
    /// it has no route source but `PUT /route`. It takes `PUT /route` with
    /// [`ROUTE_TOKEN`] (see [`Proxy::put_route`]) unless `extra` holds
    /// `--no-route-token` (dropped from the arguments).
    pub fn start(test: &str, route: Option<&str>, extra: &[&str]) -> Proxy {
        let dir = fresh_test_dir(&format!("db-proxy-{test}"));
        let ready = dir.join("ready");
        let log = std::fs::File::create(dir.join("proxy.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_thumbup-db-proxy"));
        cmd.args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--ready-file"]).arg(&ready);
        if let Some(text) = route {
            let file = dir.join("route.yaml");
            write_atomically(&file, text);
            cmd.arg("--route-file").arg(&file);
        }
        if !extra.contains(&NO_ROUTE_TOKEN) {
            let file = dir.join("route-token");
            write_atomically(&file, &format!("{ROUTE_TOKEN}\n"));
            cmd.arg("--route-token-file").arg(&file);
        }
        let child = cmd
            .args(extra.iter().filter(|a| **a != NO_ROUTE_TOKEN))
            .env("RUST_LOG", "thumbup_db_proxy=debug,info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn thumbup-db-proxy");
        let text = wait_until_blocking(Duration::from_secs(20), Duration::from_millis(20), || {
            std::fs::read_to_string(&ready)
                .map_err(|_| format!("no ready file from the proxy; see {}", dir.join("proxy.log").display()))
        });
        let addr = |key: &str| -> SocketAddr {
            text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.parse().ok()).expect(&text)
        };
        let redis = text.lines().find_map(|l| l.strip_prefix("redis=")).and_then(|v| v.parse().ok());
        Proxy { child, dir, listen: addr("listen="), admin: addr("admin="), redis }
    }

    /// Starts the proxy following a route file that names the stack's two
    /// MariaDB servers, `active` at `epoch`, and waits until it holds it.
    pub async fn following(test: &str, epoch: u64, active: &str, extra: &[&str]) -> Proxy {
        let proxy = Proxy::start(test, Some(&stack_route(epoch, active)), extra);
        proxy.wait_epoch(epoch).await;
        proxy
    }

    /// Replaces the route file's content (atomically, as the operator does).
    pub fn write_route(&self, text: &str) {
        write_atomically(&self.dir.join("route.yaml"), text);
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit; its status.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        wait_until_blocking(within, Duration::from_millis(20), || {
            self.child.try_wait().unwrap().ok_or_else(|| format!("the proxy did not exit within {within:?}"))
        })
    }

    /// `PUT /route` with the route token: (status, body).
    pub async fn put_route(&self, body: &str) -> (u16, String) {
        self.http_as("PUT", "/route", body, Some(ROUTE_TOKEN)).await
    }

    /// One admin request without credentials: (status, body).
    pub async fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.http_as(method, path, body, None).await
    }

    /// One admin request, with `authorization: Bearer <token>` when given.
    pub async fn http_as(&self, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).await.unwrap();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            self.admin,
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, body.to_string())
    }

    /// The value of one sample, e.g. `thumbup_db_proxy_sessions{datacenter="dc-a"}`
    /// (0 when absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        let (status, text) = self.http("GET", "/metrics", "").await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `sample` reaches `want`.
    pub async fn wait_metric(&self, sample: &str, want: f64) {
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || async {
            let got = self.metric(sample).await;
            if got == want { Ok(()) } else { Err(format!("{sample} is {got}, not {want}")) }
        })
        .await
    }

    /// The held route as JSON (None before one).
    pub async fn route(&self) -> Option<serde_json::Value> {
        let (status, body) = self.http("GET", "/route", "").await;
        match status {
            200 => Some(serde_json::from_str(&body).unwrap()),
            404 => None,
            other => panic!("GET /route: {other} {body}"),
        }
    }

    /// Waits until the held route has `epoch`.
    pub async fn wait_epoch(&self, epoch: u64) {
        wait_until(Duration::from_secs(5), Duration::from_millis(20), || async {
            let held = self.route().await.and_then(|r| r["epoch"].as_u64());
            if held == Some(epoch) { Ok(()) } else { Err(format!("the proxy holds epoch {held:?}, not {epoch}")) }
        })
        .await
    }

    /// A DB session through the proxy, as the stack's admin user.
    pub async fn connect(&self) -> Result<MySqlConnection, sqlx::Error> {
        let opts = MySqlConnectOptions::from_str(&admin_db_url()).unwrap().host("127.0.0.1").port(self.listen.port());
        tokio::time::timeout(Duration::from_secs(10), opts.connect()).await.expect("connecting through the proxy hung")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The port of the server a session reached.
pub async fn server_port(conn: &mut MySqlConnection) -> Result<u16, sqlx::Error> {
    let port: u64 = sqlx::query_scalar("SELECT @@port").fetch_one(conn).await?;
    Ok(u16::try_from(port).unwrap())
}

/// Closes a session politely (COM_QUIT).
pub async fn quit(conn: MySqlConnection) {
    conn.close().await.unwrap();
}

/// Fails the test with the way out when MariaDB b of the stack is down.
pub async fn require_dc_b() {
    let b = address(&admin_db_url_b());
    assert!(TcpStream::connect(&b).await.is_ok(), "MariaDB b ({b}) is down: `bash scripts/stack.sh start mariadb b`");
}
