//! What a DB error means to its caller, by the server's error numbers and
//! SQLSTATEs (MySQL 8, TiDB and MariaDB agree on these) and the client's
//! own failures. Callers decide retry, failover and UNAVAILABLE from these
//! names, never from the numbers.

/// The server's error number (MySQL's `ER_*`), if the server answered.
fn number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error().and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()).map(|m| m.number())
}

/// A transaction the DB aborted to break a deadlock (SQLSTATE 40001, error
/// 1213): nothing of it committed, so it may run again.
pub fn is_deadlock(e: &sqlx::Error) -> bool {
    e.as_database_error().and_then(|d| d.code()).as_deref() == Some("40001") || number(e) == Some(1213)
}

/// A transaction that lost a lock race: a deadlock, or a lock wait that
/// timed out (1205). Nothing of it committed; running it again may succeed.
pub fn is_retryable(e: &sqlx::Error) -> bool {
    is_deadlock(e) || number(e) == Some(1205)
}

/// The server refused a write because it is read-only (1290,
/// `--read-only`): a standby, or a primary being demoted.
pub fn is_read_only(e: &sqlx::Error) -> bool {
    number(e) == Some(1290)
}

/// The DB could not be reached or the session broke: no session in time,
/// a network error, or a broken protocol exchange.
pub fn is_down(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
}

/// An error that proves nothing was written: no session could be had, or
/// the server refused the statement as read-only. What a DB flip looks
/// like before the new primary takes writes; a write failing so may be
/// tried again. (A session lost mid-transaction is not one: the write may
/// or may not have landed.)
pub fn is_nothing_written(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut) || is_read_only(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_failures_are_down_and_only_a_missing_session_proves_nothing_written() {
        assert!(is_down(&sqlx::Error::PoolTimedOut) && is_nothing_written(&sqlx::Error::PoolTimedOut));
        let io = sqlx::Error::Io(std::io::Error::other("reset"));
        assert!(is_down(&io) && !is_nothing_written(&io), "a broken session may have written");
        assert!(!is_retryable(&io) && !is_read_only(&io) && !is_deadlock(&io));
        assert!(!is_down(&sqlx::Error::RowNotFound));
    }
}
