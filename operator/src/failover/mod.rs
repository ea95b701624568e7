//! The failover controller (leader only).
//!
//! Every probe period it probes each datacenter's DB (connect + query within
//! the probe timeout) and acts on what it sees:
//!
//! 1. A datacenter that is not active and answers writable is fenced
//!    (`read_only=ON`, tenant sessions ended): after a failover the old
//!    primary is fenced when it comes back.
//! 2. A promotion that did not finish (the controller died, or the new
//!    primary was briefly unreachable) is resumed.
//! 3. A change of `active_datacenter` in the operator config is a planned
//!    switchover: fence the active DB, wait until the standby has applied
//!    everything, flip the route, promote. Zero loss; the tenant jobs buffer
//!    in their streams during the short write pause.
//! 4. The active DB's failed probes are counted; after the threshold, over
//!    at least the grace period ([`decide`]), with a healthy standby and the
//!    cap not used up, it fails over: raises the epoch, records the failure,
//!    flips the route (the proxies follow), fences the old primary where
//!    reachable, promotes the standby and replays the recent stream window
//!    onto it ([`replay`]), so that windows acknowledged on the old primary
//!    but never replicated are not lost.
//!
//! The route document (`thumbup_core::route`) is the controller's memory: it
//! holds the epoch, the flips that count against the cap, the pending
//! promotion and the last transition, in a ConfigMap in a cluster or a file
//! out of one. Each change is published to every LikeTenant's status (with
//! an Event for flips and blocked failovers) and to the metrics. There is no
//! automatic failback.

pub mod db;
pub mod decide;
pub mod kube;
pub mod replay;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use ::kube::Api;
use ::kube::runtime::events::EventType;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ConfigMap;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec};
use thumbup_core::config::TenantConfig;
use thumbup_core::route::{Blocked, FailoverRecord, Route, Transition, TransitionKind};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::config::OperatorConfig;
use crate::crd::LikeTenant;
use crate::resources::{REGISTRY_KEY, parse_registry};
use decide::{Block, Failing, Settings, Verdict};
use replay::ReplayTenant;

/// How long after the replay its cached keys are deleted a second time.
const SECOND_INVALIDATION: Duration = Duration::from_secs(2);

/// How long a fence, catch-up read or promotion may take.
const ACTION_TIMEOUT: Duration = Duration::from_secs(15);

static EPOCH: LazyLock<IntGauge> = LazyLock::new(|| {
    let g = IntGauge::new("thumbup_operator_failover_epoch", "epoch of the DB route").expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("registered once");
    g
});
static FLIPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_failovers_total", "route flips by kind (Failover, Switchover)"),
        &["kind"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
static BLOCKED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_failover_blocked_total", "failovers due but not done, by reason"),
        &["reason"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
static PROBE_FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        prometheus::Opts::new("thumbup_operator_db_probe_failures_total", "failed DB probes by datacenter"),
        &["datacenter"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});
static STANDBY_LAG: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    let g = IntGaugeVec::new(
        prometheus::Opts::new(
            "thumbup_operator_standby_lag_seconds",
            "Seconds_Behind_Master of each replicating DB at its last probe; -1: not replicating (its SQL or IO \
             thread stopped, or no lag reported)",
        ),
        &["datacenter"],
    )
    .expect("valid metric");
    prometheus::register(Box::new(g.clone())).expect("registered once");
    g
});
static REPLAYED: LazyLock<IntCounter> = LazyLock::new(|| {
    let c = IntCounter::new(
        "thumbup_operator_failover_replayed_transitions_total",
        "writes that a replay applied to a promoted DB (they had not replicated)",
    )
    .expect("valid metric");
    prometheus::register(Box::new(c.clone())).expect("registered once");
    c
});

/// A step of the controller that failed.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// Reading or writing the route file.
    #[error("route file {path}: {detail}")]
    RouteFile {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// Reading or writing the route ConfigMap.
    #[error(transparent)]
    RouteConfigMap(#[from] kube::FailoverKubeError),
    /// The tenant list could not be read.
    #[error("tenant list: {0}")]
    Tenants(String),
    /// The operator config names no usable datacenters.
    #[error("operator config: {0}")]
    Config(String),
}

/// Where the route lives.
pub enum RouteStore {
    /// A YAML file (out of a cluster); proxies run with `--route-file`.
    File(PathBuf),
    /// The route ConfigMap; proxies watch it.
    ConfigMap {
        /// The ConfigMap.
        cm: Box<kube::RouteConfigMap>,
        /// Its resourceVersion as last read or written.
        version: Option<String>,
    },
}

impl RouteStore {
    /// The pending switchover request, if the store has one (the route
    /// ConfigMap's sibling; a route file has none). An unreadable request is
    /// logged and treated as none: it must not stop the probes.
    async fn switchover_request(&self) -> Option<kube::SwitchoverRequest> {
        match self {
            RouteStore::File(_) => None,
            RouteStore::ConfigMap { cm, .. } => match cm.switchover_request().await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "switchover request unreadable; ignored");
                    None
                }
            },
        }
    }

    async fn load(&mut self) -> Result<Option<Route>, FailoverError> {
        match self {
            RouteStore::File(path) => {
                let err = |detail: String| FailoverError::RouteFile { path: path.display().to_string(), detail };
                match std::fs::read_to_string(&*path) {
                    Ok(text) => Route::parse(&text).map(Some).map_err(|e| err(e.to_string())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(err(e.to_string())),
                }
            }
            RouteStore::ConfigMap { cm, version } => Ok(cm.load().await?.map(|(route, rv)| {
                *version = Some(rv);
                route
            })),
        }
    }

    async fn save(&mut self, route: &Route) -> Result<(), FailoverError> {
        match self {
            RouteStore::File(path) => {
                let err = |e: std::io::Error| FailoverError::RouteFile {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                };
                // Readers never see half a document: write aside, then rename.
                let tmp = path.with_extension("yaml.tmp");
                std::fs::write(&tmp, route.to_yaml()).map_err(err)?;
                std::fs::rename(&tmp, &*path).map_err(err)
            }
            RouteStore::ConfigMap { cm, version } => {
                *version = Some(cm.store(route, version.as_deref()).await?);
                Ok(())
            }
        }
    }
}

/// Where the tenant list comes from (for the replay): the same
/// `tenants.yaml` that the service reads.
pub enum TenantSource {
    /// A file (out of a cluster).
    File(PathBuf),
    /// The registry ConfigMap the tenant controller maintains.
    Registry(Box<Api<ConfigMap>>, String),
}

impl TenantSource {
    async fn list(&self) -> Result<Vec<ReplayTenant>, FailoverError> {
        let text = match self {
            TenantSource::File(path) => {
                std::fs::read_to_string(path).map_err(|e| FailoverError::Tenants(format!("{}: {e}", path.display())))?
            }
            TenantSource::Registry(api, name) => api
                .get_opt(name)
                .await
                .map_err(|e| FailoverError::Tenants(format!("ConfigMap {name}: {e}")))?
                .and_then(|cm| cm.data?.remove(REGISTRY_KEY))
                .unwrap_or_default(),
        };
        replay_tenants(&text)
    }
}

/// The tenants of a `tenants.yaml`, as the replay needs them.
pub fn replay_tenants(text: &str) -> Result<Vec<ReplayTenant>, FailoverError> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    // The entries as the service reads them (core's defaults for what an
    // entry leaves out); their credential files are not read here.
    let entries = parse_registry(text).map_err(|e| FailoverError::Tenants(e.to_string()))?;
    entries
        .into_iter()
        .map(|(name, v)| {
            let t: TenantConfig =
                serde_yaml::from_value(v).map_err(|e| FailoverError::Tenants(format!("tenant {name}: {e}")))?;
            Ok(ReplayTenant { shards: t.stream.shards, schema: t.schema(), name: t.name })
        })
        .collect()
}

/// Where status goes in a cluster: every LikeTenant, and Events.
pub struct Publisher {
    /// The LikeTenants (namespaced or all).
    pub tenants: Api<LikeTenant>,
    /// The client the Event recorder uses.
    pub client: ::kube::Client,
}

/// A flip, a blocked failover or a failed switchover, as told to people:
/// an Event on every LikeTenant in a cluster, a log line and the `notices`
/// channel out of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Warning (else Normal).
    pub warning: bool,
    /// CamelCase reason: Failover, Switchover, StandbyUnhealthy, ...
    pub reason: String,
    /// What the controller did or tried.
    pub action: String,
    /// Details.
    pub message: String,
}

/// What the controller runs with.
pub struct Options {
    /// The operator config as loaded.
    pub config: OperatorConfig,
    /// Its file, read again every period for `active_datacenter` (planned
    /// switchover); None: never re-read.
    pub config_path: Option<PathBuf>,
    /// The route.
    pub store: RouteStore,
    /// The tenants (for the replay).
    pub tenants: TenantSource,
    /// LikeTenant status and Events; None out of a cluster.
    pub publisher: Option<Publisher>,
    /// Every route the controller writes is also sent here (the tenant
    /// controller provisions on the active datacenter).
    pub route_tx: Option<watch::Sender<Option<Route>>>,
    /// Every notice is also sent here (out of a cluster, where there are no
    /// Events).
    pub notices: Option<mpsc::UnboundedSender<Notice>>,
}

impl Options {
    /// Out of a cluster: the route in `route_file`, the tenants from the
    /// service's `tenants_file`, the config re-read from `config_path`, and
    /// notices only in the log.
    pub fn local(config_path: PathBuf, route_file: PathBuf, tenants_file: PathBuf) -> Result<Options, FailoverError> {
        let config = OperatorConfig::load(&config_path).map_err(|e| FailoverError::Config(e.to_string()))?;
        Ok(Options {
            config,
            config_path: Some(config_path),
            store: RouteStore::File(route_file),
            tenants: TenantSource::File(tenants_file),
            publisher: None,
            route_tx: None,
            notices: None,
        })
    }
}

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
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (addr, server) = thumbup_core::admin::bind(admin, ready, stopped(stop_rx.clone())).await?;
    info!(%addr, "admin endpoint");
    let server = tokio::spawn(server);
    let stop = stop_tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let result = run(opts, stopped(stop_rx)).await;
    let _ = stop_tx.send(true);
    let _ = server.await;
    Ok(result?)
}

struct Controller {
    opts: Options,
    settings: Settings,
    period: Duration,
    probe_timeout: Duration,
    servers: BTreeMap<String, db::Server>,
    route: Route,
    failing: Failing,
    last_error: Option<String>,
    desired: String,
}

impl Controller {
    fn new(opts: Options) -> Result<Controller, FailoverError> {
        let f = &opts.config.failover;
        let mut servers = BTreeMap::new();
        let mut addresses = BTreeMap::new();
        for dc in &opts.config.datacenters {
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
            desired: opts.config.active_datacenter.clone(),
            route,
            failing: Failing::default(),
            last_error: None,
            opts,
        })
    }

    /// Takes the stored route, or stores the first one (epoch 1, the
    /// config's active datacenter). Addresses changed in the config take a
    /// new epoch, so every proxy reconnects.
    async fn start(&mut self) -> Result<(), FailoverError> {
        match self.opts.store.load().await? {
            Some(mut stored) => {
                if stored.datacenters != self.route.datacenters {
                    warn!(old = ?stored.datacenters, new = ?self.route.datacenters, "DB addresses changed; raising the epoch");
                    stored.datacenters = self.route.datacenters.clone();
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
    async fn announce(&self, notice: Option<Notice>) {
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

    async fn save_and_announce(&mut self, notice: Option<Notice>) -> Result<(), FailoverError> {
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
        let active = self.route.active_datacenter.clone();
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

        // 2. A promotion left unfinished.
        if self.route.failover.promotion_pending && probes[&active].is_ok() {
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
                return self.switch_over(&to, &probes, reason).await;
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
                return self.switch_over(&desired, &probes, reason).await;
            } else {
                self.save_and_announce(None).await?;
            }
        }

        // 4. The active DB's health.
        let now = Timestamp::now();
        match &probes[&active] {
            Ok(_) => {
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
                let (standby, health) = self.pick_standby(&probes);
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

    /// The first healthy standby, or why there is none.
    fn pick_standby(
        &self,
        probes: &BTreeMap<String, Result<db::Probe, db::DbError>>,
    ) -> (Option<String>, Result<(), String>) {
        let max_lag = Duration::from_millis(self.opts.config.failover.max_lag_ms);
        let mut why = Vec::new();
        for (dc, p) in probes {
            if *dc == self.route.active_datacenter {
                continue;
            }
            // A probe error names its datacenter already.
            match p {
                Err(e) => why.push(e.to_string()),
                Ok(p) => match p.standby_health(max_lag) {
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

    async fn block(&mut self, b: Block) -> Result<(), FailoverError> {
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

    async fn fail_over(&mut self, to: String, reason: String) -> Result<(), FailoverError> {
        let from = self.route.active_datacenter.clone();
        let started = Instant::now();
        error!(%from, %to, %reason, "failing over");
        self.flip(&to, TransitionKind::Failover, reason.clone()).await?;
        info!(epoch = self.route.epoch, took = ?started.elapsed(), "route flipped");
        match self.servers[&from].fence(ACTION_TIMEOUT.min(self.probe_timeout * 2)).await {
            Ok(n) => info!(datacenter = %from, sessions_ended = n, "old primary fenced"),
            Err(e) => warn!(datacenter = %from, error = %e, "old primary unreachable; fenced when it answers again"),
        }
        self.failing = Failing::default();
        self.finish_promotion().await?;
        let notice = Notice {
            warning: true,
            reason: "Failover".into(),
            action: "FailOver".into(),
            message: format!("DB route flipped from {from} to {to} at epoch {}: {reason}", self.route.epoch),
        };
        self.announce(Some(notice)).await;
        info!(took = ?started.elapsed(), "failover done");
        Ok(())
    }

    async fn switch_over(
        &mut self,
        to: &str,
        probes: &BTreeMap<String, Result<db::Probe, db::DbError>>,
        reason: String,
    ) -> Result<(), FailoverError> {
        let from = self.route.active_datacenter.clone();
        let max_lag = Duration::from_millis(self.opts.config.failover.max_lag_ms);
        let ready = match (&probes[&from], &probes[to]) {
            (Err(e), _) => Err(format!("the active DB does not answer: {e}")),
            (_, Err(e)) => Err(format!("{to} does not answer: {e}")),
            (Ok(_), Ok(p)) => p.standby_health(max_lag).map_err(|e| format!("{to}: {e}")),
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
        if let Err(e) = caught_up {
            if let Err(u) = self.servers[&from].unfence(ACTION_TIMEOUT).await {
                error!(datacenter = %from, error = %u, "could not make the active DB writable again");
            }
            return self.switchover_failed(to, e.to_string()).await;
        }
        self.flip(to, TransitionKind::Switchover, reason.clone()).await?;
        self.finish_promotion().await?;
        let pause = started.elapsed();
        info!(%from, %to, epoch = self.route.epoch, write_pause = ?pause, "planned switchover done");
        let notice = Notice {
            warning: false,
            reason: "Switchover".into(),
            action: "SwitchOver".into(),
            message: format!(
                "DB route switched from {from} to {to} at epoch {} (writes paused {} ms): {reason}",
                self.route.epoch,
                pause.as_millis()
            ),
        };
        self.announce(Some(notice)).await;
        Ok(())
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
    async fn finish_promotion(&mut self) -> Result<(), FailoverError> {
        let active = self.route.active_datacenter.clone();
        let started = Instant::now();
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

    /// Replays every tenant's stream window (from each datacenter's Redis
    /// that answers) onto the active DB.
    async fn replay_all(&self, since_ms: i64) -> Result<(), FailoverError> {
        let tenants = self.opts.tenants.list().await?;
        let active = &self.route.active_datacenter;
        let db_url = &self.servers[active].admin_url;
        let mut failed = Vec::new();
        for dc in &self.opts.config.datacenters {
            let url = dc.redis.admin_url().map_err(|e| FailoverError::Config(e.to_string()))?;
            let con = async {
                let client = thumbup_core::cache::admin_client(&url)?;
                client.get_multiplexed_async_connection().await
            };
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
