//! The operator's RBAC is what its code uses. Every request of every
//! mocked-API-server test must be one that `controller::API_PERMISSIONS`
//! grants (checked in `common`), the chart grants exactly that table
//! (tests/tests/chart.rs), and this test shows the other direction: running
//! the operator's code paths (a tenant's first pass, a refused pass, its
//! deletion, the controller's watches, leader election, the failover
//! controller's status publication) against an in-memory API server issues
//! every permission of the table. A permission the code stops using, or one
//! added to the table without code, fails here.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use thumbup_operator::controller::{self, Context};
use thumbup_operator::crd::{DeletionPolicy, FINALIZER};
use thumbup_operator::metrics::Metrics;
use thumbup_test_support::api::{FakeApi, USED, declared_permissions, lt_path};
use thumbup_test_support::operator::{failed_over, forget, operator_config, tenant};

#[tokio::test]
async fn the_operators_code_paths_issue_every_permission_its_rbac_grants() {
    let name = "ha-perm";
    forget(name).await;
    let (client, fake) = FakeApi::start(BTreeMap::new());
    let (_, route) = tokio::sync::watch::channel(None);
    let ctx = Context::new(client.clone(), Arc::new(operator_config(None)), "thumbup".into(), Metrics, route);
    let store = |lt: &thumbup_operator::crd::LikeTenant| {
        fake.objects.lock().unwrap().insert(lt_path(&lt.tenant()), serde_json::to_value(lt).unwrap());
    };

    // A new LikeTenant: the finalizer first (a patch of the object).
    let fresh = tenant(name);
    store(&fresh);
    controller::reconcile(Arc::new(fresh), ctx.clone()).await.expect("the finalizer is added");
    // Its first pass: registry claimed and filled, Secrets, Deployment, status, Event.
    let mut lt = tenant(name);
    lt.metadata.finalizers = Some(vec![FINALIZER.into()]);
    store(&lt);
    controller::reconcile(Arc::new(lt.clone()), ctx.clone()).await.expect("provisioned");
    // A refused LikeTenant, twice: the repeated Warning is patched as a series.
    let mut refused = tenant("ha-perm-refused");
    refused.metadata.finalizers = Some(vec![FINALIZER.into()]);
    refused.spec.schema_name = Some("mysql".into());
    store(&refused);
    for _ in 0..2 {
        controller::reconcile(Arc::new(refused.clone()), ctx.clone()).await.expect("refused, reported");
    }
    // The failover controller publishes a route on every LikeTenant's status.
    let tenants = kube::Api::namespaced(client.clone(), "team");
    thumbup_operator::failover::kube::publish(&tenants, &client, &failed_over(), None).await.expect("published");
    // Leader election: a Lease created, then given up.
    let elector = thumbup_operator::leader::Elector::new(
        client.clone(),
        "thumbup",
        "thumbup-operator",
        "me",
        Duration::from_secs(15),
    );
    assert!(elector.try_acquire().await.unwrap());
    elector.release().await;
    // The controller's watches of LikeTenants and their job Deployments.
    controller::run(ctx.clone(), Some("team".into()), tokio::time::sleep(Duration::from_secs(2)))
        .await
        .expect("the watches are granted");
    // Deletion with Delete: the job goes, then the finalizer.
    lt.spec.deletion_policy = DeletionPolicy::Delete;
    lt.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
    store(&lt);
    controller::reconcile(Arc::new(lt), ctx).await.expect("cleaned up");

    let used = USED.lock().unwrap().clone();
    let declared = declared_permissions();
    let unused: Vec<_> = declared.difference(&used).collect();
    let undeclared: Vec<_> = used.difference(&declared).collect();
    assert!(undeclared.is_empty(), "used but not granted: {undeclared:?}");
    assert!(
        unused.is_empty(),
        "granted but never used by the code (drop them from API_PERMISSIONS and the chart): {unused:?}"
    );
    forget(name).await;
}
