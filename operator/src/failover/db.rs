//! What the failover controller does to the DB servers, over an admin
//! connection: probe, fence, wait for a replica to catch up, promote.
//!
//! Every call opens its own connection under a deadline: a probe is
//! "connect + query within the timeout", and a dead server must never hold
//! the controller up. The statements are MariaDB's (and MySQL's) GTID
//! replication; they run against the datacenters' own DB servers.

use std::future::Future;
use std::time::{Duration, Instant};

use sqlx::mysql::{MySqlConnection, MySqlRow};
use sqlx::{Connection, Row};

/// A DB action that failed; the text says which server and step.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The deadline passed.
    #[error("{dc}: {step} timed out after {after:?}")]
    Timeout {
        /// Datacenter.
        dc: String,
        /// What was being done.
        step: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The server refused or failed.
    #[error("{dc}: {step}: {source}")]
    Sql {
        /// Datacenter.
        dc: String,
        /// What was being done.
        step: &'static str,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// The server answered, but not as needed.
    #[error("{dc}: {step}: {detail}")]
    State {
        /// Datacenter.
        dc: String,
        /// What was being done.
        step: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// One datacenter's DB, as the controller reaches it.
#[derive(Debug, Clone)]
pub struct Server {
    /// Datacenter name.
    pub dc: String,
    /// `mysql://admin:password@host:port`.
    pub admin_url: String,
    /// The admin user (its sessions survive a fence).
    pub admin_user: String,
}

/// What a probe saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `@@read_only`.
    pub read_only: bool,
    /// The replica status, when the server replicates from another.
    pub replica: Option<Replica>,
}

/// The fields of `SHOW SLAVE STATUS` that the controller uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// `Slave_IO_Running` (Yes, No, Connecting).
    pub io_running: String,
    /// `Slave_SQL_Running` (Yes, No).
    pub sql_running: String,
    /// `Seconds_Behind_Master`, unknown while the IO thread is down.
    pub lag_secs: Option<u64>,
    /// `Last_SQL_Error`.
    pub sql_error: String,
    /// Whether every event received has been applied.
    pub relay_applied: bool,
}

impl Probe {
    /// `Ok` when this server can take over as primary, else why not.
    pub fn standby_health(&self, max_lag: Duration) -> Result<(), String> {
        let Some(r) = &self.replica else {
            return Err("it is not a replica (no replication configured)".into());
        };
        if r.sql_running != "Yes" {
            return Err(format!("its replication SQL thread is not running ({})", r.sql_error));
        }
        match r.lag_secs {
            Some(lag) if lag > max_lag.as_secs() => {
                Err(format!("it lags {lag}s behind the active DB (more than {}s)", max_lag.as_secs()))
            }
            _ => Ok(()),
        }
    }
}

impl Server {
    async fn within<T>(
        &self,
        step: &'static str,
        after: Duration,
        f: impl Future<Output = Result<T, DbError>>,
    ) -> Result<T, DbError> {
        tokio::time::timeout(after, f).await.map_err(|_| DbError::Timeout { dc: self.dc.clone(), step, after })?
    }

    fn sql(&self, step: &'static str) -> impl FnOnce(sqlx::Error) -> DbError + '_ {
        move |source| DbError::Sql { dc: self.dc.clone(), step, source }
    }

    async fn connect(&self) -> Result<MySqlConnection, DbError> {
        MySqlConnection::connect(&self.admin_url).await.map_err(self.sql("connect"))
    }

    async fn replica(&self, con: &mut MySqlConnection) -> Result<Option<Replica>, DbError> {
        let row =
            sqlx::raw_sql("SHOW SLAVE STATUS").fetch_optional(&mut *con).await.map_err(self.sql("replica status"))?;
        Ok(row.map(|r| {
            let same_file = text(&r, "Relay_Master_Log_File") == text(&r, "Master_Log_File");
            let same_pos = text(&r, "Exec_Master_Log_Pos") == text(&r, "Read_Master_Log_Pos");
            Replica {
                io_running: text(&r, "Slave_IO_Running").unwrap_or_default(),
                sql_running: text(&r, "Slave_SQL_Running").unwrap_or_default(),
                lag_secs: text(&r, "Seconds_Behind_Master").and_then(|s| s.parse().ok()),
                sql_error: text(&r, "Last_SQL_Error").unwrap_or_default(),
                relay_applied: same_file && same_pos,
            }
        }))
    }

    /// Connect, read `@@read_only` and the replica status, within `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<Probe, DbError> {
        self.within("probe", timeout, async {
            let mut con = self.connect().await?;
            let read_only: i64 =
                sqlx::query_scalar("SELECT @@read_only").fetch_one(&mut con).await.map_err(self.sql("probe"))?;
            let replica = self.replica(&mut con).await?;
            let _ = con.close().await;
            Ok(Probe { read_only: read_only != 0, replica })
        })
        .await
    }

    /// Fences the server: `read_only=ON` (which waits for running write
    /// transactions to end), then ends every session but the admin's and
    /// the replication threads', so no tenant session keeps writing.
    pub async fn fence(&self, timeout: Duration) -> Result<usize, DbError> {
        self.within("fence", timeout, async {
            let mut con = self.connect().await?;
            sqlx::raw_sql("SET GLOBAL read_only = ON").execute(&mut con).await.map_err(self.sql("set read_only"))?;
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() \
                 AND USER NOT IN (?, 'system user', 'event_scheduler') \
                 AND COMMAND NOT IN ('Binlog Dump', 'Binlog Dump GTID', 'Daemon')",
            )
            .bind(&self.admin_user)
            .fetch_all(&mut con)
            .await
            .map_err(self.sql("list sessions"))?;
            let mut killed = 0;
            for id in ids {
                // The session may have ended on its own meanwhile.
                if sqlx::raw_sql(sqlx::AssertSqlSafe(format!("KILL CONNECTION {id}"))).execute(&mut con).await.is_ok() {
                    killed += 1;
                }
            }
            let _ = con.close().await;
            Ok(killed)
        })
        .await
    }

    /// Makes the server writable (`read_only=OFF`).
    pub async fn unfence(&self, timeout: Duration) -> Result<(), DbError> {
        self.within("unfence", timeout, async {
            let mut con = self.connect().await?;
            sqlx::raw_sql("SET GLOBAL read_only = OFF").execute(&mut con).await.map_err(self.sql("unset read_only"))?;
            let _ = con.close().await;
            Ok(())
        })
        .await
    }

    /// `@@gtid_binlog_pos`: everything this server has written to its binlog.
    pub async fn binlog_position(&self, timeout: Duration) -> Result<String, DbError> {
        self.within("read binlog position", timeout, async {
            let mut con = self.connect().await?;
            let pos: String = sqlx::query_scalar("SELECT @@gtid_binlog_pos")
                .fetch_one(&mut con)
                .await
                .map_err(self.sql("read binlog position"))?;
            let _ = con.close().await;
            Ok(pos)
        })
        .await
    }

    /// Waits until this replica has applied `position` (a GTID list).
    pub async fn wait_applied(&self, position: &str, timeout: Duration) -> Result<(), DbError> {
        let secs = timeout.as_secs_f64();
        self.within("catch up", timeout + Duration::from_secs(2), async {
            let mut con = self.connect().await?;
            let r: i64 = sqlx::query_scalar("SELECT MASTER_GTID_WAIT(?, ?)")
                .bind(position)
                .bind(secs)
                .fetch_one(&mut con)
                .await
                .map_err(self.sql("catch up"))?;
            let _ = con.close().await;
            if r == 0 {
                Ok(())
            } else {
                Err(DbError::State {
                    dc: self.dc.clone(),
                    step: "catch up",
                    detail: format!("not at {position} after {timeout:?}"),
                })
            }
        })
        .await
    }

    /// Promotes a replica: stops receiving, applies what it received, stops
    /// and forgets replication (so it never pulls from the old primary
    /// again), and becomes writable. A server that does not replicate is
    /// only made writable, so a resumed promotion converges.
    pub async fn promote(&self, timeout: Duration) -> Result<(), DbError> {
        self.within("promote", timeout, async {
            let mut con = self.connect().await?;
            if self.replica(&mut con).await?.is_some() {
                sqlx::raw_sql("STOP SLAVE IO_THREAD").execute(&mut con).await.map_err(self.sql("stop receiving"))?;
                let started = Instant::now();
                loop {
                    let Some(r) = self.replica(&mut con).await? else { break };
                    if r.relay_applied {
                        break;
                    }
                    if r.sql_running != "Yes" {
                        return Err(DbError::State {
                            dc: self.dc.clone(),
                            step: "apply relay log",
                            detail: format!("the SQL thread stopped before applying all it received: {}", r.sql_error),
                        });
                    }
                    tracing::debug!(dc = %self.dc, waited = ?started.elapsed(), "applying the relay log");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                sqlx::raw_sql("STOP SLAVE").execute(&mut con).await.map_err(self.sql("stop replication"))?;
                sqlx::raw_sql("RESET SLAVE ALL").execute(&mut con).await.map_err(self.sql("forget replication"))?;
            }
            sqlx::raw_sql("SET GLOBAL read_only = OFF").execute(&mut con).await.map_err(self.sql("make writable"))?;
            let _ = con.close().await;
            Ok(())
        })
        .await
    }
}

/// A column as text, whatever its SQL type (the replica status mixes them).
fn text(row: &MySqlRow, name: &str) -> Option<String> {
    if let Ok(v) = row.try_get::<Option<String>, _>(name) {
        return v;
    }
    if let Ok(v) = row.try_get::<Option<Vec<u8>>, _>(name) {
        return v.map(|b| String::from_utf8_lossy(&b).into_owned());
    }
    if let Ok(v) = row.try_get::<Option<u64>, _>(name) {
        return v.map(|n| n.to_string());
    }
    row.try_get::<Option<i64>, _>(name).ok().flatten().map(|n| n.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(sql: &str, lag: Option<u64>) -> Probe {
        Probe {
            read_only: true,
            replica: Some(Replica {
                io_running: "Connecting".into(),
                sql_running: sql.into(),
                lag_secs: lag,
                sql_error: if sql == "Yes" { String::new() } else { "Duplicate entry".into() },
                relay_applied: true,
            }),
        }
    }

    #[test]
    fn only_a_running_replica_within_the_lag_bound_is_a_healthy_standby() {
        let max = Duration::from_secs(30);
        assert_eq!(replica("Yes", Some(0)).standby_health(max), Ok(()));
        // The IO thread is down when the primary is: lag unknown is fine.
        assert_eq!(replica("Yes", None).standby_health(max), Ok(()));
        assert!(replica("Yes", Some(31)).standby_health(max).unwrap_err().contains("lags 31s"));
        assert!(replica("No", Some(0)).standby_health(max).unwrap_err().contains("Duplicate entry"));
        let primary = Probe { read_only: false, replica: None };
        assert!(primary.standby_health(max).unwrap_err().contains("not a replica"));
    }
}
