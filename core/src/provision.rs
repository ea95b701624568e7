//! Tenant provisioning with admin credentials: the DB schema and a DB user
//! granted on it alone, and a Redis ACL user limited to the tenant prefix and
//! to the commands that the service and job send. Isolation is enforced by
//! these grants, not by convention.
//!
//! Every function here converges: running it again with the same input
//! changes nothing, so the operator can call it on every reconcile. The
//! teardown functions ([`drop_db`], [`drop_redis_user`], [`delete_keys`])
//! succeed when there is nothing left to remove.
//!
//! Account and schema names come from [`crate::names`] only. Who created
//! each account and schema is recorded where the servers keep it and no
//! tenant can write it: the table `owners` of the control schema
//! ([`names::CONTROL_SCHEMA`]) on the DB, and the hash [`names::CONTROL_KEY`]
//! on each Redis (outside every tenant's key pattern). Provisioning first
//! claims what it is about to create ([`claim_db`], [`claim_redis`]): an
//! account or schema that exists but was not recorded for this owner is
//! refused ([`ProvisionError::NotOwned`]) unless the caller adopts it, and
//! one recorded for a live LikeTenant is never handed to another. Teardown
//! removes only what the owner holds.

use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::mysql::MySqlConnectOptions;

use crate::config::TenantConfig;
use crate::conn::Conn;
use crate::names;
use redis::aio::ConnectionLike;

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
    /// The schema is a system schema or the control schema.
    #[error("tenant {tenant}: schema {schema} is reserved (a system or thumbup control schema); no tenant may use it")]
    ReservedSchema {
        /// The tenant.
        tenant: String,
        /// The schema asked for.
        schema: String,
    },
    /// The config names another account than the one derived from the tenant name.
    #[error("tenant {tenant}: {what} must be {derived} (derived from the tenant name), not {given}")]
    NotDerived {
        /// The tenant.
        tenant: String,
        /// Which value.
        what: &'static str,
        /// The name in the config.
        given: String,
        /// The name it must be.
        derived: String,
    },
    /// An account or schema exists that was not created for this owner.
    #[error("tenant {tenant}: {kind} {name} {why}")]
    NotOwned {
        /// The tenant.
        tenant: String,
        /// `schema`, `DB user` or `Redis user`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// Who holds it, or why it cannot be taken.
        why: String,
    },
    /// The ownership record changed while it was being claimed (another
    /// operator or `thumbup-service provision` at the same moment).
    #[error("tenant {tenant}: the ownership record of {kind} {name} changed while it was claimed")]
    ClaimContended {
        /// The tenant.
        tenant: String,
        /// `Redis user`.
        kind: &'static str,
        /// Its name.
        name: String,
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

/// Who created an account or schema, as recorded beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The thumbup installation (the operator config's `installation_id`),
    /// or `local` for `thumbup-service provision`.
    pub installation: String,
    /// What made it: `LikeTenant <namespace>/<name>` or `thumbup-service provision`.
    pub object: String,
    /// The LikeTenant's uid while it holds the resource; empty when nothing
    /// holds it (released by a LikeTenant deleted with Retain, or made by
    /// `thumbup-service provision`).
    pub uid: String,
}

impl Owner {
    /// The owner that `thumbup-service provision` records (the local stack).
    pub fn local() -> Owner {
        Owner { installation: "local".into(), object: "thumbup-service provision".into(), uid: String::new() }
    }

    /// `installation|uid|object`, as the Redis record holds it.
    fn encode(&self) -> String {
        format!("{}|{}|{}", self.installation, self.uid, self.object)
    }

    fn decode(s: &str) -> Owner {
        let mut parts = s.splitn(3, '|');
        let mut next = || parts.next().unwrap_or_default().to_string();
        Owner { installation: next(), uid: next(), object: next() }
    }

    /// This owner with nothing holding it any more (kept so that a LikeTenant
    /// of the same installation and name can take it back).
    fn released(&self) -> Owner {
        Owner { uid: String::new(), ..self.clone() }
    }
}

/// Whether a claim may take an existing account or schema that no live
/// LikeTenant holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Adopt {
    /// Only what does not exist yet, what this owner holds, and what it
    /// released itself (same installation and object).
    Never,
    /// Also what exists without a record, what `thumbup-service provision`
    /// made, and what another LikeTenant released. Never what a live
    /// LikeTenant holds.
    Unowned,
}

/// The decision of a claim on one resource: Ok(true) writes `me` as its
/// owner, Ok(false) leaves the record (already ours), Err says why not.
fn decide(record: Option<&Owner>, exists: bool, me: &Owner, adopt: Adopt) -> Result<bool, String> {
    match record {
        Some(r) if r == me => Ok(false),
        Some(r) if !r.uid.is_empty() => Err(format!(
            "belongs to {} (uid {}) of thumbup installation {:?}; it is never handed to another",
            r.object, r.uid, r.installation
        )),
        Some(r) if r.installation == me.installation && r.object == me.object => Ok(true),
        Some(_) if adopt == Adopt::Unowned => Ok(true),
        Some(r) => Err(format!(
            "was made by {} of thumbup installation {:?}; set spec.adoptExisting to take it over",
            r.object, r.installation
        )),
        None if !exists => Ok(true),
        None if adopt == Adopt::Unowned => Ok(true),
        None => Err("exists but thumbup has no record of creating it; set spec.adoptExisting to take it over".into()),
    }
}

fn plain_owner(tenant: &str, o: &Owner) -> Result<(), ProvisionError> {
    if [&o.installation, &o.uid, &o.object].iter().any(|v| v.contains('|') || v.len() > 256) {
        return Err(ProvisionError::BadCredential { tenant: tenant.to_string(), what: "owner" });
    }
    Ok(())
}

/// Refuses a reserved schema and names that cannot go into a statement.
fn tenant_schema(tenant: &str, schema: &str) -> Result<(), ProvisionError> {
    plain_schema(tenant, schema)?;
    if names::reserved_schema(schema) {
        return Err(ProvisionError::ReservedSchema { tenant: tenant.to_string(), schema: schema.to_string() });
    }
    Ok(())
}

async fn admin_db(admin_url: &str, tenant: &str) -> Result<sqlx::MySqlConnection, ProvisionError> {
    let db = |source| ProvisionError::Db { tenant: tenant.to_string(), source };
    MySqlConnectOptions::from_str(admin_url).map_err(db)?.connect().await.map_err(db)
}

async fn exec(con: &mut sqlx::MySqlConnection, tenant: &str, statement: String) -> Result<(), ProvisionError> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(statement))
        .execute(con)
        .await
        .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
    Ok(())
}

/// The control schema and its table; only admin accounts are granted on it
/// (tenant users are granted on their own schema alone). Created only when
/// missing: a `CREATE ... IF NOT EXISTS` of what exists is still written
/// to the binlog and replicated.
async fn control_table(con: &mut sqlx::MySqlConnection, tenant: &str) -> Result<(), ProvisionError> {
    let schema = names::CONTROL_SCHEMA;
    let n: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM information_schema.TABLES WHERE TABLE_SCHEMA = ? AND TABLE_NAME = 'owners'",
    )
    .bind(schema)
    .fetch_one(&mut *con)
    .await
    .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
    if n > 0 {
        return Ok(());
    }
    exec(con, tenant, format!("CREATE DATABASE IF NOT EXISTS `{schema}`")).await?;
    let table = format!(
        "CREATE TABLE IF NOT EXISTS `{schema}`.owners (
            kind VARCHAR(16) NOT NULL,
            name VARCHAR(80) NOT NULL,
            installation VARCHAR(256) NOT NULL,
            uid VARCHAR(256) NOT NULL,
            object VARCHAR(256) NOT NULL,
            PRIMARY KEY (kind, name))"
    );
    exec(con, tenant, table).await
}

/// Record kinds of the DB.
const SCHEMA: &str = "schema";
const DB_USER: &str = "db_user";

async fn db_record(
    con: &mut sqlx::MySqlConnection,
    tenant: &str,
    kind: &str,
    name: &str,
) -> Result<Option<Owner>, ProvisionError> {
    let sql = format!(
        "SELECT installation, uid, object FROM `{}`.owners WHERE kind = ? AND name = ? FOR UPDATE",
        names::CONTROL_SCHEMA
    );
    let row: Option<(String, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(kind)
        .bind(name)
        .fetch_optional(&mut *con)
        .await
        .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
    Ok(row.map(|(installation, uid, object)| Owner { installation, uid, object }))
}

async fn put_db_record(
    con: &mut sqlx::MySqlConnection,
    tenant: &str,
    kind: &str,
    name: &str,
    o: &Owner,
) -> Result<(), ProvisionError> {
    let sql = format!(
        "INSERT INTO `{}`.owners (kind, name, installation, uid, object) VALUES (?, ?, ?, ?, ?)
         ON DUPLICATE KEY UPDATE installation = VALUES(installation), uid = VALUES(uid), object = VALUES(object)",
        names::CONTROL_SCHEMA
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kind)
        .bind(name)
        .bind(&o.installation)
        .bind(&o.uid)
        .bind(&o.object)
        .execute(&mut *con)
        .await
        .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
    Ok(())
}

async fn db_exists(
    con: &mut sqlx::MySqlConnection,
    tenant: &str,
    kind: &str,
    name: &str,
) -> Result<bool, ProvisionError> {
    let sql = if kind == SCHEMA {
        "SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = ?"
    } else {
        "SELECT COUNT(*) FROM mysql.user WHERE User = ? AND Host = '%'"
    };
    let n: i64 = sqlx::query_scalar(sql)
        .bind(name)
        .fetch_one(&mut *con)
        .await
        .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
    Ok(n > 0)
}

fn kind_label(kind: &str) -> &'static str {
    if kind == SCHEMA { "schema" } else { "DB user" }
}

/// Claims the tenant's schema and DB user ([`names::db_user`]) for `owner`
/// in one transaction: both or neither. Refuses a reserved schema, and an
/// existing one that `owner` may not take (see [`Adopt`]); changes nothing
/// then.
pub async fn claim_db(
    admin_url: &str,
    tenant: &str,
    schema: &str,
    owner: &Owner,
    adopt: Adopt,
) -> Result<(), ProvisionError> {
    tenant_schema(tenant, schema)?;
    plain_owner(tenant, owner)?;
    let user = names::db_user(tenant);
    let mut con = admin_db(admin_url, tenant).await?;
    control_table(&mut con, tenant).await?;
    // Claims of different tenants at once can deadlock on the table's gap
    // locks; the DB aborts one, which is tried again.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match claim_db_once(&mut con, tenant, [(SCHEMA, schema), (DB_USER, user.as_str())], owner, adopt).await {
            Err(ProvisionError::Db { source, .. }) if attempt < 5 && crate::db::is_deadlock(&source) => {
                tokio::time::sleep(CLAIM_RETRY.delay(attempt - 1)).await;
            }
            result => return result,
        }
    }
}

/// The delays between tries of a claim that deadlocked.
const CLAIM_RETRY: crate::retry::Backoff =
    crate::retry::Backoff::new(std::time::Duration::from_millis(20), std::time::Duration::from_millis(160));

/// One transaction of [`claim_db`].
async fn claim_db_once(
    con: &mut sqlx::MySqlConnection,
    tenant: &str,
    resources: [(&str, &str); 2],
    owner: &Owner,
    adopt: Adopt,
) -> Result<(), ProvisionError> {
    exec(con, tenant, "BEGIN".into()).await?;
    let result = async {
        let mut writes = Vec::new();
        for (kind, name) in resources {
            let record = db_record(con, tenant, kind, name).await?;
            let exists = db_exists(con, tenant, kind, name).await?;
            match decide(record.as_ref(), exists, owner, adopt) {
                Ok(true) => writes.push((kind, name)),
                Ok(false) => {}
                Err(why) => {
                    let (kind, name) = (kind_label(kind), name.to_string());
                    return Err(ProvisionError::NotOwned { tenant: tenant.to_string(), kind, name, why });
                }
            }
        }
        for (kind, name) in writes {
            put_db_record(con, tenant, kind, name, owner).await?;
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    exec(con, tenant, end.into()).await?;
    result
}

/// Creates (or updates) the tenant's schema and DB user, granted on that
/// schema only, as the local stack's `thumbup-service provision`: recorded
/// for [`Owner::local`], adopting what no LikeTenant holds. With `db.tls`
/// set the user is `REQUIRE SSL` (the server refuses it a plaintext
/// session), else `REQUIRE NONE`. `admin_url` is
/// `mysql://user:password@host:port`, TLS as sqlx's URL parameters
/// (`?ssl-mode=VERIFY_IDENTITY&ssl-ca=/etc/ca.crt`).
pub async fn provision_db(admin_url: &str, t: &TenantConfig) -> Result<(), ProvisionError> {
    provision_db_as(admin_url, t, &Owner::local(), Adopt::Unowned, None).await
}

/// Claims ([`claim_db`]) then creates (or updates) the tenant's schema and
/// DB user, granted on that schema only, with at most
/// `max_user_connections` sessions at once (None: the server's default).
/// The user is [`names::db_user`]; a config naming another is refused.
pub async fn provision_db_as(
    admin_url: &str,
    t: &TenantConfig,
    owner: &Owner,
    adopt: Adopt,
    max_user_connections: Option<u32>,
) -> Result<(), ProvisionError> {
    let name = &t.name;
    let user = names::db_user(name);
    if t.db.username != user {
        let given = t.db.username.clone();
        return Err(ProvisionError::NotDerived { tenant: name.clone(), what: "db.username", given, derived: user });
    }
    plain(name, "db.username", &user)?;
    plain(name, "db.password", &t.db.password)?;
    let schema = t.schema();
    claim_db(admin_url, name, &schema, owner, adopt).await?;
    let mut con = admin_db(admin_url, name).await?;
    let want = DbAccount {
        auth: native_password_hash(&t.db.password),
        max_user_connections: max_user_connections.map(i64::from),
        ssl: t.db.tls.is_some(),
    };
    for s in db_statements(&mut con, name, &schema, &user, &want).await? {
        exec(&mut con, name, s).await?;
    }
    Ok(())
}

/// The `mysql_native_password` hash of `password`, as the server stores it
/// in `mysql.user.authentication_string`: `*` and the upper-case hex of
/// SHA1(SHA1(password)). Account statements carry this hash, never the
/// password, so neither the binlog nor a replica ever sees it in clear.
pub fn native_password_hash(password: &str) -> String {
    let inner = sha1_smol::Sha1::from(password.as_bytes()).digest().bytes();
    let outer = sha1_smol::Sha1::from(inner).digest().bytes();
    let hex: String = outer.iter().map(|b| format!("{b:02X}")).collect();
    format!("*{hex}")
}

/// What the tenant's DB user must be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DbAccount {
    /// The `mysql_native_password` hash ([`native_password_hash`]).
    auth: String,
    /// Its session cap; None leaves the server's as it is.
    max_user_connections: Option<i64>,
    /// `REQUIRE SSL` (else `REQUIRE NONE`).
    ssl: bool,
}

/// The account and DDL statements that bring the schema and the user to
/// `want`, after reading what the server holds: none when nothing differs,
/// so an idle tenant's passes write nothing to the binlog. The password
/// goes in as its hash, in the form the server takes: `IDENTIFIED BY
/// PASSWORD '*...'` on MariaDB, `IDENTIFIED WITH mysql_native_password AS
/// '*...'` on MySQL (whose 8.4 and later need the plugin enabled).
async fn db_statements(
    con: &mut sqlx::MySqlConnection,
    tenant: &str,
    schema: &str,
    user: &str,
    want: &DbAccount,
) -> Result<Vec<String>, ProvisionError> {
    let db = |source| ProvisionError::Db { tenant: tenant.to_string(), source };
    let mut out = Vec::new();
    if !db_exists(con, tenant, SCHEMA, schema).await? {
        out.push(format!("CREATE DATABASE IF NOT EXISTS `{schema}`"));
    }
    let version: String = sqlx::query_scalar("SELECT VERSION()").fetch_one(&mut *con).await.map_err(db)?;
    let identified = if version.to_ascii_lowercase().contains("mariadb") {
        format!("IDENTIFIED BY PASSWORD '{}'", want.auth)
    } else {
        format!("IDENTIFIED WITH mysql_native_password AS '{}'", want.auth)
    };
    let require = if want.ssl { "SSL" } else { "NONE" };
    let cap = want.max_user_connections.map(|n| format!(" WITH MAX_USER_CONNECTIONS {n}")).unwrap_or_default();
    let row: Option<(String, String, String, i64)> = sqlx::query_as(
        "SELECT CONVERT(plugin USING utf8mb4), CONVERT(authentication_string USING utf8mb4), \
         CONVERT(ssl_type USING utf8mb4), CAST(max_user_connections AS SIGNED) \
         FROM mysql.user WHERE User = ? AND Host = '%'",
    )
    .bind(user)
    .fetch_optional(&mut *con)
    .await
    .map_err(db)?;
    match row {
        None => out.push(format!("CREATE USER '{user}'@'%' {identified} REQUIRE {require}{cap}")),
        Some((plugin, auth, ssl_type, max)) => {
            let auth_ok = (plugin.is_empty() || plugin == "mysql_native_password") && auth == want.auth;
            // REQUIRE SSL is ssl_type ANY; REQUIRE NONE is ''.
            let ssl_ok = if want.ssl { ssl_type == "ANY" } else { ssl_type.is_empty() };
            let cap_ok = want.max_user_connections.is_none_or(|n| n == max);
            if !(auth_ok && ssl_ok && cap_ok) {
                out.push(format!("ALTER USER '{user}'@'%' {identified} REQUIRE {require}{cap}"));
            }
        }
    }
    let granted = if out.iter().any(|s| s.starts_with("CREATE USER")) {
        false
    } else {
        let grants: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW GRANTS FOR '{user}'@'%'")))
            .fetch_all(&mut *con)
            .await
            .map_err(db)?;
        let line = format!("GRANT ALL PRIVILEGES ON `{schema}`.* TO ");
        grants.iter().any(|g| g.starts_with(&line))
    };
    if !granted {
        out.push(format!("GRANT ALL PRIVILEGES ON `{schema}`.* TO '{user}'@'%'"));
    }
    Ok(out)
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
    // Redis Cluster: the client reads the slot map, and follows an ASK
    // redirection (a slot being migrated) with ASKING.
    "cluster|slots",
    "asking",
    // Cached counts, and the users' caches (states and liked lists).
    "get",
    "mget",
    "set",
    "del",
    "expire",
    "zadd",
    "zrem",
    "zcard",
    "zscore",
    "zmscore",
    "zrangebyscore",
    "zrevrangebyscore",
    // The project's functions (FCALL_RO for those that only read), and
    // the Redis clock they read.
    "fcall",
    "fcall_ro",
    "time",
    // A transition waits for its replicas (redis.replica_acks) on the
    // connection that wrote it; WAIT touches no key.
    "wait",
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

/// The hex SHA-256 of `password`: the form in which Redis keeps a user's
/// password (`ACL GETUSER`) and in which [`acl_rules`] sets it (`#<hash>`),
/// so the password itself is never sent in an ACL command.
pub fn redis_password_hash(password: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(password.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// The `ACL SETUSER` rules of a tenant user. They start with `reset`, so a
/// re-run replaces whatever rules the user had: provisioning converges. The
/// password goes in as its hash (`#<sha256>`).
pub fn acl_rules(tenant: &str, password: &str) -> Vec<String> {
    let mut rules = vec![
        "reset".to_string(),
        "on".to_string(),
        format!("#{}", redis_password_hash(password)),
        format!("~{}", names::key_pattern(tenant)),
        "resetchannels".to_string(),
        "-@all".to_string(),
    ];
    rules.extend(TENANT_COMMANDS.iter().map(|c| format!("+{c}")));
    rules
}

/// How long an admin Redis command may take.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn redis_admin(admin_url: &str, tenant: &str) -> Result<Conn, ProvisionError> {
    // Admin commands can take long on a busy server (ACL SAVE writes and
    // fsyncs the ACL file; UNLINK of many keys): not the client's default
    // 500 ms response timeout, which failed provisioning under load.
    crate::cache::admin_connect(admin_url, ADMIN_TIMEOUT)
        .await
        .map_err(|source| ProvisionError::Redis { tenant: tenant.to_string(), source })
}

/// `ACL SAVE`, so users survive a restart. A Redis started without an ACL
/// file refuses it; users then live until restart, which is logged by the
/// caller, not an error: managed Redis services often persist ACLs their own way.
async fn acl_save<C: ConnectionLike + Send>(con: &mut C) -> Result<bool, redis::RedisError> {
    match redis::cmd("ACL").arg("SAVE").exec_async(con).await {
        Ok(()) => Ok(true),
        Err(e) if e.to_string().contains("ACL file") => Ok(false),
        Err(e) => Err(e),
    }
}

/// Compare-and-set of one field of the ownership hash: sets `ARGV[3]` when
/// the field holds `ARGV[2]` ('' for absent). One key: Cluster safe.
const CLAIM_LUA: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur == false and ARGV[2] == '') or cur == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
";

async fn redis_record(con: &mut Conn, user: &str) -> Result<Option<String>, redis::RedisError> {
    redis::cmd("HGET").arg(names::CONTROL_KEY).arg(user).query_async(con).await
}

/// Claims the tenant's Redis ACL user ([`names::redis_user`]) for `owner`,
/// recorded in [`names::CONTROL_KEY`]. Refuses an existing user that
/// `owner` may not take (see [`Adopt`]); changes nothing then.
pub async fn claim_redis(admin_url: &str, tenant: &str, owner: &Owner, adopt: Adopt) -> Result<(), ProvisionError> {
    plain_owner(tenant, owner)?;
    let user = names::redis_user(tenant);
    let err = |source| ProvisionError::Redis { tenant: tenant.to_string(), source };
    let mut con = redis_admin(admin_url, tenant).await?;
    let current = redis_record(&mut con, &user).await.map_err(err)?;
    let record = current.as_deref().map(Owner::decode);
    let acl: redis::Value = redis::cmd("ACL").arg("GETUSER").arg(&user).query_async(&mut con).await.map_err(err)?;
    let exists = !matches!(acl, redis::Value::Nil);
    match decide(record.as_ref(), exists, owner, adopt) {
        Ok(false) => Ok(()),
        Ok(true) => {
            let set: i64 = redis::Script::new(CLAIM_LUA)
                .key(names::CONTROL_KEY)
                .arg(&user)
                .arg(current.unwrap_or_default())
                .arg(owner.encode())
                .invoke_async(&mut con)
                .await
                .map_err(err)?;
            if set == 1 {
                Ok(())
            } else {
                Err(ProvisionError::ClaimContended { tenant: tenant.to_string(), kind: "Redis user", name: user })
            }
        }
        Err(why) => Err(ProvisionError::NotOwned { tenant: tenant.to_string(), kind: "Redis user", name: user, why }),
    }
}

/// Creates (or resets) the tenant's Redis ACL user as the local stack's
/// `thumbup-service provision` (recorded for [`Owner::local`]); see
/// [`provision_redis_as`]. `admin_url` is `redis://user:password@host:port`,
/// or `rediss://` with the CA file as [`crate::cache::ADMIN_CA_PARAM`].
pub async fn provision_redis(admin_url: &str, t: &TenantConfig) -> Result<bool, ProvisionError> {
    provision_redis_as(admin_url, t, &Owner::local(), Adopt::Unowned).await
}

/// Claims ([`claim_redis`]), loads this build's Redis function library
/// ([`crate::functions`]: the only Redis code a tenant can run), then
/// creates (or resets) the tenant's Redis ACL user with [`acl_rules`], and
/// saves the ACL file so the user survives a restart. Returns false when
/// the server has no ACL file to save to. The library goes into the AOF /
/// RDB with the data; other versions of it stay loaded (pods of another
/// release call those). The user is [`names::redis_user`]; a config naming
/// another is refused.
pub async fn provision_redis_as(
    admin_url: &str,
    t: &TenantConfig,
    owner: &Owner,
    adopt: Adopt,
) -> Result<bool, ProvisionError> {
    let name = &t.name;
    let user = names::redis_user(name);
    if t.redis.username != user {
        let given = t.redis.username.clone();
        return Err(ProvisionError::NotDerived { tenant: name.clone(), what: "redis.username", given, derived: user });
    }
    plain(name, "redis.username", &user)?;
    plain(name, "redis.password", &t.redis.password)?;
    claim_redis(admin_url, name, owner, adopt).await?;
    let err = |source| ProvisionError::Redis { tenant: name.clone(), source };
    let mut con = redis_admin(admin_url, name).await?;
    // In a cluster FUNCTION LOAD goes to every master (replicas get it by
    // replication) and converges: a master added since holds it then too.
    if con.is_cluster() || !library_loaded(&mut con).await.map_err(err)? {
        crate::functions::load(&mut con).await.map_err(err)?;
    }
    // ACL users are not replicated: in a cluster each node, replicas too (a
    // replica promoted by a failover must know the user), gets its own,
    // over a connection of its own (the cluster client keeps connections
    // only to the nodes of its slot map).
    let nodes = con.nodes().await.map_err(err)?;
    if nodes.is_empty() {
        return set_acl_user(&mut con, name, &t.redis.password).await.map_err(err);
    }
    let mut saved = true;
    for (host, port) in &nodes {
        let mut node = crate::cache::admin_node_connect(admin_url, host, *port, ADMIN_TIMEOUT).await.map_err(err)?;
        saved &= set_acl_user(&mut node, name, &t.redis.password).await.map_err(err)?;
    }
    Ok(saved)
}

/// Creates or resets the tenant's ACL user on one server unless it is
/// already exactly what [`acl_rules`] make, and saves the ACL file (false:
/// the server has none).
async fn set_acl_user<C: ConnectionLike + Send>(
    con: &mut C,
    tenant: &str,
    password: &str,
) -> Result<bool, redis::RedisError> {
    let user = names::redis_user(tenant);
    let current: redis::Value = redis::cmd("ACL").arg("GETUSER").arg(&user).query_async(con).await?;
    if acl_user_matches(&current, tenant, password) {
        // Nothing to change (and nothing to save): the ACL file holds it.
        return Ok(true);
    }
    redis::cmd("ACL").arg("SETUSER").arg(&user).arg(acl_rules(tenant, password)).exec_async(con).await?;
    acl_save(con).await
}

/// Whether this build's function library is loaded. Its name carries the
/// hash of its source, so a library of that name is this source.
async fn library_loaded(con: &mut Conn) -> Result<bool, redis::RedisError> {
    let name = crate::functions::library().name();
    let list: redis::Value = redis::cmd("FUNCTION").arg("LIST").arg("LIBRARYNAME").arg(&name).query_async(con).await?;
    let redis::Value::Array(libraries) = list else { return Ok(false) };
    Ok(libraries
        .iter()
        .any(|lib| fields(lib).iter().any(|(k, v)| k == "library_name" && text(v).as_deref() == Some(name.as_str()))))
}

/// The (field, value) pairs of a reply that RESP2 sends as a flat array
/// and RESP3 as a map.
fn fields(v: &redis::Value) -> Vec<(String, redis::Value)> {
    match v {
        redis::Value::Map(pairs) => pairs.iter().filter_map(|(k, v)| Some((text(k)?, v.clone()))).collect(),
        redis::Value::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => Some((text(k)?, v.clone())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn text(v: &redis::Value) -> Option<String> {
    match v {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) | redis::Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

fn texts(v: &redis::Value) -> Vec<String> {
    match v {
        redis::Value::Array(items) | redis::Value::Set(items) => items.iter().filter_map(text).collect(),
        other => text(other).into_iter().collect(),
    }
}

/// Whether an `ACL GETUSER` reply is exactly the user [`acl_rules`] makes:
/// on, this one password, the tenant's key pattern, no channels, no
/// selectors, and the listed commands alone (compared as a set: Redis
/// reorders them).
fn acl_user_matches(reply: &redis::Value, tenant: &str, password: &str) -> bool {
    if matches!(reply, redis::Value::Nil) {
        return false;
    }
    let f = fields(reply);
    let get = |name: &str| f.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let flags = get("flags").map(|v| texts(&v)).unwrap_or_default();
    let passwords = get("passwords").map(|v| texts(&v)).unwrap_or_default();
    let words = |name: &str| -> std::collections::BTreeSet<String> {
        get(name).map(|v| texts(&v).join(" ")).unwrap_or_default().split_whitespace().map(str::to_string).collect()
    };
    let want_commands: std::collections::BTreeSet<String> =
        std::iter::once("-@all".to_string()).chain(TENANT_COMMANDS.iter().map(|c| format!("+{c}"))).collect();
    let want_keys: std::collections::BTreeSet<String> = [format!("~{}", names::key_pattern(tenant))].into();
    let selectors_empty = get("selectors").is_none_or(|v| matches!(&v, redis::Value::Array(a) if a.is_empty()));
    flags.iter().any(|x| x == "on")
        && !flags.iter().any(|x| x == "nopass" || x == "allkeys" || x == "allchannels")
        && passwords == [redis_password_hash(password)]
        && words("commands") == want_commands
        && words("keys") == want_keys
        && words("channels").is_empty()
        && selectors_empty
}

/// Applies the schema migrations with the tenant's own credentials (so they
/// also prove the grant works). When the schema already records every
/// migration of this build as applied, with the same checksum, nothing is
/// sent but that read: the migrator's own `CREATE TABLE IF NOT EXISTS` of
/// its table would be written to the binlog on every pass.
pub async fn migrate(t: &TenantConfig) -> Result<(), ProvisionError> {
    let migrate_err = |source| ProvisionError::Migrate { tenant: t.name.clone(), schema: t.schema(), source };
    let pool = crate::db::connect_lazy(t).map_err(|source| ProvisionError::Db { tenant: t.name.clone(), source })?;
    let result = if migrated(&pool).await { Ok(()) } else { crate::db::migrate(&pool).await.map_err(migrate_err) };
    pool.close().await;
    result
}

/// Whether every migration of this build is recorded as applied (any error,
/// a missing table among them, says no: the migrator then runs).
async fn migrated(pool: &sqlx::MySqlPool) -> bool {
    let Ok(rows) = sqlx::query_as::<_, (i64, Vec<u8>)>("SELECT version, checksum FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
    else {
        return false;
    };
    crate::db::MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .all(|m| rows.iter().any(|(v, sum)| *v == m.version && sum.as_slice() == &*m.checksum))
}

/// Drops the tenant's schema (and every record in it) and its DB user,
/// each only when `owner` holds it, with its ownership record. Returns
/// whether each was `owner`'s (schema, user); what is not is left alone.
pub async fn drop_db(
    admin_url: &str,
    tenant: &str,
    schema: &str,
    owner: &Owner,
) -> Result<(bool, bool), ProvisionError> {
    plain_schema(tenant, schema)?;
    let user = names::db_user(tenant);
    let mut con = admin_db(admin_url, tenant).await?;
    control_table(&mut con, tenant).await?;
    let mut dropped = [false, false];
    for (i, (kind, name)) in [(SCHEMA, schema), (DB_USER, user.as_str())].into_iter().enumerate() {
        exec(&mut con, tenant, "BEGIN".into()).await?;
        if db_record(&mut con, tenant, kind, name).await?.as_ref() != Some(owner) {
            exec(&mut con, tenant, "ROLLBACK".into()).await?;
            continue;
        }
        let sql = format!("DELETE FROM `{}`.owners WHERE kind = ? AND name = ?", names::CONTROL_SCHEMA);
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(kind)
            .bind(name)
            .execute(&mut con)
            .await
            .map_err(|source| ProvisionError::Db { tenant: tenant.to_string(), source })?;
        exec(&mut con, tenant, "COMMIT".into()).await?;
        // DDL commits on its own: after the record is gone.
        let statement = if kind == SCHEMA {
            format!("DROP DATABASE IF EXISTS `{name}`")
        } else {
            format!("DROP USER IF EXISTS '{name}'@'%'")
        };
        exec(&mut con, tenant, statement).await?;
        dropped[i] = true;
    }
    Ok((dropped[0], dropped[1]))
}

/// Marks the tenant's schema and DB user as held by nothing (a LikeTenant
/// deleted with Retain): a LikeTenant of the same installation and name
/// takes them back; any other needs `adoptExisting`. Only what `owner` holds.
pub async fn release_db(admin_url: &str, tenant: &str, schema: &str, owner: &Owner) -> Result<(), ProvisionError> {
    plain_schema(tenant, schema)?;
    let user = names::db_user(tenant);
    let mut con = admin_db(admin_url, tenant).await?;
    control_table(&mut con, tenant).await?;
    for (kind, name) in [(SCHEMA, schema), (DB_USER, user.as_str())] {
        exec(&mut con, tenant, "BEGIN".into()).await?;
        if db_record(&mut con, tenant, kind, name).await?.as_ref() == Some(owner) {
            put_db_record(&mut con, tenant, kind, name, &owner.released()).await?;
        }
        exec(&mut con, tenant, "COMMIT".into()).await?;
    }
    Ok(())
}

/// Removes the tenant's Redis ACL user (and saves the ACL file) when
/// `owner` holds it, with its record; its open connections are closed by
/// Redis at once. Returns whether it was `owner`'s; another's is left alone.
pub async fn drop_redis_user(admin_url: &str, tenant: &str, owner: &Owner) -> Result<bool, ProvisionError> {
    let user = names::redis_user(tenant);
    let err = |source| ProvisionError::Redis { tenant: tenant.to_string(), source };
    let mut con = redis_admin(admin_url, tenant).await?;
    let record = redis_record(&mut con, &user).await.map_err(err)?;
    if record.as_deref().map(Owner::decode).as_ref() != Some(owner) {
        return Ok(false);
    }
    // Every node of a cluster has its own copy of the user.
    let nodes = con.nodes().await.map_err(err)?;
    if nodes.is_empty() {
        redis::cmd("ACL").arg("DELUSER").arg(&user).exec_async(&mut con).await.map_err(err)?;
        acl_save(&mut con).await.map_err(err)?;
    }
    for (host, port) in &nodes {
        let mut node = crate::cache::admin_node_connect(admin_url, host, *port, ADMIN_TIMEOUT).await.map_err(err)?;
        redis::cmd("ACL").arg("DELUSER").arg(&user).exec_async(&mut node).await.map_err(err)?;
        acl_save(&mut node).await.map_err(err)?;
    }
    redis::cmd("HDEL").arg(names::CONTROL_KEY).arg(&user).exec_async(&mut con).await.map_err(err)?;
    Ok(true)
}

/// Keys unlinked per round trip when deleting a tenant's keys.
const DELETE_BATCH: usize = 500;

/// Deletes every key under the tenant prefix `thumbup:<tenant>:` with SCAN and
/// UNLINK in batches (never KEYS, which would block the server). Returns the
/// number of keys removed.
///
/// In a cluster every master is scanned (each holds its slots' keys).
pub async fn delete_keys(admin_url: &str, tenant: &str) -> Result<u64, ProvisionError> {
    let mut con = redis_admin(admin_url, tenant).await?;
    crate::cache::unlink_matching(&mut con, &names::key_pattern(tenant), DELETE_BATCH)
        .await
        .map_err(|source| ProvisionError::Redis { tenant: tenant.to_string(), source })
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
    fn the_native_password_hash_is_the_servers() {
        // SELECT PASSWORD('password') on MariaDB and MySQL 5.7.
        assert_eq!(native_password_hash("password"), "*2470C0C06DEE42FD1618BB99005ADCA2EC9D1E19");
    }

    #[test]
    fn acl_rules_carry_the_password_hash_never_the_password() {
        let rules = acl_rules("alpha", "s3cret");
        assert!(rules.contains(&format!("#{}", redis_password_hash("s3cret"))));
        assert!(!rules.iter().any(|r| r.contains("s3cret")));
    }

    fn bulk(s: &str) -> redis::Value {
        redis::Value::BulkString(s.as_bytes().to_vec())
    }

    /// An `ACL GETUSER` reply (RESP2) of the user `acl_rules` makes, with
    /// the commands in another order, as Redis 7 answers.
    fn getuser(passwords: &[&str], commands: &str) -> redis::Value {
        redis::Value::Array(vec![
            bulk("flags"),
            redis::Value::Array(vec![bulk("on"), bulk("sanitize-payload")]),
            bulk("passwords"),
            redis::Value::Array(passwords.iter().map(|p| bulk(&redis_password_hash(p))).collect()),
            bulk("commands"),
            bulk(commands),
            bulk("keys"),
            bulk("~thumbup:alpha:*"),
            bulk("channels"),
            bulk(""),
            bulk("selectors"),
            redis::Value::Array(vec![]),
        ])
    }

    #[test]
    fn an_acl_user_matches_only_when_it_is_exactly_what_the_rules_make() {
        let mut commands: Vec<String> = TENANT_COMMANDS.iter().map(|c| format!("+{c}")).collect();
        commands.reverse();
        let commands = format!("-@all {}", commands.join(" "));
        assert!(acl_user_matches(&getuser(&["pw"], &commands), "alpha", "pw"));
        assert!(!acl_user_matches(&getuser(&["other"], &commands), "alpha", "pw"), "another password");
        assert!(!acl_user_matches(&getuser(&["pw", "x"], &commands), "alpha", "pw"), "a second password");
        assert!(!acl_user_matches(&getuser(&["pw"], &format!("{commands} +keys")), "alpha", "pw"), "an extra command");
        assert!(!acl_user_matches(&getuser(&["pw"], &commands), "beta", "pw"), "another key pattern");
        assert!(!acl_user_matches(&redis::Value::Nil, "alpha", "pw"), "no user");
    }

    fn lt(uid: &str) -> Owner {
        Owner { installation: "prod".into(), object: "LikeTenant team/demo".into(), uid: uid.into() }
    }

    #[test]
    fn a_claim_takes_what_is_new_ours_or_released_by_us_and_refuses_the_rest() {
        let me = lt("u1");
        let other_lt = Owner { object: "LikeTenant other/demo".into(), ..lt("u2") };
        let other_install = Owner { installation: "staging".into(), ..lt("u1") };
        for adopt in [Adopt::Never, Adopt::Unowned] {
            assert_eq!(decide(None, false, &me, adopt), Ok(true), "new");
            assert_eq!(decide(Some(&me), true, &me, adopt), Ok(false), "ours");
            assert_eq!(decide(Some(&me.released()), true, &me, adopt), Ok(true), "released by us");
            assert_eq!(decide(Some(&lt("u0").released()), true, &me, adopt), Ok(true), "released by our name");
            // A live holder is never adopted, whatever the LikeTenant asks.
            for held in [&other_lt, &other_install, &lt("u0")] {
                let why = decide(Some(held), true, &me, adopt).unwrap_err();
                assert!(why.contains("never handed"), "{why}");
            }
        }
        // Unrecorded, made by `thumbup-service provision`, released by
        // another: only when asked.
        for (record, exists) in [(None, true), (Some(Owner::local()), true), (Some(other_lt.released()), true)] {
            let why = decide(record.as_ref(), exists, &me, Adopt::Never).unwrap_err();
            assert!(why.contains("adoptExisting"), "{why}");
            assert_eq!(decide(record.as_ref(), exists, &me, Adopt::Unowned), Ok(true));
        }
        assert_eq!(decide(Some(&Owner::local()), true, &Owner::local(), Adopt::Unowned), Ok(false));
    }

    #[test]
    fn owner_records_round_trip() {
        for o in [lt("u1"), Owner::local(), lt("")] {
            assert_eq!(Owner::decode(&o.encode()), o);
        }
    }

    #[test]
    fn tenants_may_call_the_project_functions_but_run_no_code_of_their_own() {
        for c in TENANT_COMMANDS {
            let cmd = c.split('|').next().unwrap_or(c);
            assert!(!["eval", "evalsha", "eval_ro", "evalsha_ro", "script", "function"].contains(&cmd), "{c}");
            // WAIT (redis.replica_acks) is the one blocking command allowed:
            // it holds only the caller's own connection, for the caller's
            // own timeout, and touches no key.
            assert!(!["blpop", "brpop", "blmove", "bzpopmin", "xread"].contains(&cmd), "{c} blocks");
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
