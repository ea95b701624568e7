//! The tenant database: connecting with the tenant's DB user, migrations
//! and the record types here; the reads ([`read`]), the job's batched apply
//! ([`apply`]), the synchronous fallback transition and the invalidation
//! queue ([`fallback`]), and what a DB error means ([`error`]).
//!
//! Only SQL that MySQL 8, TiDB and MariaDB share: no RETURNING, and
//! `ON DUPLICATE KEY UPDATE ... VALUES(col)` for upserts.

use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow, MySqlSslMode};
use sqlx::{MySql, QueryBuilder, Row};

mod apply;
mod error;
mod fallback;
mod read;

pub use apply::{Applied, apply_events};
pub use error::{is_deadlock, is_down, is_nothing_written, is_read_only, is_retryable};
pub use fallback::{
    FallbackError, FallbackOutcome, Invalidation, clear_invalidations, fallback_transition, pending_invalidations,
};
pub use read::{
    list_item_likers, list_user_likes, load_counts, load_received, load_received_many, load_states, load_user, max_mid,
};

use crate::config::{DbTls, DbTlsMode, TenantConfig};
use crate::domain::State;

/// Bound parameters per batched statement: its packet must fit in one TLS
/// record (16 KiB). sqlx leaves Nagle's algorithm on, so a packet that
/// goes out as two records holds its second part back until the server
/// acknowledges the first, which the server delays (40 ms on Linux): a
/// statement of 3,500 parameters took 50 ms instead of 5 over TLS. 1,000
/// parameters of 8 bytes and their types stay under a record.
pub(crate) const MAX_PARAMS: usize = 1_000;

/// Rows per batched statement with `params` bound parameters per row.
pub(crate) const fn rows_per_statement(params: usize) -> usize {
    MAX_PARAMS / params
}

/// Pushes `(SELECT ? AS c1, ? AS c2 UNION ALL SELECT ?, ? ...) k JOIN <table> r
/// ON r.c1 = k.c1 AND r.c2 = k.c2`: `table` (alias `r`) joined to the derived
/// table of `keys` (at least one), which looks every key up by `columns`, the
/// table's primary key.
///
/// Why not `WHERE (c1, c2) IN ((?, ?), ...)`: with bound parameters MariaDB
/// plans such a list as one index range per tuple, and 500 tuples spend
/// about 100 ms of optimizer CPU in "Statistics" (measured on the local
/// stack) where this join takes about 5 ms. The job runs one such statement
/// per 500 records every window, so the IN list made each window a CPU burst
/// on the DB. `UNION ALL` of SELECTs is SQL that MySQL 8, TiDB and MariaDB
/// all accept, unlike table value constructors.
pub(crate) fn push_key_join<const N: usize>(
    q: &mut QueryBuilder<MySql>,
    table: &'static str,
    columns: [&'static str; N],
    keys: impl IntoIterator<Item = [i64; N]>,
) {
    q.push("(");
    for (i, key) in keys.into_iter().enumerate() {
        q.push(if i == 0 { "SELECT " } else { " UNION ALL SELECT " });
        for (j, (v, col)) in key.into_iter().zip(columns).enumerate() {
            if j > 0 {
                q.push(", ");
            }
            q.push_bind(v);
            if i == 0 {
                q.push(" AS ").push(col);
            }
        }
    }
    q.push(") k JOIN ").push(table).push(" r ON ");
    for (j, col) in columns.iter().enumerate() {
        q.push(if j == 0 { "r." } else { " AND r." }).push(col).push(" = k.").push(col);
    }
}

/// The embedded migrations of a tenant schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the TLS settings `tls` to `opts` (nothing when None: the
/// client's default, TLS when the server offers it, unverified).
pub fn with_tls(opts: MySqlConnectOptions, tls: Option<&DbTls>) -> MySqlConnectOptions {
    let Some(tls) = tls else { return opts };
    let opts = opts.ssl_mode(match tls.mode {
        DbTlsMode::Required => MySqlSslMode::Required,
        DbTlsMode::VerifyCa => MySqlSslMode::VerifyCa,
        DbTlsMode::VerifyIdentity => MySqlSslMode::VerifyIdentity,
    });
    // The content read with the config, else the file itself (read by
    // the client at each connect: a config built in code).
    match (&tls.ca_pem, &tls.ca_file) {
        (Some(pem), _) => opts.ssl_ca_from_pem(pem.clone()),
        (None, Some(file)) => opts.ssl_ca(file),
        (None, None) => opts,
    }
}

/// The options of a session on the tenant schema with the tenant's DB user
/// and its TLS settings.
pub fn connect_options(t: &TenantConfig) -> Result<MySqlConnectOptions, sqlx::Error> {
    let opts = MySqlConnectOptions::from_str(&t.db.url)?
        .username(&t.db.username)
        .password(&t.db.password)
        .database(&t.schema());
    Ok(with_tls(opts, t.db.tls.as_ref()))
}

/// Connects a pool to the tenant schema with the tenant's DB user. Lazy: the
/// first query connects, so a process starts while the DB is down.
pub fn connect_lazy(t: &TenantConfig) -> Result<MySqlPool, sqlx::Error> {
    let opts = connect_options(t)?;
    Ok(MySqlPoolOptions::new()
        .max_connections(t.db.max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy_with(opts))
}

/// Brings the tenant schema up to date; idempotent.
pub async fn migrate(pool: &MySqlPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// A record as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Current state.
    pub state: State,
    /// Newest applied version (0: never written).
    pub version: i64,
    /// The item owner.
    pub up_mid: i64,
}

/// Counts of an item (or received likes, with `dislikes` 0) and their version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    /// Likes.
    pub likes: i64,
    /// Dislikes.
    pub dislikes: i64,
    /// Grows with every change; 0 for an item never counted.
    pub version: i64,
}

/// One entry of a newest-first list: (Unix ms, id).
pub type ListEntry = (i64, i64);

pub(crate) fn state_of(row: &MySqlRow, col: &str) -> Result<State, sqlx::Error> {
    let code: i8 = row.try_get(col)?;
    State::from_code(code as i64).ok_or_else(|| sqlx::Error::Decode(format!("bad state {code}").into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_join_names_the_columns_once_and_joins_on_every_one() {
        let mut q = QueryBuilder::<MySql>::new("SELECT r.likes FROM ");
        push_key_join(&mut q, "received_likes", ["business_id", "up_mid"], [[1, 7], [1, 8]]);
        assert_eq!(
            q.sql().as_str(),
            "SELECT r.likes FROM (SELECT ? AS business_id, ? AS up_mid UNION ALL SELECT ?, ?) k \
             JOIN received_likes r ON r.business_id = k.business_id AND r.up_mid = k.up_mid"
        );
    }
}
