//! Tenant configuration: the YAML file that the Helm chart renders into a
//! ConfigMap and that every binary reads outside a cluster too.
//!
//! Credentials are given inline or, so that a Kubernetes operator can keep
//! the registry in a ConfigMap and the credentials in a Secret, as files:
//!
//! ```yaml
//! tenants:
//!   # Inline credentials (local runs, tests).
//!   - name: alpha
//!     businesses: [{ name: video, id: 1 }]
//!     tokens: [alpha-secret]
//!     redis: { url: "redis://127.0.0.1:26379", username: thumbup-alpha, password: pw }
//!     db: { url: "mysql://127.0.0.1:23306", username: thumbup_alpha, password: pw }
//!     limits: { per_mid_per_sec: 20, per_tenant_per_sec: 50000 }
//!   # Credentials from files; relative paths resolve against the secrets
//!   # dir (`--secrets-dir`, by default the config file's directory).
//!   - name: beta
//!     businesses: [{ name: review, id: 1 }]
//!     tokens_file: beta/tokens              # one token per line
//!     redis: { url: "redis://127.0.0.1:26379", username: thumbup-beta, password_file: beta/redis-password }
//!     db: { url: "mysql://127.0.0.1:23306", username: thumbup_beta, password_file: /run/secrets/beta-db }
//!   # TLS to Redis and the DB, each server checked against a CA file.
//!   - name: gamma
//!     businesses: [{ name: video, id: 1 }]
//!     tokens: [gamma-secret]
//!     redis:
//!       url: "rediss://redis.example:6380"       # rediss:// turns TLS on
//!       username: thumbup-gamma
//!       password: pw
//!       tls: { ca_file: /etc/thumbup/tls/redis/ca.crt }
//!     db:
//!       url: "mysql://127.0.0.1:3306"            # db-proxy: in-band TLS, see DbTlsMode
//!       username: thumbup_gamma
//!       password: pw
//!       tls: { mode: verify-ca, ca_file: /etc/thumbup/tls/db/ca.crt }
//! ```
//!
//! Loading resolves the files: every [`TenantConfig`] handed out has its
//! `password`s and `tokens` filled in, whichever way they were given.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::names::schema_for;

/// A config that could not be read or is not valid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// The YAML does not parse into the schema.
    #[error("parsing config {path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        source: serde_yaml::Error,
    },
    /// A credential file (`password_file`, `tokens_file`) could not be read.
    /// Names the file, never its content.
    #[error("config {origin}: tenant {tenant:?}: reading {field} {path}: {source}")]
    SecretFile {
        /// The config the reference is in.
        origin: String,
        /// The tenant the file belongs to.
        tenant: String,
        /// The field naming the file, e.g. `db.password_file`.
        field: &'static str,
        /// The file, resolved against the secrets dir.
        path: String,
        /// The IO error.
        source: std::io::Error,
    },
    /// [`Config::load_tenant`] was asked for a tenant the file does not list.
    #[error("tenant {tenant:?} is not in config {path}")]
    UnknownTenant {
        /// The tenant asked for.
        tenant: String,
        /// The file.
        path: String,
    },
    /// A value breaks a rule.
    #[error("invalid config: tenant {tenant:?}: {reason}")]
    Invalid {
        /// The tenant the value belongs to.
        tenant: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole file. It serializes as it parses: the operator renders the
/// registry and the job's config file from these types. Serialize only a
/// config built with file references (`password_file`, `tokens_file`): a
/// loaded config holds the resolved passwords and tokens, which serialize
/// too.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The tenants served (may be empty).
    pub tenants: Vec<TenantConfig>,
}

/// One product team's tenant.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Lower-case name: `[a-z][a-z0-9-]{0,30}`; names the Redis prefix and DB schema.
    pub name: String,
    /// The businesses (kinds of items: videos, comments, ...) of the tenant.
    pub businesses: Vec<Business>,
    /// API tokens accepted for this tenant (several, so tokens can rotate).
    /// After loading, also those read from `tokens_file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<String>,
    /// A file of more API tokens, one per line (blank lines and surrounding
    /// whitespace ignored), added to `tokens`. A relative path resolves
    /// against the secrets dir. Re-read on reload, so tokens rotate by
    /// rewriting the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_file: Option<String>,
    /// The tenant's Redis, reached with its ACL user.
    pub redis: RedisConfig,
    /// The tenant's database, reached with its own DB user.
    pub db: DbConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// Cache sizes and lifetimes.
    #[serde(default)]
    pub cache: CacheSettings,
    /// Event stream layout.
    #[serde(default)]
    pub stream: StreamSettings,
    /// Where this process reads from: its own datacenter's Redis and DB,
    /// which may be replicas of the active datacenter's. Writes still go to
    /// `redis` and `db` (the active datacenter). Without it every read goes
    /// to `redis` and `db` too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_reads: Option<LocalReads>,
}

/// The endpoints of this process's own datacenter, for reads (counts,
/// states, lists). The same user, password, schema and TLS settings as the
/// tenant's `redis` and `db`: they are replicas of the active datacenter's
/// servers (ACL users are created on every datacenter's Redis, DB grants
/// replicate). A cache miss loads from `db_url`; the value is written to
/// the cache through `redis` (the active datacenter), whence it replicates.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalReads {
    /// `redis://host:port` (or `rediss://`, as `redis.url`) of this
    /// datacenter's Redis: a single server, not a cluster.
    pub redis_url: String,
    /// `mysql://host:port` of this datacenter's DB.
    pub db_url: String,
}

/// A business: a kind of item that can be liked.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Business {
    /// Human name, e.g. `video`.
    pub name: String,
    /// The id that requests carry (> 0).
    pub id: i64,
}

/// Redis endpoint and credentials.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port`; with `cluster`, one seed node of the cluster.
    pub url: String,
    /// True when `url` is a node of a Redis Cluster: the client discovers
    /// the others, routes each key to its slot's master and follows
    /// MOVED/ASK redirections and failovers (the redis crate's cluster
    /// client).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster: bool,
    /// More seed nodes of the cluster (`redis://host:port`), tried when
    /// `url` does not answer; only with `cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<String>,
    /// Replicas that must hold a transition before it is acknowledged
    /// (Redis `WAIT`, on the connection that wrote it): with a replica, the
    /// loss of the master that took a like loses no acknowledged like. 0
    /// (the default) relies on the server's own disk (`appendfsync always`).
    /// A write the replicas did not confirm within `replica_timeout_ms` is
    /// answered UNAVAILABLE (it took effect on the master) and counted in
    /// `thumbup_service_replica_waits_total{outcome="missed"}`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub replica_acks: u32,
    /// How long a write waits for `replica_acks` replicas (default 200).
    /// Must be below the service's Redis timeout (`--redis-timeout-ms`,
    /// default 500): the wait holds the connection, and a health check
    /// queued behind it must not time out. The service refuses the config
    /// otherwise.
    #[serde(default = "default_replica_timeout_ms", skip_serializing_if = "is_default_replica_timeout")]
    pub replica_timeout_ms: u64,
    /// ACL user; its key pattern is limited to the tenant prefix.
    pub username: String,
    /// ACL password; give it or `password_file`, not both. After loading,
    /// the password in use however it was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// File holding the ACL password (trailing whitespace and newline
    /// dropped); relative paths resolve against the secrets dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// TLS settings of a `rediss://` URL (the CA); without them a
    /// `rediss://` URL trusts the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RedisTls>,
}

/// TLS to Redis (the URL must be `rediss://`). The server's certificate must
/// chain to the CA and name the URL's host: Redis is reached directly.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// PEM file of the CA certificates that sign the server's certificate
    /// (default: the system's roots); relative paths resolve against the
    /// secrets dir. Re-read with the config, so a rotated CA is picked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// After loading, the content of `ca_file`.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

/// TLS to the DB (MySQL protocol: negotiated in-band on the same port, so
/// it also passes through db-proxy, a byte forwarder).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbTls {
    /// How much of the server is checked (default `verify-identity`).
    #[serde(default)]
    pub mode: DbTlsMode,
    /// PEM file of the CA certificates that sign the server's certificate
    /// (default: the system's roots); relative paths resolve against the
    /// secrets dir. Re-read with the config, so a rotated CA is picked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// After loading, the content of `ca_file`.
    #[serde(skip)]
    pub ca_pem: Option<Vec<u8>>,
}

/// What a DB connection with [`DbTls`] requires. Every mode refuses a
/// server that does not speak TLS. Without `db.tls` the client's default
/// applies: TLS when the server offers it, unverified (a downgrade or a
/// man in the middle goes unnoticed).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DbTlsMode {
    /// Encrypted, the certificate not checked (protects only against
    /// passive listeners).
    Required,
    /// Encrypted, the certificate must chain to the CA; its host name is not
    /// checked. The mode for DB connections through db-proxy: the client
    /// dials 127.0.0.1, which the DB's certificate does not name; use it
    /// with a private CA that signs only DB servers.
    VerifyCa,
    /// Encrypted, the certificate must chain to the CA and name the URL's host.
    #[default]
    VerifyIdentity,
}

/// Database endpoint and credentials.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    /// `mysql://host:port` (TiDB, MySQL 8 or MariaDB; through db-proxy in a cluster).
    pub url: String,
    /// DB user granted on the tenant schema only.
    pub username: String,
    /// DB password; give it or `password_file`, not both. After loading,
    /// the password in use however it was given.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub password: String,
    /// File holding the DB password (trailing whitespace and newline
    /// dropped); relative paths resolve against the secrets dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<String>,
    /// Schema; defaults to `thumbup_<name>` with `-` as `_`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Connections per process (default 16).
    #[serde(default = "default_pool")]
    pub max_connections: u32,
    /// TLS to the DB. When set, the tenant's DB user is also created
    /// `REQUIRE SSL`, so the server refuses it a plaintext session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<DbTls>,
}

fn default_pool() -> u32 {
    16
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Default of [`RedisConfig::replica_timeout_ms`].
pub const DEFAULT_REPLICA_TIMEOUT_MS: u64 = 200;

fn default_replica_timeout_ms() -> u64 {
    DEFAULT_REPLICA_TIMEOUT_MS
}

fn is_default_replica_timeout(ms: &u64) -> bool {
    *ms == DEFAULT_REPLICA_TIMEOUT_MS
}

/// Rate limits, applied per service process.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Write actions per user per second (burst of the same size).
    pub per_mid_per_sec: u32,
    /// Requests of any kind per tenant per second.
    pub per_tenant_per_sec: u32,
    /// Writes per second taking the synchronous DB path while Redis is down.
    pub db_fallback_per_sec: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { per_mid_per_sec: 20, per_tenant_per_sec: 50_000, db_fallback_per_sec: 2_000 }
    }
}

/// Cache sizes and lifetimes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Entries kept in a user's liked list in Redis; older pages come from the DB.
    pub liked_list_max: u32,
    /// Lifetime of a cached user state and liked list. Must stay far above the
    /// job's window: the DB is behind Redis by up to one window.
    pub state_ttl_secs: u64,
    /// Lifetime of a cached count.
    pub counts_ttl_secs: u64,
    /// How long the service serves a hot item's counts from its own memory
    /// (milliseconds); 0 turns the local hot-key cache off.
    pub hot_ttl_ms: u64,
    /// The sliding window over which reads are counted to find hot items.
    pub hot_window_ms: u64,
    /// Hot items at most, per service process.
    pub hot_top_k: u32,
    /// Reads within the window that make an item a candidate.
    pub hot_min_hits: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            liked_list_max: 1000,
            state_ttl_secs: 7 * 86_400,
            counts_ttl_secs: 86_400,
            hot_ttl_ms: 0,
            hot_window_ms: 10_000,
            hot_top_k: 1_000,
            hot_min_hits: 50,
        }
    }
}

/// Event stream layout.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Stream shards. A user's state, liked list and events share a shard (one
    /// hash slot), so the transition script is Redis Cluster safe. Changing it
    /// moves users between shards: drain the stream first.
    pub shards: u32,
    /// How long applied events stay in the stream, for replay after a failover.
    pub retention_secs: u64,
    /// How long entries stay in the downstream stream (one per applied
    /// transition, for other systems): a consumer group that falls further
    /// behind misses entries (`thumbup_job_downstream_behind_retention`).
    /// Memory: roughly 100 bytes an entry (`MEMORY USAGE` on the key tells
    /// yours), so 1 h at 15,000 likes/s is about 5 GB.
    pub downstream_retention_secs: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings { shards: 8, retention_secs: 3_600, downstream_retention_secs: 3_600 }
    }
}

/// Milliseconds the job gathers events before one DB transaction applies
/// them, unless told otherwise (its `--window-ms`, a LikeTenant's
/// `spec.job.windowMs`). A quarter second keeps counts and likers fresh
/// well within a second of a like (bench g: p99 about 300 ms on a quiet
/// machine, against about 520 ms with 500 ms), and a hot item still costs
/// one counts-row UPDATE per window: at most 10 per 10,000 likes once it
/// gets 4,000 likes/s (10,000 / (rate x window)), and never more than 4 a
/// second (2.7 per 10,000 at Bilibili's 15,000 likes/s).
pub const DEFAULT_WINDOW_MS: u64 = 250;

/// Events that close the job's window early, unless told otherwise (its
/// `--max-batch`, a LikeTenant's `spec.job.maxBatch`).
pub const DEFAULT_MAX_BATCH: usize = 20_000;

impl Config {
    /// Reads and validates a config file, reading credential files relative
    /// to the config file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::load_with(path, None)
    }

    /// Reads and validates a config file; relative `*_file` paths resolve
    /// against `secrets_dir` (default: the config file's directory).
    pub fn load_with(path: &Path, secrets_dir: Option<&Path>) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Config::parse_with(&text, &p, &secrets_dir_for(path, secrets_dir))
    }

    /// Reads one tenant of a config file, resolving and validating that
    /// tenant only: a job has only its own tenant's credential files.
    pub fn load_tenant(path: &Path, secrets_dir: Option<&Path>, name: &str) -> Result<TenantConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        let config = Config::from_yaml(&text, &p)?;
        let mut tenant = config
            .tenants
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ConfigError::UnknownTenant { tenant: name.to_string(), path: p.clone() })?;
        tenant.resolve_files(Secrets::Dir(&secrets_dir_for(path, secrets_dir)), &p)?;
        tenant.validate()?;
        Ok(tenant)
    }

    /// Parses and validates YAML text; `origin` names it in errors. Relative
    /// `*_file` paths resolve against the working directory.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, origin, Path::new("."))
    }

    /// Parses and validates YAML text, reading relative `*_file` paths from
    /// `secrets_dir`; `origin` names the text in errors.
    pub fn parse_with(text: &str, origin: &str, secrets_dir: &Path) -> Result<Config, ConfigError> {
        Config::parse_resolving(text, origin, Secrets::Dir(secrets_dir))
    }

    /// Parses and validates YAML text, reading relative `*_file` references
    /// from `secrets` (a directory, or the keys of a Kubernetes Secret);
    /// `origin` names the text in errors.
    pub fn parse_resolving(text: &str, origin: &str, secrets: Secrets<'_>) -> Result<Config, ConfigError> {
        let mut config = Config::from_yaml(text, origin)?;
        for t in &mut config.tenants {
            t.resolve_files(secrets, origin)?;
        }
        config.validate()?;
        Ok(config)
    }

    fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_string(), source })
    }

    /// Checks the rules serde cannot (on a config whose files are read).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut names = HashMap::new();
        for t in &self.tenants {
            t.validate()?;
            if names.insert(t.name.as_str(), ()).is_some() {
                return Err(invalid(&t.name, "tenant listed twice"));
            }
        }
        Ok(())
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// Where relative `*_file` paths of the config at `path` resolve.
fn secrets_dir_for(path: &Path, secrets_dir: Option<&Path>) -> PathBuf {
    match secrets_dir {
        Some(d) => d.to_path_buf(),
        None => match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        },
    }
}

/// Where relative `*_file` references of a config are read from. Absolute
/// paths are always files (the CA files the chart mounts).
#[derive(Debug, Clone, Copy)]
pub enum Secrets<'a> {
    /// Files under this directory.
    Dir(&'a Path),
    /// The keys of a Kubernetes Secret's data; `name` names the Secret in
    /// errors (`secret thumbup/thumbup-tenant-credentials`).
    Keys {
        /// What errors call the Secret.
        name: &'a str,
        /// Its data, key to value.
        data: &'a BTreeMap<String, Vec<u8>>,
    },
}

/// Reads a credential file or Secret key; the error names the file or key,
/// not what is in it.
fn read_secret(
    tenant: &str,
    field: &'static str,
    file: &str,
    secrets: Secrets<'_>,
    origin: &str,
) -> Result<String, ConfigError> {
    let error = |path: String, source| ConfigError::SecretFile {
        origin: origin.to_string(),
        tenant: tenant.to_string(),
        field,
        path,
        source,
    };
    let path = match secrets {
        _ if Path::new(file).is_absolute() => PathBuf::from(file),
        Secrets::Dir(dir) => dir.join(file),
        Secrets::Keys { name, data } => {
            let what = format!("key {file:?} of {name}");
            let Some(value) = data.get(file) else {
                return Err(error(what, std::io::Error::new(std::io::ErrorKind::NotFound, "no such key")));
            };
            return String::from_utf8(value.clone())
                .map_err(|_| error(what, std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")));
        }
    };
    std::fs::read_to_string(&path).map_err(|source| error(path.display().to_string(), source))
}

/// Fills `password` from `file`, requiring exactly one of them; `inline`
/// and `field` name the two fields in errors.
fn resolve_password(
    tenant: &str,
    (inline, field): (&str, &'static str),
    password: &mut String,
    file: Option<&str>,
    dir: Secrets<'_>,
    origin: &str,
) -> Result<(), ConfigError> {
    match file {
        None if password.is_empty() => Err(invalid(tenant, format!("{inline} or {field} is required"))),
        None => Ok(()),
        Some(_) if !password.is_empty() => Err(invalid(tenant, format!("give {inline} or {field}, not both"))),
        Some(f) => {
            let text = read_secret(tenant, field, f, dir, origin)?;
            let pw = text.trim_end();
            if pw.is_empty() {
                return Err(invalid(tenant, format!("{field} {f} is empty")));
            }
            *password = pw.to_string();
            Ok(())
        }
    }
}

fn invalid(tenant: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { tenant: tenant.to_string(), reason: reason.into() }
}

/// True for a valid tenant name: `[a-z][a-z0-9-]{0,30}`.
pub fn valid_tenant_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z'))
        && name.len() <= 31
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

impl TenantConfig {
    /// Reads the tenant's credential files into `password` and `tokens`
    /// (once, right after parsing).
    fn resolve_files(&mut self, dir: Secrets<'_>, origin: &str) -> Result<(), ConfigError> {
        let name = self.name.clone();
        let redis = ("redis.password", "redis.password_file");
        resolve_password(&name, redis, &mut self.redis.password, self.redis.password_file.as_deref(), dir, origin)?;
        let db = ("db.password", "db.password_file");
        resolve_password(&name, db, &mut self.db.password, self.db.password_file.as_deref(), dir, origin)?;
        if let Some(tls) = &mut self.redis.tls
            && let Some(f) = &tls.ca_file
        {
            tls.ca_pem = Some(read_secret(&name, "redis.tls.ca_file", f, dir, origin)?.into_bytes());
        }
        if let Some(tls) = &mut self.db.tls
            && let Some(f) = &tls.ca_file
        {
            tls.ca_pem = Some(read_secret(&name, "db.tls.ca_file", f, dir, origin)?.into_bytes());
        }
        if let Some(f) = &self.tokens_file {
            let text = read_secret(&name, "tokens_file", f, dir, origin)?;
            self.tokens.extend(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from));
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let n = &self.name;
        if !valid_tenant_name(n) {
            return Err(invalid(n, "name must match [a-z][a-z0-9-]{0,30}"));
        }
        if self.businesses.is_empty() {
            return Err(invalid(n, "at least one business is required"));
        }
        let mut ids = HashMap::new();
        for b in &self.businesses {
            if b.id <= 0 {
                return Err(invalid(n, format!("business {:?} id must be > 0", b.name)));
            }
            if ids.insert(b.id, ()).is_some() {
                return Err(invalid(n, format!("business id {} listed twice", b.id)));
            }
        }
        if self.tokens.is_empty() || self.tokens.iter().any(|t| t.len() < 8) {
            return Err(invalid(
                n,
                "at least one token (tokens or tokens_file), each of 8 or more characters, is required",
            ));
        }
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            return Err(invalid(n, "redis.url must start with redis:// or rediss://"));
        }
        if self.redis.tls.is_some() && !self.redis.url.starts_with("rediss://") {
            return Err(invalid(n, "redis.tls is set: redis.url must start with rediss://"));
        }
        if !self.redis.cluster && !self.redis.seeds.is_empty() {
            return Err(invalid(n, "redis.seeds are the nodes of a cluster: set redis.cluster: true or drop them"));
        }
        let scheme = if self.redis.url.starts_with("rediss://") { "rediss://" } else { "redis://" };
        if let Some(bad) = self.redis.seeds.iter().find(|u| !u.starts_with(scheme) || u.contains('@')) {
            return Err(invalid(
                n,
                format!("redis.seeds: {bad:?} must start with {scheme} as redis.url does, without credentials"),
            ));
        }
        if self.redis.replica_acks > 0 && self.redis.replica_timeout_ms == 0 {
            return Err(invalid(n, "redis.replica_timeout_ms must be > 0 when redis.replica_acks is set"));
        }
        if !self.db.url.starts_with("mysql://") {
            return Err(invalid(n, "db.url must start with mysql://"));
        }
        // One place for the DB's TLS settings: sqlx would also read them
        // from the URL's query, and the two could disagree.
        if let Some((_, query)) = self.db.url.split_once('?')
            && query.split('&').any(|kv| kv.to_ascii_lowercase().starts_with("ssl"))
        {
            return Err(invalid(n, "db.url: give TLS settings in db.tls, not as ssl-* URL parameters"));
        }
        if let Some(s) = &self.db.schema
            && !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(invalid(n, "db.schema may hold only letters, digits and _"));
        }
        if self.limits.per_mid_per_sec == 0 || self.limits.per_tenant_per_sec == 0 {
            return Err(invalid(n, "limits must be > 0"));
        }
        if self.cache.liked_list_max == 0 || self.stream.shards == 0 || self.stream.shards > 1024 {
            return Err(invalid(n, "cache.liked_list_max must be > 0 and stream.shards in 1..=1024"));
        }
        if let Some(local) = &self.local_reads {
            if self.redis.cluster {
                return Err(invalid(n, "local_reads is for a single-server Redis per datacenter, not a cluster"));
            }
            if !local.redis_url.starts_with(scheme) || local.redis_url.contains('@') {
                return Err(invalid(
                    n,
                    format!("local_reads.redis_url must start with {scheme} as redis.url does, without credentials"),
                ));
            }
            if !local.db_url.starts_with("mysql://") || local.db_url.contains('@') || local.db_url.contains('?') {
                return Err(invalid(
                    n,
                    "local_reads.db_url must be mysql://host:port, without credentials or parameters",
                ));
            }
        }
        if self.stream.downstream_retention_secs == 0 {
            return Err(invalid(
                n,
                "stream.downstream_retention_secs must be > 0 (downstream consumers need time to read)",
            ));
        }
        Ok(())
    }

    /// The DB schema of the tenant.
    pub fn schema(&self) -> String {
        self.db.schema.clone().unwrap_or_else(|| schema_for(&self.name))
    }

    /// True when `id` is one of the tenant's businesses.
    pub fn has_business(&self, id: i64) -> bool {
        self.businesses.iter().any(|b| b.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
tenants:
  - name: alpha
    businesses: [{ name: video, id: 1 }]
    tokens: [alpha-secret]
    redis: { url: "redis://127.0.0.1:26379", username: thumbup-alpha, password: pw }
    db: { url: "mysql://127.0.0.1:23306", username: thumbup_alpha, password: pw }
"#;

    #[test]
    fn good_config_parses_with_defaults() {
        let c = Config::parse(GOOD, "test").unwrap();
        let t = c.tenant("alpha").unwrap();
        assert_eq!(t.schema(), "thumbup_alpha");
        assert_eq!(t.limits, Limits::default());
        assert!(t.has_business(1) && !t.has_business(2));
    }

    #[test]
    fn invalid_configs_are_refused_with_reason() {
        let cases = [
            (GOOD.replace("name: alpha", "name: Alpha"), "name must match"),
            (GOOD.replace("id: 1", "id: 0"), "id must be > 0"),
            (GOOD.replace("[alpha-secret]", "[short]"), "token"),
            (GOOD.replace("redis://", "http://"), "redis.url"),
            (GOOD.replacen("password: pw }", "password: pw, seeds: [\"redis://n2:6379\"] }", 1), "redis.cluster: true"),
            (
                GOOD.replacen("password: pw }", "password: pw, cluster: true, seeds: [\"rediss://n2:6379\"] }", 1),
                "must start with redis://",
            ),
            (
                GOOD.replacen("password: pw }", "password: pw, cluster: true, seeds: [\"redis://u:p@n2:6379\"] }", 1),
                "without credentials",
            ),
            (
                GOOD.replacen("password: pw }", "password: pw, replica_acks: 1, replica_timeout_ms: 0 }", 1),
                "replica_timeout_ms",
            ),
            (
                GOOD.replacen("password: pw }", "password: pw }\n    stream: { downstream_retention_secs: 0 }", 1),
                "downstream_retention_secs",
            ),
            (GOOD.replace("tokens:", "tokenz:"), "unknown field"),
            (format!("{GOOD}{}", &GOOD[9..]), "listed twice"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }

    /// A fresh directory for one test's files.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("thumbup-config-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tenant whose credentials all come from files.
    fn file_tenant(name: &str, redis_pw: &str, db_pw: &str, tokens: &str) -> String {
        format!(
            r#"
  - name: {name}
    businesses: [{{ name: video, id: 1 }}]
    tokens_file: {tokens}
    redis: {{ url: "redis://127.0.0.1:26379", username: thumbup-{name}, password_file: {redis_pw} }}
    db: {{ url: "mysql://127.0.0.1:23306", username: thumbup_{name}, password_file: "{db_pw}" }}
"#
        )
    }

    #[test]
    fn credential_files_resolve_relative_to_the_secrets_dir_and_absolute_as_is() {
        let dir = scratch("resolve");
        let (conf_dir, secrets, elsewhere) = (dir.join("conf"), dir.join("secrets"), dir.join("elsewhere"));
        for d in [&conf_dir, &secrets.join("alpha"), &elsewhere] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(secrets.join("alpha/redis"), "redis-pw \n").unwrap();
        std::fs::write(secrets.join("alpha/tokens"), "alpha-token-1\n").unwrap();
        std::fs::write(elsewhere.join("db"), "db-pw\n").unwrap();
        let db_abs = elsewhere.join("db").display().to_string();
        let path = conf_dir.join("config.yaml");
        std::fs::write(&path, format!("tenants:{}", file_tenant("alpha", "alpha/redis", &db_abs, "alpha/tokens")))
            .unwrap();

        let c = Config::load_with(&path, Some(&secrets)).unwrap();
        let t = c.tenant("alpha").unwrap();
        assert_eq!(t.redis.password, "redis-pw", "trailing whitespace and newline dropped");
        assert_eq!(t.db.password, "db-pw", "absolute path used as is");
        assert_eq!(t.tokens, ["alpha-token-1"]);
        assert_eq!(t.redis.password_file.as_deref(), Some("alpha/redis"), "the reference is kept");

        // Without --secrets-dir, relative paths resolve next to the config file.
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains(&conf_dir.join("alpha/redis").display().to_string()), "{err}");
        std::fs::create_dir_all(conf_dir.join("alpha")).unwrap();
        std::fs::copy(secrets.join("alpha/redis"), conf_dir.join("alpha/redis")).unwrap();
        std::fs::copy(secrets.join("alpha/tokens"), conf_dir.join("alpha/tokens")).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn token_file_holds_one_token_per_line_and_adds_to_inline_tokens() {
        let dir = scratch("tokens");
        std::fs::write(dir.join("tokens"), "\n  alpha-token-1  \n\n\talpha-token-2\r\n   \n").unwrap();
        let text = GOOD.replace("tokens: [alpha-secret]", "tokens: [alpha-secret]\n    tokens_file: tokens");
        let c = Config::parse_with(&text, "test", &dir).unwrap();
        assert_eq!(c.tenants[0].tokens, ["alpha-secret", "alpha-token-1", "alpha-token-2"]);

        // A file alone is enough; an empty one leaves no token.
        let text = GOOD.replace("tokens: [alpha-secret]", "tokens_file: tokens");
        assert_eq!(Config::parse_with(&text, "test", &dir).unwrap().tenants[0].tokens.len(), 2);
        std::fs::write(dir.join("tokens"), "\n \n").unwrap();
        let err = Config::parse_with(&text, "test", &dir).unwrap_err().to_string();
        assert!(err.contains("at least one token"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn password_given_both_inline_and_as_file_or_not_at_all_is_refused() {
        let dir = scratch("both");
        std::fs::write(dir.join("pw"), "from-file").unwrap();
        let cases = [
            (
                GOOD.replace("password: pw }\n    db", "password: pw, password_file: pw }\n    db"),
                "give redis.password",
            ),
            (
                GOOD.replace(", password: pw }\n    db", " }\n    db"),
                "redis.password or redis.password_file is required",
            ),
            (
                GOOD.replace("thumbup_alpha, password: pw", "thumbup_alpha, password: pw, password_file: pw"),
                "give db.password",
            ),
            (
                GOOD.replace("thumbup_alpha, password: pw", "thumbup_alpha"),
                "db.password or db.password_file is required",
            ),
            (GOOD.replace("thumbup_alpha, password: pw", "thumbup_alpha, password: \"\""), "db.password or"),
        ];
        for (text, want) in cases {
            let err = Config::parse_with(&text, "test", &dir).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("alpha"), "{err:?} should mention {want:?}");
        }
        // An empty password file counts as no password.
        std::fs::write(dir.join("pw"), "\n").unwrap();
        let text = GOOD.replace("thumbup_alpha, password: pw", "thumbup_alpha, password_file: pw");
        let err = Config::parse_with(&text, "test", &dir).unwrap_err().to_string();
        assert!(err.contains("db.password_file pw is empty"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_credential_file_is_refused_naming_tenant_field_and_path() {
        let dir = scratch("missing");
        let text = GOOD.replace("tokens: [alpha-secret]", "tokens_file: nope/tokens");
        let err = Config::parse_with(&text, "cfg.yaml", &dir).unwrap_err();
        assert!(matches!(&err, ConfigError::SecretFile { tenant, field: "tokens_file", .. } if tenant == "alpha"));
        let msg = err.to_string();
        assert!(msg.contains(&dir.join("nope/tokens").display().to_string()) && msg.contains("alpha"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_tenant_reads_only_its_own_files_and_refuses_an_absent_tenant() {
        let dir = scratch("one");
        std::fs::create_dir_all(dir.join("alpha")).unwrap();
        std::fs::write(dir.join("alpha/redis"), "ra").unwrap();
        std::fs::write(dir.join("alpha/db"), "da").unwrap();
        std::fs::write(dir.join("alpha/tokens"), "alpha-token-1").unwrap();
        // beta's files are not mounted, and beta is invalid besides.
        let beta = file_tenant("beta", "beta/redis", "beta/db", "beta/tokens").replace("id: 1", "id: 0");
        let path = dir.join("config.yaml");
        std::fs::write(
            &path,
            format!("tenants:{}{beta}", file_tenant("alpha", "alpha/redis", "alpha/db", "alpha/tokens")),
        )
        .unwrap();
        assert!(matches!(Config::load(&path), Err(ConfigError::SecretFile { .. })), "the whole file needs beta's");
        let t = Config::load_tenant(&path, None, "alpha").unwrap();
        assert_eq!((t.redis.password.as_str(), t.db.password.as_str()), ("ra", "da"));
        assert_eq!(t.tokens, ["alpha-token-1"]);
        assert!(matches!(Config::load_tenant(&path, None, "beta"), Err(ConfigError::SecretFile { .. })));
        let err = Config::load_tenant(&path, None, "gamma").unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownTenant { tenant, .. } if tenant == "gamma"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn references_resolve_from_secret_keys_and_a_missing_key_names_it_not_its_neighbours() {
        let text = GOOD
            .replace("tokens: [alpha-secret]", "tokens_file: alpha.tokens")
            .replace("thumbup_alpha, password: pw", "thumbup_alpha, password_file: alpha.db-password");
        let mut data = BTreeMap::from([
            ("alpha.tokens".to_string(), b"tok-from-secret\n".to_vec()),
            ("alpha.db-password".to_string(), b"db-pw-from-secret".to_vec()),
        ]);
        fn keys(data: &BTreeMap<String, Vec<u8>>) -> Secrets<'_> {
            Secrets::Keys { name: "secret thumbup/creds", data }
        }
        let c = Config::parse_resolving(&text, "configmap thumbup/tenants", keys(&data)).unwrap();
        let t = c.tenant("alpha").unwrap();
        assert_eq!(
            (t.tokens.as_slice(), t.db.password.as_str()),
            (&["tok-from-secret".to_string()][..], "db-pw-from-secret")
        );
        data.remove("alpha.db-password");
        let err = Config::parse_resolving(&text, "configmap thumbup/tenants", keys(&data)).unwrap_err().to_string();
        assert!(
            err.contains("db.password_file") && err.contains("\"alpha.db-password\" of secret thumbup/creds"),
            "{err}"
        );
        assert!(!err.contains("tok-from-secret"), "{err}");
    }

    #[test]
    fn errors_never_show_passwords_tokens_or_file_contents() {
        let dir = scratch("leak");
        std::fs::write(dir.join("pw"), "file-secret-pw").unwrap();
        std::fs::write(dir.join("tokens"), "tok-secret\nshort").unwrap();
        let both = GOOD.replace("password: pw }\n    db", "password: inline-secret-pw, password_file: pw }\n    db");
        let short_token = GOOD.replace("tokens: [alpha-secret]", "tokens_file: tokens");
        let missing = GOOD.replace("password: pw }\n    db", "password_file: gone }\n    db");
        for text in [both, short_token, missing] {
            let err = Config::parse_with(&text, "test", &dir).unwrap_err();
            let shown = format!("{err:?} {err}");
            for secret in ["inline-secret-pw", "file-secret-pw", "tok-secret", "short\""] {
                assert!(!shown.contains(secret), "{shown} shows {secret:?}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_settings_read_their_ca_files_and_need_rediss_and_one_home() {
        let dir = scratch("tls");
        std::fs::write(dir.join("ca.crt"), "PEM").unwrap();
        let text = GOOD.replace(
            "redis://127.0.0.1:26379\", username: thumbup-alpha, password: pw",
            "rediss://r:6380\", username: thumbup-alpha, password: pw, tls: { ca_file: ca.crt }",
        );
        let text = text.replace(
            "thumbup_alpha, password: pw }",
            "thumbup_alpha, password: pw, tls: { mode: verify-ca, ca_file: ca.crt } }",
        );
        let c = Config::parse_with(&text, "test", &dir).unwrap();
        let t = &c.tenants[0];
        assert_eq!(t.redis.tls.as_ref().unwrap().ca_pem.as_deref(), Some(&b"PEM"[..]));
        let db = t.db.tls.as_ref().unwrap();
        assert_eq!((db.mode, db.ca_pem.as_deref()), (DbTlsMode::VerifyCa, Some(&b"PEM"[..])));
        // The mode defaults to the strictest.
        let strict = text.replace("mode: verify-ca, ", "");
        assert_eq!(
            Config::parse_with(&strict, "test", &dir).unwrap().tenants[0].db.tls.as_ref().unwrap().mode,
            DbTlsMode::VerifyIdentity
        );
        let cases = [
            (text.replace("rediss://", "redis://"), "redis.url must start with rediss://"),
            (text.replace("mysql://127.0.0.1:23306", "mysql://127.0.0.1:23306?ssl-mode=DISABLED"), "db.tls"),
            (text.replace("verify-ca", "verify-nothing"), "unknown variant"),
            (text.replace("ca_file: ca.crt }", "ca_file: gone.crt }"), "redis.tls.ca_file"),
        ];
        for (text, want) in cases {
            let err = Config::parse_with(&text, "test", &dir).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_config_without_tenants_is_valid() {
        assert_eq!(Config::parse("tenants: []", "test").unwrap(), Config::default());
    }
}
