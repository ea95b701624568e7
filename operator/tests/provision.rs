//! Tenant provisioning against the real MariaDB and Redis servers of
//! `scripts/stack.sh` (dc-a: MariaDB + Redis a; dc-b: Redis b).

use thumbup_core::names;
use thumbup_operator::crd::DeletionPolicy;
use thumbup_operator::provision;
use thumbup_operator::resources::Credentials;
use thumbup_test_support::operator::{
    acl_user, db_as, db_user_exists, forget, keys_under, operator_config, owner_of, schema_exists, tenant,
};
use thumbup_test_support::stack::{admin_db, admin_redis_url, admin_redis_url_b};

async fn provision_all(name: &str) -> (thumbup_operator::crd::LikeTenant, Credentials) {
    let cfg = operator_config(None);
    let lt = tenant(name);
    let creds = Credentials::generate(name);
    let owner = owner_of(&lt);
    provision::admit(&lt, &owner, &cfg, cfg.active()).await.expect("admitted");
    provision::database(&lt, &owner, &creds, cfg.active()).await.expect("DB provisioned");
    provision::redis(&lt, &owner, &creds, &cfg).await.expect("Redis provisioned");
    (lt, creds)
}

/// Everything a provisioning run leaves behind that a second run could change.
async fn snapshot(name: &str) -> Vec<String> {
    let schema = names::schema_for(name);
    let mut con = admin_db().await;
    let mut out: Vec<String> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW GRANTS FOR '{}'@'%'", names::db_user(name))))
            .fetch_all(&mut con)
            .await
            .unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT CONCAT(TABLE_NAME, ':', CREATE_TIME) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? ORDER BY 1",
    )
    .bind(&schema)
    .fetch_all(&mut con)
    .await
    .unwrap();
    out.extend(tables);
    let migrations: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT CONCAT(version, ':', installed_on) FROM `{schema}`._sqlx_migrations"
    )))
    .fetch_all(&mut con)
    .await
    .unwrap();
    out.extend(migrations);
    for url in [admin_redis_url(), admin_redis_url_b()] {
        out.push(acl_user(&url, &names::redis_user(name)).await);
    }
    out
}

async fn tenant_redis(url: &str, name: &str, creds: &Credentials) -> redis::aio::MultiplexedConnection {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url).unwrap();
    let settings =
        info.redis_settings().clone().set_username(names::redis_user(name)).set_password(&creds.redis_password);
    info = info.set_redis_settings(settings);
    redis::Client::open(info).unwrap().get_multiplexed_async_connection().await.unwrap()
}

#[tokio::test]
async fn tenant_is_provisioned_from_nothing_and_a_second_run_changes_nothing() {
    let name = "prov-fresh";
    forget(name).await;
    assert!(!schema_exists("thumbup_prov_fresh").await);
    let (lt, creds) = provision_all(name).await;

    // From nothing: the schema with its tables, a DB user that can write in it,
    // and an ACL user on both datacenters' Redis that can write its keys.
    assert!(schema_exists("thumbup_prov_fresh").await);
    let mut con = db_as(&names::db_user(name), &creds.db_password, Some("thumbup_prov_fresh")).await.unwrap();
    sqlx::query("INSERT INTO like_counts (business_id, message_id, likes, dislikes, version) VALUES (1, 7, 3, 0, 1)")
        .execute(&mut con)
        .await
        .unwrap();
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = tenant_redis(&url, name, &creds).await;
        let _: () = redis::cmd("SET").arg("thumbup:prov-fresh:probe").arg("1").query_async(&mut r).await.unwrap();
    }

    let before = snapshot(name).await;
    let owner = owner_of(&lt);
    provision::admit(&lt, &owner, &operator_config(None), operator_config(None).active()).await.unwrap();
    provision::database(&lt, &owner, &creds, operator_config(None).active()).await.unwrap();
    provision::redis(&lt, &owner, &creds, &operator_config(None)).await.unwrap();
    let after = snapshot(name).await;
    assert_eq!(before, after, "a second provisioning run changed grants, tables, migrations or ACL rules");
    let likes: i64 =
        sqlx::query_scalar("SELECT likes FROM like_counts WHERE message_id = 7").fetch_one(&mut con).await.unwrap();
    assert_eq!(likes, 3, "a second run kept the data");
    forget(name).await;
}

#[tokio::test]
async fn tenant_credentials_are_refused_on_another_tenants_schema_and_keys() {
    forget("iso-a").await;
    forget("iso-b").await;
    let (_, a) = provision_all("iso-a").await;
    let (_, b) = provision_all("iso-b").await;

    let err = db_as(&names::db_user("iso-a"), &a.db_password, Some("thumbup_iso_b")).await.unwrap_err();
    let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("42000"), "access denied expected, got {err}");
    assert!(err.to_string().contains("denied"), "{err}");
    assert!(db_as(&names::db_user("iso-b"), &b.db_password, Some("thumbup_iso_b")).await.is_ok());

    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = tenant_redis(&url, "iso-a", &a).await;
        let own: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg("thumbup:iso-a:x").query_async(&mut r).await;
        assert!(own.is_ok(), "own prefix: {own:?}");
        for cmd in [vec!["GET", "thumbup:iso-b:x"], vec!["FLUSHALL"], vec!["KEYS", "*"], vec!["CONFIG", "GET", "*"]] {
            let res: redis::RedisResult<redis::Value> = redis::cmd(cmd[0]).arg(&cmd[1..]).query_async(&mut r).await;
            let e = res.expect_err("must be refused");
            assert!(e.to_string().to_uppercase().contains("NOPERM"), "{cmd:?} on {url}: {e}");
        }
    }
    forget("iso-a").await;
    forget("iso-b").await;
}

#[tokio::test]
async fn delete_policy_removes_schema_db_user_acl_users_and_every_key() {
    let name = "prov-del";
    forget(name).await;
    forget("prov-keep-other").await;
    let (mut lt, creds) = provision_all(name).await;
    let (_, other) = provision_all("prov-keep-other").await;
    // More keys than one SCAN/UNLINK batch, on both datacenters.
    for url in [admin_redis_url(), admin_redis_url_b()] {
        let mut r = tenant_redis(&url, name, &creds).await;
        let mut pipe = redis::pipe();
        for i in 0..1_200 {
            pipe.cmd("SET").arg(format!("thumbup:prov-del:k{i}")).arg(i).ignore();
        }
        let _: () = pipe.query_async(&mut r).await.unwrap();
        let mut o = tenant_redis(&url, "prov-keep-other", &other).await;
        let _: () = redis::cmd("SET").arg("thumbup:prov-keep-other:k").arg(1).query_async(&mut o).await.unwrap();
    }
    lt.spec.deletion_policy = DeletionPolicy::Delete;
    let cfg = operator_config(None);
    provision::teardown(&lt, &owner_of(&lt), &cfg, cfg.active()).await.unwrap();

    assert!(!schema_exists("thumbup_prov_del").await);
    assert!(!db_user_exists(&names::db_user(name)).await);
    for url in [admin_redis_url(), admin_redis_url_b()] {
        assert_eq!(acl_user(&url, &names::redis_user(name)).await, "", "ACL user left on {url}");
        assert!(keys_under(&url, "thumbup:prov-del:").await.is_empty(), "keys left on {url}");
        assert_eq!(keys_under(&url, "thumbup:prov-keep-other:").await.len(), 1, "another tenant's key was removed");
    }
    // Nothing left to remove: teardown converges.
    provision::teardown(&lt, &owner_of(&lt), &cfg, cfg.active()).await.unwrap();
    forget("prov-keep-other").await;
}

#[tokio::test]
async fn retain_policy_keeps_schema_and_keys_and_removes_the_acl_users() {
    let name = "prov-ret";
    forget(name).await;
    let (lt, creds) = provision_all(name).await;
    assert_eq!(lt.spec.deletion_policy, DeletionPolicy::Retain, "Retain is the default");
    let mut con = db_as(&names::db_user(name), &creds.db_password, Some("thumbup_prov_ret")).await.unwrap();
    sqlx::query("INSERT INTO like_counts (business_id, message_id, likes, dislikes, version) VALUES (1, 9, 5, 1, 1)")
        .execute(&mut con)
        .await
        .unwrap();
    let mut r = tenant_redis(&admin_redis_url(), name, &creds).await;
    let _: () = redis::cmd("SET").arg("thumbup:prov-ret:kept").arg("1").query_async(&mut r).await.unwrap();
    drop(r);

    let cfg = operator_config(None);
    provision::teardown(&lt, &owner_of(&lt), &cfg, cfg.active()).await.unwrap();

    assert!(schema_exists("thumbup_prov_ret").await);
    let mut admin = admin_db().await;
    let likes: i64 = sqlx::query_scalar("SELECT likes FROM thumbup_prov_ret.like_counts WHERE message_id = 9")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(likes, 5);
    assert_eq!(keys_under(&admin_redis_url(), "thumbup:prov-ret:").await, ["thumbup:prov-ret:kept"]);
    for url in [admin_redis_url(), admin_redis_url_b()] {
        assert_eq!(acl_user(&url, &names::redis_user(name)).await, "", "ACL user left on {url}");
    }
    // Released: a LikeTenant of the same name (a new uid) takes its data
    // back without adoptExisting; one of another namespace does not.
    let mut again = tenant(name);
    again.metadata.uid = Some("uid-prov-ret-2".into());
    provision::admit(&again, &owner_of(&again), &cfg, cfg.active()).await.expect("the same name takes it back");
    let mut elsewhere = tenant(name);
    elsewhere.metadata.namespace = Some("other".into());
    elsewhere.metadata.uid = Some("uid-prov-ret-3".into());
    let err = provision::admit(&elsewhere, &owner_of(&elsewhere), &cfg, cfg.active()).await.unwrap_err();
    assert_eq!(err.reason(), "NotOwned", "{err}");
    forget(name).await;
}

#[tokio::test]
async fn the_db_server_refuses_sessions_beyond_the_like_tenants_connection_cap() {
    let name = "ha-cap";
    forget(name).await;
    let cfg = operator_config(None);
    let mut lt = tenant(name);
    lt.spec.limits.max_db_connections = 4;
    let creds = Credentials::generate(name);
    let owner = owner_of(&lt);
    provision::admit(&lt, &owner, &cfg, cfg.active()).await.unwrap();
    provision::database(&lt, &owner, &creds, cfg.active()).await.unwrap();
    let user = names::db_user(name);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(db_as(&user, &creds.db_password, Some("thumbup_ha_cap")).await.expect("within the cap"));
    }
    let err = db_as(&user, &creds.db_password, Some("thumbup_ha_cap")).await.expect_err("a fifth session");
    let code = err.as_database_error().and_then(|e| e.code()).map(|c| c.to_string());
    assert!(err.to_string().contains("max_user_connections"), "{err} ({code:?})");
    drop(held);
    // A raised cap reaches the server on the next pass (ALTER USER).
    lt.spec.limits.max_db_connections = 5;
    provision::database(&lt, &owner, &creds, cfg.active()).await.unwrap();
    let mut con = admin_db().await;
    let cap: i64 = sqlx::query_scalar("SELECT max_user_connections FROM mysql.user WHERE User = ? AND Host = '%'")
        .bind(&user)
        .fetch_one(&mut con)
        .await
        .unwrap();
    assert_eq!(cap, 5);
    forget(name).await;
}

/// The end of the binlog: (file, position).
async fn binlog_end(con: &mut sqlx::MySqlConnection) -> (String, u64) {
    use sqlx::Row;
    let row = sqlx::query("SHOW MASTER STATUS").fetch_one(&mut *con).await.expect("the binlog is on");
    (row.try_get::<String, _>(0).unwrap(), row.try_get::<u64, _>(1).unwrap())
}

/// The `Info` of every binlog event between `from` and `to`.
async fn binlog_between(con: &mut sqlx::MySqlConnection, from: &(String, u64), to: &(String, u64)) -> Vec<String> {
    use sqlx::Row;
    let logs: Vec<String> = sqlx::query("SHOW BINARY LOGS")
        .fetch_all(&mut *con)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String, _>(0).unwrap())
        .filter(|f| *f >= from.0 && *f <= to.0)
        .collect();
    let mut out = Vec::new();
    for log in logs {
        let sql = if log == from.0 {
            format!("SHOW BINLOG EVENTS IN '{log}' FROM {}", from.1)
        } else {
            format!("SHOW BINLOG EVENTS IN '{log}'")
        };
        for row in sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(&mut *con).await.unwrap() {
            let end: u64 = row.try_get("End_log_pos").unwrap();
            if log == to.0 && end > to.1 {
                break;
            }
            out.push(row.try_get::<String, _>("Info").unwrap_or_default());
        }
    }
    out
}

#[tokio::test]
async fn an_idle_tenants_later_passes_write_no_account_or_ddl_statement_and_no_pass_logs_the_password() {
    let name = "prov-idle";
    forget(name).await;
    let (schema, user) = (names::schema_for(name), names::db_user(name));
    let mine = |info: &String| info.contains(&schema) || info.contains(&user);
    let mut con = admin_db().await;
    let start = binlog_end(&mut con).await;
    let (lt, creds) = provision_all(name).await;
    let first_end = binlog_end(&mut con).await;
    let first = binlog_between(&mut con, &start, &first_end).await;
    assert!(first.iter().any(|i| mine(i) && i.contains("CREATE USER")), "the first pass creates the user: {first:#?}");
    // No event of the first pass (of any session: the password is random)
    // carries the password in clear.
    let leaked: Vec<_> = first.iter().filter(|i| i.contains(&creds.db_password)).collect();
    assert!(leaked.is_empty(), "the binlog holds the tenant's password: {leaked:#?}");

    let cfg = operator_config(None);
    let owner = owner_of(&lt);
    for _ in 0..2 {
        provision::admit(&lt, &owner, &cfg, cfg.active()).await.unwrap();
        provision::database(&lt, &owner, &creds, cfg.active()).await.unwrap();
        provision::redis(&lt, &owner, &creds, &cfg).await.unwrap();
    }
    let end = binlog_end(&mut con).await;
    let later: Vec<_> = binlog_between(&mut con, &first_end, &end).await.into_iter().filter(mine).collect();
    println!(
        "binlog events of the tenant: first pass {}, second and third passes {}",
        first.iter().filter(|i| mine(i)).count(),
        later.len()
    );
    assert!(later.is_empty(), "the second and third passes wrote to the binlog: {later:#?}");
    forget(name).await;
}
