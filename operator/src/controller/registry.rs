//! The registry that the service reloads: the tenant-name claims and entries
//! in the registry ConfigMap, and the tenant's keys of the registry Secret.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;
use thumbup_core::config as core_config;

use super::{Context, MANAGER, is_status, kube_err};
use crate::crd::LikeTenant;
use crate::error::{Error, Result};
use crate::resources::{self, Credentials, REGISTRY_KEY};

/// Prefix of the annotations on the registry ConfigMap that record which
/// LikeTenant owns a tenant name: `thumbup.io/tenant.<name>: <namespace>/<uid>`.
const OWNER_ANNOTATION: &str = "thumbup.io/tenant.";

/// Outcome of claiming or releasing a tenant name in the registry.
pub(super) enum Claim {
    /// This LikeTenant owns the name (now).
    Ours,
    /// Another LikeTenant does.
    Taken(String),
}

/// What [`update_registry`] does to the tenant's place in the registry.
pub(super) enum RegistryChange<'a> {
    /// Claim the name only; the file stays as it is.
    Claim,
    /// Claim the name and put the tenant's entry.
    Put(&'a core_config::TenantConfig),
    /// Remove the entry and the claim (only when the claim is ours).
    Remove,
}

fn owner_id(lt: &LikeTenant) -> String {
    format!("{}/{}", lt.namespace().unwrap_or_default(), lt.uid().unwrap_or_default())
}

/// Read-modify-write of the registry ConfigMap under optimistic concurrency
/// (replace with the resourceVersion read; a conflict re-reads).
pub(super) async fn update_registry(lt: &LikeTenant, ctx: &Context, change: RegistryChange<'_>) -> Result<Claim> {
    let tenant = lt.tenant();
    let name = &ctx.config.registry.config_map;
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let annotation = format!("{OWNER_ANNOTATION}{tenant}");
    let me = owner_id(lt);
    for _ in 0..5 {
        let current = api.get_opt(name).await.map_err(kube_err(&tenant, "reading the registry ConfigMap"))?;
        let exists = current.is_some();
        let mut cm = current.unwrap_or_else(|| ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ctx.namespace.clone()),
                labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), MANAGER.into())])),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        });
        let annotations = cm.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match annotations.get(&annotation) {
            Some(owner) if *owner != me => return Ok(Claim::Taken(owner.clone())),
            None if matches!(change, RegistryChange::Remove) => return Ok(Claim::Ours),
            _ => {}
        }
        let before = cm.clone();
        let text = cm.data.as_ref().and_then(|d| d.get(REGISTRY_KEY)).cloned().unwrap_or_default();
        let mut entries =
            resources::parse_registry(&text).map_err(|source| Error::Registry { name: name.clone(), source })?;
        let annotations = cm.metadata.annotations.get_or_insert_with(BTreeMap::new);
        match change {
            RegistryChange::Claim => {
                annotations.insert(annotation.clone(), me.clone());
            }
            RegistryChange::Put(e) => {
                annotations.insert(annotation.clone(), me.clone());
                entries.insert(tenant.clone(), serde_yaml::to_value(e).expect("plain data"));
            }
            RegistryChange::Remove => {
                annotations.remove(&annotation);
                entries.remove(&tenant);
            }
        }
        // A claim alone leaves the file as it is (a missing file is created).
        if !matches!(change, RegistryChange::Claim) || !text_present(&cm) {
            cm.data.get_or_insert_with(BTreeMap::new).insert(REGISTRY_KEY.into(), resources::render_registry(&entries));
        }
        if exists && cm == before {
            return Ok(Claim::Ours);
        }
        let written = if exists {
            api.replace(name, &PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &cm).await
        } else {
            api.create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &cm).await
        };
        match written {
            Ok(_) => return Ok(Claim::Ours),
            Err(e) if is_status(&e, 409) => continue,
            Err(e) => return Err(kube_err(&tenant, "writing the registry ConfigMap")(e)),
        }
    }
    Err(Error::RegistryContended(name.clone()))
}

fn text_present(cm: &ConfigMap) -> bool {
    cm.data.as_ref().is_some_and(|d| d.contains_key(REGISTRY_KEY))
}

/// Server-side applies the tenant's keys of the registry Secret under a field
/// manager of its own, so tenants never overwrite each other's keys and an
/// empty apply removes exactly this tenant's keys.
pub(super) async fn apply_registry_secret(lt: &LikeTenant, ctx: &Context, creds: Option<&Credentials>) -> Result<()> {
    let tenant = lt.tenant();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let data = creds.map(|c| resources::registry_secret_data(&tenant, c)).unwrap_or_default();
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": ctx.config.registry.secret, "namespace": ctx.namespace },
        "data": data,
    });
    let pp = PatchParams::apply(&format!("{MANAGER}.{tenant}")).force();
    api.patch(&ctx.config.registry.secret, &pp, &Patch::Apply(&secret))
        .await
        .map_err(kube_err(&tenant, "applying the registry Secret"))?;
    Ok(())
}
