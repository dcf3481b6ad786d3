//! Leader election on a `coordination.k8s.io/v1` Lease, so that several operator replicas can
//! run and exactly one reconciles: the holder renews the lease; another replica takes it over
//! only once it has gone unrenewed for its whole duration. Writes carry the lease's resource
//! version, so two replicas racing for it cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::Api;

/// One replica's claim on a lease.
#[derive(Debug, Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaseLock {
    /// A claim on lease `name` as `identity` (the pod's name), held for `duration` per renewal.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes or renews the lease; whether this replica holds it now.
    ///
    /// # Errors
    /// An API error other than a lost race (a conflict, which means "not ours").
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let mine = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        };
        let current = match self.api.get_opt(&self.name).await? {
            Some(lease) => lease,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(mine),
                };
                return won(self.api.create(&PostParams::default(), &lease).await);
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_me = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let renewed = spec
            .renew_time
            .as_ref()
            .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
        let lasts = i64::from(spec.lease_duration_seconds.unwrap_or(0));
        let expired = now.as_second() - renewed.as_second() >= lasts;
        let spec = if held_by_me {
            LeaseSpec {
                renew_time: Some(MicroTime(now)),
                ..spec
            }
        } else if expired || spec.holder_identity.is_none() {
            LeaseSpec {
                lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + 1),
                ..mine
            }
        } else {
            return Ok(false);
        };
        let lease = Lease {
            metadata: current.metadata,
            spec: Some(spec),
        };
        won(self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await)
    }

    /// How often the holder renews: a third of the duration, so that two renewals can fail
    /// before another replica may take over.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }
}

/// A write's result as "won the lease": a conflict means another replica wrote first.
fn won(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
