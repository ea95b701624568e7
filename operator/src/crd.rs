//! The `LikeTenant` custom resource: one per product team's business line.
//!
//! The doc comments of the spec and status fields become the descriptions of
//! the generated CRD (`crds/liketenant.yaml`, written by `crdgen`). The rules
//! the API server enforces live here too: OpenAPI bounds from schemars
//! attributes and CEL rules (`x-kubernetes-validations`) from `x_kube`.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use thumbup_core::names;
use thumbup_core::route::{self, FailoverRecord};

/// The finalizer that holds a LikeTenant until its cleanup has run.
pub const FINALIZER: &str = "thumbup.io/tenant-cleanup";

/// Condition types written to `status.conditions`.
pub mod condition {
    /// Every step below succeeded for the current generation.
    pub const READY: &str = "Ready";
    /// The schema, the DB user and the migrations are in place.
    pub const DATABASE_READY: &str = "DatabaseReady";
    /// The Redis ACL user exists on every datacenter's Redis.
    pub const REDIS_READY: &str = "RedisReady";
    /// The job Deployment is applied and has its replicas available.
    pub const JOB_READY: &str = "JobReady";
}

/// Desired state of a thumbup tenant. The tenant's name is the object's name
/// (`[a-z][a-z0-9-]{0,30}`); it names the Redis key prefix `thumbup:<name>:`
/// and, unless `schemaName` is set, the DB schema `thumbup_<name>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "thumbup.io",
    version = "v1alpha1",
    kind = "LikeTenant",
    plural = "liketenants",
    shortname = "lt",
    namespaced,
    status = "LikeTenantStatus",
    doc = "A thumbup tenant: an isolated like / dislike service for one business line. The operator provisions its DB schema and user, its Redis ACL user, its stream consumer job and its entry in the service registry.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Businesses", type_ = "integer", json_path = ".status.businesses"),
    printcolumn(name = "Active DC", type_ = "string", json_path = ".status.activeDatacenter"),
    printcolumn(name = "Epoch", type_ = "integer", json_path = ".status.failoverEpoch"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = kube::core::Rule::new("self.metadata.name.matches('^[a-z][a-z0-9-]{0,30}$')")
        .message("the tenant name must match [a-z][a-z0-9-]{0,30}")
        .reason(kube::core::Reason::FieldValueInvalid),
)]
#[x_kube(
    validation = kube::core::Rule::new("has(self.schemaName) == has(oldSelf.schemaName) && (!has(self.schemaName) || self.schemaName == oldSelf.schemaName)")
        .message("schemaName is fixed at creation and cannot change")
        .reason(kube::core::Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct LikeTenantSpec {
    /// The kinds of likeable items (videos, comments, ...). Requests name a
    /// business by its id; ids are unique within the tenant.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(
        validation = kube::core::Rule::new("self.all(b, self.filter(c, c.id == b.id).size() == 1)")
            .message("business ids must be unique"),
        merge_strategy = kube::core::ListMerge::Map(vec!["id".into()])
    )]
    pub businesses: Vec<Business>,
    /// Request limits, applied per service process.
    #[serde(default)]
    pub limits: Limits,
    /// Cache sizes and lifetimes.
    #[serde(default)]
    pub cache: CacheSpec,
    /// The tenant's stream consumer (the job Deployment).
    #[serde(default)]
    pub job: JobSpec,
    /// What deleting the LikeTenant does to the data: Retain (default) keeps
    /// the schema and the Redis keys; Delete drops the schema, the DB user and
    /// every key under the tenant prefix. Either way the Redis ACL user, the
    /// job and the registry entry are removed.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// DB schema of the tenant (letters, digits, `_`). Defaults to
    /// `thumbup_<name>` with `-` written `_`. Fixed at creation: a schema
    /// cannot be renamed under a live tenant. The servers' own schemas
    /// (mysql, information_schema, performance_schema, sys, metrics_schema,
    /// lightning_task_info) and thumbup's control schema are refused in any
    /// letter case, and the operator refuses a schema that it did not create
    /// for this LikeTenant (another tenant's, or one made outside thumbup).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_]{1,64}$"))]
    #[x_kube(validation = reserved_schema_rule())]
    pub schema_name: Option<String>,
    /// Take over an existing DB schema, DB user or Redis ACL user of this
    /// tenant's names that no live LikeTenant holds: one that exists without
    /// thumbup's ownership record (made by hand or before the records
    /// existed), one made by `thumbup-service provision`, or one released
    /// by another LikeTenant deleted with Retain. Their passwords are reset.
    /// Off (the default), such a LikeTenant is refused with a condition
    /// saying who holds what. What a live LikeTenant holds, of this or
    /// another installation, is never taken over.
    #[serde(default)]
    pub adopt_existing: bool,
}

/// The CEL rule refusing the reserved schemas of `core::names`, in any case.
fn reserved_schema_rule() -> kube::core::Rule {
    kube::core::Rule::new(format!("!self.matches('(?i)^({})$')", names::RESERVED_SCHEMAS.join("|")))
        .message("schemaName names a system schema or the thumbup control schema")
        .reason(kube::core::Reason::FieldValueForbidden)
}

/// A kind of likeable item.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Business {
    /// The id that requests carry (1 or more).
    #[schemars(range(min = 1))]
    pub id: i64,
    /// Human name, e.g. `video`.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// Request limits.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Limits {
    /// Write actions per user per second (default 20).
    #[schemars(range(min = 1))]
    pub per_mid_per_sec: i32,
    /// Requests of any kind per tenant per second (default 50000).
    #[schemars(range(min = 1))]
    pub per_tenant_per_sec: i32,
    /// Writes per second taking the synchronous DB path while Redis is down (default 2000).
    #[schemars(range(min = 1))]
    pub db_fallback_per_sec: i32,
    /// Sessions the tenant's DB user may hold at once, over every service
    /// and job process (default 64): the DB server refuses more
    /// (`MAX_USER_CONNECTIONS`). Each process's pool is a quarter of it, at
    /// most 16.
    #[schemars(range(min = 4, max = 10000))]
    pub max_db_connections: i32,
}

impl Limits {
    /// The DB pool of one service or job process: a quarter of the cap (at
    /// least 1, at most 16), so two service replicas and a job stay below
    /// the cap with room for a rolling update or a migration.
    pub fn db_pool_size(&self) -> u32 {
        (self.max_db_connections.max(4) as u32 / 4).clamp(1, 16)
    }
}

impl Default for Limits {
    fn default() -> Self {
        let d = thumbup_core::config::Limits::default();
        Limits {
            per_mid_per_sec: d.per_mid_per_sec as i32,
            per_tenant_per_sec: d.per_tenant_per_sec as i32,
            db_fallback_per_sec: d.db_fallback_per_sec as i32,
            max_db_connections: 64,
        }
    }
}

/// Cache sizes and lifetimes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct CacheSpec {
    /// Entries kept in a user's liked list in Redis; older pages are read
    /// from the DB (default 1000).
    #[schemars(range(min = 1, max = 100000))]
    pub liked_list_max: i32,
    /// Milliseconds a hot item's counts are served from a service process's
    /// memory, at most that much behind (default 0: off, every read exact
    /// as of Redis; 1000 suits items read far more often than liked).
    #[schemars(range(min = 0, max = 60000))]
    pub hot_cache_ttl_ms: i64,
    /// Seconds a cached count lives in Redis (default 86400).
    #[schemars(range(min = 1))]
    pub counts_ttl_secs: i64,
    /// Seconds a cached user state and liked list live in Redis (default
    /// 604800). Keep it far above the job window.
    #[schemars(range(min = 60))]
    pub state_ttl_secs: i64,
}

impl Default for CacheSpec {
    fn default() -> Self {
        let d = thumbup_core::config::CacheSettings::default();
        CacheSpec {
            liked_list_max: d.liked_list_max as i32,
            hot_cache_ttl_ms: d.hot_ttl_ms as i64,
            counts_ttl_secs: d.counts_ttl_secs as i64,
            state_ttl_secs: d.state_ttl_secs as i64,
        }
    }
}

/// The stream consumer of the tenant.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct JobSpec {
    /// Consumer pods (default 1). They share the stream through a consumer
    /// group; 0 pauses consumption (likes wait in the stream).
    #[schemars(range(min = 0, max = 64))]
    pub replicas: i32,
    /// Events that close a window early (default 20000).
    #[schemars(range(min = 1, max = 1000000))]
    pub max_batch: i32,
    /// Milliseconds events are gathered before one DB transaction applies
    /// them (default 500).
    #[schemars(range(min = 10, max = 600000))]
    pub window_ms: i64,
}

impl Default for JobSpec {
    fn default() -> Self {
        use thumbup_core::config::{DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS};
        JobSpec { replicas: 1, max_batch: DEFAULT_MAX_BATCH as i32, window_ms: DEFAULT_WINDOW_MS as i64 }
    }
}

/// What deleting a LikeTenant does to its data.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Keep the schema and the Redis keys (the default).
    #[default]
    Retain,
    /// Drop the schema, the DB user and every key under the tenant prefix.
    Delete,
}

/// Observed state of a thumbup tenant.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LikeTenantStatus {
    /// Ready, DatabaseReady, RedisReady and JobReady.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The DB schema in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// The Redis key prefix in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_prefix: Option<String>,
    /// Number of businesses served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub businesses: Option<i32>,
    /// The name of the Secret with the tenant's API token and credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// The datacenter whose DB takes the writes: the route's once the
    /// failover controller has published one, else the operator config's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_datacenter: Option<String>,
    /// The epoch of the route in use; it only grows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_epoch: Option<i64>,
    /// When the active datacenter's DB began its current run of failed
    /// probes (RFC 3339); null while it answers. Written by the failover
    /// controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// The newest flip of the route; null before the first one. Written by
    /// the failover controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition: Option<LastTransition>,
    /// Why a failover that the probes call for is not happening; null when
    /// nothing is blocked. Written by the failover controller only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_blocked: Option<FailoverBlocked>,
    /// The generation of the spec that the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Which controller owns which status field. Each applies its own fields
/// with server-side apply under its own field manager, so neither names,
/// strips or overwrites the other's, and a pass that read an older object
/// cannot undo the other controller's newer record.
impl LikeTenantStatus {
    /// The fields the tenant controller owns (field manager
    /// [`crate::controller::MANAGER`]): what it provisioned and where.
    /// `activeDatacenter` and `failoverEpoch` say where the tenant is
    /// provisioned and served, so they move when a pass has acted on a new
    /// route (after the promotion of the new primary).
    pub fn tenant_part(&self) -> LikeTenantStatus {
        LikeTenantStatus { failing_since: None, last_transition: None, failover_blocked: None, ..self.clone() }
    }

    /// The fields the failover controller owns (field manager
    /// [`crate::failover::kube::FAILOVER_MANAGER`]): the route's failover record.
    pub fn failover_part(&self) -> LikeTenantStatus {
        LikeTenantStatus {
            failing_since: self.failing_since.clone(),
            last_transition: self.last_transition.clone(),
            failover_blocked: self.failover_blocked.clone(),
            ..LikeTenantStatus::default()
        }
    }

    /// The failover controller's fields as the route's record says them:
    /// the one mapping from the route (core's types: jiff times, u64
    /// epochs, the route ConfigMap's format that db-proxies of every
    /// version read) to the status (the API's RFC 3339 strings and int64).
    pub fn of_failover(f: &FailoverRecord) -> LikeTenantStatus {
        LikeTenantStatus {
            failing_since: f.failing_since.map(rfc3339),
            last_transition: f.last_transition.as_ref().map(|t| LastTransition {
                time: rfc3339(t.at),
                kind: match t.kind {
                    route::TransitionKind::Failover => TransitionKind::Failover,
                    route::TransitionKind::Switchover => TransitionKind::Switchover,
                },
                from: t.from.clone(),
                to: t.to.clone(),
                epoch: epoch(t.epoch),
                reason: t.reason.clone(),
            }),
            failover_blocked: f.blocked.as_ref().map(|b| FailoverBlocked {
                reason: b.reason.clone(),
                message: b.message.clone(),
                since: rfc3339(b.since),
            }),
            ..LikeTenantStatus::default()
        }
    }
}

/// A route epoch as the status holds it: Kubernetes integers are int64, and
/// an epoch never comes near the limit.
pub fn epoch(e: u64) -> i64 {
    i64::try_from(e).unwrap_or(i64::MAX)
}

/// One flip of the route from a datacenter to another.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastTransition {
    /// When the route flipped (RFC 3339).
    pub time: String,
    /// Failover (the active DB failed its probes) or Switchover (planned: the
    /// operator config named another datacenter).
    pub kind: TransitionKind,
    /// The datacenter that was active.
    pub from: String,
    /// The datacenter that is active since.
    pub to: String,
    /// The epoch of the route after the flip.
    pub epoch: i64,
    /// Why, in words.
    pub reason: String,
}

/// The kinds of flip.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransitionKind {
    /// Unplanned: the active DB failed its probes.
    Failover,
    /// Planned: the operator config named another datacenter.
    Switchover,
}

/// A failover that the probes call for but that does not happen.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct FailoverBlocked {
    /// CamelCase reason: StandbyUnhealthy, FailoverCapReached, ...
    pub reason: String,
    /// Details for a human.
    pub message: String,
    /// Since when (RFC 3339).
    pub since: String,
}

/// A standard Kubernetes condition.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type: Ready, DatabaseReady, RedisReady or JobReady.
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    /// CamelCase reason of the last transition.
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl LikeTenantSpec {
    /// A spec with these businesses and every other field at its default.
    pub fn with_businesses(businesses: Vec<Business>) -> LikeTenantSpec {
        LikeTenantSpec {
            businesses,
            limits: Limits::default(),
            cache: CacheSpec::default(),
            job: JobSpec::default(),
            deletion_policy: DeletionPolicy::default(),
            schema_name: None,
            adopt_existing: false,
        }
    }
}

impl LikeTenant {
    /// The tenant name: the object's name.
    pub fn tenant(&self) -> String {
        self.metadata.name.clone().unwrap_or_default()
    }

    /// The DB schema: `spec.schemaName`, else `thumbup_<name>`.
    pub fn schema(&self) -> String {
        self.spec.schema_name.clone().unwrap_or_else(|| thumbup_core::names::schema_for(&self.tenant()))
    }

    /// The object's generation.
    pub fn generation(&self) -> Option<i64> {
        self.metadata.generation
    }

    /// Status condition of `type_`, if any.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// `t` as the status writes times: RFC 3339 in UTC, whole seconds (as
/// Kubernetes' own timestamps).
pub fn rfc3339(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Labels put on every object made for a tenant.
pub fn tenant_labels(tenant: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "thumbup-job".to_string()),
        ("app.kubernetes.io/instance".to_string(), tenant.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "thumbup-operator".to_string()),
        ("thumbup.io/tenant".to_string(), tenant.to_string()),
    ])
}
