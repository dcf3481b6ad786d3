//! The `GpuGroup` class: CUDA tensors of one torch process group through ferrun's GPU
//! communicator — NCCL when every rank has a GPU of its own, else staged through pinned host
//! memory ([`ferrun_collective::gpu`] decides, alike on every rank).
//!
//! Ops are synchronous: each returns (with the GIL released while it runs) once the result is
//! in the output tensor. The Python half synchronizes the tensors' stream first, so what torch
//! queued before the call is complete when the collective reads it.
//!
//! # Trust
//! As [`crate::group`]: the Python half describes live CUDA tensors on this group's device;
//! counts are checked against each other by the communicator before anything is enqueued.

use std::time::Duration;

use ferrun_collective::gpu::{Device, DeviceBuf, GpuCommunicator, GpuError, GpuPath};
use ferrun_collective::reduce::DType;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::group::reduce_op;
use crate::store::PyStore;

/// A CUDA buffer as the Python half passes it: `(data_ptr, numel)`.
type Buf = (u64, usize);

fn failed(e: GpuError) -> PyErr {
    match e {
        GpuError::Invalid { .. } => PyValueError::new_err(format!("ferrun: {e}")),
        _ => PyRuntimeError::new_err(format!("ferrun: {e}")),
    }
}

/// The buffer of a dtype code: an index of [`crate::tensor::DTYPE_NAMES`], whose order is
/// [`DType::ALL`]'s.
fn buf((ptr, count): Buf, dtype: usize) -> PyResult<DeviceBuf> {
    let dtype = *DType::ALL.get(dtype).ok_or_else(|| {
        PyValueError::new_err(format!("ferrun: dtype code {dtype} names no dtype"))
    })?;
    if ptr == 0 && count > 0 {
        return Err(PyValueError::new_err(format!(
            "ferrun: a CUDA tensor of {count} elements has no data"
        )));
    }
    // SAFETY: the Python half passes a live, contiguous CUDA tensor of `count` elements of
    // `dtype` on this group's device, and holds it until the call returns.
    Ok(unsafe { DeviceBuf::from_raw(ptr, count, dtype) })
}

/// One torch process group's GPU communicator.
#[pyclass(module = "ferrun._native", frozen)]
pub(crate) struct GpuGroup {
    comm: GpuCommunicator,
}

#[pymethods]
impl GpuGroup {
    /// Joins the group's GPU communicator on CUDA device `device`: every rank calls it with
    /// the same store (a prefix of its own).
    #[new]
    #[pyo3(signature = (store, rank, size, timeout_s, device, address=None))]
    fn new(
        py: Python<'_>,
        store: Py<PyAny>,
        rank: usize,
        size: usize,
        timeout_s: f64,
        device: usize,
        address: Option<(String, u16)>,
    ) -> PyResult<Self> {
        let deadline = Duration::try_from_secs_f64(timeout_s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                PyValueError::new_err(format!(
                    "ferrun: timeout of {timeout_s} s: give a positive one"
                ))
            })?;
        let mut store = PyStore {
            adapter: store,
            address,
        };
        // Before the host group is joined: a machine without the GPU fails at once, alone.
        let cannot = |e: String| {
            PyRuntimeError::new_err(format!(
                "ferrun: rank {rank} of {size} cannot join its GPU group on cuda:{device}: {e}"
            ))
        };
        let visible = Device::count().map_err(|e| cannot(e.to_string()))?;
        if device >= visible {
            return Err(cannot(format!("this process sees {visible} GPUs")));
        }
        let forced = std::env::var("FERRUN_GPU_PATH").ok();
        let comm = py
            .detach(|| {
                let host = crate::store::join(&mut store, rank, size, deadline, None)?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    .build()
                    .map_err(|e| format!("cannot start the bootstrap runtime: {e}"))?;
                runtime
                    .block_on(GpuCommunicator::join(
                        &mut store,
                        host,
                        device,
                        forced.as_deref(),
                        deadline.min(Duration::from_secs(600)),
                    ))
                    .map_err(|e| e.to_string())
            })
            .map_err(cannot)?;
        Ok(Self { comm })
    }

    /// `nccl` or `staged`.
    #[getter]
    fn path(&self) -> &'static str {
        match self.comm.path() {
            GpuPath::Nccl => "nccl",
            GpuPath::Staged => "staged",
        }
    }

    /// Why this path, and which NCCL.
    #[getter]
    fn describe(&self) -> String {
        self.comm.describe().to_owned()
    }

    /// Reduces `buf` in place across the group.
    fn all_reduce(&self, py: Python<'_>, buf: Buf, dtype: usize, op: &str) -> PyResult<()> {
        let (b, op) = (self::buf(buf, dtype)?, reduce_op(op)?);
        py.detach(|| self.comm.all_reduce(&b, op)).map_err(failed)
    }

    /// Copies `root`'s `buf` to every rank.
    fn broadcast(&self, py: Python<'_>, buf: Buf, dtype: usize, root: usize) -> PyResult<()> {
        let b = self::buf(buf, dtype)?;
        py.detach(|| self.comm.broadcast(&b, root)).map_err(failed)
    }

    /// Gathers every rank's `input` into `output` (`size` blocks).
    fn all_gather(&self, py: Python<'_>, input: Buf, output: Buf, dtype: usize) -> PyResult<()> {
        let (i, o) = (buf(input, dtype)?, buf(output, dtype)?);
        py.detach(|| self.comm.all_gather(&i, &o)).map_err(failed)
    }

    /// Reduces `input` (`size` blocks) and leaves block `rank` in `output`.
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        input: Buf,
        output: Buf,
        dtype: usize,
        op: &str,
    ) -> PyResult<()> {
        let (i, o, op) = (buf(input, dtype)?, buf(output, dtype)?, reduce_op(op)?);
        py.detach(|| self.comm.reduce_scatter(&i, &o, op))
            .map_err(failed)
    }

    /// Returns once every rank has called it.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.comm.barrier()).map_err(failed)
    }
}
