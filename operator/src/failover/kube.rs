//! The failover controller's Kubernetes side.
//!
//! - [`RouteConfigMap`]: the route document in a ConfigMap of the operator's
//!   namespace, read with its resourceVersion and written back with it, so
//!   that of two concurrent writers (an old leader that has not noticed yet,
//!   a new one) exactly one wins and the other gets
//!   [`FailoverKubeError::Conflict`].
//! - [`publish`]: makes the route visible on every LikeTenant: the status
//!   fields of the route (`activeDatacenter`, `failoverEpoch`,
//!   `failingSince`, `lastTransition`, `failoverBlocked`) by a status merge
//!   patch where they differ, and an Event per LikeTenant for a flip or a
//!   blocked failover. Status writes change no generation, so they do not
//!   wake the tenant controller (its trigger is generation + finalizers).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
pub use kube::runtime::events::EventType;
use kube::runtime::events::{Event, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use thumbup_core::route::{self, ROUTE_KEY, Route};
use tracing::warn;

use crate::controller::MANAGER;
use crate::crd::{LikeTenant, LikeTenantStatus};

/// A step of the failover controller's Kubernetes side that failed.
#[derive(Debug, thiserror::Error)]
pub enum FailoverKubeError {
    /// The route ConfigMap could not be read.
    #[error("reading ConfigMap {namespace}/{name}: {source}")]
    ReadRoute {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The client error.
        source: kube::Error,
    },
    /// The route ConfigMap exists but holds no usable route; it is left
    /// alone rather than overwritten.
    #[error("ConfigMap {namespace}/{name}: {detail}")]
    RouteUnreadable {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A route that breaks the route rules is not written.
    #[error("ConfigMap {namespace}/{name}: not writing an invalid route: {source}")]
    RouteInvalid {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The rule it breaks.
        source: route::RouteError,
    },
    /// Another writer created or changed the route ConfigMap since it was
    /// read: the caller reads it again before deciding anything.
    #[error("ConfigMap {namespace}/{name}: changed by another writer (expected resourceVersion {expected:?})")]
    Conflict {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The resourceVersion the write was based on (None: a create).
        expected: Option<String>,
    },
    /// The route ConfigMap could not be written.
    #[error("writing ConfigMap {namespace}/{name}: {source}")]
    WriteRoute {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap.
        name: String,
        /// The client error.
        source: kube::Error,
    },
    /// The LikeTenants could not be listed.
    #[error("listing LikeTenants: {0}")]
    ListTenants(#[source] kube::Error),
    /// A LikeTenant's status could not be patched.
    #[error("LikeTenant {namespace}/{name}: writing the failover status: {source}")]
    PatchStatus {
        /// The LikeTenant's namespace.
        namespace: String,
        /// The LikeTenant.
        name: String,
        /// The client error.
        source: kube::Error,
    },
}

impl FailoverKubeError {
    /// CamelCase reason: metric label and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            FailoverKubeError::ReadRoute { .. } => "RouteReadFailed",
            FailoverKubeError::RouteUnreadable { .. } => "RouteUnreadable",
            FailoverKubeError::RouteInvalid { .. } => "RouteInvalid",
            FailoverKubeError::Conflict { .. } => "RouteConflict",
            FailoverKubeError::WriteRoute { .. } => "RouteWriteFailed",
            FailoverKubeError::ListTenants(_) => "TenantListFailed",
            FailoverKubeError::PatchStatus { .. } => "TenantStatusFailed",
        }
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Key of the switchover request ConfigMap naming the datacenter asked for.
pub const REQUEST_DATACENTER_KEY: &str = "datacenter";
/// Key of the switchover request ConfigMap holding the request's id: a new
/// id is a new request; the controller acts on each id once.
pub const REQUEST_ID_KEY: &str = "requestId";
/// Key of the switchover request ConfigMap saying who asked (free text).
pub const REQUEST_BY_KEY: &str = "requestedBy";

/// The name of the switchover request ConfigMap beside the route ConfigMap
/// `route_config_map`.
pub fn switchover_config_map(route_config_map: &str) -> String {
    format!("{route_config_map}-switchover")
}

/// A planned switchover asked for through the API (`kubectl thumbup
/// switchover`), without changing the operator config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchoverRequest {
    /// The datacenter asked for.
    pub datacenter: String,
    /// The request's id.
    pub id: String,
    /// Who asked, as the request says.
    pub requested_by: String,
}

/// The request that a switchover request ConfigMap's data holds; an error
/// says what is missing or malformed.
pub fn parse_switchover_request(data: &BTreeMap<String, String>) -> Result<SwitchoverRequest, String> {
    let field = |key: &str| data.get(key).map(|v| v.trim()).filter(|v| !v.is_empty());
    let datacenter = field(REQUEST_DATACENTER_KEY).ok_or_else(|| format!("no key {REQUEST_DATACENTER_KEY}"))?;
    let id = field(REQUEST_ID_KEY).ok_or_else(|| format!("no key {REQUEST_ID_KEY}"))?;
    // Both are echoed into logs, Events and the route: short and printable.
    for (key, value) in [(REQUEST_DATACENTER_KEY, datacenter), (REQUEST_ID_KEY, id)] {
        if value.len() > 128 || !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)) {
            return Err(format!("key {key}: not a name (at most 128 of A-Z a-z 0-9 - _ . :)"));
        }
    }
    let requested_by: String =
        field(REQUEST_BY_KEY).unwrap_or("unknown").chars().filter(|c| !c.is_control()).take(128).collect();
    Ok(SwitchoverRequest { datacenter: datacenter.into(), id: id.into(), requested_by })
}

/// The route ConfigMap: key [`ROUTE_KEY`] of a ConfigMap in the operator's
/// namespace.
#[derive(Clone)]
pub struct RouteConfigMap {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl RouteConfigMap {
    /// The ConfigMap `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        RouteConfigMap { api: Api::namespaced(client, namespace), namespace: namespace.into(), name: name.into() }
    }

    fn unreadable(&self, detail: impl Into<String>) -> FailoverKubeError {
        FailoverKubeError::RouteUnreadable {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            detail: detail.into(),
        }
    }

    /// The route and the ConfigMap's resourceVersion; None when there is no
    /// ConfigMap yet.
    pub async fn load(&self) -> Result<Option<(Route, String)>, FailoverKubeError> {
        let cm = self.api.get_opt(&self.name).await.map_err(|source| FailoverKubeError::ReadRoute {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        let Some(cm) = cm else { return Ok(None) };
        let text = cm
            .data
            .as_ref()
            .and_then(|d| d.get(ROUTE_KEY))
            .ok_or_else(|| self.unreadable(format!("no key {ROUTE_KEY}")))?;
        let route = Route::parse(text).map_err(|e| self.unreadable(format!("key {ROUTE_KEY}: {e}")))?;
        let version = cm.metadata.resource_version.ok_or_else(|| self.unreadable("no resourceVersion"))?;
        Ok(Some((route, version)))
    }

    /// The switchover request in the ConfigMap [`switchover_config_map`]
    /// beside the route's; None when there is none.
    pub async fn switchover_request(&self) -> Result<Option<SwitchoverRequest>, FailoverKubeError> {
        let name = switchover_config_map(&self.name);
        let cm = self.api.get_opt(&name).await.map_err(|source| FailoverKubeError::ReadRoute {
            namespace: self.namespace.clone(),
            name: name.clone(),
            source,
        })?;
        let Some(cm) = cm else { return Ok(None) };
        parse_switchover_request(&cm.data.unwrap_or_default())
            .map(Some)
            .map_err(|detail| FailoverKubeError::RouteUnreadable { namespace: self.namespace.clone(), name, detail })
    }

    /// Writes `route`: creates the ConfigMap when `resource_version` is None,
    /// else replaces it on condition that it still has that version.
    /// Returns the new resourceVersion.
    pub async fn store(&self, route: &Route, resource_version: Option<&str>) -> Result<String, FailoverKubeError> {
        route.validate().map_err(|source| FailoverKubeError::RouteInvalid {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), MANAGER.into())])),
                resource_version: resource_version.map(String::from),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(ROUTE_KEY.to_string(), route.to_yaml())])),
            ..ConfigMap::default()
        };
        let pp = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        let written = match resource_version {
            None => self.api.create(&pp, &cm).await,
            Some(_) => self.api.replace(&self.name, &pp, &cm).await,
        };
        let written = written.map_err(|source| {
            // 409: AlreadyExists on a create, Conflict on a replace.
            if is_status(&source, 409) {
                FailoverKubeError::Conflict {
                    namespace: self.namespace.clone(),
                    name: self.name.clone(),
                    expected: resource_version.map(String::from),
                }
            } else {
                FailoverKubeError::WriteRoute { namespace: self.namespace.clone(), name: self.name.clone(), source }
            }
        })?;
        written.metadata.resource_version.ok_or_else(|| self.unreadable("written without a resourceVersion"))
    }
}

/// An Event to put on every LikeTenant: a flip, or a failover that is blocked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailoverNotice {
    /// Normal for a flip, Warning for a blocked or failed failover.
    pub type_: EventType,
    /// CamelCase reason (`Failover`, `Switchover`, `FailoverBlocked`, ...).
    pub reason: String,
    /// What the controller did (`Failover`, `Switchover`, `Probe`, ...).
    pub action: String,
    /// Details for a human.
    pub message: String,
}

/// The field manager of the failover controller's status writes: its
/// fields ([`LikeTenantStatus::failover_part`]) are its own, apart from the
/// tenant controller's.
pub const FAILOVER_MANAGER: &str = "thumbup-operator-failover";

/// The server-side apply of the failover controller's status fields: a field
/// it no longer sets (failingSince once the DB answers) is removed.
fn failover_apply(status: &LikeTenantStatus) -> Value {
    json!({
        "apiVersion": LikeTenant::api_version(&()),
        "kind": LikeTenant::kind(&()),
        "status": status,
    })
}

/// A merge patch that removes the failover fields that `want` leaves out and
/// that `got` still has: fields that an older operator wrote with merge
/// patches are owned by that writer, so an apply that leaves them out does
/// not remove them. Null when nothing is left over.
fn leftovers(want: &LikeTenantStatus, got: Option<&LikeTenantStatus>) -> Option<Value> {
    let got = got?.failover_part();
    let mut remove = serde_json::Map::new();
    if want.failing_since.is_none() && got.failing_since.is_some() {
        remove.insert("failingSince".into(), Value::Null);
    }
    if want.last_transition.is_none() && got.last_transition.is_some() {
        remove.insert("lastTransition".into(), Value::Null);
    }
    if want.failover_blocked.is_none() && got.failover_blocked.is_some() {
        remove.insert("failoverBlocked".into(), Value::Null);
    }
    (!remove.is_empty()).then(|| json!({ "status": remove }))
}

/// Writes the route's failover fields into the status of every LikeTenant
/// that `api` lists (one namespace or all) whose status says otherwise, and,
/// with a `notice`, puts that Event on every LikeTenant (reporter
/// `thumbup-operator`). Returns how many statuses were patched.
///
/// A LikeTenant deleted since the list is skipped. A failed patch does not
/// stop the others: the first failure is returned once all were tried, and
/// a second call patches only what still differs. Events are best effort (a
/// failure is logged): the status already carries what they announce.
pub async fn publish(
    api: &Api<LikeTenant>,
    recorder_client: &Client,
    route: &Route,
    notice: Option<&FailoverNotice>,
) -> Result<usize, FailoverKubeError> {
    let tenants = api.list(&ListParams::default()).await.map_err(FailoverKubeError::ListTenants)?;
    let want = LikeTenantStatus::of_failover(&route.failover);
    let apply = failover_apply(&want);
    let params = PatchParams::apply(FAILOVER_MANAGER).force();
    let announce = notice.map(|n| {
        let reporter = Reporter { controller: MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        let event = Event {
            type_: n.type_,
            reason: n.reason.clone(),
            note: Some(n.message.clone()),
            action: n.action.clone(),
            secondary: None,
        };
        (Recorder::new(recorder_client.clone(), reporter), event)
    });
    let mut patched = 0;
    let mut first_error = None;
    for lt in &tenants {
        let (namespace, name) = (lt.namespace().unwrap_or_default(), lt.name_any());
        if lt.status.as_ref().map(LikeTenantStatus::failover_part).unwrap_or_default() != want {
            let tenants_here = api.clone().constrain(&namespace);
            let mut written = tenants_here.patch_status(&name, &params, &Patch::Apply(&apply)).await;
            if let Ok(obj) = &written
                && let Some(patch) = leftovers(&want, obj.status.as_ref())
            {
                let params = PatchParams { field_manager: Some(FAILOVER_MANAGER.into()), ..PatchParams::default() };
                written = tenants_here.patch_status(&name, &params, &Patch::Merge(&patch)).await;
            }
            match written {
                Ok(_) => patched += 1,
                Err(e) if is_status(&e, 404) => continue,
                Err(source) => {
                    warn!(%namespace, %name, error = %source, "writing the failover status failed");
                    first_error.get_or_insert(FailoverKubeError::PatchStatus {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        source,
                    });
                }
            }
        }
        if let Some((recorder, event)) = &announce
            && let Err(e) = recorder.publish(event, &lt.object_ref(&())).await
        {
            warn!(%namespace, %name, error = %e, "publishing the failover Event failed");
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(patched),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use thumbup_core::route::{Blocked, FailoverRecord, Transition};

    fn route() -> Route {
        Route {
            epoch: 4,
            active_datacenter: "dc-b".into(),
            datacenters: [("dc-a".to_string(), "db-a:3306".to_string()), ("dc-b".into(), "db-b:3306".into())].into(),
            redis: Default::default(),
            failover: FailoverRecord::default(),
        }
    }

    #[test]
    fn route_status_maps_core_types_and_clears_what_no_longer_applies() {
        let mut r = route();
        r.failover.last_transition = Some(Transition {
            at: "2026-11-22T20:00:00.250Z".parse().unwrap(),
            kind: route::TransitionKind::Switchover,
            from: "dc-a".into(),
            to: "dc-b".into(),
            epoch: 4,
            reason: "planned".into(),
        });
        r.failover.blocked = Some(Blocked {
            reason: "StandbyUnhealthy".into(),
            message: "lag".into(),
            since: "2026-11-22T21:00:00Z".parse().unwrap(),
        });
        let apply = failover_apply(&LikeTenantStatus::of_failover(&r.failover));
        // Only the failover record, under its own apply: no activeDatacenter
        // or failoverEpoch (the tenant controller's), and a field that no
        // longer applies (failingSince) left out, which removes it.
        assert_eq!(
            apply,
            json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenant", "status": {
                "lastTransition": {"time": "2026-11-22T20:00:00Z", "kind": "Switchover", "from": "dc-a",
                    "to": "dc-b", "epoch": 4, "reason": "planned"},
                "failoverBlocked": {"reason": "StandbyUnhealthy", "message": "lag", "since": "2026-11-22T21:00:00Z"},
            }})
        );
    }

    #[test]
    fn fields_an_older_writer_left_are_removed_only_when_the_record_no_longer_has_them() {
        let want = LikeTenantStatus::of_failover(&route().failover);
        assert_eq!(leftovers(&want, None), None);
        let mut s = LikeTenantStatus {
            active_datacenter: Some("dc-b".into()),
            failover_epoch: Some(4),
            schema: Some("unrelated".into()),
            ..LikeTenantStatus::default()
        };
        assert_eq!(s.failover_part(), want, "the tenant controller's fields are not the failover controller's");
        assert_eq!(leftovers(&want, Some(&s)), None);
        s.failing_since = Some("2026-11-22T20:00:00Z".into());
        assert_ne!(s.failover_part(), want, "a stale failingSince must be cleared");
        assert_eq!(leftovers(&want, Some(&s)), Some(json!({"status": {"failingSince": null}})));
    }
}
