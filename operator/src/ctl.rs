//! `kubectl thumbup`: the operator's command for people. It reads what the
//! operator publishes (LikeTenant status, the route ConfigMap) and asks for
//! a planned switchover through the switchover request ConfigMap, which the
//! failover controller reads every probe period: no `helm upgrade`, no
//! operator restart. It runs with the caller's kubeconfig and RBAC.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use thumbup_core::route::{ROUTE_KEY, Route};

use crate::crd::{LikeTenant, condition};
use crate::failover::kube::{REQUEST_BY_KEY, REQUEST_DATACENTER_KEY, REQUEST_ID_KEY, switchover_config_map};

/// The field manager of the command's writes.
pub const CTL_MANAGER: &str = "kubectl-thumbup";

/// What went wrong, in words for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// A Kubernetes API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What the command was doing.
        what: String,
        /// The client error.
        source: kube::Error,
    },
    /// The route ConfigMap is missing or holds no route.
    #[error("{0}")]
    Route(String),
    /// A bad argument.
    #[error("{0}")]
    Usage(String),
    /// The switchover was refused or did not finish in time.
    #[error("{0}")]
    Switchover(String),
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CtlError {
    let what = what.into();
    move |source| CtlError::Kube { what, source }
}

/// One line per LikeTenant: namespace, name, Ready with its reason, the
/// active datacenter and epoch, the job condition; `name` picks one.
pub async fn status(tenants: &Api<LikeTenant>, name: Option<&str>) -> Result<String, CtlError> {
    let list: Vec<LikeTenant> = match name {
        Some(n) => vec![tenants.get(n).await.map_err(kube_err(format!("reading LikeTenant {n}")))?],
        None => tenants.list(&ListParams::default()).await.map_err(kube_err("listing LikeTenants"))?.items,
    };
    Ok(status_table(&list))
}

/// The table [`status`] prints.
pub fn status_table(tenants: &[LikeTenant]) -> String {
    let mut rows = vec![[
        "NAMESPACE".to_string(),
        "NAME".into(),
        "READY".into(),
        "REASON".into(),
        "DATACENTER".into(),
        "EPOCH".into(),
        "JOB".into(),
    ]];
    for lt in tenants {
        let cond = |t: &str| lt.condition(t);
        let ready = cond(condition::READY);
        let status = lt.status.as_ref();
        rows.push([
            lt.namespace().unwrap_or_default(),
            lt.name_any(),
            ready.map(|c| c.status.clone()).unwrap_or_else(|| "Unknown".into()),
            ready.map(|c| c.reason.clone()).unwrap_or_else(|| "-".into()),
            status.and_then(|s| s.active_datacenter.clone()).unwrap_or_else(|| "-".into()),
            status.and_then(|s| s.failover_epoch).map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            cond(condition::JOB_READY).map(|c| c.message.clone()).unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&rows)
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// The route in the route ConfigMap `name` of `configmaps`' namespace.
pub async fn load_route(configmaps: &Api<ConfigMap>, name: &str) -> Result<Route, CtlError> {
    let cm =
        configmaps.get_opt(name).await.map_err(kube_err(format!("reading ConfigMap {name}")))?.ok_or_else(|| {
            CtlError::Route(format!(
                "no ConfigMap {name} in this namespace: pass the operator's namespace (--operator-namespace) or the \
             route ConfigMap's name (--route-config-map), or the failover controller has not started"
            ))
        })?;
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(ROUTE_KEY))
        .ok_or_else(|| CtlError::Route(format!("ConfigMap {name} has no key {ROUTE_KEY}")))?;
    Route::parse(text).map_err(|e| CtlError::Route(format!("ConfigMap {name}: {e}")))
}

/// The route in words: epoch, active datacenter, the DB of each, and the
/// failover controller's record.
pub fn describe_route(route: &Route) -> String {
    let f = &route.failover;
    let mut out = String::new();
    let _ = writeln!(out, "epoch:              {}", route.epoch);
    let _ = writeln!(out, "active datacenter:  {}", route.active_datacenter);
    for (dc, addr) in &route.datacenters {
        let mark = if *dc == route.active_datacenter { " (active)" } else { "" };
        let _ = writeln!(out, "  {dc}: {addr}{mark}");
    }
    let _ = writeln!(out, "promotion pending:  {}", if f.promotion_pending { "yes" } else { "no" });
    if let Some(since) = &f.failing_since {
        let _ = writeln!(out, "failing since:      {since}");
    }
    if let Some(t) = &f.last_transition {
        let _ = writeln!(
            out,
            "last transition:    {:?} {} -> {} at epoch {}, {}: {}",
            t.kind, t.from, t.to, t.epoch, t.at, t.reason
        );
    }
    if let Some(b) = &f.blocked {
        let _ = writeln!(out, "blocked:            {} since {}: {}", b.reason, b.since, b.message);
    }
    if let Some(id) = &f.handled_request {
        let _ = writeln!(out, "last request:       {id}");
    }
    out
}

/// A fresh request id: the time and a random suffix.
pub fn request_id() -> String {
    format!("{}-{:08x}", jiff::Timestamp::now().as_millisecond(), rand::random::<u32>())
}

/// Asks for a planned switchover to `datacenter`: writes the switchover
/// request ConfigMap beside the route ConfigMap `route_cm` (server-side
/// apply, field manager [`CTL_MANAGER`]). The datacenter must be one the
/// route names. Returns the request's id.
pub async fn request_switchover(
    configmaps: &Api<ConfigMap>,
    route_cm: &str,
    datacenter: &str,
    requested_by: &str,
) -> Result<String, CtlError> {
    let route = load_route(configmaps, route_cm).await?;
    if !route.datacenters.contains_key(datacenter) {
        let known: Vec<&str> = route.datacenters.keys().map(String::as_str).collect();
        return Err(CtlError::Usage(format!("unknown datacenter {datacenter}: the route names {}", known.join(", "))));
    }
    let id = request_id();
    let name = switchover_config_map(route_cm);
    let body = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "labels": { "app.kubernetes.io/managed-by": CTL_MANAGER } },
        "data": BTreeMap::from([
            (REQUEST_DATACENTER_KEY, datacenter),
            (REQUEST_ID_KEY, id.as_str()),
            (REQUEST_BY_KEY, requested_by),
        ]),
    });
    configmaps
        .patch(&name, &PatchParams::apply(CTL_MANAGER).force(), &Patch::Apply(&body))
        .await
        .map_err(kube_err(format!("writing the switchover request ConfigMap {name}")))?;
    Ok(id)
}

/// How a switchover request ended, as the route tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The controller has not acted on the request yet, or the promotion
    /// is still running.
    Pending,
    /// The route names `datacenter`, promoted.
    Done(Box<Route>),
    /// The controller acted on the request and `datacenter` is not active:
    /// the route's blocked record says why.
    Failed(String),
}

/// What the route says about request `id` for `datacenter`.
pub fn outcome(route: &Route, id: &str, datacenter: &str) -> Outcome {
    if route.failover.handled_request.as_deref() != Some(id) {
        return Outcome::Pending;
    }
    if route.active_datacenter == datacenter {
        return if route.failover.promotion_pending {
            Outcome::Pending
        } else {
            Outcome::Done(Box::new(route.clone()))
        };
    }
    Outcome::Failed(match &route.failover.blocked {
        Some(b) => format!("{}: {}", b.reason, b.message),
        None => format!("{} stays active (see the operator's log and Events)", route.active_datacenter),
    })
}

/// Polls the route until request `id` is done or failed, or `timeout`.
pub async fn wait_switchover(
    configmaps: &Api<ConfigMap>,
    route_cm: &str,
    id: &str,
    datacenter: &str,
    timeout: Duration,
) -> Result<Route, CtlError> {
    let deadline = Instant::now() + timeout;
    loop {
        let route = load_route(configmaps, route_cm).await?;
        match outcome(&route, id, datacenter) {
            Outcome::Done(r) => return Ok(*r),
            Outcome::Failed(why) => {
                return Err(CtlError::Switchover(format!("switchover to {datacenter} failed: {why}")));
            }
            Outcome::Pending if Instant::now() >= deadline => {
                return Err(CtlError::Switchover(format!(
                    "switchover request {id} to {datacenter}: not done within {timeout:?} (the request stays; \
                     `kubectl thumbup route` shows the progress)"
                )));
            }
            Outcome::Pending => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The client's default namespace (the kubeconfig's context).
pub fn default_namespace(client: &Client) -> String {
    client.default_namespace().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use thumbup_core::route::{Blocked, FailoverRecord};

    fn route(active: &str, handled: Option<&str>, pending: bool) -> Route {
        Route {
            epoch: 2,
            active_datacenter: active.into(),
            datacenters: [("dc-a".to_string(), "a:3306".to_string()), ("dc-b".into(), "b:3306".into())].into(),
            redis: Default::default(),
            failover: FailoverRecord {
                handled_request: handled.map(String::from),
                promotion_pending: pending,
                ..Default::default()
            },
        }
    }

    #[test]
    fn a_request_is_pending_until_acted_on_and_promoted_then_done_or_failed_with_the_reason() {
        assert_eq!(outcome(&route("dc-a", None, false), "r1", "dc-b"), Outcome::Pending);
        assert_eq!(outcome(&route("dc-a", Some("r0"), false), "r1", "dc-b"), Outcome::Pending, "an older request");
        assert_eq!(outcome(&route("dc-b", Some("r1"), true), "r1", "dc-b"), Outcome::Pending, "still promoting");
        assert!(matches!(outcome(&route("dc-b", Some("r1"), false), "r1", "dc-b"), Outcome::Done(_)));
        let mut blocked = route("dc-a", Some("r1"), false);
        blocked.failover.blocked = Some(Blocked {
            reason: "SwitchoverFailed".into(),
            message: "dc-b lags".into(),
            since: jiff::Timestamp::now(),
        });
        assert_eq!(outcome(&blocked, "r1", "dc-b"), Outcome::Failed("SwitchoverFailed: dc-b lags".into()));
    }

    #[test]
    fn the_status_table_has_a_row_per_tenant_with_unknowns_marked() {
        let lt = LikeTenant::new("shop", crate::crd::LikeTenantSpec::with_businesses(vec![]));
        let t = status_table(&[lt]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2, "{t}");
        assert!(lines[0].starts_with("NAMESPACE  NAME  READY"), "{t}");
        assert!(lines[1].contains("shop") && lines[1].contains("Unknown"), "{t}");
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(request_id(), request_id());
    }
}
