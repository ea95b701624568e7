//! Where routes come from besides `PUT /route`: a file polled by content,
//! or the operator's route ConfigMap watched through the Kubernetes API.
//!
//! Both feed a [`Follower`], which hands a route document to
//! [`Routes::offer_text`] only when it differs from the one seen last, so a
//! refused or unusable document is counted and logged once per change
//! rather than on every poll or resync.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::watch_object;
use kube::{Api, Client};
use thumbup_core::route::ROUTE_KEY;
use tracing::{info, warn};

use crate::routes::Routes;

/// How often the route file is read.
pub const FILE_POLL: Duration = Duration::from_millis(200);

/// A route ConfigMap, `NAMESPACE/NAME` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMapRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl FromStr for ConfigMapRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(ConfigMapRef { namespace: namespace.into(), name: name.into() })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

impl std::fmt::Display for ConfigMapRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What a source holds at one look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observation {
    /// A route document (not yet parsed).
    Document(String),
    /// No document, and why (file missing, ConfigMap deleted, key absent).
    Nothing(String),
}

/// Turns a source's successive observations into route offers, one per
/// change.
pub struct Follower {
    source: String,
    routes: Arc<Routes>,
    last: Option<Observation>,
}

impl Follower {
    /// Follows on behalf of `source` (a label for logs).
    pub fn new(source: impl Into<String>, routes: Arc<Routes>) -> Follower {
        Follower { source: source.into(), routes, last: None }
    }

    /// Offers a document that differs from the last observation; logs an
    /// absence once. The held route stays in every case but an adopted one.
    pub fn observe(&mut self, now: Observation) {
        if self.last.as_ref() == Some(&now) {
            return;
        }
        match &now {
            // Refusals are counted and logged by the offer itself.
            Observation::Document(text) => {
                let _ = self.routes.offer_text(text, &self.source);
            }
            Observation::Nothing(why) => {
                let held_epoch = self.routes.held().map(|r| r.epoch);
                warn!(source = %self.source, why = %why, held_epoch, "no route document; keeping the held route");
            }
        }
        self.last = Some(now);
    }
}

/// Reads the route file every [`FILE_POLL`], for ever.
pub async fn follow_file(path: PathBuf, routes: Arc<Routes>) {
    info!(path = %path.display(), "following the route file");
    let mut follower = Follower::new(format!("file {}", path.display()), routes);
    let mut tick = tokio::time::interval(FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = match tokio::fs::read_to_string(&path).await {
            Ok(text) => Observation::Document(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Observation::Nothing("the file does not exist".into())
            }
            Err(e) => Observation::Nothing(format!("reading the file: {e}")),
        };
        follower.observe(now);
    }
}

/// What a ConfigMap (or its absence) says.
pub fn observe_config_map(cm: Option<&ConfigMap>) -> Observation {
    match cm {
        None => Observation::Nothing("the ConfigMap does not exist".into()),
        Some(cm) => match cm.data.as_ref().and_then(|d| d.get(ROUTE_KEY)) {
            Some(text) => Observation::Document(text.clone()),
            None => Observation::Nothing(format!("the ConfigMap has no key {ROUTE_KEY}")),
        },
    }
}

/// Watches the one route ConfigMap (list and watch with the field selector
/// `metadata.name=NAME` in its namespace, so that RBAC can limit the proxy
/// to that name), for ever. API errors are logged and retried with backoff.
pub async fn follow_config_map(client: Client, cm: ConfigMapRef, routes: Arc<Routes>) {
    info!(config_map = %cm, "following the route ConfigMap");
    let api: Api<ConfigMap> = Api::namespaced(client, &cm.namespace);
    let mut follower = Follower::new(format!("configmap {cm}"), routes);
    let mut events = watch_object(api, &cm.name).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(object) => follower.observe(observe_config_map(object.as_ref())),
            Err(e) => warn!(config_map = %cm, error = %e, "watching the route ConfigMap; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    const EPOCH_1: &str = "epoch: 1\nactiveDatacenter: dc-a\ndatacenters: {dc-a: 'a:1', dc-b: 'b:1'}\n";
    const EPOCH_2: &str = "epoch: 2\nactiveDatacenter: dc-b\ndatacenters: {dc-a: 'a:1', dc-b: 'b:1'}\n";

    #[test]
    fn config_map_refs_are_namespace_slash_name() {
        let cm: ConfigMapRef = "thumbup/thumbup-route".parse().unwrap();
        assert_eq!((cm.namespace.as_str(), cm.name.as_str()), ("thumbup", "thumbup-route"));
        assert_eq!(cm.to_string(), "thumbup/thumbup-route");
        for bad in ["thumbup-route", "/x", "x/", "a/b/c", ""] {
            assert!(bad.parse::<ConfigMapRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_follower_offers_each_change_once_and_counts_a_bad_document_once() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let routes = Routes::new(metrics.clone());
        let mut f = Follower::new("test", routes.clone());
        f.observe(Observation::Nothing("missing".into()));
        assert!(routes.held().is_none());
        f.observe(Observation::Document(EPOCH_2.into()));
        assert_eq!(routes.held().unwrap().epoch, 2);
        for _ in 0..3 {
            f.observe(Observation::Document("epoch: [".into()));
            f.observe(Observation::Document("epoch: [".into()));
        }
        // Six looks at one bad document: one offer, one count.
        assert_eq!(metrics.route_rejected_total.with_label_values(&["invalid"]).get(), 1);
        f.observe(Observation::Document(EPOCH_1.into()));
        f.observe(Observation::Document(EPOCH_1.into()));
        assert_eq!(metrics.route_rejected_total.with_label_values(&["stale"]).get(), 1);
        f.observe(Observation::Nothing("missing".into()));
        assert_eq!(routes.held().unwrap().epoch, 2);
    }

    #[test]
    fn a_config_map_says_its_route_key_or_nothing() {
        let mut cm = ConfigMap::default();
        assert!(matches!(observe_config_map(None), Observation::Nothing(w) if w.contains("does not exist")));
        assert!(matches!(observe_config_map(Some(&cm)), Observation::Nothing(w) if w.contains("route.yaml")));
        cm.data = Some([(ROUTE_KEY.to_string(), EPOCH_1.to_string())].into());
        assert_eq!(observe_config_map(Some(&cm)), Observation::Document(EPOCH_1.into()));
    }
}
