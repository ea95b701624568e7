//! `thumbup-operator`: runs the tenant and failover controllers (in
//! cluster, or out of cluster from the kubeconfig), the failover controller
//! alone with a route file, or prints the CRD.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(version, about = "thumbup Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the tenant controller.
    Run {
        /// Operator config file (YAML: datacenters, registry, job image).
        #[arg(long, env = "THUMBUP_OPERATOR_CONFIG", default_value = "/etc/thumbup-operator/operator.yaml")]
        config: PathBuf,
        /// Namespace watched, holding the registry objects and the Lease
        /// (default: the kubeconfig's or service account's namespace).
        #[arg(long, env = "THUMBUP_NAMESPACE")]
        namespace: Option<String>,
        /// Watch LikeTenants in every namespace (needs the chart's ClusterRole).
        #[arg(long, env = "THUMBUP_ALL_NAMESPACES")]
        all_namespaces: bool,
        /// Admin HTTP address (/metrics, /healthz, /readyz).
        #[arg(long, env = "THUMBUP_ADMIN_LISTEN", default_value = "0.0.0.0:9192")]
        admin_listen: SocketAddr,
        /// Leader-election identity (default: the host name, i.e. the pod name).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Name of the leader-election Lease.
        #[arg(long, env = "THUMBUP_LEASE_NAME", default_value = "thumbup-operator")]
        lease_name: String,
        /// Seconds a leader's Lease lasts without renewal.
        #[arg(long, env = "THUMBUP_LEASE_SECONDS", default_value_t = 15)]
        lease_seconds: u64,
    },
    /// Run only the failover controller, out of a cluster: the route in a
    /// file (db-proxy runs with --route-file), the tenants from the
    /// service's tenants.yaml (for the stream replay), notices in the log.
    Failover {
        /// Operator config file (datacenters, failover settings); re-read
        /// every probe period: a new active_datacenter is a planned switchover.
        #[arg(long, env = "THUMBUP_OPERATOR_CONFIG")]
        config: PathBuf,
        /// The route file the controller writes and db-proxy follows.
        #[arg(long, env = "THUMBUP_ROUTE_FILE")]
        route_file: PathBuf,
        /// The service's tenant config (tenants.yaml).
        #[arg(long, env = "THUMBUP_TENANTS")]
        tenants: PathBuf,
        /// Admin HTTP address (/metrics, /healthz, /readyz).
        #[arg(long, env = "THUMBUP_ADMIN_LISTEN", default_value = "127.0.0.1:9194")]
        admin_listen: SocketAddr,
    },
    /// Print the LikeTenant CRD as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    thumbup_core::admin::init_tracing()?;
    thumbup_core::admin::register_build_info(
        prometheus::default_registry(),
        env!("CARGO_BIN_NAME"),
        env!("CARGO_PKG_VERSION"),
    )?;
    match Cli::parse().command {
        Command::Crd => print!("{}", thumbup_operator::crdgen::crd_yaml()),
        Command::Failover { config, route_file, tenants, admin_listen } => {
            let opts = thumbup_operator::failover::Options::local(config, route_file, tenants)?;
            thumbup_operator::failover::run_with_admin(opts, admin_listen, thumbup_core::admin::shutdown_signal())
                .await?;
        }
        Command::Run { config, namespace, all_namespaces, admin_listen, identity, lease_name, lease_seconds } => {
            let identity = identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("thumbup-operator-{}", std::process::id()));
            let opts = thumbup_operator::Options {
                config,
                namespace,
                all_namespaces,
                admin_listen,
                identity,
                lease_name,
                lease_duration: Duration::from_secs(lease_seconds.max(3)),
            };
            thumbup_operator::run(opts, thumbup_core::admin::shutdown_signal()).await?;
        }
    }
    Ok(())
}
