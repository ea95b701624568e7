//! The operator's error type: one variant per failing step. [`Error::reason`]
//! is the label of the error metric and the reason of the Warning Event.

use thumbup_core::provision::ProvisionError;

/// A reconcile step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object has no name or namespace (the API server always sets them).
    #[error("LikeTenant without {0}")]
    MissingObjectKey(&'static str),
    /// The object's name cannot be a tenant name.
    #[error("tenant name {0:?} must match [a-z][a-z0-9-]{{0,30}}")]
    InvalidName(String),
    /// Another LikeTenant (in another namespace) already owns this tenant name.
    #[error("tenant {tenant} already belongs to {owner}")]
    NameConflict {
        /// The tenant name.
        tenant: String,
        /// `<namespace>/<uid>` of the owner.
        owner: String,
    },
    /// A Kubernetes API call failed.
    #[error("tenant {tenant}: {step}: {source}")]
    Kube {
        /// The tenant.
        tenant: String,
        /// What was being done.
        step: &'static str,
        /// The client error.
        source: kube::Error,
    },
    /// The registry ConfigMap holds a file the operator cannot parse; it is
    /// left alone rather than overwritten.
    #[error("registry ConfigMap {name}: {source}")]
    Registry {
        /// The ConfigMap.
        name: String,
        /// The YAML error.
        source: serde_yaml::Error,
    },
    /// Kept changing under us (optimistic concurrency retries used up).
    #[error("registry ConfigMap {0}: conflicting updates, retrying later")]
    RegistryContended(String),
    /// The schema, DB user or migrations could not be set up or dropped.
    #[error("{0}")]
    Database(ProvisionError),
    /// The Redis ACL user or the tenant keys could not be set up or removed.
    #[error("datacenter {dc}: {source}")]
    Redis {
        /// The datacenter whose Redis failed.
        dc: String,
        /// The provisioning error.
        source: ProvisionError,
    },
    /// The operator's config (admin password files) could not be read.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// Adding or removing the operator's finalizer failed.
    #[error("tenant {tenant}: {step} the finalizer: {source}")]
    Finalizer {
        /// The tenant.
        tenant: String,
        /// `adding` or `removing`.
        step: &'static str,
        /// The API error.
        source: kube::Error,
    },
    /// A watch that the tenant controller needs was refused by the API
    /// server (401 or 403): the operator's RBAC does not grant it.
    #[error(
        "the API server refused to {verb} {resource} {scope} ({code}: {message}); the operator's RBAC must grant \
         list and watch on {resource} {scope} (check --all-namespaces against a namespaced Role)"
    )]
    WatchForbidden {
        /// The resource (`liketenants.thumbup.io`, `deployments.apps`).
        resource: &'static str,
        /// `in namespace <ns>` or `in every namespace (cluster scope)`.
        scope: String,
        /// `list` or `watch`.
        verb: &'static str,
        /// 401 or 403.
        code: u16,
        /// The API server's message.
        message: String,
    },
}

impl Error {
    /// CamelCase reason: metric label and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::MissingObjectKey(_) => "MissingObjectKey",
            Error::InvalidName(_) => "InvalidName",
            Error::NameConflict { .. } => "NameConflict",
            Error::Kube { .. } => "KubeApiFailed",
            Error::Registry { .. } => "RegistryUnreadable",
            Error::RegistryContended(_) => "RegistryContended",
            Error::Database(e) => refusal(e).unwrap_or("DatabaseFailed"),
            Error::Redis { source, .. } => refusal(source).unwrap_or("RedisFailed"),
            Error::Config(_) => "ConfigUnreadable",
            Error::Finalizer { .. } => "FinalizerFailed",
            Error::WatchForbidden { .. } => "WatchForbidden",
        }
    }
}

/// The reason of a provisioning step that the data layer's admission
/// refused (not cured by retrying: the LikeTenant or the other owner must
/// change); None for a failure worth retrying.
fn refusal(e: &ProvisionError) -> Option<&'static str> {
    match e {
        ProvisionError::ReservedSchema { .. } => Some("SchemaReserved"),
        ProvisionError::NotOwned { .. } => Some("NotOwned"),
        ProvisionError::NotDerived { .. } => Some("NameNotDerived"),
        _ => None,
    }
}

impl Error {
    /// True when the data layer's admission refused the LikeTenant: reported
    /// on its conditions and not retried with a backoff.
    pub fn is_refusal(&self) -> bool {
        matches!(self, Error::Database(e) | Error::Redis { source: e, .. } if refusal(e).is_some())
    }
}

/// Result of a reconcile step.
pub type Result<T, E = Error> = std::result::Result<T, E>;
