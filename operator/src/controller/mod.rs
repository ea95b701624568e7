//! The tenant controller: turns a `LikeTenant` into a provisioned, running
//! tenant, and cleans up through a finalizer when it is deleted.
//!
//! One pass, idempotent on every run:
//! 1. claim the tenant name in the registry ConfigMap (a second LikeTenant of
//!    the same name in another namespace is refused, never merged);
//! 2. the admission to the data layer: the schema, the DB user and the
//!    Redis ACL users are claimed for this LikeTenant where the servers keep
//!    ownership records; a reserved schema, or one or an account that thumbup
//!    did not create for this LikeTenant, is refused with a condition saying
//!    why and nothing is created (`spec.adoptExisting` takes over what no
//!    live LikeTenant holds);
//! 3. the tenant Secret (passwords and token generated once, then read back;
//!    account names are derived from the tenant name, never read back);
//! 4. the DB schema, DB user and migrations on the active datacenter: the
//!    route's once the failover controller has one, else the config's
//!    (`DatabaseReady`); the standby receives them by replication;
//! 5. the Redis ACL user on every datacenter's Redis (`RedisReady`);
//! 6. the registry entry (ConfigMap file + Secret keys) that the service
//!    reloads;
//! 7. the job Deployment (`JobReady`);
//! 8. the status, written only when it changed. Its `activeDatacenter` and
//!    `failoverEpoch` are the route's, as the failover controller writes
//!    them; the fields that only the failover controller writes
//!    (`failingSince`, `lastTransition`, `failoverBlocked`) are never in the
//!    patch, so neither writer undoes the other.
//!
//! A change of the route's active datacenter or epoch reconciles every
//! tenant again, so registry entries and tenant Secrets follow a flip.
//!
//! A failing step sets its condition False with the error's reason, emits a
//! Warning Event, and returns the error: [`error_policy`] then requeues with
//! an exponential backoff per object.
//!
//! `reconcile` is the entry of a pass (finalizer, backoff), `apply` its
//! steps and the cleanup, `registry` the registry ConfigMap and Secret,
//! `status` the conditions, status writes and Events, `watches` what wakes
//! a tenant and the [`run`] loop.

mod apply;
mod reconcile;
mod registry;
mod status;
mod watches;

pub use reconcile::{backoff, error_policy, reconcile};
pub use watches::{route_flips, run, trigger};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::Client;
use kube::api::PatchParams;
use kube::runtime::events::{Recorder, Reporter};
use thumbup_core::route::Route;
use tokio::sync::watch;

use crate::config::OperatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;

/// The field manager of every server-side apply.
pub const MANAGER: &str = "thumbup-operator";

/// Every (API group, resource, verbs) that the operator's code uses against
/// the Kubernetes API, and nothing else: the chart's RBAC grants exactly
/// these (tests/tests/chart.rs), the operator's mocked-API-server tests fail
/// on a request outside them, and `operator/tests/api_permissions.rs` shows
/// that its code paths issue every one.
pub const API_PERMISSIONS: &[(&str, &str, &[&str])] = &[
    // The tenant controller's watch; the failover controller lists them to
    // publish the route; the finalizer helper patches them.
    ("thumbup.io", "liketenants", &["list", "watch", "patch"]),
    // Status, by both controllers (merge patches).
    ("thumbup.io", "liketenants/status", &["patch"]),
    // The job Deployments: watched (owned), server-side applied, deleted.
    ("apps", "deployments", &["list", "watch", "patch", "delete"]),
    // The tenant Secret (read back, applied) and the registry Secret (applied).
    ("", "secrets", &["get", "patch"]),
    // The registry and the route ConfigMaps: read, created, replaced under
    // optimistic concurrency.
    ("", "configmaps", &["get", "create", "update"]),
    // Events of reconciles and flips (a repeated one is patched as a series).
    ("events.k8s.io", "events", &["create", "patch"]),
    // Leader election.
    ("coordination.k8s.io", "leases", &["get", "create", "update"]),
];

/// Shared state of all reconciles.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// The operator's config.
    pub config: Arc<OperatorConfig>,
    /// Namespace of the registry ConfigMap and Secret (the operator's own).
    pub namespace: String,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// The DB route as the failover controller last published it; None
    /// until it has one (and always when failover is off).
    pub route: watch::Receiver<Option<Route>>,
    /// Consecutive failures per object, for the requeue backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context for `client`, following the route published on `route`.
    pub fn new(
        client: Client,
        config: Arc<OperatorConfig>,
        namespace: String,
        metrics: Metrics,
        route: watch::Receiver<Option<Route>>,
    ) -> Arc<Context> {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            namespace,
            metrics,
            route,
            failures: Mutex::new(HashMap::new()),
        })
    }
}

fn kube_err<'a>(tenant: &'a str, step: &'static str) -> impl FnOnce(kube::Error) -> Error + 'a {
    move |source| Error::Kube { tenant: tenant.to_string(), step, source }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The write parameters of every merge and JSON patch the operator sends:
/// its field manager, so managedFields name it.
pub fn patch_params() -> PatchParams {
    PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() }
}
