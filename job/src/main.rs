//! `thumbup-job --tenant NAME`: consume one tenant's event stream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use thumbup_core::admin;
use thumbup_core::config::Config;

#[derive(Parser, Debug)]
#[command(version, about = "thumbup per-tenant stream consumer")]
struct Cli {
    /// Tenant config file (YAML).
    #[arg(long, env = "THUMBUP_CONFIG", default_value = "/etc/thumbup/config.yaml")]
    config: PathBuf,
    /// Directory that relative `password_file` / `tokens_file` paths in the
    /// config resolve against (default: the config file's directory). Only
    /// this tenant's files are read.
    #[arg(long, env = "THUMBUP_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// The tenant to consume.
    #[arg(long, env = "THUMBUP_TENANT")]
    tenant: String,
    /// Milliseconds events are gathered before one DB transaction applies them.
    #[arg(long, env = "THUMBUP_WINDOW_MS", default_value_t = thumbup_core::config::DEFAULT_WINDOW_MS)]
    window_ms: u64,
    /// Events that close a window early.
    #[arg(long, env = "THUMBUP_MAX_BATCH", default_value_t = thumbup_core::config::DEFAULT_MAX_BATCH)]
    max_batch: usize,
    /// Entries read per shard per call.
    #[arg(long, env = "THUMBUP_READ_COUNT", default_value_t = 1_000)]
    read_count: usize,
    /// Consumer name in the group; keep it stable per replica (default: the host name).
    #[arg(long, env = "THUMBUP_CONSUMER")]
    consumer: Option<String>,
    /// Milliseconds after which entries pending on another consumer are claimed.
    #[arg(long, env = "THUMBUP_CLAIM_IDLE_MS", default_value_t = 60_000)]
    claim_idle_ms: u64,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "THUMBUP_ADMIN_LISTEN", default_value = "0.0.0.0:9091")]
    admin_listen: SocketAddr,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    admin::init_tracing()?;
    admin::register_build_info(prometheus::default_registry(), env!("CARGO_BIN_NAME"), env!("CARGO_PKG_VERSION"))?;
    let cli = Cli::parse();
    let tenant = Config::load_tenant(&cli.config, cli.secrets_dir.as_deref(), &cli.tenant)?;
    let consumer = cli.consumer.or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| "thumbup-job".to_string());
    let ready = Arc::new(AtomicBool::new(false));
    let opts = thumbup_job::Options {
        window: Duration::from_millis(cli.window_ms),
        max_batch: cli.max_batch,
        read_count: cli.read_count,
        consumer,
        claim_idle: Duration::from_millis(cli.claim_idle_ms),
        ready: ready.clone(),
    };
    let (admin_addr, admin_srv) = admin::bind(cli.admin_listen, ready, std::future::pending()).await?;
    tracing::info!(%admin_addr, "admin endpoint");
    let admin_task = tokio::spawn(admin_srv);
    thumbup_job::Job::new(tenant, opts)?.run(admin::shutdown_signal()).await?;
    admin_task.abort();
    Ok(())
}
