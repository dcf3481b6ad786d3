//! ferrun's data-parallel trainer for tch-rs (libtorch) models: DDP with backward overlapped
//! by communication, ZeRO stages 1–3, checkpoints and elastic resume, on ferrun's collectives.
//!
//! # Layout
//! - [`hooks`] (crate-private): gradient hooks through a small C++ shim over libtorch.
//! - [`parallel`]: a tch model's parameters bound to a `collective::zero` engine — DDP is its
//!   stage 0 — with buckets reduced as backward fills them.
//! - [`model`]: the MLP the main job trains, run layer by layer so stage 3 can gather.
//! - [`data`]: the handwritten digits from scikit-learn's wheel; [`sampler`]: which samples
//!   each rank sees (pure).
//! - [`checkpoint`]: the training state beside the engine's sharded checkpoints; the latest
//!   complete one.
//! - [`train`]: the training loop and its progress lines.
//!
//! Workers read their place in the job from [`ferrun_collective::WorkerEnv`], the contract the
//! launcher (or torchrun) writes.

pub mod checkpoint;
pub mod data;
mod hooks;
pub mod model;
pub mod parallel;
pub mod sampler;
pub mod train;

pub use ferrun_collective::WorkerEnv;

/// What went wrong in training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data cannot be read.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The model does not fit what it is bound to.
    #[error("model: {0}")]
    Model(String),
    /// A ZeRO engine call failed.
    #[error(transparent)]
    Zero(#[from] ferrun_collective::zero::ZeroError),
    /// A collective failed.
    #[error(transparent)]
    Comm(#[from] ferrun_collective::comm::CommError),
    /// A checkpoint cannot be used.
    #[error("checkpoint {path}: {what}")]
    Checkpoint {
        /// The file or directory.
        path: String,
        /// What is wrong, and what to do.
        what: String,
    },
    /// libtorch refused an operation.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}
