//! `thumbup-service`: serve the gRPC API, or migrate / provision tenants.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thumbup_core::config::Config;
use thumbup_core::{admin, db, provision};

#[derive(Parser, Debug)]
#[command(version, about = "thumbup gRPC service")]
struct Cli {
    /// Tenant config file (YAML).
    #[arg(long, env = "THUMBUP_CONFIG", global = true, default_value = "/etc/thumbup/config.yaml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "THUMBUP_LISTEN", default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "THUMBUP_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Milliseconds a Redis command may take before Redis counts as down.
    #[arg(long, env = "THUMBUP_REDIS_TIMEOUT_MS", default_value_t = 500)]
    redis_timeout_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the gRPC API (the default).
    Serve,
    /// Create or update the tenant schemas (idempotent).
    Migrate {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Create the tenants' DB schema and user and Redis ACL user (idempotent).
    Provision {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Admin DB URL, mysql://user:password@host:port.
        #[arg(long, env = "THUMBUP_ADMIN_DB_URL")]
        admin_db_url: String,
        /// Admin Redis URL, redis://user:password@host:port.
        #[arg(long, env = "THUMBUP_ADMIN_REDIS_URL")]
        admin_redis_url: String,
    },
}

fn selected<'a>(
    config: &'a Config,
    only: &Option<String>,
) -> anyhow::Result<Vec<&'a thumbup_core::config::TenantConfig>> {
    match only {
        Some(name) => Ok(vec![config.tenant(name).with_context(|| format!("tenant {name} is not in the config"))?]),
        None => Ok(config.tenants.iter().collect()),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    admin::init_tracing();
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let ready = Arc::new(AtomicBool::new(false));
            let (admin_addr, admin_srv) =
                admin::bind(cli.serve.admin_listen, ready.clone(), admin::shutdown_signal()).await?;
            tracing::info!(%admin_addr, "admin endpoint");
            let admin_task = tokio::spawn(admin_srv);
            let listener = tokio::net::TcpListener::bind(cli.serve.listen).await?;
            let opts = thumbup_service::Options {
                config: cli.config,
                redis_timeout: Duration::from_millis(cli.serve.redis_timeout_ms),
                ready: Some(ready),
            };
            thumbup_service::run(opts, listener, admin::shutdown_signal()).await?;
            admin_task.abort();
        }
        Command::Migrate { tenant } => {
            let config = Config::load(&cli.config)?;
            for t in selected(&config, &tenant)? {
                let pool = db::connect_lazy(t)?;
                db::migrate(&pool).await.with_context(|| format!("migrating tenant {}", t.name))?;
                println!("tenant {}: schema {} migrated", t.name, t.schema());
            }
        }
        Command::Provision { tenant, admin_db_url, admin_redis_url } => {
            let config = Config::load(&cli.config)?;
            for t in selected(&config, &tenant)? {
                provision::provision_db(&admin_db_url, t).await?;
                provision::provision_redis(&admin_redis_url, t).await?;
                println!(
                    "tenant {}: DB user {} on {}, Redis ACL user {} on {}",
                    t.name,
                    t.db.username,
                    t.schema(),
                    t.redis.username,
                    t.name
                );
            }
        }
    }
    Ok(())
}
