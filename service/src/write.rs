//! The write path: an atomic transition in Redis that appends the event to
//! the tenant stream; the synchronous DB transaction while Redis is down.

use std::time::{Duration, Instant};

use thumbup_core::cache::{self, Seed, Transition, TransitionArgs};
use thumbup_core::db::{self, Counts, FallbackError};
use thumbup_core::domain::{Action, Delta, State};
use thumbup_core::version::now_ms;
use tracing::{debug, instrument};

use crate::error::Error;
use crate::metrics;
use crate::read;
use crate::tenants::{Registry, Tenant};

/// The request of one write.
#[derive(Debug, Clone, Copy)]
pub struct Write {
    /// Acting user.
    pub mid: i64,
    /// Business.
    pub business_id: i64,
    /// Item.
    pub message_id: i64,
    /// Item owner.
    pub up_mid: i64,
    /// Action.
    pub action: Action,
}

/// The reply of one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// State after the write.
    pub state: State,
    /// Counts of the item including this write.
    pub counts: Counts,
    /// Record version.
    pub version: i64,
}

fn db_err(t: &Tenant, source: sqlx::Error) -> Error {
    t.db_failed(&source);
    Error::Db { tenant: t.name().to_string(), source }
}

/// Applies one write.
#[instrument(skip(reg, t), fields(tenant = %t.name()))]
pub async fn like(reg: &Registry, t: &Tenant, w: Write) -> Result<Written, Error> {
    if t.redis_up() {
        match via_redis(reg, t, w).await {
            Err(Error::Redis { source, .. }) if cache::is_unreachable(&source) => t.mark_redis_down(&source),
            other => return other,
        }
    }
    let gate = t.fallback_gate.read().await;
    if t.redis_up() {
        // Redis came back while this request waited for the gate.
        drop(gate);
        return via_redis(reg, t, w).await;
    }
    via_db(t, w).await
}

async fn via_redis(reg: &Registry, t: &Tenant, w: Write) -> Result<Written, Error> {
    let mut con = t.redis.clone();
    let mut args = TransitionArgs {
        mid: w.mid,
        business_id: w.business_id,
        message_id: w.message_id,
        up_mid: w.up_mid,
        action: w.action,
        seed: Seed::NotLoaded,
        deadline_ms: 0,
    };
    let redis_err = |source| Error::Redis { tenant: t.name().to_string(), source };
    loop {
        // Half the client-side timeout: a script that Redis starts later
        // than this (a stall) must not act, as its caller may have given up.
        args.deadline_ms = now_ms() + (reg.redis_timeout().as_millis() / 2) as i64;
        match reg.scripts().transition(&mut con, &t.keys, &t.cfg, args).await.map_err(redis_err)? {
            Transition::Expired => {
                let stalled = redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "transition script started after its deadline (Redis stalled)",
                ));
                return Err(redis_err(stalled));
            }
            Transition::NeedSeed if args.seed == Seed::NotLoaded => {
                let loaded = match t.db_available() {
                    true => db::load_states(&t.db, w.mid, w.business_id, &[w.message_id])
                        .await
                        .inspect_err(|e| t.db_failed(e)),
                    false => Err(sqlx::Error::PoolTimedOut),
                };
                args.seed = match loaded {
                    Ok(found) => {
                        found.values().next().map_or(Seed::Loaded(State::None, 0), |r| Seed::Loaded(r.state, r.version))
                    }
                    Err(e) => {
                        debug!(tenant = %t.name(), error = %e, "state not cached and DB unreadable: accepting unverified");
                        metrics::UNVERIFIED_WRITES.with_label_values(&[t.name()]).inc();
                        Seed::Unverified
                    }
                };
            }
            Transition::NeedSeed => unreachable!("the script never asks for a seed it was given"),
            Transition::Refused(state) => {
                return Err(thumbup_core::domain::Forbidden { state, action: w.action }.into());
            }
            Transition::Applied { prev, state, version, .. } => {
                // The counts as applied so far plus this write: the job applies
                // it within one window.
                let before = read::counts(reg, t, w.business_id, &[w.message_id])
                    .await
                    .ok()
                    .and_then(|m| m.get(&w.message_id).copied())
                    .unwrap_or_default();
                let d = Delta::between(prev, state);
                let counts = Counts {
                    likes: (before.likes + d.likes).max(0),
                    dislikes: (before.dislikes + d.dislikes).max(0),
                    version: before.version,
                };
                return Ok(Written { state, counts, version });
            }
        }
    }
}

async fn via_db(t: &Tenant, w: Write) -> Result<Written, Error> {
    if !t.allow_fallback() {
        return Err(Error::RateLimited { tenant: t.name().to_string(), limit: "db_fallback_per_sec (redis is down)" });
    }
    metrics::DEGRADED_WRITES.with_label_values(&[t.name()]).inc();
    let mut attempt = 0;
    let started = Instant::now();
    loop {
        let record = (w.mid, w.business_id, w.message_id, w.up_mid);
        match db::fallback_transition(&t.db, &t.clock, record, w.action).await {
            Ok(o) => return Ok(Written { state: o.state, counts: o.counts, version: o.version }),
            Err(FallbackError::Forbidden(f)) => return Err(f.into()),
            // Deadlocks with the job's batch are retried.
            Err(FallbackError::Db(e)) if attempt < 3 && is_retryable(&e) => attempt += 1,
            // A DB flip (no session to be had; the new primary is not
            // writable yet) passes within seconds: retry inside the budget,
            // then fail fast with UNAVAILABLE. Only errors that prove
            // nothing committed are retried; a session lost mid-transaction
            // is UNAVAILABLE at once (the write may or may not have landed).
            Err(FallbackError::Db(e)) if is_flipping(&e) && started.elapsed() < FLIP_RETRY_BUDGET => {
                tokio::time::sleep(Duration::from_millis(50 << attempt.min(4))).await;
                attempt += 1;
            }
            Err(FallbackError::Db(e)) => return Err(db_err(t, e)),
        }
    }
}

/// How long a write retries across a DB flip before UNAVAILABLE.
const FLIP_RETRY_BUDGET: Duration = Duration::from_secs(2);

fn mysql_number(e: &sqlx::Error) -> Option<u16> {
    e.as_database_error().and_then(|d| d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()).map(|m| m.number())
}

/// MySQL deadlock (1213) and lock wait timeout (1205).
fn is_retryable(e: &sqlx::Error) -> bool {
    matches!(mysql_number(e), Some(1213 | 1205))
}

/// What a DB flip looks like before anything is written: no session could
/// be had, or the server refused the statement as read-only (1290).
fn is_flipping(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::PoolTimedOut) || mysql_number(e) == Some(1290)
}
