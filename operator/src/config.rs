//! The operator's own config file (`operator.yaml`, rendered by the Helm chart
//! into a ConfigMap; admin passwords come from files mounted from a Secret).
//!
//! ```yaml
//! active_datacenter: dc-a
//! registry: { config_map: thumbup-tenants, secret: thumbup-tenant-credentials }
//! job: { image: "thumbup/thumbup:0.1.0", image_pull_policy: IfNotPresent }
//! datacenters:
//!   - name: dc-a
//!     db: { url: "mysql://mariadb-dc-a:3306", admin_username: root, admin_password_file: /etc/thumbup-operator/secrets/dc-a-db-password }
//!     redis: { url: "redis://redis-dc-a:6379", admin_username: default, admin_password: inline-for-local-runs }
//!   - name: dc-b
//!     # TLS: the CA files are mounted at the same path in the operator, the
//!     # service and the job pods (the chart's tls.db / tls.redis).
//!     db: { url: "mysql://mariadb-dc-b:3306", admin_username: root, admin_password_file: /x,
//!           tls: { mode: verify-ca, ca_file: /etc/thumbup/tls/db/ca.crt } }
//!     redis: { url: "rediss://redis-dc-b:6380", admin_username: default, admin_password_file: /y,
//!              tls: { ca_file: /etc/thumbup/tls/redis/ca.crt } }
//! # Optional: a job Deployment per tenant per datacenter, pinned to the
//! # datacenter's zone, reading from its own datacenter (needs db_proxy on
//! # and failover.redis_tier); a datacenter's `zone` defaults to its name.
//! topology: { per_datacenter: true, zone_label: topology.kubernetes.io/zone }
//! ```

use std::path::Path;

use k8s_openapi::api::core::v1::ResourceRequirements;
use serde::Deserialize;
use thumbup_core::config::{DbTls, DbTlsMode, RedisTls};

/// A config that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The YAML does not parse into the schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        source: serde_yaml::Error,
    },
    /// A value breaks a rule.
    #[error("invalid operator config: {0}")]
    Invalid(String),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OperatorConfig {
    /// The datacenter whose DB takes writes when no route exists yet. Later,
    /// a change of this value requests a planned switchover to the datacenter
    /// it names; after an unplanned failover it is not acted on until it
    /// changes again (no automatic failback).
    pub active_datacenter: String,
    /// The datacenters: the active one and its standby.
    pub datacenters: Vec<Datacenter>,
    /// The registry objects that the service mounts.
    #[serde(default)]
    pub registry: Registry,
    /// How tenant jobs run.
    #[serde(default)]
    pub job: JobTemplate,
    /// The db-proxy sidecar beside every service and job process.
    #[serde(default)]
    pub db_proxy: DbProxy,
    /// The failover controller.
    #[serde(default)]
    pub failover: Failover,
    /// Where the tenants' job pods run: one Deployment, or one per
    /// datacenter pinned to its zone.
    #[serde(default)]
    pub topology: Topology,
    /// Names this installation in the ownership records that it writes
    /// beside every DB schema, DB user and Redis ACL user it creates
    /// (letters, digits, `-`, `_`, `.`, `/`; at most 128). Defaults to the
    /// operator's namespace. Installations sharing a DB or Redis must have
    /// different ids: neither then takes over the other's accounts.
    #[serde(default)]
    pub installation_id: Option<String>,
}

/// The db-proxy sidecar: the service and job reach the DB only through it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DbProxy {
    /// Whether tenants reach the DB through the sidecar. Off, the registry
    /// and the job point at the active datacenter's `db.url` directly (no
    /// failover for the data plane).
    pub enabled: bool,
    /// Image holding `thumbup-db-proxy`. Defaults to the job image.
    pub image: Option<String>,
    /// Port the sidecar listens on, on the pod's loopback.
    pub port: u16,
    /// Port of its admin endpoint (metrics, health, route).
    pub admin_port: u16,
    /// Port of its Redis listener, on the pod's loopback, used when the
    /// Redis tier moves with the route (`failover.redis_tier`).
    pub redis_port: u16,
    /// Port of its local-read DB listener (`--local-listen`: this pod's
    /// own datacenter's DB), used with `topology.per_datacenter`.
    pub local_port: u16,
    /// Port of its local-read Redis listener (`--local-redis-listen`: this
    /// pod's own datacenter's Redis), used with `topology.per_datacenter`.
    pub local_redis_port: u16,
    /// CPU and memory of each sidecar container.
    pub resources: Option<ResourceRequirements>,
}

impl Default for DbProxy {
    fn default() -> Self {
        DbProxy {
            enabled: true,
            image: None,
            port: 3306,
            admin_port: 9193,
            redis_port: 6379,
            local_port: 3307,
            local_redis_port: 6380,
            resources: None,
        }
    }
}

impl DbProxy {
    /// The DB URL that tenants use when the sidecar is on.
    pub fn url(&self) -> String {
        format!("mysql://127.0.0.1:{}", self.port)
    }

    /// The Redis URL that tenants use when the sidecar forwards Redis too.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.redis_port)
    }

    /// The DB URL that tenants read from with `topology.per_datacenter`:
    /// the sidecar's listener for the pod's own datacenter.
    pub fn local_url(&self) -> String {
        format!("mysql://127.0.0.1:{}", self.local_port)
    }

    /// The Redis URL that tenants read from with `topology.per_datacenter`.
    pub fn local_redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.local_redis_port)
    }
}

/// Where the tenants' job pods run (the chart's `topology.*` does the same
/// for the service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    /// One job Deployment per tenant per datacenter (named
    /// `thumbup-job-<tenant>-<datacenter>`), each pinned by a nodeSelector
    /// to its datacenter's zone, its db-proxy sidecar started with
    /// `--datacenter` and the local-read listeners; the registry entry
    /// then reads from those listeners (`local_reads`). Needs
    /// `db_proxy.enabled` and `failover.redis_tier`. Off: one Deployment,
    /// placed anywhere.
    pub per_datacenter: bool,
    /// The node label whose value is a datacenter's zone.
    pub zone_label: String,
}

impl Default for Topology {
    fn default() -> Self {
        Topology { per_datacenter: false, zone_label: "topology.kubernetes.io/zone".into() }
    }
}

/// The failover controller's settings. Durations are whole milliseconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Failover {
    /// Whether the controller runs (probes, failover, switchover).
    pub enabled: bool,
    /// Name of the route ConfigMap (in the operator's namespace).
    pub route_config_map: String,
    /// How often each DB is probed.
    pub probe_period_ms: u64,
    /// Connect + query deadline of one probe.
    pub probe_timeout_ms: u64,
    /// Consecutive failed probes of the active DB before a failover.
    pub failure_threshold: u32,
    /// The failed probes must also span at least this long.
    pub grace_period_ms: u64,
    /// Unplanned failovers allowed per `cap_window_ms`.
    pub cap: u32,
    /// The window of the cap.
    pub cap_window_ms: u64,
    /// How far back the tenant streams are replayed onto a promoted standby;
    /// at least the replication-lag bound, at most the stream retention.
    pub replay_window_ms: u64,
    /// A standby further behind than this is not healthy.
    pub max_lag_ms: u64,
    /// How long a planned switchover waits for the standby to catch up
    /// before it gives up and unfences the active DB.
    pub catch_up_timeout_ms: u64,
    /// The Redis tier moves with the route. Either each datacenter's Redis
    /// is a single server, the standby's a replica of the active one's; the
    /// probes cover both tiers, a flip promotes the standby's Redis and
    /// makes the old one its replica, and the proxies (`--redis-listen`)
    /// forward Redis sessions to the active datacenter. Or every
    /// datacenter's `redis` (`cluster: true`) lists its own nodes of one
    /// Redis Cluster spanning them, the active datacenter's nodes the
    /// masters with a replica each in the standby: a flip moves every
    /// slot with `CLUSTER FAILOVER` (TAKEOVER when the masters are gone),
    /// and the tenants reach the cluster through every datacenter's nodes.
    /// Give the tenants `redis.replica_acks` of at least 1 (see
    /// docs/failover.md).
    pub redis_tier: bool,
}

impl Default for Failover {
    fn default() -> Self {
        Failover {
            enabled: true,
            route_config_map: thumbup_core::route::ROUTE_CONFIG_MAP.into(),
            probe_period_ms: 2_000,
            probe_timeout_ms: 1_000,
            failure_threshold: 3,
            grace_period_ms: 3_000,
            cap: 1,
            cap_window_ms: 3_600_000,
            replay_window_ms: 120_000,
            max_lag_ms: 30_000,
            catch_up_timeout_ms: 30_000,
            redis_tier: false,
        }
    }
}

/// One datacenter's DB and Redis.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Datacenter {
    /// Name, e.g. `dc-a`.
    pub name: String,
    /// The DB (MySQL protocol).
    pub db: Endpoint<DbTls>,
    /// The Redis.
    pub redis: Endpoint<RedisTls>,
    /// The value of the nodes' `topology.zone_label` in this datacenter
    /// (with `topology.per_datacenter`). Defaults to the name.
    #[serde(default)]
    pub zone: Option<String>,
}

impl Datacenter {
    /// The zone whose nodes run this datacenter's pods: `zone`, else the name.
    pub fn zone(&self) -> &str {
        self.zone.as_deref().unwrap_or(&self.name)
    }
}

/// A server, the address the service and job use, admin credentials and
/// TLS settings (`T`: [`DbTls`] or [`RedisTls`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint<T> {
    /// `mysql://host:port` or `redis://host:port`, as the service and job reach it.
    pub url: String,
    /// The URL the operator itself uses, when it differs (out-of-cluster runs,
    /// port-forwards). Defaults to `url`.
    #[serde(default)]
    pub admin_url: Option<String>,
    /// Admin user: creates schemas and users (DB) or ACL users (Redis).
    pub admin_username: String,
    /// Admin password, inline (for local runs).
    #[serde(default)]
    pub admin_password: Option<String>,
    /// File holding the admin password (a mounted Secret key).
    #[serde(default)]
    pub admin_password_file: Option<String>,
    /// TLS to this server, for the operator's admin connections and, in the
    /// registry it writes, for the service and the jobs. `ca_file` is a
    /// path that every one of those pods mounts.
    #[serde(default = "Option::default")]
    pub tls: Option<T>,
    /// Redis only: `url` is a node of a Redis Cluster. The service, the
    /// jobs and the operator speak to the cluster (slot routing, MOVED/ASK,
    /// failovers); provisioning reaches every node.
    #[serde(default)]
    pub cluster: bool,
    /// Redis only, with `cluster`: more seed nodes (`redis://host:port`).
    #[serde(default)]
    pub seeds: Vec<String>,
    /// Redis only: replicas that must hold a like before it is
    /// acknowledged (`WAIT`; see the tenant config's `redis.replica_acks`).
    /// Default 0; give 1 for a cluster whose masters each have a replica.
    #[serde(default)]
    pub replica_acks: u32,
}

/// Names of the registry objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// ConfigMap with `tenants.yaml`.
    pub config_map: String,
    /// Secret with every tenant's passwords and tokens.
    pub secret: String,
}

impl Default for Registry {
    fn default() -> Self {
        Registry { config_map: "thumbup-tenants".into(), secret: "thumbup-tenant-credentials".into() }
    }
}

/// How tenant job pods run.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobTemplate {
    /// Image holding `thumbup-job`.
    pub image: String,
    /// Pull policy of that image.
    pub image_pull_policy: String,
    /// CPU and memory of each job container.
    pub resources: Option<ResourceRequirements>,
    /// Secrets holding the CA files that the datacenters' `tls.ca_file`
    /// name, mounted into every job pod at those paths. They must exist in
    /// each tenant's namespace (the release namespace unless the operator
    /// watches every namespace).
    pub ca_secrets: Vec<CaSecret>,
    /// The job pods' log format (`THUMBUP_LOG_FORMAT`): `text` or `json`.
    pub log_format: String,
}

/// A Secret key holding a CA file, and where the file appears in a pod.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaSecret {
    /// The Secret.
    pub secret: String,
    /// Its key holding the PEM CA certificates.
    #[serde(default = "default_ca_key")]
    pub key: String,
    /// The absolute path of the file in the pod (a datacenter's
    /// `tls.ca_file`); its directory is the mount and holds only this file.
    pub file: String,
}

fn default_ca_key() -> String {
    "ca.crt".into()
}

impl CaSecret {
    /// The mount directory and file name of [`CaSecret::file`].
    pub fn dir_and_name(&self) -> Option<(&str, &str)> {
        let (dir, name) = self.file.rsplit_once('/')?;
        (dir.starts_with('/') && !name.is_empty()).then_some((dir, name))
    }
}

impl Default for JobTemplate {
    fn default() -> Self {
        JobTemplate {
            image: format!("thumbup/thumbup:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".into(),
            resources: None,
            ca_secrets: Vec::new(),
            log_format: "text".into(),
        }
    }
}

impl OperatorConfig {
    /// Reads and validates the file.
    pub fn load(path: &Path) -> Result<OperatorConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        OperatorConfig::parse(&text, &p)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<OperatorConfig, ConfigError> {
        let c: OperatorConfig =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.into(), source })?;
        if c.datacenters.is_empty() {
            return Err(ConfigError::Invalid("at least one datacenter is required".into()));
        }
        if c.datacenter(&c.active_datacenter).is_none() {
            return Err(ConfigError::Invalid(format!("active_datacenter {:?} is not listed", c.active_datacenter)));
        }
        let f = &c.failover;
        if f.failure_threshold == 0 || f.probe_period_ms == 0 || f.probe_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "failover: failure_threshold, probe_period_ms and probe_timeout_ms must be positive".into(),
            ));
        }
        if f.replay_window_ms < f.max_lag_ms {
            return Err(ConfigError::Invalid(format!(
                "failover: replay_window_ms ({}) must be at least max_lag_ms ({}): a standby may lag that much",
                f.replay_window_ms, f.max_lag_ms
            )));
        }
        if let Some(id) = &c.installation_id
            && (id.is_empty()
                || id.len() > 128
                || !id.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_./".contains(ch)))
        {
            return Err(ConfigError::Invalid(format!(
                "installation_id {id:?} may hold only letters, digits, '-', '_', '.' and '/' (at most 128)"
            )));
        }
        if !["text", "json"].contains(&c.job.log_format.as_str()) {
            return Err(ConfigError::Invalid(format!("job.log_format {:?}: must be text or json", c.job.log_format)));
        }
        let mut dirs: Vec<&str> = Vec::new();
        for ca in &c.job.ca_secrets {
            let Some((dir, _)) = ca.dir_and_name() else {
                return Err(ConfigError::Invalid(format!(
                    "job.ca_secrets: file {:?} must be an absolute path",
                    ca.file
                )));
            };
            if dirs.contains(&dir) {
                return Err(ConfigError::Invalid(format!(
                    "job.ca_secrets: two files in {dir}: one CA file per directory"
                )));
            }
            dirs.push(dir);
        }
        c.validate_topology()?;
        let mut names: Vec<&str> = c.datacenters.iter().map(|d| d.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!("datacenter names must be unique: {names:?}")));
        }
        for dc in &c.datacenters {
            if dc.db.host_port().is_none() {
                return Err(ConfigError::Invalid(format!("{}: db.url must be mysql://host:port", dc.name)));
            }
            if !dc.db.url.starts_with("mysql://") || !dc.redis.url.starts_with("redis") {
                return Err(ConfigError::Invalid(format!("{}: db.url must be mysql://, redis.url redis://", dc.name)));
            }
            if dc.db.cluster || !dc.db.seeds.is_empty() || dc.db.replica_acks > 0 {
                return Err(ConfigError::Invalid(format!(
                    "{}: cluster, seeds and replica_acks are Redis settings, not the DB's",
                    dc.name
                )));
            }
            if c.failover.redis_tier && dc.redis.cluster != c.active().redis.cluster {
                return Err(ConfigError::Invalid(format!(
                    "{}: failover.redis_tier needs every datacenter's Redis to be one server, or every one its nodes of one cluster (redis.cluster)",
                    dc.name
                )));
            }
            if c.failover.redis_tier && dc.redis.host_port().is_none() {
                return Err(ConfigError::Invalid(format!(
                    "{}: failover.redis_tier needs redis.url to be redis://host:port",
                    dc.name
                )));
            }
            if c.failover.redis_tier && dc.redis.cluster && dc.redis.replica_acks == 0 {
                return Err(ConfigError::Invalid(format!(
                    "{}: failover.redis_tier with a cluster needs redis.replica_acks of at least 1: a like is safe from the loss of its datacenter only once the other datacenter's replica holds it",
                    dc.name
                )));
            }
            if !dc.redis.cluster && !dc.redis.seeds.is_empty() {
                return Err(ConfigError::Invalid(format!("{}: redis.seeds need redis.cluster: true", dc.name)));
            }
            if dc.redis.tls.is_some() && !dc.redis.url.starts_with("rediss://") {
                return Err(ConfigError::Invalid(format!(
                    "{}: redis.tls is set: redis.url must be rediss://",
                    dc.name
                )));
            }
            // Through db-proxy the client dials 127.0.0.1, a name that the
            // DB's certificate does not hold.
            if c.db_proxy.enabled && dc.db.tls.as_ref().is_some_and(|t| t.mode == DbTlsMode::VerifyIdentity) {
                return Err(ConfigError::Invalid(format!(
                    "{}: db.tls.mode verify-identity cannot hold through db-proxy (tenants dial 127.0.0.1): use verify-ca with a private CA",
                    dc.name
                )));
            }
            for (admin_password, admin_password_file) in [
                (&dc.db.admin_password, &dc.db.admin_password_file),
                (&dc.redis.admin_password, &dc.redis.admin_password_file),
            ] {
                if admin_password.is_some() == admin_password_file.is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "{}: give exactly one of admin_password and admin_password_file",
                        dc.name
                    )));
                }
            }
        }
        Ok(c)
    }

    /// What `topology.per_datacenter` needs: the sidecar with its Redis
    /// listener (the registry entry must not follow the route: it is the
    /// same for every datacenter's pods), distinct sidecar ports, and
    /// datacenter names that can end a Deployment name.
    fn validate_topology(&self) -> Result<(), ConfigError> {
        let t = &self.topology;
        if !t.per_datacenter {
            return Ok(());
        }
        if self.redis_tier_cluster() {
            return Err(ConfigError::Invalid(
                "topology.per_datacenter reads through the sidecar's local listeners, which forward to one Redis server per datacenter, not to a cluster's nodes".into(),
            ));
        }
        if !self.db_proxy.enabled || !self.failover.redis_tier {
            return Err(ConfigError::Invalid(
                "topology.per_datacenter needs db_proxy.enabled and failover.redis_tier: the pods of every datacenter read through their sidecar's local listeners and write through the ones that follow the route".into(),
            ));
        }
        if t.zone_label.trim().is_empty() {
            return Err(ConfigError::Invalid("topology.zone_label is empty".into()));
        }
        let p = &self.db_proxy;
        let mut ports = [p.port, p.admin_port, p.redis_port, p.local_port, p.local_redis_port];
        ports.sort_unstable();
        if ports.windows(2).any(|w| w[0] == w[1]) || ports[0] == 0 {
            return Err(ConfigError::Invalid(format!(
                "db_proxy: port, admin_port, redis_port, local_port and local_redis_port must be distinct and non-zero: {ports:?}"
            )));
        }
        for dc in &self.datacenters {
            let n = &dc.name;
            let label = !n.is_empty()
                && n.len() <= 20
                && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !n.starts_with('-')
                && !n.ends_with('-');
            if !label {
                return Err(ConfigError::Invalid(format!(
                    "topology.per_datacenter: datacenter name {n:?} ends the job Deployments' names: lowercase letters, digits and '-', at most 20"
                )));
            }
            if dc.zone().trim().is_empty() {
                return Err(ConfigError::Invalid(format!("{n}: zone is empty")));
            }
            // thumbup-job-<tenant>-<dc>: with datacenters `b` and `a-b`,
            // tenant `x-a` in `b` and tenant `x` in `a-b` would share a name.
            if let Some(other) = self.datacenters.iter().find(|o| n.ends_with(&format!("-{}", o.name))) {
                return Err(ConfigError::Invalid(format!(
                    "topology.per_datacenter: datacenter name {n:?} ends with \"-{}\", another datacenter's name: two tenants' job Deployments could share a name",
                    other.name
                )));
            }
        }
        Ok(())
    }

    /// The datacenter named `name`.
    pub fn datacenter(&self, name: &str) -> Option<&Datacenter> {
        self.datacenters.iter().find(|d| d.name == name)
    }

    /// The installation id of the ownership records: `installation_id`, else
    /// `namespace` (the operator's).
    pub fn installation(&self, namespace: &str) -> String {
        self.installation_id.clone().unwrap_or_else(|| namespace.to_string())
    }

    /// Whether the Redis tier that moves with the route is one cluster
    /// spanning the datacenters (`failover.redis_tier` and `redis.cluster`).
    pub fn redis_tier_cluster(&self) -> bool {
        self.failover.redis_tier && self.datacenters.iter().all(|d| d.redis.cluster)
    }

    /// The active datacenter (validated to exist).
    pub fn active(&self) -> &Datacenter {
        self.datacenter(&self.active_datacenter).expect("validated at load")
    }
}

impl<T> Endpoint<T> {
    /// `host:port` of `url` (what db-proxy dials), if it has both.
    pub fn host_port(&self) -> Option<String> {
        let rest = self.url.split_once("://")?.1;
        let hp = rest.rsplit_once('@').map_or(rest, |(_, hp)| hp).split('/').next()?;
        let (host, port) = hp.rsplit_once(':')?;
        (!host.is_empty() && port.parse::<u16>().is_ok()).then(|| hp.to_string())
    }

    /// The admin password, read from its file on every call so that a rotated
    /// Secret is picked up without a restart.
    pub fn password(&self) -> Result<String, ConfigError> {
        match (&self.admin_password, &self.admin_password_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) => std::fs::read_to_string(f)
                .map(|s| s.trim_end().to_string())
                .map_err(|source| ConfigError::Read { path: f.clone(), source }),
            (None, None) => Err(ConfigError::Invalid("no admin password".into())),
        }
    }

    /// `scheme://user:password@host:port` for the admin connection.
    fn admin_url_with(&self, params: &[(&str, &str)]) -> Result<String, ConfigError> {
        let base = self.admin_url.as_deref().unwrap_or(&self.url);
        let (scheme, rest) =
            base.split_once("://").ok_or_else(|| ConfigError::Invalid(format!("{base}: no scheme")))?;
        let pw = self.password()?;
        let mut url = format!("{scheme}://{}:{}@{rest}", encode(&self.admin_username), encode(&pw));
        for (i, (k, v)) in params.iter().enumerate() {
            let sep = if i == 0 && !url.contains('?') { '?' } else { '&' };
            url.push_str(&format!("{sep}{k}={v}"));
        }
        Ok(url)
    }
}

impl Endpoint<DbTls> {
    /// `mysql://user:password@host:port` for the admin connection, with the
    /// TLS settings as sqlx's URL parameters (`ssl-mode`, `ssl-ca`).
    pub fn admin_url(&self) -> Result<String, ConfigError> {
        let Some(tls) = &self.tls else { return self.admin_url_with(&[]) };
        let mode = match tls.mode {
            DbTlsMode::Required => "REQUIRED",
            DbTlsMode::VerifyCa => "VERIFY_CA",
            DbTlsMode::VerifyIdentity => "VERIFY_IDENTITY",
        };
        match &tls.ca_file {
            Some(ca) => self.admin_url_with(&[("ssl-mode", mode), ("ssl-ca", ca)]),
            None => self.admin_url_with(&[("ssl-mode", mode)]),
        }
    }
}

impl Endpoint<RedisTls> {
    /// `redis[s]://user:password@host:port` for the admin connection, with
    /// the CA file as [`thumbup_core::cache::ADMIN_CA_PARAM`].
    pub fn admin_url(&self) -> Result<String, ConfigError> {
        let mut params = Vec::new();
        if let Some(ca) = self.tls.as_ref().and_then(|t| t.ca_file.as_deref()) {
            params.push((thumbup_core::cache::ADMIN_CA_PARAM, ca));
        }
        if self.cluster {
            params.push((thumbup_core::cache::ADMIN_CLUSTER_PARAM, "true"));
        }
        self.admin_url_with(&params)
    }

    /// Each node a cluster's `url` and `seeds` name, as `(host:port, admin
    /// URL of that node alone)`; one server's own otherwise.
    pub fn node_admin_urls(&self) -> Result<Vec<(String, String)>, ConfigError> {
        std::iter::once(&self.url)
            .chain(&self.seeds)
            .map(|url| {
                let node =
                    Endpoint { url: url.clone(), admin_url: None, cluster: false, seeds: Vec::new(), ..self.clone() };
                let address =
                    node.host_port().ok_or_else(|| ConfigError::Invalid(format!("{url}: not redis://host:port")))?;
                Ok((address, node.admin_url()?))
            })
            .collect()
    }
}

/// Percent-encodes what may not appear in a URL's user-info.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
active_datacenter: dc-a
datacenters:
  - name: dc-a
    db: { url: "mysql://db-a:3306", admin_username: root, admin_password: "p@ss:w/rd" }
    redis: { url: "redis://redis-a:6379", admin_username: default, admin_password: pw }
"#;

    #[test]
    fn admin_urls_carry_encoded_credentials_and_defaults_apply() {
        let c = OperatorConfig::parse(GOOD, "test").unwrap();
        assert_eq!(c.active().db.admin_url().unwrap(), "mysql://root:p%40ss%3Aw%2Frd@db-a:3306");
        assert_eq!(c.registry.config_map, "thumbup-tenants");
        assert!(c.job.image.starts_with("thumbup/thumbup:"));
    }

    #[test]
    fn a_redis_cluster_reaches_the_admin_url_and_the_tenant_config_and_db_cluster_settings_are_refused() {
        let text = GOOD.replace(
            "redis://redis-a:6379\", admin_username: default, admin_password: pw }",
            "redis://redis-a:6379\", admin_username: default, admin_password: pw, cluster: true, seeds: [\"redis://redis-a2:6379\"], replica_acks: 1 }",
        );
        let c = OperatorConfig::parse(&text, "test").unwrap();
        let dc = c.active();
        assert_eq!(dc.redis.admin_url().unwrap(), "redis://default:pw@redis-a:6379?cluster=true");
        assert_eq!((dc.redis.cluster, dc.redis.seeds.len(), dc.redis.replica_acks), (true, 1, 1));
        let err = OperatorConfig::parse(&text.replace("cluster: true, ", ""), "test").unwrap_err().to_string();
        assert!(err.contains("redis.seeds need redis.cluster: true"), "{err}");
        let db = GOOD.replace(r#"admin_password: "p@ss:w/rd" }"#, r#"admin_password: "x", cluster: true }"#);
        let err = OperatorConfig::parse(&db, "test").unwrap_err().to_string();
        assert!(err.contains("Redis settings, not the DB's"), "{err}");
    }

    #[test]
    fn the_redis_tier_is_one_server_per_datacenter_or_one_cluster_spanning_them_with_replica_acks() {
        let cluster = |n: &str, acks: u32| {
            format!(
                "redis://redis-{n}:6379\", admin_username: default, admin_password: pw, cluster: true, seeds: [\"redis://redis-{n}2:6379\"], replica_acks: {acks} }}"
            )
        };
        let two = format!(
            "{GOOD}  - name: dc-b\n    db: {{ url: \"mysql://db-b:3306\", admin_username: root, admin_password: x }}\n    redis: {{ url: \"redis://redis-b:6379\", admin_username: default, admin_password: pw }}\n"
        );
        let both = two
            .replacen("redis://redis-a:6379\", admin_username: default, admin_password: pw }", &cluster("a", 1), 1)
            .replacen("redis://redis-b:6379\", admin_username: default, admin_password: pw }", &cluster("b", 1), 1);
        let tier = format!("{both}failover: {{ redis_tier: true }}\n");
        let c = OperatorConfig::parse(&tier, "test").unwrap();
        assert!(c.redis_tier_cluster());
        let nodes = c.active().redis.node_admin_urls().unwrap();
        assert_eq!(
            nodes,
            vec![
                ("redis-a:6379".to_string(), "redis://default:pw@redis-a:6379".to_string()),
                ("redis-a2:6379".to_string(), "redis://default:pw@redis-a2:6379".to_string()),
            ]
        );
        for (text, err) in [
            (
                tier.replacen(
                    &cluster("b", 1),
                    "redis://redis-b:6379\", admin_username: default, admin_password: pw }",
                    1,
                ),
                "every one its nodes of one cluster",
            ),
            (tier.replacen(&cluster("b", 1), &cluster("b", 0), 1), "replica_acks of at least 1"),
            (
                format!("{tier}db_proxy: {{ enabled: true }}\ntopology: {{ per_datacenter: true }}\n"),
                "not to a cluster's nodes",
            ),
        ] {
            let e = OperatorConfig::parse(&text, "test").unwrap_err().to_string();
            assert!(e.contains(err), "{e}");
        }
    }

    #[test]
    fn tls_settings_become_the_admin_urls_parameters() {
        let text = GOOD
            .replace(
                r#"admin_password: "p@ss:w/rd" }"#,
                r#"admin_password: "pw", tls: { mode: verify-ca, ca_file: /tls/db-ca.crt } }"#,
            )
            .replace("redis://redis-a:6379\", admin_username: default, admin_password: pw }", "rediss://redis-a:6380\", admin_username: default, admin_password: pw, tls: { ca_file: /tls/redis-ca.crt } }");
        let c = OperatorConfig::parse(&text, "test").unwrap();
        let dc = c.active();
        assert_eq!(dc.db.admin_url().unwrap(), "mysql://root:pw@db-a:3306?ssl-mode=VERIFY_CA&ssl-ca=/tls/db-ca.crt");
        assert_eq!(dc.redis.admin_url().unwrap(), "rediss://default:pw@redis-a:6380?ssl-ca=/tls/redis-ca.crt");
        // Through db-proxy the host name cannot be checked; direct it can.
        let strict = text.replace("mode: verify-ca", "mode: verify-identity");
        let err = OperatorConfig::parse(&strict, "test").unwrap_err().to_string();
        assert!(err.contains("verify-identity cannot hold through db-proxy"), "{err}");
        let direct = format!("{strict}db_proxy: {{ enabled: false }}\n");
        assert!(OperatorConfig::parse(&direct, "test").is_ok());
        let err = OperatorConfig::parse(&text.replace("rediss://", "redis://"), "test").unwrap_err().to_string();
        assert!(err.contains("rediss://"), "{err}");
    }

    #[test]
    fn bad_operator_configs_are_refused_with_reason() {
        let cases = [
            (GOOD.replace("active_datacenter: dc-a", "active_datacenter: dc-x"), "not listed"),
            (GOOD.replace("admin_password: pw", "admin_password: pw, admin_password_file: /x"), "exactly one"),
            (GOOD.replace("mysql://", "http://"), "db.url"),
            (GOOD.replace("admin_username: root", "admin_user: root"), "unknown field"),
            (GOOD.replace("mysql://db-a:3306", "mysql://db-a"), "host:port"),
            (format!("{GOOD}failover: {{ failure_threshold: 0 }}\n"), "must be positive"),
            (format!("{GOOD}failover: {{ replay_window_ms: 1000 }}\n"), "at least max_lag_ms"),
            (format!("{GOOD}installation_id: \"a|b\"\n"), "installation_id"),
        ];
        for (text, want) in cases {
            let err = OperatorConfig::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    #[test]
    fn per_datacenter_topology_needs_the_sidecar_and_the_redis_tier_and_zones_default_to_names() {
        let on = format!("{GOOD}failover: {{ redis_tier: true }}\ntopology: {{ per_datacenter: true }}\n")
            .replace("admin_password: pw }", "admin_password: pw }\n    zone: eu-west-1a");
        let c = OperatorConfig::parse(&on, "test").unwrap();
        assert!(c.topology.per_datacenter);
        assert_eq!(c.topology.zone_label, "topology.kubernetes.io/zone");
        assert_eq!(c.active().zone(), "eu-west-1a");
        assert_eq!(
            (c.db_proxy.local_url().as_str(), c.db_proxy.local_redis_url().as_str()),
            ("mysql://127.0.0.1:3307", "redis://127.0.0.1:6380")
        );
        let named = OperatorConfig::parse(&on.replace("\n    zone: eu-west-1a", ""), "test").unwrap();
        assert_eq!(named.active().zone(), "dc-a", "the zone defaults to the datacenter's name");
        assert!(!OperatorConfig::parse(GOOD, "test").unwrap().topology.per_datacenter, "off by default");
        let cases = [
            (on.replace("redis_tier: true", "redis_tier: false"), "needs db_proxy.enabled and failover.redis_tier"),
            (format!("{on}db_proxy: {{ enabled: false }}\n"), "needs db_proxy.enabled and failover.redis_tier"),
            (format!("{on}db_proxy: {{ local_port: 3306 }}\n"), "must be distinct"),
            (on.replace("per_datacenter: true", "per_datacenter: true, zone_label: ''"), "zone_label is empty"),
            (
                on.replace(
                    "    zone: eu-west-1a",
                    "    zone: eu-west-1a\n  - name: b-dc-a\n    db: { url: \"mysql://db-b:3306\", admin_username: r, admin_password: p }\n    redis: { url: \"redis://redis-b:6379\", admin_username: d, admin_password: p }",
                ),
                "another datacenter's name",
            ),
        ];
        for (text, want) in cases {
            let err = OperatorConfig::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
