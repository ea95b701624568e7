//! The entry point of a pass: the finalizer (added to a live object,
//! removed after the cleanup of a deleted one), and the requeue backoff of
//! a failed pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, ListParams, Patch};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use thumbup_core::retry::Backoff;
use tracing::{instrument, warn};

use super::apply::{apply, cleanup};
use super::{Context, is_status, kube_err, patch_params};
use crate::crd::{FINALIZER, LikeTenant};
use crate::error::{Error, Result};

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

pub(super) fn succeeded(lt: &LikeTenant, ctx: &Context) {
    let key = format!("{}/{}", lt.namespace().unwrap_or_default(), lt.name_any());
    ctx.failures.lock().expect("not poisoned").remove(&key);
}
