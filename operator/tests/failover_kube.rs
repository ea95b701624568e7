//! The failover controller's Kubernetes side against a mocked API server (a
//! tower-test service answering a scripted list of requests): the route
//! ConfigMap read and written under optimistic concurrency, and the route
//! published to the LikeTenants' status and Events. Each scenario asserts
//! the requests made, in order, and what they carry.

use kube::Api;
use serde_json::{Value, json};
use thumbup_core::route::{Blocked, ROUTE_KEY, Route};
use thumbup_operator::crd::{LikeTenant, LikeTenantStatus};
use thumbup_operator::failover::kube::{EventType, FailoverKubeError, FailoverNotice, RouteConfigMap, publish};
use thumbup_test_support::api::{ApiServer, CMS, EVENTS, FakeApi, TEAM_TENANTS, lt_path};
use thumbup_test_support::operator::{failed_over, tenant};

const ROUTE_CM: &str = "/api/v1/namespaces/thumbup/configmaps/thumbup-route";
const ALL_TENANTS: &str = "/apis/thumbup.io/v1alpha1/liketenants";

/// The route ConfigMap as the API server returns it.
fn route_cm(data: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "thumbup-route", "namespace": "thumbup", "resourceVersion": "17"},
        "data": data,
    })
}

fn config_map() -> (RouteConfigMap, ApiServer) {
    let (client, api) = ApiServer::client();
    (RouteConfigMap::new(client, "thumbup", "thumbup-route"), api)
}

#[tokio::test]
async fn an_absent_route_config_map_loads_as_none_and_a_present_one_as_its_route_and_version() {
    let (cm, mut api) = config_map();
    let route = failed_over();
    let yaml = route.to_yaml();
    let server = tokio::spawn(async move {
        api.expect("GET", ROUTE_CM).await.not_found();
        api.expect("GET", ROUTE_CM).await.reply(200, route_cm(json!({ ROUTE_KEY: yaml })));
    });
    assert!(cm.load().await.unwrap().is_none());
    assert_eq!(cm.load().await.unwrap(), Some((route, "17".to_string())));
    server.await.unwrap();
}

#[tokio::test]
async fn a_route_config_map_without_a_parsable_route_is_an_error_naming_the_config_map() {
    let (cm, mut api) = config_map();
    let server = tokio::spawn(async move {
        api.expect("GET", ROUTE_CM).await.reply(200, route_cm(json!({"other.yaml": "x"})));
        api.expect("GET", ROUTE_CM).await.reply(200, route_cm(json!({ ROUTE_KEY: "epoch: 0\n" })));
    });
    for want in ["no key route.yaml", "route.yaml: route does not parse"] {
        let e = cm.load().await.unwrap_err();
        assert!(matches!(e, FailoverKubeError::RouteUnreadable { .. }), "{e:?}");
        assert_eq!(e.reason(), "RouteUnreadable");
        let text = e.to_string();
        assert!(text.contains("thumbup/thumbup-route") && text.contains(want), "{text}");
    }
    server.await.unwrap();
}

#[tokio::test]
async fn store_creates_the_config_map_with_the_route_yaml_then_replaces_it_with_the_version_read() {
    let (cm, mut api) = config_map();
    let route = failed_over();
    let expected = route.clone();
    let server = tokio::spawn(async move {
        // No version: a create, with the document under route.yaml.
        let call = api.expect("POST", CMS).await;
        assert!(call.query.contains("fieldManager=thumbup-operator"), "{}", call.query);
        let meta = &call.body["metadata"];
        assert_eq!((meta["name"].as_str(), meta["namespace"].as_str()), (Some("thumbup-route"), Some("thumbup")));
        assert_eq!(meta["labels"], json!({"app.kubernetes.io/managed-by": "thumbup-operator"}));
        assert!(meta.get("resourceVersion").is_none(), "a create carries no resourceVersion: {meta}");
        assert_eq!(Route::parse(call.body["data"][ROUTE_KEY].as_str().unwrap()).unwrap(), expected);
        call.echo();
        // With a version: a replace conditional on it.
        let call = api.expect("PUT", ROUTE_CM).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "2");
        assert_eq!(Route::parse(call.body["data"][ROUTE_KEY].as_str().unwrap()).unwrap().epoch, 5);
        let mut written = call.body.clone();
        written["metadata"]["resourceVersion"] = json!("3");
        call.reply(200, written);
    });
    let version = cm.store(&route, None).await.unwrap();
    assert_eq!(version, "2");
    let mut next = route.clone();
    next.epoch = 5;
    assert_eq!(cm.store(&next, Some(&version)).await.unwrap(), "3");
    server.await.unwrap();
}

#[tokio::test]
async fn a_409_from_the_server_surfaces_as_the_conflict_variant() {
    let (cm, mut api) = config_map();
    let server = tokio::spawn(async move {
        // Another writer replaced it since version 17 was read.
        api.expect("PUT", ROUTE_CM).await.fail(409, "Conflict");
        // Another writer created it first.
        api.expect("POST", CMS).await.fail(409, "AlreadyExists");
        // Anything else is a write failure.
        api.expect("PUT", ROUTE_CM).await.fail(403, "Forbidden");
    });
    let e = cm.store(&failed_over(), Some("17")).await.unwrap_err();
    assert!(matches!(&e, FailoverKubeError::Conflict { expected: Some(v), .. } if v == "17"), "{e:?}");
    assert_eq!(e.reason(), "RouteConflict");
    let e = cm.store(&failed_over(), None).await.unwrap_err();
    assert!(matches!(&e, FailoverKubeError::Conflict { expected: None, .. }), "{e:?}");
    let e = cm.store(&failed_over(), Some("17")).await.unwrap_err();
    assert_eq!(e.reason(), "RouteWriteFailed", "{e:?}");
    server.await.unwrap();
}

#[tokio::test]
async fn an_invalid_route_is_never_written() {
    let (cm, mut api) = config_map();
    let mut bad = failed_over();
    bad.active_datacenter = "dc-x".into();
    let e = cm.store(&bad, None).await.unwrap_err();
    assert_eq!(e.reason(), "RouteInvalid");
    assert!(e.to_string().contains("dc-x"), "{e}");
    api.expect_no_more().await;
}

/// LikeTenant `name` in namespace `team` with `status`.
fn tenant_with(name: &str, status: Option<LikeTenantStatus>) -> Value {
    let mut lt = tenant(name);
    lt.status = status;
    serde_json::to_value(lt).unwrap()
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenantList", "metadata": {"resourceVersion": "9"},
        "items": items})
}

/// The status the route of [`failed_over`] gives a tenant.
fn failed_over_status() -> LikeTenantStatus {
    let want = json!({
        "activeDatacenter": "dc-b", "failoverEpoch": 4,
        "lastTransition": {"time": "2026-11-22T20:00:00Z", "kind": "Failover", "from": "dc-a", "to": "dc-b",
            "epoch": 4, "reason": "3 probes failed over 6s"},
    });
    serde_json::from_value(want).unwrap()
}

/// Asserts an Event as kube's recorder posts it for a LikeTenant.
#[track_caller]
fn assert_event(event: &Value, regarding: &str, type_: &str, reason: &str) {
    assert_eq!(event["type"], type_, "{event}");
    assert_eq!(event["reason"], reason, "{event}");
    assert_eq!(event["reportingController"], "thumbup-operator", "{event}");
    let r = &event["regarding"];
    assert_eq!(
        (r["kind"].as_str(), r["name"].as_str(), r["namespace"].as_str(), r["uid"].as_str()),
        (Some("LikeTenant"), Some(regarding), Some("team"), Some(format!("uid-{regarding}").as_str())),
        "{event}"
    );
}

#[tokio::test]
async fn publish_patches_only_the_tenant_whose_status_differs_and_puts_the_event_on_each() {
    let (client, mut api) = ApiServer::client();
    let tenants: Api<LikeTenant> = Api::namespaced(client.clone(), "team");
    let current = LikeTenantStatus { schema: Some("thumbup_a".into()), ..failed_over_status() };
    let stale = LikeTenantStatus {
        active_datacenter: Some("dc-a".into()),
        failover_epoch: Some(3),
        failing_since: Some("2026-11-22T19:59:54Z".into()),
        schema: Some("thumbup_b".into()),
        ..LikeTenantStatus::default()
    };
    let items = vec![tenant_with("a", Some(current.clone())), tenant_with("b", Some(stale))];
    let server = tokio::spawn(async move {
        api.expect("GET", TEAM_TENANTS).await.reply(200, list(items));
        // a already says what the route says: its Event only.
        let call = api.expect("POST", EVENTS).await;
        assert_event(&call.body, "a", "Normal", "Failover");
        assert_eq!(call.body["action"], "Failover");
        assert_eq!(call.body["note"], "flipped from dc-a to dc-b at epoch 4");
        call.echo();
        // b: one server-side apply of the failover record under the failover
        // controller's own field manager, nothing else of the status (the
        // stale failingSince is left out, which removes it), then its Event.
        let call = api.expect("PATCH", &format!("{}/status", lt_path("b"))).await;
        assert!(call.content_type.starts_with("application/apply-patch"), "{}", call.content_type);
        assert!(call.query.contains("fieldManager=thumbup-operator-failover"), "{}", call.query);
        assert!(call.query.contains("force=true"), "{}", call.query);
        assert_eq!(
            call.body,
            json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenant", "status": {
                "lastTransition": {"time": "2026-11-22T20:00:00Z", "kind": "Failover", "from": "dc-a", "to": "dc-b",
                    "epoch": 4, "reason": "3 probes failed over 6s"},
            }})
        );
        call.reply_status(&tenant("b"));
        let call = api.expect("POST", EVENTS).await;
        assert_event(&call.body, "b", "Normal", "Failover");
        call.echo();
        // Once both agree, without a notice: the list and nothing else.
        let items = vec![tenant_with("a", Some(current.clone())), tenant_with("b", Some(current))];
        api.expect("GET", TEAM_TENANTS).await.reply(200, list(items));
        api.expect_no_more().await;
    });
    let notice = FailoverNotice {
        type_: EventType::Normal,
        reason: "Failover".into(),
        action: "Failover".into(),
        message: "flipped from dc-a to dc-b at epoch 4".into(),
    };
    assert_eq!(publish(&tenants, &client, &failed_over(), Some(&notice)).await.unwrap(), 1);
    assert_eq!(publish(&tenants, &client, &failed_over(), None).await.unwrap(), 0, "nothing differs any more");
    server.await.unwrap();
}

#[tokio::test]
async fn a_failover_blocked_by_an_unhealthy_standby_shows_in_the_status_of_every_namespace_with_a_warning() {
    let (client, mut api) = ApiServer::client();
    let tenants: Api<LikeTenant> = Api::all(client.clone());
    let mut route = failed_over();
    route.failover.failing_since = Some("2026-11-23T08:00:00Z".parse().unwrap());
    route.failover.blocked = Some(Blocked {
        reason: "StandbyUnhealthy".into(),
        message: "the active DB is failing, but the standby cannot take over: replication stopped".into(),
        since: "2026-11-23T08:00:06Z".parse().unwrap(),
    });
    let server = tokio::spawn(async move {
        api.expect("GET", ALL_TENANTS).await.reply(200, list(vec![tenant_with("a", None)]));
        // Patched in the tenant's own namespace.
        let call = api.expect("PATCH", &format!("{}/status", lt_path("a"))).await;
        let status = &call.body["status"];
        assert_eq!(status["failingSince"], "2026-11-23T08:00:00Z");
        assert_eq!(
            status["failoverBlocked"],
            json!({"reason": "StandbyUnhealthy", "since": "2026-11-23T08:00:06Z",
                "message": "the active DB is failing, but the standby cannot take over: replication stopped"})
        );
        assert!(status.get("activeDatacenter").is_none(), "the tenant controller's field: {status}");
        call.reply_status(&tenant("a"));
        let call = api.expect("POST", EVENTS).await;
        assert_event(&call.body, "a", "Warning", "FailoverBlocked");
        call.echo();
    });
    let notice = FailoverNotice {
        type_: EventType::Warning,
        reason: "FailoverBlocked".into(),
        action: "Failover".into(),
        message: "StandbyUnhealthy".into(),
    };
    assert_eq!(publish(&tenants, &client, &route, Some(&notice)).await.unwrap(), 1);
    server.await.unwrap();
}

#[tokio::test]
async fn a_failed_status_patch_does_not_stop_the_others_and_a_deleted_tenant_is_skipped() {
    let (client, mut api) = ApiServer::client();
    let tenants: Api<LikeTenant> = Api::namespaced(client.clone(), "team");
    let server = tokio::spawn(async move {
        let items = vec![tenant_with("a", None), tenant_with("b", None), tenant_with("c", None)];
        api.expect("GET", TEAM_TENANTS).await.reply(200, list(items));
        api.expect("PATCH", &format!("{}/status", lt_path("a"))).await.fail(500, "InternalError");
        api.expect("PATCH", &format!("{}/status", lt_path("b"))).await.not_found();
        let call = api.expect("PATCH", &format!("{}/status", lt_path("c"))).await;
        call.reply_status(&tenant("c"));
        api.expect_no_more().await;
    });
    let e = publish(&tenants, &client, &failed_over(), None).await.unwrap_err();
    assert!(matches!(&e, FailoverKubeError::PatchStatus { name, .. } if name == "a"), "{e:?}");
    assert_eq!(e.reason(), "TenantStatusFailed");
    server.await.unwrap();
}

#[tokio::test]
async fn each_controller_owns_its_status_fields_and_a_field_an_older_operator_merged_in_is_cleared() {
    // A tenant whose status an older operator wrote with merge patches: every
    // field, the failover ones included, belongs to its Update.
    let mut stored = serde_json::to_value(tenant_with(
        "own",
        Some(LikeTenantStatus {
            schema: Some("thumbup_own".into()),
            active_datacenter: Some("dc-a".into()),
            failover_epoch: Some(3),
            failing_since: Some("2026-11-22T19:59:54Z".into()),
            ..LikeTenantStatus::default()
        }),
    ))
    .unwrap();
    stored["metadata"]["managedFields"] = json!([{"manager": "thumbup-operator", "operation": "Update",
        "subresource": "status", "fieldsV1": {"f:status": {"f:schema": {}, "f:activeDatacenter": {},
        "f:failoverEpoch": {}, "f:failingSince": {}}}}]);
    let path = lt_path("own");
    let (client, fake) = FakeApi::start([(path.clone(), stored)].into());
    let tenants: Api<LikeTenant> = Api::namespaced(client.clone(), "team");
    let read = |fake: &FakeApi| -> LikeTenantStatus {
        serde_json::from_value(fake.objects.lock().unwrap()[&path]["status"].clone()).unwrap()
    };

    // The route after the flip: no failing run any more.
    assert_eq!(publish(&tenants, &client, &failed_over(), None).await.unwrap(), 1);
    let s = read(&fake);
    assert_eq!(s.failover_part(), failed_over_status().failover_part(), "{s:?}");
    assert_eq!(s.failing_since, None, "the older operator's failingSince outlived the record");
    assert_eq!(
        (s.schema.as_deref(), s.active_datacenter.as_deref(), s.failover_epoch),
        (Some("thumbup_own"), Some("dc-a"), Some(3)),
        "the failover controller touched the tenant controller's fields"
    );

    // The tenant controller applies its own part from an object it read
    // before the flip was recorded: the failover record stays.
    let older = LikeTenantStatus {
        schema: Some("thumbup_own".into()),
        active_datacenter: Some("dc-b".into()),
        failover_epoch: Some(4),
        ..LikeTenantStatus::default()
    };
    let apply = json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenant", "status": older.tenant_part()});
    let params = kube::api::PatchParams::apply(thumbup_operator::controller::MANAGER).force();
    tenants.patch_status("own", &params, &kube::api::Patch::Apply(&apply)).await.unwrap();
    let s = read(&fake);
    assert_eq!(s.last_transition, failed_over_status().last_transition, "a tenant pass undid the record");
    assert_eq!((s.active_datacenter.as_deref(), s.failover_epoch), (Some("dc-b"), Some(4)));
    // Nothing left to write for either.
    assert_eq!(publish(&tenants, &client, &failed_over(), None).await.unwrap(), 0);
}
