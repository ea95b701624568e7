//! thumbup-db-proxy: the L4 sidecar between a thumbup process (service or
//! job) and the DB. It listens on the pod's loopback and forwards each
//! client session to the DB of the active datacenter.
//!
//! The active datacenter comes from the route (`thumbup_core::route`): an
//! epoch and a datacenter, published by the operator's failover controller.
//! The proxy follows it from a file ([`source::follow_file`]), the route
//! ConfigMap ([`source::follow_config_map`]) or `PUT /route` on its admin
//! endpoint ([`admin`]). Every offer goes through [`routes::Routes::offer`]:
//! a newer epoch is adopted and every session opened under an older one is
//! closed at once (so no client keeps writing to a demoted DB); an older
//! epoch, or the same epoch naming another DB, is refused.
//!
//! Data path ([`forward`]): accept, take a session permit
//! (`--max-sessions`), register the session under the held route, dial that
//! route's active DB within the connect timeout, then copy bytes both ways
//! until either side closes or a flip aborts the session. With
//! `--redis-listen` a second listener does the same for the active
//! datacenter's Redis (the route's `redis:` addresses), so that the Redis
//! tier moves with the same epoch and a flip ends the Redis sessions too.
//!
//! Local reads: with `--datacenter NAME`, `--local-listen` and
//! `--local-redis-listen` forward to NAME's own DB and Redis as the route
//! names them (`datacenters[NAME]`, `redis[NAME]`), whichever datacenter is
//! active, so that a process in a standby datacenter reads from its own
//! replicas while it writes through the other listeners. A flip leaves
//! those sessions open (they only read, and their servers stay where they
//! are); a route that gives NAME's server another address ends them
//! ([`target`]). Until a first route is held, connections are closed on
//! arrival and `/readyz` is 503.

pub mod admin;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod routes;
pub mod source;
pub mod target;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{Instrument, info, info_span};

pub use error::Error;
pub use source::ConfigMapRef;

/// Where the route comes from, besides `PUT /route` (served only with a
/// route token, [`Options::route_token_file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSource {
    /// Only `PUT /route` on the admin endpoint.
    Admin,
    /// A file, read every [`source::FILE_POLL`].
    File(PathBuf),
    /// The key `route.yaml` of a ConfigMap, watched.
    ConfigMap(ConfigMapRef),
}

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where DB clients connect (port 0: any free port).
    pub listen: SocketAddr,
    /// Where Redis clients connect, when the route moves the Redis tier
    /// too (`redis:` in the route); None: no Redis listener.
    pub redis_listen: Option<SocketAddr>,
    /// This proxy's own datacenter, which the local-read listeners forward
    /// to; required with either of them.
    pub datacenter: Option<String>,
    /// Where local-read DB clients connect: forwarded to
    /// `route.datacenters[datacenter]`, whichever datacenter is active.
    pub local_listen: Option<SocketAddr>,
    /// Where local-read Redis clients connect: forwarded to
    /// `route.redis[datacenter]`, whichever datacenter is active.
    pub local_redis_listen: Option<SocketAddr>,
    /// The admin HTTP endpoint (port 0: any free port).
    pub admin_listen: SocketAddr,
    /// Where the route comes from.
    pub route: RouteSource,
    /// Sessions open at once; more are closed on arrival.
    pub max_sessions: usize,
    /// How long a dial of the DB may take.
    pub connect_timeout: Duration,
    /// Written (atomically) with `listen=ADDR`, `admin=ADDR` (and
    /// `redis=ADDR`, `local=ADDR`, `local_redis=ADDR`) lines once the
    /// listeners are bound ([`Listening::ready_file_text`]).
    pub ready_file: Option<PathBuf>,
    /// The tokens (one a line, read on each request) that `PUT /route`
    /// must carry as `authorization: Bearer`; None refuses every `PUT`.
    pub route_token_file: Option<PathBuf>,
}

/// Runs the proxy until `shutdown` resolves; then stops accepting and
/// closes every session.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    anyhow::ensure!(opts.max_sessions > 0, "max_sessions must be at least 1");
    if opts.route == RouteSource::Admin && opts.route_token_file.is_none() {
        anyhow::bail!("no route source: give --route-file, --route-config-map or --route-token-file (for PUT /route)");
    }
    let local = match (&opts.datacenter, opts.local_listen.is_some() || opts.local_redis_listen.is_some()) {
        (Some(dc), _) if dc.trim().is_empty() => anyhow::bail!("--datacenter is empty"),
        (None, true) => anyhow::bail!(
            "--local-listen and --local-redis-listen forward to this proxy's own datacenter: give --datacenter NAME"
        ),
        (dc, _) => dc.clone(),
    };
    if let Some(path) = &opts.route_token_file {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        anyhow::ensure!(
            text.lines().any(|l| l.trim().len() >= 16),
            "{}: holds no route token of 16 or more characters",
            path.display()
        );
    }
    let metrics = Arc::new(metrics::Metrics::new()?);
    let routes = routes::Routes::new(metrics.clone());
    // A missing kubeconfig fails the start rather than leaving a proxy that
    // never gets a route.
    let kube_client = match &opts.route {
        RouteSource::ConfigMap(_) => Some(kube::Client::try_default().await.map_err(Error::KubeClient)?),
        _ => None,
    };

    let (listener, listen) = bind("proxy", opts.listen).await?;
    // The other data listeners, each with the server it forwards to.
    let mut others: Vec<(TcpListener, SocketAddr, forward::Target)> = Vec::new();
    let mut bound = Listening { listen, admin: listen, redis: None, local: None, local_redis: None };
    let wanted = [
        ("redis proxy", opts.redis_listen, forward::Target::active(forward::Tier::Redis)),
        ("local proxy", opts.local_listen, forward::Target { tier: forward::Tier::Db, datacenter: local.clone() }),
        (
            "local redis proxy",
            opts.local_redis_listen,
            forward::Target { tier: forward::Tier::Redis, datacenter: local.clone() },
        ),
    ];
    for (what, addr, target) in wanted {
        let Some(addr) = addr else { continue };
        let (l, a) = bind(what, addr).await?;
        match (target.tier, target.follows_flips()) {
            (forward::Tier::Redis, true) => bound.redis = Some(a),
            (forward::Tier::Db, false) => bound.local = Some(a),
            (forward::Tier::Redis, false) => bound.local_redis = Some(a),
            (forward::Tier::Db, true) => unreachable!("the DB listener of the active datacenter is bound above"),
        }
        others.push((l, a, target));
    }
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let (admin_addr, admin_server) =
        admin::bind(opts.admin_listen, routes.clone(), metrics.clone(), opts.route_token_file.clone(), async {
            let _ = admin_stopped.await;
        })
        .await?;
    bound.admin = admin_addr;
    let admin_task = tokio::spawn(admin_server);
    info!(
        %listen,
        redis = ?bound.redis,
        datacenter = ?local,
        local = ?bound.local,
        local_redis = ?bound.local_redis,
        admin = %admin_addr,
        max_sessions = opts.max_sessions,
        "db-proxy listening"
    );
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, &bound)?;
    }

    let source_task = match (opts.route, kube_client) {
        (RouteSource::File(path), _) => Some(tokio::spawn(source::follow_file(path, routes.clone()))),
        (RouteSource::ConfigMap(cm), Some(client)) => {
            Some(tokio::spawn(source::follow_config_map(client, cm, routes.clone())))
        }
        _ => {
            info!("no route source: waiting for PUT /route on the admin endpoint");
            None
        }
    };

    // One session limit over every listener: it bounds the proxy's sockets.
    let forwarder = forward::Forwarder {
        target: forward::Target::active(forward::Tier::Db),
        routes: routes.clone(),
        metrics,
        sessions: Arc::new(Semaphore::new(opts.max_sessions)),
        connect_timeout: opts.connect_timeout,
    };
    let (stop_others, others_stopped) = tokio::sync::watch::channel(false);
    let other_tasks: Vec<_> = others
        .into_iter()
        .map(|(l, addr, target)| {
            let f = forward::Forwarder { target, ..forwarder.clone() };
            let mut stopped = others_stopped.clone();
            tokio::spawn(
                async move {
                    f.serve(l, async move {
                        let _ = stopped.wait_for(|stop| *stop).await;
                    })
                    .await
                }
                .instrument(info_span!("listener", %addr)),
            )
        })
        .collect();
    forwarder.serve(listener, shutdown).await;
    let _ = stop_others.send(true);
    for task in other_tasks {
        let _ = task.await;
    }
    // The listeners are gone: no new sessions. Now the open ones.
    let closed = routes.close_all();
    info!(closed, "stopped accepting; sessions closed");
    if let Some(task) = source_task {
        task.abort();
    }
    let _ = stop_admin.send(());
    admin_task.await??;
    Ok(())
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let l = TcpListener::bind(addr).await.map_err(|source| Error::Bind { what, addr, source })?;
    let bound = l.local_addr().map_err(|source| Error::Bind { what, addr, source })?;
    Ok((l, bound))
}

/// The bound addresses, as the ready file names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listening {
    /// The DB listener (`listen=`).
    pub listen: SocketAddr,
    /// The admin endpoint (`admin=`).
    pub admin: SocketAddr,
    /// The Redis listener (`redis=`), if any.
    pub redis: Option<SocketAddr>,
    /// The local-read DB listener (`local=`), if any.
    pub local: Option<SocketAddr>,
    /// The local-read Redis listener (`local_redis=`), if any.
    pub local_redis: Option<SocketAddr>,
}

impl Listening {
    /// `listen=ADDR\nadmin=ADDR\n`, then a line for each optional listener
    /// that is bound: `redis=`, `local=`, `local_redis=`.
    pub fn ready_file_text(&self) -> String {
        let mut text = format!("listen={}\nadmin={}\n", self.listen, self.admin);
        for (key, addr) in [("redis", self.redis), ("local", self.local), ("local_redis", self.local_redis)] {
            if let Some(addr) = addr {
                text.push_str(&format!("{key}={addr}\n"));
            }
        }
        text
    }
}

/// Writes [`Listening::ready_file_text`] to a temporary file beside `path`
/// and renames it over `path`, so that a reader never sees half of it.
pub fn write_ready_file(path: &Path, bound: &Listening) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bound.ready_file_text())
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::ReadyFile { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_ready_file_names_every_bound_listener_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("thumbup-db-proxy-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready");
        let mut bound = Listening { listen: addr(1), admin: addr(2), redis: None, local: None, local_redis: None };
        write_ready_file(&path, &bound).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "listen=127.0.0.1:1\nadmin=127.0.0.1:2\n");
        bound.redis = Some(addr(3));
        write_ready_file(&path, &bound).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "listen=127.0.0.1:1\nadmin=127.0.0.1:2\nredis=127.0.0.1:3\n"
        );
        bound.local = Some(addr(4));
        bound.local_redis = Some(addr(5));
        write_ready_file(&path, &bound).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "listen=127.0.0.1:1\nadmin=127.0.0.1:2\nredis=127.0.0.1:3\nlocal=127.0.0.1:4\nlocal_redis=127.0.0.1:5\n"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn options() -> Options {
        Options {
            listen: addr(0),
            redis_listen: None,
            datacenter: None,
            local_listen: None,
            local_redis_listen: None,
            admin_listen: addr(0),
            route: RouteSource::Admin,
            max_sessions: 4,
            connect_timeout: Duration::from_millis(100),
            ready_file: None,
            route_token_file: None,
        }
    }

    #[tokio::test]
    async fn local_listeners_without_a_datacenter_refuse_to_start() {
        let mut opts = options();
        opts.route = RouteSource::File("/nonexistent/route.yaml".into());
        opts.local_redis_listen = Some(addr(0));
        let err = run(opts.clone(), std::future::ready(())).await.unwrap_err().to_string();
        assert!(err.contains("give --datacenter NAME"), "{err}");
        opts.datacenter = Some(" ".into());
        let err = run(opts, std::future::ready(())).await.unwrap_err().to_string();
        assert!(err.contains("--datacenter is empty"), "{err}");
    }

    #[tokio::test]
    async fn a_proxy_with_local_listeners_binds_them_and_names_them_in_its_ready_file() {
        let dir = std::env::temp_dir().join(format!("thumbup-db-proxy-local-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut opts = options();
        opts.route = RouteSource::File(dir.join("route.yaml"));
        opts.datacenter = Some("dc-b".into());
        opts.local_listen = Some(addr(0));
        opts.local_redis_listen = Some(addr(0));
        opts.ready_file = Some(dir.join("ready"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let proxy = tokio::spawn(run(opts, async {
            let _ = stopped.await;
        }));
        let ready = dir.join("ready");
        let mut text = String::new();
        for _ in 0..200 {
            if let Ok(t) = std::fs::read_to_string(&ready) {
                text = t;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let keys: Vec<&str> = text.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        assert_eq!(keys, ["listen", "admin", "local", "local_redis"], "{text}");
        stop.send(()).unwrap();
        proxy.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An echo server standing in for a datacenter's DB.
    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind(addr(0)).await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        a
    }

    /// Sends `msg` and reads it back; false when the session is closed.
    async fn echoes(s: &mut tokio::net::TcpStream, msg: &[u8]) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if s.write_all(msg).await.is_err() {
            return false;
        }
        let mut buf = vec![0u8; msg.len()];
        matches!(tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await, Ok(Ok(_)) if buf == msg)
    }

    /// Whether the session stops echoing within 4 s (the route file is
    /// polled every 200 ms).
    async fn ends(s: &mut tokio::net::TcpStream) -> bool {
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if !echoes(s, b"x").await {
                return true;
            }
        }
        false
    }

    #[tokio::test]
    async fn a_local_session_reads_its_own_datacenter_across_a_flip_and_ends_when_its_address_moves() {
        let dir = std::env::temp_dir().join(format!("thumbup-db-proxy-flip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (db_a, db_b) = (echo_server().await, echo_server().await);
        let route_file = dir.join("route.yaml");
        let write_route = |epoch: u64, active: &str, b: SocketAddr| {
            let text =
                format!("epoch: {epoch}\nactiveDatacenter: {active}\ndatacenters: {{dc-a: '{db_a}', dc-b: '{b}'}}\n");
            let tmp = dir.join("route.tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, &route_file).unwrap();
        };
        write_route(1, "dc-a", db_b);
        let mut opts = options();
        opts.route = RouteSource::File(route_file.clone());
        opts.datacenter = Some("dc-b".into());
        opts.local_listen = Some(addr(0));
        opts.local_redis_listen = Some(addr(0));
        opts.ready_file = Some(dir.join("ready"));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let proxy = tokio::spawn(run(opts, async {
            let _ = stopped.await;
        }));
        let mut text = String::new();
        for _ in 0..200 {
            if let Ok(t) = std::fs::read_to_string(dir.join("ready")) {
                text = t;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let field = |k: &str| -> SocketAddr {
            text.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.parse().ok()).expect(k)
        };
        let (listen, local, local_redis) = (field("listen="), field("local="), field("local_redis="));
        // The route is followed from the file: wait until sessions are admitted.
        let mut active = None;
        for _ in 0..100 {
            let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
            if echoes(&mut s, b"ping").await {
                active = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut active = active.expect("the proxy adopts the route");
        let mut reader = tokio::net::TcpStream::connect(local).await.unwrap();
        assert!(echoes(&mut reader, b"read on dc-b").await);
        assert_eq!(reader.peer_addr().unwrap(), local);
        // The route moves no Redis: the local Redis listener closes its clients.
        let mut no_redis = tokio::net::TcpStream::connect(local_redis).await.unwrap();
        assert!(!echoes(&mut no_redis, b"x").await, "no Redis for dc-b in the route: refused");

        // The flip to dc-b (the file is polled every 200 ms) ends the
        // active session and leaves the local reader reading.
        write_route(2, "dc-b", db_b);
        assert!(ends(&mut active).await, "the flip ends the session of the active datacenter");
        assert!(echoes(&mut reader, b"still reading").await, "a flip leaves a local session open");

        // A route naming another address for dc-b's DB ends it.
        let db_b2 = echo_server().await;
        write_route(3, "dc-b", db_b2);
        assert!(ends(&mut reader).await, "a local session ends when its datacenter's address changes");
        let mut fresh = tokio::net::TcpStream::connect(local).await.unwrap();
        assert!(echoes(&mut fresh, b"new server").await);

        // Not named at all: refused.
        let text = format!("epoch: 4\nactiveDatacenter: dc-a\ndatacenters: {{dc-a: '{db_a}'}}\n");
        std::fs::write(dir.join("route.tmp"), text).unwrap();
        std::fs::rename(dir.join("route.tmp"), &route_file).unwrap();
        let mut refused = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut s = tokio::net::TcpStream::connect(local).await.unwrap();
            if !echoes(&mut s, b"q").await {
                refused = true;
                break;
            }
        }
        assert!(refused, "a route that does not name dc-b refuses its local sessions");
        stop.send(()).unwrap();
        proxy.await.unwrap().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
