//! Following the tenant registry through the Kubernetes API.
//!
//! The operator writes the registry as a ConfigMap (`tenants.yaml`, whose
//! `password_file` / `tokens_file` entries name keys of the registry Secret)
//! and that Secret. Mounted as files, a change reaches the service only when
//! the kubelet syncs the volumes: tens of seconds after the operator wrote
//! it. With `--registry-from-api` the service watches the two objects
//! instead (one watch each, by field selector `metadata.name=<name>`, so
//! that a Role can grant exactly those two objects by `resourceNames`),
//! resolves the references against the Secret's keys and installs the result
//! through [`Registry::offer`], the path of the file reload: same validation,
//! same swap, same metrics and logs. A registry that does not parse or
//! validate is logged and changes nothing. A watch the API server refuses
//! (401/403) is logged as an error naming [`SERVICE_API_PERMISSIONS`] and
//! clears readiness until the watch works again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use thumbup_core::config::{Config, Secrets};
use tracing::{error, info, warn};

use crate::tenants::{Registry, report};

/// The registry ConfigMap's key holding the tenants file (the operator's
/// `resources::REGISTRY_KEY`).
pub const REGISTRY_KEY: &str = "tenants.yaml";

/// What the service asks of the Kubernetes API with `--registry-from-api`:
/// (API group, resource, verbs), each on the registry ConfigMap and Secret
/// only (`resourceNames`), in the registry's namespace. The chart's Role for
/// the service's ServiceAccount grants exactly this.
pub const SERVICE_API_PERMISSIONS: &[(&str, &str, &[&str])] =
    &[("", "configmaps", &["list", "watch"]), ("", "secrets", &["list", "watch"])];

/// Where the registry is in the API.
#[derive(Clone)]
pub struct RegistryApi {
    /// The client (in a pod: its ServiceAccount's).
    pub client: Client,
    /// The registry's namespace (the operator's).
    pub namespace: String,
    /// The registry ConfigMap.
    pub config_map: String,
    /// The registry Secret.
    pub secret: String,
}

impl std::fmt::Debug for RegistryApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryApi")
            .field("namespace", &self.namespace)
            .field("config_map", &self.config_map)
            .field("secret", &self.secret)
            .finish_non_exhaustive()
    }
}

/// The two objects followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    ConfigMap = 0,
    Secret = 1,
}

/// What one of the watches saw.
enum Seen {
    /// The object's contents now (None: it does not exist).
    Now(Which, Option<Contents>),
    /// The watch failed (it is retried with a backoff).
    Failed(Which, watcher::Error),
}

/// The part of an object the registry uses: the ConfigMap's tenants file
/// (None: the key is missing), or the Secret's data.
#[derive(Clone, PartialEq)]
enum Contents {
    Text(Option<String>),
    Data(BTreeMap<String, Vec<u8>>),
}

/// How long a watch the API server refused waits before it lists again.
const REFUSED_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

/// Turns the watch of one object into what it says about the object: the
/// watcher's initial list (buffered until it is complete, so an object
/// missing from it reads as gone) and every later change. Errors are retried
/// with the watcher's backoff; after a refusal (401/403) the watch starts
/// afresh with a list, so that the grant is seen even if nothing changed.
fn follow_one<K>(api: Api<K>, name: String, which: Which, contents: fn(K) -> Contents) -> impl Stream<Item = Seen>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    // The state: the running watcher (None: start one), and whether the
    // last one ended on a refusal (then wait before listing again).
    futures::stream::unfold(
        (None::<futures::stream::BoxStream<'static, Seen>>, false),
        move |(running, refused_before)| {
            let (api, name) = (api.clone(), name.clone());
            async move {
                let mut w = match running {
                    Some(w) => w,
                    None => {
                        if refused_before {
                            tokio::time::sleep(REFUSED_RETRY).await;
                        }
                        watch_one(api, &name, which, contents).boxed()
                    }
                };
                let seen = w.next().await?;
                if matches!(&seen, Seen::Failed(_, e) if refused(e)) {
                    Some((seen, (None, true)))
                } else {
                    Some((seen, (Some(w), false)))
                }
            }
        },
    )
}

/// One watcher of object `name`.
fn watch_one<K>(api: Api<K>, name: &str, which: Which, contents: fn(K) -> Contents) -> impl Stream<Item = Seen> + use<K>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut listing: Option<Contents> = None;
    watcher(api, cfg).default_backoff().filter_map(move |event| {
        let seen = match event {
            Ok(watcher::Event::Init) => {
                listing = None;
                None
            }
            Ok(watcher::Event::InitApply(obj)) => {
                listing = Some(contents(obj));
                None
            }
            Ok(watcher::Event::InitDone) => Some(Seen::Now(which, listing.take())),
            Ok(watcher::Event::Apply(obj)) => Some(Seen::Now(which, Some(contents(obj)))),
            Ok(watcher::Event::Delete(_)) => Some(Seen::Now(which, None)),
            Err(e) => Some(Seen::Failed(which, e)),
        };
        std::future::ready(seen)
    })
}

fn config_map_contents(cm: ConfigMap) -> Contents {
    Contents::Text(cm.data.and_then(|mut d| d.remove(REGISTRY_KEY)))
}

fn secret_contents(s: Secret) -> Contents {
    Contents::Data(s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())
}

/// True for an error the API server's authentication or authorization gave.
fn refused(e: &watcher::Error) -> bool {
    let code = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => 0,
    };
    code == 401 || code == 403
}

/// Resolves the registry from the ConfigMap's text and the Secret's data.
fn resolve(api: &RegistryApi, text: Option<&Contents>, data: Option<&Contents>) -> Result<Config, String> {
    let cm = format!("configmap {}/{}", api.namespace, api.config_map);
    let text = match text {
        None => return Err(format!("{cm} does not exist")),
        Some(Contents::Text(None)) => return Err(format!("{cm} has no key {REGISTRY_KEY}")),
        Some(Contents::Text(Some(t))) => t,
        Some(Contents::Data(_)) => unreachable!("the ConfigMap's watch yields text"),
    };
    let empty = BTreeMap::new();
    let data = match data {
        Some(Contents::Data(d)) => d,
        _ => &empty,
    };
    let secret = format!("secret {}/{}", api.namespace, api.secret);
    Config::parse_resolving(text, &cm, Secrets::Keys { name: &secret, data }).map_err(|e| e.to_string())
}

/// Follows the registry ConfigMap and Secret of `api` into `reg` until the
/// task is dropped. Once both watches have listed their object, every
/// change installs the resolved registry (or logs why it does not) and the
/// registry files are no longer read. `ready`, if given, is cleared while
/// the API server refuses a watch, and set again once it answers.
pub async fn follow(reg: Arc<Registry>, api: RegistryApi, ready: Option<Arc<AtomicBool>>) {
    let cms: Api<ConfigMap> = Api::namespaced(api.client.clone(), &api.namespace);
    let secrets: Api<Secret> = Api::namespaced(api.client.clone(), &api.namespace);
    let mut events = futures::stream::select(
        follow_one(cms, api.config_map.clone(), Which::ConfigMap, config_map_contents),
        follow_one(secrets, api.secret.clone(), Which::Secret, secret_contents),
    )
    .boxed();
    let source = format!(
        "kubernetes configmap {ns}/{cm} and secret {ns}/{secret}",
        ns = api.namespace,
        cm = api.config_map,
        secret = api.secret
    );
    info!(%source, "following the tenant registry through the Kubernetes API");
    // Per object: None until its watch has listed it, then what it holds.
    let mut known: [Option<Option<Contents>>; 2] = [None, None];
    let mut forbidden = [false; 2];
    while let Some(seen) = events.next().await {
        match seen {
            Seen::Failed(which, e) if refused(&e) => {
                if !forbidden[which as usize] {
                    error!(%source, error = %e,
                        "the Kubernetes API refuses the registry watch: the service's ServiceAccount needs list and \
                         watch on configmaps/{} and secrets/{} in namespace {} (SERVICE_API_PERMISSIONS); \
                         not ready until it is granted",
                        api.config_map, api.secret, api.namespace);
                }
                forbidden[which as usize] = true;
                if let Some(r) = &ready {
                    r.store(false, Ordering::Relaxed);
                }
            }
            Seen::Failed(_, e) => warn!(%source, error = %e, "registry watch failed; retrying"),
            Seen::Now(which, contents) => {
                if std::mem::take(&mut forbidden[which as usize]) && !forbidden.iter().any(|f| *f) {
                    info!(%source, "the Kubernetes API grants the registry watch again: ready");
                    if let Some(r) = &ready {
                        r.store(true, Ordering::Relaxed);
                    }
                }
                if known[which as usize].as_ref() == Some(&contents) {
                    continue;
                }
                known[which as usize] = Some(contents);
                let [Some(text), Some(data)] = &known else { continue };
                let read = resolve(&api, text.as_ref(), data.as_ref());
                reg.follow_api();
                report(&source, reg.offer(read, false).await);
            }
        }
    }
}
