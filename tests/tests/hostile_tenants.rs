//! Hostile tenants against the real MariaDB and Redis of `scripts/stack.sh`:
//! one table row per attempt that a tenant makes with its own credentials
//! (its Redis ACL user, its DB user), each of which the server owning the
//! resource must refuse, with a snapshot of everything the attempt could
//! touch taken before and after it and compared.
//!
//! The table is data: a row names the attempt ([`Attempt`]) and who must
//! refuse it ([`Refuser`]). A new kind of attempt (for example a gRPC call
//! with a forged page token) is a new [`Attempt`] variant with its arm in
//! [`Hostile::attempt`], a [`Refuser`] if no existing one fits, and rows in
//! [`rows`]; the runner, the snapshots and the report stay as they are.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sqlx::{ConnectOptions, MySqlConnection, Row as _};
use thumbup_core::cache::Conn;
use thumbup_core::cache::{self, Scripts, Seed, Transition, TransitionArgs};
use thumbup_core::config::{Config, TenantConfig};
use thumbup_core::domain::{Action, State};
use thumbup_core::keys::{JOB_GROUP, Keys};
use thumbup_e2e::*;
use thumbup_test_support::stack::{admin_db_url, admin_redis};

const BIZ: i64 = 1;
const ATTACKER: &str = "hb-attacker";
const VICTIM: &str = "hb-victim";
/// A library that a hostile tenant tries to load (and the test removes, in
/// case a broken ACL let it in).
const HOSTILE_LIBRARY: &str = "hb_hostile";
/// Lua that never returns: run on the shared Redis it would stall every
/// tenant until an admin kills it.
const ENDLESS: &str = "while true do end";
/// A harmless script with the same command: sent first, so the endless loop
/// is sent only to a server that refuses scripts (see [`Attempt::Guarded`]).
const HARMLESS: &str = "return 1";

/// The project's Redis library of this build: its name and its function
/// names (transition, set-if-newer, watermark).
fn project_functions() -> (String, [String; 5]) {
    use thumbup_core::functions::{Function, library};
    let lib = library();
    (lib.name(), Function::ALL.map(|f| lib.function(f)))
}

/// Loads this build's library again with the admin account.
async fn restore_project_library(r: &mut thumbup_core::cache::Conn) {
    thumbup_core::functions::load(r).await.expect("load the project's library");
}

/// The server that must refuse an attempt, and how its refusal looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refuser {
    /// The Redis ACL: NOPERM for the command or a key (or, for a key that a
    /// function's `redis.call` reaches, Redis's "can't access" error).
    RedisAcl,
    /// The DB's grants: an access-denied error.
    DbGrants,
    /// The DB's grants hide it: the query succeeds and returns no row.
    DbHidden,
}

/// What a hostile tenant tries, with its own credentials.
enum Attempt {
    /// A command with the tenant's Redis ACL user.
    Redis(redis::Cmd),
    /// `probe` with the tenant's Redis user, then, only if the ACL refused
    /// it, `attempt`. For attempts that would stall the
    /// shared Redis if they ran: a broken ACL fails the row without sending
    /// them.
    Guarded { probe: redis::Cmd, attempt: redis::Cmd },
    /// A statement with the tenant's DB user, connected to its own schema.
    Sql(String),
}

/// One row of the table.
struct Row {
    /// What the tenant tries, in words.
    what: &'static str,
    attempt: Attempt,
    refused_by: Refuser,
}

fn row(what: &'static str, refused_by: Refuser, attempt: Attempt) -> Row {
    Row { what, attempt, refused_by }
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

fn redis_row(what: &'static str, args: &[&str]) -> Row {
    row(what, Refuser::RedisAcl, Attempt::Redis(cmd(args)))
}

fn sql_row(what: &'static str, sql: String) -> Row {
    row(what, Refuser::DbGrants, Attempt::Sql(sql))
}

/// The table: every attempt the attacker makes. `a` and `v` are the
/// attacker's and the victim's configs.
fn rows(a: &TenantConfig, v: &TenantConfig) -> Vec<Row> {
    use Refuser::*;
    let (ka, kv) = (keys(a), keys(v));
    // A user's states and liked list are one key: the user's cache.
    let (own_list, own_stream, own_newest) = (ka.user(1, BIZ), ka.stream_of(1), ka.newest(ka.shard_of(1), BIZ));
    let v_newest = kv.newest(kv.shard_of(1), BIZ);
    let (v_state, v_list, v_stream, v_counts) = (kv.user(1, BIZ), kv.user(1, BIZ), kv.stream_of(1), kv.counts(BIZ, 1));
    let (library, [transition, set_if_newer, watermark, establish, forget]) = project_functions();
    let hostile_library = format!(
        "#!lua name={HOSTILE_LIBRARY}\nredis.register_function('{HOSTILE_LIBRARY}_spin', function() {ENDLESS} end)"
    );
    // Other code under the project's names (harmless: should it ever be
    // loaded, every tenant's transition would run it until clean_up).
    let replaced_library =
        format!("#!lua name={library}\nredis.register_function('{transition}', function() return 0 end)");
    let sha = |script: &str| redis::Script::new(script).get_hash().to_string();
    let (vs, vu) = (v.schema(), v.db.username.clone());
    let transition_of = |keys: [&str; 3]| {
        let mut c = cmd(&["FCALL", &transition, "3"]);
        c.arg(&keys[..]).arg(1).arg(1).arg(BIZ).arg(1).arg(9).arg(60).arg(10).arg("0:0").arg(i64::MAX).arg("");
        c
    };
    vec![
        // Lua of its own: one endless loop would stall the Redis that every
        // tenant shares.
        row(
            "EVAL of an endless loop (`while true do end`)",
            RedisAcl,
            Attempt::Guarded { probe: cmd(&["EVAL", HARMLESS, "0"]), attempt: cmd(&["EVAL", ENDLESS, "0"]) },
        ),
        row(
            "EVAL_RO of an endless loop",
            RedisAcl,
            Attempt::Guarded { probe: cmd(&["EVAL_RO", HARMLESS, "0"]), attempt: cmd(&["EVAL_RO", ENDLESS, "0"]) },
        ),
        redis_row("SCRIPT LOAD of an endless loop", &["SCRIPT", "LOAD", ENDLESS]),
        row(
            "EVALSHA of a cached endless loop",
            RedisAcl,
            Attempt::Guarded {
                probe: cmd(&["EVALSHA", &sha(HARMLESS), "0"]),
                attempt: cmd(&["EVALSHA", &sha(ENDLESS), "0"]),
            },
        ),
        redis_row("SCRIPT FLUSH (every tenant's cached scripts)", &["SCRIPT", "FLUSH"]),
        redis_row("SCRIPT KILL (another tenant's running script)", &["SCRIPT", "KILL"]),
        redis_row("FUNCTION LOAD of an endless loop", &["FUNCTION", "LOAD", &hostile_library]),
        redis_row(
            "FUNCTION LOAD REPLACE of the project's library with other code",
            &["FUNCTION", "LOAD", "REPLACE", &replaced_library],
        ),
        redis_row("FUNCTION DELETE of the project's library", &["FUNCTION", "DELETE", &library]),
        redis_row("FUNCTION FLUSH", &["FUNCTION", "FLUSH", "SYNC"]),
        redis_row("FUNCTION RESTORE ... FLUSH", &["FUNCTION", "RESTORE", "x", "FLUSH"]),
        redis_row("FUNCTION KILL (another tenant's running function)", &["FUNCTION", "KILL"]),
        redis_row("FUNCTION LIST WITHCODE (every library's code)", &["FUNCTION", "LIST", "WITHCODE"]),
        // Commands that block a connection or the server. (XREADGROUP,
        // which the job sends without BLOCK, stays allowed: ACL rules
        // cannot tell its arguments apart, and a blocked read holds only
        // the tenant's own connection. So does WAIT, with which a like
        // waits for its master's replica (redis.replica_acks): it holds
        // only the caller's connection, for the caller's timeout, and
        // touches no key.)
        redis_row("BLPOP on its own key", &["BLPOP", &own_list, "1"]),
        redis_row("BLMOVE on its own keys", &["BLMOVE", &own_list, &own_list, "LEFT", "RIGHT", "1"]),
        redis_row("BZPOPMIN on its own liked list", &["BZPOPMIN", &own_list, "1"]),
        redis_row("XREAD BLOCK on its own stream", &["XREAD", "BLOCK", "1000", "STREAMS", &own_stream, "$"]),
        // Another tenant's keys with its own Redis account.
        redis_row("GET another tenant's state", &["GET", &v_state]),
        redis_row("ZMSCORE another tenant's liked list", &["ZMSCORE", &v_list, "1"]),
        redis_row("XINFO STREAM another tenant's stream", &["XINFO", "STREAM", &v_stream]),
        redis_row(
            "XREADGROUP another tenant's stream",
            &["XREADGROUP", "GROUP", JOB_GROUP, "hb", "COUNT", "10", "STREAMS", &v_stream, ">"],
        ),
        redis_row("SET another tenant's counts", &["SET", &v_counts, "9:9:9"]),
        redis_row("DEL another tenant's liked list", &["DEL", &v_list]),
        redis_row("XADD to another tenant's stream", &["XADD", &v_stream, "*", "mid", "1"]),
        redis_row("KEYS over every tenant", &["KEYS", "thumbup:*"]),
        redis_row("SCAN over every tenant", &["SCAN", "0", "MATCH", "thumbup:*"]),
        redis_row("ACL SETUSER another tenant's user", &["ACL", "SETUSER", &v.redis.username, "on", ">hb-stolen"]),
        // The project's own functions on another tenant's keys: the ACL
        // checks FCALL's KEYS like any command's.
        row(
            "FCALL transition on another tenant's keys",
            RedisAcl,
            Attempt::Redis(transition_of([&v_list, &v_stream, &v_newest])),
        ),
        row(
            "FCALL transition on its own user cache but another tenant's stream",
            RedisAcl,
            Attempt::Redis(transition_of([&own_list, &v_stream, &own_newest])),
        ),
        row(
            "FCALL transition on its own user cache and stream but another tenant's newest-user bound",
            RedisAcl,
            Attempt::Redis(transition_of([&own_list, &own_stream, &v_newest])),
        ),
        redis_row("FCALL forget on another tenant's user cache", &["FCALL", &forget, "1", &v_list, "1"]),
        redis_row(
            "FCALL establish of another tenant's newest-user bound",
            &["FCALL", &establish, "1", &v_newest, "1", "999999999999"],
        ),
        redis_row(
            "FCALL set-if-newer on another tenant's counts",
            &["FCALL", &set_if_newer, "1", &v_counts, "9:9:999999999999", "999999999999", "60"],
        ),
        redis_row(
            "FCALL_RO watermark of another tenant's stream",
            &["FCALL_RO", &watermark, "1", &v_stream, JOB_GROUP],
        ),
        // Another tenant's schema and the server's own with its DB account.
        sql_row("SELECT another tenant's records", format!("SELECT * FROM `{vs}`.like_records")),
        sql_row(
            "INSERT into another tenant's counts",
            format!("INSERT INTO `{vs}`.like_counts VALUES (1, 99, 1, 0, 1)"),
        ),
        sql_row("UPDATE another tenant's counts", format!("UPDATE `{vs}`.like_counts SET likes = likes + 1000")),
        sql_row("DROP another tenant's table", format!("DROP TABLE `{vs}`.like_records")),
        sql_row("USE another tenant's schema", format!("USE `{vs}`")),
        sql_row("SHOW TABLES of another tenant's schema", format!("SHOW TABLES FROM `{vs}`")),
        row(
            "another tenant's tables in information_schema",
            DbHidden,
            Attempt::Sql(format!("SELECT table_name FROM information_schema.tables WHERE table_schema = '{vs}'")),
        ),
        sql_row("SELECT mysql.user", "SELECT user, host FROM mysql.user".into()),
        sql_row("SELECT the password hashes in mysql.global_priv", "SELECT * FROM mysql.global_priv".into()),
        sql_row("CREATE TABLE in mysql", "CREATE TABLE mysql.hb_hostile (x INT)".into()),
        sql_row(
            "GRANT itself another tenant's schema",
            format!("GRANT ALL PRIVILEGES ON `{vs}`.* TO '{}'@'%'", a.db.username),
        ),
        sql_row("CREATE USER", "CREATE USER 'hb_hostile'@'%' IDENTIFIED BY 'x'".into()),
        sql_row("ALTER USER another tenant's user", format!("ALTER USER '{vu}'@'%' IDENTIFIED BY 'hb-stolen'")),
        sql_row("SELECT INTO OUTFILE on the DB host", "SELECT 1 INTO OUTFILE '/tmp/hb-hostile'".into()),
    ]
}

fn keys(t: &TenantConfig) -> Keys {
    Keys::new(&t.name, t.stream.shards)
}

/// The attacker's own connections and the two tenants.
struct Hostile {
    redis: Conn,
    db: MySqlConnection,
    attacker: TenantConfig,
    victim: TenantConfig,
}

/// How long an attempt may take: a refusal is immediate; more means the
/// server ran or blocked on it.
const ATTEMPT_BUDGET: Duration = Duration::from_secs(3);

impl Hostile {
    /// Makes one attempt; `Ok` with how the server refused it, `Err` with
    /// what happened instead.
    async fn attempt(&mut self, r: &Row) -> Result<String, String> {
        match &r.attempt {
            Attempt::Redis(c) => self.redis_refused(c).await,
            Attempt::Guarded { probe, attempt } => {
                self.redis_refused(probe)
                    .await
                    .map_err(|e| format!("the probe was not refused ({e}), so the attempt was not sent"))?;
                self.redis_refused(attempt).await
            }
            Attempt::Sql(sql) => self.sql(sql, r.refused_by).await,
        }
    }

    async fn redis_refused(&mut self, c: &redis::Cmd) -> Result<String, String> {
        let sent = tokio::time::timeout(ATTEMPT_BUDGET, c.query_async::<redis::Value>(&mut self.redis)).await;
        match sent {
            Err(_) => Err(format!("no answer within {ATTEMPT_BUDGET:?} (it ran or blocked)")),
            Ok(Ok(v)) => Err(format!("ran: {v:?}")),
            Ok(Err(e)) if e.code() == Some("NOPERM") => Ok(e.to_string()),
            // A key reached by a function's redis.call, outside the ACL.
            Ok(Err(e)) if e.to_string().contains("can't access") => Ok(e.to_string()),
            Ok(Err(e)) => Err(format!("failed, but not by the ACL: {e}")),
        }
    }

    async fn sql(&mut self, sql: &str, want: Refuser) -> Result<String, String> {
        let q = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut self.db);
        let sent = tokio::time::timeout(ATTEMPT_BUDGET, q).await;
        match (sent, want) {
            (Err(_), _) => Err(format!("no answer within {ATTEMPT_BUDGET:?}")),
            (Ok(Ok(rows)), Refuser::DbHidden) if rows.is_empty() => Ok("no row".into()),
            (Ok(Ok(rows)), _) => Err(format!("ran: {} row(s)", rows.len())),
            (Ok(Err(e)), Refuser::DbGrants) => {
                let number = e
                    .as_database_error()
                    .and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>())
                    .map(|m| m.number());
                // Access denied: to a schema (1044), as a user (1045, the
                // FILE privilege), to a table (1142) or column (1143), for
                // a global privilege (1227), to a routine (1370).
                match number {
                    Some(1044 | 1045 | 1142 | 1143 | 1227 | 1370) => Ok(e.to_string()),
                    _ => Err(format!("failed, but not by the grants: {e}")),
                }
            }
            (Ok(Err(e)), _) => Err(format!("failed: {e}")),
        }
    }
}

/// Everything an attempt could change: both tenants' keys, this build's
/// function library and any hostile one, the hostile scripts in the script
/// cache, both ACL users, both schemas' rows and tables, the `mysql`
/// schema's tables, the tenants' DB users and grants.
async fn snapshot(a: &TenantConfig, v: &TenantConfig) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for t in [a, v] {
        for (k, dump) in redis_snapshot(&t.name).await {
            out.insert(format!("redis key {k}"), format!("{dump:?}"));
        }
    }
    let mut r = admin_redis().await;
    for pattern in [project_functions().0, format!("{HOSTILE_LIBRARY}*")] {
        let libs: redis::Value = redis::cmd("FUNCTION")
            .arg("LIST")
            .arg("LIBRARYNAME")
            .arg(&pattern)
            .arg("WITHCODE")
            .query_async(&mut r)
            .await
            .unwrap();
        out.insert(format!("redis libraries {pattern}"), format!("{libs:?}"));
    }
    let shas: Vec<String> = [ENDLESS, HARMLESS].map(|s| redis::Script::new(s).get_hash().to_string()).into();
    let cached: Vec<bool> = redis::cmd("SCRIPT").arg("EXISTS").arg(&shas).query_async(&mut r).await.unwrap();
    out.insert("redis script cache".into(), format!("{cached:?}"));
    for t in [a, v] {
        let user: redis::Value =
            redis::cmd("ACL").arg("GETUSER").arg(&t.redis.username).query_async(&mut r).await.unwrap();
        out.insert(format!("redis ACL user {}", t.redis.username), format!("{user:?}"));
    }
    let mut db = admin_db(a).await;
    for t in [a, v] {
        for (i, line) in db_snapshot(t).await.into_iter().enumerate() {
            out.insert(format!("db {} row {i}", t.schema()), line);
        }
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = ? ORDER BY table_name",
        )
        .bind(t.schema())
        .fetch_all(&mut db)
        .await
        .unwrap();
        for table in tables {
            let sum = text(&mut db, &format!("CHECKSUM TABLE `{}`.`{table}`", t.schema()), 1).await;
            out.insert(format!("db table {}.{table}", t.schema()), sum);
        }
        let grants = text(&mut db, &format!("SHOW GRANTS FOR '{}'@'%'", t.db.username), 0).await;
        out.insert(format!("db grants of {}", t.db.username), grants);
    }
    let mysql = "SELECT table_name FROM information_schema.tables WHERE table_schema = 'mysql' ORDER BY 1";
    out.insert("db mysql tables".into(), text(&mut db, mysql, 0).await);
    let users = "SELECT CONCAT(user, '@', host) FROM mysql.user WHERE user LIKE '%hb%' ORDER BY 1";
    out.insert("db users like hb".into(), text(&mut db, users, 0).await);
    out
}

/// Column `col` of every row of an admin statement, as text (the text
/// protocol: whatever the column's type).
async fn text(db: &mut MySqlConnection, sql: &str, col: usize) -> String {
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(db).await.unwrap();
    let cell = |r: &sqlx::mysql::MySqlRow| r.try_get_unchecked::<Option<String>, _>(col).unwrap().unwrap_or_default();
    rows.iter().map(cell).collect::<Vec<_>>().join("; ")
}

/// What differs between two snapshots, by entry.
fn changes(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut names: Vec<&String> = before.keys().chain(after.keys()).collect();
    names.sort();
    names.dedup();
    let short = |v: Option<&String>| v.map_or("(none)".to_string(), |v| v.chars().take(120).collect());
    names
        .into_iter()
        .filter(|n| before.get(*n) != after.get(*n))
        .map(|n| format!("{n}: {} -> {}", short(before.get(n)), short(after.get(n))))
        .collect()
}

/// Data in both tenants, written the way the service writes it: with each
/// tenant's own account through the project's functions in Redis, and
/// through the admin in the DB (standing in for the job).
async fn seed(t: &TenantConfig) {
    let k = keys(t);
    let mut con = cache::connect(&t.redis, Duration::from_secs(2)).await.unwrap();
    let scripts = Scripts::default();
    for mid in 1..=3 {
        let a = TransitionArgs {
            mid,
            business_id: BIZ,
            message_id: 1,
            up_mid: 9,
            action: Action::Like,
            seed: Seed::Loaded(State::None, 0),
            deadline_ms: thumbup_core::version::now_ms() + 60_000,
        };
        let done = scripts.transition(&mut con, &k, t, a).await.expect("a tenant runs the transition on its keys");
        assert!(matches!(done, Transition::Applied { .. }), "{done:?}");
    }
    assert!(scripts.set_if_newer(&mut con, &k.counts(BIZ, 1), (3, 0), 1, 600).await.unwrap());
    let w = scripts.watermark(&mut con, &k.stream_of(1), JOB_GROUP).await.expect("and reads its watermark");
    assert_eq!(w, 0, "no consumer group yet");
    let mut db = admin_db(t).await;
    for mid in 1..=3 {
        sqlx::query("INSERT INTO like_records VALUES (?, ?, 1, 9, 1, 1, 1)")
            .bind(mid)
            .bind(BIZ)
            .execute(&mut db)
            .await
            .unwrap();
    }
    sqlx::query("INSERT INTO like_counts VALUES (?, 1, 3, 0, 1)").bind(BIZ).execute(&mut db).await.unwrap();
    sqlx::query("INSERT INTO received_likes VALUES (?, 9, 3, 1)").bind(BIZ).execute(&mut db).await.unwrap();
}

/// Removes what a broken ACL or grant may have let an attempt create, and
/// puts back the project's library should one have replaced it.
async fn clean_up() {
    let mut r = admin_redis().await;
    let _: Result<(), _> = redis::cmd("FUNCTION").arg("DELETE").arg(HOSTILE_LIBRARY).query_async(&mut r).await;
    restore_project_library(&mut r).await;
    let mut db: MySqlConnection =
        admin_db_url().parse::<sqlx::mysql::MySqlConnectOptions>().unwrap().connect().await.unwrap();
    for s in ["DROP TABLE IF EXISTS mysql.hb_hostile", "DROP USER IF EXISTS 'hb_hostile'@'%'"] {
        sqlx::raw_sql(s).execute(&mut db).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_attempt_with_a_tenants_own_credentials_is_refused_by_the_server_and_changes_nothing() {
    let yaml = format!("tenants:\n{}{}", tenant_yaml(ATTACKER, &[BIZ], ""), tenant_yaml(VICTIM, &[BIZ], ""));
    let config = Config::parse(&yaml, "test").unwrap();
    let (a, v) = (config.tenant(ATTACKER).unwrap().clone(), config.tenant(VICTIM).unwrap().clone());
    clean_up().await;
    for t in [&a, &v] {
        reset_tenant(t).await;
        seed(t).await;
    }
    let redis = cache::connect(&a.redis, Duration::from_secs(10)).await.unwrap();
    let db = a.db.url.parse::<sqlx::mysql::MySqlConnectOptions>().unwrap();
    let db = db.username(&a.db.username).password(&a.db.password).database(&a.schema()).connect().await.unwrap();
    let mut hostile = Hostile { redis, db, attacker: a.clone(), victim: v.clone() };
    // The accounts work on what is the attacker's own: a refusal below is
    // the server's rule, not a broken account.
    let own: Option<String> =
        redis::cmd("GET").arg(keys(&a).counts(BIZ, 1)).query_async(&mut hostile.redis).await.unwrap();
    assert_eq!(own.as_deref(), Some("3:0:1"), "the attacker reads its own keys");
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM like_records").fetch_one(&mut hostile.db).await.unwrap();
    assert_eq!(n, 3, "the attacker reads its own schema");

    let table = rows(&hostile.attacker, &hostile.victim);
    assert!(table.len() >= 12);
    let mut failures = Vec::new();
    for r in &table {
        let before = snapshot(&a, &v).await;
        let started = Instant::now();
        let outcome = hostile.attempt(r).await;
        let took = started.elapsed();
        let changed = changes(&before, &snapshot(&a, &v).await);
        // Redis still answers at once: nothing runs or blocks in it.
        let ping = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut admin_redis().await).await.unwrap();
        let stalled = ping.elapsed() > Duration::from_secs(1);
        let verdict = match (&outcome, changed.is_empty(), stalled) {
            (Ok(how), true, false) => format!("refused by {:?}: {how}", r.refused_by),
            _ => {
                failures.push(r.what);
                format!(
                    "NOT REFUSED by {:?}: {}{}{}",
                    r.refused_by,
                    outcome.as_ref().err().map_or("refused", String::as_str),
                    if changed.is_empty() { String::new() } else { format!("; changed: {}", changed.join(" | ")) },
                    if stalled { "; Redis stalled" } else { "" }
                )
            }
        };
        println!("{:<72} {took:>6.0?}  {verdict}", r.what);
    }
    clean_up().await;
    assert!(
        failures.is_empty(),
        "{} of {} hostile attempts were not refused: {failures:#?}",
        failures.len(),
        table.len()
    );
}
