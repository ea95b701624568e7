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
//! tier moves with the same epoch and a flip ends the Redis sessions too. Until a first
//! route is held, connections are closed on arrival and `/readyz` is 503.

pub mod admin;
pub mod error;
pub mod forward;
pub mod metrics;
pub mod routes;
pub mod source;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::info;

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
    /// The admin HTTP endpoint (port 0: any free port).
    pub admin_listen: SocketAddr,
    /// Where the route comes from.
    pub route: RouteSource,
    /// Sessions open at once; more are closed on arrival.
    pub max_sessions: usize,
    /// How long a dial of the DB may take.
    pub connect_timeout: Duration,
    /// Written (atomically) with `listen=ADDR`, `admin=ADDR` (and
    /// `redis=ADDR`) lines once the listeners are bound.
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

    let listener = TcpListener::bind(opts.listen).await.map_err(|source| Error::Bind {
        what: "proxy",
        addr: opts.listen,
        source,
    })?;
    let listen = listener.local_addr().map_err(|source| Error::Bind { what: "proxy", addr: opts.listen, source })?;
    let redis_listener = match opts.redis_listen {
        Some(addr) => {
            let l =
                TcpListener::bind(addr).await.map_err(|source| Error::Bind { what: "redis proxy", addr, source })?;
            let bound = l.local_addr().map_err(|source| Error::Bind { what: "redis proxy", addr, source })?;
            Some((l, bound))
        }
        None => None,
    };
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let (admin_addr, admin_server) =
        admin::bind(opts.admin_listen, routes.clone(), metrics.clone(), opts.route_token_file.clone(), async {
            let _ = admin_stopped.await;
        })
        .await?;
    let admin_task = tokio::spawn(admin_server);
    let redis_addr = redis_listener.as_ref().map(|(_, a)| *a);
    info!(%listen, redis = ?redis_addr, admin = %admin_addr, max_sessions = opts.max_sessions, "db-proxy listening");
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, listen, admin_addr, redis_addr)?;
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

    // One session limit over both listeners: it bounds the proxy's sockets.
    let forwarder = forward::Forwarder {
        tier: forward::Tier::Db,
        routes: routes.clone(),
        metrics,
        sessions: Arc::new(Semaphore::new(opts.max_sessions)),
        connect_timeout: opts.connect_timeout,
    };
    let (stop_redis, redis_stopped) = tokio::sync::oneshot::channel::<()>();
    let redis_task = redis_listener.map(|(l, _)| {
        let f = forward::Forwarder { tier: forward::Tier::Redis, ..forwarder.clone() };
        tokio::spawn(async move {
            f.serve(l, async {
                let _ = redis_stopped.await;
            })
            .await
        })
    });
    forwarder.serve(listener, shutdown).await;
    let _ = stop_redis.send(());
    if let Some(task) = redis_task {
        let _ = task.await;
    }
    // The listener is gone: no new sessions. Now the open ones.
    let closed = routes.close_all();
    info!(closed, "stopped accepting; sessions closed");
    if let Some(task) = source_task {
        task.abort();
    }
    let _ = stop_admin.send(());
    admin_task.await??;
    Ok(())
}

/// Writes `listen=ADDR\nadmin=ADDR\n` (and `redis=ADDR\n`) to a temporary
/// file beside `path` and renames it over `path`, so that a reader never
/// sees half of it.
pub fn write_ready_file(
    path: &Path,
    listen: SocketAddr,
    admin: SocketAddr,
    redis: Option<SocketAddr>,
) -> Result<(), Error> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let redis = redis.map(|r| format!("redis={r}\n")).unwrap_or_default();
    std::fs::write(&tmp, format!("listen={listen}\nadmin={admin}\n{redis}"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| Error::ReadyFile { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_file_names_both_addresses_and_leaves_no_temporary_behind() {
        let dir = std::env::temp_dir().join(format!("thumbup-db-proxy-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready");
        write_ready_file(&path, "127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap(), None).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "listen=127.0.0.1:1\nadmin=127.0.0.1:2\n");
        write_ready_file(
            &path,
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            Some("127.0.0.1:3".parse().unwrap()),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "listen=127.0.0.1:1\nadmin=127.0.0.1:2\nredis=127.0.0.1:3\n"
        );
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
