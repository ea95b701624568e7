//! The write path: an atomic transition in Redis that appends the event to
//! the tenant stream, pipelined with the read of the item's cached counts for
//! the reply (one round trip); the synchronous DB transaction while Redis is down and
//! the write fence ([`crate::fence`]) has opened the DB path; UNAVAILABLE
//! whenever the record's newest acknowledged state cannot be known.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use thumbup_core::cache::{self, Seed, Transition, TransitionArgs, Warm};
use thumbup_core::db::{self, Counts, FallbackError};
use thumbup_core::domain::{Action, Delta, State};
use thumbup_core::event::LikeEvent;
use thumbup_core::fence::Shut;
use thumbup_core::functions;
use thumbup_core::retry::Backoff;
use thumbup_core::version::now_ms;
use tracing::{debug, info, instrument};

use crate::error::Error;
use crate::fence::{self, Path};
use crate::flight::{Flights, Join};
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

/// Applies one write: through Redis while the fence lets this process
/// write there, else on the DB path once it is open; UNAVAILABLE when the
/// record's newest acknowledged state cannot be known. A write that had no
/// effect (Redis started its transition late; the fence moved under it) tries
/// again on whichever path decides, within [`fence::PATH_WAIT`].
// Debug level: a span per like at info level cost about 4% of the service's
// CPU in bench e; every event of the write path names its tenant itself.
#[instrument(level = "debug", skip_all, fields(tenant = %t.name(), mid = w.mid, message = w.message_id))]
pub async fn like(reg: &Registry, t: &Tenant, w: Write) -> Result<Written, Error> {
    let until = Instant::now() + fence::PATH_WAIT;
    let mut late = false;
    loop {
        match via_redis(reg, t, w).await? {
            Attempt::Done(done) => return Ok(done),
            Attempt::Late if !late => {
                // Redis answered, late: once more through Redis; a second
                // late start is UNAVAILABLE. A slow answer alone does not
                // take the tenant off Redis; the fence loop's PING decides.
                late = true;
                t.fence.check_soon();
                continue;
            }
            Attempt::Late => {
                return Err(refused(t, "redis_late", "redis started the transition function after its deadline twice"));
            }
            Attempt::NotPermitted => {}
        }
        let left = until.saturating_duration_since(Instant::now());
        match t.fence.wait_path(left).await {
            Path::Db(epoch) => match Box::pin(via_db(t, w, epoch)).await {
                Err(e @ Error::Unavailable { .. }) => {
                    // Refused without writing. If the fence moved on (the DB
                    // path closed under it: Redis is back), the next path
                    // decides it; an unsettled record stays refused.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if t.fence.path() == Path::Db(epoch) || Instant::now() >= until {
                        return Err(e);
                    }
                }
                other => return other,
            },
            Path::Redis if Instant::now() < until => {
                // Redis decides, but this process could not write there
                // (the lease is about to end): wait a moment.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            _ => {
                return Err(refused(
                    t,
                    "fence_moving",
                    "redis is not deciding writes and the database path is not open (writers are publishing, or redis is coming back)",
                ));
            }
        }
    }
}

/// What a write through Redis did.
enum Attempt {
    /// Decided and acknowledged.
    Done(Written),
    /// Not sent: writes do not go through Redis here now.
    NotPermitted,
    /// Redis started the transition after its deadline: no effect.
    Late,
}

/// UNAVAILABLE for a write that was not decided: nothing was written.
fn refused(t: &Tenant, reason: &'static str, why: impl std::fmt::Display) -> Error {
    metrics::WRITES_REFUSED.with_label_values(&[t.name(), reason]).inc();
    Error::Unavailable { tenant: t.name().to_string(), why: format!("{why}; nothing was written") }
}

/// The write through Redis. The paths a cached user's like does not take
/// (warming, seeding, the bound, a counts read, the DB path) are boxed, so
/// that the future the API spawns per like stays small.
async fn via_redis(reg: &Registry, t: &Tenant, w: Write) -> Result<Attempt, Error> {
    let mut con = t.redis.clone();
    let shard = t.keys.shard_of(w.mid);
    let record = (w.mid, w.business_id, w.message_id);
    let mut args = TransitionArgs {
        mid: w.mid,
        business_id: w.business_id,
        message_id: w.message_id,
        up_mid: w.up_mid,
        action: w.action,
        seed: Seed::NotLoaded,
        deadline_ms: 0,
    };
    let mut warm: Option<Warm> = None;
    loop {
        let Some(permit) = t.fence.redis_permit().await else { return Ok(Attempt::NotPermitted) };
        // Half the client-side timeout: a transition that Redis starts later
        // than this (a stall) must not act, as its caller may have given
        // up; and never after this process's write lease.
        args.deadline_ms = (now_ms() + (reg.redis_timeout().as_millis() / 2) as i64).min(permit.lease_until);
        // The item's cached counts come in the same round trip, for the reply.
        let written = con.generation();
        let outcome = reg.scripts().transition_and_counts(&mut con, &t.keys, &t.cfg, args, warm.as_ref()).await;
        let (outcome, cached) = match outcome {
            Ok((o, cached)) => (Ok(o), cached),
            Err(e) => (Err(e), None),
        };
        match outcome {
            Err(source) if functions::is_not_loaded(&source) => {
                // Redis has no such function (this release's library is not
                // loaded there yet): nothing ran, the outcome is known.
                drop(permit);
                return Err(refused(t, "functions_not_loaded", source));
            }
            Err(source) if cache::is_read_only(&source) => {
                // The server is a replica now (the Redis tier moved and this
                // session has not followed yet): it refused the script
                // before running it, so nothing was written.
                drop(permit);
                t.fence.check_soon();
                return Err(refused(t, "redis_read_only", format!("redis refused the write as a replica ({source})")));
            }
            Err(source) => {
                // The transition may have run: until Redis answers again, the
                // DB cannot know this record's state.
                t.fence.unknown_outcome(shard, args.deadline_ms, record);
                drop(permit);
                if cache::is_unreachable(&source) {
                    if source.is_timeout() {
                        t.fence.check_soon();
                    } else {
                        t.mark_redis_down(&source);
                    }
                    metrics::WRITES_REFUSED.with_label_values(&[t.name(), "unknown_outcome"]).inc();
                    return Err(Error::Unavailable {
                        tenant: t.name().to_string(),
                        why: format!(
                            "redis failed during the write ({source}); whether it took effect is known once redis answers again"
                        ),
                    });
                }
                return Err(Error::Redis { tenant: t.name().to_string(), source });
            }
            Ok(Transition::Expired) => return Ok(Attempt::Late),
            Ok(Transition::NeedWarm { establishing }) if warm.is_none() => {
                drop(permit);
                if let Some(created_ms) = establishing {
                    Box::pin(establish_newest(reg, t, shard, w.business_id, created_ms)).await;
                }
                warm = Some(Box::pin(load_user(t, w, shard)).await?);
                metrics::USER_WARMS.with_label_values(&[t.name(), "db"]).inc();
            }
            Ok(Transition::NeedWarm { .. }) => unreachable!("the transition never asks for a warm it was given"),
            Ok(Transition::NeedSeed { trimmed_ms }) if args.seed == Seed::NotLoaded => {
                drop(permit);
                args.seed = Box::pin(seed(t, w, shard, trimmed_ms)).await?;
            }
            Ok(Transition::NeedSeed { .. }) => unreachable!("the transition never asks for a seed it was given"),
            Ok(Transition::Refused(state)) => {
                return Err(thumbup_core::domain::Forbidden { state, action: w.action }.into());
            }
            Ok(Transition::Applied { prev, state, version, mtime_ms, stream_ms, proved_new }) => {
                if proved_new {
                    metrics::USER_WARMS.with_label_values(&[t.name(), "proved_new"]).inc();
                }
                let event = LikeEvent {
                    mid: w.mid,
                    business_id: w.business_id,
                    message_id: w.message_id,
                    up_mid: w.up_mid,
                    state,
                    prev,
                    version,
                    mtime_ms,
                };
                t.fence.acknowledged(shard, stream_ms, event);
                drop(permit);
                if t.replication.acks() > 0 {
                    Box::pin(replicated(t, &mut con, shard, w, written)).await?;
                }
                // The counts as applied so far plus this write: the job applies
                // it within one window. They came with the transition; only a
                // counts key that is not cached costs a read (from the DB).
                let before = match cached.as_deref().and_then(cache::parse_pair) {
                    Some((likes, dislikes, version)) => Counts { likes, dislikes, version },
                    None => Box::pin(read::counts(reg, t, w.business_id, &[w.message_id]))
                        .await
                        .ok()
                        .and_then(|m| m.get(&w.message_id).copied())
                        .unwrap_or_default(),
                };
                let d = Delta::between(prev, state);
                let counts = Counts {
                    likes: (before.likes + d.likes).max(0),
                    dislikes: (before.dislikes + d.dislikes).max(0),
                    version: before.version,
                };
                return Ok(Attempt::Done(Written { state, counts, version }));
            }
        }
    }
}

/// Waits until the transition just applied on its master is on
/// `redis.replica_acks` replicas, so that the loss of that master (its
/// replica promoted) loses no acknowledged like. When they do not confirm
/// in time the write took effect on the master but is not acknowledged:
/// UNAVAILABLE, saying so.
async fn replicated(t: &Tenant, con: &mut cache::Conn, shard: u32, w: Write, written: u64) -> Result<(), Error> {
    // While the controller says this Redis stands alone (no replica to wait
    // for), the write is on the only copy there is, as every write is until
    // a replica links: no wait. The flag as cached (read at most once a
    // second) first; a wait that missed reads it afresh, since the
    // controller may have set it since.
    let solo = || metrics::REPLICA_WAITS.with_label_values(&[t.name(), "solo"]).inc();
    if t.solo.is_set(con).await {
        solo();
        return Ok(());
    }
    let key = t.keys.user(w.mid, w.business_id);
    let outcome = t.replication.replicated(con, shard, &key, written).await;
    if matches!(outcome, Err(thumbup_core::conn::NotReplicated::Missed { .. })) && t.solo.read(con).await {
        solo();
        return Ok(());
    }
    let label = match &outcome {
        Ok(0) => "covered",
        Ok(_) => "sent",
        Err(thumbup_core::conn::NotReplicated::Missed { .. }) => "missed",
        Err(thumbup_core::conn::NotReplicated::Replaced) => "replaced",
        Err(_) => "failed",
    };
    metrics::REPLICA_WAITS.with_label_values(&[t.name(), label]).inc();
    outcome.map(|_| ()).map_err(|e| Error::Unavailable {
        tenant: t.name().to_string(),
        why: format!(
            "the write took effect on its redis master but is not known to be on a replica ({e}); it is not acknowledged"
        ),
    })
}

/// UNAVAILABLE for a state Redis does not know that the DB cannot be shown
/// to hold as the newest acknowledged one.
fn unprovable(t: &Tenant) -> Error {
    refused(
        t,
        "seed_unprovable",
        "the state is not cached and the job has not yet applied everything that could be newer in the database",
    )
}

/// Refuses a read of the DB when the DB is known to be down.
fn db_ready(t: &Tenant) -> Result<(), Error> {
    if t.db_available() {
        Ok(())
    } else {
        Err(refused(t, "db_unavailable", "the state is not cached and the database is unreachable"))
    }
}

/// The user's records from the DB, to warm the user's cache with (one
/// query, at most `liked_list_max` records), when the DB provably holds
/// their newest acknowledged states (the user's cache expired after its
/// TTL: the job has applied everything that old); else UNAVAILABLE.
async fn load_user(t: &Tenant, w: Write, shard: u32) -> Result<Warm, Error> {
    if !t.fence.seed_provable(shard, t.cfg.cache.state_ttl_secs) {
        return Err(unprovable(t));
    }
    db_ready(t)?;
    match db::load_user(&t.db, w.mid, w.business_id, t.cfg.cache.liked_list_max).await {
        Ok(warm) => Ok(warm),
        Err(e) => {
            t.db_failed(&e);
            Err(refused(t, "db_unavailable", format!("the user is not cached and the database failed: {e}")))
        }
    }
}

/// One establishment of a newest-user bound at a time, per bound key.
static ESTABLISHING: LazyLock<Flights<()>> = LazyLock::new(|| Flights::new(Duration::from_secs(10)));

/// Establishes the newest-user bound of `shard` and `business` (being
/// established since `created_ms`, Redis clock) once the job has applied
/// the shard past that moment: the DB's largest mid then bounds every user
/// with a record, and the bound itself every user whose transition ran
/// since. From then on a user above it is proved new without a DB read.
/// One DB read and one Redis call, by one writer at a time; before the
/// shard is applied that far, or on any failure, nothing happens and a
/// later write of a user who is not cached tries again.
async fn establish_newest(reg: &Registry, t: &Tenant, shard: u32, business: i64, created_ms: i64) {
    if !t.fence.applied_past(shard, created_ms) || !t.db_available() {
        return;
    }
    let key = t.keys.newest(shard, business);
    let Join::Lead(_leader) = ESTABLISHING.join(&key, Instant::now()) else { return };
    let max = match db::max_mid(&t.db).await {
        Ok(max) => max,
        Err(e) => {
            t.db_failed(&e);
            debug!(tenant = %t.name(), shard, error = %e, "newest-user bound: reading the largest mid failed");
            return;
        }
    };
    let mut con = t.redis.clone();
    match reg.scripts().establish(&mut con, &key, created_ms, max).await {
        Ok(true) => info!(tenant = %t.name(), shard, business, bound = max, "newest-user bound established"),
        Ok(false) => {}
        Err(e) => debug!(tenant = %t.name(), shard, error = %e, "newest-user bound: establishing failed"),
    }
}

/// How long a write waits for the job to apply past the entries its user's
/// cache trimmed (a user who liked more than `liked_list_max` items within
/// the last moments) before UNAVAILABLE.
const SEED_WAIT: Duration = Duration::from_secs(3);

/// The state of a record that the user's partial cache does not hold, from
/// the DB, once the DB provably holds its newest acknowledged state: it was
/// in the DB when the user was warmed and every later change to it was
/// cached, unless the cache trimmed it, at `trimmed_ms` at the latest, so
/// the job must have applied the shard past that. Else UNAVAILABLE.
async fn seed(t: &Tenant, w: Write, shard: u32, trimmed_ms: i64) -> Result<Seed, Error> {
    let until = Instant::now() + SEED_WAIT;
    while !t.fence.applied_past(shard, trimmed_ms) {
        if Instant::now() >= until {
            return Err(unprovable(t));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    db_ready(t)?;
    match db::load_states(&t.db, w.mid, w.business_id, &[w.message_id]).await {
        Ok(found) => {
            Ok(found.values().next().map_or(Seed::Loaded(State::None, 0), |r| Seed::Loaded(r.state, r.version)))
        }
        Err(e) => {
            t.db_failed(&e);
            Err(refused(t, "db_unavailable", format!("the state is not cached and the database failed: {e}")))
        }
    }
}

async fn via_db(t: &Tenant, w: Write, epoch: i64) -> Result<Written, Error> {
    if !t.allow_fallback() {
        return Err(Error::RateLimited { tenant: t.name().to_string(), limit: "db_fallback_per_sec (redis is down)" });
    }
    metrics::DEGRADED_WRITES.with_label_values(&[t.name()]).inc();
    let mut attempt = 0;
    let started = Instant::now();
    loop {
        let record = (w.mid, w.business_id, w.message_id, w.up_mid);
        match db::fallback_transition(&t.db, &t.clock, epoch, record, w.action).await {
            Ok(o) => return Ok(Written { state: o.state, counts: o.counts, version: o.version }),
            Err(FallbackError::Forbidden(f)) => return Err(f.into()),
            Err(FallbackError::Shut(s)) => {
                let reason = if s == Shut::Unsettled { "unsettled" } else { "db_path_closed" };
                return Err(refused(t, reason, s.to_string()));
            }
            // Deadlocks with the job's batch are retried.
            Err(FallbackError::Db(e)) if attempt < 3 && db::is_retryable(&e) => attempt += 1,
            // A DB flip (no session to be had; the new primary is not
            // writable yet) passes within seconds: retry inside the budget,
            // then fail fast with UNAVAILABLE. Only errors that prove
            // nothing committed are retried; a session lost mid-transaction
            // is UNAVAILABLE at once (the write may or may not have landed).
            Err(FallbackError::Db(e)) if db::is_nothing_written(&e) && started.elapsed() < FLIP_RETRY_BUDGET => {
                tokio::time::sleep(FLIP_RETRY.delay(attempt)).await;
                attempt += 1;
            }
            Err(FallbackError::Db(e)) => return Err(read::db_err(t, e)),
        }
    }
}

/// How long a write retries across a DB flip before UNAVAILABLE.
const FLIP_RETRY_BUDGET: Duration = Duration::from_secs(2);
/// The delays between those retries.
const FLIP_RETRY: Backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(800));
