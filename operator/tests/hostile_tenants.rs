//! Hostile tenants against the real MariaDB and Redis of `scripts/stack.sh`
//! and the operator's reconcile (with an in-memory API server): one row per
//! attempt a tenant (or whoever can write a LikeTenant or its Secret) makes
//! to reach an account, schema or key that is not its own. Each row is
//! refused by the layer that owns the resource (the CRD's validation, the
//! operator's admission, core's provisioning, DB grants, Redis ACL) and a
//! snapshot of everything the attempt aimed at (the users' rows and grants,
//! the schemas, the system schemas' tables, ACL users, the victim's data and
//! the ownership records) is the same before and after.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{Apiserver, Layer};
use serde_json::{Value, json};
use thumbup_core::names;
use thumbup_core::provision::{self as core_provision, Adopt, Owner};
use thumbup_operator::controller::{self, Context};
use thumbup_operator::crd::{DeletionPolicy, FINALIZER, LikeTenant};
use thumbup_operator::metrics::Metrics;
use thumbup_operator::provision;
use thumbup_operator::resources::{self, Credentials};
use thumbup_test_support::api::{CMS, FakeApi, lt_path};
use thumbup_test_support::operator::{db_as, forget, operator_config, owner_of, tenant};
use thumbup_test_support::stack::{admin_db, admin_db_url, admin_redis_at, admin_redis_url, admin_redis_url_b};

/// The tenant whose data the others go after.
const VICTIM: &str = "ha-victim";
/// The hostile tenant.
const EVIL: &str = "ha-evil";
/// A tenant whose accounts existed before thumbup recorded ownership (made
/// by hand, or by another tool).
const LEGACY: &str = "ha-legacy";
/// A hostile tenant that is deleted.
const EVIL_DELETED: &str = "ha-evil-del";

const RESERVED: &[&str] = &["mysql", "information_schema", "performance_schema", "sys", "MySQL", "thumbup__control"];

/// Everything an attempt could change that a tenant must not.
async fn snapshot() -> Vec<String> {
    let mut con = admin_db().await;
    let users = ["root", "thumbup_admin", &names::db_user(VICTIM), &names::db_user(EVIL), &names::db_user(LEGACY)];
    let list = |v: &[&str]| v.iter().map(|u| format!("'{u}'")).collect::<Vec<_>>().join(", ");
    let mut out: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CONCAT_WS(' ', 'user', User, Host, authentication_string, max_user_connections) FROM mysql.user
         WHERE User IN ({}) ORDER BY 1",
        list(&users)
    )))
    .fetch_all(&mut con)
    .await
    .unwrap();
    for u in &users[2..] {
        let grants: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW GRANTS FOR '{u}'@'%'")))
            .fetch_all(&mut con)
            .await
            .unwrap_or_else(|_| vec![format!("no user {u}")]);
        out.extend(grants);
    }
    let schemas = ["mysql", "information_schema", "performance_schema", "sys", "thumbup_ha_victim", "thumbup_ha_evil"];
    let schemas: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CONCAT('schema ', SCHEMA_NAME) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME IN ({}) ORDER BY 1",
        list(&schemas)
    )))
    .fetch_all(&mut con)
    .await
    .unwrap();
    out.extend(schemas);
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CONCAT('table ', TABLE_SCHEMA, '.', TABLE_NAME) FROM information_schema.TABLES
         WHERE TABLE_SCHEMA IN ('mysql', 'sys', 'performance_schema', 'thumbup_ha_victim') ORDER BY 1",
    )
    .fetch_all(&mut con)
    .await
    .unwrap();
    out.extend(tables);
    let data: Vec<String> =
        sqlx::query_scalar("SELECT CONCAT('victim row ', message_id, '=', likes) FROM thumbup_ha_victim.like_counts")
            .fetch_all(&mut con)
            .await
            .unwrap();
    out.extend(data);
    let owners: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CONCAT_WS(' ', 'owner', kind, name, installation, uid, object) FROM `{}`.owners
         WHERE name LIKE '%ha_victim' OR name LIKE '%ha_evil' OR name LIKE '%ha_legacy' ORDER BY 1",
        names::CONTROL_SCHEMA
    )))
    .fetch_all(&mut con)
    .await
    .unwrap();
    out.extend(owners);
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = admin_redis_at(&url).await;
        let acl: Vec<String> = redis::cmd("ACL").arg("LIST").query_async(&mut r).await.unwrap();
        out.extend(acl.into_iter().filter(|u| u.starts_with("user default ") || u.contains("thumbup-ha-")));
        let key: Option<String> = redis::cmd("GET").arg("thumbup:ha-victim:k").query_async(&mut r).await.unwrap();
        out.push(format!("{url} victim key {key:?}"));
        let records: BTreeMap<String, String> =
            redis::cmd("HGETALL").arg(names::CONTROL_KEY).query_async(&mut r).await.unwrap();
        out.extend(records.into_iter().filter(|(k, _)| k.contains("thumbup-ha-")).map(|(k, v)| format!("{k}={v}")));
    }
    out
}

fn lt(name: &str) -> LikeTenant {
    let mut lt = tenant(name);
    lt.metadata.finalizers = Some(vec![FINALIZER.into()]);
    lt
}

/// The registry ConfigMap with every test tenant's name claimed by its own
/// LikeTenant (the name claim is not what these rows test).
fn registry() -> (String, Value) {
    let annotations: serde_json::Map<String, Value> = [VICTIM, EVIL, LEGACY, EVIL_DELETED]
        .iter()
        .map(|t| (format!("thumbup.io/tenant.{t}"), json!(format!("team/uid-{t}"))))
        .collect();
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "thumbup-tenants", "namespace": "thumbup", "resourceVersion": "3", "annotations": annotations},
        "data": {"tenants.yaml": "tenants: []\n"}});
    (format!("{CMS}/thumbup-tenants"), cm)
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/team/secrets/thumbup-tenant-{name}")
}

/// One reconcile pass of `lt` against a fake API server holding `objects`
/// (and the registry), with `installation` as the config's id. Returns the
/// fake server (its requests and objects) and the pass's result.
async fn reconcile(
    lt: &LikeTenant,
    objects: BTreeMap<String, Value>,
    installation: Option<&str>,
) -> (FakeApi, Result<kube::runtime::controller::Action, String>) {
    let mut objects = objects;
    let (cm_path, cm) = registry();
    objects.insert(cm_path, cm);
    objects.insert(lt_path(&lt.tenant()), serde_json::to_value(lt).unwrap());
    let (client, fake) = FakeApi::start(objects);
    let mut cfg = operator_config(None);
    cfg.installation_id = installation.map(str::to_string);
    let (_, route) = tokio::sync::watch::channel(None);
    let ctx = Context::new(client, Arc::new(cfg), "thumbup".into(), Metrics, route);
    let result = controller::reconcile(Arc::new(lt.clone()), ctx).await.map_err(|e| e.to_string());
    (fake, result)
}

/// The condition `type_` of the last status the pass wrote.
fn condition(fake: &FakeApi, name: &str, type_: &str) -> Value {
    let statuses = fake.bodies("PATCH", &format!("{}/status", lt_path(name)));
    let last = statuses.last().unwrap_or_else(|| panic!("no status written for {name}"));
    let conds = last["status"]["conditions"].as_array().expect("conditions");
    conds.iter().find(|c| c["type"] == type_).cloned().unwrap_or_else(|| panic!("no {type_} in {last}"))
}

/// Who refused an attempt, and what they said.
enum Refusal {
    /// The API server's validation of the CRD (a CEL rule's message).
    Crd(&'static str),
    /// The operator's admission: the condition's (type, reason) and a part of its message.
    Admission(&'static str, &'static str, String),
    /// Core's provisioning (the error's text).
    Core(&'static str),
    /// The attempt reached nothing: the operator used only the derived names.
    Ignored,
}

/// A hostile tenant `EVIL` with `schemaName` set.
fn evil_with_schema(schema: &str) -> LikeTenant {
    let mut t = lt(EVIL);
    t.spec.schema_name = Some(schema.into());
    t
}

/// Provisions a tenant through the operator's own path; returns its credentials.
async fn provisioned(name: &str) -> Credentials {
    let cfg = operator_config(None);
    let t = lt(name);
    let creds = Credentials::generate(name);
    let owner = owner_of(&t);
    provision::admit(&t, &owner, &cfg, cfg.active()).await.expect("admitted");
    provision::database(&t, &owner, &creds, cfg.active()).await.expect("DB");
    provision::redis(&t, &owner, &creds, &cfg).await.expect("Redis");
    creds
}

/// Accounts made outside thumbup (no ownership record), with `password`.
async fn legacy_accounts(password: &str) {
    let user = names::db_user(LEGACY);
    let mut con = admin_db().await;
    for s in [
        format!("CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"),
        format!("CREATE DATABASE `{}`", names::schema_for(LEGACY)),
        format!("GRANT ALL PRIVILEGES ON `{}`.* TO '{user}'@'%'", names::schema_for(LEGACY)),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await.unwrap();
    }
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = admin_redis_at(&url).await;
        let rules = ["reset", "on", &format!(">{password}"), "~thumbup:ha-legacy:*", "+get"];
        let _: () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(names::redis_user(LEGACY))
            .arg(&rules[..])
            .query_async(&mut r)
            .await
            .unwrap();
    }
}

/// One hostile input: its name, the LikeTenant, the refusal expected, the
/// tenant Secret's data, and the message the CRD's CEL rule gives (if any).
type Row<'a> = (String, LikeTenant, Refusal, BTreeMap<String, Value>, Option<&'a str>);

#[tokio::test]
async fn every_hostile_attempt_is_refused_by_the_owner_of_the_resource_and_changes_nothing() {
    for t in [VICTIM, EVIL, LEGACY, EVIL_DELETED] {
        forget(t).await;
    }
    // The victim, with data in its schema and its keys.
    let victim = provisioned(VICTIM).await;
    let mut vcon = db_as(&names::db_user(VICTIM), &victim.db_password, Some("thumbup_ha_victim")).await.unwrap();
    sqlx::query("INSERT INTO like_counts (business_id, message_id, likes, dislikes, version) VALUES (1, 7, 42, 0, 1)")
        .execute(&mut vcon)
        .await
        .unwrap();
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let _: () = redis::cmd("SET")
            .arg("thumbup:ha-victim:k")
            .arg("v")
            .query_async(&mut admin_redis_at(&url).await)
            .await
            .unwrap();
    }
    // The hostile tenant, provisioned as any tenant; its Secret as the operator wrote it.
    let evil = provisioned(EVIL).await;
    let evil_lt = lt(EVIL);
    let entry = resources::registry_entry(&evil_lt, &operator_config(None), "dc-a");
    let evil_secret = serde_json::to_value(resources::build_tenant_secret(&evil_lt, &evil, &entry)).unwrap();
    legacy_accounts("legacy-pw-1").await;

    let apiserver = Apiserver::new();
    let mut rows: Vec<Row> = Vec::new();
    let crd_message = "schemaName names a system schema or the thumbup control schema";
    for schema in RESERVED {
        let why = format!("schema {schema} is reserved");
        rows.push((
            format!("schemaName {schema} (CRD)"),
            evil_with_schema(schema),
            Refusal::Crd(crd_message),
            BTreeMap::new(),
            None,
        ));
        rows.push((
            format!("schemaName {schema} (the CRD bypassed: admission)"),
            evil_with_schema(schema),
            Refusal::Admission("DatabaseReady", "SchemaReserved", why),
            BTreeMap::new(),
            None,
        ));
        rows.push((
            format!("schemaName {schema} (core provisioning)"),
            evil_with_schema(schema),
            Refusal::Core("is reserved"),
            BTreeMap::new(),
            None,
        ));
    }
    rows.push((
        "schemaName of another tenant's schema".into(),
        evil_with_schema("thumbup_ha_victim"),
        Refusal::Admission("DatabaseReady", "NotOwned", "belongs to LikeTenant team/ha-victim".into()),
        BTreeMap::new(),
        None,
    ));
    let mut adopting = evil_with_schema("thumbup_ha_victim");
    adopting.spec.adopt_existing = true;
    rows.push((
        "schemaName of another tenant's schema with adoptExisting".into(),
        adopting,
        Refusal::Admission("DatabaseReady", "NotOwned", "never handed to another".into()),
        BTreeMap::new(),
        None,
    ));
    for (key, value) in [
        ("db-username", "root"),
        ("redis-username", "default"),
        ("db-username", "thumbup_ha_victim"),
        ("redis-username", "thumbup-ha-victim"),
        ("db-username", "thumbup_admin"),
    ] {
        let mut secret = evil_secret.clone();
        secret["data"][key] = json!(k8s_openapi::ByteString(value.as_bytes().to_vec()));
        let objects = BTreeMap::from([(secret_path(EVIL), secret)]);
        rows.push((format!("tenant Secret edited: {key}={value}"), lt(EVIL), Refusal::Ignored, objects, None));
    }
    rows.push((
        "an existing account that thumbup did not create".into(),
        lt(LEGACY),
        Refusal::Admission("DatabaseReady", "NotOwned", "no record of creating it".into()),
        BTreeMap::new(),
        None,
    ));
    rows.push((
        "another installation's tenant of the same name".into(),
        lt(VICTIM),
        Refusal::Admission("DatabaseReady", "NotOwned", "of thumbup installation \"thumbup\"".into()),
        BTreeMap::new(),
        Some("second-install"),
    ));
    let mut deleting = lt(EVIL_DELETED);
    deleting.spec.schema_name = Some("thumbup_ha_victim".into());
    deleting.spec.deletion_policy = DeletionPolicy::Delete;
    deleting.metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()));
    rows.push((
        "deleting, with deletionPolicy Delete, a LikeTenant naming the victim's schema".into(),
        deleting,
        Refusal::Ignored,
        BTreeMap::new(),
        None,
    ));

    let mut failures = Vec::new();
    for (what, attempt, refusal, objects, installation) in rows {
        let before = snapshot().await;
        let verdict: Result<(), String> = match &refusal {
            Refusal::Crd(message) => {
                let object = serde_json::to_value(&attempt).unwrap();
                let got = apiserver.validate(&object, None);
                let hit = got.iter().any(|(layer, _, m)| *layer == Layer::Cel && m == message);
                if hit { Ok(()) } else { Err(format!("the CRD admitted it: {got:?}")) }
            }
            Refusal::Admission(type_, reason, message) => {
                let (fake, result) = reconcile(&attempt, objects, installation).await;
                let c = condition(&fake, &attempt.tenant(), type_);
                let ok = c["status"] == "False"
                    && c["reason"] == *reason
                    && c["message"].as_str().is_some_and(|m| m.contains(message.as_str()));
                let secrets = fake.bodies("PATCH", &secret_path(&attempt.tenant()));
                match (ok, result) {
                    (true, Ok(_)) if secrets.is_empty() => Ok(()),
                    (true, Ok(_)) => Err("refused, but credentials were handed out".into()),
                    (_, r) => Err(format!("{type_} {c} ({r:?})")),
                }
            }
            Refusal::Core(message) => {
                let cfg = operator_config(None);
                let t = provision::tenant_config(&attempt, &evil, cfg.active());
                let owner = owner_of(&attempt);
                let r = core_provision::provision_db_as(&admin_db_url(), &t, &owner, Adopt::Never, Some(8)).await;
                match r {
                    Err(e) if e.to_string().contains(message) => Ok(()),
                    other => Err(format!("core provisioning: {other:?}")),
                }
            }
            Refusal::Ignored => {
                let (fake, result) = reconcile(&attempt, objects, installation).await;
                let secrets = fake.bodies("PATCH", &secret_path(&attempt.tenant()));
                let names_kept = secrets.iter().all(|s| {
                    s["data"]["db-username"] == json!(k8s_openapi::ByteString(b"thumbup_ha_evil".to_vec()))
                        && s["data"]["redis-username"] == json!(k8s_openapi::ByteString(b"thumbup-ha-evil".to_vec()))
                });
                match result {
                    Ok(_) if names_kept => Ok(()),
                    Ok(_) => Err(format!("the Secret was written with other names: {secrets:?}")),
                    Err(e) => Err(e),
                }
            }
        };
        let after = snapshot().await;
        let changed: Vec<String> = after.iter().filter(|l| !before.contains(l)).cloned().collect();
        let gone: Vec<String> = before.iter().filter(|l| !after.contains(l)).cloned().collect();
        let verdict = verdict.and_then(|()| {
            if changed.is_empty() && gone.is_empty() { Ok(()) } else { Err(format!("changed: +{changed:?} -{gone:?}")) }
        });
        println!(
            "{:<75} {}",
            what,
            if verdict.is_ok() { "refused, nothing changed".to_string() } else { format!("{verdict:?}") }
        );
        if let Err(e) = verdict {
            failures.push(format!("{what}: {e}"));
        }
    }

    // The servers' own refusals, for the record: the hostile tenant's
    // account on the victim's schema and keys.
    let err = db_as(&names::db_user(EVIL), &evil.db_password, Some("thumbup_ha_victim")).await.unwrap_err();
    assert!(err.to_string().contains("denied"), "{err}");
    let mut info = redis::IntoConnectionInfo::into_connection_info(admin_redis_url().as_str()).unwrap();
    let settings =
        info.redis_settings().clone().set_username(names::redis_user(EVIL)).set_password(&evil.redis_password);
    info = info.set_redis_settings(settings);
    let mut r = redis::Client::open(info).unwrap().get_multiplexed_async_connection().await.unwrap();
    for cmd in [vec!["GET", "thumbup:ha-victim:k"], vec!["HGETALL", names::CONTROL_KEY]] {
        let res: redis::RedisResult<redis::Value> = redis::cmd(cmd[0]).arg(&cmd[1..]).query_async(&mut r).await;
        assert!(res.is_err_and(|e| e.to_string().to_uppercase().contains("NOPERM")), "{cmd:?}");
    }
    // The legacy accounts kept their password.
    assert!(db_as(&names::db_user(LEGACY), "legacy-pw-1", None).await.is_ok());
    assert!(failures.is_empty(), "{} attempts got through:\n{}", failures.len(), failures.join("\n"));

    for t in [VICTIM, EVIL, LEGACY, EVIL_DELETED] {
        forget(t).await;
    }
}

#[tokio::test]
async fn an_existing_account_is_adopted_only_when_the_like_tenant_asks_and_its_password_is_reset_then() {
    let name = "ha-adopt";
    forget(name).await;
    let user = names::db_user(name);
    let mut con = admin_db().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE USER '{user}'@'%' IDENTIFIED BY 'old-pw'")))
        .execute(&mut con)
        .await
        .unwrap();
    let cfg = operator_config(None);
    let mut t = lt(name);
    let owner = owner_of(&t);
    let err = provision::admit(&t, &owner, &cfg, cfg.active()).await.unwrap_err();
    assert_eq!(err.reason(), "NotOwned", "{err}");
    assert!(db_as(&user, "old-pw", None).await.is_ok(), "refused: the password is the old one");
    t.spec.adopt_existing = true;
    let creds = Credentials::generate(name);
    provision::admit(&t, &owner, &cfg, cfg.active()).await.expect("adopted on request");
    provision::database(&t, &owner, &creds, cfg.active()).await.unwrap();
    assert!(db_as(&user, "old-pw", None).await.is_err());
    assert!(db_as(&user, &creds.db_password, None).await.is_ok());
    // Now it is this LikeTenant's: no adoptExisting needed any more, and
    // `thumbup-service provision` may not take it.
    t.spec.adopt_existing = false;
    provision::admit(&t, &owner, &cfg, cfg.active()).await.expect("ours now");
    let tc = provision::tenant_config(&t, &creds, cfg.active());
    let err = core_provision::provision_db(&admin_db_url(), &tc).await.unwrap_err();
    assert!(err.to_string().contains("never handed to another"), "{err}");
    assert_ne!(owner, Owner::local());
    forget(name).await;
}
