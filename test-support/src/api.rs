//! Kubernetes API servers in memory, for tests of the operator and of what
//! it provisions: [`ApiServer`], scripted (a tower-test service whose
//! requests a test takes one at a time, asserts and answers), and
//! [`FakeApi`], which stores what is written and serves it back. Both hold
//! the operator's requests to the RBAC it declares ([`permission`]) and to
//! its field managers.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use thumbup_operator::crd::LikeTenant;

/// ConfigMaps of the operator's namespace, `thumbup`.
pub const CMS: &str = "/api/v1/namespaces/thumbup/configmaps";
/// Events of the tenants' namespace, `team`.
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/team/events";
/// LikeTenants of namespace `team`.
pub const TEAM_TENANTS: &str = "/apis/thumbup.io/v1alpha1/namespaces/team/liketenants";

/// The LikeTenant `name` of namespace `team`.
pub fn lt_path(name: &str) -> String {
    format!("{TEAM_TENANTS}/{name}")
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = tower_test::mock::SendResponse<Response<Body>>;

/// The scripted API server.
pub struct ApiServer {
    /// The server end of the client's connection.
    pub handle: Handle,
}

/// One request the operator made.
pub struct Call {
    /// The query string (`fieldManager=...`).
    pub query: String,
    /// The JSON body (Null when empty).
    pub body: Value,
    /// The Content-Type (`application/apply-patch+yaml` for a server-side apply).
    pub content_type: String,
    respond: Responder,
}

impl Call {
    /// Reads a request, checking that RBAC grants it ([`permission`]) when
    /// `operator` (the operator made it, not a person).
    async fn of(req: Request<Body>, respond: Responder, operator: bool) -> (String, String, Call) {
        let method = req.method().to_string();
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let content_type =
            req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        if operator {
            record_permission(&method, &path, &query);
            assert_field_manager(&method, &path, &query);
        }
        (method, path, Call { query, body, content_type, respond })
    }

    /// Answers with `code` and `body`.
    pub fn reply(self, code: u16, body: Value) {
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Answers a status patch with the object carrying the patched status.
    pub fn reply_status(self, lt: &LikeTenant) {
        let mut obj = serde_json::to_value(lt).unwrap();
        obj["status"] = self.body["status"].clone();
        self.reply(200, obj);
    }

    /// Answers with a failure Status of `code` and `reason`.
    pub fn fail(self, code: u16, reason: &str) {
        self.reply(
            code,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": reason, "reason": reason, "code": code}),
        );
    }

    /// Answers 404 NotFound.
    pub fn not_found(self) {
        self.fail(404, "NotFound");
    }

    /// Answers with the object sent, as the API server would after a write.
    pub fn echo(self) {
        let mut body = self.body.clone();
        body["metadata"]["resourceVersion"] = json!("2");
        self.reply(200, body);
    }
}

impl ApiServer {
    /// A client whose every request goes to the returned server.
    pub fn client() -> (Client, ApiServer) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        (Client::new(service, "thumbup"), ApiServer { handle })
    }

    /// The next request, which must be `method` on `path`. The failover
    /// controller's look for a switchover request (a GET of the ConfigMap
    /// `<route>-switchover`, every probe period) is answered 404 on the way,
    /// unless that is what is expected.
    pub async fn expect(&mut self, method: &str, path: &str) -> Call {
        let (method_got, path_got, call) = loop {
            let (req, respond) = tokio::time::timeout(Duration::from_secs(30), self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no request arrived; expected {method} {path}"))
                .expect("the client is gone");
            let (m, p, call) = Call::of(req, respond, true).await;
            if is_switchover_poll(&m, &p) && p != path {
                call.not_found();
                continue;
            }
            break (m, p, call);
        };
        assert_eq!((method_got.as_str(), path_got.as_str()), (method, path), "unexpected request; body {}", call.body);
        call
    }

    /// The next request, whatever it is: (method, path, call); None when the
    /// client is gone.
    pub async fn next(&mut self) -> Option<(String, String, Call)> {
        let (req, respond) = self.handle.next_request().await?;
        Some(Call::of(req, respond, true).await)
    }

    /// Fails when another request (but a look for a switchover request)
    /// arrives within 300 ms.
    pub async fn expect_no_more(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        while let Ok(Some((req, respond))) = tokio::time::timeout_at(deadline, self.handle.next_request()).await {
            let (method, path, call) = Call::of(req, respond, true).await;
            assert!(is_switchover_poll(&method, &path), "an unexpected request: {method} {path}");
            call.not_found();
        }
    }
}

/// A GET of a switchover request ConfigMap (`kubectl thumbup switchover`).
fn is_switchover_poll(method: &str, path: &str) -> bool {
    method == "GET" && path.contains("/configmaps/") && path.ends_with("-switchover")
}

/// Every write must name the operator's field manager (`thumbup-operator`,
/// `thumbup-operator.<tenant>` for a tenant's keys of the registry Secret,
/// or `thumbup-operator-failover` for the failover controller's status fields), so managedFields never say "unknown". Events are the exception:
/// kube's `Recorder` sends them with default parameters and offers no way to
/// set one.
fn assert_field_manager(method: &str, path: &str, query: &str) {
    if !["POST", "PUT", "PATCH"].contains(&method) || path.starts_with("/apis/events.k8s.io/") {
        return;
    }
    let manager = query.split('&').find_map(|p| p.strip_prefix("fieldManager="));
    let ours = thumbup_operator::controller::MANAGER;
    let failover = thumbup_operator::failover::kube::FAILOVER_MANAGER;
    assert!(
        manager.is_some_and(|m| m == ours || m == failover || m.starts_with(&format!("{ours}."))),
        "{method} {path}?{query} carries no fieldManager={ours}"
    );
}

/// (API group, resource with its subresource, verb): the unit in which RBAC
/// grants.
pub type Permission = (String, String, String);

/// The permission a request needs, as the API server's authorizer derives
/// it from the method, the path and the `watch` parameter.
pub fn permission(method: &str, path: &str, query: &str) -> Permission {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => panic!("not a resource path: {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, sub] => (format!("{resource}/{sub}"), true),
        _ => panic!("not a resource path: {path}"),
    };
    let watch = query.split('&').any(|p| p == "watch=true" || p == "watch=1");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => panic!("unknown method {method} on {path}"),
    };
    (group, resource, verb.to_string())
}

/// Every permission that the operator's code used in this test process.
pub static USED: std::sync::Mutex<std::collections::BTreeSet<Permission>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The permissions `thumbup_operator::controller::API_PERMISSIONS` declares
/// (and the chart's RBAC grants).
pub fn declared_permissions() -> std::collections::BTreeSet<Permission> {
    let mut out = std::collections::BTreeSet::new();
    for (group, resource, verbs) in thumbup_operator::controller::API_PERMISSIONS {
        for verb in *verbs {
            out.insert((group.to_string(), resource.to_string(), verb.to_string()));
        }
    }
    out
}

/// Records a request's permission; a request that RBAC would not grant
/// fails the test that made it.
fn record_permission(method: &str, path: &str, query: &str) {
    let p = permission(method, path, query);
    assert!(
        declared_permissions().contains(&p),
        "the operator issued {method} {path} ({p:?}), which controller::API_PERMISSIONS and so the chart's RBAC do \
         not grant"
    );
    USED.lock().unwrap().insert(p);
}

/// An in-memory API server for tests that care about what is stored, not
/// about the order of the requests: objects written (POST, PUT, PATCH) are
/// kept by path and served back (GET), collections are listed, watches are
/// held open, DELETE removes. Status writes follow the API server's
/// field ownership ([`patch_status`]).
pub struct FakeApi {
    /// Objects by path (`/api/v1/namespaces/team/secrets/x`).
    pub objects: std::sync::Arc<std::sync::Mutex<BTreeMap<String, Value>>>,
    /// Every request: (method, path, body).
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<(String, String, Value)>>>,
}

impl FakeApi {
    /// A client served by a new fake API server holding `objects`.
    pub fn start(objects: BTreeMap<String, Value>) -> (Client, FakeApi) {
        let fake = FakeApi { objects: Default::default(), requests: Default::default() };
        fake.objects.lock().unwrap().extend(objects);
        let client = fake.serve(true);
        (client, fake)
    }

    /// Another client of the same server, for what a person does with
    /// `kubectl thumbup`: its requests are not held to the operator's RBAC.
    pub fn person_client(&self) -> Client {
        self.serve(false)
    }

    fn serve(&self, operator: bool) -> Client {
        let (client, mut api) = ApiServer::client();
        let (store, log) = (self.objects.clone(), self.requests.clone());
        tokio::spawn(async move {
            let mut watches = Vec::new();
            while let Some((req, respond)) = api.handle.next_request().await {
                let (method, path, call) = Call::of(req, respond, operator).await;
                log.lock().unwrap().push((method.clone(), path.clone(), call.body.clone()));
                let (status, object) = Self::answer(&store, &method, &path, &call);
                if status == 0 {
                    watches.push(call);
                } else {
                    call.reply(status, object);
                }
            }
        });
        client
    }

    fn answer(
        store: &std::sync::Mutex<BTreeMap<String, Value>>,
        method: &str,
        path: &str,
        call: &Call,
    ) -> (u16, Value) {
        let mut store = store.lock().unwrap();
        let not_found = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
            "message": "not found", "code": 404});
        let named = |body: &Value| format!("{path}/{}", body["metadata"]["name"].as_str().unwrap_or_default());
        let with_version = |mut v: Value| {
            v["metadata"]["resourceVersion"] = json!("5");
            v
        };
        match method {
            "GET" if call.query.contains("watch=") => (0, Value::Null),
            "GET" => match store.get(path) {
                Some(v) => (200, v.clone()),
                None if permission("GET", path, "").2 == "list" => {
                    // A collection: what is stored right under it.
                    let depth = path.matches('/').count() + 1;
                    let items: Vec<Value> = store
                        .iter()
                        .filter(|(k, _)| k.starts_with(&format!("{path}/")) && k.matches('/').count() == depth)
                        .map(|(_, v)| v.clone())
                        .collect();
                    (
                        200,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "5"}, "items": items}),
                    )
                }
                None => (404, not_found),
            },
            "POST" => {
                let v = with_version(call.body.clone());
                store.insert(named(&call.body), v.clone());
                (201, v)
            }
            "PUT" => {
                let v = with_version(call.body.clone());
                store.insert(path.to_string(), v.clone());
                (200, v)
            }
            "PATCH" if path.ends_with("/status") => {
                let object = path.trim_end_matches("/status").to_string();
                let Some(mut v) = store.get(&object).cloned() else { return (404, not_found) };
                let manager = call.query.split('&').find_map(|p| p.strip_prefix("fieldManager=")).unwrap_or("");
                let apply = call.content_type.starts_with("application/apply-patch");
                patch_status(&mut v, manager, apply, &call.body["status"]);
                store.insert(object, v.clone());
                (200, v)
            }
            "PATCH" if call.body.is_array() => {
                // A JSON patch (the finalizer helper): answer with the object as it is.
                match store.get(path) {
                    Some(v) => (200, v.clone()),
                    None => (404, not_found),
                }
            }
            "PATCH" => {
                let v = with_version(call.body.clone());
                store.insert(path.to_string(), v.clone());
                (200, v)
            }
            "DELETE" => {
                store.remove(path);
                (200, json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
            }
            _ => (405, not_found),
        }
    }

    /// The bodies of the requests `method path` made so far.
    pub fn bodies(&self, method: &str, path: &str) -> Vec<Value> {
        let log = self.requests.lock().unwrap();
        log.iter().filter(|(m, p, _)| m == method && p == path).map(|(_, _, b)| b.clone()).collect()
    }
}

/// A status write as the API server does it, at the granularity of the
/// status's top-level fields. The object's `metadata.managedFields` records
/// which manager owns which field (`fieldsV1` `f:status` `f:<field>`),
/// with `operation` Apply or Update.
/// - A server-side apply (forced, as the operator sends them) sets the
///   fields it names and takes them from their other owners; a field that
///   this manager applied before and leaves out now is removed, unless
///   another manager owns it too.
/// - A merge patch sets what it names, removes what it sets to null, and
///   leaves the rest as it is; its fields belong to the manager's Update.
fn patch_status(object: &mut Value, manager: &str, apply: bool, body: &Value) {
    let operation = if apply { "Apply" } else { "Update" };
    let mut entries: Vec<Value> = object["metadata"]["managedFields"].as_array().cloned().unwrap_or_default();
    let owned = |e: &Value| -> Vec<String> {
        e["fieldsV1"]["f:status"]
            .as_object()
            .map(|m| m.keys().map(|k| k[2..].to_string()).collect())
            .unwrap_or_default()
    };
    let is_mine = |e: &Value| e["manager"] == manager && e["operation"] == operation && e["subresource"] == "status";
    let named: Vec<String> = body.as_object().map(|m| m.keys().cloned().collect()).unwrap_or_default();
    let before: Vec<String> = entries.iter().filter(|e| is_mine(e)).flat_map(owned).collect();
    if !object["status"].is_object() {
        object["status"] = json!({});
    }
    let status = object["status"].as_object_mut().unwrap();
    for (k, val) in body.as_object().into_iter().flatten() {
        if val.is_null() {
            status.remove(k);
        } else {
            status.insert(k.clone(), val.clone());
        }
    }
    if apply {
        for gone in before.iter().filter(|f| !named.contains(f)) {
            let elsewhere = entries.iter().filter(|e| !is_mine(e)).any(|e| owned(e).contains(gone));
            if !elsewhere {
                status.remove(gone);
            }
        }
    }
    let kept: Vec<String> = if apply {
        named.clone()
    } else {
        before.iter().chain(&named).filter(|f| status.contains_key(*f)).cloned().collect()
    };
    for e in entries.iter_mut().filter(|e| !is_mine(e)) {
        let left: serde_json::Map<String, Value> = owned(e)
            .into_iter()
            .filter(|f| !named.contains(f) && status.contains_key(f))
            .map(|f| (format!("f:{f}"), json!({})))
            .collect();
        if e["subresource"] == "status" {
            e["fieldsV1"]["f:status"] = Value::Object(left);
        }
    }
    entries.retain(|e| !is_mine(e));
    let mine: serde_json::Map<String, Value> = kept.into_iter().map(|f| (format!("f:{f}"), json!({}))).collect();
    entries.push(json!({"manager": manager, "operation": operation, "subresource": "status",
        "fieldsV1": {"f:status": mine}}));
    object["metadata"]["managedFields"] = Value::Array(entries);
}
