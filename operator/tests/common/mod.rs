//! Shared by the operator's tests: the local stack's admin URLs (from
//! `scripts/stack.sh env`, with its defaults), an operator config for two
//! datacenters on it, LikeTenant fixtures, probes of the real servers, and
//! the scripted Kubernetes API server (a tower-test service whose requests a
//! test takes one at a time, asserts and answers).

#![allow(dead_code)]

use std::str::FromStr;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;
use thumbup_core::names;
use thumbup_core::route::{FailoverRecord, Route, Transition, TransitionKind};
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::crd::{Business, LikeTenant, LikeTenantSpec};

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
    respond: Responder,
}

impl Call {
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

    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: &str, path: &str) -> Call {
        let (req, respond) = tokio::time::timeout(Duration::from_secs(30), self.handle.next_request())
            .await
            .unwrap_or_else(|_| panic!("no request arrived; expected {method} {path}"))
            .expect("the client is gone");
        let method_got = req.method().to_string();
        let path_got = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or_default().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
        assert_eq!((method_got.as_str(), path_got.as_str()), (method, path), "unexpected request; body {body}");
        Call { query, body, respond }
    }

    /// Fails when another request arrives within 300 ms.
    pub async fn expect_no_more(&mut self) {
        if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_millis(300), self.handle.next_request()).await {
            panic!("an unexpected request: {} {}", req.method(), req.uri());
        }
    }
}

/// Admin URL of MariaDB (dc-a).
pub fn admin_db_url() -> String {
    std::env::var("THUMBUP_ADMIN_DB_URL")
        .unwrap_or_else(|_| "mysql://thumbup_admin:thumbup-admin@127.0.0.1:23306".into())
}

/// Admin URL of dc-a's Redis.
pub fn admin_redis_url() -> String {
    std::env::var("THUMBUP_ADMIN_REDIS_URL").unwrap_or_else(|_| "redis://default:thumbup-admin@127.0.0.1:26379".into())
}

/// Admin URL of dc-b's Redis.
pub fn admin_redis_url_b() -> String {
    std::env::var("THUMBUP_ADMIN_REDIS_URL_B")
        .unwrap_or_else(|_| "redis://default:thumbup-admin@127.0.0.1:26380".into())
}

/// `scheme://user:password@host:port` -> (`scheme://host:port`, user, password).
pub fn split(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (auth, host) = rest.rsplit_once('@').unwrap();
    let (user, pw) = auth.split_once(':').unwrap();
    (format!("{scheme}://{host}"), user.into(), pw.into())
}

/// An operator config with dc-a (MariaDB + Redis a) active and dc-b (Redis b;
/// its DB is dc-a's MariaDB too, since the standby DB is not needed here).
/// `db_url` overrides dc-a's DB address (an unreachable one, for failures).
pub fn operator_config(db_url: Option<&str>) -> OperatorConfig {
    let (db, db_user, db_pw) = split(&admin_db_url());
    let (ra, ra_user, ra_pw) = split(&admin_redis_url());
    let (rb, rb_user, rb_pw) = split(&admin_redis_url_b());
    let db_a = db_url.unwrap_or(&db);
    let text = format!(
        r#"
active_datacenter: dc-a
registry: {{ config_map: thumbup-tenants, secret: thumbup-tenant-credentials }}
job: {{ image: "thumbup/thumbup:test", image_pull_policy: IfNotPresent }}
datacenters:
  - name: dc-a
    db: {{ url: "{db_a}", admin_username: "{db_user}", admin_password: "{db_pw}" }}
    redis: {{ url: "{ra}", admin_username: "{ra_user}", admin_password: "{ra_pw}" }}
  - name: dc-b
    db: {{ url: "{db}", admin_username: "{db_user}", admin_password: "{db_pw}" }}
    redis: {{ url: "{rb}", admin_username: "{rb_user}", admin_password: "{rb_pw}" }}
"#
    );
    OperatorConfig::parse(&text, "test").unwrap()
}

/// A LikeTenant `name` in namespace `team`, with a uid, generation 1 and two
/// businesses.
pub fn tenant(name: &str) -> LikeTenant {
    let mut lt = LikeTenant::new(
        name,
        LikeTenantSpec::with_businesses(vec![
            Business { id: 1, name: "video".into() },
            Business { id: 2, name: "article".into() },
        ]),
    );
    lt.metadata.namespace = Some("team".into());
    lt.metadata.uid = Some(format!("uid-{name}"));
    lt.metadata.generation = Some(1);
    lt.metadata.resource_version = Some("1".into());
    lt
}

/// The route after a failover from dc-a to dc-b at epoch 4.
pub fn failed_over() -> Route {
    Route {
        epoch: 4,
        active_datacenter: "dc-b".into(),
        datacenters: [
            ("dc-a".to_string(), "mariadb-dc-a:3306".to_string()),
            ("dc-b".into(), "mariadb-dc-b:3306".into()),
        ]
        .into(),
        failover: FailoverRecord {
            last_transition: Some(Transition {
                at: "2026-11-22T20:00:00Z".parse().unwrap(),
                kind: TransitionKind::Failover,
                from: "dc-a".into(),
                to: "dc-b".into(),
                epoch: 4,
                reason: "3 probes failed over 6s".into(),
            }),
            flips: vec!["2026-11-22T20:00:00Z".parse().unwrap()],
            ..FailoverRecord::default()
        },
    }
}

/// An admin connection to MariaDB.
pub async fn admin_db() -> sqlx::MySqlConnection {
    MySqlConnectOptions::from_str(&admin_db_url()).unwrap().connect().await.unwrap()
}

/// A connection as `user` (optionally to `schema`).
pub async fn db_as(user: &str, password: &str, schema: Option<&str>) -> Result<sqlx::MySqlConnection, sqlx::Error> {
    let (base, _, _) = split(&admin_db_url());
    let mut o = MySqlConnectOptions::from_str(&base)?.username(user).password(password);
    if let Some(s) = schema {
        o = o.database(s);
    }
    o.connect().await
}

/// True when `schema` exists.
pub async fn schema_exists(schema: &str) -> bool {
    let mut con = admin_db().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?")
        .bind(schema)
        .fetch_one(&mut con)
        .await
        .unwrap();
    n == 1
}

/// True when the DB user exists.
pub async fn db_user_exists(user: &str) -> bool {
    let mut con = admin_db().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM mysql.user WHERE User = ?")
        .bind(user)
        .fetch_one(&mut con)
        .await
        .unwrap();
    n >= 1
}

/// An admin Redis connection.
pub async fn redis_admin(url: &str) -> redis::aio::MultiplexedConnection {
    // Not the client's default 500 ms: a loaded test machine stalls longer.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(std::time::Duration::from_secs(10)));
    redis::Client::open(url).unwrap().get_multiplexed_async_connection_with_config(&config).await.unwrap()
}

/// `ACL GETUSER user` rendered as text (empty when the user does not exist).
pub async fn acl_user(url: &str, user: &str) -> String {
    let mut con = redis_admin(url).await;
    let v: redis::Value = redis::cmd("ACL").arg("GETUSER").arg(user).query_async(&mut con).await.unwrap();
    match v {
        redis::Value::Nil => String::new(),
        v => format!("{v:?}"),
    }
}

/// Keys under `prefix` on the Redis at `url`.
pub async fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut con = redis_admin(url).await;
    let mut keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut con).await.unwrap();
    keys.sort();
    keys
}

/// Removes whatever an earlier run left of tenant `name` (schema, users,
/// keys and their ownership records), whoever holds them.
pub async fn forget(name: &str) {
    forget_schema(&names::schema_for(name)).await;
    let user = names::db_user(name);
    let mut con = admin_db().await;
    for s in [
        format!("DROP USER IF EXISTS '{user}'@'%'"),
        format!("DELETE FROM `{}`.owners WHERE kind = 'db_user' AND name = '{user}'", names::CONTROL_SCHEMA),
    ] {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await;
    }
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = redis_admin(&url).await;
        let user = names::redis_user(name);
        let _: () = redis::cmd("ACL").arg("DELUSER").arg(&user).query_async(&mut r).await.unwrap();
        let _: () = redis::cmd("HDEL").arg(names::CONTROL_KEY).arg(&user).query_async(&mut r).await.unwrap();
        thumbup_core::provision::delete_keys(&url, name).await.unwrap();
    }
}

/// Drops `schema` and its ownership record, whoever holds it.
pub async fn forget_schema(schema: &str) {
    let mut con = admin_db().await;
    for s in [
        format!("DROP DATABASE IF EXISTS `{schema}`"),
        format!("DELETE FROM `{}`.owners WHERE kind = 'schema' AND name = '{schema}'", names::CONTROL_SCHEMA),
    ] {
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await;
    }
}

/// The owner the operator records for `lt` with the test config (no
/// `installation_id`: the operator's namespace, `thumbup`).
pub fn owner_of(lt: &LikeTenant) -> thumbup_core::provision::Owner {
    thumbup_operator::provision::owner(lt, "thumbup")
}
