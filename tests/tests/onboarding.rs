//! Onboarding: `kubectl apply` of a LikeTenant to its first successful Like.
//!
//! The operator's `controller::reconcile` runs in-process against the
//! in-memory API server of the operator's tests (`FakeApi`), provisioning the
//! tenant on the real MariaDB and Redis of the local stack. The service runs
//! in-process too, following the registry ConfigMap and Secret through the
//! same stored objects ([`RegistryWatch`]: the list and watch requests of
//! the service's client, answered from `FakeApi`'s store, with watch events
//! when an object changes). A second service reads only the registry files,
//! which the kubelet has not synced yet: it does not serve the tenant.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use thumbup_operator::controller::{self, Context};
use thumbup_operator::crd::{FINALIZER, LikeTenant};
use thumbup_operator::metrics::Metrics;
use thumbup_service::pb;
use thumbup_service::registry_api::{REGISTRY_KEY, RegistryApi, SERVICE_API_PERMISSIONS};
use thumbup_test_support::api::{FakeApi, lt_path, permission};
use thumbup_test_support::operator::{forget, operator_config, tenant};
use tonic::Code;

/// The operator's namespace, where the registry is.
const NS: &str = "thumbup";
/// The registry ConfigMap and Secret of `operator_config`.
const REGISTRY_CM: &str = "thumbup-tenants";
const REGISTRY_SECRET: &str = "thumbup-tenant-credentials";

fn cm_path() -> String {
    format!("/api/v1/namespaces/{NS}/configmaps/{REGISTRY_CM}")
}

fn secret_path() -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{REGISTRY_SECRET}")
}

/// Per object path: watch events sent, and watch requests received.
#[derive(Default, Clone, Copy, Debug)]
struct WatchCounts {
    events: u64,
    watches: u64,
}

/// The API server as the service sees it: its list and watch requests of
/// the registry ConfigMap and Secret, answered from `FakeApi`'s store. A
/// watch is held until the stored object differs from what the service was
/// last sent, then answered with that one event (the client watches again
/// from there). A request RBAC would not grant (a permission outside
/// `SERVICE_API_PERMISSIONS`, or one not limited by field selector to the
/// two objects, which `resourceNames` needs) is refused with 403, and so is
/// every request while `forbid` is set.
struct RegistryWatch {
    forbid: Arc<AtomicBool>,
    counts: Arc<Mutex<BTreeMap<String, WatchCounts>>>,
    refused: Arc<Mutex<Vec<String>>>,
}

fn decode(s: &str) -> String {
    s.replace("%3D", "=").replace("%3d", "=").replace("%2F", "/").replace("%2f", "/")
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": reason, "reason": reason, "code": code})
}

impl RegistryWatch {
    /// A client for the service, served from `objects`.
    fn start(objects: Arc<Mutex<BTreeMap<String, Value>>>) -> (kube::Client, RegistryWatch) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, NS);
        let rw = RegistryWatch { forbid: Default::default(), counts: Default::default(), refused: Default::default() };
        let (forbid, counts, refused) = (rw.forbid.clone(), rw.counts.clone(), rw.refused.clone());
        tokio::spawn(async move {
            // What each object's watcher was last sent, and the resource version.
            let sent: Arc<Mutex<BTreeMap<String, Value>>> = Default::default();
            let version = Arc::new(std::sync::atomic::AtomicU64::new(10));
            while let Some((req, respond)) = handle.next_request().await {
                let path = req.uri().path().to_string();
                let query = decode(req.uri().query().unwrap_or_default());
                let reply = |code: u16, body: Value| {
                    Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap()
                };
                let p = permission(req.method().as_str(), &path, &query);
                let granted = SERVICE_API_PERMISSIONS
                    .iter()
                    .any(|(g, r, verbs)| *g == p.0 && *r == p.1 && verbs.contains(&p.2.as_str()));
                let name = query.split('&').find_map(|kv| kv.strip_prefix("fieldSelector=metadata.name="));
                let object = match (path.as_str(), name) {
                    (p, Some(n)) if p == format!("/api/v1/namespaces/{NS}/configmaps") && n == REGISTRY_CM => cm_path(),
                    (p, Some(n)) if p == format!("/api/v1/namespaces/{NS}/secrets") && n == REGISTRY_SECRET => {
                        secret_path()
                    }
                    _ => String::new(),
                };
                if forbid.load(Ordering::Relaxed) || !granted || object.is_empty() {
                    refused.lock().unwrap().push(format!("{} {path}?{query}", req.method()));
                    respond.send_response(reply(403, status(403, "Forbidden")));
                    continue;
                }
                let current = |version: &std::sync::atomic::AtomicU64| {
                    objects.lock().unwrap().get(&object).cloned().map(|mut v| {
                        v["metadata"]["resourceVersion"] = json!(version.load(Ordering::Relaxed).to_string());
                        v
                    })
                };
                if p.2 == "list" {
                    let now = objects.lock().unwrap().get(&object).cloned();
                    let items: Vec<Value> = current(&version).into_iter().collect();
                    sent.lock().unwrap().insert(object.clone(), now.unwrap_or(Value::Null));
                    let rv = version.load(Ordering::Relaxed).to_string();
                    respond.send_response(reply(200, json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv}, "items": items})));
                    continue;
                }
                counts.lock().unwrap().entry(object.clone()).or_default().watches += 1;
                let (objects, sent, version, counts) = (objects.clone(), sent.clone(), version.clone(), counts.clone());
                tokio::spawn(async move {
                    loop {
                        let now = objects.lock().unwrap().get(&object).cloned().unwrap_or(Value::Null);
                        let last = sent.lock().unwrap().get(&object).cloned().unwrap_or(Value::Null);
                        if now != last {
                            let n = version.fetch_add(1, Ordering::Relaxed) + 1;
                            let (kind, mut obj) = match (&last, &now) {
                                (Value::Null, _) => ("ADDED", now.clone()),
                                (_, Value::Null) => ("DELETED", last.clone()),
                                _ => ("MODIFIED", now.clone()),
                            };
                            obj["metadata"]["resourceVersion"] = json!(n.to_string());
                            sent.lock().unwrap().insert(object.clone(), now);
                            counts.lock().unwrap().entry(object.clone()).or_default().events += 1;
                            let mut line = serde_json::to_vec(&json!({"type": kind, "object": obj})).unwrap();
                            line.push(b'\n');
                            let response = Response::builder()
                                .status(200)
                                .header("content-type", "application/json")
                                .body(Body::from(line))
                                .unwrap();
                            respond.send_response(response);
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                });
            }
        });
        (client, rw)
    }

    /// Waits until the service has taken in the stored `path`: every event
    /// sent, and the watch after the last one started (the service's watcher
    /// asks again only after its loop has installed what the event brought).
    async fn settled(&self, objects: &Mutex<BTreeMap<String, Value>>, path: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = self.counts.lock().unwrap().get(path).copied().unwrap_or_default();
            let _ = objects;
            if c.events > 0 && c.watches == c.events + 1 {
                return;
            }
            assert!(Instant::now() < deadline, "the service did not take in {path}: {c:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A service on port 0 whose registry files (`dir/tenants.yaml`, missing)
/// are not synced yet, following the API when `api` is given.
async fn service(
    test: &str,
    api: Option<kube::Client>,
    ready: Option<Arc<AtomicBool>>,
) -> (String, tokio::sync::oneshot::Sender<()>) {
    let dir = thumbup_e2e::world_dir(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let opts = thumbup_service::Options {
        config: dir.join(REGISTRY_KEY),
        redis_timeout: Duration::from_millis(1000),
        ready,
        limits: Default::default(),
    };
    let registry_api = api.map(|client| RegistryApi {
        client,
        namespace: NS.into(),
        config_map: REGISTRY_CM.into(),
        secret: REGISTRY_SECRET.into(),
    });
    let files = thumbup_service::ConfigFiles { optional: true, registry_api, ..Default::default() };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(thumbup_service::run_with(opts, files, listener, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// A client of the service at `addr` for tenant `name` with `token`.
async fn client(addr: &str, name: &str, token: &str) -> thumbup_e2e::Client {
    let endpoint = thumbup_service::client_endpoint(addr, None).unwrap();
    let channel = endpoint.connect().await.expect("connect to service");
    thumbup_e2e::Client {
        inner: pb::thumbup_client::ThumbupClient::new(channel),
        tenant: name.into(),
        token: token.into(),
    }
}

/// The API token the operator generated for `lt` (its tenant Secret's).
fn token_of(fake: &FakeApi, lt: &LikeTenant) -> String {
    let path = format!("/api/v1/namespaces/team/secrets/{}", thumbup_core::names::tenant_secret(&lt.tenant()));
    let secret = fake.objects.lock().unwrap().get(&path).cloned().expect("the tenant Secret is written");
    let token: k8s_openapi::ByteString = serde_json::from_value(secret["data"]["token"].clone()).unwrap();
    String::from_utf8(token.0).unwrap()
}

/// The operator's test config with the tenants reaching the DB directly (no
/// db-proxy sidecar runs here).
fn direct_config() -> thumbup_operator::config::OperatorConfig {
    let mut cfg = operator_config(None);
    cfg.db_proxy.enabled = false;
    cfg
}

/// `kubectl apply`: the LikeTenant stored, then the controller's passes (the
/// finalizer, then the tenant's first pass) as its watch would run them.
async fn apply(fake: &FakeApi, ctx: &Arc<Context>, name: &str) -> LikeTenant {
    let store = |lt: &LikeTenant| {
        fake.objects.lock().unwrap().insert(lt_path(&lt.tenant()), serde_json::to_value(lt).unwrap());
    };
    let fresh = tenant(name);
    store(&fresh);
    controller::reconcile(Arc::new(fresh), ctx.clone()).await.expect("the finalizer is added");
    let mut lt = tenant(name);
    lt.metadata.finalizers = Some(vec![FINALIZER.into()]);
    store(&lt);
    controller::reconcile(Arc::new(lt.clone()), ctx.clone()).await.expect("provisioned");
    lt
}

/// Sends Like until one succeeds; every refusal before must be the service
/// not knowing the tenant (UNAUTHENTICATED). Returns the reply and the tries.
async fn like_until_served(c: &thumbup_e2e::Client, within: Duration) -> Option<(pb::LikeReply, u32)> {
    let deadline = Instant::now() + within;
    let mut tries = 0;
    while Instant::now() < deadline {
        tries += 1;
        match c.act(1, 7, 42, 9, pb::Action::Like).await {
            Ok(reply) => return Some((reply, tries)),
            Err(s) => assert_eq!(s.code(), Code::Unauthenticated, "before the tenant serves: {s:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_new_liketenant_serves_its_first_like_within_10_s_of_apply() {
    assert_eq!(REGISTRY_KEY, thumbup_operator::resources::REGISTRY_KEY, "the service reads the operator's key");
    let name = "onboard-new";
    forget(name).await;
    let (op_client, fake) = FakeApi::start(BTreeMap::new());
    let (svc_client, watch) = RegistryWatch::start(fake.objects.clone());
    let (_, route) = tokio::sync::watch::channel(None);
    let ctx = Context::new(op_client, Arc::new(direct_config()), NS.into(), Metrics, route);
    // Running before the apply: one following the API, one only the files.
    let (followed, _stop_a) = service("onboard-api", Some(svc_client), None).await;
    let (files_only, _stop_b) = service("onboard-files", None, None).await;

    let applied = Instant::now();
    let lt = apply(&fake, &ctx, name).await;
    let ready_after = applied.elapsed();
    let token = token_of(&fake, &lt);
    let c = client(&followed, name, &token).await;
    let (reply, tries) = like_until_served(&c, Duration::from_secs(30)).await.expect("the tenant is never served");
    let served_after = applied.elapsed();
    println!(
        "onboarding: LikeTenant {name} provisioned (Ready) {:.3} s after apply, first successful Like {:.3} s after \
         apply ({tries} tries)",
        ready_after.as_secs_f64(),
        served_after.as_secs_f64()
    );
    assert_eq!(reply.counts.map(|c| c.likes), Some(1), "the first Like is counted once: {reply:?}");
    assert!(served_after < Duration::from_secs(10), "first Like {served_after:?} after apply, over 10 s");

    // The service that reads only the files does not serve it: the kubelet
    // has not synced them.
    let f = client(&files_only, name, &token).await;
    let refused = f.act(1, 7, 43, 9, pb::Action::Like).await.expect_err("served without its registry files");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(watch.refused.lock().unwrap().is_empty(), "requests RBAC would refuse: {:?}", watch.refused.lock());
}

#[tokio::test]
async fn a_bad_registry_from_the_api_changes_nothing_and_a_refused_watch_clears_readiness() {
    let name = "onboard-bad";
    forget(name).await;
    let (op_client, fake) = FakeApi::start(BTreeMap::new());
    let (svc_client, watch) = RegistryWatch::start(fake.objects.clone());
    let (_, route) = tokio::sync::watch::channel(None);
    let ctx = Context::new(op_client, Arc::new(direct_config()), NS.into(), Metrics, route);
    let ready = Arc::new(AtomicBool::new(false));
    let (addr, _stop) = service("onboard-bad", Some(svc_client), Some(ready.clone())).await;
    let lt = apply(&fake, &ctx, name).await;
    let token = token_of(&fake, &lt);
    let c = client(&addr, name, &token).await;
    like_until_served(&c, Duration::from_secs(30)).await.expect("the tenant is served");
    let good = fake.objects.lock().unwrap().get(&cm_path()).cloned().unwrap();
    let text = good["data"][REGISTRY_KEY].as_str().unwrap().to_string();

    // Each bad registry: written, taken in by the service, and the tenant
    // serves as before with its token; what the bad one added is not served.
    let bad = [
        ("unparsable", "tenants: [ {".to_string()),
        ("an unknown field", text.replace("tenants:", "tenants:\n- nonsense: 1\n")),
        (
            "a tenant with a token of its own but a business id 0",
            text.replace("tokens_file:", "tokens: [intruder-token-0001]\n  tokens_file:").replace("id: 1", "id: 0"),
        ),
        ("a missing credential key", text.replace(".db-password", ".no-such-key")),
    ];
    for (what, text) in bad {
        assert_ne!(text, good["data"][REGISTRY_KEY].as_str().unwrap(), "{what}: the fixture changes the registry");
        let mut cm = good.clone();
        cm["data"][REGISTRY_KEY] = json!(text);
        fake.objects.lock().unwrap().insert(cm_path(), cm);
        watch.settled(&fake.objects, &cm_path()).await;
        let reply = c.act(1, 8, 42, 9, pb::Action::Like).await;
        assert!(reply.is_ok(), "{what}: the tenant stops serving: {reply:?}");
        c.act(1, 8, 42, 9, pb::Action::Unlike).await.unwrap();
        let intruder = client(&addr, name, "intruder-token-0001").await;
        let s = intruder.act(1, 8, 44, 9, pb::Action::Like).await.expect_err("a token of a refused registry serves");
        assert_eq!(s.code(), Code::Unauthenticated, "{what}: {s:?}");
    }

    // The watch refused (the Role lost): not ready, and ready again once
    // granted; the last good registry serves throughout.
    assert!(ready.load(Ordering::Relaxed), "ready while the watch works");
    watch.forbid.store(true, Ordering::Relaxed);
    fake.objects.lock().unwrap().insert(cm_path(), good.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "still ready while the API refuses the watch");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(c.act(1, 9, 42, 9, pb::Action::Like).await.is_ok(), "the last good registry serves");
    watch.forbid.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready.load(Ordering::Relaxed) {
        assert!(Instant::now() < deadline, "not ready again once the watch is granted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
