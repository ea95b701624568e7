//! What a pass reports: the conditions, the status (this controller's
//! fields only), and the Events.

use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tracing::warn;

use super::apply::RESYNC;
use super::{Context, MANAGER, kube_err};
use crate::crd::{Condition, LikeTenant, LikeTenantStatus, condition, rfc3339};
use crate::error::{Error, Result};

/// Conditions of a pass, merged into the previous status.
pub(super) struct Conditions {
    pub(super) list: Vec<Condition>,
    generation: Option<i64>,
    now: String,
}

impl Conditions {
    pub(super) fn new(lt: &LikeTenant) -> Conditions {
        let now = rfc3339(jiff::Timestamp::now());
        let list = lt.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
        Conditions { list, generation: lt.generation(), now }
    }

    /// Sets a condition; its transition time moves only when its status does,
    /// so a pass that changes nothing writes the same status.
    pub(super) fn set(&mut self, type_: &str, ok: bool, reason: &str, message: impl Into<String>) {
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

    pub(super) fn is_true(&self, type_: &str) -> bool {
        self.list.iter().any(|c| c.type_ == type_ && c.status == "True")
    }
}

/// Applies this controller's status fields
/// ([`LikeTenantStatus::tenant_part`]) when they differ from the object's,
/// with server-side apply under [`MANAGER`]: the failover controller's
/// fields are its own and are neither sent nor touched.
pub(super) async fn write_status(lt: &LikeTenant, ctx: &Context, status: LikeTenantStatus) -> Result<()> {
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

pub(super) async fn publish(
    lt: &LikeTenant,
    ctx: &Context,
    type_: EventType,
    reason: &str,
    note: String,
    action: &str,
) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &lt.object_ref(&())).await {
        warn!(error = %e, "publishing an Event failed");
    }
}

/// Reports a failure: marks `step` (when a step failed) and Ready False with
/// the error's reason, emits a Warning Event with that reason and writes the
/// status.
pub(super) async fn report(
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
pub(super) async fn fail(
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
pub(super) fn step_of(e: &Error) -> &'static str {
    match e {
        Error::Redis { .. } => condition::REDIS_READY,
        _ => condition::DATABASE_READY,
    }
}
