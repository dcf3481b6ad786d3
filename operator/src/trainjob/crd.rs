//! Kubeflow Trainer v2's TrainJob and (Cluster)TrainingRuntime, `trainer.kubeflow.org/v1alpha1`
//! (v2.3), with the fields a job's nodes depend on typed and the rest (initializers, runtime
//! patches, pod-group policies) carried as they are. `TRAINJOB-CONTRACT.md` beside this crate
//! records the facts.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::JobTemplateSpec;
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API group of TrainJobs and runtimes.
pub const GROUP: &str = "trainer.kubeflow.org";
/// Their `apiVersion`.
pub const API_VERSION: &str = "trainer.kubeflow.org/v1alpha1";

/// A TrainJob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainJob {
    /// `trainer.kubeflow.org/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `TrainJob`.
    #[serde(default)]
    pub kind: String,
    /// Its name names the JobSet, the headless service and every pod.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// What to run.
    #[serde(default)]
    pub spec: TrainJobSpec,
}

/// `spec` of a TrainJob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainJobSpec {
    /// The runtime it runs on (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_ref: Option<RuntimeRef>,
    /// Dataset and model initializers, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initializer: Option<Value>,
    /// The trainer's overrides of the runtime's node container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainer: Option<Trainer>,
    /// Patches of the JobSet and pod templates, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_patches: Option<Vec<Value>>,
    /// Suspended: no pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
    /// The job fails after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    /// The controller that manages it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

/// `spec.runtimeRef`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeRef {
    /// The runtime's name.
    #[serde(default)]
    pub name: String,
    /// Its group (default `trainer.kubeflow.org`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_group: Option<String>,
    /// `ClusterTrainingRuntime` (the default) or `TrainingRuntime`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

impl RuntimeRef {
    /// The kind it names.
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or("ClusterTrainingRuntime")
    }
}

/// `spec.trainer`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trainer {
    /// Replaces the node container's image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Replaces its command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces its args.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Added to (or replacing, by name) its environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<EnvVar>>,
    /// Nodes (pods); the runtime's `mlPolicy.numNodes` when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_nodes: Option<i32>,
    /// Each node's resources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources_per_node: Option<ResourceRequirements>,
    /// Processes per node: a number, `auto`, `cpu` or `gpu`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_proc_per_node: Option<IntOrString>,
}

/// A ClusterTrainingRuntime or a TrainingRuntime (the same spec; the second is namespaced).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRuntime {
    /// `trainer.kubeflow.org/v1alpha1`.
    #[serde(default)]
    pub api_version: String,
    /// `ClusterTrainingRuntime` or `TrainingRuntime`.
    #[serde(default)]
    pub kind: String,
    /// Its name is what `runtimeRef.name` names.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The policy and the JobSet template.
    #[serde(default)]
    pub spec: TrainingRuntimeSpec,
}

/// `spec` of a runtime.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrainingRuntimeSpec {
    /// Nodes and the framework's policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ml_policy: Option<MlPolicy>,
    /// Gang scheduling, kept as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_group_policy: Option<Value>,
    /// The JobSet each TrainJob becomes.
    #[serde(default)]
    pub template: JobSetTemplate,
}

/// `spec.mlPolicy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MlPolicy {
    /// Nodes, unless the TrainJob says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_nodes: Option<i32>,
    /// The torch policy: its presence makes the runtime a torch one (the `PET_*` environment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch: Option<TorchPolicy>,
    /// Other frameworks' policies (MPI, JAX, …), kept as written.
    #[serde(flatten)]
    pub others: BTreeMap<String, Value>,
}

/// `mlPolicy.torch`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TorchPolicy {
    /// Processes per node (runtimes before v2.2 held it here; the TrainJob's wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_proc_per_node: Option<IntOrString>,
    /// The rest (`envInjection`, …), kept as written.
    #[serde(flatten)]
    pub others: BTreeMap<String, Value>,
}

/// `spec.template`: a JobSet's metadata and spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSetTemplate {
    /// Labels and annotations of the JobSet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ObjectMeta>,
    /// Its replicated jobs.
    #[serde(default)]
    pub spec: JobSetSpec,
}

/// A JobSet's spec, as far as its pods depend on it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobSetSpec {
    /// The replicated jobs, in order.
    #[serde(default)]
    pub replicated_jobs: Vec<ReplicatedJob>,
    /// The rest (failure and success policies, network, …), kept as written.
    #[serde(flatten)]
    pub others: BTreeMap<String, Value>,
}

/// One replicated job of a JobSet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedJob {
    /// Its name (`node` for the trainer).
    pub name: String,
    /// Copies of the job (1 for Trainer's runtimes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,
    /// Jobs that must reach a status first (initializers before the trainer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depends_on: Option<Vec<Value>>,
    /// The Job template.
    #[serde(default)]
    pub template: JobTemplateSpec,
}
