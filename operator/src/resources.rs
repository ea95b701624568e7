//! Pure builders of the Kubernetes objects and files the operator writes for
//! a tenant. Nothing here does IO: the controller applies what these return,
//! and unit tests assert on it.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::Serialize;

use thumbup_core::config::{
    Business, CacheSettings, DbConfig, Limits, LocalReads, RedisConfig, StreamSettings, TenantConfig,
};
use thumbup_core::names;

use crate::config::{Datacenter, OperatorConfig};
use crate::crd::{LikeTenant, tenant_labels};

/// Where the job mounts its tenant Secret (config file and credentials).
pub const JOB_CONFIG_DIR: &str = "/etc/thumbup/tenant";
/// The registry ConfigMap's key.
pub const REGISTRY_KEY: &str = "tenants.yaml";
/// Admin port of the job (metrics and probes).
pub const JOB_ADMIN_PORT: i32 = 9191;
/// Name of the db-proxy sidecar container.
pub const DB_PROXY_CONTAINER: &str = "db-proxy";
/// The label naming the datacenter of a per-datacenter job Deployment and
/// its pods (`topology.per_datacenter`; the chart's service pods carry it too).
pub const DATACENTER_LABEL: &str = "thumbup.io/datacenter";

/// A tenant's secrets, kept in its Secret. Generated once and then read
/// back on every reconcile, so re-runs do not rotate them. The account
/// names are not here: they are derived from the tenant name
/// (`thumbup_core::names`) and never read back from the Secret, which
/// whoever can edit it could point at `root` or another tenant's user.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    /// DB password.
    pub db_password: String,
    /// Redis ACL password.
    pub redis_password: String,
    /// The API token clients send as `authorization: Bearer <token>`.
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").finish_non_exhaustive()
    }
}

fn random(n: usize) -> String {
    rand::rng().sample_iter(&Alphanumeric).take(n).map(char::from).collect()
}

impl Credentials {
    /// Fresh random passwords and token (alphanumeric, so they are safe in
    /// account statements and URLs).
    pub fn generate(tenant: &str) -> Credentials {
        Credentials { db_password: random(32), redis_password: random(32), token: format!("{tenant}-{}", random(32)) }
    }

    /// Reads the passwords and the token back from the tenant Secret; None
    /// when a key is missing. The Secret's `db-username` and
    /// `redis-username` are written for clients to read and never read back.
    pub fn from_secret(s: &Secret) -> Option<Credentials> {
        let get = |k: &str| secret_value(s, k);
        Some(Credentials {
            db_password: get("db-password")?,
            redis_password: get("redis-password")?,
            token: get("token")?,
        })
    }

    /// The credentials of the tenant Secret `existing`, each missing or empty
    /// one made afresh: deleting one key from the Secret rotates that
    /// credential alone (the others, the API token above all, stay).
    pub fn kept_or_generated(existing: Option<&Secret>, tenant: &str) -> Credentials {
        let fresh = Credentials::generate(tenant);
        let keep = |k: &str, made: String| existing.and_then(|s| secret_value(s, k)).unwrap_or(made);
        Credentials {
            db_password: keep("db-password", fresh.db_password),
            redis_password: keep("redis-password", fresh.redis_password),
            token: keep("token", fresh.token),
        }
    }
}

/// A non-empty UTF-8 value of a Secret.
fn secret_value(s: &Secret, key: &str) -> Option<String> {
    s.data.as_ref()?.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok()).filter(|v| !v.is_empty())
}

fn owned_meta(lt: &LikeTenant, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: lt.metadata.namespace.clone(),
        labels: Some(tenant_labels(&lt.tenant())),
        owner_references: lt.controller_owner_ref(&()).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

/// The tenant's own Secret, owned by the LikeTenant (garbage-collected with
/// it): the credentials and API token, and `tenants.yaml`, the one-tenant
/// config file of the job. The job mounts only this Secret, so it works in
/// any namespace and never sees another tenant's credentials.
pub fn build_tenant_secret(lt: &LikeTenant, c: &Credentials, entry: &TenantConfig) -> Secret {
    let config = render_registry(&BTreeMap::from([(entry.name.clone(), entry.clone())]));
    let t = lt.tenant();
    let data = BTreeMap::from([
        (REGISTRY_KEY.to_string(), bytes(&config)),
        ("db-username".to_string(), bytes(&names::db_user(&t))),
        ("db-password".to_string(), bytes(&c.db_password)),
        ("redis-username".to_string(), bytes(&names::redis_user(&t))),
        ("redis-password".to_string(), bytes(&c.redis_password)),
        ("token".to_string(), bytes(&c.token)),
    ]);
    Secret {
        metadata: owned_meta(lt, names::tenant_secret(&lt.tenant())),
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The db-proxy sidecar: a native sidecar (an init container that keeps
/// running), so it is up before the job's first DB session and stops after
/// the job has flushed its window. It follows the route ConfigMap
/// `route_namespace/<failover.route_config_map>`. In a pod pinned to the
/// datacenter `datacenter` (`topology.per_datacenter`) it also serves the
/// local-read listeners for that datacenter's DB and Redis.
pub fn build_db_proxy_sidecar(cfg: &OperatorConfig, route_namespace: &str, datacenter: Option<&str>) -> Container {
    let p = &cfg.db_proxy;
    let probe = |path: &str, period| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(p.admin_port as i32),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    Container {
        name: DB_PROXY_CONTAINER.into(),
        image: Some(p.image.clone().unwrap_or_else(|| cfg.job.image.clone())),
        image_pull_policy: Some(cfg.job.image_pull_policy.clone()),
        command: Some(vec!["thumbup-db-proxy".into()]),
        args: Some(
            [
                format!("--listen=127.0.0.1:{}", p.port),
                format!("--admin-listen=0.0.0.0:{}", p.admin_port),
                format!("--route-config-map={route_namespace}/{}", cfg.failover.route_config_map),
            ]
            .into_iter()
            .chain(
                (cfg.failover.redis_tier && !cfg.redis_tier_cluster())
                    .then(|| format!("--redis-listen=127.0.0.1:{}", p.redis_port)),
            )
            .chain(datacenter.into_iter().flat_map(|dc| {
                [
                    format!("--datacenter={dc}"),
                    format!("--local-listen=127.0.0.1:{}", p.local_port),
                    format!("--local-redis-listen=127.0.0.1:{}", p.local_redis_port),
                ]
            }))
            .collect(),
        ),
        env: Some(vec![
            EnvVar { name: "RUST_LOG".into(), value: Some("info".into()), ..EnvVar::default() },
            log_format(cfg),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("proxy-admin".into()),
            container_port: p.admin_port as i32,
            ..ContainerPort::default()
        }]),
        // Kubernetes 1.29+: an init container that always restarts is a
        // sidecar, started before and stopped after the main container.
        restart_policy: Some("Always".into()),
        // Ready once it holds a route: the job starts only then.
        startup_probe: Some(Probe { failure_threshold: Some(60), period_seconds: Some(1), ..probe("/readyz", 1) }),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        resources: p.resources.clone(),
        security_context: Some(restricted()),
        ..Container::default()
    }
}

/// The container security context of every container the operator runs:
/// what Pod Security "restricted" asks of each container, and a read-only
/// root filesystem.
fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Capabilities::default() }),
        seccomp_profile: Some(runtime_default()),
        ..SecurityContext::default()
    }
}

/// The container runtime's default seccomp profile.
fn runtime_default() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".into(), ..SeccompProfile::default() }
}

/// `THUMBUP_LOG_FORMAT` of the job pods' containers (`job.log_format`).
fn log_format(cfg: &OperatorConfig) -> EnvVar {
    EnvVar { name: "THUMBUP_LOG_FORMAT".into(), value: Some(cfg.job.log_format.clone()), ..EnvVar::default() }
}

/// The job Deployments the tenant should have: one per datacenter with
/// `topology.per_datacenter` ([`build_job_deployment_in`]), else the one
/// [`build_job_deployment`].
pub fn build_job_deployments(lt: &LikeTenant, cfg: &OperatorConfig, route_namespace: &str) -> Vec<Deployment> {
    if cfg.topology.per_datacenter {
        cfg.datacenters.iter().map(|dc| build_job_deployment_in(lt, cfg, route_namespace, dc)).collect()
    } else {
        vec![build_job_deployment(lt, cfg, route_namespace)]
    }
}

/// The job Deployment of the tenant, owned by the LikeTenant, placed
/// anywhere (without `topology.per_datacenter`). With db-proxy on, it
/// carries the sidecar following the route in `route_namespace` (the
/// operator's namespace).
pub fn build_job_deployment(lt: &LikeTenant, cfg: &OperatorConfig, route_namespace: &str) -> Deployment {
    job_deployment(lt, cfg, route_namespace, None)
}

/// The job Deployment of the tenant in the datacenter `dc`
/// (`topology.per_datacenter`): named `thumbup-job-<tenant>-<dc>`, its
/// pods labelled with the datacenter and pinned by a nodeSelector to its
/// zone, their sidecar serving the local-read listeners for `dc`. Each
/// datacenter runs `spec.job.replicas` pods: they share the stream as
/// consumers of one group (each pod's consumer name is its pod name), so
/// the survivors already run when a datacenter is lost.
pub fn build_job_deployment_in(
    lt: &LikeTenant,
    cfg: &OperatorConfig,
    route_namespace: &str,
    dc: &Datacenter,
) -> Deployment {
    job_deployment(lt, cfg, route_namespace, Some(dc))
}

/// Whether `d`, a job Deployment that the operator made, belongs to a layout
/// that `cfg` no longer runs: a plain one with `topology.per_datacenter`, a
/// per-datacenter one without it, or one of a datacenter that the config no
/// longer lists. Told apart by the [`DATACENTER_LABEL`] alone, so that the
/// operator finds them after a restart with a new config without knowing
/// the old one. Only a Deployment controlled by a LikeTenant counts.
pub fn is_stale_job_deployment(cfg: &OperatorConfig, d: &Deployment) -> bool {
    let by_tenant = d
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == LikeTenant::kind(&()) && o.controller == Some(true));
    let datacenter = d.metadata.labels.as_ref().and_then(|l| l.get(DATACENTER_LABEL));
    by_tenant
        && match datacenter {
            None => cfg.topology.per_datacenter,
            Some(dc) => !cfg.topology.per_datacenter || cfg.datacenter(dc).is_none(),
        }
}

fn job_deployment(lt: &LikeTenant, cfg: &OperatorConfig, route_namespace: &str, dc: Option<&Datacenter>) -> Deployment {
    let t = lt.tenant();
    let mut labels = tenant_labels(&t);
    if let Some(dc) = dc {
        labels.insert(DATACENTER_LABEL.into(), dc.name.clone());
    }
    let [db_key, redis_key, tokens_key] = names::registry_secret_keys(&t);
    let spec = &lt.spec.job;
    let probe = |path: &str, period| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(JOB_ADMIN_PORT),
            ..HTTPGetAction::default()
        }),
        // The first check waits for the job's admin endpoint to listen (it
        // binds once the job has parsed its config), so a starting job does
        // not fail a probe.
        initial_delay_seconds: Some(2),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    // The CA files of the datacenters' TLS settings, at the paths that the
    // registry's `tls.ca_file` names.
    let ca_volumes: Vec<(Volume, String)> = cfg
        .job
        .ca_secrets
        .iter()
        .enumerate()
        .filter_map(|(i, ca)| {
            let (dir, name) = ca.dir_and_name()?;
            let volume = Volume {
                name: format!("ca-{i}"),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(ca.secret.clone()),
                    items: Some(vec![KeyToPath { key: ca.key.clone(), path: name.into(), ..KeyToPath::default() }]),
                    ..SecretVolumeSource::default()
                }),
                ..Volume::default()
            };
            Some((volume, dir.to_string()))
        })
        .collect();
    let args = vec![
        format!("--config={JOB_CONFIG_DIR}/{REGISTRY_KEY}"),
        format!("--secrets-dir={JOB_CONFIG_DIR}"),
        format!("--tenant={t}"),
        format!("--window-ms={}", spec.window_ms),
        format!("--max-batch={}", spec.max_batch),
        format!("--admin-listen=0.0.0.0:{JOB_ADMIN_PORT}"),
    ];
    let container = Container {
        name: "job".into(),
        image: Some(cfg.job.image.clone()),
        image_pull_policy: Some(cfg.job.image_pull_policy.clone()),
        command: Some(vec!["thumbup-job".into()]),
        args: Some(args),
        env: Some(vec![
            // A stable consumer name per pod: its pending entries are claimed
            // by the others when it dies.
            EnvVar {
                name: "THUMBUP_CONSUMER".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            },
            EnvVar { name: "RUST_LOG".into(), value: Some("info".into()), ..EnvVar::default() },
            log_format(cfg),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("admin".into()),
            container_port: JOB_ADMIN_PORT,
            ..ContainerPort::default()
        }]),
        liveness_probe: Some(probe("/healthz", 10)),
        readiness_probe: Some(probe("/readyz", 5)),
        resources: cfg.job.resources.clone(),
        volume_mounts: Some(
            std::iter::once(VolumeMount {
                name: "tenant".into(),
                mount_path: JOB_CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            })
            .chain(ca_volumes.iter().map(|(v, dir)| VolumeMount {
                name: v.name.clone(),
                mount_path: dir.clone(),
                read_only: Some(true),
                ..Default::default()
            }))
            .collect(),
        ),
        security_context: Some(restricted()),
        ..Container::default()
    };
    let init_containers =
        cfg.db_proxy.enabled.then(|| vec![build_db_proxy_sidecar(cfg, route_namespace, dc.map(|dc| dc.name.as_str()))]);
    let item = |key: &str, path: &str| KeyToPath { key: key.into(), path: path.into(), ..KeyToPath::default() };
    // The Secret's keys under the names its `tenants.yaml` references.
    let volumes = vec![Volume {
        name: "tenant".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(names::tenant_secret(&t)),
            items: Some(vec![
                item(REGISTRY_KEY, REGISTRY_KEY),
                item("db-password", &db_key),
                item("redis-password", &redis_key),
                item("token", &tokens_key),
            ]),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let volumes = volumes.into_iter().chain(ca_volumes.into_iter().map(|(v, _)| v)).collect();
    let (name, node_selector) = match dc {
        Some(dc) => (
            names::job_deployment_in(&t, &dc.name),
            Some(BTreeMap::from([(cfg.topology.zone_label.clone(), dc.zone().to_string())])),
        ),
        None => (names::job_deployment(&t), None),
    };
    let mut metadata = owned_meta(lt, name);
    metadata.labels = Some(labels.clone());
    Deployment {
        metadata,
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector { match_labels: Some(labels.clone()), ..LabelSelector::default() },
            strategy: Some(DeploymentStrategy { type_: Some("RollingUpdate".into()), ..Default::default() }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..ObjectMeta::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    init_containers,
                    volumes: Some(volumes),
                    // The job flushes its open window on SIGTERM: give it the
                    // window plus the DB transaction.
                    termination_grace_period_seconds: Some(spec.window_ms / 1000 + 30),
                    // Pod Security "restricted": non-root and the runtime's
                    // seccomp profile for every container of the pod.
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(10001),
                        run_as_group: Some(10001),
                        seccomp_profile: Some(runtime_default()),
                        ..PodSecurityContext::default()
                    }),
                    // The job never talks to the Kubernetes API; the db-proxy
                    // sidecar watches the route ConfigMap and needs the token.
                    automount_service_account_token: Some(cfg.db_proxy.enabled),
                    node_selector,
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// The core tenant config of a LikeTenant on the datacenter `dc`, without
/// credentials: its businesses, account names, schema, limits and cache
/// settings, and `dc`'s endpoints (the DB at `db_url`). The one mapping of
/// a spec to [`TenantConfig`]: the registry entry and the provisioning
/// config both start from it.
pub fn tenant_config(lt: &LikeTenant, dc: &Datacenter, db_url: String) -> TenantConfig {
    let t = lt.tenant();
    let s = &lt.spec;
    TenantConfig {
        name: t.clone(),
        businesses: s.businesses.iter().map(|b| Business { name: b.name.clone(), id: b.id }).collect(),
        tokens: Vec::new(),
        tokens_file: None,
        redis: RedisConfig {
            url: dc.redis.url.clone(),
            username: names::redis_user(&t),
            password: String::new(),
            password_file: None,
            tls: dc.redis.tls.clone(),
            cluster: dc.redis.cluster,
            seeds: dc.redis.seeds.clone(),
            replica_acks: dc.redis.replica_acks,
            replica_timeout_ms: thumbup_core::config::DEFAULT_REPLICA_TIMEOUT_MS,
        },
        db: DbConfig {
            url: db_url,
            username: names::db_user(&t),
            password: String::new(),
            password_file: None,
            schema: Some(lt.schema()),
            max_connections: s.limits.db_pool_size(),
            // Through db-proxy the session may reach either datacenter's
            // DB: its CA file must hold the CAs of both.
            tls: dc.db.tls.clone(),
        },
        // The CRD's minimums keep these positive.
        limits: Limits {
            per_mid_per_sec: s.limits.per_mid_per_sec.max(1) as u32,
            per_tenant_per_sec: s.limits.per_tenant_per_sec.max(1) as u32,
            db_fallback_per_sec: s.limits.db_fallback_per_sec.max(1) as u32,
        },
        cache: CacheSettings {
            liked_list_max: s.cache.liked_list_max.max(1) as u32,
            state_ttl_secs: s.cache.state_ttl_secs.max(1) as u64,
            counts_ttl_secs: s.cache.counts_ttl_secs.max(1) as u64,
            hot_ttl_ms: s.cache.hot_cache_ttl_ms.max(0) as u64,
            ..CacheSettings::default()
        },
        stream: StreamSettings::default(),
        local_reads: None,
    }
}

/// The registry entry of a tenant (its part of `tenants.yaml`, also the
/// job's one-tenant config), pointing at the datacenter `dc`: its Redis,
/// and its DB unless db-proxy is on (then the DB is the sidecar on the
/// pod's loopback, which follows the route: a flip changes no entry).
/// Passwords and tokens are file references resolved against the mounted
/// Secret.
pub fn registry_entry(lt: &LikeTenant, cfg: &OperatorConfig, dc: &str) -> TenantConfig {
    // When the sidecar forwards Redis too, the entry names the sidecar for
    // both tiers and no longer follows the route: a flip rewrites nothing.
    // A cluster spanning the datacenters moves its slots itself: the entry
    // names every datacenter's nodes (the client finds the cluster through
    // whichever answer) and, likewise, no longer follows the route.
    let cluster = cfg.redis_tier_cluster();
    let moves_redis = cfg.db_proxy.enabled && cfg.failover.redis_tier && !cluster;
    let fixed = moves_redis || cluster;
    let dc = if fixed { cfg.active() } else { cfg.datacenter(dc).unwrap_or_else(|| cfg.active()) };
    let db_url = if cfg.db_proxy.enabled { cfg.db_proxy.url() } else { dc.db.url.clone() };
    let mut entry = tenant_config(lt, dc, db_url);
    if moves_redis {
        entry.redis.url = cfg.db_proxy.redis_url();
    }
    if cluster {
        let others = cfg.datacenters.iter().filter(|d| d.name != dc.name);
        entry.redis.seeds.extend(others.flat_map(|d| std::iter::once(&d.redis.url).chain(&d.redis.seeds)).cloned());
    }
    // Per datacenter, every pod reads from its own datacenter through its
    // sidecar's local listeners: the same loopback URLs in every
    // datacenter, so the entry stays the same bytes wherever the route
    // points (the config refuses per_datacenter without moves_redis).
    if cfg.topology.per_datacenter && moves_redis {
        entry.local_reads =
            Some(LocalReads { redis_url: cfg.db_proxy.local_redis_url(), db_url: cfg.db_proxy.local_url() });
    }
    let [db_key, redis_key, tokens_key] = names::registry_secret_keys(&entry.name);
    entry.tokens_file = Some(tokens_key);
    entry.redis.password_file = Some(redis_key);
    entry.db.password_file = Some(db_key);
    entry
}

#[derive(Serialize)]
struct RegistryFile<'a, E> {
    tenants: Vec<&'a E>,
}

/// Renders the registry file from its entries (sorted by tenant name, so the
/// same set renders the same bytes and a no-op reconcile writes nothing).
/// Entries are [`TenantConfig`]s, or YAML values read back with
/// [`parse_registry`] (other tenants' entries are carried over as read).
pub fn render_registry<E: Serialize>(entries: &BTreeMap<String, E>) -> String {
    let header = "# Written by thumbup-operator from the LikeTenants; edits are overwritten.\n";
    let body = serde_yaml::to_string(&RegistryFile { tenants: entries.values().collect() }).expect("plain data");
    format!("{header}{body}")
}

/// Reads the entries back from a rendered registry file. Entries that do not
/// parse are an error: the operator never overwrites a file it cannot read.
pub fn parse_registry(text: &str) -> Result<BTreeMap<String, serde_yaml::Value>, serde_yaml::Error> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        tenants: Vec<serde_yaml::Value>,
    }
    let f: File = serde_yaml::from_str(text)?;
    Ok(f.tenants.into_iter().filter_map(|v| Some((v.get("name")?.as_str()?.to_string(), v))).collect())
}

/// The registry Secret's data for a tenant.
pub fn registry_secret_data(tenant: &str, c: &Credentials) -> BTreeMap<String, ByteString> {
    let [db_key, redis_key, tokens_key] = names::registry_secret_keys(tenant);
    BTreeMap::from([
        (db_key, bytes(&c.db_password)),
        (redis_key, bytes(&c.redis_password)),
        (tokens_key, bytes(&format!("{}\n", c.token))),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Business, LikeTenantSpec};

    pub(crate) fn config() -> OperatorConfig {
        OperatorConfig::parse(
            r#"
active_datacenter: dc-a
job: { image: "thumbup/thumbup:test", image_pull_policy: Never }
datacenters:
  - name: dc-a
    db: { url: "mysql://db-a:3306", admin_username: root, admin_password: pw }
    redis: { url: "redis://redis-a:6379", admin_username: default, admin_password: pw }
  - name: dc-b
    db: { url: "mysql://db-b:3306", admin_username: root, admin_password: pw }
    redis: { url: "redis://redis-b:6379", admin_username: default, admin_password: pw }
"#,
            "test",
        )
        .unwrap()
    }

    fn tenant() -> LikeTenant {
        let mut lt = LikeTenant::new(
            "video-site",
            LikeTenantSpec::with_businesses(vec![
                Business { id: 1, name: "video".into() },
                Business { id: 2, name: "article".into() },
            ]),
        );
        lt.metadata.namespace = Some("team-a".into());
        lt.metadata.uid = Some("uid-1".into());
        lt.spec.job.replicas = 3;
        lt
    }

    #[test]
    fn job_deployment_is_owned_and_follows_the_spec() {
        let lt = tenant();
        let d = build_job_deployment(&lt, &config(), "thumbup");
        assert_eq!(d.metadata.name.as_deref(), Some("thumbup-job-video-site"));
        assert_eq!(d.metadata.namespace.as_deref(), Some("team-a"));
        let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("LikeTenant", "uid-1", Some(true)));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("thumbup/thumbup:test"));
        let args = c.args.as_ref().unwrap();
        let window = format!("--window-ms={}", thumbup_core::config::DEFAULT_WINDOW_MS);
        assert!(args.contains(&"--tenant=video-site".to_string()) && args.contains(&window), "{args:?}");
        assert!(c.liveness_probe.is_some() && c.readiness_probe.is_some());
        // The Secret's keys are projected under the names its config file references.
        let items = pod.volumes.unwrap()[0].secret.clone().unwrap().items.unwrap();
        let paths: Vec<_> = items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["tenants.yaml", "video-site.db-password", "video-site.redis-password", "video-site.tokens"]);
    }

    #[test]
    fn job_pod_reaches_the_db_through_a_native_db_proxy_sidecar_following_the_route() {
        let lt = tenant();
        let pod = build_job_deployment(&lt, &config(), "thumbup").spec.unwrap().template.spec.unwrap();
        let inits = pod.init_containers.expect("the sidecar is an init container");
        let [proxy] = inits.as_slice() else { panic!("one sidecar: {inits:?}") };
        assert_eq!(proxy.name, DB_PROXY_CONTAINER);
        assert_eq!(proxy.restart_policy.as_deref(), Some("Always"), "a native sidecar keeps running");
        assert_eq!(proxy.command.as_deref(), Some(&["thumbup-db-proxy".to_string()][..]));
        assert_eq!(
            proxy.args.as_deref().unwrap(),
            ["--listen=127.0.0.1:3306", "--admin-listen=0.0.0.0:9193", "--route-config-map=thumbup/thumbup-route"]
        );
        assert_eq!(proxy.image.as_deref(), Some("thumbup/thumbup:test"), "defaults to the job image");
        let ready = proxy.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!((ready.path.as_deref(), &ready.port), (Some("/readyz"), &IntOrString::Int(9193)));
        assert!(proxy.startup_probe.is_some() && proxy.liveness_probe.is_some());
        assert_eq!(proxy.security_context, Some(restricted()));
        let entry = registry_entry(&lt, &config(), "dc-a");
        assert_eq!(entry.db.url, "mysql://127.0.0.1:3306", "the tenant's DB is the sidecar");

        let mut off = config();
        off.db_proxy.enabled = false;
        let pod = build_job_deployment(&lt, &off, "thumbup").spec.unwrap().template.spec.unwrap();
        assert!(pod.init_containers.is_none(), "no sidecar when db-proxy is off");
        assert_eq!(registry_entry(&lt, &off, "dc-a").db.url, "mysql://db-a:3306");
        let mut own = config();
        own.db_proxy.image = Some("thumbup/db-proxy:1".into());
        own.db_proxy.port = 13306;
        let pod = build_job_deployment(&lt, &own, "ops").spec.unwrap().template.spec.unwrap();
        let proxy = &pod.init_containers.unwrap()[0];
        assert_eq!(proxy.image.as_deref(), Some("thumbup/db-proxy:1"));
        assert!(proxy.args.as_ref().unwrap().contains(&"--route-config-map=ops/thumbup-route".to_string()));
        assert_eq!(registry_entry(&lt, &own, "dc-a").db.url, "mysql://127.0.0.1:13306");
    }

    #[test]
    fn job_pods_log_in_the_configured_format_and_a_bad_format_is_refused() {
        let formats = |cfg: &OperatorConfig| -> Vec<Option<String>> {
            let d = build_job_deployment(&tenant(), cfg, "thumbup");
            let pod = d.spec.unwrap().template.spec.unwrap();
            pod.containers
                .iter()
                .chain(pod.init_containers.iter().flatten())
                .map(|c| c.env.iter().flatten().find(|e| e.name == "THUMBUP_LOG_FORMAT").and_then(|e| e.value.clone()))
                .collect()
        };
        let text = formats(&config());
        assert!(text.len() >= 2 && text.iter().all(|f| f.as_deref() == Some("text")), "{text:?}");
        let mut json = config();
        json.job.log_format = "json".into();
        assert!(formats(&json).iter().all(|f| f.as_deref() == Some("json")));
        let bad = OperatorConfig::parse(
            "active_datacenter: dc-a\njob: { log_format: xml }\ndatacenters:\n  - name: dc-a\n    db: { url: \"mysql://a:3306\", admin_username: r, admin_password: p }\n    redis: { url: \"redis://a:6379\", admin_username: d, admin_password: p }\n",
            "test",
        );
        assert!(bad.unwrap_err().to_string().contains("job.log_format \"xml\""));
    }

    #[test]
    fn tenant_secret_round_trips_credentials() {
        let lt = tenant();
        let c = Credentials::generate("video-site");
        let s = build_tenant_secret(&lt, &c, &registry_entry(&lt, &config(), "dc-a"));
        let data = s.data.clone().unwrap();
        assert_eq!(data["db-username"].0, b"thumbup_video_site");
        assert_eq!(data["redis-username"].0, b"thumbup-video-site");
        assert_eq!(Credentials::from_secret(&s), Some(c.clone()));
        assert_ne!(Credentials::generate("video-site").db_password, c.db_password);
        assert!(!format!("{c:?}").contains(&c.db_password), "Debug must not print passwords");
    }

    #[test]
    fn a_key_deleted_from_the_tenant_secret_rotates_that_credential_alone() {
        let lt = tenant();
        let c = Credentials::generate("video-site");
        let mut s = build_tenant_secret(&lt, &c, &registry_entry(&lt, &config(), "dc-a"));
        assert_eq!(Credentials::kept_or_generated(Some(&s), "video-site"), c);
        s.data.as_mut().unwrap().remove("db-password");
        let rotated = Credentials::kept_or_generated(Some(&s), "video-site");
        assert_ne!(rotated.db_password, c.db_password);
        assert_eq!((&rotated.redis_password, &rotated.token), (&c.redis_password, &c.token));
        let none = Credentials::kept_or_generated(None, "video-site");
        assert!(none.token.starts_with("video-site-") && none.db_password.len() == 32);
    }

    #[test]
    fn account_names_edited_into_the_tenant_secret_are_never_read_back() {
        let lt = tenant();
        let c = Credentials::generate("video-site");
        let mut s = build_tenant_secret(&lt, &c, &registry_entry(&lt, &config(), "dc-a"));
        let data = s.data.as_mut().unwrap();
        data.insert("db-username".into(), bytes("root"));
        data.insert("redis-username".into(), bytes("default"));
        // Only the passwords and the token come back; the names stay derived.
        assert_eq!(Credentials::from_secret(&s), Some(c.clone()));
        let entry = registry_entry(&lt, &config(), "dc-a");
        assert_eq!(
            (entry.db.username.as_str(), entry.redis.username.as_str()),
            ("thumbup_video_site", "thumbup-video-site")
        );
        let fresh = build_tenant_secret(&lt, &c, &entry).data.unwrap();
        assert_eq!(fresh["db-username"].0, b"thumbup_video_site", "the next apply writes the derived name back");
    }

    #[test]
    fn db_pools_stay_below_the_db_user_session_cap() {
        let mut lt = tenant();
        assert_eq!(registry_entry(&lt, &config(), "dc-a").db.max_connections, 16, "64 by default: a quarter");
        for (cap, pool) in [(4, 1), (10, 2), (40, 10), (10_000, 16)] {
            lt.spec.limits.max_db_connections = cap;
            let pool_got = registry_entry(&lt, &config(), "dc-a").db.max_connections;
            assert_eq!(pool_got, pool, "cap {cap}");
            assert!(pool_got < cap as u32);
        }
    }

    #[test]
    fn job_pod_volume_holds_a_loadable_one_tenant_config() {
        let lt = tenant();
        let cfg = config();
        let creds = Credentials::generate("video-site");
        let secret = build_tenant_secret(&lt, &creds, &registry_entry(&lt, &cfg, "dc-a"));
        let pod = build_job_deployment(&lt, &cfg, "thumbup").spec.unwrap().template.spec.unwrap();
        // Project the Secret as the kubelet would: each item's key to its path.
        let dir = std::env::temp_dir().join(format!("thumbup-job-volume-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let data = secret.data.unwrap();
        for item in pod.volumes.unwrap()[0].secret.clone().unwrap().items.unwrap() {
            std::fs::write(dir.join(&item.path), &data[&item.key].0).unwrap();
        }
        let args = pod.containers[0].args.clone().unwrap();
        let config_arg = args.iter().find_map(|a| a.strip_prefix("--config=")).unwrap();
        let file = dir.join(std::path::Path::new(config_arg).file_name().unwrap());
        let loaded = thumbup_core::config::Config::load(&file).unwrap();
        let t = loaded.tenant("video-site").unwrap();
        assert_eq!(
            (t.db.password.as_str(), t.redis.password.as_str()),
            (creds.db_password.as_str(), creds.redis_password.as_str())
        );
        assert_eq!(t.tokens, std::slice::from_ref(&creds.token));
        assert_eq!(loaded.tenants.len(), 1, "the job sees its own tenant only");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn datacenter_tls_reaches_the_registry_and_job_pods_mount_its_ca_files() {
        let lt = tenant();
        let yaml = r#"
active_datacenter: dc-a
job:
  ca_secrets:
    - { secret: thumbup-db-ca, file: /etc/thumbup/tls/db/ca.crt }
    - { secret: thumbup-redis-ca, key: bundle.pem, file: /etc/thumbup/tls/redis/ca.crt }
datacenters:
  - name: dc-a
    db: { url: "mysql://db-a:3306", admin_username: root, admin_password: pw, tls: { mode: verify-ca, ca_file: /etc/thumbup/tls/db/ca.crt } }
    redis: { url: "rediss://redis-a:6380", admin_username: default, admin_password: pw, tls: { ca_file: /etc/thumbup/tls/redis/ca.crt } }
"#;
        let cfg = OperatorConfig::parse(yaml, "test").unwrap();
        let text = render_registry(&BTreeMap::from([("video-site".to_string(), registry_entry(&lt, &cfg, "dc-a"))]));
        assert!(text.contains("mode: verify-ca") && text.contains("ca_file: /etc/thumbup/tls/redis/ca.crt"), "{text}");
        let pod = build_job_deployment(&lt, &cfg, "thumbup").spec.unwrap().template.spec.unwrap();
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let volumes = pod.volumes.unwrap();
        // Each CA file appears at its path: the Secret key under the file name in the file's directory.
        for (file, secret, key) in [
            ("/etc/thumbup/tls/db/ca.crt", "thumbup-db-ca", "ca.crt"),
            ("/etc/thumbup/tls/redis/ca.crt", "thumbup-redis-ca", "bundle.pem"),
        ] {
            let (dir, name) = file.rsplit_once('/').unwrap();
            let m = mounts.iter().find(|m| m.mount_path == dir).unwrap_or_else(|| panic!("no mount at {dir}"));
            assert_eq!(m.read_only, Some(true));
            let v = volumes.iter().find(|v| v.name == m.name).unwrap().secret.clone().unwrap();
            assert_eq!(v.secret_name.as_deref(), Some(secret));
            let items = v.items.unwrap();
            assert_eq!((items[0].key.as_str(), items[0].path.as_str()), (key, name));
        }
        // Without CA Secrets the pod is as before.
        let pod = build_job_deployment(&lt, &config(), "thumbup").spec.unwrap().template.spec.unwrap();
        assert_eq!((pod.volumes.unwrap().len(), pod.containers[0].volume_mounts.as_ref().unwrap().len()), (1, 1));
        let bad = yaml.replace("file: /etc/thumbup/tls/db/ca.crt", "file: ca.crt");
        let err = OperatorConfig::parse(&bad, "test").unwrap_err().to_string();
        assert!(err.contains("absolute path"), "{err}");
    }

    /// What a LikeTenant that sets nothing gets is what a hand-written
    /// config that sets nothing gets: the defaults of the CRD's schema (the
    /// API server writes them into the object) and of its Rust types are
    /// core's.
    #[test]
    fn crd_defaults_are_the_core_config_defaults() {
        use kube::CustomResourceExt;
        use thumbup_core::config::{DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS};
        let core = |spec: LikeTenantSpec| {
            let lt = LikeTenant::new("defaults", spec);
            registry_entry(&lt, &config(), "dc-a")
        };
        let crd = serde_json::to_value(LikeTenant::crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
        let mut from_schema = LikeTenantSpec::with_businesses(vec![Business { id: 1, name: "video".into() }]);
        from_schema.limits = serde_json::from_value(spec["limits"]["default"].clone()).expect("spec.limits default");
        from_schema.cache = serde_json::from_value(spec["cache"]["default"].clone()).expect("spec.cache default");
        from_schema.job = serde_json::from_value(spec["job"]["default"].clone()).expect("spec.job default");
        let from_types = LikeTenantSpec::with_businesses(vec![Business { id: 1, name: "video".into() }]);
        for (what, spec) in [("the CRD schema", from_schema), ("the spec types", from_types)] {
            assert_eq!(spec.job.window_ms as u64, DEFAULT_WINDOW_MS, "{what}: job window");
            assert_eq!(spec.job.max_batch as usize, DEFAULT_MAX_BATCH, "{what}: job batch");
            let t = core(spec);
            assert_eq!(t.limits, Limits::default(), "{what}: limits");
            assert_eq!(t.cache, CacheSettings::default(), "{what}: cache");
            assert_eq!(t.stream, StreamSettings::default(), "{what}: stream");
            assert_eq!(t.schema(), names::schema_for("defaults"), "{what}: schema");
        }
    }

    #[test]
    fn rendered_registry_is_a_valid_service_config() {
        let mut lt = tenant();
        lt.spec.cache.hot_cache_ttl_ms = 1000;
        let cfg = config();
        let entries = BTreeMap::from([("video-site".to_string(), registry_entry(&lt, &cfg, "dc-b"))]);
        let text = render_registry(&entries);
        assert_eq!(render_registry(&entries), text, "rendering is deterministic");
        let dir = std::env::temp_dir().join(format!("thumbup-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(REGISTRY_KEY), &text).unwrap();
        for (k, v) in registry_secret_data("video-site", &Credentials::generate("video-site")) {
            std::fs::write(dir.join(k), v.0).unwrap();
        }
        let parsed = thumbup_core::config::Config::load(&dir.join(REGISTRY_KEY)).unwrap();
        let t = parsed.tenant("video-site").unwrap();
        // The DB is the db-proxy sidecar (it follows the route); Redis is dc-b's.
        assert_eq!(t.db.url, "mysql://127.0.0.1:3306");
        assert_eq!(t.redis.url, "redis://redis-b:6379");
        // With the Redis tier moving too, both tiers are the sidecar and a
        // flip changes no byte of the entry.
        let mut tiers = config();
        tiers.failover.redis_tier = true;
        let a = render_registry(&BTreeMap::from([("video-site".to_string(), registry_entry(&lt, &tiers, "dc-a"))]));
        let b = render_registry(&BTreeMap::from([("video-site".to_string(), registry_entry(&lt, &tiers, "dc-b"))]));
        assert_eq!(a, b, "the registry entry does not follow the route");
        assert!(a.contains("redis://127.0.0.1:6379"), "{a}");
        let sidecar = build_db_proxy_sidecar(&tiers, "thumbup", None);
        assert!(sidecar.args.unwrap().contains(&"--redis-listen=127.0.0.1:6379".to_string()));
        assert!(!a.contains("local_reads"), "no local reads unless per datacenter: {a}");
        // Per datacenter, the entry also names the sidecar's local-read
        // listeners, and still does not follow the route.
        let mut zones = tiers.clone();
        zones.topology.per_datacenter = true;
        let entry_a = registry_entry(&lt, &zones, "dc-a");
        let a = render_registry(&BTreeMap::from([("video-site".to_string(), entry_a.clone())]));
        let b = render_registry(&BTreeMap::from([("video-site".to_string(), registry_entry(&lt, &zones, "dc-b"))]));
        assert_eq!(a, b, "per datacenter too, the registry entry does not follow the route");
        let local = entry_a.local_reads.expect("local_reads per datacenter");
        assert_eq!(
            (local.redis_url.as_str(), local.db_url.as_str()),
            ("redis://127.0.0.1:6380", "mysql://127.0.0.1:3307")
        );
        std::fs::write(dir.join(REGISTRY_KEY), &a).unwrap();
        let parsed = thumbup_core::config::Config::load(&dir.join(REGISTRY_KEY)).unwrap();
        assert_eq!(parsed.tenant("video-site").unwrap().local_reads, Some(local), "the service config takes it");
        assert_eq!(t.schema(), "thumbup_video_site");
        assert_eq!(t.cache.hot_ttl_ms, 1000, "spec.cache.hotCacheTtlMs reaches the service");
        assert_eq!(t.tokens.len(), 1);
        assert!(t.has_business(2));
        assert_eq!(parse_registry(&text).unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_cluster_spanning_the_datacenters_is_named_whole_in_the_entry_which_does_not_follow_the_route() {
        let lt = tenant();
        let mut cfg = config();
        cfg.failover.redis_tier = true;
        for (dc, n) in cfg.datacenters.iter_mut().zip(["a", "b"]) {
            dc.redis.cluster = true;
            dc.redis.replica_acks = 1;
            dc.redis.url = format!("redis://redis-{n}1:6379");
            dc.redis.seeds = vec![format!("redis://redis-{n}2:6379")];
        }
        let a = registry_entry(&lt, &cfg, "dc-a");
        assert_eq!(a, registry_entry(&lt, &cfg, "dc-b"), "a flip changes no byte of the entry");
        assert!(a.redis.cluster);
        assert_eq!(a.redis.replica_acks, 1);
        let mut nodes: Vec<&str> =
            std::iter::once(a.redis.url.as_str()).chain(a.redis.seeds.iter().map(String::as_str)).collect();
        nodes.sort_unstable();
        assert_eq!(
            nodes,
            ["redis://redis-a1:6379", "redis://redis-a2:6379", "redis://redis-b1:6379", "redis://redis-b2:6379"]
        );
        // The cluster moves its slots itself: the sidecar forwards no Redis.
        let args = build_db_proxy_sidecar(&cfg, "thumbup", None).args.unwrap();
        assert!(!args.iter().any(|a| a.starts_with("--redis-listen")), "{args:?}");
    }

    fn per_datacenter() -> OperatorConfig {
        let mut cfg = config();
        cfg.failover.redis_tier = true;
        cfg.topology.per_datacenter = true;
        cfg.datacenters[1].zone = Some("zone-b".into());
        cfg
    }

    #[test]
    fn per_datacenter_each_datacenter_gets_a_job_deployment_pinned_to_its_zone_reading_locally() {
        let lt = tenant();
        let cfg = per_datacenter();
        let ds = build_job_deployments(&lt, &cfg, "thumbup");
        let names: Vec<_> = ds.iter().map(|d| d.metadata.name.clone().unwrap()).collect();
        assert_eq!(names, ["thumbup-job-video-site-dc-a", "thumbup-job-video-site-dc-b"]);
        for (d, (dc, zone)) in ds.iter().zip([("dc-a", "dc-a"), ("dc-b", "zone-b")]) {
            let spec = d.spec.clone().unwrap();
            let selector = spec.selector.match_labels.clone().unwrap();
            assert_eq!(selector.get(DATACENTER_LABEL).map(String::as_str), Some(dc), "selectors do not overlap");
            let template = spec.template;
            let pod_labels = template.metadata.unwrap().labels.unwrap();
            assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "the selector selects its pods");
            let pod = template.spec.unwrap();
            assert_eq!(
                pod.node_selector,
                Some(BTreeMap::from([("topology.kubernetes.io/zone".to_string(), zone.to_string())])),
                "{dc}"
            );
            let args = pod.init_containers.unwrap()[0].args.clone().unwrap();
            assert_eq!(
                args,
                [
                    "--listen=127.0.0.1:3306",
                    "--admin-listen=0.0.0.0:9193",
                    "--route-config-map=thumbup/thumbup-route",
                    "--redis-listen=127.0.0.1:6379",
                    &format!("--datacenter={dc}"),
                    "--local-listen=127.0.0.1:3307",
                    "--local-redis-listen=127.0.0.1:6380",
                ]
            );
            // The job's consumer name is its pod's name: distinct per pod
            // across both Deployments.
            let consumer = pod.containers[0].env.iter().flatten().find(|e| e.name == "THUMBUP_CONSUMER").unwrap();
            let field = consumer.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).unwrap();
            assert_eq!(field.field_path, "metadata.name");
            assert_eq!(d.metadata.owner_references, owned_meta(&lt, String::new()).owner_references);
        }
        // Off: the one Deployment as before, placed anywhere.
        let one = build_job_deployments(&lt, &config(), "thumbup");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].metadata.name.as_deref(), Some("thumbup-job-video-site"));
        let pod = one[0].spec.clone().unwrap().template.spec.unwrap();
        assert!(pod.node_selector.is_none());
        assert!(!one[0].spec.clone().unwrap().selector.match_labels.unwrap().contains_key(DATACENTER_LABEL));
    }

    #[test]
    fn job_deployments_of_the_other_layout_or_of_a_dropped_datacenter_are_stale() {
        let lt = tenant();
        let (off, on) = (config(), per_datacenter());
        let plain = build_job_deployment(&lt, &off, "thumbup");
        let zoned = build_job_deployments(&lt, &on, "thumbup");
        let stale = |cfg: &OperatorConfig, d: &Deployment| is_stale_job_deployment(cfg, d);
        assert!(!stale(&off, &plain) && zoned.iter().all(|d| !stale(&on, d)), "what is built is not stale");
        assert!(stale(&on, &plain), "turned on: the plain one goes");
        assert!(zoned.iter().all(|d| stale(&off, d)), "turned off: the per-datacenter ones go");
        let mut one_dc = on.clone();
        one_dc.datacenters.truncate(1);
        let left: Vec<bool> = zoned.iter().map(|d| stale(&one_dc, d)).collect();
        assert_eq!(left, [false, true], "a datacenter dropped from the config: its Deployment goes");
        let mut foreign = plain.clone();
        foreign.metadata.owner_references = None;
        assert!(!stale(&on, &foreign), "only a LikeTenant's Deployments are touched");
    }
}
