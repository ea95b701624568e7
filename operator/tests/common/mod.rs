//! Shared by the operator's tests: the local stack's admin URLs (from
//! `scripts/stack.sh env`, with its defaults), an operator config for two
//! datacenters on it, LikeTenant fixtures and probes of the real servers.

#![allow(dead_code)]

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::crd::{Business, LikeTenant, LikeTenantSpec};

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

fn split(url: &str) -> (String, String, String) {
    // scheme://user:password@host:port -> (scheme://host:port, user, password)
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
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
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

/// Removes whatever an earlier run left of tenant `name` (schema, users, keys).
pub async fn forget(name: &str) {
    let schema = thumbup_core::config::schema_for(name);
    let user = thumbup_operator::resources::db_username(name);
    thumbup_core::provision::drop_db(&admin_db_url(), name, &schema, &user).await.unwrap();
    for url in [admin_redis_url(), admin_redis_url_b()] {
        thumbup_core::provision::drop_redis_user(&url, name, &thumbup_operator::resources::redis_username(name))
            .await
            .unwrap();
        thumbup_core::provision::delete_keys(&url, name).await.unwrap();
    }
}
