//! Tenant provisioning with admin credentials: the DB schema and a DB user
//! granted on it alone, and a Redis ACL user limited to the tenant prefix and
//! to the commands that the service and job send. Isolation is enforced by
//! these grants, not by convention.
//!
//! Every function here converges: running it again with the same input
//! changes nothing, so the operator can call it on every reconcile. The
//! teardown functions ([`drop_db`], [`drop_redis_user`], [`delete_keys`])
//! succeed when there is nothing left to remove.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;

use crate::config::TenantConfig;
use crate::keys::Keys;

/// A provisioning step that failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A name or password cannot be used in an account statement.
    #[error("tenant {tenant}: {what} may hold only letters, digits, '_', '-' and '.'")]
    BadCredential {
        /// The tenant.
        tenant: String,
        /// Which value.
        what: &'static str,
    },
    /// The DB refused a statement.
    #[error("tenant {tenant}: provisioning the DB: {source}")]
    Db {
        /// The tenant.
        tenant: String,
        /// The DB error.
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("tenant {tenant}: migrating schema {schema}: {source}")]
    Migrate {
        /// The tenant.
        tenant: String,
        /// The schema.
        schema: String,
        /// The migration error.
        source: sqlx::migrate::MigrateError,
    },
    /// Redis refused a command.
    #[error("tenant {tenant}: provisioning Redis: {source}")]
    Redis {
        /// The tenant.
        tenant: String,
        /// The Redis error.
        source: redis::RedisError,
    },
}

fn plain(tenant: &str, what: &'static str, v: &str) -> Result<(), ProvisionError> {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        Ok(())
    } else {
        Err(ProvisionError::BadCredential { tenant: tenant.to_string(), what })
    }
}

/// A schema name goes into statements between backquotes: letters, digits
/// and `_` only.
fn plain_schema(tenant: &str, schema: &str) -> Result<(), ProvisionError> {
    if !schema.is_empty() && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(())
    } else {
        Err(ProvisionError::BadCredential { tenant: tenant.to_string(), what: "db.schema" })
    }
}

/// Creates (or updates) the tenant's schema and DB user, granted on that
/// schema only; with `db.tls` set the user is `REQUIRE SSL` (the server
/// refuses it a plaintext session), else `REQUIRE NONE`. `admin_url` is
/// `mysql://user:password@host:port`, TLS as sqlx's URL parameters
/// (`?ssl-mode=VERIFY_IDENTITY&ssl-ca=/etc/ca.crt`).
pub async fn provision_db(admin_url: &str, t: &TenantConfig) -> Result<(), ProvisionError> {
    let name = &t.name;
    plain(name, "db.username", &t.db.username)?;
    plain(name, "db.password", &t.db.password)?;
    let db = |source| ProvisionError::Db { tenant: name.clone(), source };
    let mut con = MySqlConnectOptions::from_str(admin_url).map_err(db)?.connect().await.map_err(db)?;
    let (schema, user, pw) = (t.schema(), &t.db.username, &t.db.password);
    plain_schema(name, &schema)?;
    let statements = [
        format!("CREATE DATABASE IF NOT EXISTS `{schema}`"),
        format!("CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{pw}'"),
        format!("ALTER USER '{user}'@'%' IDENTIFIED BY '{pw}'"),
        format!("GRANT ALL PRIVILEGES ON `{schema}`.* TO '{user}'@'%'"),
        format!("ALTER USER '{user}'@'%' REQUIRE {}", if t.db.tls.is_some() { "SSL" } else { "NONE" }),
    ];
    for s in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await.map_err(db)?;
    }
    Ok(())
}

/// The commands a tenant's Redis user may run: exactly what the service, the
/// job and the project's Redis functions send (a function's `redis.call` is
/// checked against the caller's rules too). Redis code runs only as FCALL of
/// the functions that provisioning loads ([`crate::functions`]): no EVAL,
/// EVALSHA, SCRIPT or FUNCTION, so a tenant cannot run its own Lua (an
/// endless loop would stall every tenant of the Redis) nor load, replace or
/// delete functions. Everything else, including KEYS, FLUSHALL, CONFIG, ACL
/// and the blocking list commands, is refused with NOPERM.
pub const TENANT_COMMANDS: &[&str] = &[
    // Connection set-up by the client library. (CLIENT SETINFO, which newer
    // clients send, exists only from Redis 7.2; its refusal is ignored by them.)
    "auth",
    "hello",
    "ping",
    "select",
    "client|setname",
    // Cached states, counts and liked lists.
    "get",
    "set",
    "del",
    "expire",
    "zadd",
    "zrem",
    "zremrangebyrank",
    "zmscore",
    "zrevrangebyscore",
    // The project's functions (FCALL_RO for those that only read), and
    // the Redis clock they read.
    "fcall",
    "fcall_ro",
    "time",
    // Event and downstream streams.
    "xadd",
    "xreadgroup",
    "xack",
    "xautoclaim",
    "xgroup|create",
    "xinfo|groups",
    // The job's applied watermark (the watermark function).
    "xinfo|stream",
    "xpending",
    "xtrim",
    "xlen",
];

/// The `ACL SETUSER` rules of a tenant user. They start with `reset`, so a
/// re-run replaces whatever rules the user had: provisioning converges.
pub fn acl_rules(tenant: &str, password: &str) -> Vec<String> {
    let mut rules = vec![
        "reset".to_string(),
        "on".to_string(),
        format!(">{password}"),
        format!("~{}*", Keys::new(tenant, 1).prefix()),
        "resetchannels".to_string(),
        "-@all".to_string(),
    ];
    rules.extend(TENANT_COMMANDS.iter().map(|c| format!("+{c}")));
    rules
}

/// How long an admin Redis command may take.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn redis_admin(admin_url: &str, tenant: &str) -> Result<redis::aio::MultiplexedConnection, ProvisionError> {
    let err = |source| ProvisionError::Redis { tenant: tenant.to_string(), source };
    let client = crate::cache::admin_client(admin_url).map_err(err)?;
    // Admin commands can take long on a busy server (ACL SAVE writes and
    // fsyncs the ACL file; UNLINK of many keys): not the client's default
    // 500 ms response timeout, which failed provisioning under load.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(ADMIN_TIMEOUT));
    client.get_multiplexed_async_connection_with_config(&config).await.map_err(err)
}

/// `ACL SAVE`, so users survive a restart. A Redis started without an ACL
/// file refuses it; users then live until restart, which is logged by the
/// caller, not an error: managed Redis services often persist ACLs their own way.
async fn acl_save(con: &mut redis::aio::MultiplexedConnection) -> Result<bool, redis::RedisError> {
    match redis::cmd("ACL").arg("SAVE").exec_async(con).await {
        Ok(()) => Ok(true),
        Err(e) if e.to_string().contains("ACL file") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Loads this build's Redis function library ([`crate::functions`]: the
/// only Redis code a tenant can run), then creates (or resets) the tenant's
/// Redis ACL user with [`acl_rules`], and saves the ACL file so the user
/// survives a restart. Returns false when the server has no ACL file to
/// save to. The library goes into the AOF / RDB with the data; other
/// versions of it stay loaded (pods of another release call those).
/// `admin_url` is `redis://user:password@host:port`, or `rediss://` with
/// the CA file as [`crate::cache::ADMIN_CA_PARAM`].
pub async fn provision_redis(admin_url: &str, t: &TenantConfig) -> Result<bool, ProvisionError> {
    let name = &t.name;
    plain(name, "redis.username", &t.redis.username)?;
    plain(name, "redis.password", &t.redis.password)?;
    let err = |source| ProvisionError::Redis { tenant: name.clone(), source };
    let mut con = redis_admin(admin_url, name).await?;
    crate::functions::load(&mut con).await.map_err(err)?;
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&t.redis.username)
        .arg(acl_rules(name, &t.redis.password))
        .exec_async(&mut con)
        .await
        .map_err(err)?;
    acl_save(&mut con).await.map_err(err)
}

/// Applies the schema migrations with the tenant's own credentials (so they
/// also prove the grant works).
pub async fn migrate(t: &TenantConfig) -> Result<(), ProvisionError> {
    let migrate_err = |source| ProvisionError::Migrate { tenant: t.name.clone(), schema: t.schema(), source };
    let pool = crate::db::connect_lazy(t).map_err(|source| ProvisionError::Db { tenant: t.name.clone(), source })?;
    let result = crate::db::migrate(&pool).await.map_err(migrate_err);
    pool.close().await;
    result
}

/// Drops the tenant's schema (and every record in it) and its DB user.
pub async fn drop_db(admin_url: &str, tenant: &str, schema: &str, user: &str) -> Result<(), ProvisionError> {
    plain(tenant, "db.username", user)?;
    plain_schema(tenant, schema)?;
    let db = |source| ProvisionError::Db { tenant: tenant.to_string(), source };
    let mut con = MySqlConnectOptions::from_str(admin_url).map_err(db)?.connect().await.map_err(db)?;
    for s in [format!("DROP DATABASE IF EXISTS `{schema}`"), format!("DROP USER IF EXISTS '{user}'@'%'")] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await.map_err(db)?;
    }
    Ok(())
}

/// Removes the tenant's Redis ACL user (and saves the ACL file). Its open
/// connections are closed by Redis at once.
pub async fn drop_redis_user(admin_url: &str, tenant: &str, user: &str) -> Result<(), ProvisionError> {
    plain(tenant, "redis.username", user)?;
    let err = |source| ProvisionError::Redis { tenant: tenant.to_string(), source };
    let mut con = redis_admin(admin_url, tenant).await?;
    redis::cmd("ACL").arg("DELUSER").arg(user).exec_async(&mut con).await.map_err(err)?;
    acl_save(&mut con).await.map_err(err)?;
    Ok(())
}

/// Keys unlinked per round trip when deleting a tenant's keys.
const DELETE_BATCH: usize = 500;

/// Deletes every key under the tenant prefix `thumbup:<tenant>:` with SCAN and
/// UNLINK in batches (never KEYS, which would block the server). Returns the
/// number of keys removed.
pub async fn delete_keys(admin_url: &str, tenant: &str) -> Result<u64, ProvisionError> {
    let err = |source| ProvisionError::Redis { tenant: tenant.to_string(), source };
    let mut con = redis_admin(admin_url, tenant).await?;
    let pattern = format!("{}*", Keys::new(tenant, 1).prefix());
    let mut cursor: u64 = 0;
    let mut removed = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(DELETE_BATCH)
            .query_async(&mut con)
            .await
            .map_err(err)?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut con).await.map_err(err)?;
            removed += n;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acl_rules_reset_first_and_allow_only_the_prefix_and_listed_commands() {
        let rules = acl_rules("alpha", "pw");
        assert_eq!(rules[0], "reset");
        assert!(rules.contains(&"~thumbup:alpha:*".to_string()));
        assert!(rules.contains(&"-@all".to_string()));
        let allowed: Vec<_> = rules.iter().filter(|r| r.starts_with('+')).collect();
        assert_eq!(allowed.len(), TENANT_COMMANDS.len());
        assert!(!rules.iter().any(|r| r.contains("flushall") || r.contains("keys") || r.starts_with("+@")));
    }

    #[test]
    fn tenants_may_call_the_project_functions_but_run_no_code_of_their_own() {
        for c in TENANT_COMMANDS {
            let cmd = c.split('|').next().unwrap_or(c);
            assert!(!["eval", "evalsha", "eval_ro", "evalsha_ro", "script", "function"].contains(&cmd), "{c}");
            assert!(!["blpop", "brpop", "blmove", "bzpopmin", "wait", "xread"].contains(&cmd), "{c} blocks");
        }
        assert!(TENANT_COMMANDS.contains(&"fcall") && TENANT_COMMANDS.contains(&"fcall_ro"));
    }

    #[test]
    fn names_that_could_break_out_of_a_statement_are_refused() {
        assert!(plain("t", "x", "ok_name-1.2").is_ok());
        for bad in ["", "a'b", "a`b", "a b", "a;b", "a\\b"] {
            assert!(plain("t", "x", bad).is_err(), "{bad:?}");
        }
    }
}
