//! Which runtime a TrainJob runs on: one given beside it, or the built-in `torch-distributed`
//! ClusterTrainingRuntime as Kubeflow Trainer v2.3 installs it (an image, a `node` replicated
//! job, the torch policy; no launcher command — the TrainJob's `trainer.command` runs).

use super::crd::{TrainJob, TrainingRuntime, GROUP};
use super::TrainJobError;

/// The built-in runtime's name.
pub const TORCH_DISTRIBUTED: &str = "torch-distributed";

/// The label that marks a runtime's framework.
pub const FRAMEWORK_LABEL: &str = "trainer.kubeflow.org/framework";

/// Trainer v2.3's `manifests/base/runtimes/torch_distributed.yaml`.
const TORCH_DISTRIBUTED_YAML: &str = r#"
apiVersion: trainer.kubeflow.org/v1alpha1
kind: ClusterTrainingRuntime
metadata:
  name: torch-distributed
  labels:
    trainer.kubeflow.org/framework: torch
spec:
  mlPolicy:
    numNodes: 1
    torch: {}
  template:
    spec:
      replicatedJobs:
        - name: node
          template:
            metadata:
              labels:
                trainer.kubeflow.org/trainjob-ancestor-step: trainer
            spec:
              template:
                spec:
                  containers:
                    - name: node
                      image: pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
"#;

/// The built-in `torch-distributed` ClusterTrainingRuntime.
pub fn torch_distributed() -> TrainingRuntime {
    // A constant of this file, parsed by a unit test below: it cannot fail at run time.
    serde_yaml::from_str(TORCH_DISTRIBUTED_YAML).unwrap_or_default()
}

/// The runtime `job` names, among `given` (then the built-in one).
///
/// # Errors
/// No `runtimeRef`, another group or kind than Trainer's, or no runtime of that kind and name
/// (the message says how to give one).
pub fn resolve(
    job: &TrainJob,
    given: &[TrainingRuntime],
) -> Result<TrainingRuntime, TrainJobError> {
    let Some(reference) = job.spec.runtime_ref.as_ref().filter(|r| !r.name.is_empty()) else {
        return Err(TrainJobError::NoRuntime);
    };
    let group = reference.api_group.as_deref().unwrap_or(GROUP);
    let kind = reference.kind();
    if group != GROUP || !matches!(kind, "ClusterTrainingRuntime" | "TrainingRuntime") {
        return Err(TrainJobError::Invalid(vec![format!(
            "spec.runtimeRef: {kind}.{group} is not a Trainer runtime: use kind ClusterTrainingRuntime or TrainingRuntime of {GROUP}"
        )]));
    }
    let namespace = job.metadata.namespace.as_deref().unwrap_or("default");
    let found = given.iter().find(|r| {
        r.kind == kind
            && r.metadata.name.as_deref() == Some(reference.name.as_str())
            && (kind == "ClusterTrainingRuntime"
                || r.metadata.namespace.as_deref().unwrap_or("default") == namespace)
    });
    match found {
        Some(runtime) => Ok(runtime.clone()),
        None if kind == "ClusterTrainingRuntime" && reference.name == TORCH_DISTRIBUTED => {
            Ok(torch_distributed())
        }
        None => Err(TrainJobError::UnknownRuntime {
            kind: kind.into(),
            name: reference.name.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_runtime_parses_as_trainers() {
        let r = torch_distributed();
        assert_eq!(r.metadata.name.as_deref(), Some(TORCH_DISTRIBUTED));
        assert_eq!(r.kind, "ClusterTrainingRuntime");
        assert!(r.spec.ml_policy.as_ref().is_some_and(|p| p.torch.is_some()));
        let jobs = &r.spec.template.spec.replicated_jobs;
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].name, "node");
        let labels = r.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(FRAMEWORK_LABEL).map(String::as_str),
            Some("torch")
        );
    }
}
