//! Kubeflow Trainer v2 TrainJobs (`trainer.kubeflow.org/v1alpha1`): read, checked as Trainer's
//! webhook checks them, rendered into the pods Trainer → JobSet → Job would create, and run on
//! this machine. Trainer v2 has no elastic training; its torch runtimes inject torchrun's
//! `PET_*` variables and run the user's `trainer.command` — `ferrun …` needs nothing else.
//!
//! - [`crd`]: TrainJob and (Cluster)TrainingRuntime.
//! - [`runtime`]: the runtime a job names (given beside it, or the built-in
//!   `torch-distributed`).
//! - [`render`]: the pods, their environment and the headless service, as pure functions.
//! - [`local`]: a TrainJob's nodes as local processes.
//!
//! Trusts nothing in the texts: their size and depth are checked before parsing (as for
//! PyTorchJobs), names and counts before anything is rendered.

pub mod crd;
pub mod local;
pub mod render;
pub mod runtime;

use crate::names::is_dns1035_label;
use crate::LoadError;
use crd::{TrainJob, TrainingRuntime, API_VERSION};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Deserialize as _;

/// The five variables Trainer's torch plugin sets; its webhook refuses them in `trainer.env`.
pub const RESERVED_ENV: [&str; 5] = [
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
];

/// Most nodes a TrainJob may ask for here (as for a PyTorchJob's replicas).
pub const MAX_NODES: i32 = crate::validate::MAX_REPLICAS;

/// Why a TrainJob or a runtime could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TrainJobError {
    /// The text is not a TrainJob or runtime.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// An object of another kind than expected.
    #[error("expected {expected} ({API_VERSION}), found {found}: is this the right file?")]
    WrongKind {
        /// What was expected.
        expected: &'static str,
        /// What the text says (`apiVersion` `kind`).
        found: String,
    },
    /// `spec.runtimeRef` is missing.
    #[error("spec.runtimeRef: Required value: a TrainJob names the runtime it runs on, e.g. `runtimeRef: {{name: torch-distributed}}`")]
    NoRuntime,
    /// The runtime it names is neither given nor built in.
    #[error("spec.runtimeRef: {kind}.trainer.kubeflow.org {name:?} not found: give its YAML beside the job (--runtime FILE); the built-in one is `torch-distributed`")]
    UnknownRuntime {
        /// `ClusterTrainingRuntime` or `TrainingRuntime`.
        kind: String,
        /// Its name.
        name: String,
    },
    /// A pod cannot run as a local process.
    #[error(transparent)]
    Local(#[from] crate::local::LocalError),
    /// The job breaks Trainer's rules (every problem, in its webhook's words where it has them).
    #[error("invalid TrainJob: {}", .0.join("; "))]
    Invalid(Vec<String>),
}

/// Reads a TrainJob from YAML (or JSON).
///
/// # Errors
/// Not a TrainJob, no name, or a parse error with its place.
pub fn load_trainjob(text: &str) -> Result<TrainJob, TrainJobError> {
    let job: TrainJob = crate::parse(text, "TrainJob")?;
    check_kind(&job.api_version, &job.kind, &["TrainJob"], "TrainJob")?;
    if job.metadata.name.as_deref().is_none_or(str::is_empty) {
        return Err(LoadError::Unnamed("TrainJob").into());
    }
    Ok(job)
}

/// Reads the runtimes of a YAML text (one or more documents, `---` between).
///
/// # Errors
/// A document that is not a ClusterTrainingRuntime or TrainingRuntime, or has no name.
pub fn load_runtimes(text: &str) -> Result<Vec<TrainingRuntime>, TrainJobError> {
    crate::check_shape(text)?;
    let mut out = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value =
            serde_yaml::Value::deserialize(document).map_err(|source| LoadError::Parse {
                kind: "TrainingRuntime",
                source,
            })?;
        if value.is_null() {
            continue;
        }
        let runtime: TrainingRuntime =
            serde_yaml::from_value(value).map_err(|source| LoadError::Parse {
                kind: "TrainingRuntime",
                source,
            })?;
        check_kind(
            &runtime.api_version,
            &runtime.kind,
            &["ClusterTrainingRuntime", "TrainingRuntime"],
            "ClusterTrainingRuntime or TrainingRuntime",
        )?;
        if runtime.metadata.name.as_deref().is_none_or(str::is_empty) {
            return Err(LoadError::Unnamed("TrainingRuntime").into());
        }
        out.push(runtime);
    }
    Ok(out)
}

fn check_kind(
    api_version: &str,
    kind: &str,
    kinds: &[&str],
    expected: &'static str,
) -> Result<(), TrainJobError> {
    if api_version == API_VERSION && kinds.contains(&kind) {
        return Ok(());
    }
    Err(TrainJobError::WrongKind {
        expected,
        found: format!("{api_version:?} {kind:?}"),
    })
}

/// Checks a TrainJob against its runtime as Trainer's webhooks do (their messages where they
/// have them), and what they leave to fail later (names too long for a pod's hostname, no
/// trainer job in the runtime).
///
/// # Errors
/// [`TrainJobError::Invalid`] with every problem.
pub fn validate(job: &TrainJob, runtime: &TrainingRuntime) -> Result<(), TrainJobError> {
    let mut problems = Vec::new();
    let name = job.metadata.name.as_deref().unwrap_or_default();
    let nodes = render::num_nodes(job, runtime);
    if !is_dns1035_label(name) {
        problems.push(format!("metadata.name {name:?}: a TrainJob's name must be a DNS-1035 label (lower-case letters, digits and '-', starting with a letter, at most 63 characters)"));
    }
    if !(1..=MAX_NODES).contains(&nodes) {
        problems.push(format!(
            "spec.trainer.numNodes is {nodes}: give 1 to {MAX_NODES}"
        ));
    }
    let Some(trainer_job) = render::trainer_job(runtime) else {
        problems.push(format!("runtime {:?} has no trainer job: one replicated job must be labelled {}: trainer (or be named node)", runtime.metadata.name.as_deref().unwrap_or_default(), render::ANCESTOR_LABEL));
        return Err(TrainJobError::Invalid(problems));
    };
    let host = render::hostname(name, &trainer_job.name, 0, nodes.max(1) - 1);
    if is_dns1035_label(name) && host.len() > 63 {
        problems.push(format!("metadata.name {name:?} is too long: pod hostname {host:?} would have {} characters (at most 63); shorten the name by {}", host.len(), host.len() - 63));
    }
    let mut pods = 0i64;
    for (i, rjob) in runtime
        .spec
        .template
        .spec
        .replicated_jobs
        .iter()
        .enumerate()
    {
        let copies = rjob.replicas.unwrap_or(1);
        let is_trainer = rjob.name == trainer_job.name;
        let each = render::completions(job, runtime, rjob, is_trainer);
        // The trainer's count is numNodes, checked above.
        let bad_each = !is_trainer && !(1..=MAX_NODES).contains(&each);
        if !(0..=MAX_NODES).contains(&copies) || bad_each {
            problems.push(format!("runtime replicatedJobs[{i}] ({}): {copies} copies of {each} pods: give 0 to {MAX_NODES} copies of 1 to {MAX_NODES}", rjob.name));
        }
        pods += i64::from(copies.max(0)) * i64::from(each.max(0));
    }
    if pods > i64::from(MAX_NODES) {
        problems.push(format!(
            "the job would have {pods} pods: at most {MAX_NODES} are served"
        ));
    }
    let trainer = job.spec.trainer.clone().unwrap_or_default();
    let resources = trainer.resources_per_node.clone().unwrap_or_default();
    for (list, quantities) in [
        ("limits", &resources.limits),
        ("requests", &resources.requests),
    ] {
        if let Some(cpu) = quantities.as_ref().and_then(|q| q.get("cpu")) {
            if render::cpu_count(&cpu.0).is_none() {
                problems.push(format!("spec.trainer.resourcesPerNode.{list}.cpu {:?}: not a CPU quantity (give e.g. 4 or 500m)", cpu.0));
            }
        }
    }
    if let Some(nproc) = &trainer.num_proc_per_node {
        match nproc {
            IntOrString::String(s) if !["auto", "cpu", "gpu"].contains(&s.as_str()) => problems.push(format!(
                "spec.trainer.numProcPerNode: Invalid value: {s:?}: must have an int value or [auto cpu gpu]"
            )),
            IntOrString::Int(n) if *n < 1 => problems.push(format!(
                "spec.trainer.numProcPerNode is {n}: give at least 1"
            )),
            _ => {}
        }
    }
    let torch = runtime
        .spec
        .ml_policy
        .as_ref()
        .is_some_and(|p| p.torch.is_some());
    let torchtune = trainer.command.as_deref() == Some(&["tune".to_owned(), "run".to_owned()][..]);
    if torch && !torchtune {
        let env = trainer.env.unwrap_or_default();
        let mut reserved: Vec<&str> = env
            .iter()
            .map(|v| v.name.as_str())
            .filter(|n| RESERVED_ENV.contains(n))
            .collect();
        reserved.sort_unstable();
        reserved.dedup();
        if !reserved.is_empty() {
            let value = serde_json::to_string(&env).unwrap_or_default();
            problems.push(format!(
                "spec.trainer.env: Invalid value: {value}: must not have reserved envs, invalid envs configured: [{}]",
                reserved.join(" ")
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(TrainJobError::Invalid(problems))
    }
}
