//! What the training-operator's webhook checks, and what it misses (names that outgrow 63
//! characters once `-worker-N` is added, unknown policies), each problem named with its fix.

use crate::crd::{PyTorchJob, MASTER, WORKER};
use crate::defaults::CONTAINER;
use crate::names::{is_dns1035_label, pod_name};

/// Most replicas of one type: far past the largest training jobs, far below what would
/// exhaust memory rendering them.
pub const MAX_REPLICAS: i32 = 10_000;

/// Controllers that may own a PyTorchJob; others' jobs are left alone.
pub const MANAGERS: [&str; 2] = [
    "kubeflow.org/training-operator",
    "kueue.x-k8s.io/multikueue",
];

/// RFC 1123 subdomain: what Secret names must be.
fn is_dns1123_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// Why a job cannot run: every problem found, each with its fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PyTorchJob: {}", .0.join("; "))]
pub struct Invalid(pub Vec<String>);

/// Checks a job with its defaults applied.
///
/// # Errors
/// [`Invalid`] listing every problem.
pub fn validate(job: &PyTorchJob) -> Result<(), Invalid> {
    let mut problems = Vec::new();
    let name = job.job_name();
    if !is_dns1035_label(name) {
        problems.push(format!("metadata.name {name:?} must be a DNS-1035 label: at most 63 lower-case letters, digits and '-', starting with a letter"));
    }
    if let Some(secret) = crate::render::token_secret(job) {
        if !is_dns1123_subdomain(secret) {
            problems.push(format!("metadata.annotations[{:?}] is {secret:?}: name a Secret (lower-case letters, digits, '-' and '.', at most 253)", crate::render::TOKEN_SECRET_ANNOTATION));
        }
        if job.spec.elastic_policy.is_none() {
            problems.push(format!("metadata.annotations[{:?}] names a rendezvous token, but the job has no elasticPolicy (static jobs have no rendezvous service to guard); drop the annotation or add the policy", crate::render::TOKEN_SECRET_ANNOTATION));
        }
    }
    let spec = &job.spec;
    if spec.pytorch_replica_specs.is_empty() {
        problems.push("spec.pytorchReplicaSpecs is empty: give a Master and/or Worker".into());
    }
    for (rtype, replica) in &spec.pytorch_replica_specs {
        let at = format!("spec.pytorchReplicaSpecs.{rtype}");
        if rtype != MASTER && rtype != WORKER {
            problems.push(format!(
                "{at}: unknown replica type {rtype:?}: use Master or Worker"
            ));
            continue;
        }
        let containers = replica
            .template
            .spec
            .as_ref()
            .map(|p| p.containers.as_slice())
            .unwrap_or_default();
        if containers.is_empty() {
            problems.push(format!(
                "{at}.template.spec.containers is empty: give a container named {CONTAINER:?}"
            ));
        } else if !containers.iter().any(|c| c.name == CONTAINER) {
            problems.push(format!(
                "{at}: no container is named {CONTAINER:?}: name the training container so"
            ));
        }
        for c in containers.iter().filter(|c| c.image.is_none()) {
            problems.push(format!("{at}: container {:?} has no image", c.name));
        }
        let count = replica.count();
        if rtype == MASTER && count != 1 {
            problems.push(format!(
                "{at}.replicas is {count}: a job has exactly one Master"
            ));
        }
        if count < 1 {
            problems.push(format!("{at}.replicas is {count}: give at least 1"));
        }
        if count > MAX_REPLICAS {
            problems.push(format!(
                "{at}.replicas is {count}: at most {MAX_REPLICAS} replicas of one type are served"
            ));
        }
        // Services are named like pods; the longest must still be a DNS label.
        let longest = pod_name(name, rtype, count.max(1) - 1);
        if is_dns1035_label(name) && longest.len() > 63 {
            problems.push(format!("metadata.name {name:?} is too long: pod and service {longest:?} would have {} characters (at most 63); shorten the name by {}", longest.len(), longest.len() - 63));
        }
    }
    if let Some(nproc) = &spec.nproc_per_node {
        let known = ["auto", "cpu", "gpu"].contains(&nproc.as_str());
        if !known && nproc.parse::<u32>().map_or(true, |n| n == 0) {
            problems.push(format!(
                "spec.nprocPerNode {nproc:?}: use auto, cpu, gpu or a positive number"
            ));
        }
    }
    if let Some(run) = &spec.run_policy {
        if let Some(manager) = run.managed_by.as_deref().filter(|m| !m.is_empty()) {
            if !MANAGERS.contains(&manager) {
                problems.push(format!(
                    "spec.runPolicy.managedBy {manager:?}: use {} or leave it empty",
                    MANAGERS.join(" or ")
                ));
            }
        }
        if run.backoff_limit.is_some_and(|b| b < 0) {
            problems.push("spec.runPolicy.backoffLimit is negative: give 0 or more".into());
        }
    }
    if let Some(elastic) = &spec.elastic_policy {
        if !spec.pytorch_replica_specs.contains_key(WORKER) {
            problems.push("spec.elasticPolicy needs a Worker replica spec".into());
        }
        if elastic.n_proc_per_node.is_some() && spec.nproc_per_node.is_some() {
            problems.push("spec.elasticPolicy.nProcPerNode (deprecated) and spec.nprocPerNode are both set: keep spec.nprocPerNode".into());
        }
        if let (Some(min), Some(max)) = (elastic.min_replicas, elastic.max_replicas) {
            if min < 1 || min > max {
                problems.push(format!("spec.elasticPolicy: minReplicas {min} and maxReplicas {max}: need 1 ≤ min ≤ max"));
            }
        }
        if let Some(backend) = &elastic.rdzv_backend {
            if !["c10d", "etcd", "etcd-v2"].contains(&backend.as_str()) {
                problems.push(format!(
                    "spec.elasticPolicy.rdzvBackend {backend:?}: use c10d, etcd or etcd-v2"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Invalid(problems))
    }
}
