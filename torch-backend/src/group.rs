//! The `Group` class: one communicator per torch process group, bootstrapped through torch's
//! store, its ops queued on a thread of its own and completing torch futures from there.
//!
//! # Guarantees
//! - Ops run in the order they were called; each completes its future with its result (what
//!   the Python half passed: the output tensors) or a `RuntimeError` naming the failure — a
//!   peer that is gone, a peer that called something else — within the group's timeout.
//! - The GIL is taken only to complete a future; the collective runs without it.
//! - `close` runs what is queued, then releases the thread, the sockets and the shared memory.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ferrun_collective::comm::{CommError, Communicator};
use ferrun_collective::reduce::ReduceOp;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::engine::{Comm, Engine};
use crate::store::PyStore;
use crate::tensor::{with_element, Raw};

/// A buffer as the Python half passes it: `(data_ptr, numel)`.
type Buf = (usize, usize);

/// One torch process group's communicator.
#[pyclass(module = "ferrun._native", frozen)]
pub(crate) struct Group {
    /// Taken only briefly (never across an op, which may need the GIL to finish): an op holds
    /// its own reference, so `close` never waits on a running op with the GIL held.
    engine: Mutex<Option<Arc<Engine>>>,
    /// Collectives of at most this many bytes run on the caller's thread when nothing is queued.
    inline_bytes: usize,
    rank: usize,
    size: usize,
    transport: &'static str,
}

/// Collectives up to this size take a few µs on shared memory: running them on the caller's
/// thread when nothing is queued costs the caller nothing worth overlapping, and saves two
/// thread hand-overs (tens of µs).
const INLINE_BYTES: usize = 64 * 1024;

fn invalid(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("ferrun: {e}"))
}

pub(crate) fn reduce_op(name: &str) -> PyResult<ReduceOp> {
    Ok(match name {
        "sum" => ReduceOp::Sum,
        "product" => ReduceOp::Prod,
        "min" => ReduceOp::Min,
        "max" => ReduceOp::Max,
        "avg" => ReduceOp::Avg,
        other => {
            return Err(invalid(format!(
                "reduction {other:?} is not supported: use SUM, PRODUCT, MIN, MAX or AVG"
            )))
        }
    })
}

fn unknown_dtype(code: usize) -> PyErr {
    invalid(format!("dtype code {code} names no dtype"))
}

/// Completes `fut` with `result`, or with a RuntimeError naming `outcome`'s failure.
fn complete(fut: Py<PyAny>, result: Py<PyAny>, outcome: Result<(), CommError>) {
    Python::attach(|py| {
        let done = match outcome {
            Ok(()) => fut.call_method1(py, "set_result", (&result,)),
            Err(e) => {
                let error = PyRuntimeError::new_err(format!("ferrun: {e}"));
                fut.call_method1(py, "set_exception", (error.into_value(py),))
            }
        };
        // A callback chained on the future raised: torch keeps it in the chained future;
        // anything else is a bug worth seeing.
        if let Err(e) = done {
            e.print(py);
        }
        drop((fut, result));
    });
}

impl Group {
    fn engine(&self) -> MutexGuard<'_, Option<Arc<Engine>>> {
        self.engine
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `job` after everything called before it; `fut` completes when it has. A collective
    /// of `bytes` (`None`: not a collective) at most `inline_bytes` runs at once on this
    /// thread when nothing is queued, without the GIL.
    fn run(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        bytes: Option<usize>,
        job: impl FnOnce(&Comm) -> Result<(), CommError> + Send + 'static,
    ) -> PyResult<()> {
        let Some(engine) = self.engine().clone() else {
            return Err(PyRuntimeError::new_err(
                "ferrun: this process group was destroyed; create a new one with init_process_group or new_group",
            ));
        };
        let job = match bytes {
            Some(b) if b <= self.inline_bytes => {
                let ran = py.detach(|| engine.run_if_idle(job));
                match ran {
                    Ok(outcome) => {
                        complete(fut, result, outcome);
                        release(py, engine);
                        return Ok(());
                    }
                    Err(job) => job,
                }
            }
            _ => job,
        };
        engine.submit(Box::new(move |c| complete(fut, result, job(c))));
        release(py, engine);
        Ok(())
    }
}

/// Drops an op's reference to the engine. The last one (the group was closed while the op
/// ran) joins the engine's thread, whose queued ops need the GIL: it lets go of it first. The
/// count cannot change under this check: every other holder takes and drops its reference
/// holding the GIL, as this caller does.
fn release(py: Python<'_>, engine: Arc<Engine>) {
    if Arc::strong_count(&engine) == 1 {
        py.detach(move || drop(engine));
    }
}

impl Drop for Group {
    /// As `close`: a group dropped with ops queued lets them complete, without the GIL (their
    /// futures need it).
    fn drop(&mut self) {
        if let Some(engine) = self.engine().take() {
            Python::attach(|py| py.detach(move || drop(engine)));
        }
    }
}

#[pymethods]
impl Group {
    /// Joins the group: every rank calls it with the same store.
    #[new]
    #[pyo3(signature = (store, rank, size, timeout_s, address=None, witness_prefix=None))]
    fn new(
        py: Python<'_>,
        store: Py<PyAny>,
        rank: usize,
        size: usize,
        timeout_s: f64,
        address: Option<(String, u16)>,
        witness_prefix: Option<String>,
    ) -> PyResult<Self> {
        if size == 0 || rank >= size {
            return Err(invalid(format!("rank {rank} is not in a group of {size}")));
        }
        let deadline = Duration::try_from_secs_f64(timeout_s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(format!("timeout of {timeout_s} s: give a positive one")))?;
        let mut store = PyStore {
            adapter: store,
            address,
        };
        let comm = py
            .detach(|| crate::store::join(&mut store, rank, size, deadline, witness_prefix))
            .map_err(|e| {
                PyRuntimeError::new_err(format!(
                    "ferrun: rank {rank} of {size} cannot join its group: {e}"
                ))
            })?;
        let transport = comm.transport().kind();
        let engine = Engine::new(comm).map_err(|e| {
            PyRuntimeError::new_err(format!("ferrun: cannot start the group's thread: {e}"))
        })?;
        // For measuring the cost of the thread hand-overs (0: every op goes through the thread).
        let inline_bytes = std::env::var("FERRUN_TORCH_INLINE_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(INLINE_BYTES);
        Ok(Self {
            engine: Mutex::new(Some(Arc::new(engine))),
            inline_bytes,
            rank,
            size,
            transport,
        })
    }

    /// This rank.
    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }

    /// The group's size.
    #[getter]
    fn size(&self) -> usize {
        self.size
    }

    /// How this rank reaches its peers: `shm`, `tcp` or `shm+tcp`.
    #[getter]
    fn transport(&self) -> &'static str {
        self.transport
    }

    /// Runs what is queued, then releases the thread, sockets and shared memory.
    fn close(&self, py: Python<'_>) {
        let engine = self.engine().take();
        // Queued ops complete their futures, which takes the GIL: let go of it.
        py.detach(move || drop(engine));
    }

    /// Reduces each buffer in place, one after the other.
    fn all_reduce(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        bufs: Vec<Buf>,
        dtype: usize,
        op: &str,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        with_element!(dtype, E => {
            let raws = bufs.into_iter().map(|b| Raw::new::<E>("all_reduce", b)).collect::<Result<Vec<_>, _>>().map_err(invalid)?;
            let bytes = raws.iter().map(|r| r.len() * std::mem::size_of::<E>()).sum();
            self.run(py, fut, result, Some(bytes), move |c| {
                for raw in raws {
                    // SAFETY: the Python half keeps the tensor alive in `result`; one slice at a time.
                    c.all_reduce(unsafe { raw.slice::<E>() }, op)?;
                }
                Ok(())
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Broadcasts `buf` from `root`.
    fn broadcast(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        buf: Buf,
        dtype: usize,
        root: usize,
    ) -> PyResult<()> {
        with_element!(dtype, E => {
            let raw = Raw::new::<E>("broadcast", buf).map_err(invalid)?;
            // SAFETY: as in `all_reduce`.
            self.run(py, fut, result, Some(raw.len() * std::mem::size_of::<E>()), move |c| c.broadcast(unsafe { raw.slice::<E>() }, root))
        }, else Err(unknown_dtype(dtype)))
    }

    /// Reduces `buf` into `root`'s.
    #[allow(clippy::too_many_arguments)]
    fn reduce(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        buf: Buf,
        dtype: usize,
        op: &str,
        root: usize,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        with_element!(dtype, E => {
            let raw = Raw::new::<E>("reduce", buf).map_err(invalid)?;
            // SAFETY: as in `all_reduce`.
            self.run(py, fut, result, Some(raw.len() * std::mem::size_of::<E>()), move |c| c.reduce(unsafe { raw.slice::<E>() }, op, root))
        }, else Err(unknown_dtype(dtype)))
    }

    /// Gathers every rank's `input` into `output` (`size` blocks); `input` may be block `rank`
    /// of `output` (in place) or anywhere else.
    fn all_gather(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        input: Buf,
        output: Buf,
        dtype: usize,
    ) -> PyResult<()> {
        let (rank, size) = (self.rank, self.size);
        with_element!(dtype, E => {
            let input = Raw::new::<E>("all_gather input", input).map_err(invalid)?;
            let output = Raw::new::<E>("all_gather output", output).map_err(invalid)?;
            expect_len("all_gather output", output.len(), size, input.len())?;
            self.run(py, fut, result, Some(output.len() * std::mem::size_of::<E>()), move |c| {
                // SAFETY: as in `all_reduce`; overlapping buffers are never sliced together.
                let out = unsafe { output.slice::<E>() };
                if input.overlaps::<E>(&output) {
                    if input.offset_in::<E>(&output) != Some(rank * input.len()) {
                        let mine = unsafe { input.slice::<E>() }.to_vec();
                        out[rank * mine.len()..(rank + 1) * mine.len()].copy_from_slice(&mine);
                    }
                    c.all_gather_in_place(out)
                } else {
                    c.all_gather(unsafe { input.slice::<E>() }, out)
                }
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Reduces `input` (`size` blocks) and leaves block `rank` in `output`.
    #[allow(clippy::too_many_arguments)]
    fn reduce_scatter(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        input: Buf,
        output: Buf,
        dtype: usize,
        op: &str,
    ) -> PyResult<()> {
        let op = reduce_op(op)?;
        let size = self.size;
        with_element!(dtype, E => {
            let input = Raw::new::<E>("reduce_scatter input", input).map_err(invalid)?;
            let output = Raw::new::<E>("reduce_scatter output", output).map_err(invalid)?;
            expect_len("reduce_scatter input", input.len(), size, output.len())?;
            self.run(py, fut, result, Some(input.len() * std::mem::size_of::<E>()), move |c| {
                // SAFETY: as in `all_gather`; the input is read through a copy when they overlap.
                if input.overlaps::<E>(&output) {
                    let copy = unsafe { input.slice::<E>() }.to_vec();
                    c.reduce_scatter(&copy, unsafe { output.slice::<E>() }, op)
                } else {
                    c.reduce_scatter(unsafe { input.slice::<E>() }, unsafe { output.slice::<E>() }, op)
                }
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Block exchange: equal blocks without counts, else `send_counts[j]` elements to rank `j`
    /// and `recv_counts[i]` from rank `i`.
    #[pyo3(signature = (fut, result, input, output, dtype, send_counts=None, recv_counts=None))]
    #[allow(clippy::too_many_arguments)]
    fn all_to_all(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        input: Buf,
        output: Buf,
        dtype: usize,
        send_counts: Option<Vec<usize>>,
        recv_counts: Option<Vec<usize>>,
    ) -> PyResult<()> {
        with_element!(dtype, E => {
            let input = Raw::new::<E>("all_to_all input", input).map_err(invalid)?;
            let output = Raw::new::<E>("all_to_all output", output).map_err(invalid)?;
            self.run(py, fut, result, Some(input.len().max(output.len()) * std::mem::size_of::<E>()), move |c| {
                // SAFETY: as in `reduce_scatter`.
                let copy;
                let send: &[E] = if input.overlaps::<E>(&output) {
                    copy = unsafe { input.slice::<E>() }.to_vec();
                    &copy
                } else {
                    unsafe { input.slice::<E>() }
                };
                let out = unsafe { output.slice::<E>() };
                match (send_counts, recv_counts) {
                    (Some(s), Some(r)) => c.all_to_all_v(send, &s, out, &r),
                    _ => c.all_to_all(send, out),
                }
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Gathers every rank's `input` into `root`'s `output` (`None` elsewhere).
    #[allow(clippy::too_many_arguments)]
    fn gather(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        input: Buf,
        output: Option<Buf>,
        dtype: usize,
        root: usize,
    ) -> PyResult<()> {
        with_element!(dtype, E => {
            let input = Raw::new::<E>("gather input", input).map_err(invalid)?;
            let output = output.map(|o| Raw::new::<E>("gather output", o)).transpose().map_err(invalid)?;
            self.run(py, fut, result, Some(input.len() * self.size * std::mem::size_of::<E>()), move |c| {
                // SAFETY: as in `reduce_scatter`.
                let mine = unsafe { input.slice::<E>() }.to_vec();
                c.gather(&mine, output.map(|o| unsafe { o.slice::<E>() }), root)
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Scatters `root`'s `input` (`None` elsewhere) into every rank's `output`.
    #[allow(clippy::too_many_arguments)]
    fn scatter(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        input: Option<Buf>,
        output: Buf,
        dtype: usize,
        root: usize,
    ) -> PyResult<()> {
        with_element!(dtype, E => {
            let input = input.map(|i| Raw::new::<E>("scatter input", i)).transpose().map_err(invalid)?;
            let output = Raw::new::<E>("scatter output", output).map_err(invalid)?;
            self.run(py, fut, result, Some(output.len() * self.size * std::mem::size_of::<E>()), move |c| {
                // SAFETY: as in `reduce_scatter`.
                let all = input.map(|i| unsafe { i.slice::<E>() }.to_vec());
                c.scatter(all.as_deref(), unsafe { output.slice::<E>() }, root)
            })
        }, else Err(unknown_dtype(dtype)))
    }

    /// Returns (through the future) once every rank has called it.
    fn barrier(&self, py: Python<'_>, fut: Py<PyAny>, result: Py<PyAny>) -> PyResult<()> {
        self.run(py, fut, result, Some(0), Communicator::barrier)
    }

    /// Sends `buf` to `peer` under `tag`.
    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        buf: Buf,
        dtype: usize,
        peer: usize,
        tag: u32,
    ) -> PyResult<()> {
        self.p2p(py, fut, result, (buf, dtype), peer, tag, true)
    }

    /// Receives into `buf` what `peer` sent under `tag`.
    #[allow(clippy::too_many_arguments)]
    fn recv(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        buf: Buf,
        dtype: usize,
        peer: usize,
        tag: u32,
    ) -> PyResult<()> {
        self.p2p(py, fut, result, (buf, dtype), peer, tag, false)
    }
}

impl Group {
    /// `send` (or, with `sending` false, `recv`): never on the caller's thread, which a
    /// receive could block until the peer sends.
    #[allow(clippy::too_many_arguments)]
    fn p2p(
        &self,
        py: Python<'_>,
        fut: Py<PyAny>,
        result: Py<PyAny>,
        (buf, dtype): (Buf, usize),
        peer: usize,
        tag: u32,
        sending: bool,
    ) -> PyResult<()> {
        let what = if sending { "send" } else { "recv" };
        with_element!(dtype, E => {
            let raw = Raw::new::<E>(what, buf).map_err(invalid)?;
            self.run(py, fut, result, None, move |c| {
                // SAFETY: as in `all_reduce`.
                let buf = unsafe { raw.slice::<E>() };
                if sending { c.send(buf, peer, tag) } else { c.recv(buf, peer, tag) }
            })
        }, else Err(unknown_dtype(dtype)))
    }
}

fn expect_len(what: &str, len: usize, size: usize, block: usize) -> PyResult<()> {
    if Some(len) == size.checked_mul(block) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{what} holds {len} elements; it must hold world size × {block} = {}",
            size.saturating_mul(block)
        )))
    }
}
