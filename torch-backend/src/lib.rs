//! `ferrun._native`: the native half of `ferrun.torch`, the torch.distributed backend.
//!
//! The Python half (`python/ferrun/torch/`) subclasses `torch.distributed.ProcessGroup`,
//! checks and flattens tensors and hands this module plain memory: a data pointer, an element
//! count and a dtype code per buffer, with the tensor objects to keep alive. Each op is queued
//! on the group's own thread (collectives run in the order they were called, as on every rank)
//! and completes a `torch.futures.Future` from there, so Python never waits with the GIL held.
//!
//! # Layout
//! - [`store`]: joining a group through torch's store (any kind).
//! - [`tensor`]: buffers from pointers, and the dtype table.
//! - [`engine`]: where ops run: in order, on the group's thread or (small ones) the caller's.
//! - [`group`]: the `Group` class: bootstrap, every op, close.
//! - [`gpu_group`]: the `GpuGroup` class: CUDA tensors over NCCL, or staged through host memory.
//!
//! # Trust
//! The Python half is trusted to describe live, contiguous tensors (CPU ones to `Group`, CUDA
//! ones on the group's device to `GpuGroup`) (it holds them until
//! the op completes); this module still checks every count and pointer it can (non-null,
//! aligned, lengths that agree, buffers that overlap). Peers and the store are untrusted as
//! everywhere in `ferrun-collective`: what they send is validated there.

// Collectives run on tensors' memory in place: the only way is a slice over a raw pointer.
#![allow(unsafe_code)]

use pyo3::prelude::*;

mod engine;
mod gpu_group;
mod group;
mod store;
mod tensor;

/// The module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<group::Group>()?;
    m.add_class::<gpu_group::GpuGroup>()?;
    m.add("DTYPES", tensor::DTYPE_NAMES.to_vec())?;
    Ok(())
}
