//! `kubectl thumbup` (a kubectl plugin: put `kubectl-thumbup` on the PATH):
//! tenant status, the DB route, and planned switchovers, with the caller's
//! kubeconfig and RBAC.
//!
//! ```text
//! kubectl thumbup status [-n team | -A] [NAME]
//! kubectl thumbup route [--operator-namespace thumbup]
//! kubectl thumbup switchover dc-b [--operator-namespace thumbup] [--timeout-seconds 120 | --no-wait]
//! ```

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use thumbup_operator::crd::LikeTenant;
use thumbup_operator::ctl;

#[derive(Parser, Debug)]
#[command(name = "kubectl thumbup", version, about = "thumbup: tenant status, the DB route, planned switchovers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the operator keeps the route.
#[derive(clap::Args, Debug)]
struct RouteAt {
    /// The operator's namespace (default: the kubeconfig context's).
    #[arg(long, env = "THUMBUP_OPERATOR_NAMESPACE")]
    operator_namespace: Option<String>,
    /// The route ConfigMap (the operator config's failover.route_config_map).
    #[arg(long, default_value = thumbup_core::route::ROUTE_CONFIG_MAP)]
    route_config_map: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// LikeTenants: Ready and why, active datacenter and epoch, the job.
    Status {
        /// One LikeTenant.
        name: Option<String>,
        /// Namespace (default: the kubeconfig context's).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long, conflicts_with_all = ["namespace", "name"])]
        all_namespaces: bool,
    },
    /// The DB route: epoch, active datacenter, the failover record.
    Route {
        #[command(flatten)]
        at: RouteAt,
    },
    /// Planned switchover to DATACENTER (fence, catch up, flip, promote),
    /// run by the operator's failover controller; waits for the outcome.
    Switchover {
        /// The datacenter to make active.
        datacenter: String,
        #[command(flatten)]
        at: RouteAt,
        /// How long to wait for the switchover.
        #[arg(long, default_value_t = 120)]
        timeout_seconds: u64,
        /// Return once the request is written.
        #[arg(long)]
        no_wait: bool,
    },
}

async fn run(cli: Cli) -> Result<String, ctl::CtlError> {
    let client = kube::Client::try_default()
        .await
        .map_err(|source| ctl::CtlError::Kube { what: "connecting to the Kubernetes API".into(), source })?;
    let ns_or_default = |ns: Option<String>| ns.unwrap_or_else(|| ctl::default_namespace(&client));
    match cli.command {
        Command::Status { name, namespace, all_namespaces } => {
            let api: Api<LikeTenant> = if all_namespaces {
                Api::all(client.clone())
            } else {
                Api::namespaced(client.clone(), &ns_or_default(namespace))
            };
            ctl::status(&api, name.as_deref()).await
        }
        Command::Route { at } => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns_or_default(at.operator_namespace));
            Ok(ctl::describe_route(&ctl::load_route(&api, &at.route_config_map).await?))
        }
        Command::Switchover { datacenter, at, timeout_seconds, no_wait } => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns_or_default(at.operator_namespace));
            let by = format!(
                "{}@{}",
                std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
                std::env::var("HOSTNAME").unwrap_or_else(|_| "unknown".into())
            );
            let id = ctl::request_switchover(&api, &at.route_config_map, &datacenter, &by).await?;
            if no_wait {
                return Ok(format!("switchover to {datacenter} requested (request {id})\n"));
            }
            eprintln!("switchover to {datacenter} requested (request {id}); waiting for the failover controller");
            let timeout = Duration::from_secs(timeout_seconds);
            let route = ctl::wait_switchover(&api, &at.route_config_map, &id, &datacenter, timeout).await?;
            Ok(format!("switchover done\n{}", ctl::describe_route(&route)))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kubectl thumbup: {e}");
            ExitCode::FAILURE
        }
    }
}
