//! The failover controller (leader only).
//!
//! Every probe period it probes each datacenter's DB (connect + query within
//! the probe timeout) and acts on what it sees:
//!
//! 1. A datacenter that is not active and answers writable is fenced
//!    (`read_only=ON`, tenant sessions ended): after a failover the old
//!    primary is fenced when it comes back.
//! 2. A promotion that did not finish (the controller died, or the new
//!    primary was briefly unreachable) is resumed.
//! 3. A change of `active_datacenter` in the operator config is a planned
//!    switchover: fence the active DB, wait until the standby has applied
//!    everything, flip the route, promote. Zero loss; the tenant jobs buffer
//!    in their streams during the short write pause.
//! 4. The active DB's failed probes are counted; after the threshold, over
//!    at least the grace period ([`decide`]), with a healthy standby and the
//!    cap not used up, it fails over: raises the epoch, records the failure,
//!    flips the route (the proxies follow), fences the old primary where
//!    reachable, promotes the standby and replays the recent stream window
//!    onto it ([`replay`]), so that windows acknowledged on the old primary
//!    but never replicated are not lost.
//!
//! The route document (`thumbup_core::route`) is the controller's memory: it
//! holds the epoch, the flips that count against the cap, the pending
//! promotion and the last transition, in a ConfigMap in a cluster or a file
//! out of one. Each change is published to every LikeTenant's status (with
//! an Event for flips and blocked failovers) and to the metrics. There is no
//! automatic failback.
//!
//! The loop is in `controller`, the transitions it makes (flip, failover,
//! switchover, promotion and replay) in `transitions`; `store` keeps the
//! route, `tenants` reads the tenant list for the replay, `notice` is what
//! is told to people, `metrics` what is counted.

pub mod cluster;
mod controller;
pub mod db;
pub mod decide;
pub mod kube;
mod metrics;
mod notice;
pub mod redis;
pub mod replay;
mod store;
mod tenants;
mod transitions;

use std::path::PathBuf;

use thumbup_core::route::Route;
use tokio::sync::{mpsc, watch};

use crate::config::OperatorConfig;

pub use controller::{run, run_with_admin};
pub use notice::{Notice, Publisher};
pub use store::RouteStore;
pub use tenants::{TenantSource, replay_tenants};

/// A step of the controller that failed.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// Reading or writing the route file.
    #[error("route file {path}: {detail}")]
    RouteFile {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Reading or writing the route ConfigMap.
    #[error(transparent)]
    RouteConfigMap(#[from] kube::FailoverKubeError),
    /// The tenant list could not be read.
    #[error("tenant list: {0}")]
    Tenants(String),
    /// The operator config names no usable datacenters.
    #[error("operator config: {0}")]
    Config(String),
}

/// What the controller runs with.
pub struct Options {
    /// The operator config as loaded.
    pub config: OperatorConfig,
    /// Its file, read again every period for `active_datacenter` (planned
    /// switchover); None: never re-read.
    pub config_path: Option<PathBuf>,
    /// The route.
    pub store: RouteStore,
    /// The tenants (for the replay).
    pub tenants: TenantSource,
    /// LikeTenant status and Events; None out of a cluster.
    pub publisher: Option<Publisher>,
    /// Every route the controller writes is also sent here (the tenant
    /// controller provisions on the active datacenter).
    pub route_tx: Option<watch::Sender<Option<Route>>>,
    /// Every notice is also sent here (out of a cluster, where there are no
    /// Events).
    pub notices: Option<mpsc::UnboundedSender<Notice>>,
}

impl Options {
    /// Out of a cluster: the route in `route_file`, the tenants from the
    /// service's `tenants_file`, the config re-read from `config_path`, and
    /// notices only in the log.
    pub fn local(config_path: PathBuf, route_file: PathBuf, tenants_file: PathBuf) -> Result<Options, FailoverError> {
        let config = OperatorConfig::load(&config_path).map_err(|e| FailoverError::Config(e.to_string()))?;
        Ok(Options {
            config,
            config_path: Some(config_path),
            store: RouteStore::File(route_file),
            tenants: TenantSource::File(tenants_file),
            publisher: None,
            route_tx: None,
            notices: None,
        })
    }
}
