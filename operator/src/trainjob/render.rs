//! What a TrainJob becomes, as pure functions of the job and its runtime: the pods Trainer →
//! JobSet → Job create (one per node of the trainer job, one per completion of the others),
//! with the environment Trainer's torch plugin injects, and the JobSet's headless service.
//!
//! Formulas (Trainer v2.3 `pkg/runtime/framework/plugins/torch/torch.go`, JobSet v0.12):
//! pods `<job>-<replicatedJob>-<jobIndex>-<completionIndex>` (their hostnames; Kubernetes adds
//! a random suffix to the pod's own name), subdomain `<job>`; in the `node` container of the
//! trainer job: `PET_NNODES` = numNodes, `PET_NPROC_PER_NODE` (below), `PET_NODE_RANK` from
//! the completion index, `PET_MASTER_ADDR` = `<job>-node-0-0.<job>`, `PET_MASTER_PORT` = 29500
//! (also a container port); every container of an Indexed Job gets `JOB_COMPLETION_INDEX`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, PodSpec, Service,
    ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::crd::{ReplicatedJob, TrainJob, TrainingRuntime};
use crate::policy::RestartPolicy;

/// The label that marks the runtime's trainer job.
pub const ANCESTOR_LABEL: &str = "trainer.kubeflow.org/trainjob-ancestor-step";
/// The trainer's container.
pub const NODE_CONTAINER: &str = "node";
/// The port Trainer gives the master.
pub const MASTER_PORT: i32 = 29500;
/// The annotation (and label) holding a pod's completion index.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// JobSet's labels.
pub const JOBSET_NAME: &str = "jobset.sigs.k8s.io/jobset-name";
/// The replicated job's name.
pub const REPLICATED_JOB: &str = "jobset.sigs.k8s.io/replicatedjob-name";
/// The job's index within its replicated job.
pub const JOB_INDEX: &str = "jobset.sigs.k8s.io/job-index";

/// One pod of the job.
#[derive(Debug, Clone, PartialEq)]
pub struct RenderedPod {
    /// Its replicated job's name.
    pub replicated_job: String,
    /// Whether it is a node of the trainer job.
    pub trainer: bool,
    /// Its Job's `backoffLimit` (Kubernetes' default 6 when unset).
    pub backoff_limit: i32,
    /// The pod.
    pub pod: Pod,
}

/// The runtime's trainer job: labelled as the trainer's ancestor, or named `node`.
pub fn trainer_job(runtime: &TrainingRuntime) -> Option<&ReplicatedJob> {
    let jobs = &runtime.spec.template.spec.replicated_jobs;
    let labelled = |j: &&ReplicatedJob| {
        j.template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.as_ref())
            .and_then(|l| l.get(ANCESTOR_LABEL))
            .is_some_and(|v| v == "trainer")
    };
    jobs.iter()
        .find(labelled)
        .or_else(|| jobs.iter().find(|j| j.name == NODE_CONTAINER))
}

/// Nodes: the TrainJob's, else the runtime's `mlPolicy.numNodes`, else 1.
pub fn num_nodes(job: &TrainJob, runtime: &TrainingRuntime) -> i32 {
    job.spec
        .trainer
        .as_ref()
        .and_then(|t| t.num_nodes)
        .or_else(|| runtime.spec.ml_policy.as_ref().and_then(|p| p.num_nodes))
        .unwrap_or(1)
}

/// `PET_NPROC_PER_NODE` as the torch plugin computes it: the TrainJob's value (else the
/// runtime's, else `auto`); with `resourcesPerNode`, `auto` becomes the CPU count when no GPU
/// is asked for and `cpu` the CPU count (limits first, then requests; at least 1).
pub fn num_proc_per_node(job: &TrainJob, runtime: &TrainingRuntime) -> String {
    let trainer = job.spec.trainer.clone().unwrap_or_default();
    let asked = trainer
        .num_proc_per_node
        .clone()
        .or_else(|| {
            runtime
                .spec
                .ml_policy
                .as_ref()
                .and_then(|p| p.torch.as_ref())
                .and_then(|t| t.num_proc_per_node.clone())
        })
        .unwrap_or(IntOrString::String("auto".into()));
    let asked = match asked {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s,
    };
    let Some(resources) = trainer.resources_per_node else {
        return asked;
    };
    let (uses_cpu, fallback): (fn(&Resources) -> bool, &str) = match asked.as_str() {
        "auto" => (
            |r| !r.keys().any(|k| k.to_ascii_lowercase().contains("gpu")),
            "auto",
        ),
        "cpu" => (|r| r.contains_key("cpu"), "1"),
        _ => return asked,
    };
    let from = |list: Option<&BTreeMap<String, Quantity>>| -> (String, bool) {
        match list {
            None => ("1".into(), false),
            Some(r) if uses_cpu(r) => {
                // Absent is 0 CPUs, as for Kubernetes; the quantity itself was validated.
                let cpus = r.get("cpu").and_then(|q| cpu_count(&q.0)).unwrap_or(0);
                (cpus.max(1).to_string(), true)
            }
            Some(_) => (fallback.into(), false),
        }
    };
    match from(resources.limits.as_ref()) {
        (n, true) => n,
        _ => from(resources.requests.as_ref()).0,
    }
}

/// A resource list (limits or requests).
type Resources = BTreeMap<String, Quantity>;

/// Whole CPUs of a quantity, rounded up as Kubernetes' `Value()` does (`500m` → 1); `None`
/// for what is not a CPU quantity (refused by [`super::validate`]).
pub(crate) fn cpu_count(text: &str) -> Option<i64> {
    let cpus = match text.strip_suffix('m') {
        Some(milli) => milli
            .parse::<i64>()
            .ok()
            .filter(|m| *m >= 0)
            .map(|m| (m + 999) / 1000),
        None => text
            .parse::<f64>()
            .ok()
            .filter(|c| c.is_finite())
            .map(|c| c.ceil() as i64),
    };
    cpus.filter(|&c| c >= 0)
}

/// `<job>-<replicatedJob>-<jobIndex>-<completionIndex>`.
pub fn hostname(job: &str, replicated_job: &str, job_index: i32, index: i32) -> String {
    format!("{job}-{replicated_job}-{job_index}-{index}")
}

/// `PET_MASTER_ADDR`: node 0's name in the JobSet's headless service.
pub fn master_addr(job: &str) -> String {
    format!("{}.{job}", hostname(job, NODE_CONTAINER, 0, 0))
}

fn value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn from_completion_index(name: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: None,
                field_path: format!("metadata.annotations['{COMPLETION_INDEX}']"),
            }),
            ..EnvVarSource::default()
        }),
    }
}

/// Replaces the variable of the same name in place, or appends it (Trainer's `UpsertEnvVar`).
fn upsert(env: &mut Vec<EnvVar>, var: EnvVar) {
    match env.iter_mut().find(|v| v.name == var.name) {
        Some(slot) => *slot = var,
        None => env.push(var),
    }
}

/// The trainer's overrides and the torch plugin's variables, on the `node` container.
fn configure_node(
    container: &mut Container,
    job: &TrainJob,
    runtime: &TrainingRuntime,
    torch: bool,
) {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let trainer = job.spec.trainer.clone().unwrap_or_default();
    if trainer.image.is_some() {
        container.image = trainer.image;
    }
    if trainer.command.is_some() {
        container.command = trainer.command;
    }
    if trainer.args.is_some() {
        container.args = trainer.args;
    }
    if trainer.resources_per_node.is_some() {
        container.resources = trainer.resources_per_node;
    }
    let env = container.env.get_or_insert_with(Vec::new);
    for var in trainer.env.unwrap_or_default() {
        upsert(env, var);
    }
    if !torch {
        return;
    }
    for var in [
        value("PET_NNODES", num_nodes(job, runtime).to_string()),
        value("PET_NPROC_PER_NODE", num_proc_per_node(job, runtime)),
        from_completion_index("PET_NODE_RANK"),
        value("PET_MASTER_ADDR", master_addr(name)),
        value("PET_MASTER_PORT", MASTER_PORT.to_string()),
    ] {
        upsert(env, var);
    }
    let ports = container.ports.get_or_insert_with(Vec::new);
    if !ports.iter().any(|p| p.container_port == MASTER_PORT) {
        ports.push(ContainerPort {
            container_port: MASTER_PORT,
            ..ContainerPort::default()
        });
    }
}

/// Pods of each copy of `rjob`: the node count for the trainer job, else its template's
/// `completions`, else `parallelism`, else 1.
pub fn completions(
    job: &TrainJob,
    runtime: &TrainingRuntime,
    rjob: &ReplicatedJob,
    is_trainer: bool,
) -> i32 {
    if is_trainer {
        return num_nodes(job, runtime);
    }
    let spec = rjob.template.spec.as_ref();
    spec.and_then(|s| s.completions.or(s.parallelism))
        .unwrap_or(1)
}

/// Every pod of the job (valid, with its runtime), replicated jobs in the runtime's order.
pub fn pods(job: &TrainJob, runtime: &TrainingRuntime) -> Vec<RenderedPod> {
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let torch = runtime
        .spec
        .ml_policy
        .as_ref()
        .is_some_and(|p| p.torch.is_some());
    let trainer_name = trainer_job(runtime).map(|j| j.name.clone());
    let mut out = Vec::new();
    for rjob in &runtime.spec.template.spec.replicated_jobs {
        let is_trainer = Some(&rjob.name) == trainer_name.as_ref();
        let job_spec = rjob.template.spec.clone().unwrap_or_default();
        let completions = completions(job, runtime, rjob, is_trainer);
        for job_index in 0..rjob.replicas.unwrap_or(1).max(0) {
            for index in 0..completions.max(0) {
                let mut template = job_spec.template.clone();
                let mut meta = template.metadata.take().unwrap_or_default();
                let host = hostname(name, &rjob.name, job_index, index);
                let labels = meta.labels.get_or_insert_with(BTreeMap::new);
                if let Some(job_labels) = rjob
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.as_ref())
                {
                    labels.extend(job_labels.clone());
                }
                labels.insert(JOBSET_NAME.into(), name.into());
                labels.insert(REPLICATED_JOB.into(), rjob.name.clone());
                labels.insert(JOB_INDEX.into(), job_index.to_string());
                labels.insert(COMPLETION_INDEX.into(), index.to_string());
                meta.annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(COMPLETION_INDEX.into(), index.to_string());
                let mut spec: PodSpec = template.spec.take().unwrap_or_default();
                spec.hostname = Some(host.clone());
                spec.subdomain = Some(name.into());
                // JobSet's webhook defaults it: a Job's pods may not restart Always.
                spec.restart_policy
                    .get_or_insert_with(|| RestartPolicy::OnFailure.for_pod().into());
                for container in &mut spec.containers {
                    if is_trainer && container.name == NODE_CONTAINER {
                        configure_node(container, job, runtime, torch);
                    }
                    upsert(
                        container.env.get_or_insert_with(Vec::new),
                        from_completion_index("JOB_COMPLETION_INDEX"),
                    );
                }
                out.push(RenderedPod {
                    replicated_job: rjob.name.clone(),
                    trainer: is_trainer,
                    backoff_limit: job_spec.backoff_limit.unwrap_or(6),
                    pod: Pod {
                        metadata: ObjectMeta {
                            name: Some(host),
                            namespace: job.metadata.namespace.clone(),
                            labels: meta.labels,
                            annotations: meta.annotations,
                            ..ObjectMeta::default()
                        },
                        spec: Some(spec),
                        status: None,
                    },
                });
            }
        }
    }
    out
}

/// The JobSet's headless service: every pod as `<hostname>.<job>`.
pub fn service(job: &TrainJob) -> Service {
    let name = job.metadata.name.clone().unwrap_or_default();
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.metadata.namespace.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(BTreeMap::from([(JOBSET_NAME.to_owned(), name)])),
            publish_not_ready_addresses: Some(true),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_round_up_as_kubernetes_does() {
        assert_eq!(cpu_count("500m"), Some(1));
        assert_eq!(cpu_count("2500m"), Some(3));
        assert_eq!(cpu_count("4"), Some(4));
        assert_eq!(cpu_count("1.5"), Some(2));
        assert_eq!(cpu_count("four"), None);
        assert_eq!(cpu_count("-1"), None);
    }
}
