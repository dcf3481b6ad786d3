//! A pod as a reconcile sees it: its replica (from the operator's labels), phase, the training
//! container's exit code, restarts and whether it is terminating. Trusts the labels only as
//! far as they name a known replica type and an index; anything else is not the job's pod.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;

use crate::defaults::CONTAINER;
use crate::lifecycle::Phase;
use crate::names::{REPLICA_INDEX, REPLICA_TYPE};

/// A pod as a reconcile sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Its name.
    pub name: String,
    /// `Master` or `Worker` (from its label).
    pub rtype: String,
    /// Its index (from its label).
    pub index: i32,
    /// Its phase.
    pub phase: Phase,
    /// The training container's exit code, once terminated.
    pub exit_code: Option<i32>,
    /// Restarts of its containers, init containers included.
    pub restarts: i32,
    /// When its deletion was asked for (it is terminating).
    pub deleting_since: Option<Timestamp>,
}

/// A pod of the job as observed, or `None` when its labels do not name a replica.
pub fn observe(pod: &Pod) -> Option<Observed> {
    let labels = pod.metadata.labels.as_ref()?;
    let rtype = match labels.get(REPLICA_TYPE)?.as_str() {
        "master" => crate::crd::MASTER,
        "worker" => crate::crd::WORKER,
        _ => return None,
    };
    let index = labels.get(REPLICA_INDEX)?.parse().ok()?;
    let status = pod.status.clone().unwrap_or_default();
    let phase = match status.phase.as_deref() {
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Pending,
    };
    let containers = status.container_statuses.clone().unwrap_or_default();
    let inits = status.init_container_statuses.clone().unwrap_or_default();
    let exit_code = containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    Some(Observed {
        name: pod.metadata.name.clone()?,
        rtype: rtype.to_owned(),
        index,
        phase,
        exit_code,
        restarts: containers
            .iter()
            .chain(&inits)
            .map(|c| c.restart_count)
            .sum(),
        deleting_since: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
    })
}
