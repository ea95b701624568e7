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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{Predicate, WatchStreamExt, predicates, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use thumbup_core::config as core_config;
use thumbup_core::names;
use thumbup_core::retry::Backoff;
use thumbup_core::route::Route;
use tokio::sync::watch;
use tracing::{info, instrument, warn};

use crate::config::{Datacenter, OperatorConfig};
use crate::crd::{Condition, DeletionPolicy, FINALIZER, LikeTenant, LikeTenantStatus, condition, rfc3339};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::provision;
use crate::resources::{self, Credentials, REGISTRY_KEY};

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

/// Prefix of the annotations on the registry ConfigMap that record which
/// LikeTenant owns a tenant name: `thumbup.io/tenant.<name>: <namespace>/<uid>`.
const OWNER_ANNOTATION: &str = "thumbup.io/tenant.";

/// How often a Ready tenant is checked again (drift: a deleted ACL user, a
/// dropped grant).
const RESYNC: Duration = Duration::from_secs(300);
/// How often a tenant whose job is still rolling out is checked again (the
/// Deployment watch usually wakes it sooner).
const PROGRESS_RECHECK: Duration = Duration::from_secs(15);

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

/// How soon a tenant is looked at again while the route's promotion of the
/// new primary is pending (the route's completion also wakes every tenant).
const PROMOTION_RECHECK: Duration = Duration::from_secs(2);

/// Reconciles one LikeTenant (the controller's entry point): adds the
/// finalizer to a live object, provisions one that has it, and cleans up a
/// deleted one once before removing the finalizer.
#[instrument(skip_all, fields(tenant = %lt.name_any(), namespace = lt.namespace().unwrap_or_default()))]
pub async fn reconcile(lt: Arc<LikeTenant>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let ns = lt.namespace().ok_or(Error::MissingObjectKey("namespace"))?;
    let api: Api<LikeTenant> = Api::namespaced(ctx.client.clone(), &ns);
    let result = pass(&api, &lt, &ctx).await;
    ctx.metrics.observe(start.elapsed(), result.as_ref().err().map(Error::reason));
    result
}

fn has_finalizer(lt: &LikeTenant) -> bool {
    lt.finalizers().iter().any(|f| f == FINALIZER)
}

async fn pass(api: &Api<LikeTenant>, lt: &LikeTenant, ctx: &Context) -> Result<Action> {
    let deleting = lt.meta().deletion_timestamp.is_some();
    match (deleting, has_finalizer(lt)) {
        (false, false) => {
            // The write wakes the controller again (the finalizers trigger).
            add_finalizer(api, lt).await?;
            Ok(Action::await_change())
        }
        (false, true) => apply(lt, ctx).await,
        (true, true) => {
            // The object in the cache can be older than a cleanup that
            // already ran (another trigger, the job Deployment's deletion
            // among them, queued it again): read it back first, and clean
            // up only while it still carries the finalizer.
            let Some(fresh) = current(api, lt).await? else { return Ok(Action::await_change()) };
            if fresh.meta().deletion_timestamp.is_none() || !has_finalizer(&fresh) {
                return Ok(Action::await_change());
            }
            if let Some(wait) = cleanup(&fresh, ctx).await? {
                return Ok(wait);
            }
            remove_finalizer(api, &fresh).await?;
            Ok(Action::await_change())
        }
        (true, false) => Ok(Action::await_change()),
    }
}

/// The object as the API server holds it now (a list by name: the
/// operator's RBAC lists LikeTenants and does not get them); None when it
/// is gone or is another object of the same name.
async fn current(api: &Api<LikeTenant>, lt: &LikeTenant) -> Result<Option<LikeTenant>> {
    let name = lt.name_any();
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    let list = api.list(&lp).await.map_err(kube_err(&lt.tenant(), "reading the LikeTenant back"))?;
    Ok(list.items.into_iter().find(|o| o.name_any() == name && o.uid() == lt.uid()))
}

fn json_patch(ops: serde_json::Value) -> json_patch::Patch {
    serde_json::from_value(ops).expect("a JSON patch")
}

/// Adds the finalizer with a JSON patch that first tests the list as read,
/// so a concurrent change of the finalizers fails it instead of being lost.
async fn add_finalizer(api: &Api<LikeTenant>, lt: &LikeTenant) -> Result<()> {
    let ops = match &lt.metadata.finalizers {
        None => json!([
            { "op": "test", "path": "/metadata/finalizers", "value": null },
            { "op": "add", "path": "/metadata/finalizers", "value": [FINALIZER] },
        ]),
        Some(list) => json!([
            { "op": "test", "path": "/metadata/finalizers", "value": list },
            { "op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER },
        ]),
    };
    api.patch(&lt.name_any(), &patch_params(), &Patch::Json::<()>(json_patch(ops)))
        .await
        .map_err(|source| Error::Finalizer { tenant: lt.tenant(), step: "adding", source })?;
    Ok(())
}

/// Removes the finalizer (tested at its index first). An object already
/// gone is done.
async fn remove_finalizer(api: &Api<LikeTenant>, lt: &LikeTenant) -> Result<()> {
    let Some(i) = lt.finalizers().iter().position(|f| f == FINALIZER) else { return Ok(()) };
    let path = format!("/metadata/finalizers/{i}");
    let ops = json!([
        { "op": "test", "path": path, "value": FINALIZER },
        { "op": "remove", "path": path },
    ]);
    match api.patch(&lt.name_any(), &patch_params(), &Patch::Json::<()>(json_patch(ops))).await {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Ok(()),
        Err(source) => Err(Error::Finalizer { tenant: lt.tenant(), step: "removing", source }),
    }
}

/// Requeues a failed object with an exponential backoff (5 s doubling up to
/// 5 minutes) and counts the failure.
pub fn error_policy(lt: Arc<LikeTenant>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(tenant = %lt.name_any(), reason = error.reason(), error = %error, "reconcile failed");
    let key = format!("{}/{}", lt.namespace().unwrap_or_default(), lt.name_any());
    let n = {
        let mut f = ctx.failures.lock().expect("not poisoned");
        let n = f.entry(key).or_insert(0);
        *n += 1;
        *n
    };
    Action::requeue(backoff(n))
}

/// Delay before retry number `n` (1-based).
pub fn backoff(n: u32) -> Duration {
    const REQUEUE: Backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
    REQUEUE.delay(n.saturating_sub(1))
}

fn succeeded(lt: &LikeTenant, ctx: &Context) {
    let key = format!("{}/{}", lt.namespace().unwrap_or_default(), lt.name_any());
    ctx.failures.lock().expect("not poisoned").remove(&key);
}

/// Outcome of claiming or releasing a tenant name in the registry.
enum Claim {
    /// This LikeTenant owns the name (now).
    Ours,
    /// Another LikeTenant does.
    Taken(String),
}

/// What [`update_registry`] does to the tenant's place in the registry.
enum RegistryChange<'a> {
    /// Claim the name only; the file stays as it is.
    Claim,
    /// Claim the name and put the tenant's entry.
    Put(&'a core_config::TenantConfig),
    /// Remove the entry and the claim (only when the claim is ours).
    Remove,
}

fn owner_id(lt: &LikeTenant) -> String {
    format!("{}/{}", lt.namespace().unwrap_or_default(), lt.uid().unwrap_or_default())
}

/// Read-modify-write of the registry ConfigMap under optimistic concurrency
/// (replace with the resourceVersion read; a conflict re-reads).
async fn update_registry(lt: &LikeTenant, ctx: &Context, change: RegistryChange<'_>) -> Result<Claim> {
    let tenant = lt.tenant();
    let name = &ctx.config.registry.config_map;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let annotation = format!("{OWNER_ANNOTATION}{tenant}");
    let me = owner_id(lt);
    for _ in 0..5 {
        let current = api.get_opt(name).await.map_err(kube_err(&tenant, "reading the registry ConfigMap"))?;
        let exists = current.is_some();
        let mut cm = current.unwrap_or_else(|| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ctx.namespace.clone()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), MANAGER.into())])),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        });
        let annotations = cm.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match annotations.get(&annotation) {
            Some(owner) if *owner != me => return Ok(Claim::Taken(owner.clone())),
            None if matches!(change, RegistryChange::Remove) => return Ok(Claim::Ours),
            _ => {}
        }
        let before = cm.clone();
        let text = cm.data.as_ref().and_then(|d| d.get(REGISTRY_KEY)).cloned().unwrap_or_default();
        let mut entries =
            resources::parse_registry(&text).map_err(|source| Error::Registry { name: name.clone(), source })?;
        let annotations = cm.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match change {
            RegistryChange::Claim => {
                annotations.insert(annotation.clone(), me.clone());
            }
            RegistryChange::Put(e) => {
                annotations.insert(annotation.clone(), me.clone());
                entries.insert(tenant.clone(), serde_yaml::to_value(e).expect("plain data"));
            }
            RegistryChange::Remove => {
                annotations.remove(&annotation);
                entries.remove(&tenant);
            }
        }
        // A claim alone leaves the file as it is (a missing file is created).
        if !matches!(change, RegistryChange::Claim) || !text_present(&cm) {
            cm.data.get_or_insert_with(BTreeMap::new).insert(REGISTRY_KEY.into(), resources::render_registry(&entries));
        }
        if exists && cm == before {
            return Ok(Claim::Ours);
        }
        let written = if exists {
            api.replace(name, &PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &cm).await
        } else {
            api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &cm).await
        };
        match written {
            Ok(_) => return Ok(Claim::Ours),
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(kube_err(&tenant, "writing the registry ConfigMap")(e)),
        }
    }
    Err(Error::RegistryContended(name.clone()))
}

fn text_present(cm: &ConfigMap) -> bool {
    cm.data.as_ref().is_some_and(|d| d.contains_key(REGISTRY_KEY))
}

/// Server-side applies the tenant's keys of the registry Secret under a field
/// manager of its own, so tenants never overwrite each other's keys and an
/// empty apply removes exactly this tenant's keys.
async fn apply_registry_secret(lt: &LikeTenant, ctx: &Context, creds: Option<&Credentials>) -> Result<()> {
    let tenant = lt.tenant();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let data = creds.map(|c| resources::registry_secret_data(&tenant, c)).unwrap_or_default();
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": ctx.config.registry.secret, "namespace": ctx.namespace },
        "data": data,
    });
    let pp = PatchParams::apply(&format!("{MANAGER}.{tenant}")).force();
    api.patch(&ctx.config.registry.secret, &pp, &Patch::Apply(&secret))
        .await
        .map_err(kube_err(&tenant, "applying the registry Secret"))?;
    Ok(())
}

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

/// Conditions of a pass, merged into the previous status.
struct Conditions {
    list: Vec<Condition>,
    generation: Option<i64>,
    now: String,
}

impl Conditions {
    fn new(lt: &LikeTenant) -> Conditions {
        let now = rfc3339(jiff::Timestamp::now());
        let list = lt.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        Conditions { list, generation: lt.generation(), now }
    }

    /// Sets a condition; its transition time moves only when its status does,
    /// so a pass that changes nothing writes the same status.
    fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
        let status = if ok { "True" } else { "False" };
        let c = Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: self.now.clone(),
            observed_generation: self.generation,
        };
        match self.list.iter_mut().find(|x| x.type_ == type_) {
            Some(old) if old.status == status => {
                *old = Condition { last_transition_time: old.last_transition_time.clone(), ..c };
            }
            Some(old) => *old = c,
            None => self.list.push(c),
        }
    }

    fn is_true(&self, type_: &str) -> bool {
        self.list.iter().any(|c| c.type_ == type_ && c.status == "True")
    }
}

/// Applies this controller's status fields
/// ([`LikeTenantStatus::tenant_part`]) when they differ from the object's,
/// with server-side apply under [`MANAGER`]: the failover controller's
/// fields are its own and are neither sent nor touched.
async fn write_status(lt: &LikeTenant, ctx: &Context, status: LikeTenantStatus) -> Result<()> {
    let status = status.tenant_part();
    if lt.status.as_ref().map(LikeTenantStatus::tenant_part) == Some(status.clone()) {
        return Ok(());
    }
    let tenant = lt.tenant();
    let api: Api<LikeTenant> = Api::namespaced(ctx.client.clone(), &lt.namespace().unwrap_or_default());
    let apply = json!({
        "apiVersion": LikeTenant::api_version(&()),
        "kind": LikeTenant::kind(&()),
        "status": status,
    });
    api.patch_status(&lt.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(&apply))
        .await
        .map_err(kube_err(&tenant, "writing the status"))?;
    Ok(())
}

async fn publish(lt: &LikeTenant, ctx: &Context, type_: EventType, reason: &str, note: String, action: &str) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &lt.object_ref(&())).await {
        warn!(error = %e, "publishing an Event failed");
    }
}

/// Reports a failure: marks `step` (when a step failed) and Ready False with
/// the error's reason, emits a Warning Event with that reason and writes the
/// status.
async fn report(
    lt: &LikeTenant,
    ctx: &Context,
    mut status: LikeTenantStatus,
    mut conds: Conditions,
    step: Option<&str>,
    e: &Error,
) -> Result<()> {
    let reason = e.reason();
    if let Some(step) = step {
        conds.set(step, false, reason, e.to_string());
    }
    let message = match step {
        Some(step) => format!("{step}: {e}"),
        None => e.to_string(),
    };
    conds.set(condition::READY, false, reason, message);
    status.conditions = conds.list;
    publish(lt, ctx, EventType::Warning, reason, e.to_string(), "Reconcile").await;
    write_status(lt, ctx, status).await
}

/// A failed step: reported, then returned for the backoff. A refusal of
/// the data layer's admission is not retried with a backoff (the LikeTenant
/// or the other owner must change); it is looked at again at the resync.
async fn fail(
    lt: &LikeTenant,
    ctx: &Context,
    status: LikeTenantStatus,
    conds: Conditions,
    step: &str,
    e: Error,
) -> Result<Action> {
    report(lt, ctx, status, conds, Some(step), &e).await?;
    if e.is_refusal() {
        warn!(reason = e.reason(), error = %e, "refused");
        return Ok(Action::requeue(RESYNC));
    }
    Err(e)
}

/// The condition of the step whose admission failed.
fn step_of(e: &Error) -> &'static str {
    match e {
        Error::Redis { .. } => condition::REDIS_READY,
        _ => condition::DATABASE_READY,
    }
}

async fn apply(lt: &LikeTenant, ctx: &Context) -> Result<Action> {
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
    let deployment = resources::build_job_deployment(lt, &cfg, &ctx.namespace);
    let name = names::job_deployment(&tenant);
    let applied = deployments
        .patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&deployment))
        .await
        .map_err(kube_err(&tenant, "applying the job Deployment"))?;
    let want = lt.spec.job.replicas;
    let s = applied.status.unwrap_or_default();
    let rolled = s.observed_generation >= applied.metadata.generation;
    let available = s.available_replicas.unwrap_or(0);
    let job_ready = rolled && available >= want && s.updated_replicas.unwrap_or(0) >= want;
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
async fn cleanup(lt: &LikeTenant, ctx: &Context) -> Result<Option<Action>> {
    let tenant = lt.tenant();
    let cfg = ctx.config.clone();
    let ns = lt.namespace().unwrap_or_default();
    let place = placement(lt, ctx, &cfg);
    if place.promotion_pending {
        info!(datacenter = %place.active, "cleanup waits for the promotion of the new primary");
        return Ok(Some(Action::requeue(PROMOTION_RECHECK)));
    }

    // The job first, so nothing writes while the rest goes away.
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    match deployments.delete(&names::job_deployment(&tenant), &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(e) if is_status(&e, 404) => {}
        Err(e) => return Err(kube_err(&tenant, "deleting the job Deployment")(e)),
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
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LikeTenantSpec;

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
