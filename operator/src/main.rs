//! `thumbup-operator`: runs the tenant controller (in cluster, or out of
//! cluster from the kubeconfig), or prints the CRD.

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
    /// Print the LikeTenant CRD as YAML.
    Crd,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    thumbup_core::admin::init_tracing();
    match Cli::parse().command {
        Command::Crd => print!("{}", thumbup_operator::crdgen::crd_yaml()),
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
