//! `thumbup-service`: serve the gRPC API, or migrate / provision tenants.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::{admin, db, provision};
use thumbup_service::tenants::POLL_INTERVAL;

// The help of --config-optional says the files are re-read every second.
const _: () = assert!(POLL_INTERVAL.as_secs() == 1 && POLL_INTERVAL.subsec_nanos() == 0);

#[derive(Parser, Debug)]
#[command(version, about = "thumbup gRPC service")]
struct Cli {
    /// Tenant config file (YAML).
    #[arg(long, env = "THUMBUP_CONFIG", global = true, default_value = "/etc/thumbup/config.yaml")]
    config: PathBuf,
    /// Directory that relative `password_file` / `tokens_file` paths in the
    /// config resolve against (default: the config file's directory).
    #[arg(long, env = "THUMBUP_SECRETS_DIR", global = true)]
    secrets_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

/// Serve flags, global so that they are accepted after `serve` too (the
/// Helm chart runs `thumbup-service serve --listen ...`).
#[derive(clap::Args, Debug, Clone)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, env = "THUMBUP_LISTEN", global = true, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Admin HTTP address (/metrics, /healthz, /readyz).
    #[arg(long, env = "THUMBUP_ADMIN_LISTEN", global = true, default_value = "0.0.0.0:9090")]
    admin_listen: SocketAddr,
    /// Milliseconds a Redis command may take before Redis counts as down.
    #[arg(long, env = "THUMBUP_REDIS_TIMEOUT_MS", global = true, default_value_t = 500)]
    redis_timeout_ms: u64,
    /// Start with no tenants while the config file does not exist yet, and
    /// serve it once it appears (the file and the credential files it names
    /// are re-read every second, and on SIGHUP). Without it a missing
    /// config file fails the start.
    #[arg(
        long,
        env = "THUMBUP_CONFIG_OPTIONAL",
        global = true,
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    config_optional: bool,
    /// Milliseconds a request may take before it is answered: a read is
    /// then CANCELLED, a write UNAVAILABLE with its outcome unknown (it
    /// still finishes). A client's shorter grpc-timeout wins.
    #[arg(long, env = "THUMBUP_REQUEST_TIMEOUT_MS", global = true, default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..))]
    request_timeout_ms: u64,
    /// Requests served at once by this process; more are refused at once
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "THUMBUP_MAX_IN_FLIGHT", global = true, default_value_t = 4096,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_in_flight: usize,
    /// Concurrent requests (HTTP/2 streams) on one client connection.
    #[arg(long, env = "THUMBUP_MAX_STREAMS_PER_CONNECTION", global = true, default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_streams_per_connection: u32,
    /// Bytes of metadata a request may carry (names and values plus 32
    /// bytes each); more is RESOURCE_EXHAUSTED for that request alone.
    #[arg(long, env = "THUMBUP_MAX_METADATA_BYTES", global = true, default_value_t = 16384,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..=(1 << 20)))]
    max_metadata_bytes: usize,
    /// Seconds the server keeps serving after SIGTERM, with its gRPC health
    /// NOT_SERVING and /readyz answering 503, so that clients and endpoints
    /// move away before it stops; then it finishes the requests in flight.
    #[arg(long, env = "THUMBUP_DRAIN_SECONDS", global = true, default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    drain_seconds: u64,
    /// PEM certificate chain of the gRPC server; with --tls-key-file, only
    /// TLS is served (plaintext clients are refused). Both files are re-read
    /// every second: a rotated certificate is served to new connections.
    #[arg(long, env = "THUMBUP_TLS_CERT_FILE", global = true, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, env = "THUMBUP_TLS_KEY_FILE", global = true, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    /// Follow the tenant registry through the Kubernetes API: watch the
    /// registry ConfigMap (--registry-config-map, key tenants.yaml) and
    /// Secret (--registry-secret) and serve a new tenant as soon as the
    /// operator writes it, not when the kubelet syncs the mounted files.
    /// The files (--config) serve until the API has answered. Needs list
    /// and watch on the two objects.
    #[arg(
        long,
        env = "THUMBUP_REGISTRY_FROM_API",
        global = true,
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new(),
        requires_all = ["registry_config_map", "registry_secret"]
    )]
    registry_from_api: bool,
    /// Namespace of the registry ConfigMap and Secret (default: the
    /// namespace of the pod's ServiceAccount, or of the kubeconfig context).
    #[arg(long, env = "THUMBUP_REGISTRY_NAMESPACE", global = true)]
    registry_namespace: Option<String>,
    /// Name of the registry ConfigMap (the operator's `registry.config_map`).
    #[arg(long, env = "THUMBUP_REGISTRY_CONFIG_MAP", global = true)]
    registry_config_map: Option<String>,
    /// Name of the registry Secret (the operator's `registry.secret`).
    #[arg(long, env = "THUMBUP_REGISTRY_SECRET", global = true)]
    registry_secret: Option<String>,
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
        /// Admin DB URL, mysql://user:password@host:port (TLS: sqlx's
        /// parameters, ?ssl-mode=VERIFY_IDENTITY&ssl-ca=/path/ca.crt).
        #[arg(long, env = "THUMBUP_ADMIN_DB_URL")]
        admin_db_url: String,
        /// Admin Redis URL, redis://user:password@host:port (TLS:
        /// rediss://, and ?ssl-ca=/path/ca.crt for a private CA; a node of a
        /// Redis Cluster: ?cluster=true, and every node is provisioned).
        #[arg(long, env = "THUMBUP_ADMIN_REDIS_URL")]
        admin_redis_url: String,
    },
}

/// The tenants a subcommand works on: all, or only `only`, in which case
/// only that tenant's credential files are read.
fn selected(cli: &Cli, only: &Option<String>) -> anyhow::Result<Vec<TenantConfig>> {
    let secrets = cli.secrets_dir.as_deref();
    Ok(match only {
        Some(name) => vec![Config::load_tenant(&cli.config, secrets, name)?],
        None => Config::load_with(&cli.config, secrets)?.tenants,
    })
}

/// jemalloc instead of glibc's malloc: the gRPC stack allocates per request.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    admin::init_tracing()?;
    admin::register_build_info(prometheus::default_registry(), env!("CARGO_BIN_NAME"), env!("CARGO_PKG_VERSION"))?;
    let mut cli = Cli::parse();
    match cli.command.take().unwrap_or(Command::Serve) {
        Command::Serve => {
            let ready = Arc::new(AtomicBool::new(false));
            // The admin endpoint stays up through the drain (its /readyz
            // says 503 then) and stops with the server.
            let (admin_addr, admin_srv) =
                admin::bind(cli.serve.admin_listen, ready.clone(), std::future::pending()).await?;
            tracing::info!(%admin_addr, "admin endpoint");
            let admin_task = tokio::spawn(admin_srv);
            let listener = tokio::net::TcpListener::bind(cli.serve.listen).await?;
            let opts = thumbup_service::Options {
                config: cli.config,
                redis_timeout: Duration::from_millis(cli.serve.redis_timeout_ms),
                ready: Some(ready),
                limits: thumbup_service::limits::ServerLimits {
                    request_timeout: Duration::from_millis(cli.serve.request_timeout_ms),
                    max_in_flight: cli.serve.max_in_flight,
                    max_streams_per_connection: cli.serve.max_streams_per_connection,
                    max_metadata_bytes: cli.serve.max_metadata_bytes,
                    drain: Duration::from_secs(cli.serve.drain_seconds),
                },
            };
            let tls = match (cli.serve.tls_cert_file, cli.serve.tls_key_file) {
                (Some(cert_file), Some(key_file)) => Some(thumbup_service::ServerTls { cert_file, key_file }),
                _ => None,
            };
            let registry_api =
                match (cli.serve.registry_from_api, cli.serve.registry_config_map, cli.serve.registry_secret) {
                    (true, Some(config_map), Some(secret)) => {
                        let client =
                            kube::Client::try_default().await.context("a Kubernetes client for --registry-from-api")?;
                        let namespace =
                            cli.serve.registry_namespace.unwrap_or_else(|| client.default_namespace().to_string());
                        Some(thumbup_service::registry_api::RegistryApi { client, namespace, config_map, secret })
                    }
                    _ => None,
                };
            let files = thumbup_service::ConfigFiles {
                secrets_dir: cli.secrets_dir,
                optional: cli.serve.config_optional,
                tls,
                registry_api,
            };
            thumbup_service::run_with(opts, files, listener, admin::shutdown_signal()).await?;
            admin_task.abort();
        }
        Command::Migrate { tenant } => {
            for t in selected(&cli, &tenant)? {
                let pool = db::connect_lazy(&t)?;
                db::migrate(&pool).await.with_context(|| format!("migrating tenant {}", t.name))?;
                println!("tenant {}: schema {} migrated", t.name, t.schema());
            }
        }
        Command::Provision { tenant, admin_db_url, admin_redis_url } => {
            for t in selected(&cli, &tenant)? {
                provision::provision_db(&admin_db_url, &t).await?;
                provision::provision_redis(&admin_redis_url, &t).await?;
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
