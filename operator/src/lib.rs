//! ferrun's Kubernetes operator for kubeflow.org/v1 PyTorchJobs: the same objects users already
//! write for the Kubeflow training-operator, rendered into the same pods, services and
//! environment, with that operator's known bugs fixed.
//!
//! - [`crd`]: the PyTorchJob resource, field for field.
//! - [`defaults`], [`validate`]: the training-operator's defaults, its webhook's checks and
//!   those it misses.
//! - [`render`]: pods, services and environment as pure functions of a job; [`scheduling`]:
//!   its PodGroup (gang scheduling) and HorizontalPodAutoscaler.
//! - [`controller`]: the in-cluster controller (planner, API calls, leader election, metrics).
//! - [`lifecycle`]: conditions, replica counts, success and failure rules, restarts.
//! - [`local`]: a job run on this machine as local processes, no cluster needed.
//!
//! It stands alone: it shares the worker environment contract with the launcher through a
//! cross-crate test in `tests/`, not by importing the launcher.

pub mod controller;
pub mod crd;
pub mod defaults;
pub mod lifecycle;
pub mod local;
pub mod render;
pub mod scheduling;
pub mod validate;

/// Reads a PyTorchJob from YAML (or JSON), applies the defaults and validates it.
///
/// # Errors
/// A message naming the parse error's place, or every validation problem.
pub fn load_job(text: &str) -> Result<crd::PyTorchJob, String> {
    let job: crd::PyTorchJob =
        serde_yaml::from_str(text).map_err(|e| format!("not a PyTorchJob: {e}"))?;
    if job.metadata.name.is_none() {
        return Err("the PyTorchJob has no metadata.name".into());
    }
    let job = defaults::with_defaults(&job);
    validate::validate(&job).map_err(|e| e.to_string())?;
    Ok(job)
}
