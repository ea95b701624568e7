//! The controller loop: the first route at start, then every probe period
//! the probes and what they call for (fence, resume a promotion, switch
//! over, fail over; the transitions themselves are in `transitions`).

use std::collections::BTreeMap;
use std::time::Duration;

use ::kube::runtime::events::EventType;
use jiff::Timestamp;
use thumbup_core::route::{FailoverRecord, Route};
use tracing::{error, info, warn};

use super::cluster::{self, ClusterSide};
use super::decide::{self, Failing, Settings, Verdict};
use super::metrics::{EPOCH, PROBE_FAILURES, STANDBY_LAG};
use super::redis::{RedisActionError, RedisServer, Tier, TierProbe};
use super::{FailoverError, Notice, Options, db, kube};
use crate::config::OperatorConfig;

/// How long a fence, catch-up read or promotion may take.
pub(super) const ACTION_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs the controller until `shutdown` resolves.
pub async fn run(opts: Options, shutdown: impl Future<Output = ()>) -> Result<(), FailoverError> {
    let mut c = Controller::new(opts)?;
    c.start().await?;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(c.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tick.tick() => {}
        }
        if let Err(e) = c.tick().await {
            error!(error = %e, "failover controller step failed; retrying next period");
        }
    }
}

/// [`run`] with the admin endpoint (metrics, health) on `admin`: the
/// out-of-cluster `thumbup-operator failover`.
pub async fn run_with_admin(
    opts: Options,
    admin: std::net::SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let admin = thumbup_core::admin::Admin::start(admin, ready, shutdown).await?;
    info!(addr = %admin.addr, "admin endpoint");
    let result = run(opts, admin.stopped()).await;
    admin.join().await;
    Ok(result?)
}

/// Each datacenter's Redis probe (empty without `failover.redis_tier`).
pub(super) type RedisProbes = BTreeMap<String, Result<TierProbe, RedisActionError>>;

pub(super) struct Controller {
    pub(super) opts: Options,
    pub(super) settings: Settings,
    pub(super) period: Duration,
    pub(super) probe_timeout: Duration,
    pub(super) servers: BTreeMap<String, db::Server>,
    /// Each datacenter's Redis when the Redis tier moves with the route
    /// (`failover.redis_tier`): one server, or its nodes of a cluster
    /// spanning the datacenters; empty otherwise.
    pub(super) redis: BTreeMap<String, Tier>,
    pub(super) route: Route,
    pub(super) failing: Failing,
    pub(super) last_error: Option<String>,
    pub(super) desired: String,
    /// Whether the tenants' solo flags are set on the active Redis (None:
    /// not known since the start).
    pub(super) solo: Option<bool>,
    /// Consecutive probes that found no replica linked to the active Redis.
    pub(super) unlinked: u32,
    /// The active datacenter's cluster nodes last asked to take their slots
    /// back, and when.
    pub(super) handbacks: BTreeMap<String, std::time::Instant>,
}

impl Controller {
    fn new(opts: Options) -> Result<Controller, FailoverError> {
        let f = &opts.config.failover;
        let mut servers = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        let mut redis = BTreeMap::new();
        let mut redis_addresses = BTreeMap::new();
        for dc in &opts.config.datacenters {
            if f.redis_tier && dc.redis.cluster {
                let config = |e: crate::config::ConfigError| FailoverError::Config(e.to_string());
                let auth = (dc.redis.admin_username.clone(), dc.redis.password().map_err(config)?);
                let nodes = dc
                    .redis
                    .node_admin_urls()
                    .map_err(config)?
                    .into_iter()
                    .map(|(address, admin_url)| RedisServer {
                        dc: dc.name.clone(),
                        admin_url,
                        address,
                        auth: auth.clone(),
                    })
                    .collect::<Vec<_>>();
                let cluster = nodes.iter().map(|n: &RedisServer| n.as_cluster_entry()).collect();
                let side = ClusterSide { dc: dc.name.clone(), nodes, cluster };
                // No address in the route: the clients speak to the cluster
                // itself, which moves its slots.
                redis.insert(dc.name.clone(), Tier::Cluster(side));
            } else if f.redis_tier {
                let config = |e: crate::config::ConfigError| FailoverError::Config(e.to_string());
                let address =
                    dc.redis.host_port().ok_or_else(|| FailoverError::Config(format!("{}: redis.url", dc.name)))?;
                redis.insert(
                    dc.name.clone(),
                    Tier::Server(RedisServer {
                        dc: dc.name.clone(),
                        admin_url: dc.redis.admin_url().map_err(config)?,
                        address: address.clone(),
                        auth: (dc.redis.admin_username.clone(), dc.redis.password().map_err(config)?),
                    }),
                );
                redis_addresses.insert(dc.name.clone(), address);
            }
            let admin_url = dc.db.admin_url().map_err(|e| FailoverError::Config(e.to_string()))?;
            let address = dc.db.host_port().ok_or_else(|| FailoverError::Config(format!("{}: db.url", dc.name)))?;
            servers.insert(
                dc.name.clone(),
                db::Server { dc: dc.name.clone(), admin_url, admin_user: dc.db.admin_username.clone() },
            );
            addresses.insert(dc.name.clone(), address);
        }
        let route = Route {
            epoch: 1,
            active_datacenter: opts.config.active_datacenter.clone(),
            datacenters: addresses,
            redis: redis_addresses,
            failover: FailoverRecord {
                requested_datacenter: Some(opts.config.active_datacenter.clone()),
                ..Default::default()
            },
        };
        Ok(Controller {
            settings: Settings::from(f),
            period: Duration::from_millis(f.probe_period_ms),
            probe_timeout: Duration::from_millis(f.probe_timeout_ms),
            servers,
            redis,
            desired: opts.config.active_datacenter.clone(),
            route,
            failing: Failing::default(),
            last_error: None,
            solo: None,
            unlinked: 0,
            handbacks: BTreeMap::new(),
            opts,
        })
    }

    /// Takes the stored route, or stores the first one (epoch 1, the
    /// config's active datacenter). Addresses changed in the config take a
    /// new epoch, so every proxy reconnects.
    async fn start(&mut self) -> Result<(), FailoverError> {
        match self.opts.store.load().await? {
            Some(mut stored) => {
                if stored.datacenters != self.route.datacenters || stored.redis != self.route.redis {
                    warn!(old = ?(&stored.datacenters, &stored.redis), new = ?(&self.route.datacenters, &self.route.redis),
                        "DB or Redis addresses changed; raising the epoch");
                    stored.datacenters = self.route.datacenters.clone();
                    stored.redis = self.route.redis.clone();
                    stored.epoch += 1;
                    if stored.validate().is_err() {
                        return Err(FailoverError::Config(format!(
                            "the route names {} which the config no longer lists",
                            stored.active_datacenter
                        )));
                    }
                    self.route = stored;
                    self.opts.store.save(&self.route).await?;
                } else {
                    self.route = stored;
                }
            }
            None => self.opts.store.save(&self.route).await?,
        }
        info!(epoch = self.route.epoch, active = %self.route.active_datacenter, "failover controller started");
        EPOCH.set(self.route.epoch as i64);
        self.announce(None).await;
        Ok(())
    }

    /// Sends the route to the tenant controller and LikeTenant status.
    pub(super) async fn announce(&self, notice: Option<Notice>) {
        if let Some(tx) = &self.opts.route_tx {
            tx.send_replace(Some(self.route.clone()));
        }
        match &notice {
            Some(n) if n.warning => warn!(reason = %n.reason, message = %n.message, "failover notice"),
            Some(n) => info!(reason = %n.reason, message = %n.message, "failover notice"),
            None => {}
        }
        if let (Some(n), Some(tx)) = (&notice, &self.opts.notices) {
            let _ = tx.send(n.clone());
        }
        if let Some(p) = &self.opts.publisher {
            let event = notice.map(|n| kube::FailoverNotice {
                type_: if n.warning { EventType::Warning } else { EventType::Normal },
                reason: n.reason,
                action: n.action,
                message: n.message,
            });
            match kube::publish(&p.tenants, &p.client, &self.route, event.as_ref()).await {
                Ok(n) => info!(tenants = n, "LikeTenant status updated from the route"),
                Err(e) => warn!(error = %e, "writing LikeTenant status failed; retried on the next change"),
            }
        }
    }

    pub(super) async fn save_and_announce(&mut self, notice: Option<Notice>) -> Result<(), FailoverError> {
        self.opts.store.save(&self.route).await?;
        EPOCH.set(self.route.epoch as i64);
        self.announce(notice).await;
        Ok(())
    }

    /// The active datacenter the config names now.
    fn desired(&mut self) -> String {
        if let Some(path) = &self.opts.config_path {
            match OperatorConfig::load(path) {
                Ok(c) => {
                    self.last_error = None;
                    self.desired = c.active_datacenter;
                }
                Err(e) => {
                    let e = e.to_string();
                    if self.last_error.as_ref() != Some(&e) {
                        warn!(error = %e, "operator config unreadable; keeping the last active_datacenter");
                        self.last_error = Some(e);
                    }
                }
            }
        }
        self.desired.clone()
    }

    async fn tick(&mut self) -> Result<(), FailoverError> {
        let desired = self.desired();
        let probes: BTreeMap<String, Result<db::Probe, db::DbError>> = futures::future::join_all(
            self.servers.iter().map(|(dc, s)| async { (dc.clone(), s.probe(self.probe_timeout).await) }),
        )
        .await
        .into_iter()
        .collect();
        let redis_probes = self.probe_redis().await;
        let active = self.route.active_datacenter.clone();
        for (dc, p) in &redis_probes {
            if p.is_err() {
                PROBE_FAILURES.with_label_values(&[dc]).inc();
            }
        }
        for (dc, p) in &probes {
            match p {
                Err(_) => PROBE_FAILURES.with_label_values(&[dc]).inc(),
                // The active DB replicates from no one: no lag series.
                Ok(_) if *dc == active => {
                    let _ = STANDBY_LAG.remove_label_values(&[dc]);
                }
                Ok(p) => {
                    let lag = p.replica.as_ref().and_then(|r| {
                        (r.io_running == "Yes" && r.sql_running == "Yes").then_some(r.lag_secs).flatten()
                    });
                    STANDBY_LAG.with_label_values(&[dc]).set(lag.map_or(-1, |l| l as i64));
                }
            }
        }

        // 1. Only the active DB takes writes.
        for (dc, p) in &probes {
            if *dc != active && matches!(p, Ok(p) if !p.read_only) {
                match self.servers[dc].fence(ACTION_TIMEOUT).await {
                    Ok(killed) => warn!(datacenter = %dc, sessions_ended = killed, "fenced a writable non-active DB"),
                    Err(e) => warn!(datacenter = %dc, error = %e, "fencing a writable non-active DB failed"),
                }
            }
        }

        // ... and only the active Redis: another one that answers as a
        // master becomes the active one's replica; a cluster's slots that
        // another datacenter's node took (the cluster's own failover of one
        // master) go back to the active datacenter's node once it
        // replicates that node again.
        if !self.route.failover.promotion_pending {
            self.fence_redis(&active, &redis_probes).await;
        }

        // The active Redis stands alone while no standby's Redis is linked
        // to it (for the failure threshold): writes then stop waiting for
        // a replica, and wait again once one is linked.
        if let Some(active_redis) = self.redis.get(&active).cloned()
            && let Some(Ok(active_probe)) = redis_probes.get(&active)
        {
            let address = self.route.active_redis_address().unwrap_or_default();
            let linked = redis_probes
                .iter()
                .any(|(dc, p)| *dc != active && matches!(p, Ok(p) if p.links(active_probe, address)));
            self.unlinked = if linked { 0 } else { self.unlinked + 1 };
            let alone = !linked && self.unlinked >= self.settings.failure_threshold;
            if linked || alone {
                self.mark_solo(&active_redis, alone).await;
            }
        }

        // 2. A promotion left unfinished.
        if self.route.failover.promotion_pending
            && probes[&active].is_ok()
            && redis_probes.get(&active).is_none_or(|p| p.is_ok())
        {
            self.finish_promotion().await?;
        }

        // 3. A planned switchover: asked for by a request (acted on once),
        // or by a new active_datacenter in the config.
        if let Some(request) = self.opts.store.switchover_request().await
            && self.route.failover.handled_request.as_deref() != Some(request.id.as_str())
        {
            self.route.failover.handled_request = Some(request.id.clone());
            let to = request.datacenter;
            info!(requested = %to, by = %request.requested_by, id = %request.id, "switchover request");
            if !self.servers.contains_key(&to) {
                warn!(requested = %to, "the switchover request names an unknown datacenter; ignored");
                let notice = Notice {
                    warning: true,
                    reason: "SwitchoverRefused".into(),
                    action: "SwitchOver".into(),
                    message: format!("switchover request {}: unknown datacenter {to}", request.id),
                };
                return self.save_and_announce(Some(notice)).await;
            } else if to != active {
                let reason =
                    format!("switchover to {to} requested by {} (request {})", request.requested_by, request.id);
                return self.switch_over(&to, &probes, &redis_probes, reason).await;
            } else {
                return self.save_and_announce(None).await;
            }
        }
        if self.route.failover.requested_datacenter.as_deref() != Some(desired.as_str()) {
            self.route.failover.requested_datacenter = Some(desired.clone());
            if !self.servers.contains_key(&desired) {
                warn!(requested = %desired, "the config names an unknown datacenter; ignored");
                self.save_and_announce(None).await?;
            } else if desired != active {
                let reason = format!("active_datacenter changed to {desired} in the operator config");
                return self.switch_over(&desired, &probes, &redis_probes, reason).await;
            } else {
                self.save_and_announce(None).await?;
            }
        }

        // 4. The active datacenter's health: its DB, and its Redis when the
        // Redis tier moves too.
        let now = Timestamp::now();
        let health = match (&probes[&active], redis_probes.get(&active)) {
            (Err(e), _) => Err(e.to_string()),
            (Ok(_), Some(Err(e))) => Err(e.to_string()),
            (Ok(_), _) => Ok(()),
        };
        match health {
            Ok(()) => {
                if self.failing.failures > 0 || self.route.failover.failing_since.is_some() {
                    info!(datacenter = %active, after = self.failing.failures, "the active DB answers again");
                    self.failing = Failing::default();
                    self.route.failover.failing_since = None;
                    self.route.failover.blocked = None;
                    self.save_and_announce(None).await?;
                }
                Ok(())
            }
            Err(e) => {
                self.failing.fail(now);
                warn!(datacenter = %active, failures = self.failing.failures, error = %e, "active DB probe failed");
                if self.route.failover.failing_since.is_none() {
                    self.route.failover.failing_since = self.failing.since;
                    self.save_and_announce(None).await?;
                }
                let (standby, health) = self.pick_standby(&probes, &redis_probes);
                let flips = self.route.failover.flips.clone();
                match decide::decide(&self.settings, &self.failing, now, &health, &flips) {
                    Verdict::Wait => Ok(()),
                    Verdict::FailOver => {
                        let reason = format!(
                            "{} failed {} consecutive probes since {}: {e}",
                            active,
                            self.failing.failures,
                            self.failing.since.unwrap_or(now)
                        );
                        self.fail_over(standby.expect("a healthy standby was picked"), reason).await
                    }
                    Verdict::Blocked(b) => self.block(b).await,
                }
            }
        }
    }

    /// Sets or clears the tenants' solo flags on `redis` (the active one),
    /// unless they already are so.
    pub(super) async fn mark_solo(&mut self, redis: &Tier, alone: bool) {
        if self.solo == Some(alone) {
            return;
        }
        let tenants = match self.opts.tenants.list().await {
            Ok(t) => t.into_iter().map(|t| t.name).collect::<Vec<_>>(),
            Err(e) => {
                warn!(error = %e, "tenant list unreadable; solo flags left as they are");
                return;
            }
        };
        let epoch = alone.then_some(self.route.epoch);
        match redis.set_solo(&tenants, epoch, ACTION_TIMEOUT).await {
            Ok(()) => {
                if alone {
                    warn!(datacenter = %redis.dc(), tenants = tenants.len(),
                        "no replica is linked to the active Redis: likes are acknowledged without one");
                } else {
                    info!(datacenter = %redis.dc(), tenants = tenants.len(),
                        "a replica is linked to the active Redis: likes wait for it again");
                }
                self.solo = Some(alone);
            }
            Err(e) => warn!(error = %e, "writing the solo flags failed; retried next period"),
        }
    }

    /// Makes every Redis but the active datacenter's a replica: a server
    /// that answers as a master follows the active one; a cluster's slots
    /// served by another datacenter's node go back to the active
    /// datacenter's node that replicates it.
    async fn fence_redis(&mut self, active: &str, probes: &RedisProbes) {
        let Some(master) = self.redis.get(active) else { return };
        for (dc, p) in probes {
            if dc == active {
                continue;
            }
            match (&self.redis[dc], master, p, probes.get(active)) {
                (Tier::Server(s), Tier::Server(m), Ok(TierProbe::Server(p)), _) if p.master => {
                    match s.follow(m, ACTION_TIMEOUT).await {
                        Ok(()) => warn!(datacenter = %dc,
                            "fenced a non-active Redis master: it now replicates the active one"),
                        Err(e) => warn!(datacenter = %dc, error = %e, "fencing a non-active Redis master failed"),
                    }
                }
                (Tier::Cluster(_), Tier::Cluster(m), Ok(TierProbe::Cluster(p)), Some(Ok(TierProbe::Cluster(ap))))
                    if !p.masters_here().is_empty() =>
                {
                    for r in cluster::hand_back(m, ap, p, &mut self.handbacks, ACTION_TIMEOUT).await {
                        match r {
                            Ok(node) => warn!(datacenter = %dc, node = %node,
                                "slots served in a non-active datacenter: handed back to the active one's node"),
                            Err(e) => warn!(datacenter = %dc, error = %e, "handing slots back failed"),
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Probes every datacenter's Redis (none when the Redis tier does not
    /// move with the route).
    pub(super) async fn probe_redis(&self) -> RedisProbes {
        futures::future::join_all(
            self.redis.iter().map(|(dc, r)| async { (dc.clone(), r.probe(self.probe_timeout).await) }),
        )
        .await
        .into_iter()
        .collect()
    }

    /// The first healthy standby, or why there is none.
    fn pick_standby(
        &self,
        probes: &BTreeMap<String, Result<db::Probe, db::DbError>>,
        redis_probes: &RedisProbes,
    ) -> (Option<String>, Result<(), String>) {
        let max_lag = Duration::from_millis(self.opts.config.failover.max_lag_ms);
        let active_redis = self.route.active_redis_address().unwrap_or_default();
        let mut why = Vec::new();
        for (dc, p) in probes {
            if *dc == self.route.active_datacenter {
                continue;
            }
            // A probe error names its datacenter already.
            let redis = match redis_probes.get(dc) {
                None => Ok(()),
                Some(Err(e)) => Err(e.to_string()),
                Some(Ok(r)) => r.standby_health(active_redis).map_err(|e| format!("{dc}: {e}")),
            };
            match (p, redis) {
                (Err(e), _) => why.push(e.to_string()),
                (Ok(_), Err(e)) => why.push(e),
                (Ok(p), Ok(())) => match p.standby_health(max_lag) {
                    Ok(()) => return (Some(dc.clone()), Ok(())),
                    Err(e) => why.push(format!("{dc}: {e}")),
                },
            }
        }
        if why.is_empty() {
            why.push("no other datacenter is configured".into());
        }
        (None, Err(why.join("; ")))
    }
}
