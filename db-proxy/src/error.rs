//! The ways the proxy, a route offer or a session can fail.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use thumbup_core::route::RouteError;

/// A failing step of the proxy. The route variants are the refusals of an
/// offered route; [`Error::reason`] names each variant for metric labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("binding the {what} listener on {addr}: {source}")]
    Bind {
        /// `proxy` or `admin`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The ready file could not be written.
    #[error("writing the ready file {path}: {source}")]
    ReadyFile {
        /// The file.
        path: PathBuf,
        /// The file system error.
        source: io::Error,
    },
    /// The metrics could not be registered.
    #[error("registering the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// No Kubernetes client could be built (no kubeconfig, no in-cluster
    /// service account).
    #[error("creating the Kubernetes client: {0}")]
    KubeClient(#[source] kube::Error),
    /// The admin HTTP server stopped with an error.
    #[error("serving the admin endpoint: {0}")]
    Admin(#[source] io::Error),
    /// The offered route does not parse or breaks a route rule.
    #[error("invalid route: {0}")]
    RouteInvalid(#[from] RouteError),
    /// The offered route's epoch is older than the held one.
    #[error("stale route: epoch {offered} is older than the held epoch {held}")]
    RouteStale {
        /// The offered epoch.
        offered: u64,
        /// The held epoch.
        held: u64,
    },
    /// The offered route has the held epoch but names another datacenter or
    /// address.
    #[error(
        "conflicting route: epoch {epoch} offered as {offered_datacenter} ({offered_address}), \
         held as {held_datacenter} ({held_address})"
    )]
    RouteConflict {
        /// The epoch both routes carry.
        epoch: u64,
        /// The offered active datacenter.
        offered_datacenter: String,
        /// Its address in the offered route.
        offered_address: String,
        /// The held active datacenter.
        held_datacenter: String,
        /// Its address in the held route.
        held_address: String,
    },
    /// The active datacenter's DB refused the connection or failed it.
    #[error("connecting to {datacenter} at {address}: {source}")]
    Connect {
        /// The datacenter dialed.
        datacenter: String,
        /// Its DB address.
        address: String,
        /// The socket error.
        source: io::Error,
    },
    /// The active datacenter's DB did not answer within the connect timeout.
    #[error("connecting to {datacenter} at {address}: no answer within {timeout:?}")]
    ConnectTimeout {
        /// The datacenter dialed.
        datacenter: String,
        /// Its DB address.
        address: String,
        /// The connect timeout.
        timeout: Duration,
    },
}

impl Error {
    /// A short label: the `reason` of `thumbup_db_proxy_route_rejected_total`
    /// for the route variants, the failing step for the others.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Bind { .. } => "bind",
            Error::ReadyFile { .. } => "ready_file",
            Error::Metrics(_) => "metrics",
            Error::KubeClient(_) => "kube_client",
            Error::Admin(_) => "admin",
            Error::RouteInvalid(_) => "invalid",
            Error::RouteStale { .. } => "stale",
            Error::RouteConflict { .. } => "conflict",
            Error::Connect { .. } => "connect",
            Error::ConnectTimeout { .. } => "connect_timeout",
        }
    }
}
