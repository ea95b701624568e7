//! The tenant controller's reconcile against a mocked Kubernetes API server
//! (a tower-test service answering a scripted list of requests) and the real
//! MariaDB and Redis of `scripts/stack.sh`. Each scenario asserts the
//! requests the operator makes, in order, and what they carry.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use thumbup_core::route::Route;
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::controller::{self, Context};
use thumbup_operator::crd::{Condition, DeletionPolicy, FINALIZER, LikeTenant, LikeTenantStatus};
use thumbup_operator::metrics::Metrics;
use thumbup_operator::resources::{self, Credentials};
use thumbup_test_support::api::{ApiServer, CMS, EVENTS, TEAM_TENANTS, lt_path};
use thumbup_test_support::operator::{
    acl_user, db_as, db_user_exists, failed_over, forget, keys_under, operator_config, operator_config_text, owner_of,
    schema_exists, tenant,
};
use thumbup_test_support::stack::{admin_redis_at, admin_redis_url, admin_redis_url_b};

fn context(cfg: OperatorConfig) -> (Arc<Context>, ApiServer) {
    context_with_route(cfg, None)
}

/// A context whose failover controller has published `route` (None: no
/// route yet).
fn context_with_route(cfg: OperatorConfig, route: Option<Route>) -> (Arc<Context>, ApiServer) {
    let (client, api) = ApiServer::client();
    // The receiver keeps the last value after the sender is gone.
    let (_, route) = tokio::sync::watch::channel(route);
    (Context::new(client, Arc::new(cfg), "thumbup".into(), Metrics, route), api)
}

const CM: &str = "/api/v1/namespaces/thumbup/configmaps/thumbup-tenants";
const REGISTRY_SECRET: &str = "/api/v1/namespaces/thumbup/secrets/thumbup-tenant-credentials";

fn deployment_path(name: &str) -> String {
    format!("/apis/apps/v1/namespaces/team/deployments/thumbup-job-{name}")
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/team/secrets/thumbup-tenant-{name}")
}

fn with_finalizer(mut lt: LikeTenant) -> LikeTenant {
    lt.metadata.finalizers = Some(vec![FINALIZER.into()]);
    lt
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {status}"))
}

/// A registry ConfigMap as the API server would return it.
fn registry_cm(annotations: Value, tenants_yaml: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "thumbup-tenants", "namespace": "thumbup", "resourceVersion": "7", "annotations": annotations},
        "data": {"tenants.yaml": tenants_yaml},
    })
}

/// The Deployment the API server returns from an apply, with a rolled-out status.
fn rolled_out(mut applied: Value, generation: i64, available: i32) -> Value {
    applied["metadata"]["generation"] = json!(generation);
    applied["status"] = json!({"observedGeneration": generation, "availableReplicas": available,
        "updatedReplicas": available, "readyReplicas": available, "replicas": available});
    applied
}

#[tokio::test]
async fn new_tenant_gets_the_finalizer_before_anything_is_provisioned() {
    let (ctx, mut api) = context(operator_config(None));
    let lt = tenant("rec-fin");
    let server = tokio::spawn(async move {
        let call = api.expect("PATCH", &lt_path("rec-fin")).await;
        let ops = call.body.as_array().expect("a JSON patch").clone();
        assert!(
            ops.iter().any(|op| op["op"] == "add" && op["path"].as_str().unwrap().starts_with("/metadata/finalizers"))
        );
        assert!(ops.iter().any(|op| op["value"] == json!([FINALIZER]) || op["value"] == json!(FINALIZER)));
        let mut obj = serde_json::to_value(tenant("rec-fin")).unwrap();
        obj["metadata"]["finalizers"] = json!([FINALIZER]);
        call.reply(200, obj);
    });
    let action = controller::reconcile(Arc::new(lt), ctx).await.unwrap();
    assert_eq!(action, Action::await_change());
    server.await.unwrap();
}

#[tokio::test]
async fn created_tenant_is_provisioned_its_objects_applied_and_status_ready() {
    let name = "rec-ready";
    forget(name).await;
    let (ctx, mut api) = context(operator_config(None));
    let lt = with_finalizer(tenant(name));
    let server = tokio::spawn(async move {
        // 1. The name is claimed in a new registry ConfigMap.
        api.expect("GET", CM).await.not_found();
        let call = api.expect("POST", CMS).await;
        assert_eq!(call.body["metadata"]["annotations"]["thumbup.io/tenant.rec-ready"], "team/uid-rec-ready");
        call.echo();
        // 2. Credentials are generated into the tenant Secret, owned by the LikeTenant.
        api.expect("GET", &secret_path(name)).await.not_found();
        let call = api.expect("PATCH", &secret_path(name)).await;
        assert!(call.query.contains("fieldManager=thumbup-operator"), "{}", call.query);
        assert_eq!(call.body["metadata"]["ownerReferences"][0]["uid"], "uid-rec-ready");
        let data = call.body["data"].as_object().unwrap();
        for key in ["db-username", "db-password", "redis-username", "redis-password", "token", "tenants.yaml"] {
            assert!(data.contains_key(key), "tenant Secret lacks {key}");
        }
        let secret = call.body.clone();
        call.echo();
        // 3. (DB and Redis provisioning happen here, on the real servers.)
        // 4. The registry Secret gets this tenant's keys under its own field manager.
        let call = api.expect("PATCH", REGISTRY_SECRET).await;
        assert!(call.query.contains("fieldManager=thumbup-operator.rec-ready"), "{}", call.query);
        let keys: Vec<_> = call.body["data"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["rec-ready.db-password", "rec-ready.redis-password", "rec-ready.tokens"]);
        call.echo();
        // 5. The registry file gets the entry.
        api.expect("GET", CM)
            .await
            .reply(200, registry_cm(json!({"thumbup.io/tenant.rec-ready": "team/uid-rec-ready"}), ""));
        let call = api.expect("PUT", CM).await;
        let text = call.body["data"]["tenants.yaml"].as_str().unwrap().to_string();
        assert_eq!(call.body["metadata"]["resourceVersion"], "7", "replace carries the version read");
        let entries = resources::parse_registry(&text).unwrap();
        assert_eq!(entries["rec-ready"]["db"]["schema"].as_str(), Some("thumbup_rec_ready"));
        let written = call.body.clone();
        call.echo();
        // 6. The job Deployment.
        let call = api.expect("PATCH", &deployment_path(name)).await;
        assert_eq!(call.body["spec"]["replicas"], 1);
        assert_eq!(call.body["metadata"]["ownerReferences"][0]["kind"], "LikeTenant");
        let applied = rolled_out(call.body.clone(), 1, 1);
        call.reply(200, applied);
        // 7. Status, then the Event.
        let call = api.expect("PATCH", &format!("{}/status", lt_path(name))).await;
        let status = call.body.clone();
        call.reply_status(&tenant(name));
        let call = api.expect("POST", EVENTS).await;
        assert_eq!(call.body["reason"], "Provisioned");
        call.echo();
        (status, secret, written, api)
    });
    let action = controller::reconcile(Arc::new(lt.clone()), ctx.clone()).await.expect("reconcile succeeds");
    let (status, secret, written, mut api) = server.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    for type_ in ["Ready", "DatabaseReady", "RedisReady", "JobReady"] {
        let c = condition(&status, type_);
        assert_eq!(c["status"], "True", "{type_}: {c}");
        assert_eq!(c["observedGeneration"], 1);
        assert!(c["lastTransitionTime"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(status["status"]["observedGeneration"], 1);
    assert_eq!(status["status"]["schema"], "thumbup_rec_ready");
    assert_eq!(status["status"]["redisPrefix"], "thumbup:rec-ready:");
    assert_eq!(status["status"]["activeDatacenter"], "dc-a");

    // The real servers hold what the conditions claim.
    assert!(schema_exists("thumbup_rec_ready").await);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).unwrap();
    let creds = Credentials::from_secret(&secret).unwrap();
    assert!(db_as("thumbup_rec_ready", &creds.db_password, Some("thumbup_rec_ready")).await.is_ok());
    for url in [admin_redis_url(), admin_redis_url_b()] {
        assert!(!acl_user(&url, "thumbup-rec-ready").await.is_empty(), "no ACL user on {url}");
    }

    // A second pass over the now-Ready tenant converges: it reads, re-applies
    // what is declarative, and writes no registry file, no status and no
    // Event, so it cannot wake the controller again.
    let mut again = lt.clone();
    again.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
    let secret_json = serde_json::to_value(&secret).unwrap();
    let server = tokio::spawn(async move {
        api.expect("GET", CM).await.reply(200, written.clone());
        api.expect("GET", &secret_path(name)).await.reply(200, secret_json.clone());
        let call = api.expect("PATCH", &secret_path(name)).await;
        assert_eq!(call.body["data"], secret_json["data"], "the same Secret is applied again");
        call.echo();
        api.expect("PATCH", REGISTRY_SECRET).await.echo();
        api.expect("GET", CM).await.reply(200, written);
        let call = api.expect("PATCH", &deployment_path(name)).await;
        let applied = rolled_out(call.body.clone(), 1, 1);
        call.reply(200, applied);
        api
    });
    let action = controller::reconcile(Arc::new(again), ctx).await.expect("second pass succeeds");
    let mut api = server.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    // A converged pass makes no other request.
    api.expect_no_more().await;
    forget(name).await;
}

/// A previous pass's status: all four conditions True at generation 1.
fn ready_status(at: &str) -> LikeTenantStatus {
    let c = |t: &str| Condition {
        type_: t.into(),
        status: "True".into(),
        reason: "Provisioned".into(),
        message: String::new(),
        last_transition_time: at.into(),
        observed_generation: Some(1),
    };
    LikeTenantStatus {
        conditions: ["Ready", "DatabaseReady", "RedisReady", "JobReady"].into_iter().map(c).collect(),
        schema: Some("thumbup_rec_change".into()),
        redis_prefix: Some("thumbup:rec-change:".into()),
        businesses: Some(1),
        secret_name: Some("thumbup-tenant-rec-change".into()),
        active_datacenter: Some("dc-a".into()),
        failover_epoch: None,
        observed_generation: Some(1),
        ..LikeTenantStatus::default()
    }
}

#[tokio::test]
async fn with_a_route_on_dc_b_a_new_tenant_is_provisioned_on_dc_b_and_its_status_says_dc_b_at_the_route_epoch() {
    let name = "rec-route";
    forget(name).await;
    // dc-a's DB is unreachable: provisioning succeeds only on dc-b's, which
    // is the local MariaDB (dc-a's server, as the test config has it).
    let cfg = operator_config(Some("mysql://127.0.0.1:1"));
    // The route after a failover to dc-b, with the active DB failing again.
    let mut route = failed_over();
    route.failover.failing_since = Some("2026-11-22T20:05:00Z".parse().unwrap());
    let (ctx, mut api) = context_with_route(cfg, Some(route));
    let lt = with_finalizer(tenant(name));
    let server = tokio::spawn(async move {
        api.expect("GET", CM).await.not_found();
        api.expect("POST", CMS).await.echo();
        api.expect("GET", &secret_path(name)).await.not_found();
        let call = api.expect("PATCH", &secret_path(name)).await;
        let secret = call.body.clone();
        call.echo();
        api.expect("PATCH", REGISTRY_SECRET).await.echo();
        api.expect("GET", CM)
            .await
            .reply(200, registry_cm(json!({"thumbup.io/tenant.rec-route": "team/uid-rec-route"}), ""));
        api.expect("PUT", CM).await.echo();
        let call = api.expect("PATCH", &deployment_path(name)).await;
        let applied = rolled_out(call.body.clone(), 1, 1);
        call.reply(200, applied);
        let call = api.expect("PATCH", &format!("{}/status", lt_path(name))).await;
        let status = call.body.clone();
        call.reply_status(&tenant(name));
        api.expect("POST", EVENTS).await.echo();
        (status, secret)
    });
    let action = controller::reconcile(Arc::new(lt), ctx).await.expect("provisioned on dc-b");
    let (status, secret) = server.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(
        (status["status"]["activeDatacenter"].as_str(), status["status"]["failoverEpoch"].as_i64()),
        (Some("dc-b"), Some(4))
    );
    let db = condition(&status, "DatabaseReady");
    assert_eq!(db["status"], "True");
    assert!(db["message"].as_str().unwrap().contains("on dc-b"), "{db}");
    // The failover controller's own fields are never in this controller's patch.
    for field in ["failingSince", "lastTransition", "failoverBlocked"] {
        assert!(status["status"].get(field).is_none(), "the tenant controller wrote {field}: {status}");
    }
    // The schema and its user are there, on the one MariaDB that dc-b names.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(secret).unwrap();
    let creds = Credentials::from_secret(&secret).unwrap();
    assert!(db_as("thumbup_rec_route", &creds.db_password, Some("thumbup_rec_route")).await.is_ok());
    forget(name).await;
}

#[tokio::test]
async fn spec_change_updates_the_job_deployment_and_advances_observed_generation() {
    let name = "rec-change";
    forget(name).await;
    let (ctx, mut api) = context(operator_config(None));
    let earlier = "2026-01-01T00:00:00Z";
    let mut lt = with_finalizer(tenant(name));
    lt.metadata.generation = Some(2);
    lt.spec.job.replicas = 3;
    lt.spec.job.window_ms = 2_000;
    lt.status = Some(ready_status(earlier));
    let creds = Credentials::generate(name);
    let entry = resources::registry_entry(&lt, &operator_config(None), "dc-a");
    let secret = serde_json::to_value(resources::build_tenant_secret(&lt, &creds, &entry)).unwrap();
    let creds_b64 = secret["data"]["db-password"].as_str().unwrap().to_string();
    let server = tokio::spawn(async move {
        let owner = json!({"thumbup.io/tenant.rec-change": "team/uid-rec-change"});
        // Already claimed: no write.
        api.expect("GET", CM).await.reply(200, registry_cm(owner.clone(), "tenants: []\n"));
        // Existing credentials are read back, not regenerated.
        api.expect("GET", &secret_path(name)).await.reply(200, secret);
        let call = api.expect("PATCH", &secret_path(name)).await;
        assert_eq!(call.body["data"]["db-password"], json!(creds_b64), "credentials are kept, not regenerated");
        call.echo();
        api.expect("PATCH", REGISTRY_SECRET).await.echo();
        api.expect("GET", CM).await.reply(200, registry_cm(owner, "tenants: []\n"));
        let call = api.expect("PUT", CM).await;
        assert!(call.body["data"]["tenants.yaml"].as_str().unwrap().contains("rec-change"));
        call.echo();
        let call = api.expect("PATCH", &deployment_path(name)).await;
        assert_eq!(call.body["spec"]["replicas"], 3, "replicas follow the spec");
        let args = call.body["spec"]["template"]["spec"]["containers"][0]["args"].clone();
        assert!(args.as_array().unwrap().contains(&json!("--window-ms=2000")), "{args}");
        let applied = rolled_out(call.body.clone(), 2, 3);
        call.reply(200, applied);
        let call = api.expect("PATCH", &format!("{}/status", lt_path(name))).await;
        let status = call.body.clone();
        call.reply_status(&tenant(name));
        // Ready stays Ready: no Event.
        status
    });
    let action = controller::reconcile(Arc::new(lt), ctx).await.expect("reconcile succeeds");
    let status = server.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    assert_eq!(status["status"]["observedGeneration"], 2);
    let ready = condition(&status, "Ready");
    assert_eq!((ready["status"].as_str(), ready["observedGeneration"].as_i64()), (Some("True"), Some(2)));
    assert_eq!(ready["lastTransitionTime"], earlier, "an unchanged status keeps its transition time");
    assert_eq!(condition(&status, "JobReady")["message"], "3/3 job replicas available");
    forget(name).await;
}

#[tokio::test]
async fn unreachable_db_sets_database_ready_false_emits_an_event_and_requeues_with_backoff() {
    let name = "rec-nodb";
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let (ctx, mut api) = context(operator_config(Some("mysql://127.0.0.1:1")));
    let lt = with_finalizer(tenant(name));
    let errors_before = Metrics.errors("DatabaseFailed");
    let server = tokio::spawn(async move {
        api.expect("GET", CM).await.not_found();
        api.expect("POST", CMS).await.echo();
        // The admission's claim on the DB fails: no credentials are made.
        let call = api.expect("POST", EVENTS).await;
        assert_eq!(call.body["type"], "Warning");
        assert_eq!(call.body["reason"], "DatabaseFailed");
        assert!(call.body["note"].as_str().unwrap().contains("rec-nodb"), "{}", call.body);
        call.echo();
        let call = api.expect("PATCH", &format!("{}/status", lt_path(name))).await;
        let status = call.body.clone();
        call.reply_status(&tenant(name));
        // Nothing after the failure: no registry entry, no job.
        status
    });
    let lt = Arc::new(lt);
    let err = controller::reconcile(lt.clone(), ctx.clone()).await.expect_err("the DB is unreachable");
    let status = server.await.unwrap();
    assert_eq!(err.reason(), "DatabaseFailed");
    let db = condition(&status, "DatabaseReady");
    assert_eq!((db["status"].as_str(), db["reason"].as_str()), (Some("False"), Some("DatabaseFailed")));
    assert!(
        db["message"].as_str().unwrap().contains("127.0.0.1:1") || db["message"].as_str().unwrap().contains("onnect")
    );
    assert_eq!(condition(&status, "Ready")["status"], "False");
    assert!(status["status"]["conditions"].as_array().unwrap().iter().all(|c| c["type"] != "JobReady"));
    // Requeued, with a growing backoff, and counted.
    assert_eq!(controller::error_policy(lt.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(5)));
    assert_eq!(controller::error_policy(lt.clone(), &err, ctx.clone()), Action::requeue(Duration::from_secs(10)));
    assert!(Metrics.errors("DatabaseFailed") > errors_before);
}

#[tokio::test]
async fn deleted_tenant_is_cleaned_up_and_then_its_finalizer_removed() {
    let name = "rec-del";
    forget(name).await;
    let cfg = operator_config(None);
    let mut lt = with_finalizer(tenant(name));
    lt.spec.deletion_policy = DeletionPolicy::Delete;
    lt.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
    // Provisioned earlier, with keys written on both datacenters.
    let creds = Credentials::generate(name);
    let owner = owner_of(&lt);
    thumbup_operator::provision::admit(&lt, &owner, &cfg, cfg.active()).await.unwrap();
    thumbup_operator::provision::database(&lt, &owner, &creds, cfg.active()).await.unwrap();
    thumbup_operator::provision::redis(&lt, &owner, &creds, &cfg).await.unwrap();
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut con = admin_redis_at(&url).await;
        let _: () = redis::cmd("SET").arg("thumbup:rec-del:x").arg(1).query_async(&mut con).await.unwrap();
    }
    let other_entry = "- name: other\n  businesses: []\n";
    let tenants = format!("tenants:\n- name: rec-del\n  businesses: []\n{other_entry}");
    let (ctx, mut api) = context(cfg);
    let obj = serde_json::to_value(&lt).unwrap();
    let listed = json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenantList",
        "metadata": {"resourceVersion": "9"}, "items": [obj.clone()]});
    let errors_before = Metrics.errors("FinalizerFailed");
    let server = tokio::spawn(async move {
        // The object is read back before cleanup: it still carries the finalizer.
        let call = api.expect("GET", TEAM_TENANTS).await;
        assert!(call.query.contains("fieldSelector=metadata.name%3Drec-del"), "{}", call.query);
        call.reply(200, listed);
        let call = api.expect("DELETE", &deployment_path(name)).await;
        call.reply(200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}));
        let owners = json!({"thumbup.io/tenant.rec-del": "team/uid-rec-del", "thumbup.io/tenant.other": "x/uid-other"});
        api.expect("GET", CM).await.reply(200, registry_cm(owners, &tenants));
        let call = api.expect("PUT", CM).await;
        let text = call.body["data"]["tenants.yaml"].as_str().unwrap();
        let entries = resources::parse_registry(text).unwrap();
        assert_eq!(entries.keys().collect::<Vec<_>>(), ["other"], "only this tenant's entry is removed");
        let annotations = call.body["metadata"]["annotations"].as_object().unwrap();
        assert!(
            !annotations.contains_key("thumbup.io/tenant.rec-del")
                && annotations.contains_key("thumbup.io/tenant.other")
        );
        call.echo();
        let call = api.expect("PATCH", REGISTRY_SECRET).await;
        assert!(call.query.contains("fieldManager=thumbup-operator.rec-del"), "{}", call.query);
        assert_eq!(call.body["data"], json!({}), "an empty apply drops exactly this tenant's keys");
        call.echo();
        let call = api.expect("POST", EVENTS).await;
        assert_eq!(call.body["reason"], "Deleted");
        call.echo();
        // Only after cleanup succeeded: the finalizer goes.
        let call = api.expect("PATCH", &lt_path(name)).await;
        let ops = call.body.as_array().unwrap().clone();
        assert!(ops.iter().any(|op| op["op"] == "remove" && op["path"] == "/metadata/finalizers/0"), "{ops:?}");
        assert!(ops.iter().any(|op| op["op"] == "test" && op["value"] == FINALIZER));
        let mut done = obj;
        done["metadata"]["finalizers"] = json!([]);
        call.reply(200, done);
        // A second trigger (the job Deployment's deletion) queues the same
        // cached object again, finalizer and all: read back, it is gone, and
        // nothing else happens (no second cleanup, no second Event).
        let call = api.expect("GET", TEAM_TENANTS).await;
        call.reply(
            200,
            json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenantList",
            "metadata": {"resourceVersion": "10"}, "items": []}),
        );
        api.expect_no_more().await;
    });
    let lt = Arc::new(lt);
    let action = controller::reconcile(lt.clone(), ctx.clone()).await.expect("cleanup succeeds");
    assert_eq!(action, Action::await_change());
    let again = controller::reconcile(lt, ctx).await.expect("a second trigger is no error");
    assert_eq!(again, Action::await_change());
    server.await.unwrap();
    assert_eq!(Metrics.errors("FinalizerFailed"), errors_before, "no finalizer error counted");
    assert!(!schema_exists("thumbup_rec_del").await);
    assert!(!db_user_exists("thumbup_rec_del").await);
    for url in [admin_redis_url(), admin_redis_url_b()] {
        assert_eq!(acl_user(&url, "thumbup-rec-del").await, "");
        assert!(keys_under(&url, "thumbup:rec-del:").await.is_empty());
    }
}

#[test]
fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
    let got: Vec<u64> = (1..=9).map(|n| controller::backoff(n).as_secs()).collect();
    assert_eq!(got, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
}

fn lease(holder: &str, renewed_secs_ago: i64, transitions: i32) -> Value {
    let renew = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(renewed_secs_ago);
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "thumbup-operator", "namespace": "thumbup", "resourceVersion": "41"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions,
            "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "acquireTime": renew.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
    })
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/thumbup/leases/thumbup-operator";

#[tokio::test]
async fn a_second_replica_neither_leads_while_the_lease_is_fresh_nor_wins_a_race_for_an_expired_one() {
    let (client, mut api) = ApiServer::client();
    let b = thumbup_operator::leader::Elector::new(
        client,
        "thumbup",
        "thumbup-operator",
        "replica-b",
        Duration::from_secs(15),
    );
    let server = tokio::spawn(async move {
        // Held by A, renewed 2 s ago: B does not write.
        api.expect("GET", LEASE).await.reply(200, lease("replica-a", 2, 0));
        // Expired (A stopped renewing 20 s ago): B takes over with the version it read.
        api.expect("GET", LEASE).await.reply(200, lease("replica-a", 20, 0));
        let call = api.expect("PUT", LEASE).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "41");
        assert_eq!(call.body["spec"]["holderIdentity"], "replica-b");
        assert_eq!(call.body["spec"]["leaseTransitions"], 1);
        call.echo();
        // Expired again, but another replica wrote first: 409, B does not lead.
        api.expect("GET", LEASE).await.reply(200, lease("replica-a", 20, 1));
        api.expect("PUT", LEASE).await.reply(
            409,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "reason": "Conflict", "code": 409, "message": "the object has been modified"}),
        );
        // No Lease yet: B creates it and leads.
        api.expect("GET", LEASE).await.not_found();
        let call = api.expect("POST", "/apis/coordination.k8s.io/v1/namespaces/thumbup/leases").await;
        assert_eq!(call.body["spec"]["holderIdentity"], "replica-b");
        call.echo();
    });
    assert!(!b.try_acquire().await.unwrap(), "a fresh Lease held by another replica must not be taken");
    assert!(b.try_acquire().await.unwrap(), "an expired Lease is taken over");
    assert!(!b.try_acquire().await.unwrap(), "losing the write race means not leading");
    assert!(b.try_acquire().await.unwrap(), "a missing Lease is created");
    server.await.unwrap();
}

#[tokio::test]
async fn while_the_promotion_is_pending_a_pass_touches_neither_the_db_nor_the_status_and_comes_back_soon() {
    // A DB that refuses every session: any statement would fail the pass
    // with DatabaseFailed.
    let cfg = operator_config(Some("mysql://127.0.0.1:1"));
    let mut route = failed_over();
    route.active_datacenter = "dc-a".into();
    route.failover.promotion_pending = true;
    let (ctx, mut api) = context_with_route(cfg, Some(route));
    let mut lt = with_finalizer(tenant("rec-promo"));
    lt.status = Some(ready_status("2026-01-01T00:00:00Z"));
    let errors_before = Metrics.errors("DatabaseFailed");
    let server = tokio::spawn(async move {
        // No request at all: no status write, no Warning Event.
        api.expect_no_more().await;
    });
    let action = controller::reconcile(Arc::new(lt), ctx).await.expect("waiting is no failure");
    server.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    assert_eq!(Metrics.errors("DatabaseFailed"), errors_before);
}

#[tokio::test]
async fn a_watch_refused_by_rbac_ends_the_run_with_an_error_naming_it_and_releases_the_lease() {
    let dir = std::env::temp_dir().join(format!("thumbup-op-403-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("operator.yaml");
    std::fs::write(&config, operator_config_text(None)).unwrap();
    let opts = thumbup_operator::Options {
        config,
        namespace: Some("thumbup".into()),
        all_namespaces: true,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        identity: "op-1".into(),
        lease_name: "thumbup-operator".into(),
        lease_duration: Duration::from_secs(15),
    };
    let (client, mut api) = ApiServer::client();
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/thumbup/leases/thumbup-operator";
    let server = tokio::spawn(async move {
        let mut lease: Option<Value> = None;
        let mut released = false;
        let mut refused = 0;
        let mut watches = Vec::new();
        while let Some((method, path, call)) = api.next().await {
            match (method.as_str(), path.as_str()) {
                ("GET", LEASE) => match &lease {
                    Some(l) => call.reply(200, l.clone()),
                    None => call.not_found(),
                },
                ("POST", "/apis/coordination.k8s.io/v1/namespaces/thumbup/leases") | ("PUT", LEASE) => {
                    let mut body = call.body.clone();
                    body["metadata"]["resourceVersion"] = json!("3");
                    released |= method == "PUT" && body["spec"]["holderIdentity"].is_null();
                    lease = Some(body);
                    call.echo();
                }
                ("GET", "/apis/thumbup.io/v1alpha1/liketenants") => {
                    refused += 1;
                    call.reply(
                        403,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden",
                            "code": 403, "message": "liketenants.thumbup.io is forbidden: User \"system:serviceaccount:thumbup:thumbup-operator\" cannot list resource \"liketenants\" in API group \"thumbup.io\" at the cluster scope"}),
                    );
                }
                ("GET", "/apis/apps/v1/deployments") if call.query.contains("watch=") => watches.push(call),
                ("GET", "/apis/apps/v1/deployments") => call.reply(
                    200,
                    json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": []}),
                ),
                // The failover controller's route and registry reads.
                _ => call.not_found(),
            }
        }
        (released, refused)
    });
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        thumbup_operator::run_with_client(opts, client, std::future::pending()),
    )
    .await
    .expect("the run ends on the refusal")
    .expect_err("a refused watch is an error");
    let message = format!("{err:#}");
    println!("the run ended with: {message}");
    for part in ["liketenants.thumbup.io", "every namespace", "list", "403"] {
        assert!(message.contains(part), "{part:?} missing from: {message}");
    }
    let (released, refused) = server.await.unwrap();
    assert!(released, "the Lease was released (holder cleared) before the run ended");
    assert!(refused >= 1);
}
