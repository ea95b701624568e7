//! The Helm chart (`charts/thumbup`) against the operator spec: `helm lint`
//! passes, and `helm template` renders, with the default values and with a
//! cluster-wide set, only objects that parse as their Kubernetes types with no
//! unknown (misspelled) field, and whose content is what the operator, the
//! service and RBAC need.
//!
//! helm comes from `.tools/bin` (`scripts/tools.sh install` puts it there when
//! it is missing); no cluster is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use k8s_openapi::Resource;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, PodSpec, ResourceRequirements, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

const RELEASE: &str = "thumbup";
const NAMESPACE: &str = "thumbup";
const EXISTING_SECRET: &str = "thumbup-data-credentials";

/// The second value set: cluster-wide RBAC, two operator replicas and the
/// admin passwords from a Secret of the user's.
const CLUSTER_WIDE: &[&str] = &[
    "--set",
    "rbac.clusterWide=true",
    "--set",
    "operator.replicas=2",
    "--set",
    "datacenterSecret.existingSecret=thumbup-data-credentials",
];

/// The service per datacenter, pinned to each zone, reading locally.
const PER_DATACENTER: &[&str] = &["--set", "topology.perDatacenter=true", "--set", "failover.redisTier=true"];

/// Every optional monitoring object on.
const ALL_METRICS_ON: &[&str] = &[
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.podMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
];

// ---------------------------------------------------------------- helpers

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn chart_dir() -> PathBuf {
    repo_root().join("charts/thumbup")
}

/// helm in `.tools/bin`, installed by `scripts/tools.sh` on first use.
fn helm() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        let helm = repo_root().join(".tools/bin/helm");
        if !helm.exists() {
            // shellcheck is for another script; this test needs helm only.
            let out = Command::new(repo_root().join("scripts/tools.sh"))
                .arg("install")
                .env("THUMBUP_SKIP_SHELLCHECK", "1")
                .output()
                .expect("run scripts/tools.sh");
            assert!(
                out.status.success(),
                "scripts/tools.sh install failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(helm.exists(), "{} is missing after scripts/tools.sh install", helm.display());
        helm
    })
}

/// One document of `helm template` output.
#[derive(Debug, Clone)]
struct Doc {
    kind: String,
    api_version: String,
    name: String,
    value: Value,
}

/// Everything one `helm template` rendered.
#[derive(Debug)]
struct Rendered {
    docs: Vec<Doc>,
}

impl Rendered {
    /// The documents of one kind.
    fn of_kind(&self, kind: &str) -> Vec<&Doc> {
        self.docs.iter().filter(|d| d.kind == kind).collect()
    }

    /// The object of type `T` named `name`, typed.
    fn get<T: Resource + DeserializeOwned>(&self, name: &str) -> T {
        let doc = self
            .docs
            .iter()
            .find(|d| d.kind == T::KIND && d.name == name)
            .unwrap_or_else(|| panic!("no {} {name} in {:?}", T::KIND, self.names()));
        serde_json::from_value(doc.value.clone()).unwrap_or_else(|e| panic!("{} {name}: {e}", T::KIND))
    }

    /// Whether an object of type `T` named `name` was rendered.
    fn has<T: Resource>(&self, name: &str) -> bool {
        self.docs.iter().any(|d| d.kind == T::KIND && d.name == name)
    }

    fn names(&self) -> Vec<String> {
        self.docs.iter().map(|d| format!("{}/{}", d.kind, d.name)).collect()
    }
}

/// The chart's test values (`ci/admin-credentials-values.yaml`): the default
/// datacenters with placeholder admin passwords, which the chart requires.
fn credentials_values() -> PathBuf {
    chart_dir().join("ci/admin-credentials-values.yaml")
}

/// `helm template` with the test values and extra arguments; Err(stderr)
/// when helm fails.
fn try_render(args: &[&str]) -> Result<Rendered, String> {
    let values = credentials_values();
    let mut all = vec!["-f", values.to_str().expect("a UTF-8 path")];
    all.extend_from_slice(args);
    try_render_raw(&all)
}

/// `helm template` with exactly `args` (no test values).
fn try_render_raw(args: &[&str]) -> Result<Rendered, String> {
    let out = Command::new(helm())
        .args(["template", RELEASE])
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(args)
        .output()
        .expect("run helm template");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("helm prints UTF-8");
    Ok(Rendered { docs: split_documents(&text) })
}

fn render(args: &[&str]) -> Rendered {
    try_render(args).unwrap_or_else(|e| panic!("helm template {args:?} failed:\n{e}"))
}

/// Splits a multi-document YAML stream into documents, skipping empty ones
/// (a template that renders to nothing but comments).
fn split_documents(text: &str) -> Vec<Doc> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml = serde_yaml::Value::deserialize(de).unwrap_or_else(|e| panic!("document {i}: {e}"));
        if yaml.is_null() {
            continue;
        }
        let value: Value = serde_json::to_value(&yaml).unwrap_or_else(|e| panic!("document {i} as JSON: {e}"));
        let field = |f: &str| value.get(f).and_then(Value::as_str).unwrap_or_default().to_string();
        let name = value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        docs.push(Doc { kind: field("kind"), api_version: field("apiVersion"), name, value });
    }
    docs
}

/// Parses a document as `T` and re-serializes it: k8s-openapi drops unknown
/// fields, so any difference from the original (nulls and empty objects or
/// lists aside) is a misspelled or misplaced field.
fn check_typed<T: Resource + DeserializeOwned + Serialize>(doc: &Doc) -> Result<(), String> {
    if doc.api_version != T::API_VERSION {
        return Err(format!("{} {}: apiVersion {} is not {}", doc.kind, doc.name, doc.api_version, T::API_VERSION));
    }
    let typed: T = serde_json::from_value(doc.value.clone()).map_err(|e| format!("{} {}: {e}", doc.kind, doc.name))?;
    let back = serde_json::to_value(&typed).map_err(|e| format!("{} {}: {e}", doc.kind, doc.name))?;
    let mut diffs = Vec::new();
    diff("", prune(&doc.value).as_ref(), prune(&back).as_ref(), &mut diffs);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!("{} {}: fields lost or changed by the typed parse:\n  {}", doc.kind, doc.name, diffs.join("\n  ")))
    }
}

/// Parses a document as the k8s-openapi type of its kind; an unknown kind is
/// an error.
fn check_doc(doc: &Doc) -> Result<(), String> {
    match doc.kind.as_str() {
        "Deployment" => check_typed::<Deployment>(doc),
        "Service" => check_typed::<Service>(doc),
        "ServiceAccount" => check_typed::<ServiceAccount>(doc),
        "ConfigMap" => check_typed::<ConfigMap>(doc),
        "Secret" => check_typed::<Secret>(doc),
        "Role" => check_typed::<Role>(doc),
        "RoleBinding" => check_typed::<RoleBinding>(doc),
        "ClusterRole" => check_typed::<ClusterRole>(doc),
        "ClusterRoleBinding" => check_typed::<ClusterRoleBinding>(doc),
        "CustomResourceDefinition" => check_typed::<CustomResourceDefinition>(doc),
        "PodDisruptionBudget" => check_typed::<PodDisruptionBudget>(doc),
        // Prometheus Operator kinds: no k8s-openapi type; their fields are
        // checked by the tests of the monitors and rules.
        "ServiceMonitor" | "PodMonitor" | "PrometheusRule" => {
            if doc.api_version != "monitoring.coreos.com/v1" || doc.value.get("spec").is_none() {
                Err(format!("{} {}: not a monitoring.coreos.com/v1 object with a spec", doc.kind, doc.name))
            } else {
                Ok(())
            }
        }
        other => Err(format!("unknown kind {other:?} ({} {})", doc.api_version, doc.name)),
    }
}

/// Drops nulls and empty objects and lists, which a typed round trip may add
/// or remove without meaning anything.
fn prune(v: &Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Object(m) => {
            let m: serde_json::Map<String, Value> =
                m.iter().filter_map(|(k, v)| prune(v).map(|v| (k.clone(), v))).collect();
            (!m.is_empty()).then_some(Value::Object(m))
        }
        Value::Array(a) if a.is_empty() => None,
        Value::Array(a) => Some(Value::Array(
            a.iter().map(|v| prune(v).unwrap_or_else(|| Value::Object(Default::default()))).collect(),
        )),
        other => Some(other.clone()),
    }
}

/// Records the paths where `a` (the original) and `b` (the round trip) differ.
fn diff(path: &str, a: Option<&Value>, b: Option<&Value>, out: &mut Vec<String>) {
    match (a, b) {
        (None, None) => {}
        (Some(a), None) => out.push(format!("{path}: {a} is gone")),
        (None, Some(b)) => out.push(format!("{path}: {b} appeared")),
        (Some(Value::Object(a)), Some(Value::Object(b))) => {
            let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for k in keys {
                diff(&format!("{path}.{k}"), a.get(k), b.get(k), out);
            }
        }
        (Some(Value::Array(a)), Some(Value::Array(b))) if a.len() == b.len() => {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                diff(&format!("{path}[{i}]"), Some(a), Some(b), out);
            }
        }
        // 1 and 1.0 are one number (e.g. a CRD schema's `minimum`).
        (Some(Value::Number(a)), Some(Value::Number(b))) if a.as_f64() == b.as_f64() => {}
        (Some(a), Some(b)) if a == b => {}
        (Some(a), Some(b)) => out.push(format!("{path}: {a} became {b}")),
    }
}

fn fullname_of(suffix: &str) -> String {
    format!("{RELEASE}-{suffix}")
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec.as_ref().and_then(|s| s.template.spec.as_ref()).expect("a pod spec")
}

fn only_container(d: &Deployment) -> &Container {
    let containers = &pod_spec(d).containers;
    assert_eq!(containers.len(), 1, "one container in {:?}", d.metadata.name);
    &containers[0]
}

fn command(c: &Container) -> Vec<String> {
    c.command.clone().unwrap_or_default().into_iter().chain(c.args.clone().unwrap_or_default()).collect()
}

/// (apiGroup, resource, verb) triples, the unit in which RBAC grants.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for r in rules {
        assert!(
            r.resource_names.is_none() && r.non_resource_urls.is_none(),
            "rules name no resourceNames or URLs: {r:?}"
        );
        for g in r.api_groups.as_deref().unwrap_or_default() {
            for res in r.resources.as_deref().unwrap_or_default() {
                for v in &r.verbs {
                    out.insert((g.clone(), res.clone(), v.clone()));
                }
            }
        }
    }
    out
}

/// What the operator's code uses (`controller::API_PERMISSIONS`, which its
/// mocked-API-server tests hold the code to): the chart grants exactly that.
fn code_grants() -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (g, r, verbs) in thumbup_operator::controller::API_PERMISSIONS {
        for v in *verbs {
            out.insert((g.to_string(), r.to_string(), v.to_string()));
        }
    }
    out
}

fn assert_no_wildcards(rules: &[PolicyRule]) {
    for r in rules {
        let all = r.verbs.iter().chain(r.resources.iter().flatten()).chain(r.api_groups.iter().flatten());
        for s in all {
            assert!(!s.contains('*'), "wildcard {s:?} in {r:?}");
        }
    }
}

/// The operator config, exactly the fields of the spec's format (any other
/// field fails the parse).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperatorYaml {
    active_datacenter: String,
    registry: RegistryYaml,
    job: JobYaml,
    db_proxy: DbProxyYaml,
    failover: FailoverYaml,
    /// Only with topology.perDatacenter.
    topology: Option<TopologyYaml>,
    datacenters: Vec<DatacenterYaml>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct TopologyYaml {
    per_datacenter: bool,
    zone_label: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DbProxyYaml {
    enabled: bool,
    image: Option<String>,
    port: u16,
    admin_port: u16,
    redis_port: u16,
    /// Only with topology.perDatacenter.
    local_port: Option<u16>,
    local_redis_port: Option<u16>,
    resources: Option<ResourceRequirements>,
}

#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct FailoverYaml {
    enabled: bool,
    route_config_map: String,
    probe_period_ms: u64,
    probe_timeout_ms: u64,
    failure_threshold: u32,
    grace_period_ms: u64,
    cap: u32,
    cap_window_ms: u64,
    replay_window_ms: u64,
    max_lag_ms: u64,
    catch_up_timeout_ms: u64,
    redis_tier: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryYaml {
    config_map: String,
    secret: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobYaml {
    image: String,
    image_pull_policy: String,
    log_format: String,
    resources: Option<ResourceRequirements>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DatacenterYaml {
    name: String,
    /// Only with topology.perDatacenter.
    zone: Option<String>,
    db: EndpointYaml,
    redis: EndpointYaml,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointYaml {
    url: String,
    admin_username: String,
    admin_password_file: String,
}

fn operator_yaml(r: &Rendered) -> OperatorYaml {
    let cm: ConfigMap = r.get(&fullname_of("operator"));
    let text = cm.data.as_ref().and_then(|d| d.get("operator.yaml")).expect("ConfigMap key operator.yaml");
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("operator.yaml does not parse: {e}\n{text}"))
}

/// The chart's values.yaml, as JSON.
fn default_values() -> Value {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("read values.yaml");
    let yaml: serde_yaml::Value = serde_yaml::from_str(&text).expect("values.yaml parses");
    serde_json::to_value(yaml).expect("values.yaml as JSON")
}

/// Where each file of the operator's projected config volume lands:
/// mount path + item path -> (source kind, source name, key).
fn operator_files(d: &Deployment) -> BTreeMap<String, (&'static str, String, String)> {
    let c = only_container(d);
    let spec = pod_spec(d);
    let mut files = BTreeMap::new();
    for m in c.volume_mounts.iter().flatten() {
        let v = spec.volumes.iter().flatten().find(|v| v.name == m.name).expect("a mount names a volume");
        let Some(p) = &v.projected else { continue };
        for s in p.sources.iter().flatten() {
            if let Some(cm) = &s.config_map {
                for i in cm.items.iter().flatten() {
                    files.insert(format!("{}/{}", m.mount_path, i.path), ("ConfigMap", cm.name.clone(), i.key.clone()));
                }
            }
            if let Some(sec) = &s.secret {
                for i in sec.items.iter().flatten() {
                    files.insert(format!("{}/{}", m.mount_path, i.path), ("Secret", sec.name.clone(), i.key.clone()));
                }
            }
        }
    }
    files
}

fn checksum_annotation(r: &Rendered) -> String {
    let d: Deployment = r.get(&fullname_of("operator"));
    let annotations = d.spec.unwrap().template.metadata.unwrap().annotations.unwrap_or_default();
    annotations.get("checksum/config").cloned().expect("checksum/config annotation")
}

// ------------------------------------------------- Pod Security "restricted"

/// Sysctls that Pod Security "baseline" (and so "restricted") allows (v1.33).
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// Volume types that "restricted" allows.
const RESTRICTED_VOLUMES: &[&str] =
    &["configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"];

/// Every way `pod` (named `name`) breaks Pod Security "restricted" as of
/// Kubernetes v1.33, one line each: the baseline checks (host namespaces,
/// privileged, capabilities, hostPath, host ports, AppArmor, SELinux,
/// procMount, seccomp, sysctls) and the restricted ones (volume types,
/// privilege escalation, non-root, runAsUser, seccomp, capabilities).
fn restricted_violations(name: &str, pod: &PodSpec) -> Vec<String> {
    let mut v = Vec::new();
    let mut bad = |what: String| v.push(format!("{name}: {what}"));
    for (flag, set) in [("hostNetwork", pod.host_network), ("hostPID", pod.host_pid), ("hostIPC", pod.host_ipc)] {
        if set == Some(true) {
            bad(format!("{flag} is true"));
        }
    }
    let psc = pod.security_context.clone().unwrap_or_default();
    for s in psc.sysctls.iter().flatten() {
        if !SAFE_SYSCTLS.contains(&s.name.as_str()) {
            bad(format!("sysctl {} is not in the safe set", s.name));
        }
    }
    for vol in pod.volumes.iter().flatten() {
        let json = serde_json::to_value(vol).unwrap();
        let kinds: Vec<&String> = json.as_object().unwrap().keys().filter(|k| *k != "name").collect();
        for k in kinds {
            if !RESTRICTED_VOLUMES.contains(&k.as_str()) {
                bad(format!("volume {} is of type {k}", vol.name));
            }
        }
    }
    let pod_seccomp = psc.seccomp_profile.as_ref().map(|p| p.type_.clone());
    if pod_seccomp.as_deref() == Some("Unconfined") {
        bad("the pod's seccompProfile is Unconfined".into());
    }
    if psc.run_as_user == Some(0) {
        bad("the pod runs as user 0".into());
    }
    if let Some(se) = &psc.se_linux_options {
        check_selinux("the pod", se, &mut bad);
    }
    if let Some(a) = &psc.app_armor_profile
        && !["RuntimeDefault", "Localhost"].contains(&a.type_.as_str())
    {
        bad(format!("the pod's appArmorProfile is {}", a.type_));
    }
    if psc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
        bad("the pod is a Windows hostProcess".into());
    }
    let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
    for c in containers {
        let sc = c.security_context.clone().unwrap_or_default();
        let cname = &c.name;
        if sc.privileged == Some(true) {
            bad(format!("container {cname} is privileged"));
        }
        if sc.allow_privilege_escalation != Some(false) {
            bad(format!("container {cname} does not set allowPrivilegeEscalation: false"));
        }
        let non_root = sc.run_as_non_root.or(psc.run_as_non_root);
        if non_root != Some(true) {
            bad(format!("container {cname}: runAsNonRoot is not true (pod or container)"));
        }
        if sc.run_as_user == Some(0) {
            bad(format!("container {cname} runs as user 0"));
        }
        match sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()).or(pod_seccomp.as_deref()) {
            Some("RuntimeDefault" | "Localhost") => {}
            other => bad(format!("container {cname}: seccompProfile {other:?}, not RuntimeDefault or Localhost")),
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        if !caps.drop.iter().flatten().any(|d| d == "ALL") {
            bad(format!("container {cname} does not drop ALL capabilities"));
        }
        for add in caps.add.iter().flatten() {
            if add != "NET_BIND_SERVICE" {
                bad(format!("container {cname} adds capability {add}"));
            }
        }
        if sc.proc_mount.as_deref().is_some_and(|p| p != "Default") {
            bad(format!("container {cname}: procMount {:?}", sc.proc_mount));
        }
        if let Some(se) = &sc.se_linux_options {
            check_selinux(&format!("container {cname}"), se, &mut bad);
        }
        if let Some(a) = &sc.app_armor_profile
            && !["RuntimeDefault", "Localhost"].contains(&a.type_.as_str())
        {
            bad(format!("container {cname}: appArmorProfile {}", a.type_));
        }
        if sc.windows_options.as_ref().and_then(|w| w.host_process) == Some(true) {
            bad(format!("container {cname} is a Windows hostProcess"));
        }
        for p in c.ports.iter().flatten() {
            if p.host_port.is_some_and(|h| h != 0) {
                bad(format!("container {cname} binds host port {:?}", p.host_port));
            }
        }
    }
    v
}

fn check_selinux(who: &str, se: &k8s_openapi::api::core::v1::SELinuxOptions, bad: &mut impl FnMut(String)) {
    let allowed = ["container_t", "container_init_t", "container_kvm_t", "container_engine_t"];
    if se.type_.as_deref().is_some_and(|t| !t.is_empty() && !allowed.contains(&t)) {
        bad(format!("{who}: SELinux type {:?}", se.type_));
    }
    if se.user.as_deref().is_some_and(|u| !u.is_empty()) || se.role.as_deref().is_some_and(|r| !r.is_empty()) {
        bad(format!("{who}: SELinux user or role set"));
    }
}

/// An operator config for building job pods, with db-proxy on or off.
fn job_operator_config(db_proxy: bool) -> thumbup_operator::config::OperatorConfig {
    let text = format!(
        r#"
active_datacenter: dc-a
db_proxy: {{ enabled: {db_proxy} }}
datacenters:
  - name: dc-a
    db: {{ url: "mysql://db-a:3306", admin_username: root, admin_password: pw }}
    redis: {{ url: "redis://redis-a:6379", admin_username: default, admin_password: pw }}
"#
    );
    thumbup_operator::config::OperatorConfig::parse(&text, "test").unwrap()
}

/// The operator config of the chart rendered with [`PER_DATACENTER`], as
/// the operator loads it.
fn per_datacenter_operator_config() -> thumbup_operator::config::OperatorConfig {
    let r = render(PER_DATACENTER);
    let cm: ConfigMap = r.get(&fullname_of("operator"));
    let text = cm.data.as_ref().and_then(|d| d.get("operator.yaml")).expect("ConfigMap key operator.yaml");
    thumbup_operator::config::OperatorConfig::parse(text, "the chart's operator.yaml").expect("the operator takes it")
}

// ---------------------------------------------------------------- tests

#[test]
fn every_pod_of_the_chart_and_the_operator_passes_pod_security_restricted() {
    let mut pods: Vec<(String, PodSpec)> = Vec::new();
    for args in [&[][..], CLUSTER_WIDE, &["--set", "dbProxy.enabled=false"][..], PER_DATACENTER] {
        let r = render(args);
        for d in r.of_kind("Deployment") {
            let dep: Deployment = r.get(&d.name);
            pods.push((format!("chart {args:?} Deployment {}", d.name), pod_spec(&dep).clone()));
        }
    }
    for db_proxy in [true, false] {
        let spec = thumbup_operator::crd::LikeTenantSpec::with_businesses(vec![thumbup_operator::crd::Business {
            id: 1,
            name: "video".into(),
        }]);
        let lt = thumbup_operator::crd::LikeTenant::new("demo", spec);
        let d = thumbup_operator::resources::build_job_deployment(&lt, &job_operator_config(db_proxy), NAMESPACE);
        pods.push((format!("operator job Deployment (db-proxy {db_proxy})"), pod_spec(&d).clone()));
    }
    let lt = thumbup_operator::crd::LikeTenant::new(
        "demo",
        thumbup_operator::crd::LikeTenantSpec::with_businesses(vec![thumbup_operator::crd::Business {
            id: 1,
            name: "video".into(),
        }]),
    );
    for d in thumbup_operator::resources::build_job_deployments(&lt, &per_datacenter_operator_config(), NAMESPACE) {
        pods.push((format!("operator job Deployment {:?}", d.metadata.name), pod_spec(&d).clone()));
    }
    assert!(pods.len() >= 8, "{}", pods.len());
    let violations: Vec<String> = pods.iter().flat_map(|(name, pod)| restricted_violations(name, pod)).collect();
    assert!(violations.is_empty(), "Pod Security \"restricted\" would refuse:\n{}", violations.join("\n"));
}

#[test]
fn the_pod_security_check_flags_each_restricted_rule() {
    // The check above would pass vacuously if it found nothing ever.
    let pod: PodSpec = serde_json::from_value(serde_json::json!({
        "hostNetwork": true,
        "securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]},
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "ports": [{"containerPort": 80, "hostPort": 80}],
            "securityContext": {"privileged": true, "runAsUser": 0, "procMount": "Unmasked",
                "capabilities": {"add": ["SYS_ADMIN"]}}}],
    }))
    .unwrap();
    let got = restricted_violations("p", &pod);
    for want in [
        "hostNetwork",
        "kernel.msgmax",
        "type hostPath",
        "privileged",
        "allowPrivilegeEscalation",
        "runAsNonRoot",
        "user 0",
        "seccompProfile None",
        "drop ALL",
        "SYS_ADMIN",
        "procMount",
        "host port",
    ] {
        assert!(got.iter().any(|v| v.contains(want)), "{want} not flagged in {got:#?}");
    }
}

#[test]
fn chart_passes_helm_lint_strict() {
    for strict in [false, true] {
        let mut cmd = Command::new(helm());
        cmd.arg("lint").arg(chart_dir()).arg("-f").arg(credentials_values());
        if strict {
            cmd.arg("--strict");
        }
        let out = cmd.output().expect("run helm lint");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        println!("helm lint (strict: {strict}):\n{text}");
        assert!(out.status.success(), "helm lint failed:\n{text}");
        assert!(!text.contains("[ERROR]") && !text.contains("[WARNING]"), "helm lint complains:\n{text}");
    }
}

#[test]
fn every_rendered_object_parses_as_its_kubernetes_type_without_unknown_fields() {
    let per_datacenter_metrics = [PER_DATACENTER, ALL_METRICS_ON].concat();
    for args in [&[][..], CLUSTER_WIDE, ALL_METRICS_ON, &per_datacenter_metrics] {
        let r = render(args);
        assert!(r.docs.len() >= 7, "too few objects: {:?}", r.names());
        let errors: Vec<String> = r.docs.iter().filter_map(|d| check_doc(d).err()).collect();
        assert!(errors.is_empty(), "values {args:?}:\n{}", errors.join("\n"));
        for d in &r.docs {
            let cluster_scoped =
                matches!(d.kind.as_str(), "ClusterRole" | "ClusterRoleBinding" | "CustomResourceDefinition");
            let ns = d.value.pointer("/metadata/namespace").and_then(Value::as_str);
            if cluster_scoped {
                assert_eq!(ns, None, "{} {} is cluster-scoped", d.kind, d.name);
            } else {
                assert_eq!(ns, Some(NAMESPACE), "{} {} lands in the release namespace", d.kind, d.name);
            }
        }
    }
}

#[test]
fn typed_round_trip_catches_a_misspelled_field_and_an_unknown_kind() {
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: { name: typo }
spec:
  selector: { matchLabels: { app: x } }
  template:
    metadata: { labels: { app: x } }
    spec:
      containers:
        - name: c
          image: x
          port: [{ containerPort: 1 }]
---
apiVersion: v1
kind: Pod
metadata: { name: stray }
"#;
    let docs = split_documents(text);
    let err = check_doc(&docs[0]).expect_err("a misspelled field is caught");
    assert!(err.contains("containers[0].port"), "{err}");
    let err = check_doc(&docs[1]).expect_err("an unknown kind is refused");
    assert!(err.contains("unknown kind \"Pod\""), "{err}");
}

#[test]
fn operator_config_map_carries_the_datacenters_of_the_values() {
    let r = render(&[]);
    let cfg = operator_yaml(&r);
    let values = default_values();
    assert_eq!(cfg.active_datacenter, values["activeDatacenter"]);
    assert_eq!(cfg.registry.config_map, "thumbup-tenants");
    assert_eq!(cfg.registry.secret, "thumbup-tenant-credentials");
    assert_eq!(cfg.job.image, "thumbup/thumbup:0.1.0");
    assert_eq!(cfg.job.image_pull_policy, "IfNotPresent");
    let job_resources = serde_json::to_value(cfg.job.resources.expect("job.resources")).unwrap();
    assert_eq!(job_resources, values["job"]["resources"]);

    let want = values["datacenters"].as_array().expect("datacenters list");
    assert_eq!(cfg.datacenters.len(), want.len());
    for (dc, v) in cfg.datacenters.iter().zip(want) {
        assert_eq!(dc.name, v["name"]);
        assert_eq!(dc.db.url, v["db"]["url"]);
        assert_eq!(dc.db.admin_username, v["db"]["adminUsername"]);
        assert_eq!(dc.db.admin_password_file, format!("/etc/thumbup-operator/secrets/{}-db-password", dc.name));
        assert_eq!(dc.redis.url, v["redis"]["url"]);
        assert_eq!(dc.redis.admin_username, v["redis"]["adminUsername"]);
        assert_eq!(dc.redis.admin_password_file, format!("/etc/thumbup-operator/secrets/{}-redis-password", dc.name));
    }

    // Other datacenters, another active one, another image: all follow.
    let r = render(&[
        "--set",
        "activeDatacenter=east",
        "--set",
        "image.tag=e2e",
        "--set-json",
        r#"datacenters=[{"name":"east","db":{"url":"mysql://db-east:4000","adminUsername":"admin","adminPassword":"p1"},"redis":{"url":"rediss://redis-east:6380","adminUsername":"ops","adminPassword":"p2"}}]"#,
    ]);
    let cfg = operator_yaml(&r);
    assert_eq!(cfg.active_datacenter, "east");
    assert_eq!(cfg.job.image, "thumbup/thumbup:e2e");
    let names: Vec<&str> = cfg.datacenters.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["east"]);
    assert_eq!(cfg.datacenters[0].db.url, "mysql://db-east:4000");
    assert_eq!(cfg.datacenters[0].redis.admin_username, "ops");
}

#[test]
fn operator_reads_every_admin_password_file_from_the_admin_secret() {
    for (args, secret) in [(&[][..], fullname_of("operator-admin")), (CLUSTER_WIDE, EXISTING_SECRET.to_string())] {
        let r = render(args);
        let cfg = operator_yaml(&r);
        let d: Deployment = r.get(&fullname_of("operator"));
        let files = operator_files(&d);
        assert_eq!(
            files.get("/etc/thumbup-operator/operator.yaml"),
            Some(&("ConfigMap", fullname_of("operator"), "operator.yaml".to_string()))
        );
        for dc in &cfg.datacenters {
            for (file, key) in [
                (&dc.db.admin_password_file, format!("{}-db-password", dc.name)),
                (&dc.redis.admin_password_file, format!("{}-redis-password", dc.name)),
            ] {
                assert_eq!(files.get(file), Some(&("Secret", secret.clone(), key.clone())), "{file}");
                if secret != EXISTING_SECRET {
                    let s: Secret = r.get(&secret);
                    assert!(s.data.unwrap_or_default().contains_key(&key), "Secret {secret} has {key}");
                }
            }
        }
        // The user's own Secret replaces the chart's.
        assert_eq!(r.has::<Secret>(&fullname_of("operator-admin")), secret != EXISTING_SECRET, "{args:?}");
    }
}

#[test]
fn operator_pod_knows_its_namespace_and_name_and_probes_the_admin_port() {
    let r = render(&[]);
    let d: Deployment = r.get(&fullname_of("operator"));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
    assert_eq!(pod_spec(&d).service_account_name.as_deref(), Some("thumbup-operator"));
    assert!(r.has::<ServiceAccount>("thumbup-operator"));
    let c = only_container(&d);
    assert_eq!(c.image.as_deref(), Some("thumbup/thumbup:0.1.0"));
    let cmd = command(c);
    assert_eq!(&cmd[..2], ["thumbup-operator", "run"]);
    let flag = |name: &str| cmd.iter().position(|a| a == name).map(|i| cmd[i + 1].as_str());
    assert_eq!(flag("--config"), Some("/etc/thumbup-operator/operator.yaml"));
    assert_eq!(flag("--admin-listen"), Some("0.0.0.0:9192"));
    assert_eq!(flag("--lease-name"), Some("thumbup-operator"));
    assert!(!cmd.contains(&"--all-namespaces".to_string()), "namespaced by default: {cmd:?}");

    let env: BTreeMap<&str, Option<&str>> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            let field = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.as_str());
            (e.name.as_str(), field)
        })
        .collect();
    assert_eq!(env.get("THUMBUP_NAMESPACE"), Some(&Some("metadata.namespace")));
    assert_eq!(env.get("POD_NAME"), Some(&Some("metadata.name")));

    let ports: Vec<(Option<&str>, i32)> =
        c.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("admin"), 9192)]);
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(serde_json::to_value(&get.port).unwrap(), "admin");
    }
}

#[test]
fn operator_pods_roll_when_the_operator_config_changes() {
    let base = checksum_annotation(&render(&[]));
    assert!(base.len() == 64 && base.chars().all(|c| c.is_ascii_hexdigit()), "sha256: {base}");
    assert_eq!(base, checksum_annotation(&render(&[])), "the checksum is stable");
    for change in ["activeDatacenter=dc-b", "job.resources.limits.memory=1Gi", "registry.configMap=other"] {
        assert_ne!(base, checksum_annotation(&render(&["--set", change])), "{change} changes the checksum");
    }
    // A value the config does not hold leaves the pods alone.
    assert_eq!(base, checksum_annotation(&render(&["--set", "service.replicas=5"])));
}

#[test]
fn service_mounts_the_registry_optionally_and_runs_with_config_optional() {
    let r = render(&[]);
    let d: Deployment = r.get(&fullname_of("service"));
    let c = only_container(&d);
    assert_eq!(
        command(c),
        [
            "thumbup-service",
            "serve",
            "--listen",
            "0.0.0.0:50051",
            "--admin-listen",
            "0.0.0.0:9190",
            "--config",
            "/etc/thumbup/config/tenants.yaml",
            "--secrets-dir",
            "/etc/thumbup/secrets",
            "--config-optional",
        ]
    );
    let spec = pod_spec(&d);
    let volume = |mount_path: &str| {
        let m = c.volume_mounts.iter().flatten().find(|m| m.mount_path == mount_path).expect(mount_path);
        spec.volumes.iter().flatten().find(|v| v.name == m.name).expect("the mount's volume").clone()
    };
    let cm = volume("/etc/thumbup/config").config_map.expect("a ConfigMap volume");
    assert_eq!((cm.name.as_str(), cm.optional), ("thumbup-tenants", Some(true)));
    let secret = volume("/etc/thumbup/secrets").secret.expect("a Secret volume");
    assert_eq!((secret.secret_name.as_deref(), secret.optional), (Some("thumbup-tenant-credentials"), Some(true)));
    // The db-proxy sidecar watches the route ConfigMap: it needs the token.
    assert_eq!(spec.automount_service_account_token, Some(true));

    let ports: Vec<(Option<&str>, i32)> =
        c.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("grpc"), 50051), (Some("admin"), 9190)]);
    for (probe, path) in [(&c.liveness_probe, "/healthz"), (&c.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        assert_eq!((get.path.as_deref(), serde_json::to_value(&get.port).unwrap()), (Some(path), "admin".into()));
    }

    let svc: Service = r.get(&fullname_of("service"));
    let svc_spec = svc.spec.expect("a Service spec");
    let ports: Vec<(Option<&str>, i32)> =
        svc_spec.ports.iter().flatten().map(|p| (p.name.as_deref(), p.port)).collect();
    assert_eq!(ports, [(Some("grpc"), 50051), (Some("admin"), 9190)]);
    let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    let selector = svc_spec.selector.expect("a selector");
    assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{selector:?} selects {pod_labels:?}");
}

#[test]
fn rbac_is_a_namespaced_role_with_exactly_the_rules_the_code_uses() {
    let r = render(&[]);
    assert!(r.of_kind("ClusterRole").is_empty() && r.of_kind("ClusterRoleBinding").is_empty(), "{:?}", r.names());
    let role: Role = r.get("thumbup-operator");
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards(&rules);
    assert_eq!(grants(&rules), code_grants(), "the chart grants what the code uses, no more and no less");
    let binding: RoleBinding = r.get("thumbup-operator");
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("Role", "thumbup-operator"));
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (subjects[0].kind.as_str(), subjects[0].name.as_str(), subjects[0].namespace.as_deref()),
        ("ServiceAccount", "thumbup-operator", Some(NAMESPACE))
    );

    let none = render(&["--set", "rbac.create=false"]);
    for kind in ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"] {
        assert!(none.of_kind(kind).is_empty(), "rbac.create=false renders no {kind}");
    }
}

#[test]
fn cluster_wide_switches_to_a_cluster_role_and_all_namespaces() {
    let r = render(CLUSTER_WIDE);
    // Only the route reader stays a namespaced Role (the route lives in the release namespace).
    let roles: Vec<_> =
        r.of_kind("Role").iter().chain(r.of_kind("RoleBinding").iter()).map(|d| d.name.clone()).collect();
    assert_eq!(
        roles,
        ["thumbup-route-reader", "thumbup-registry-reader", "thumbup-route-reader", "thumbup-registry-reader"],
        "{:?}",
        r.names()
    );
    let name = "thumbup-thumbup-operator";
    let role: ClusterRole = r.get(name);
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards(&rules);
    assert_eq!(grants(&rules), code_grants(), "the chart grants what the code uses, no more and no less");
    let binding: ClusterRoleBinding = r.get(name);
    assert_eq!((binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), ("ClusterRole", name));
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(
        subjects.iter().map(|s| (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref())).collect::<Vec<_>>(),
        [("ServiceAccount", "thumbup-operator", Some(NAMESPACE))]
    );

    let d: Deployment = r.get(&fullname_of("operator"));
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2), "leader election makes two replicas safe");
    assert!(command(only_container(&d)).contains(&"--all-namespaces".to_string()));
}

#[test]
fn pods_run_as_non_root_with_a_read_only_root_fs_and_no_capabilities() {
    let r = render(&[]);
    for name in [fullname_of("operator"), fullname_of("service")] {
        let d: Deployment = r.get(&name);
        let pod = pod_spec(&d).security_context.clone().expect("a pod security context");
        assert_eq!(pod.run_as_non_root, Some(true), "{name}");
        assert!(pod.run_as_user.is_some_and(|u| u != 0), "{name}");
        let c = only_container(&d).security_context.clone().expect("a container security context");
        assert_eq!(c.read_only_root_filesystem, Some(true), "{name}");
        assert_eq!(c.allow_privilege_escalation, Some(false), "{name}");
        let drop = c.capabilities.and_then(|c| c.drop).unwrap_or_default();
        assert_eq!(drop, ["ALL"], "{name}");
    }
}

#[test]
fn placement_values_reach_both_deployments() {
    let r = render(&[
        "--set",
        "nodeSelector.disk=ssd",
        "--set-json",
        r#"tolerations=[{"key":"dedicated","operator":"Equal","value":"thumbup","effect":"NoSchedule"}]"#,
        "--set",
        "service.replicas=3",
    ]);
    for name in [fullname_of("operator"), fullname_of("service")] {
        let d: Deployment = r.get(&name);
        let spec = pod_spec(&d);
        assert_eq!(spec.node_selector.as_ref().and_then(|n| n.get("disk")).map(String::as_str), Some("ssd"), "{name}");
        assert_eq!(spec.tolerations.as_ref().map(|t| t[0].key.as_deref()), Some(Some("dedicated")), "{name}");
    }
    let d: Deployment = r.get(&fullname_of("service"));
    assert_eq!(d.spec.unwrap().replicas, Some(3));
}

#[test]
fn an_active_datacenter_that_is_not_listed_fails_the_render() {
    let err = try_render(&["--set", "activeDatacenter=dc-x"]).expect_err("dc-x is not a datacenter");
    assert!(err.contains(r#"activeDatacenter "dc-x" is not one of datacenters"#), "{err}");
}

#[test]
fn service_pods_reach_the_db_through_a_native_db_proxy_sidecar_following_the_route() {
    let r = render(&[]);
    let d: Deployment = r.get(&fullname_of("service"));
    let spec = pod_spec(&d);
    let inits = spec.init_containers.clone().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one sidecar: {inits:?}");
    let p = &inits[0];
    assert_eq!(p.name, "db-proxy");
    assert_eq!(p.restart_policy.as_deref(), Some("Always"), "a native sidecar (Kubernetes 1.29+)");
    assert_eq!(
        command(p),
        [
            "thumbup-db-proxy",
            "--listen=127.0.0.1:3306",
            "--admin-listen=0.0.0.0:9193",
            &format!("--route-config-map={NAMESPACE}/thumbup-route"),
        ]
    );
    assert_eq!(p.image, only_container(&d).image, "the sidecar defaults to the service image");
    let ports: Vec<(Option<&str>, i32)> =
        p.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port)).collect();
    assert_eq!(ports, [(Some("proxy-admin"), 9193)]);
    for (probe, path) in
        [(&p.startup_probe, "/readyz"), (&p.readiness_probe, "/readyz"), (&p.liveness_probe, "/healthz")]
    {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
    }
    let sc = p.security_context.clone().expect("the sidecar runs restricted");
    assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation), (Some(true), Some(false)));

    // The operator config turns the sidecar on for the jobs too.
    let y = operator_yaml(&r);
    assert!(y.db_proxy.enabled);
    assert_eq!((y.db_proxy.port, y.db_proxy.admin_port, y.db_proxy.redis_port), (3306, 9193, 6379));
    assert_eq!(y.db_proxy.image, None, "the operator defaults the jobs' sidecar to the job image");
    assert!(y.db_proxy.resources.is_some_and(|r| r.requests.is_some()), "the sidecar's resources reach the jobs");
    let own = render(&["--set", "dbProxy.image=registry.example/db-proxy:1"]);
    assert_eq!(operator_yaml(&own).db_proxy.image.as_deref(), Some("registry.example/db-proxy:1"));
    let d: Deployment = own.get(&fullname_of("service"));
    let sidecar = &pod_spec(&d).init_containers.as_ref().unwrap()[0];
    assert_eq!(sidecar.image.as_deref(), Some("registry.example/db-proxy:1"));

    let off = render(&["--set", "dbProxy.enabled=false"]);
    let d: Deployment = off.get(&fullname_of("service"));
    assert!(pod_spec(&d).init_containers.is_none(), "no sidecar when disabled");
    assert_eq!(pod_spec(&d).automount_service_account_token, Some(true), "the service watches the registry");
    let neither = render(&["--set", "dbProxy.enabled=false", "--set", "service.registryFromApi=false"]);
    let d: Deployment = neither.get(&fullname_of("service"));
    assert_eq!(pod_spec(&d).automount_service_account_token, Some(false), "no API token when nothing uses it");
    assert!(!off.has::<Role>("thumbup-route-reader"), "no route reader when disabled");
    assert!(!operator_yaml(&off).db_proxy.enabled);
}

#[test]
fn route_readers_may_read_the_route_config_map_and_nothing_else() {
    let r = render(&[]);
    let role: Role = r.get("thumbup-route-reader");
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards(&rules);
    let [rule] = rules.as_slice() else { panic!("one rule: {rules:?}") };
    assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(rule.resources.as_deref(), Some(&["configmaps".to_string()][..]));
    assert_eq!(rule.resource_names.as_deref(), Some(&["thumbup-route".to_string()][..]));
    assert_eq!(rule.verbs, ["get", "list", "watch"]);
    let binding: RoleBinding = r.get("thumbup-route-reader");
    assert_eq!(binding.role_ref.name, "thumbup-route-reader");
    let subjects: Vec<_> =
        binding.subjects.unwrap_or_default().into_iter().map(|s| (s.kind, s.name, s.namespace)).collect();
    assert_eq!(
        subjects,
        [
            ("ServiceAccount".to_string(), "thumbup-service".to_string(), Some(NAMESPACE.to_string())),
            ("Group".to_string(), "system:serviceaccounts".to_string(), None),
        ]
    );
    let renamed = render(&["--set", "failover.routeConfigMap=dc-route"]);
    let role: Role = renamed.get("thumbup-route-reader");
    assert_eq!(role.rules.unwrap()[0].resource_names.as_deref(), Some(&["dc-route".to_string()][..]));
}

#[test]
fn the_service_may_list_and_watch_the_registry_objects_by_name_and_nothing_else() {
    let r = render(&[]);
    let role: Role = r.get("thumbup-registry-reader");
    let rules = role.rules.unwrap_or_default();
    assert_no_wildcards(&rules);
    // Each rule names exactly the registry object of its resource.
    let mut granted = BTreeSet::new();
    for rule in &rules {
        let names = rule.resource_names.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        let expected = match resources.as_slice() {
            [r] if r == "configmaps" => "thumbup-tenants",
            [r] if r == "secrets" => "thumbup-tenant-credentials",
            other => panic!("unexpected resources {other:?}"),
        };
        assert_eq!(names, [expected], "{rule:?}");
        for v in &rule.verbs {
            granted.insert((rule.api_groups.clone().unwrap_or_default()[0].clone(), resources[0].clone(), v.clone()));
        }
    }
    let used: BTreeSet<_> = thumbup_service::registry_api::SERVICE_API_PERMISSIONS
        .iter()
        .flat_map(|(g, r, verbs)| verbs.iter().map(move |v| (g.to_string(), r.to_string(), v.to_string())))
        .collect();
    assert_eq!(granted, used, "the chart grants what the service's code uses, no more and no less");
    let binding: RoleBinding = r.get("thumbup-registry-reader");
    let subjects: Vec<_> =
        binding.subjects.unwrap_or_default().into_iter().map(|s| (s.kind, s.name, s.namespace)).collect();
    assert_eq!(subjects, [("ServiceAccount".to_string(), "thumbup-service".to_string(), Some(NAMESPACE.to_string()))]);

    let d: Deployment = r.get(&fullname_of("service"));
    assert_eq!(pod_spec(&d).service_account_name.as_deref(), Some("thumbup-service"));
    let env: BTreeMap<String, String> = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(env.get("THUMBUP_REGISTRY_FROM_API").map(String::as_str), Some("true"));
    assert_eq!(env.get("THUMBUP_REGISTRY_NAMESPACE").map(String::as_str), Some(NAMESPACE));
    assert_eq!(env.get("THUMBUP_REGISTRY_CONFIG_MAP").map(String::as_str), Some("thumbup-tenants"));
    assert_eq!(env.get("THUMBUP_REGISTRY_SECRET").map(String::as_str), Some("thumbup-tenant-credentials"));

    let files = render(&["--set", "service.registryFromApi=false"]);
    assert!(!files.has::<Role>("thumbup-registry-reader"), "no registry reader when the files are the source");
    let d: Deployment = files.get(&fullname_of("service"));
    let env = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0].env.clone().unwrap_or_default();
    assert!(env.iter().all(|e| !e.name.starts_with("THUMBUP_REGISTRY")), "{env:?}");
}

#[test]
fn operator_config_carries_the_failover_settings_of_the_values() {
    let y = operator_yaml(&render(&[]));
    assert_eq!(
        y.failover,
        FailoverYaml {
            enabled: true,
            route_config_map: "thumbup-route".into(),
            probe_period_ms: 2000,
            probe_timeout_ms: 1000,
            failure_threshold: 3,
            grace_period_ms: 3000,
            cap: 1,
            cap_window_ms: 3_600_000,
            replay_window_ms: 120_000,
            max_lag_ms: 30_000,
            catch_up_timeout_ms: 30_000,
            redis_tier: false,
        }
    );
    let y = operator_yaml(&render(&[
        "--set",
        "failover.failureThreshold=5",
        "--set",
        "failover.capWindowMs=86400000",
        "--set",
        "activeDatacenter=dc-b",
        "--set",
        "failover.redisTier=true",
    ]));
    assert_eq!((y.failover.failure_threshold, y.failover.cap_window_ms), (5, 86_400_000));
    assert!(y.failover.redis_tier, "failover.redisTier reaches the operator config");
    assert_eq!(y.active_datacenter, "dc-b", "a new activeDatacenter reaches the operator (a planned switchover)");
    let err = try_render(&["--set", "failover.failureThreshold=0"]).expect_err("a zero threshold is refused");
    assert!(err.contains("failureThreshold"), "{err}");
}

#[test]
fn tls_values_mount_each_file_from_its_secret_and_reach_the_operator_config() {
    let r = render(&[
        "--set",
        "tls.grpc.secretName=thumbup-grpc-tls",
        "--set",
        "tls.db.mode=verify-ca",
        "--set",
        "tls.db.caSecret=thumbup-db-ca",
        "--set",
        "tls.redis.caSecret=thumbup-redis-ca",
        "--set",
        "tls.redis.caKey=bundle.pem",
        "--set-json",
        r#"datacenters=[{"name":"dc-a","db":{"url":"mysql://db-a:3306","adminUsername":"root","adminPassword":"p1"},"redis":{"url":"rediss://redis-a:6380","adminUsername":"default","adminPassword":"p2"}}]"#,
    ]);
    // The operator config, as the operator reads it.
    let cm: ConfigMap = r.get(&fullname_of("operator"));
    let text = &cm.data.as_ref().unwrap()["operator.yaml"];
    let cfg = thumbup_operator::config::OperatorConfig::parse(text, "operator.yaml")
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    let dc = cfg.active();
    let db_tls = dc.db.tls.as_ref().expect("db.tls");
    assert_eq!(db_tls.mode, thumbup_core::config::DbTlsMode::VerifyCa);
    assert_eq!(db_tls.ca_file.as_deref(), Some("/etc/thumbup/tls/db/ca.crt"));
    let redis_ca = dc.redis.tls.as_ref().and_then(|t| t.ca_file.as_deref());
    assert_eq!(redis_ca, Some("/etc/thumbup/tls/redis/ca.crt"));
    let jobs: Vec<_> =
        cfg.job.ca_secrets.iter().map(|c| (c.secret.as_str(), c.key.as_str(), c.file.as_str())).collect();
    assert_eq!(
        jobs,
        [
            ("thumbup-db-ca", "ca.crt", "/etc/thumbup/tls/db/ca.crt"),
            ("thumbup-redis-ca", "bundle.pem", "/etc/thumbup/tls/redis/ca.crt")
        ]
    );
    // Each file where its config names it, from its Secret: the CAs in the
    // operator and service pods, the certificate in the service pod.
    let file_source = |d: &Deployment, file: &str| {
        let (dir, name) = file.rsplit_once('/').unwrap();
        let c = only_container(d);
        let m = c.volume_mounts.iter().flatten().find(|m| m.mount_path == dir).unwrap_or_else(|| panic!("{dir}"));
        let v = pod_spec(d).volumes.iter().flatten().find(|v| v.name == m.name).unwrap().secret.clone().unwrap();
        let key = match &v.items {
            Some(items) => items.iter().find(|i| i.path == name).map(|i| i.key.clone()),
            None => Some(name.to_string()),
        };
        (v.secret_name.unwrap(), key.unwrap_or_else(|| panic!("{file} not projected")))
    };
    for name in ["operator", "service"] {
        let d: Deployment = r.get(&fullname_of(name));
        assert_eq!(file_source(&d, "/etc/thumbup/tls/db/ca.crt"), ("thumbup-db-ca".into(), "ca.crt".into()));
        assert_eq!(file_source(&d, "/etc/thumbup/tls/redis/ca.crt"), ("thumbup-redis-ca".into(), "bundle.pem".into()));
    }
    let d: Deployment = r.get(&fullname_of("service"));
    let args = command(only_container(&d));
    for (flag, file, key) in [
        ("--tls-cert-file", "/etc/thumbup/tls/grpc/tls.crt", "tls.crt"),
        ("--tls-key-file", "/etc/thumbup/tls/grpc/tls.key", "tls.key"),
    ] {
        let at = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} in {args:?}"));
        assert_eq!(args[at + 1], file);
        assert_eq!(file_source(&d, file), ("thumbup-grpc-tls".into(), key.into()));
    }
    // verify-identity cannot hold through db-proxy: the operator refuses it.
    let r = render(&["--set", "tls.db.mode=verify-identity"]);
    let cm: ConfigMap = r.get(&fullname_of("operator"));
    let err = thumbup_operator::config::OperatorConfig::parse(&cm.data.unwrap()["operator.yaml"], "x").unwrap_err();
    assert!(err.to_string().contains("verify-ca"), "{err}");
    // Without TLS values nothing is mounted or passed.
    let d: Deployment = render(&[]).get(&fullname_of("service"));
    assert!(!command(only_container(&d)).iter().any(|a| a.starts_with("--tls")));
    assert!(!only_container(&d).volume_mounts.iter().flatten().any(|m| m.mount_path.starts_with("/etc/thumbup/tls")));
}

// ------------------------------------------------------- CRD install path

/// The repository's CRD (what the README has people `kubectl apply`).
fn repo_crd_text() -> String {
    std::fs::read_to_string(repo_root().join("crds/liketenant.yaml")).expect("read crds/liketenant.yaml")
}

#[test]
fn the_crd_is_in_the_charts_crds_dir_identical_to_crds_and_never_a_release_object() {
    // One file, three places: crds/, the chart's crds/ and `crdgen`.
    let chart_crd = std::fs::read_to_string(chart_dir().join("crds/liketenant.yaml")).expect("the chart's crds/");
    assert_eq!(chart_crd, repo_crd_text(), "charts/thumbup/crds/liketenant.yaml is byte-identical to crds/");
    assert_eq!(chart_crd, thumbup_operator::crdgen::crd_yaml(), "and to the crdgen output");

    // `helm install` after `kubectl apply -f crds/`: no template renders the
    // CRD, so Helm never tries to adopt (and refuse) the applied one.
    for args in [&[][..], &["--skip-crds"][..], CLUSTER_WIDE, ALL_METRICS_ON] {
        let r = render(args);
        assert!(r.of_kind("CustomResourceDefinition").is_empty(), "{args:?} renders a CRD: {:?}", r.names());
    }
    for entry in std::fs::read_dir(chart_dir().join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("kind: CustomResourceDefinition"), "{} holds a CRD", path.display());
    }

    // `helm install` without applying first: Helm installs crds/ (what
    // --include-crds shows), the same object as crds/liketenant.yaml.
    let with = render(&["--include-crds"]);
    let crds = with.of_kind("CustomResourceDefinition");
    assert_eq!(crds.len(), 1, "{:?}", with.names());
    check_doc(crds[0]).unwrap();
    let repo: Value =
        serde_json::to_value(serde_yaml::from_str::<serde_yaml::Value>(&repo_crd_text()).unwrap()).unwrap();
    assert_eq!(crds[0].value, repo, "Helm installs the CRD of crds/liketenant.yaml");
    let crd: CustomResourceDefinition = with.get("liketenants.thumbup.io");
    assert_eq!((crd.spec.group.as_str(), crd.spec.scope.as_str()), ("thumbup.io", "Namespaced"));
    assert_eq!(crd.spec.names.kind, "LikeTenant");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["lt".to_string()][..]));
    assert!(crd.spec.versions.iter().any(|v| v.name == "v1alpha1" && v.served && v.storage));
    // (`helm install --skip-crds` installs no CRD; `helm template` prints
    // crds/ only with --include-crds, which wins over --skip-crds there.)
}

// ------------------------------------------------------ admin credentials

#[test]
fn default_values_without_admin_credentials_fail_with_a_clear_message() {
    let err = try_render_raw(&[]).expect_err("the default values hold no admin password");
    assert!(
        err.contains("admin credentials are required")
            && err.contains("dc-a")
            && err.contains("db.adminPassword")
            && err.contains("datacenterSecret.existingSecret"),
        "{err}"
    );
    // One password missing (here blank) names that one.
    let err = try_render(&["--set", "datacenters[1].redis.adminPassword= "]).expect_err("a blank password");
    assert!(err.contains("datacenter dc-b has an empty redis.adminPassword"), "{err}");
    // A Secret of the user's is enough, and no chart Secret is rendered.
    let r = try_render_raw(&["--set", "datacenterSecret.existingSecret=mine"]).expect("an existing Secret");
    assert!(!r.has::<Secret>(&fullname_of("operator-admin")));
    // The passwords are enough, and land in the chart's Secret.
    let r = render(&[]);
    let s: Secret = r.get(&fullname_of("operator-admin"));
    let data = s.data.unwrap_or_default();
    assert_eq!(data.get("dc-a-db-password").map(|b| b.0.as_slice()), Some(&b"test-only-dc-a-db"[..]));
    // The lint runs the same check: without values it reports it.
    let out = Command::new(helm()).arg("lint").arg(chart_dir()).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("admin credentials are required"), "{text}");
}

// ------------------------------------------------------------------ PDBs

fn pdb_selects_its_deployment(r: &Rendered, component: &str) -> PodDisruptionBudget {
    let name = fullname_of(component);
    let pdb: PodDisruptionBudget = r.get(&name);
    let d: Deployment = r.get(&name);
    let pod_labels = d.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    let sel = pdb.spec.as_ref().unwrap().selector.clone().unwrap().match_labels.unwrap();
    assert!(sel.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{sel:?} selects {pod_labels:?}");
    pdb
}

#[test]
fn pod_disruption_budgets_cover_each_deployment_with_more_than_one_replica() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    // Defaults: 2 service replicas, 1 operator replica.
    let r = render(&[]);
    let pdb = pdb_selects_its_deployment(&r, "service");
    let spec = pdb.spec.unwrap();
    assert_eq!((spec.max_unavailable, spec.min_available), (Some(IntOrString::Int(1)), None));
    assert!(!r.has::<PodDisruptionBudget>(&fullname_of("operator")), "one operator replica: no PDB blocking drains");

    let r = render(&["--set", "operator.replicas=2", "--set", "podDisruptionBudget.minAvailable=50%"]);
    for component in ["operator", "service"] {
        let spec = pdb_selects_its_deployment(&r, component).spec.unwrap();
        assert_eq!((spec.min_available, spec.max_unavailable), (Some(IntOrString::String("50%".into())), None));
    }
    let r = render(&["--set", "service.replicas=1"]);
    assert!(r.of_kind("PodDisruptionBudget").is_empty(), "{:?}", r.names());
    let r = render(&["--set", "operator.replicas=3", "--set", "podDisruptionBudget.enabled=false"]);
    assert!(r.of_kind("PodDisruptionBudget").is_empty(), "{:?}", r.names());
}

// ------------------------------------------------------- metrics, monitors

/// Names of a pod spec's container (and sidecar) ports.
fn port_names(spec: &PodSpec) -> BTreeSet<String> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| p.name.clone())
        .collect()
}

fn labels_of(doc: &Doc) -> BTreeMap<String, String> {
    serde_json::from_value(doc.value.pointer("/metadata/labels").cloned().unwrap_or_default()).unwrap_or_default()
}

fn doc<'a>(r: &'a Rendered, kind: &str, name: &str) -> &'a Doc {
    r.docs.iter().find(|d| d.kind == kind && d.name == name).unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn monitors_rules_and_the_dashboard_are_off_by_default_and_the_metrics_services_on() {
    let r = render(&[]);
    for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"] {
        assert!(r.of_kind(kind).is_empty(), "{kind} is off by default");
    }
    assert!(!r.has::<ConfigMap>(&fullname_of("dashboard")));
    let svc: Service = r.get(&fullname_of("service-metrics"));
    let ports: Vec<_> = svc.spec.unwrap().ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
    assert_eq!(ports, [("metrics".to_string(), 9190), ("proxy-metrics".to_string(), 9193)]);
    let svc: Service = r.get(&fullname_of("operator-metrics"));
    let ports: Vec<_> = svc.spec.unwrap().ports.unwrap().into_iter().map(|p| (p.name.unwrap(), p.port)).collect();
    assert_eq!(ports, [("metrics".to_string(), 9192)]);
    let off = render(&["--set", "metrics.service.enabled=false", "--set", "dbProxy.enabled=false"]);
    assert!(
        !off.has::<Service>(&fullname_of("service-metrics")) && !off.has::<Service>(&fullname_of("operator-metrics"))
    );
    let err = try_render(&["--set", "metrics.service.enabled=false", "--set", "metrics.serviceMonitor.enabled=true"])
        .expect_err("a ServiceMonitor without the Services it scrapes");
    assert!(err.contains("needs metrics.service.enabled"), "{err}");
}

#[test]
fn service_monitor_scrapes_every_metrics_port_of_the_metrics_services() {
    let r = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.labels.release=prom",
        "--set",
        "metrics.serviceMonitor.interval=15s",
    ]);
    let sm = doc(&r, "ServiceMonitor", RELEASE);
    assert_eq!(labels_of(sm).get("release").map(String::as_str), Some("prom"), "extra labels reach the monitor");
    let sel: BTreeMap<String, String> =
        serde_json::from_value(sm.value.pointer("/spec/selector/matchLabels").unwrap().clone()).unwrap();
    let selected: Vec<&Doc> = r
        .of_kind("Service")
        .into_iter()
        .filter(|d| {
            let l = labels_of(d);
            sel.iter().all(|(k, v)| l.get(k) == Some(v))
        })
        .collect();
    let names: BTreeSet<&str> = selected.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["thumbup-operator-metrics", "thumbup-service-metrics"]));
    let endpoints = sm.value.pointer("/spec/endpoints").and_then(Value::as_array).unwrap();
    let ports: BTreeSet<&str> = endpoints.iter().map(|e| e["port"].as_str().unwrap()).collect();
    assert_eq!(ports, BTreeSet::from(["metrics", "proxy-metrics"]));
    assert!(endpoints.iter().all(|e| e["path"] == "/metrics" && e["interval"] == "15s"));
    // Each Service port targets a named container port of the pods it selects.
    for d in selected {
        let svc: Service = r.get(&d.name);
        let component = svc.spec.as_ref().unwrap().selector.as_ref().unwrap()["app.kubernetes.io/component"].clone();
        let dep: Deployment = r.get(&fullname_of(&component));
        let pod_ports = port_names(pod_spec(&dep));
        for p in svc.spec.unwrap().ports.unwrap() {
            let target = serde_json::to_value(p.target_port.unwrap()).unwrap();
            assert!(pod_ports.contains(target.as_str().unwrap()), "{} -> {target} in {pod_ports:?}", d.name);
        }
    }
}

#[test]
fn pod_monitors_scrape_the_charts_pods_and_the_tenants_job_pods() {
    let r = render(&["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.podMonitor.labels.team=platform"]);
    let own = doc(&r, "PodMonitor", RELEASE);
    assert_eq!(labels_of(own).get("team").map(String::as_str), Some("platform"));
    let endpoint_ports = |d: &Doc| -> BTreeSet<String> {
        d.value
            .pointer("/spec/podMetricsEndpoints")
            .and_then(Value::as_array)
            .unwrap()
            .iter()
            .map(|e| e["port"].as_str().unwrap().to_string())
            .collect()
    };
    let mut pod_ports = BTreeSet::new();
    for component in ["operator", "service"] {
        let d: Deployment = r.get(&fullname_of(component));
        pod_ports.extend(port_names(pod_spec(&d)));
    }
    assert!(endpoint_ports(own).is_subset(&pod_ports), "{:?} in {pod_ports:?}", endpoint_ports(own));
    assert_eq!(endpoint_ports(own), BTreeSet::from(["admin".to_string(), "proxy-admin".to_string()]));

    // The jobs' PodMonitor selects what the operator builds.
    let jobs = doc(&r, "PodMonitor", &format!("{RELEASE}-jobs"));
    let sel: BTreeMap<String, String> =
        serde_json::from_value(jobs.value.pointer("/spec/selector/matchLabels").unwrap().clone()).unwrap();
    let spec = thumbup_operator::crd::LikeTenantSpec::with_businesses(vec![thumbup_operator::crd::Business {
        id: 1,
        name: "video".into(),
    }]);
    let lt = thumbup_operator::crd::LikeTenant::new("demo", spec);
    let job = thumbup_operator::resources::build_job_deployment(&lt, &job_operator_config(true), NAMESPACE);
    let job_labels = job.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.clone().unwrap();
    assert!(sel.iter().all(|(k, v)| job_labels.get(k) == Some(v)), "{sel:?} selects {job_labels:?}");
    assert!(endpoint_ports(jobs).is_subset(&port_names(pod_spec(&job))), "{:?}", endpoint_ports(jobs));
    assert_eq!(jobs.value.pointer("/spec/namespaceSelector/matchNames/0").and_then(Value::as_str), Some(NAMESPACE));
    let wide = render(&[CLUSTER_WIDE, &["--set", "metrics.podMonitor.enabled=true"][..]].concat());
    let jobs = doc(&wide, "PodMonitor", &format!("{RELEASE}-jobs"));
    assert_eq!(
        jobs.value.pointer("/spec/namespaceSelector/any"),
        Some(&Value::Bool(true)),
        "tenants in every namespace"
    );
}

// ------------------------------------------------ alerts and the dashboard

/// PromQL functions, aggregations and keywords (not metric names).
const PROMQL_WORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "rate",
    "irate",
    "increase",
    "delta",
    "histogram_quantile",
    "absent",
    "label_values",
    "offset",
    "bool",
    "topk",
    "bottomk",
    "clamp_min",
    "clamp_max",
    "time",
    "vector",
    "scalar",
];

/// The kube-state-metrics series that the alerts read (Deployment readiness).
const KUBE_STATE_METRICS: &[&str] = &["kube_deployment_status_replicas_available", "kube_deployment_spec_replicas"];

/// The metric names in a PromQL expression: what is left of its identifiers
/// once label matchers, ranges, strings, grouping labels and functions go.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut text = String::new();
    let mut depth_brace = 0;
    let mut depth_bracket = 0;
    let mut in_str = false;
    for ch in expr.chars() {
        match ch {
            '"' if depth_brace == 0 => in_str = !in_str,
            _ if in_str => {}
            '{' => depth_brace += 1,
            '}' => depth_brace -= 1,
            '[' => depth_bracket += 1,
            ']' => depth_bracket -= 1,
            _ if depth_brace > 0 || depth_bracket > 0 => {}
            c => text.push(c),
        }
        if ch == '}' || ch == ']' {
            text.push(' ');
        }
    }
    // Grouping labels: by (a, b), without (a), on (a), ignoring (a).
    let mut cleaned = String::new();
    let mut rest = text.as_str();
    while let Some(at) = ["by", "without", "on", "ignoring", "group_left", "group_right"]
        .iter()
        .filter_map(|w| {
            let re = format!("{w} (");
            let re2 = format!("{w}(");
            rest.find(&re).or_else(|| rest.find(&re2)).map(|i| (i, w.len()))
        })
        .min()
    {
        let (i, len) = at;
        cleaned.push_str(&rest[..i]);
        let after = &rest[i + len..];
        let close = after.find(')').expect("a closing parenthesis");
        rest = &after[close + 1..];
    }
    cleaned.push_str(rest);
    let mut out = BTreeSet::new();
    let mut word = String::new();
    for ch in cleaned.chars().chain([' ']) {
        if ch.is_ascii_alphanumeric() || ch == '_' || ch == ':' {
            word.push(ch);
        } else {
            if word.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && !PROMQL_WORDS.contains(&word.as_str())
            {
                out.insert(word.clone());
            }
            word.clear();
        }
    }
    out
}

/// Every `.rs` file under the binaries' and the core's `src/`.
fn source_text() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        fn walk(dir: &Path, out: &mut String) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut text = String::new();
        for krate in ["operator", "service", "job", "db-proxy", "core"] {
            walk(&repo_root().join(krate).join("src"), &mut text);
        }
        text
    })
}

/// Why `name` is not a metric the code (or kube-state-metrics) exports, if
/// it is not. Histogram series name their base metric.
fn unknown_metric(name: &str) -> Option<String> {
    if KUBE_STATE_METRICS.contains(&name) {
        return None;
    }
    let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    let quoted = format!("\"{base}\"");
    if base.starts_with("thumbup_") && (source_text().contains(&quoted) || source_text().contains(&format!("{base}{{")))
    {
        return None;
    }
    // db-proxy names its metrics `thumbup_db_proxy_` + a literal suffix.
    if let Some(rest) = base.strip_prefix("thumbup_db_proxy_") {
        let metrics = std::fs::read_to_string(repo_root().join("db-proxy/src/metrics.rs")).unwrap();
        if metrics.contains("format!(\"thumbup_db_proxy_{what}\")") && metrics.contains(&format!("\"{rest}\"")) {
            return None;
        }
    }
    Some(format!("{name} is exported by no thumbup binary (nor kube-state-metrics)"))
}

#[test]
fn metric_names_finds_the_metrics_of_an_expression_and_nothing_else() {
    let names = metric_names(r#"sum by (tenant, le) (rate(foo_total{a="b",c=~"x{1}"}[5m])) > on (x) bar:rule / 3"#);
    assert_eq!(names, BTreeSet::from(["foo_total".to_string(), "bar:rule".to_string()]));
    assert!(unknown_metric("thumbup_service_no_such_metric").is_some());
    assert!(unknown_metric("node_cpu_seconds_total").is_some());
    assert!(unknown_metric("thumbup_service_request_duration_seconds_bucket").is_none());
    assert!(unknown_metric("thumbup_db_proxy_sessions").is_none());
    assert!(unknown_metric("thumbup_db_proxy_route_epoch").is_none());
    assert!(unknown_metric("thumbup_db_proxy_no_such").is_some());
}

#[test]
fn prometheus_rule_alerts_on_the_day2_conditions_with_metrics_the_code_exports() {
    let r = render(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.labels.release=prom",
    ]);
    let rule = doc(&r, "PrometheusRule", RELEASE);
    assert_eq!(labels_of(rule).get("release").map(String::as_str), Some("prom"));
    let groups = rule.value.pointer("/spec/groups").and_then(Value::as_array).unwrap();
    let mut alerts = BTreeMap::new();
    for g in groups {
        for rl in g["rules"].as_array().unwrap() {
            alerts.insert(rl["alert"].as_str().unwrap().to_string(), rl.clone());
        }
    }
    // failover blocked, replication (standby), stream lag, DB path, job not ready.
    for (alert, metric) in [
        ("ThumbupFailoverBlocked", "thumbup_operator_failover_blocked_total"),
        ("ThumbupStandbyUnhealthy", "thumbup_operator_failover_blocked_total"),
        ("ThumbupReplicationLag", "thumbup_operator_standby_lag_seconds"),
        ("ThumbupReplicationStopped", "thumbup_operator_standby_lag_seconds"),
        ("ThumbupStreamLag", "thumbup_job_stream_lag_events"),
        ("ThumbupDbPathInUse", "thumbup_service_db_path_open"),
        ("ThumbupJobNotReady", "kube_deployment_status_replicas_available"),
    ] {
        let a = alerts.get(alert).unwrap_or_else(|| panic!("no alert {alert} in {:?}", alerts.keys()));
        assert!(metric_names(a["expr"].as_str().unwrap()).contains(metric), "{alert}: {}", a["expr"]);
    }
    let mut bad = Vec::new();
    for (alert, a) in &alerts {
        let expr = a["expr"].as_str().unwrap();
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{alert}: no metric in {expr}");
        bad.extend(names.iter().filter_map(|n| unknown_metric(n)).map(|e| format!("{alert}: {e}")));
        assert!(a.pointer("/labels/severity").is_some() && a.pointer("/annotations/summary").is_some(), "{alert}");
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn grafana_dashboard_ships_as_a_labelled_config_map_with_panels_on_real_metrics() {
    let r = render(&[
        "--set",
        "metrics.grafanaDashboard.enabled=true",
        "--set",
        "metrics.grafanaDashboard.namespace=monitoring",
    ]);
    let name = fullname_of("dashboard");
    let d = doc(&r, "ConfigMap", &name);
    assert_eq!(labels_of(d).get("grafana_dashboard").map(String::as_str), Some("1"));
    assert_eq!(d.value.pointer("/metadata/namespace").and_then(Value::as_str), Some("monitoring"));
    let cm: ConfigMap = r.get(&name);
    let json = &cm.data.unwrap()["thumbup.json"];
    let file = std::fs::read_to_string(chart_dir().join("dashboards/thumbup.json")).unwrap();
    assert_eq!(json.trim_end(), file.trim_end(), "the ConfigMap holds dashboards/thumbup.json");
    let dash: Value = serde_json::from_str(json).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");
    let bad: Vec<String> = exprs.iter().flat_map(|e| metric_names(e)).filter_map(|n| unknown_metric(&n)).collect();
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Every family of the binaries is on it.
    for prefix in ["thumbup_service_", "thumbup_job_", "thumbup_operator_", "thumbup_db_proxy_"] {
        assert!(exprs.iter().any(|e| e.contains(prefix)), "no {prefix} panel");
    }
}

// ------------------------------------------------------- logs and probes

#[test]
fn log_format_reaches_every_container_of_the_chart() {
    for (args, want) in [(&[][..], "text"), (&["--set", "logging.format=json"][..], "json")] {
        let r = render(args);
        for d in r.of_kind("Deployment") {
            let dep: Deployment = r.get(&d.name);
            let spec = pod_spec(&dep);
            for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
                let v = c.env.iter().flatten().find(|e| e.name == "THUMBUP_LOG_FORMAT").and_then(|e| e.value.clone());
                assert_eq!(v.as_deref(), Some(want), "{} container {}", d.name, c.name);
            }
        }
        // And the job pods, which the operator builds from its config.
        assert_eq!(operator_yaml(&r).job.log_format, want, "job.log_format in the operator config");
    }
    let err = try_render(&["--set", "logging.format=xml"]).expect_err("only text or json");
    assert!(err.contains("logging.format") || err.contains("format"), "{err}");
}

#[test]
fn service_pods_get_a_grace_period_that_covers_the_drain_and_the_request_timeout() {
    let r = render(&["--set", "service.drainSeconds=12"]);
    let d: Deployment = r.get(&fullname_of("service"));
    let spec = pod_spec(&d);
    assert_eq!(spec.termination_grace_period_seconds, Some(30));
    let env = only_container(&d).env.clone().unwrap_or_default();
    let drain = env.iter().find(|e| e.name == "THUMBUP_DRAIN_SECONDS").and_then(|e| e.value.clone());
    assert_eq!(drain.as_deref(), Some("12"));
    let err = try_render(&["--set", "service.drainSeconds=25"]).expect_err("25 + 5 + 1 > 30");
    assert!(err.contains("must exceed service.drainSeconds (25)"), "{err}");
}

#[test]
fn operator_service_and_job_wait_before_their_first_probe() {
    let r = render(&[]);
    for component in ["operator", "service"] {
        let d: Deployment = r.get(&fullname_of(component));
        let c = only_container(&d);
        let startup = c.startup_probe.as_ref().unwrap_or_else(|| panic!("{component}: a startup probe"));
        assert!(startup.initial_delay_seconds.is_some_and(|s| s > 0), "{component}: {startup:?}");
        let get = startup.http_get.as_ref().unwrap();
        assert_eq!((get.path.as_deref(), serde_json::to_value(&get.port).unwrap()), (Some("/healthz"), "admin".into()));
    }
    let spec = thumbup_operator::crd::LikeTenantSpec::with_businesses(vec![thumbup_operator::crd::Business {
        id: 1,
        name: "video".into(),
    }]);
    let lt = thumbup_operator::crd::LikeTenant::new("demo", spec);
    let job = thumbup_operator::resources::build_job_deployment(&lt, &job_operator_config(false), NAMESPACE);
    let c = only_container(&job);
    for p in [&c.readiness_probe, &c.liveness_probe] {
        assert!(p.as_ref().and_then(|p| p.initial_delay_seconds).is_some_and(|s| s > 0), "job: {p:?}");
    }
}

#[test]
fn per_datacenter_renders_a_service_deployment_pinned_to_each_zone_with_a_local_read_sidecar() {
    let mut args = PER_DATACENTER.to_vec();
    args.extend(["--set", "datacenters[1].zone=zone-b", "--set", "nodeSelector.disk=ssd"]);
    let r = render(&args);
    let service = fullname_of("service");
    assert!(!r.has::<Deployment>(&service), "no service Deployment without a datacenter: {:?}", r.names());
    let spanning: Service = r.get(&service);
    let spanning = spanning.spec.unwrap().selector.unwrap();
    for (dc, other, zone) in [("dc-a", "dc-b", "dc-a"), ("dc-b", "dc-a", "zone-b")] {
        let name = format!("{service}-{dc}");
        let d: Deployment = r.get(&name);
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2), "service.replicas per datacenter");
        let selector = spec.selector.match_labels.clone().unwrap();
        assert_eq!(selector.get("thumbup.io/datacenter").map(String::as_str), Some(dc), "{name}: selectors apart");
        let pod_labels = spec.template.metadata.clone().unwrap().labels.unwrap();
        assert!(selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{name} selects its pods");
        let pod = pod_spec(&d);
        let node_selector = pod.node_selector.clone().unwrap();
        assert_eq!(node_selector.get("topology.kubernetes.io/zone").map(String::as_str), Some(zone), "{name}");
        assert_eq!(
            node_selector.get("disk").map(String::as_str),
            Some("ssd"),
            "{name}: the values' nodeSelector stays"
        );
        let sidecar = &pod.init_containers.as_ref().expect("the sidecar")[0];
        assert_eq!(
            command(sidecar),
            [
                "thumbup-db-proxy",
                "--listen=127.0.0.1:3306",
                "--admin-listen=0.0.0.0:9193",
                &format!("--route-config-map={NAMESPACE}/thumbup-route"),
                "--redis-listen=127.0.0.1:6379",
                &format!("--datacenter={dc}"),
                "--local-listen=127.0.0.1:3307",
                "--local-redis-listen=127.0.0.1:6380",
            ]
        );
        // The spanning Service selects these pods; this datacenter's Service
        // and budget select them and not the other datacenter's.
        assert!(spanning.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "{service} selects {name}'s pods");
        let own: Service = r.get(&name);
        let own = own.spec.unwrap().selector.unwrap();
        assert!(own.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "Service {name} selects its pods");
        assert_eq!(own.get("thumbup.io/datacenter").map(String::as_str), Some(dc));
        let pdb: PodDisruptionBudget = r.get(&name);
        let pdb = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
        assert!(pdb.iter().all(|(k, v)| pod_labels.get(k) == Some(v)), "PDB {name} selects its pods");
        assert_eq!(pdb.get("thumbup.io/datacenter").map(String::as_str), Some(dc), "and not {other}'s");
    }
    assert!(!r.has::<PodDisruptionBudget>(&service), "one budget per datacenter, none spanning both");

    // The operator config says the same, and the operator takes it.
    let y = operator_yaml(&r);
    assert_eq!(
        y.topology,
        Some(TopologyYaml { per_datacenter: true, zone_label: "topology.kubernetes.io/zone".into() })
    );
    let zones: Vec<_> = y.datacenters.iter().map(|d| d.zone.clone().unwrap_or_default()).collect();
    assert_eq!(zones, ["dc-a", "zone-b"]);
    assert_eq!((y.db_proxy.local_port, y.db_proxy.local_redis_port), (Some(3307), Some(6380)));
    let cfg = per_datacenter_operator_config();
    assert!(cfg.topology.per_datacenter && cfg.failover.redis_tier);
    let lt = thumbup_operator::crd::LikeTenant::new(
        "demo",
        thumbup_operator::crd::LikeTenantSpec::with_businesses(vec![thumbup_operator::crd::Business {
            id: 1,
            name: "video".into(),
        }]),
    );
    let entry = thumbup_operator::resources::registry_entry(&lt, &cfg, "dc-b");
    let local = entry.local_reads.expect("the registry entry reads locally");
    assert_eq!((local.db_url.as_str(), local.redis_url.as_str()), ("mysql://127.0.0.1:3307", "redis://127.0.0.1:6380"));
    let jobs = thumbup_operator::resources::build_job_deployments(&lt, &cfg, NAMESPACE);
    let names: Vec<_> = jobs.iter().map(|d| d.metadata.name.clone().unwrap()).collect();
    assert_eq!(names, ["thumbup-job-demo-dc-a", "thumbup-job-demo-dc-b"]);

    // Off (the default), the one Deployment as before and no topology in
    // the operator config.
    let off = render(&[]);
    assert!(off.has::<Deployment>(&service) && !off.has::<Deployment>(&format!("{service}-dc-a")));
    assert!(pod_spec(&off.get::<Deployment>(&service)).node_selector.is_none());
    let y = operator_yaml(&off);
    assert!(y.topology.is_none() && y.db_proxy.local_port.is_none() && y.datacenters.iter().all(|d| d.zone.is_none()));
}

#[test]
fn per_datacenter_without_the_sidecar_or_the_redis_tier_fails_the_render() {
    for extra in [&["--set", "failover.redisTier=false"][..], &["--set", "dbProxy.enabled=false"][..]] {
        let mut args = PER_DATACENTER.to_vec();
        args.extend_from_slice(extra);
        let err = try_render(&args).expect_err("refused");
        assert!(err.contains("topology.perDatacenter needs dbProxy.enabled and failover.redisTier"), "{err}");
    }
    let mut args = PER_DATACENTER.to_vec();
    args.extend(["--set", "dbProxy.localPort=3306"]);
    let err = try_render(&args).expect_err("a port used twice");
    assert!(err.contains("must be distinct"), "{err}");
    let mut args = PER_DATACENTER.to_vec();
    args.extend(["--set", "datacenters[1].name=b-dc-a"]);
    let err = try_render(&args).expect_err("job Deployment names that could collide");
    assert!(err.contains("ends with -dc-a, another datacenter's name"), "{err}");
}

#[test]
fn a_redis_cluster_spanning_the_datacenters_gets_no_sidecar_redis_listener_and_no_per_datacenter_layout() {
    let cluster: &[&str] = &[
        "--set",
        "failover.redisTier=true",
        "--set",
        "datacenters[0].redis.cluster=true",
        "--set",
        "datacenters[0].redis.replicaAcks=1",
        "--set",
        "datacenters[1].redis.cluster=true",
        "--set",
        "datacenters[1].redis.replicaAcks=1",
    ];
    let r = render(cluster);
    let d: Deployment = r.get(&fullname_of("service"));
    let sidecar = &pod_spec(&d).init_containers.as_ref().expect("the sidecar")[0];
    let args = command(sidecar);
    assert!(!args.iter().any(|a| a.starts_with("--redis-listen")), "the cluster moves its slots itself: {args:?}");
    let cm: ConfigMap = r.get(&fullname_of("operator"));
    let text = cm.data.as_ref().and_then(|d| d.get("operator.yaml")).expect("ConfigMap key operator.yaml");
    let cfg = thumbup_operator::config::OperatorConfig::parse(text, "the chart's operator.yaml").expect("taken");
    assert!(cfg.redis_tier_cluster(), "the operator sees one cluster spanning the datacenters");
    // With one server per datacenter the sidecar forwards Redis.
    let r = render(&["--set", "failover.redisTier=true"]);
    let d: Deployment = r.get(&fullname_of("service"));
    let args = command(&pod_spec(&d).init_containers.as_ref().expect("the sidecar")[0]);
    assert!(args.contains(&"--redis-listen=127.0.0.1:6379".to_string()), "{args:?}");
    // Local reads forward to one server per datacenter: refused.
    let mut per_dc = cluster.to_vec();
    per_dc.extend(["--set", "topology.perDatacenter=true"]);
    let err = try_render(&per_dc).expect_err("refused");
    assert!(err.contains("not to a cluster's nodes"), "{err}");
}
