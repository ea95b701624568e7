//! What the controller tells people: a [`Notice`] for each flip, blocked
//! failover or failed switchover, and the [`Publisher`] that carries it to
//! LikeTenant status and Events in a cluster.

use ::kube::Api;

use crate::crd::LikeTenant;

/// Where status goes in a cluster: every LikeTenant, and Events.
pub struct Publisher {
    /// The LikeTenants (namespaced or all).
    pub tenants: Api<LikeTenant>,
    /// The client the Event recorder uses.
    pub client: ::kube::Client,
}

/// A flip, a blocked failover or a failed switchover, as told to people:
/// an Event on every LikeTenant in a cluster, a log line and the `notices`
/// channel out of one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Warning (else Normal).
    pub warning: bool,
    /// CamelCase reason: Failover, Switchover, StandbyUnhealthy, ...
    pub reason: String,
    /// What the controller did or tried.
    pub action: String,
    /// Details.
    pub message: String,
}
