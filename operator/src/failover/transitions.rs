//! The route's transitions: a blocked failover, the flip itself, an
//! unplanned failover, a planned switchover, and the promotion (with the
//! replay of the stream window) that finishes either.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use thumbup_core::route::{Blocked, Transition, TransitionKind};
use tracing::{error, info, warn};

use super::controller::{ACTION_TIMEOUT, Controller, RedisProbes};
use super::decide::{Block, Failing};
use super::metrics::{BLOCKED, EPOCH, FLIPS, REPLAYED};
use super::redis::Tier;
use super::{FailoverError, Notice, db, replay};

/// How long after the replay its cached keys are deleted a second time.
const SECOND_INVALIDATION: Duration = Duration::from_secs(2);

impl Controller {
    pub(super) async fn block(&mut self, b: Block) -> Result<(), FailoverError> {
        let reason = b.reason();
        if self.route.failover.blocked.as_ref().is_some_and(|x| x.reason == reason) {
            return Ok(());
        }
        let message = b.message(&self.settings);
        error!(reason, %message, "failover blocked");
        BLOCKED.with_label_values(&[reason]).inc();
        self.route.failover.blocked =
            Some(Blocked { reason: reason.into(), message: message.clone(), since: Timestamp::now() });
        let notice = Notice { warning: true, reason: reason.into(), action: "FailOver".into(), message };
        self.save_and_announce(Some(notice)).await
    }

    /// Writes a new route naming `to`; the proxies follow it.
    async fn flip(&mut self, to: &str, kind: TransitionKind, reason: String) -> Result<(), FailoverError> {
        let before = self.route.clone();
        let now = Timestamp::now();
        let from = self.route.active_datacenter.clone();
        self.route.epoch += 1;
        self.route.active_datacenter = to.to_string();
        let f = &mut self.route.failover;
        f.last_transition =
            Some(Transition { at: now, kind, from, to: to.to_string(), epoch: self.route.epoch, reason });
        f.blocked = None;
        f.promotion_pending = true;
        if kind == TransitionKind::Failover {
            let window = self.settings.cap_window;
            f.flips.retain(|t| now.duration_since(*t).try_into().unwrap_or(Duration::ZERO) < window);
            f.flips.push(now);
        }
        if let Err(e) = self.opts.store.save(&self.route).await {
            // Nothing flipped: no proxy saw the new epoch.
            self.route = before;
            return Err(e);
        }
        EPOCH.set(self.route.epoch as i64);
        FLIPS.with_label_values(&[&format!("{kind:?}")]).inc();
        if let Some(tx) = &self.opts.route_tx {
            tx.send_replace(Some(self.route.clone()));
        }
        Ok(())
    }

    pub(super) async fn fail_over(&mut self, to: String, reason: String) -> Result<(), FailoverError> {
        let from = self.route.active_datacenter.clone();
        let started = Instant::now();
        error!(%from, %to, %reason, "failing over");
        // The standby's Redis becomes a master before the route names it:
        // from then on the old one cannot acknowledge a like (its WAIT finds
        // no replica), and the proxies' first sessions to it take writes.
        let mut solo_after_flip = None;
        if let Some(r) = self.redis.get(&to).cloned() {
            if let Err(e) = r.promote(ACTION_TIMEOUT.min(self.probe_timeout * 2)).await {
                warn!(datacenter = %to, error = %e, "promoting the standby's Redis failed; no flip, retried next period");
                return Ok(());
            }
            info!(datacenter = %to, took = ?started.elapsed(), "the standby's Redis serves every key");
            // Its replica is gone with the failed datacenter.
            self.solo = None;
            self.unlinked = self.settings.failure_threshold;
            match r {
                Tier::Server(_) => self.mark_solo(&r, true).await,
                // A cluster's new masters take writes only after the
                // engine's rejoin delay (min(cluster-node-timeout, 5 s)
                // after they last saw themselves in the minority): the
                // flags, written through the cluster, wait for it; the
                // DB's route need not.
                Tier::Cluster(_) => solo_after_flip = Some(r),
            }
        }
        self.flip(&to, TransitionKind::Failover, reason.clone()).await?;
        info!(epoch = self.route.epoch, took = ?started.elapsed(), "route flipped");
        if let Some(r) = solo_after_flip {
            self.mark_solo(&r, true).await;
            info!(datacenter = %to, took = ?started.elapsed(), "solo flags set on the cluster");
        }
        match self.servers[&from].fence(ACTION_TIMEOUT.min(self.probe_timeout * 2)).await {
            Ok(n) => info!(datacenter = %from, sessions_ended = n, "old primary fenced"),
            Err(e) => warn!(datacenter = %from, error = %e, "old primary unreachable; fenced when it answers again"),
        }
        if let (Some(old), Some(new)) = (self.redis.get(&from), self.redis.get(&to)) {
            match old.follow(new, ACTION_TIMEOUT.min(self.probe_timeout * 2)).await {
                Ok(()) => info!(datacenter = %from, "old Redis now replicates the new active one"),
                Err(e) => warn!(datacenter = %from, error = %e, "old Redis unreachable; fenced when it answers again"),
            }
        }
        self.failing = Failing::default();
        self.finish_promotion().await?;
        let notice = Notice {
            warning: true,
            reason: "Failover".into(),
            action: "FailOver".into(),
            message: format!(
                "{} route flipped from {from} to {to} at epoch {}: {reason}",
                self.tiers(),
                self.route.epoch
            ),
        };
        self.announce(Some(notice)).await;
        info!(took = ?started.elapsed(), "failover done");
        Ok(())
    }

    pub(super) async fn switch_over(
        &mut self,
        to: &str,
        probes: &BTreeMap<String, Result<db::Probe, db::DbError>>,
        redis_probes: &RedisProbes,
        reason: String,
    ) -> Result<(), FailoverError> {
        let from = self.route.active_datacenter.clone();
        let max_lag = Duration::from_millis(self.opts.config.failover.max_lag_ms);
        let active_redis = self.route.active_redis_address().unwrap_or_default().to_string();
        let redis_ready = match (redis_probes.get(&from), redis_probes.get(to)) {
            (Some(Err(e)), _) => Err(format!("the active Redis does not answer: {e}")),
            (_, Some(Err(e))) => Err(format!("{to}'s Redis does not answer: {e}")),
            (_, Some(Ok(p))) => p.standby_health(&active_redis).map_err(|e| format!("{to}: {e}")),
            _ => Ok(()),
        };
        let ready = match (&probes[&from], &probes[to]) {
            (Err(e), _) => Err(format!("the active DB does not answer: {e}")),
            (_, Err(e)) => Err(format!("{to} does not answer: {e}")),
            (Ok(_), Ok(p)) => p.standby_health(max_lag).map_err(|e| format!("{to}: {e}")).and(redis_ready),
        };
        if let Err(why) = ready {
            return self.switchover_failed(to, why).await;
        }
        let started = Instant::now();
        info!(%from, %to, "planned switchover: fencing the active DB");
        if let Err(e) = self.servers[&from].fence(ACTION_TIMEOUT).await {
            let _ = self.servers[&from].unfence(ACTION_TIMEOUT).await;
            return self.switchover_failed(to, e.to_string()).await;
        }
        let catch_up = Duration::from_millis(self.opts.config.failover.catch_up_timeout_ms);
        let caught_up = match self.servers[&from].binlog_position(ACTION_TIMEOUT).await {
            Ok(pos) => self.servers[to].wait_applied(&pos, catch_up).await,
            Err(e) => Err(e),
        };
        let mut caught_up = caught_up.map_err(|e| e.to_string());
        // The Redis tier: pause the clients' writes on the active Redis, let
        // the target receive everything up to there, promote it. The pause
        // outlasts the catch-up; the old Redis is a replica before it ends.
        let redis_pair = self.redis.get(&from).cloned().zip(self.redis.get(to).cloned());
        if caught_up.is_ok()
            && let Some((old, new)) = &redis_pair
        {
            let pause = catch_up + ACTION_TIMEOUT * 2;
            caught_up = new.switch_from(old, pause, catch_up, ACTION_TIMEOUT).await.map_err(|e| e.to_string());
        }
        if let Err(e) = caught_up {
            if let Err(u) = self.servers[&from].unfence(ACTION_TIMEOUT).await {
                error!(datacenter = %from, error = %u, "could not make the active DB writable again");
            }
            if let Some((old, new)) = &redis_pair {
                for u in new.undo_switch(old, catch_up, ACTION_TIMEOUT).await {
                    error!(datacenter = %to, error = %u, "could not give the Redis tier back to the active datacenter");
                }
            }
            return self.switchover_failed(to, e).await;
        }
        self.flip(to, TransitionKind::Switchover, reason.clone()).await?;
        if let Some((old, new)) = &redis_pair
            && let Err(e) = old.follow(new, ACTION_TIMEOUT).await
        {
            // Its pause ends on its own; the next probe makes it a replica.
            warn!(datacenter = %from, error = %e, "the old Redis is not a replica yet; fenced next period");
        }
        self.finish_promotion().await?;
        let pause = started.elapsed();
        info!(%from, %to, epoch = self.route.epoch, write_pause = ?pause, "planned switchover done");
        let notice = Notice {
            warning: false,
            reason: "Switchover".into(),
            action: "SwitchOver".into(),
            message: format!(
                "{} route switched from {from} to {to} at epoch {} (writes paused {} ms): {reason}",
                self.tiers(),
                self.route.epoch,
                pause.as_millis()
            ),
        };
        self.announce(Some(notice)).await;
        Ok(())
    }

    /// What a flip moves, in words.
    fn tiers(&self) -> &'static str {
        if self.redis.is_empty() { "DB" } else { "DB and Redis" }
    }

    async fn switchover_failed(&mut self, to: &str, why: String) -> Result<(), FailoverError> {
        let message = format!(
            "planned switchover to {to} not done, {} stays active: {why}. To retry, request it again \
             (kubectl thumbup switchover {to}), or set active_datacenter to {} and back.",
            self.route.active_datacenter, self.route.active_datacenter
        );
        error!(%message, "switchover failed");
        BLOCKED.with_label_values(&["SwitchoverFailed"]).inc();
        self.route.failover.blocked =
            Some(Blocked { reason: "SwitchoverFailed".into(), message: message.clone(), since: Timestamp::now() });
        let notice = Notice { warning: true, reason: "SwitchoverFailed".into(), action: "SwitchOver".into(), message };
        self.save_and_announce(Some(notice)).await
    }

    /// Promotes the active datacenter's DB and, after an unplanned failover,
    /// replays the stream window onto it. Idempotent: resumed next period
    /// when it fails.
    pub(super) async fn finish_promotion(&mut self) -> Result<(), FailoverError> {
        let active = self.route.active_datacenter.clone();
        let started = Instant::now();
        if let Some(r) = self.redis.get(&active)
            && let Err(e) = r.promote(ACTION_TIMEOUT).await
        {
            warn!(datacenter = %active, error = %e, "promoting the Redis failed; resumed next period");
            return Ok(());
        }
        if let Err(e) = self.servers[&active].promote(ACTION_TIMEOUT).await {
            warn!(datacenter = %active, error = %e, "promotion failed; resumed next period");
            return Ok(());
        }
        info!(datacenter = %active, took = ?started.elapsed(), "promoted");
        let transition = self.route.failover.last_transition.clone();
        if let Some(t) = transition.filter(|t| t.kind == TransitionKind::Failover && t.to == active) {
            let window = Duration::from_millis(self.opts.config.failover.replay_window_ms);
            let since = t.at.checked_sub(window).unwrap_or(t.at).as_millisecond();
            if let Err(e) = self.replay_all(since).await {
                warn!(error = %e, "replay failed; resumed next period");
                return Ok(());
            }
        }
        self.route.failover.promotion_pending = false;
        self.save_and_announce(None).await
    }

    /// Replays every tenant's stream window (from each datacenter's Redis,
    /// or only the active one's when the Redis tier moves) onto the active
    /// DB.
    async fn replay_all(&self, since_ms: i64) -> Result<(), FailoverError> {
        let tenants = self.opts.tenants.list().await?;
        let active = &self.route.active_datacenter;
        let db_url = &self.servers[active].admin_url;
        let mut failed = Vec::new();
        // With the Redis tier moving too, the active datacenter's Redis (the
        // promoted replica) holds every acknowledged like; the old one may
        // be gone for good.
        let sources = self.opts.config.datacenters.iter().filter(|dc| self.redis.is_empty() || dc.name == *active);
        for dc in sources {
            let url = dc.redis.admin_url().map_err(|e| FailoverError::Config(e.to_string()))?;
            // A cluster's admin URL carries cluster=true: the replay reads
            // each shard from the master that owns it.
            let con = thumbup_core::cache::admin_connect(&url, ACTION_TIMEOUT);
            // An unreachable Redis fails the replay, which is retried every
            // period while the promotion is pending: its streams may hold
            // the only copy of acknowledged writes.
            let mut con = match tokio::time::timeout(ACTION_TIMEOUT, con).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    failed.push(format!("{} Redis: {e}", dc.name));
                    continue;
                }
                Err(_) => {
                    failed.push(format!("{} Redis: no answer within {ACTION_TIMEOUT:?}", dc.name));
                    continue;
                }
            };
            let mut stale = Vec::new();
            for t in &tenants {
                match replay::replay(t, &mut con, db_url, since_ms).await {
                    Ok(r) => {
                        REPLAYED.inc_by(r.applied as u64);
                        info!(tenant = %t.name, redis = %dc.name, events = r.events, applied = r.applied,
                            invalidated = r.invalidated, malformed = r.malformed, "stream window replayed");
                        if !r.stale.is_empty() {
                            stale.push((t.name.clone(), r.stale));
                        }
                    }
                    Err(e) => {
                        warn!(tenant = %t.name, redis = %dc.name, error = %e, "replay failed");
                        failed.push(e.to_string());
                    }
                }
            }
            if !stale.is_empty() {
                tokio::time::sleep(SECOND_INVALIDATION).await;
                for (tenant, keys) in &stale {
                    if let Err(e) = replay::invalidate(tenant, &mut con, keys).await {
                        failed.push(e.to_string());
                    }
                }
            }
        }
        if failed.is_empty() { Ok(()) } else { Err(FailoverError::Tenants(failed.join("; "))) }
    }
}
