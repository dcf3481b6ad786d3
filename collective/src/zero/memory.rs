//! What an engine holds, and what ZeRO's paper says it should.

use crate::transport::Transport;

use super::engine::{Stage, Zero};
use super::precision::ModelFloat;

/// Bytes an engine holds now, by kind (its buffers' capacities).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Memory {
    /// Model parameters (whole at stages 0–2, this rank's shard at stage 3; gathered buckets
    /// live at this moment included).
    pub params: usize,
    /// Gradients kept between steps (whole at stages 0–1, this rank's chunks at 2–3).
    pub grads: usize,
    /// f32 master weights and optimizer state.
    pub optim: usize,
    /// Bucket buffers kept for reuse (gathered parameters, gradients being reduced).
    pub buffers: usize,
}

impl Memory {
    /// All of it.
    pub fn total(&self) -> usize {
        self.params + self.grads + self.optim + self.buffers
    }
}

/// Bytes per rank that ZeRO's accounting gives (Rajbhandari et al., §5; activations and
/// buffers excluded) for `numel` parameters of `dtype_bytes` bytes, an optimizer of
/// `state_slots` f32 buffers, and f32 master weights unless the model is f32 itself.
/// Mixed-precision Adam (2-byte model, 2 slots) gives 16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N, 16Ψ/N.
pub fn formula_bytes(
    stage: Stage,
    numel: usize,
    dtype_bytes: usize,
    state_slots: usize,
    world: usize,
) -> f64 {
    let psi = numel as f64;
    let n = world as f64;
    let p = dtype_bytes as f64;
    let k = 4.0 * state_slots as f64 + if dtype_bytes == 4 { 0.0 } else { 4.0 };
    match stage {
        Stage::Replicated => (p + p + k) * psi,
        Stage::Optimizer => (p + p) * psi + k * psi / n,
        Stage::Gradients => p * psi + (p + k) * psi / n,
        Stage::Parameters => (p + p + k) * psi / n,
    }
}

impl<E: ModelFloat, T: Transport + 'static> Zero<E, T> {
    /// The bytes this engine holds now, by kind.
    pub fn memory(&self) -> Memory {
        let e = std::mem::size_of::<E>();
        let live: usize = self.live.iter().map(super::engine::Live::capacity).sum();
        Memory {
            params: (self.params.capacity() + live) * e,
            grads: (self
                .kept
                .iter()
                .chain(&self.grad_shard)
                .map(Vec::capacity)
                .sum::<usize>())
                * e,
            optim: (self.master.capacity() + self.state.iter().map(Vec::capacity).sum::<usize>())
                * 4,
            buffers: self.pool.capacity() * e,
        }
    }
}
