//! The failover controller as it runs in a cluster, end to end on its
//! Kubernetes side: the route in a ConfigMap, status and Events on the
//! LikeTenants, all against a mocked API server that asserts every request
//! in order; the DB side is the real two-datacenter stack (MariaDB dc-a
//! primary, dc-b its replica). The scenario is a planned switchover, which
//! the controller runs when the operator config names another datacenter.

use kube::Api;
use serde_json::{Value, json};
use sqlx::Connection;
use thumbup_core::route::{ROUTE_KEY, Route};
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::crd::LikeTenant;
use thumbup_operator::failover::kube::RouteConfigMap;
use thumbup_operator::failover::{self, Publisher, RouteStore, TenantSource};
use thumbup_test_support::api::{ApiServer, EVENTS, FakeApi, TEAM_TENANTS, lt_path};
use thumbup_test_support::operator::{datacenters_yaml, tenant};
use thumbup_test_support::stack::{admin_db_url, admin_db_url_b, split, stack};

const ROUTE_CM: &str = "/api/v1/namespaces/thumbup/configmaps/thumbup-route";

/// One scenario at a time: each fences, promotes and reseeds the same two DBs.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Puts the stack back as every test expects it (dc-a primary, dc-b its
/// replica), even when the test fails half way.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        stack(&["reseed", "a", "b"]);
    }
}

fn operator_yaml(active: &str) -> String {
    let (a, _, _) = split(&admin_db_url());
    let (b, _, _) = split(&admin_db_url_b());
    let datacenters = datacenters_yaml(&a, &b);
    format!(
        "active_datacenter: {active}\n{datacenters}failover: {{ probe_period_ms: 200, catch_up_timeout_ms: 10000 }}\n"
    )
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "thumbup.io/v1alpha1", "kind": "LikeTenantList", "metadata": {"resourceVersion": "9"},
        "items": items})
}

/// The route YAML inside a ConfigMap body the controller sent.
fn route_of(body: &Value) -> Route {
    assert_eq!(body["metadata"]["name"], "thumbup-route", "{body}");
    Route::parse(body["data"][ROUTE_KEY].as_str().expect("route.yaml in the ConfigMap")).unwrap()
}

async fn read_only(url: &str) -> bool {
    let mut con = sqlx::MySqlConnection::connect(url).await.unwrap();
    let v: i64 = sqlx::query_scalar("SELECT @@read_only").fetch_one(&mut con).await.unwrap();
    v != 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planned_switchover_writes_the_route_config_map_then_status_and_an_event_on_every_tenant() {
    let _serial = SERIAL.lock().await;
    stack(&["reseed", "a", "b"]);
    let _restore = Restore;
    let dir = std::env::temp_dir().join(format!("thumbup-failover-controller-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("operator.yaml");
    std::fs::write(&config_path, operator_yaml("dc-a")).unwrap();
    let config = OperatorConfig::load(&config_path).unwrap();

    let (client, mut api) = ApiServer::client();
    let opts = failover::Options {
        config,
        config_path: Some(config_path.clone()),
        store: RouteStore::ConfigMap {
            cm: Box::new(RouteConfigMap::new(client.clone(), "thumbup", "thumbup-route")),
            version: None,
        },
        tenants: TenantSource::Registry(Box::new(Api::namespaced(client.clone(), "thumbup")), "thumbup-tenants".into()),
        publisher: Some(Publisher { tenants: Api::<LikeTenant>::namespaced(client.clone(), "team"), client }),
        route_tx: None,
        notices: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(failover::run(opts, async {
        let _ = stopped.await;
    }));

    // First start: no route yet. The controller creates it at epoch 1 on
    // the config's datacenter, then tells every tenant.
    api.expect("GET", ROUTE_CM).await.not_found();
    let call = api.expect("POST", "/api/v1/namespaces/thumbup/configmaps").await;
    let first = route_of(&call.body);
    assert_eq!((first.epoch, first.active_datacenter.as_str()), (1, "dc-a"));
    assert_eq!(first.failover.requested_datacenter.as_deref(), Some("dc-a"));
    call.echo();
    // A route with no failover record yet leaves nothing of the failover
    // controller's to write (the datacenter and the epoch are the tenant
    // controller's fields).
    api.expect("GET", TEAM_TENANTS).await.reply(200, list(vec![serde_json::to_value(tenant("t1")).unwrap()]));
    // Healthy probes write nothing.
    api.expect_no_more().await;

    // The config now names dc-b: a planned switchover.
    std::fs::write(&config_path, operator_yaml("dc-b")).unwrap();
    let call = api.expect("PUT", ROUTE_CM).await;
    assert_eq!(call.body["metadata"]["resourceVersion"], "2", "replaced under the version it read");
    let flipped = route_of(&call.body);
    assert_eq!((flipped.epoch, flipped.active_datacenter.as_str()), (2, "dc-b"));
    let t = flipped.failover.last_transition.clone().expect("the transition is recorded");
    assert_eq!(
        (format!("{:?}", t.kind), t.from.as_str(), t.to.as_str(), t.epoch),
        ("Switchover".into(), "dc-a", "dc-b", 2)
    );
    assert!(flipped.failover.promotion_pending, "the route flips before the promotion");
    // By the time the route names dc-b, dc-a is fenced.
    assert!(read_only(&admin_db_url()).await, "dc-a fenced before the flip");
    call.echo();
    let call = api.expect("PUT", ROUTE_CM).await;
    assert!(!route_of(&call.body).failover.promotion_pending, "promotion done");
    assert!(!read_only(&admin_db_url_b()).await, "dc-b takes writes");
    call.echo();
    api.expect("GET", TEAM_TENANTS).await.reply(200, list(vec![serde_json::to_value(tenant("t1")).unwrap()]));
    let call = api.expect("PATCH", &format!("{}/status", lt_path("t1"))).await;
    assert!(call.content_type.starts_with("application/apply-patch"), "a server-side apply: {}", call.content_type);
    assert!(call.query.contains("fieldManager=thumbup-operator-failover"), "{}", call.query);
    let status = &call.body["status"];
    for field in ["activeDatacenter", "failoverEpoch", "conditions", "schema"] {
        assert!(status.get(field).is_none(), "the failover controller wrote the tenant controller's {field}: {status}");
    }
    assert_eq!(status["lastTransition"]["epoch"], 2);
    assert_eq!(status["lastTransition"]["kind"], "Switchover");
    assert_eq!(status["lastTransition"]["from"], "dc-a");
    assert_eq!(status["failoverBlocked"], Value::Null);
    let mut patched = tenant("t1");
    patched.status = Some(serde_json::from_value(status.clone()).unwrap());
    call.reply_status(&patched);
    // Then the notice: the tenant's status already agrees, so only its Event.
    api.expect("GET", TEAM_TENANTS).await.reply(200, list(vec![serde_json::to_value(&patched).unwrap()]));
    let call = api.expect("POST", EVENTS).await;
    let event = &call.body;
    assert_eq!((event["type"].as_str(), event["reason"].as_str()), (Some("Normal"), Some("Switchover")), "{event}");
    assert_eq!(event["regarding"]["name"], "t1");
    assert!(event["note"].as_str().unwrap().contains("from dc-a to dc-b at epoch 2"), "{event}");
    call.echo();
    api.expect_no_more().await;

    stop.send(()).unwrap();
    controller.await.unwrap().expect("the controller stops cleanly");
    let _ = std::fs::remove_dir_all(dir);
}

/// The route in the fake API server's route ConfigMap, once there is one.
fn stored_route(fake: &FakeApi) -> Option<Route> {
    let objects = fake.objects.lock().unwrap();
    let cm = objects.get(ROUTE_CM)?;
    Some(Route::parse(cm["data"][ROUTE_KEY].as_str()?).unwrap())
}

async fn wait_route(fake: &FakeApi, what: &str, done: impl Fn(&Route) -> bool) -> Route {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Some(r) = stored_route(fake)
            && done(&r)
        {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: never happened; route {:?}", stored_route(fake));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_asked_for_through_the_api_runs_once_without_touching_the_config() {
    let _serial = SERIAL.lock().await;
    use thumbup_operator::ctl;
    stack(&["reseed", "a", "b"]);
    let _restore = Restore;
    let dir = std::env::temp_dir().join(format!("thumbup-failover-request-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("operator.yaml");
    std::fs::write(&config_path, operator_yaml("dc-a")).unwrap();
    let config = OperatorConfig::load(&config_path).unwrap();

    let (client, fake) = FakeApi::start(Default::default());
    let opts = failover::Options {
        config,
        config_path: Some(config_path.clone()),
        store: RouteStore::ConfigMap {
            cm: Box::new(RouteConfigMap::new(client.clone(), "thumbup", "thumbup-route")),
            version: None,
        },
        tenants: TenantSource::Registry(Box::new(Api::namespaced(client.clone(), "thumbup")), "thumbup-tenants".into()),
        publisher: Some(Publisher {
            tenants: Api::<LikeTenant>::namespaced(client.clone(), "team"),
            client: client.clone(),
        }),
        route_tx: None,
        notices: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(failover::run(opts, async {
        let _ = stopped.await;
    }));
    // The person's kubectl, beside the operator's client.
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(fake.person_client(), "thumbup");
    wait_route(&fake, "the first route", |r| r.epoch == 1).await;

    // A datacenter the route does not name is refused before anything is written.
    let err = ctl::request_switchover(&cms, "thumbup-route", "dc-x", "tester").await.unwrap_err();
    assert!(err.to_string().contains("unknown datacenter dc-x"), "{err}");
    assert!(!fake.objects.lock().unwrap().contains_key(&format!("{ROUTE_CM}-switchover")), "nothing written");

    // dc-b, asked for through the API: the controller runs the switchover.
    let id = ctl::request_switchover(&cms, "thumbup-route", "dc-b", "tester").await.unwrap();
    let r = ctl::wait_switchover(&cms, "thumbup-route", &id, "dc-b", std::time::Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        (r.epoch, r.active_datacenter.as_str(), r.failover.handled_request.as_deref()),
        (2, "dc-b", Some(id.as_str()))
    );
    let t = r.failover.last_transition.clone().unwrap();
    assert!(t.reason.contains("requested by tester"), "{}", t.reason);
    assert!(read_only(&admin_db_url()).await, "dc-a fenced");
    assert!(!read_only(&admin_db_url_b()).await, "dc-b promoted");
    let request = &fake.bodies("PATCH", &format!("{ROUTE_CM}-switchover"))[0];
    assert_eq!(request["data"]["datacenter"], "dc-b");

    // A request written by hand naming an unknown datacenter: recorded as
    // acted on, nothing flips.
    let bad = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "thumbup-route-switchover", "namespace": "thumbup", "resourceVersion": "8"},
        "data": {"datacenter": "dc-x", "requestId": "by-hand-1"}});
    fake.objects.lock().unwrap().insert(format!("{ROUTE_CM}-switchover"), bad);
    let r = wait_route(&fake, "the unknown datacenter's request acted on", |r| {
        r.failover.handled_request.as_deref() == Some("by-hand-1")
    })
    .await;
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (2, "dc-b"), "an unknown datacenter flipped the route");

    // Back to dc-a by a new request; dc-b must be a healthy standby first.
    stack(&["reseed", "b", "a"]);
    let id = ctl::request_switchover(&cms, "thumbup-route", "dc-a", "tester").await.unwrap();
    let r = ctl::wait_switchover(&cms, "thumbup-route", &id, "dc-a", std::time::Duration::from_secs(30)).await.unwrap();
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (3, "dc-a"));

    // The config now names dc-b: that switchover runs, and the dc-a request
    // still in place is not acted on again.
    stack(&["reseed", "a", "b"]);
    std::fs::write(&config_path, operator_yaml("dc-b")).unwrap();
    wait_route(&fake, "the config's switchover", |r| r.epoch == 4 && !r.failover.promotion_pending).await;
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let r = stored_route(&fake).unwrap();
    assert_eq!((r.epoch, r.active_datacenter.as_str()), (4, "dc-b"), "an old request undid a later switchover");

    stop.send(()).unwrap();
    controller.await.unwrap().expect("the controller stops cleanly");
    let _ = std::fs::remove_dir_all(dir);
}
