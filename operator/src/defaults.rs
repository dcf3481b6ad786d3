//! The training-operator's defaults (`SetDefaults_PyTorchJob`), applied in memory before a job
//! is validated, rendered or reconciled — never written back, as there.

use k8s_openapi::api::core::v1::{Container, ContainerPort};

use crate::crd::{PyTorchJob, RunPolicy, MASTER, WORKER};
use crate::policy::{CleanPodPolicy, RestartPolicy};

/// The container the operator configures: the one named `pytorch`.
pub const CONTAINER: &str = "pytorch";
/// The name of the port the master listens on.
pub const PORT_NAME: &str = "pytorchjob-port";
/// Its default number.
pub const DEFAULT_PORT: i32 = 23456;

/// The job with every default filled in.
pub fn with_defaults(job: &PyTorchJob) -> PyTorchJob {
    let mut job = job.clone();
    let spec = &mut job.spec;
    let run = spec.run_policy.get_or_insert_with(RunPolicy::default);
    run.clean_pod_policy.get_or_insert(CleanPodPolicy::None);
    // Replica types are matched without regard to case (`worker` is `Worker`).
    let specs = std::mem::take(&mut spec.pytorch_replica_specs);
    for (key, mut replica) in specs {
        let key = match key.to_ascii_lowercase().as_str() {
            "master" => MASTER.to_owned(),
            "worker" => WORKER.to_owned(),
            _ => key,
        };
        replica.replicas.get_or_insert(1);
        replica
            .restart_policy
            .get_or_insert(RestartPolicy::OnFailure);
        if let Some(pod) = replica.template.spec.as_mut() {
            if let Some(container) = main_container_mut(&mut pod.containers) {
                let ports = container.ports.get_or_insert_with(Vec::new);
                if !ports.iter().any(|p| p.name.as_deref() == Some(PORT_NAME)) {
                    ports.push(ContainerPort {
                        name: Some(PORT_NAME.into()),
                        container_port: DEFAULT_PORT,
                        ..ContainerPort::default()
                    });
                }
            }
        }
        spec.pytorch_replica_specs.insert(key, replica);
    }
    let workers = spec.pytorch_replica_specs.get(WORKER).map(|w| w.count());
    if let Some(elastic) = spec.elastic_policy.as_mut() {
        match (elastic.min_replicas, elastic.max_replicas) {
            (Some(min), None) => elastic.max_replicas = Some(min),
            (None, Some(max)) => elastic.min_replicas = Some(max),
            (None, None) => (elastic.min_replicas, elastic.max_replicas) = (workers, workers),
            _ => {}
        }
    }
    let deprecated_nproc = spec
        .elastic_policy
        .as_ref()
        .is_some_and(|e| e.n_proc_per_node.is_some());
    if spec.nproc_per_node.is_none() && !deprecated_nproc {
        spec.nproc_per_node = Some("auto".into());
    }
    job
}

/// The container named `pytorch`, else the first.
pub fn main_container(containers: &[Container]) -> Option<&Container> {
    containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .or(containers.first())
}

fn main_container_mut(containers: &mut [Container]) -> Option<&mut Container> {
    let index = containers
        .iter()
        .position(|c| c.name == CONTAINER)
        .unwrap_or(0);
    containers.get_mut(index)
}

/// The port named `pytorchjob-port` of `rtype`'s main container (the default if none).
pub fn job_port(job: &PyTorchJob, rtype: &str) -> i32 {
    job.replica(rtype)
        .and_then(|r| r.template.spec.as_ref())
        .and_then(|pod| main_container(&pod.containers))
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some(PORT_NAME)))
        .map_or(DEFAULT_PORT, |p| p.container_port)
}
