//! The tenant list the replay works through, read from the same
//! `tenants.yaml` that the service reads.

use std::path::PathBuf;

use ::kube::Api;
use k8s_openapi::api::core::v1::ConfigMap;
use thumbup_core::config::TenantConfig;

use super::FailoverError;
use super::replay::ReplayTenant;
use crate::resources::{REGISTRY_KEY, parse_registry};

/// Where the tenant list comes from (for the replay): the same
/// `tenants.yaml` that the service reads.
pub enum TenantSource {
    /// A file (out of a cluster).
    File(PathBuf),
    /// The registry ConfigMap the tenant controller maintains.
    Registry(Box<Api<ConfigMap>>, String),
}

impl TenantSource {
    pub(super) async fn list(&self) -> Result<Vec<ReplayTenant>, FailoverError> {
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
