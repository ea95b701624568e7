//! thumbup-operator: the `LikeTenant` custom resource and the controller that
//! turns each one into an isolated, running tenant.
//!
//! Data flow: a LikeTenant (watched, filtered to spec and finalizer changes)
//! -> [`controller::reconcile`] -> provisioning of the DB and Redis with the
//! admin credentials of [`config::OperatorConfig`] (the functions of
//! `thumbup_core::provision`) -> objects built by the pure functions of
//! [`resources`] and applied with server-side apply -> the status conditions.
//! Deletion runs through a finalizer. Only the replica holding the
//! [`leader`] Lease reconciles.

// kube::Error and the provisioning errors are large; errors are rare and off
// any hot path, so they are not boxed.
#![allow(clippy::result_large_err)]

pub mod config;
pub mod controller;
pub mod crd;
pub mod crdgen;
pub mod ctl;
pub mod error;
pub mod failover;
pub mod leader;
pub mod metrics;
pub mod provision;
pub mod resources;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tracing::info;

/// How `thumbup-operator run` was started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The operator config file.
    pub config: std::path::PathBuf,
    /// Namespace watched and holding the registry and the Lease; None: the
    /// client's default namespace.
    pub namespace: Option<String>,
    /// Watch LikeTenants of every namespace.
    pub all_namespaces: bool,
    /// Admin HTTP address.
    pub admin_listen: SocketAddr,
    /// Leader-election identity.
    pub identity: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// Lease duration.
    pub lease_duration: Duration,
}

/// How long the controllers may take to finish after shutdown is asked
/// for; then the run ends regardless (releasing the Lease), so SIGTERM is
/// never left waiting on a reconcile or a watch that does not end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs the operator until `shutdown` resolves or leadership is lost.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    // In cluster: the service account; elsewhere: the kubeconfig.
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    run_with_client(opts, client, shutdown).await
}

/// [`run`] with a given Kubernetes client. A watch that the API server
/// refuses (the RBAC does not grant it) ends the run with an error naming
/// the resource, scope and verb, after the Lease is released.
pub async fn run_with_client(
    opts: Options,
    client: kube::Client,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cfg = Arc::new(config::OperatorConfig::load(&opts.config)?);
    let namespace = opts.namespace.clone().unwrap_or_else(|| client.default_namespace().to_string());
    let metrics = metrics::Metrics;
    let ready = Arc::new(AtomicBool::new(false));

    let admin = thumbup_core::admin::Admin::start(opts.admin_listen, ready.clone(), shutdown).await?;
    info!(addr = %admin.addr, "admin endpoint");

    let elector =
        leader::Elector::new(client.clone(), &namespace, &opts.lease_name, &opts.identity, opts.lease_duration);
    // Ready means: able to serve as a standby or leader; liveness stays on.
    ready.store(true, Ordering::Relaxed);
    tokio::select! {
        _ = elector.acquire() => {}
        _ = admin.stopped() => { admin.join().await; return Ok(()); }
    }
    metrics.set_leader(true);
    // The failover controller publishes every route here; the tenant
    // controller provisions on the route's active datacenter.
    let (route_tx, route_rx) = tokio::sync::watch::channel(None);
    let watched = if opts.all_namespaces { None } else { Some(namespace.clone()) };
    let failover = if cfg.failover.enabled {
        let tenants: kube::Api<crd::LikeTenant> = match &watched {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        };
        let fo = failover::Options {
            config: (*cfg).clone(),
            config_path: Some(opts.config.clone()),
            store: failover::RouteStore::ConfigMap {
                cm: Box::new(failover::kube::RouteConfigMap::new(
                    client.clone(),
                    &namespace,
                    &cfg.failover.route_config_map,
                )),
                version: None,
            },
            tenants: failover::TenantSource::Registry(
                Box::new(kube::Api::namespaced(client.clone(), &namespace)),
                cfg.registry.config_map.clone(),
            ),
            publisher: Some(failover::Publisher { tenants, client: client.clone() }),
            route_tx: Some(route_tx),
            notices: None,
        };
        info!(route = %cfg.failover.route_config_map, "failover controller starting");
        futures::future::Either::Left(failover::run(fo, admin.stopped()))
    } else {
        info!("failover controller disabled (failover.enabled: false)");
        drop(route_tx);
        futures::future::Either::Right(std::future::pending())
    };
    let ctx = controller::Context::new(client, cfg, namespace.clone(), metrics.clone(), route_rx);
    info!(namespace = watched.as_deref().unwrap_or("<all>"), "tenant controller starting");
    // Shutdown asked for, and the grace period over.
    let overdue = {
        let stop = admin.stopped();
        async move {
            stop.await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        }
    };
    let outcome: anyhow::Result<()> = tokio::select! {
        r = controller::run(ctx, watched, admin.stopped()) => r.map_err(anyhow::Error::from),
        r = failover => {
            // It returns early only when it cannot start (config or route
            // unusable): leave the Lease to a replica that can.
            r.map_err(|e| anyhow::anyhow!("failover controller stopped: {e}"))
        }
        _ = elector.hold() => {
            metrics.set_leader(false);
            admin.stop();
            anyhow::bail!("lost the leader Lease; exiting so that the new leader reconciles alone");
        }
        _ = overdue => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "the controllers did not stop in time; exiting");
            Ok(())
        }
    };
    metrics.set_leader(false);
    admin.stop();
    // Whatever ended the run, a successor takes the Lease at once.
    if tokio::time::timeout(SHUTDOWN_GRACE, elector.release()).await.is_err() {
        tracing::warn!("releasing the Lease timed out");
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, admin.join()).await;
    outcome
}
