//! Tenant provisioning with admin credentials: the DB schema and a DB user
//! granted on it alone, and a Redis ACL user limited to the tenant prefix.
//! Isolation is enforced by these grants, not by convention.

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
    /// Redis refused a command.
    #[error("tenant {tenant}: provisioning the Redis ACL user: {source}")]
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

/// Creates (or updates) the tenant's schema and DB user, granted on that
/// schema only. `admin_url` is `mysql://user:password@host:port`.
pub async fn provision_db(admin_url: &str, t: &TenantConfig) -> Result<(), ProvisionError> {
    let name = &t.name;
    plain(name, "db.username", &t.db.username)?;
    plain(name, "db.password", &t.db.password)?;
    let db = |source| ProvisionError::Db { tenant: name.clone(), source };
    let mut con = MySqlConnectOptions::from_str(admin_url).map_err(db)?.connect().await.map_err(db)?;
    let (schema, user, pw) = (t.schema(), &t.db.username, &t.db.password);
    let statements = [
        format!("CREATE DATABASE IF NOT EXISTS `{schema}`"),
        format!("CREATE USER IF NOT EXISTS '{user}'@'%' IDENTIFIED BY '{pw}'"),
        format!("ALTER USER '{user}'@'%' IDENTIFIED BY '{pw}'"),
        format!("GRANT ALL PRIVILEGES ON `{schema}`.* TO '{user}'@'%'"),
    ];
    for s in statements {
        sqlx::raw_sql(sqlx::AssertSqlSafe(s)).execute(&mut con).await.map_err(db)?;
    }
    Ok(())
}

/// Creates (or resets) the tenant's Redis ACL user: its keys limited to
/// `thumbup:<tenant>:*`, no pub/sub channels, no admin or dangerous commands,
/// and saves the ACL file so the user survives a restart.
/// `admin_url` is `redis://user:password@host:port`.
pub async fn provision_redis(admin_url: &str, t: &TenantConfig) -> Result<(), ProvisionError> {
    let name = &t.name;
    plain(name, "redis.username", &t.redis.username)?;
    plain(name, "redis.password", &t.redis.password)?;
    let err = |source| ProvisionError::Redis { tenant: name.clone(), source };
    let client = redis::Client::open(admin_url).map_err(err)?;
    let mut con = client.get_multiplexed_async_connection().await.map_err(err)?;
    let pattern = format!("~{}*", Keys::new(name, 1).prefix());
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&t.redis.username)
        .arg("reset")
        .arg("on")
        .arg(format!(">{}", t.redis.password))
        .arg(pattern)
        .arg("resetchannels")
        .arg("+@all")
        .arg("-@admin")
        .arg("-@dangerous")
        .exec_async(&mut con)
        .await
        .map_err(err)?;
    redis::cmd("ACL").arg("SAVE").exec_async(&mut con).await.map_err(err)?;
    Ok(())
}
