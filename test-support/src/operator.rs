//! Fixtures of the operator's tests: an operator config for two datacenters
//! on the local stack, LikeTenants, and probes and clean-up of what
//! provisioning leaves on the real servers.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;
use thumbup_core::names;
use thumbup_core::route::{FailoverRecord, Route, Transition, TransitionKind};
use thumbup_operator::config::OperatorConfig;
use thumbup_operator::crd::{Business, LikeTenant, LikeTenantSpec};

use crate::stack::{admin_db, admin_db_url, admin_redis_at, admin_redis_url, admin_redis_url_b, split};

/// An operator config with dc-a (MariaDB + Redis a) active and dc-b (Redis b;
/// its DB is dc-a's MariaDB too, since the standby DB is not needed here).
/// `db_url` overrides dc-a's DB address (an unreachable one, for failures).
pub fn operator_config(db_url: Option<&str>) -> OperatorConfig {
    OperatorConfig::parse(&operator_config_text(db_url), "test").unwrap()
}

/// The text of [`operator_config`].
pub fn operator_config_text(db_url: Option<&str>) -> String {
    let (db, _, _) = split(&admin_db_url());
    let datacenters = datacenters_yaml(db_url.unwrap_or(&db), &db);
    format!(
        r#"
active_datacenter: dc-a
registry: {{ config_map: thumbup-tenants, secret: thumbup-tenant-credentials }}
job: {{ image: "thumbup/thumbup:test", image_pull_policy: IfNotPresent }}
{datacenters}"#
    )
}

/// The `datacenters:` list of an operator config: dc-a with Redis a and
/// the DB at `db_a`, dc-b with Redis b and the DB at `db_b` (`mysql://host:port`),
/// each with the stack's admin accounts.
pub fn datacenters_yaml(db_a: &str, db_b: &str) -> String {
    let (_, db_user, db_pw) = split(&admin_db_url());
    let (ra, ra_user, ra_pw) = split(&admin_redis_url());
    let (rb, rb_user, rb_pw) = split(&admin_redis_url_b());
    format!(
        r#"datacenters:
  - name: dc-a
    db: {{ url: "{db_a}", admin_username: "{db_user}", admin_password: "{db_pw}" }}
    redis: {{ url: "{ra}", admin_username: "{ra_user}", admin_password: "{ra_pw}" }}
  - name: dc-b
    db: {{ url: "{db_b}", admin_username: "{db_user}", admin_password: "{db_pw}" }}
    redis: {{ url: "{rb}", admin_username: "{rb_user}", admin_password: "{rb_pw}" }}
"#
    )
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
        redis: Default::default(),
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

/// `ACL GETUSER user` rendered as text (empty when the user does not exist).
pub async fn acl_user(url: &str, user: &str) -> String {
    let mut con = admin_redis_at(url).await;
    let v: redis::Value = redis::cmd("ACL").arg("GETUSER").arg(user).query_async(&mut con).await.unwrap();
    match v {
        redis::Value::Nil => String::new(),
        v => format!("{v:?}"),
    }
}

/// Keys under `prefix` on the Redis at `url`.
pub async fn keys_under(url: &str, prefix: &str) -> Vec<String> {
    let mut con = admin_redis_at(url).await;
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
        let mut r = admin_redis_at(&url).await;
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
