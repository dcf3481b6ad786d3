//! What a PyTorchJob's objects are called and how they are found: pod and service names,
//! the training-operator's labels and selectors, the owner reference, and the replicas a job
//! has. Shared by the renderer, the scheduling objects and the controller, so that none of
//! them imports another for a name.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::crd::{PyTorchJob, MASTER, WORKER};

/// Label: which operator made the object.
pub const OPERATOR_NAME: &str = "training.kubeflow.org/operator-name";
/// Label: the job.
pub const JOB_NAME: &str = "training.kubeflow.org/job-name";
/// Label: `master` or `worker`.
pub const REPLICA_TYPE: &str = "training.kubeflow.org/replica-type";
/// Label: the replica's index.
pub const REPLICA_INDEX: &str = "training.kubeflow.org/replica-index";
/// Label: on the pod that hosts rank 0.
pub const JOB_ROLE: &str = "training.kubeflow.org/job-role";
/// The operator-name label's value (the training-operator's, so that its tooling finds ours).
pub const CONTROLLER_NAME: &str = "pytorchjob-controller";

/// `<job>-<type>-<index>`: the pod's and its service's name.
pub fn pod_name(job: &str, rtype: &str, index: i32) -> String {
    format!("{job}-{}-{index}", rtype.to_ascii_lowercase()).replace('/', "-")
}

/// The labels that select a replica's pod (and its service's selector).
pub fn selector(job: &str, rtype: &str, index: i32) -> BTreeMap<String, String> {
    BTreeMap::from([
        (OPERATOR_NAME.to_owned(), CONTROLLER_NAME.to_owned()),
        (JOB_NAME.to_owned(), job.replace('/', "-")),
        (REPLICA_TYPE.to_owned(), rtype.to_ascii_lowercase()),
        (REPLICA_INDEX.to_owned(), index.to_string()),
    ])
}

/// Whether the replica hosts rank 0: the master, or worker 0 when there is none.
pub fn is_master_role(job: &PyTorchJob, rtype: &str, index: i32) -> bool {
    rtype == MASTER || (job.replica(MASTER).is_none() && rtype == WORKER && index == 0)
}

/// Pods of all replica types.
pub fn total_replicas(job: &PyTorchJob) -> i32 {
    job.spec
        .pytorch_replica_specs
        .values()
        .map(|r| r.count())
        .sum()
}

/// The owner reference that ties a child to its job (garbage collection, the controller).
pub fn owner_reference(job: &PyTorchJob) -> OwnerReference {
    OwnerReference {
        api_version: "kubeflow.org/v1".into(),
        kind: "PyTorchJob".into(),
        name: job.job_name().into(),
        uid: job.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Every `(replica type, index)` the job should have, masters first.
pub fn replicas(job: &PyTorchJob) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for rtype in [MASTER, WORKER] {
        if let Some(r) = job.replica(rtype) {
            out.extend((0..r.count()).map(|i| (rtype.to_owned(), i)));
        }
    }
    out
}

/// RFC 1035 label: what Service names must be.
pub fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}
