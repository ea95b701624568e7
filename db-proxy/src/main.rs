//! `thumbup-db-proxy`: forward local DB sessions to the active datacenter.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thumbup_core::admin;
use thumbup_db_proxy::{ConfigMapRef, Options, RouteSource};

#[derive(Parser, Debug)]
#[command(version, about = "thumbup DB proxy: forwards DB sessions to the active datacenter and drops them on a flip")]
struct Cli {
    /// Where DB clients connect; port 0 picks a free port (see --ready-file).
    #[arg(long, env = "THUMBUP_DB_PROXY_LISTEN", default_value = "127.0.0.1:3306")]
    listen: SocketAddr,
    /// Where Redis clients connect, forwarded to the active datacenter's
    /// Redis (the route's `redis:` addresses); off unless given.
    #[arg(long, env = "THUMBUP_DB_PROXY_REDIS_LISTEN")]
    redis_listen: Option<SocketAddr>,
    /// This proxy's own datacenter (a name in the route), which the
    /// local-read listeners forward to; required with either of them.
    #[arg(long, env = "THUMBUP_DB_PROXY_DATACENTER")]
    datacenter: Option<String>,
    /// Where local-read DB clients connect, forwarded to this datacenter's
    /// DB (the route's `datacenters[--datacenter]`) whichever datacenter is
    /// active; a flip does not end these sessions. Off unless given.
    #[arg(long, env = "THUMBUP_DB_PROXY_LOCAL_LISTEN")]
    local_listen: Option<SocketAddr>,
    /// Where local-read Redis clients connect, forwarded to this
    /// datacenter's Redis (the route's `redis[--datacenter]`) whichever
    /// datacenter is active. Off unless given.
    #[arg(long, env = "THUMBUP_DB_PROXY_LOCAL_REDIS_LISTEN")]
    local_redis_listen: Option<SocketAddr>,
    /// Admin HTTP address: GET/PUT /route, /metrics, /healthz, /readyz.
    /// PUT /route is refused unless --route-token-file is given.
    #[arg(long, env = "THUMBUP_DB_PROXY_ADMIN_LISTEN", default_value = "127.0.0.1:9193")]
    admin_listen: SocketAddr,
    /// Follow the route in this file (read every 200 ms).
    #[arg(long, env = "THUMBUP_DB_PROXY_ROUTE_FILE", conflicts_with = "route_config_map")]
    route_file: Option<PathBuf>,
    /// Follow the route in this ConfigMap (NAMESPACE/NAME, key route.yaml).
    /// With neither this nor --route-file, only PUT /route sets the route.
    #[arg(long, env = "THUMBUP_DB_PROXY_ROUTE_CONFIG_MAP")]
    route_config_map: Option<ConfigMapRef>,
    /// Accept PUT /route from callers sending `authorization: Bearer
    /// <token>` with a token that is a line of this file (16 or more
    /// characters; re-read on each request, so tokens rotate by editing
    /// it). Without it PUT /route is refused (403).
    #[arg(long, env = "THUMBUP_DB_PROXY_ROUTE_TOKEN_FILE")]
    route_token_file: Option<PathBuf>,
    /// Sessions open at once; connections over it are closed on arrival.
    #[arg(
        long,
        env = "THUMBUP_DB_PROXY_MAX_SESSIONS",
        default_value_t = 1024,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    max_sessions: usize,
    /// Milliseconds a dial of the active DB may take.
    #[arg(long, env = "THUMBUP_DB_PROXY_CONNECT_TIMEOUT_MS", default_value_t = 3000)]
    connect_timeout_ms: u64,
    /// Once the listeners are bound, write `listen=ADDR` and `admin=ADDR`
    /// lines here (atomically), and `redis=`, `local=`, `local_redis=` for
    /// the optional listeners that are on.
    #[arg(long, env = "THUMBUP_DB_PROXY_READY_FILE")]
    ready_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    admin::init_tracing()?;
    let cli = Cli::parse();
    let route = match (cli.route_file, cli.route_config_map) {
        (Some(path), _) => RouteSource::File(path),
        (None, Some(cm)) => RouteSource::ConfigMap(cm),
        (None, None) => RouteSource::Admin,
    };
    let opts = Options {
        listen: cli.listen,
        redis_listen: cli.redis_listen,
        datacenter: cli.datacenter,
        local_listen: cli.local_listen,
        local_redis_listen: cli.local_redis_listen,
        admin_listen: cli.admin_listen,
        route,
        max_sessions: cli.max_sessions,
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        ready_file: cli.ready_file,
        route_token_file: cli.route_token_file,
    };
    thumbup_db_proxy::run(opts, admin::shutdown_signal()).await
}
