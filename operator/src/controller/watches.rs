//! The watch wiring: what wakes a tenant (its generation and finalizers,
//! the route's flips, its job Deployment), and [`run`], which ends on a
//! watch the API server refuses.

use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::controller::Controller;
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use thumbup_core::route::Route;
use tokio::sync::watch;
use tracing::{info, warn};

use super::Context;
use super::reconcile::{error_policy, reconcile};
use crate::crd::LikeTenant;
use crate::error::{Error, Result};
use crate::resources;

/// What wakes the controller for a LikeTenant: its generation (spec
/// changes and the start of deletion) and its finalizers. Status and other
/// metadata writes, the operator's own included, do not.
pub fn trigger(lt: &LikeTenant) -> Option<u64> {
    predicates::generation.combine(predicates::finalizers).hash_property(lt)
}

/// The active datacenter, epoch and pending promotion of a route: what
/// tenants follow.
fn route_key(route: &Option<Route>) -> Option<(String, u64, bool)> {
    route.as_ref().map(|r| (r.active_datacenter.clone(), r.epoch, r.failover.promotion_pending))
}

/// Yields once for every change of the route's active datacenter or epoch,
/// and when a promotion starts or completes (not for the failover
/// controller's other records, which change with every probe run); ends
/// when the publisher is gone.
pub fn route_flips(rx: watch::Receiver<Option<Route>>) -> impl Stream<Item = ()> + Send + 'static {
    let seen = route_key(&rx.borrow());
    futures::stream::unfold((rx, seen), |(mut rx, seen)| async move {
        loop {
            rx.changed().await.ok()?;
            let now = route_key(&rx.borrow_and_update());
            if now != seen {
                return Some(((), (rx, now)));
            }
        }
    })
}

/// The verb, code and message of a watcher error that is a refusal (401
/// or 403): retrying cannot cure it.
fn refused(e: &watcher::Error) -> Option<(&'static str, u16, String)> {
    let (verb, status) = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => ("list", s.as_ref()),
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) | watcher::Error::WatchFailed(kube::Error::Api(s)) => {
            ("watch", s.as_ref())
        }
        watcher::Error::WatchError(s) => ("watch", s.as_ref()),
        _ => return None,
    };
    [401, 403].contains(&status.code).then(|| (verb, status.code, status.message.clone()))
}

/// Runs the controller until `shutdown` resolves. `namespace` None watches
/// every namespace. A watch that the API server refuses (401 or 403: the
/// RBAC does not grant it) ends the run with [`Error::WatchForbidden`],
/// naming the resource, the scope and the verb, instead of retrying forever.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<()> {
    let (tenants, deployments): (Api<LikeTenant>, Api<Deployment>) = match &namespace {
        Some(ns) => (Api::namespaced(ctx.client.clone(), ns), Api::namespaced(ctx.client.clone(), ns)),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let scope = match &namespace {
        Some(ns) => format!("in namespace {ns}"),
        None => "in every namespace (cluster scope)".to_string(),
    };
    // Set when the tenant watch is refused, so that a refusal in the
    // controller's output is told apart from one of the Deployment watch.
    let tenants_refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = tenants_refused.clone();
    let (reader, writer) = kube::runtime::reflector::store();
    let stream = watcher(tenants, watcher::Config::default().any_semantic())
        .inspect(move |ev| {
            if let Err(e) = ev
                && refused(e).is_some()
            {
                seen.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(trigger, Default::default());
    let jobs = watcher::Config::default().labels("app.kubernetes.io/managed-by=thumbup-operator");
    let sweep = tokio::spawn(remove_stale_job_deployments(ctx.clone(), deployments.clone()));
    let flips = route_flips(ctx.route.clone());
    let out = Controller::for_stream(stream, reader)
        .owns(deployments, jobs)
        .reconcile_all_on(flips)
        .with_config(kube::runtime::controller::Config::default().concurrency(4))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx);
    let mut out = std::pin::pin!(out);
    while let Some(item) = out.next().await {
        let Err(kube::runtime::controller::Error::QueueError(e)) = &item else { continue };
        let Some((verb, code, message)) = refused(e) else {
            warn!(error = %e, "watch failed; retrying");
            continue;
        };
        let resource = if tenants_refused.load(std::sync::atomic::Ordering::Relaxed) {
            "liketenants.thumbup.io"
        } else {
            "deployments.apps"
        };
        let e = Error::WatchForbidden { resource, scope, verb, code, message };
        tracing::error!(error = %e, "tenant controller stopped");
        sweep.abort();
        return Err(e);
    }
    sweep.abort();
    Ok(())
}

/// How often the sweep of stale job Deployments tries to list them.
const SWEEP_ATTEMPTS: u32 = 5;

/// Once per controller start: deletes the job Deployments of a layout that
/// the config no longer runs ([`resources::is_stale_job_deployment`]: the
/// plain one after `topology.per_datacenter` was turned on, the
/// per-datacenter ones after it was turned off or their datacenter left the
/// config). A config change restarts the operator (the chart rolls its pods
/// on the config's checksum), so once per start is enough, and the
/// reconcile of each tenant makes no extra request for it.
async fn remove_stale_job_deployments(ctx: Arc<Context>, deployments: Api<Deployment>) {
    let params = ListParams::default().labels("app.kubernetes.io/managed-by=thumbup-operator");
    for attempt in 1..=SWEEP_ATTEMPTS {
        let listed = match deployments.list(&params).await {
            Ok(listed) => listed,
            Err(e) => {
                warn!(error = %e, attempt, "listing the job Deployments for stale ones");
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
                continue;
            }
        };
        for d in listed.items.iter().filter(|d| resources::is_stale_job_deployment(&ctx.config, d)) {
            let (Some(name), Some(ns)) = (d.metadata.name.as_deref(), d.metadata.namespace.as_deref()) else {
                continue;
            };
            let api: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
            match api.delete(name, &DeleteParams::foreground()).await {
                Ok(_) => info!(namespace = ns, deployment = name, "deleted a job Deployment of another topology"),
                Err(e) => warn!(namespace = ns, deployment = name, error = %e, "deleting a stale job Deployment"),
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crd::{FINALIZER, LikeTenantSpec, LikeTenantStatus};

    #[test]
    fn status_writes_do_not_trigger_but_spec_and_finalizer_changes_do() {
        let mut lt = LikeTenant::new("t", LikeTenantSpec::with_businesses(vec![]));
        lt.metadata.generation = Some(1);
        let base = trigger(&lt);
        let mut status = lt.clone();
        status.status = Some(LikeTenantStatus { observed_generation: Some(1), ..Default::default() });
        status.metadata.resource_version = Some("99".into());
        assert_eq!(trigger(&status), base, "a status write must not wake the controller");
        // Nor do the failover controller's status writes.
        let mut failover = status.clone();
        failover.status = Some(LikeTenantStatus {
            active_datacenter: Some("dc-b".into()),
            failover_epoch: Some(2),
            failing_since: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        });
        failover.metadata.resource_version = Some("100".into());
        assert_eq!(trigger(&failover), base, "a failover status write must not wake the controller");
        let mut spec = lt.clone();
        spec.metadata.generation = Some(2);
        assert_ne!(trigger(&spec), base);
        let mut fin = lt.clone();
        fin.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_ne!(trigger(&fin), base);
    }

    fn route(epoch: u64, active: &str) -> Route {
        Route {
            epoch,
            active_datacenter: active.into(),
            datacenters: [("dc-a".to_string(), "a:1".to_string()), ("dc-b".into(), "b:1".into())].into(),
            redis: Default::default(),
            failover: Default::default(),
        }
    }

    #[tokio::test]
    async fn every_tenant_is_reconciled_again_when_the_route_flips_not_when_only_its_record_changes() {
        let (tx, rx) = watch::channel(None);
        let mut flips = Box::pin(route_flips(rx));

        async fn next(flips: &mut (impl Stream<Item = ()> + Unpin)) -> Result<Option<()>, tokio::time::error::Elapsed> {
            tokio::time::timeout(Duration::from_millis(200), flips.next()).await
        }
        tx.send(Some(route(1, "dc-a"))).unwrap();
        assert_eq!(next(&mut flips).await, Ok(Some(())), "the first route");
        let mut failing = route(1, "dc-a");
        failing.failover.failing_since = Some(jiff::Timestamp::now());
        tx.send(Some(failing)).unwrap();
        assert!(next(&mut flips).await.is_err(), "a probe record alone is no flip");
        tx.send(Some(route(2, "dc-b"))).unwrap();
        assert_eq!(next(&mut flips).await, Ok(Some(())), "a flip");
        drop(tx);
        assert_eq!(next(&mut flips).await, Ok(None), "the publisher is gone");
    }
}
