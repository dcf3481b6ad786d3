//! ZeRO: data parallelism whose optimizer state (stage 1), gradients (stage 2) and parameters
//! (stage 3) are sharded across the ranks (Rajbhandari et al., arXiv:1910.02054), on flat
//! buffers and independent of any tensor library.
//!
//! # Layout
//! - [`plan`]: where each parameter lives in the flat buffer, the buckets, each rank's chunks
//!   (pure).
//! - [`precision`]: the model's float types (f32, f16, bf16) and dynamic loss scaling.
//! - [`optim`]: SGD and AdamW on f32 shards.
//! - [`engine`]: [`Zero`], the stages over an [`AsyncCommunicator`]: what a training loop calls.
//! - [`checkpoint`]: sharded checkpoints, re-sharded on load to any world size.
//! - [`memory`]: the bytes an engine holds, beside ZeRO's formulas.
//!
//! # Guarantees
//! - Every rank ends every step with bitwise-identical parameters, at every stage: each chunk
//!   is updated by its owner alone and then copied (stages 1–3), or from bitwise-identical
//!   averaged gradients (stage 0).
//! - Ranks never disagree on skipping a step: the overflow count and the gradient norm are one
//!   all-reduce, taken before anything is updated.
//! - Bad input (a gradient of the wrong length, a bucket handed in twice or not at all, a
//!   plan that differs between ranks, a checkpoint of another model) is a [`ZeroError`] naming
//!   it, caught before the bad call sends anything; a peer left waiting on a rank that stopped
//!   fails at the communicator's deadline, naming that rank, rather than hanging.
//!
//! # Trust
//! Checkpoint files are read as untrusted: their header is parsed with bounds, every length is
//! checked against the plan before anything is allocated or copied.
//!
//! [`AsyncCommunicator`]: crate::comm::AsyncCommunicator

pub mod checkpoint;
pub mod engine;
mod grads;
pub mod memory;
pub mod optim;
pub mod plan;
mod pool;
pub mod precision;

#[cfg(test)]
mod tests;

pub use engine::{Stage, StepReport, Zero, ZeroConfig};
pub use memory::{formula_bytes, Memory};
pub use optim::Optimizer;
pub use plan::{ParamSpec, PlanConfig, ShardPlan};
pub use precision::{LossScale, ModelFloat};

use crate::comm::CommError;

/// What went wrong in a ZeRO engine.
#[derive(Debug, thiserror::Error)]
pub enum ZeroError {
    /// The plan cannot be built.
    #[error("shard plan: {what}")]
    Plan {
        /// What is wrong.
        what: String,
    },
    /// A call the engine cannot honour (wrong length, bucket order, stage).
    #[error("zero: {what}")]
    Input {
        /// What is wrong and what is expected.
        what: String,
    },
    /// A collective failed; the engine must be rebuilt.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A checkpoint cannot be written or read.
    #[error("checkpoint {path}: {what}")]
    Checkpoint {
        /// The file or directory.
        path: String,
        /// What is wrong.
        what: String,
    },
}
