//! Tenant configuration: the YAML file that the Helm chart renders into a
//! ConfigMap and that every binary reads outside a cluster too.
//!
//! ```yaml
//! tenants:
//!   - name: alpha
//!     businesses: [{ name: video, id: 1 }]
//!     tokens: [alpha-secret]
//!     redis: { url: "redis://127.0.0.1:26379", username: thumbup-alpha, password: pw }
//!     db: { url: "mysql://127.0.0.1:23306", username: thumbup_alpha, password: pw }
//!     limits: { per_mid_per_sec: 20, per_tenant_per_sec: 50000 }
//! ```

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;

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
    /// A value breaks a rule.
    #[error("invalid config: tenant {tenant:?}: {reason}")]
    Invalid {
        /// The tenant the value belongs to.
        tenant: String,
        /// What is wrong.
        reason: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The tenants served.
    pub tenants: Vec<TenantConfig>,
}

/// One product team's tenant.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Lower-case name: `[a-z][a-z0-9-]{0,30}`; names the Redis prefix and DB schema.
    pub name: String,
    /// The businesses (kinds of items: videos, comments, ...) of the tenant.
    pub businesses: Vec<Business>,
    /// API tokens accepted for this tenant (several, so tokens can rotate).
    pub tokens: Vec<String>,
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
}

/// A business: a kind of item that can be liked.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Business {
    /// Human name, e.g. `video`.
    pub name: String,
    /// The id that requests carry (> 0).
    pub id: i64,
}

/// Redis endpoint and credentials.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port`.
    pub url: String,
    /// ACL user; its key pattern is limited to the tenant prefix.
    pub username: String,
    /// ACL password.
    pub password: String,
}

/// Database endpoint and credentials.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DbConfig {
    /// `mysql://host:port` (TiDB, MySQL 8 or MariaDB; through db-proxy in a cluster).
    pub url: String,
    /// DB user granted on the tenant schema only.
    pub username: String,
    /// DB password.
    pub password: String,
    /// Schema; defaults to `thumbup_<name>` with `-` as `_`.
    #[serde(default)]
    pub schema: Option<String>,
    /// Connections per process (default 16).
    #[serde(default = "default_pool")]
    pub max_connections: u32,
}

fn default_pool() -> u32 {
    16
}

/// Rate limits, applied per service process.
#[derive(Debug, Clone, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Entries kept in a user's liked list in Redis; older pages come from the DB.
    pub liked_list_max: u32,
    /// Lifetime of a cached user state and liked list. Must stay far above the
    /// job's window: the DB is behind Redis by up to one window.
    pub state_ttl_secs: u64,
    /// Lifetime of a cached count.
    pub counts_ttl_secs: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings { liked_list_max: 1000, state_ttl_secs: 7 * 86_400, counts_ttl_secs: 86_400 }
    }
}

/// Event stream layout.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// Stream shards. A user's state, liked list and events share a shard (one
    /// hash slot), so the transition script is Redis Cluster safe. Changing it
    /// moves users between shards: drain the stream first.
    pub shards: u32,
    /// How long applied events stay in the stream, for replay after a failover.
    pub retention_secs: u64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings { shards: 8, retention_secs: 3_600 }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
        Config::parse(&text, &p)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config =
            serde_yaml::from_str(text).map_err(|source| ConfigError::Parse { path: origin.to_string(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules serde cannot.
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
            return Err(invalid(n, "at least one token, each of 8 or more characters, is required"));
        }
        if !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            return Err(invalid(n, "redis.url must start with redis:// or rediss://"));
        }
        if !self.db.url.starts_with("mysql://") {
            return Err(invalid(n, "db.url must start with mysql://"));
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

/// The default schema of a tenant: `thumbup_<name>`, `-` written `_`.
pub fn schema_for(tenant: &str) -> String {
    format!("thumbup_{}", tenant.replace('-', "_"))
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
            (GOOD.replace("tokens:", "tokenz:"), "unknown field"),
            (format!("{GOOD}{}", &GOOD[9..]), "listed twice"),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, "test").unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} should mention {want:?}");
        }
    }
}
