//! ferrun's Kubernetes operator for kubeflow.org/v1 PyTorchJobs.
//!
//! Not built yet. It stands alone: it shares the worker environment contract with the launcher
//! through a cross-crate test in `tests/`, not by importing the launcher.
