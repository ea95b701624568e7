//! The ConfigMap route source against a mocked API server (a tower-test
//! service whose requests the test answers in turn): it lists and watches
//! only the named ConfigMap, adopts a newer route from an update, and
//! refuses stale and conflicting ones exactly as the file source does.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use thumbup_core::route::ROUTE_KEY;
use thumbup_db_proxy::metrics::Metrics;
use thumbup_db_proxy::routes::Routes;
use thumbup_db_proxy::source::follow_config_map;

const CMS: &str = "/api/v1/namespaces/thumbup/configmaps";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Reply = tower_test::mock::SendResponse<Response<Body>>;

fn route(epoch: u64, active: &str) -> String {
    format!("epoch: {epoch}\nactiveDatacenter: {active}\ndatacenters: {{dc-a: 'db-a:3306', dc-b: 'db-b:3306'}}\n")
}

/// The route ConfigMap at `version`, holding `route` (or no route key).
fn config_map(version: u32, route: Option<String>) -> Value {
    let data = match route {
        Some(text) => json!({ ROUTE_KEY: text }),
        None => json!({"other": "x"}),
    };
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "thumbup-route", "namespace": "thumbup", "resourceVersion": version.to_string()},
           "data": data})
}

/// The next request: asserts it is a GET of the ConfigMaps of `thumbup`
/// selecting `thumbup-route` by name; returns its query and the responder.
async fn next_get(api: &mut Handle) -> (String, Reply) {
    let (req, reply) = tokio::time::timeout(Duration::from_secs(10), api.next_request())
        .await
        .expect("no request reached the API server")
        .expect("the client is gone");
    assert_eq!((req.method().as_str(), req.uri().path()), ("GET", CMS));
    let query = req.uri().query().unwrap_or_default().to_string();
    assert!(query.contains("fieldSelector=metadata.name%3Dthumbup-route"), "{query}");
    (query, reply)
}

fn respond(reply: Reply, body: Vec<u8>) {
    reply.send_response(Response::builder().status(200).body(Body::from(body)).unwrap());
}

#[tokio::test]
async fn the_route_config_map_is_watched_by_name_and_follows_the_route_rules() {
    let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let metrics = Arc::new(Metrics::new().unwrap());
    let routes = Routes::new(metrics.clone());
    let cm = "thumbup/thumbup-route".parse().unwrap();
    let follower = tokio::spawn(follow_config_map(Client::new(service, "default"), cm, routes.clone()));

    let (query, reply) = next_get(&mut api).await;
    assert!(!query.contains("watch=true"), "the first request lists: {query}");
    let list = json!({"apiVersion": "v1", "kind": "ConfigMapList", "metadata": {"resourceVersion": "10"},
                      "items": [config_map(10, Some(route(1, "dc-a")))]});
    respond(reply, serde_json::to_vec(&list).unwrap());

    let (query, reply) = next_get(&mut api).await;
    assert!(query.contains("watch=true") && query.contains("resourceVersion=10"), "{query}");
    let events = [
        ("MODIFIED", config_map(11, Some(route(2, "dc-b")))),
        ("MODIFIED", config_map(12, Some(route(1, "dc-a")))),
        ("MODIFIED", config_map(13, Some(route(2, "dc-a")))),
        ("MODIFIED", config_map(14, Some("epoch: [".into()))),
        ("MODIFIED", config_map(15, None)),
        ("DELETED", config_map(16, None)),
    ];
    let mut body = Vec::new();
    for (kind, object) in events {
        serde_json::to_writer(&mut body, &json!({"type": kind, "object": object})).unwrap();
        body.push(b'\n');
    }
    respond(reply, body);

    // The watch resumes after the last event, so every event was handled.
    let (query, _held) = next_get(&mut api).await;
    assert!(query.contains("watch=true") && query.contains("resourceVersion=16"), "{query}");
    let held = routes.held().expect("a route");
    assert_eq!((held.epoch, held.active_datacenter.as_str()), (2, "dc-b"));
    let rejected = |reason: &str| metrics.route_rejected_total.with_label_values(&[reason]).get();
    assert_eq!((rejected("stale"), rejected("conflict"), rejected("invalid")), (1, 1, 1));
    assert_eq!((metrics.flips_total.get(), metrics.route_epoch.get()), (1, 2));
    follower.abort();
}
