//! Leader election through a `coordination.k8s.io/v1` Lease, so that two
//! operator replicas are safe: only the holder reconciles.
//!
//! The holder renews the Lease every third of its duration. Another replica
//! takes it over only after `renewTime + leaseDurationSeconds` has passed,
//! and every write carries the resourceVersion it read, so two replicas that
//! race for an expired Lease cannot both win. A holder that cannot renew
//! within the duration stops leading (the process exits and restarts as a
//! follower) before anyone else may take over.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::{info, warn};

/// Lease writes carry the operator's field manager.
fn post_params() -> PostParams {
    PostParams { field_manager: Some(crate::controller::MANAGER.into()), ..PostParams::default() }
}

/// A candidate for the Lease `name`.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Elector {
    /// A candidate named `identity` for the Lease `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Elector {
        Elector { api: Api::namespaced(client, namespace), name: name.into(), identity: identity.into(), duration }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// One attempt to take or renew the Lease; true when this candidate holds it.
    pub async fn try_acquire(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&post_params(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let holder_empty = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        let duration = spec.lease_duration_seconds.unwrap_or(self.duration.as_secs() as i32) as i64;
        let expired =
            spec.renew_time.as_ref().is_none_or(|t| t.0.as_second() + duration < jiff::Timestamp::now().as_second());
        if !(mine || holder_empty || expired) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        lease.spec = Some(self.spec(transitions, if mine { spec.acquire_time } else { None }));
        // replace() sends the resourceVersion read above: a racing writer gets 409.
        match self.api.replace(&self.name, &post_params(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until this candidate holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "leader election: reading the Lease failed"),
            }
            tokio::time::sleep(self.duration / 3).await;
        }
    }

    /// Renews the Lease until a renewal cannot be made within the lease
    /// duration (or another holder took it); then returns: leadership is lost.
    pub async fn hold(&self) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    warn!(lease = %self.name, "another replica holds the Lease");
                    return;
                }
                Err(e) => warn!(error = %e, "renewing the Lease failed"),
            }
            // Stop before the Lease can expire for the others.
            if last_ok.elapsed() + self.duration / 3 >= self.duration {
                warn!(lease = %self.name, "could not renew the Lease in time");
                return;
            }
        }
    }

    /// Gives the Lease up on shutdown, so a successor takes over at once.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await
            && let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            if let Err(e) = self.api.replace(&self.name, &post_params(), &lease).await {
                warn!(error = %e, "releasing the Lease failed");
            }
        }
    }
}
