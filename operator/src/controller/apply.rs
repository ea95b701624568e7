//! The reconcile steps: where the tenant goes (the route's active
//! datacenter), its Secret, the provisioning of DB and Redis, the registry
//! entry and the job Deployment; and the cleanup of a deleted tenant.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use thumbup_core::config as core_config;
use thumbup_core::names;
use tracing::{info, warn};

use super::reconcile::succeeded;
use super::registry::{Claim, RegistryChange, apply_registry_secret, update_registry};
use super::status::{Conditions, fail, publish, report, step_of, write_status};
use super::{Context, MANAGER, is_status, kube_err};
use crate::config::{Datacenter, OperatorConfig};
use crate::crd::{DeletionPolicy, LikeTenant, LikeTenantStatus, condition};
use crate::error::{Error, Result};
use crate::provision;
use crate::resources::{self, Credentials};

/// How often a Ready tenant is checked again (drift: a deleted ACL user, a
/// dropped grant).
pub(super) const RESYNC: Duration = Duration::from_secs(300);
/// How often a tenant whose job is still rolling out is checked again (the
/// Deployment watch usually wakes it sooner).
const PROGRESS_RECHECK: Duration = Duration::from_secs(15);

/// How soon a tenant is looked at again while the route's promotion of the
/// new primary is pending (the route's completion also wakes every tenant).
const PROMOTION_RECHECK: Duration = Duration::from_secs(2);

/// The tenant's credentials: read back from its Secret, each missing one
/// generated (and stored by [`apply_tenant_secret`] before anything uses it).
async fn credentials(lt: &LikeTenant, ctx: &Context) -> Result<Credentials> {
    let tenant = lt.tenant();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &lt.namespace().unwrap_or_default());
    let existing =
        api.get_opt(&names::tenant_secret(&tenant)).await.map_err(kube_err(&tenant, "reading the tenant Secret"))?;
    Ok(Credentials::kept_or_generated(existing.as_ref(), &tenant))
}

/// Applies the tenant Secret: credentials, token and the job's one-tenant
/// config file. An apply that changes nothing is a no-op on the server.
async fn apply_tenant_secret(lt: &LikeTenant, ctx: &Context, creds: &Credentials, dc: &Datacenter) -> Result<()> {
    let tenant = lt.tenant();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &lt.namespace().unwrap_or_default());
    let entry = resources::registry_entry(lt, &ctx.config, &dc.name);
    let secret = resources::build_tenant_secret(lt, creds, &entry);
    api.patch(&names::tenant_secret(&tenant), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&secret))
        .await
        .map_err(kube_err(&tenant, "applying the tenant Secret"))?;
    Ok(())
}

/// Where the tenants' data lives now.
struct Placement<'a> {
    /// The datacenter whose DB takes the writes: the tenant is provisioned
    /// there and its registry entry points there.
    dc: &'a Datacenter,
    /// `status.activeDatacenter`: the route's, else the config's.
    active: String,
    /// `status.failoverEpoch`: the route's, else what the status holds.
    epoch: Option<i64>,
    /// The route names a new primary whose promotion has not finished:
    /// its DB is still read-only, and the old one is fenced.
    promotion_pending: bool,
}

/// The route's active datacenter and epoch when a route is known, else the
/// configured active datacenter. The route is read once per pass, so one
/// pass never mixes two routes.
fn placement<'a>(lt: &LikeTenant, ctx: &Context, cfg: &'a OperatorConfig) -> Placement<'a> {
    let route =
        ctx.route.borrow().as_ref().map(|r| (r.active_datacenter.clone(), r.epoch, r.failover.promotion_pending));
    match route {
        Some((active, epoch, promotion_pending)) => {
            let dc = cfg.datacenter(&active).unwrap_or_else(|| {
                warn!(datacenter = %active, "the route names a datacenter the config does not list; using the config's active one");
                cfg.active()
            });
            Placement { dc, active, epoch: Some(crate::crd::epoch(epoch)), promotion_pending }
        }
        None => Placement {
            dc: cfg.active(),
            active: cfg.active().name.clone(),
            epoch: lt.status.as_ref().and_then(|s| s.failover_epoch),
            promotion_pending: false,
        },
    }
}

pub(super) async fn apply(lt: &LikeTenant, ctx: &Context) -> Result<Action> {
    let tenant = lt.tenant();
    let cfg = ctx.config.clone();
    let place = placement(lt, ctx, &cfg);
    if place.promotion_pending {
        // Nothing to do on a DB that is not writable yet, and no failure to
        // report: the pass runs again when the promotion completes.
        info!(datacenter = %place.active, "waiting for the promotion of the new primary");
        return Ok(Action::requeue(PROMOTION_RECHECK));
    }
    let dc = place.dc;
    let mut conds = Conditions::new(lt);
    let mut status = LikeTenantStatus {
        conditions: Vec::new(),
        schema: Some(lt.schema()),
        redis_prefix: Some(names::key_prefix(&tenant)),
        businesses: Some(lt.spec.businesses.len() as i32),
        secret_name: Some(names::tenant_secret(&tenant)),
        active_datacenter: Some(place.active),
        failover_epoch: place.epoch,
        // The failover controller's.
        failing_since: None,
        last_transition: None,
        failover_blocked: None,
        observed_generation: lt.generation(),
    };
    // Neither a bad name nor a name owned elsewhere is cured by retrying:
    // reported, then left until the LikeTenant changes.
    if !core_config::valid_tenant_name(&tenant) {
        report(lt, ctx, status, conds, None, &Error::InvalidName(tenant.clone())).await?;
        return Ok(Action::await_change());
    }
    if let Claim::Taken(owner) = update_registry(lt, ctx, RegistryChange::Claim).await? {
        report(lt, ctx, status, conds, None, &Error::NameConflict { tenant: tenant.clone(), owner }).await?;
        return Ok(Action::await_change());
    }
    // Before anything is created or any credential generated: the schema
    // and the accounts must be free or this LikeTenant's.
    let owner = provision::owner(lt, &cfg.installation(&ctx.namespace));
    if let Err(e) = provision::admit(lt, &owner, &cfg, dc).await {
        return fail(lt, ctx, status, conds, step_of(&e), e).await;
    }
    let creds = credentials(lt, ctx).await?;
    apply_tenant_secret(lt, ctx, &creds, dc).await?;

    if let Err(e) = provision::database(lt, &owner, &creds, dc).await {
        return fail(lt, ctx, status, conds, condition::DATABASE_READY, e).await;
    }
    conds.set(
        condition::DATABASE_READY,
        true,
        "Provisioned",
        format!("schema {} on {} with user {}", lt.schema(), dc.name, names::db_user(&tenant)),
    );
    if let Err(e) = provision::redis(lt, &owner, &creds, &cfg).await {
        return fail(lt, ctx, status, conds, condition::REDIS_READY, e).await;
    }
    let dcs: Vec<_> = cfg.datacenters.iter().map(|d| d.name.as_str()).collect();
    conds.set(
        condition::REDIS_READY,
        true,
        "Provisioned",
        format!("ACL user {} on {}", names::redis_user(&tenant), dcs.join(", ")),
    );

    apply_registry_secret(lt, ctx, Some(&creds)).await?;
    let entry = resources::registry_entry(lt, &cfg, &dc.name);
    update_registry(lt, ctx, RegistryChange::Put(&entry)).await?;

    let ns = lt.namespace().unwrap_or_default();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    // One Deployment, or one per datacenter (topology.per_datacenter).
    let wanted = resources::build_job_deployments(lt, &cfg, &ctx.namespace);
    let want = lt.spec.job.replicas;
    let (mut job_ready, mut available, mut wanted_pods) = (true, 0, 0);
    for deployment in &wanted {
        let name = deployment.metadata.name.clone().unwrap_or_default();
        let applied = deployments
            .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(deployment))
            .await
            .map_err(kube_err(&tenant, "applying the job Deployment"))?;
        let s = applied.status.unwrap_or_default();
        let rolled = s.observed_generation >= applied.metadata.generation;
        let up = s.available_replicas.unwrap_or(0);
        job_ready &= rolled && up >= want && s.updated_replicas.unwrap_or(0) >= want;
        available += up;
        wanted_pods += want;
    }
    let want = wanted_pods;
    conds.set(
        condition::JOB_READY,
        job_ready,
        if job_ready { "Available" } else { "Progressing" },
        format!("{available}/{want} job replicas available"),
    );

    let was_ready = lt.condition(condition::READY).is_some_and(|c| c.status == "True");
    let ready = conds.is_true(condition::DATABASE_READY) && conds.is_true(condition::REDIS_READY) && job_ready;
    conds.set(
        condition::READY,
        ready,
        if ready { "Provisioned" } else { "JobProgressing" },
        if ready {
            "tenant is served".to_string()
        } else {
            format!("waiting for the job: {available}/{want} available")
        },
    );
    status.conditions = conds.list;
    write_status(lt, ctx, status).await?;
    if ready && !was_ready {
        publish(lt, ctx, EventType::Normal, "Provisioned", format!("tenant {tenant} is ready"), "Provision").await;
        info!("tenant ready");
    }
    succeeded(lt, ctx);
    Ok(Action::requeue(if ready { RESYNC } else { PROGRESS_RECHECK }))
}

/// Removes the tenant's job, registry entry and access (and with Delete its
/// data). Some(action) when it must wait (a promotion is pending: the
/// finalizer stays), None when done.
pub(super) async fn cleanup(lt: &LikeTenant, ctx: &Context) -> Result<Option<Action>> {
    let tenant = lt.tenant();
    let cfg = ctx.config.clone();
    let ns = lt.namespace().unwrap_or_default();
    let place = placement(lt, ctx, &cfg);
    if place.promotion_pending {
        info!(datacenter = %place.active, "cleanup waits for the promotion of the new primary");
        return Ok(Some(Action::requeue(PROMOTION_RECHECK)));
    }

    // The jobs first, so nothing writes while the rest goes away: those of
    // the configured layout (one, or one per datacenter; the controller's
    // start removed the other layout's, and the owner references take any
    // left with the LikeTenant).
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    for d in resources::build_job_deployments(lt, &cfg, &ctx.namespace) {
        delete_job_deployment(lt, &deployments, d.metadata.name.as_deref().unwrap_or_default()).await?;
    }
    // A LikeTenant that never owned the name (a conflicting duplicate) must
    // not remove the owner's registry entry, users or data.
    let owned = matches!(update_registry(lt, ctx, RegistryChange::Remove).await?, Claim::Ours);
    if owned && core_config::valid_tenant_name(&tenant) {
        apply_registry_secret(lt, ctx, None).await?;
        let owner = provision::owner(lt, &cfg.installation(&ctx.namespace));
        provision::teardown(lt, &owner, &cfg, place.dc).await?;
    }
    let (reason, note) = match lt.spec.deletion_policy {
        DeletionPolicy::Delete => ("Deleted", format!("tenant {tenant}: access, job and data removed")),
        DeletionPolicy::Retain => {
            ("Retained", format!("tenant {tenant}: access and job removed; schema {} and keys kept", lt.schema()))
        }
    };
    publish(lt, ctx, EventType::Normal, reason, note, "Cleanup").await;
    succeeded(lt, ctx);
    Ok(None)
}

/// Deletes one job Deployment of the tenant (foreground: its pods go
/// first); one that is already gone is fine.
async fn delete_job_deployment(lt: &LikeTenant, deployments: &Api<Deployment>, name: &str) -> Result<()> {
    match deployments.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(e) => Err(kube_err(&lt.tenant(), "deleting the job Deployment")(e)),
    }
}
