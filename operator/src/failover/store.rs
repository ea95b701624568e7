//! Where the route document lives: a file out of a cluster, the route
//! ConfigMap in one.

use std::path::PathBuf;

use thumbup_core::route::Route;
use tracing::warn;

use super::{FailoverError, kube};

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
    pub(super) async fn switchover_request(&self) -> Option<kube::SwitchoverRequest> {
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

    pub(super) async fn load(&mut self) -> Result<Option<Route>, FailoverError> {
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

    pub(super) async fn save(&mut self, route: &Route) -> Result<(), FailoverError> {
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
