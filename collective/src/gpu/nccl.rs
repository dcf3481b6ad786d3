//! The NCCL path: one `ncclComm_t` per communicator, ops enqueued on the device's stream and
//! waited for under the [`watchdog`](super::watchdog).
//!
//! # Trust
//! Peers reach this rank only through NCCL (after the unique id, checked by
//! [`super::unique_id`]); every op's lengths are checked here, and its call fingerprinted
//! across ranks, before NCCL sees it.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::device::Device;
use super::library::{CommHandle, Nccl, UniqueId};
use super::watchdog::{self, Poll, Verdict};
use super::{DeviceBuf, GpuError};
use crate::reduce::{DType, ReduceOp};

/// NCCL's code for `dtype`, if it has one (every NCCL ≥ 2.10 numbers them alike).
pub(super) fn nccl_dtype(dtype: DType) -> Option<c_int> {
    Some(match dtype {
        DType::I8 => 0,
        DType::U8 => 1,
        DType::I32 => 2,
        DType::I64 => 4,
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        DType::Bf16 => 9,
        DType::I16 => return None,
    })
}

fn nccl_op(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Avg => 4,
    }
}

/// The communicator's handle, and why it is gone once it is.
struct State {
    comm: CommHandle,
    broken: Option<String>,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time (the mutex).
unsafe impl Send for State {}

/// An NCCL communicator of `size` ranks on one device each.
pub(super) struct NcclComm {
    lib: &'static Nccl,
    device: Arc<Device>,
    state: Mutex<State>,
    rank: usize,
    size: usize,
    deadline: Duration,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, {:?})",
            self.rank, self.size, self.lib
        )
    }
}

/// A raw pointer that may cross to the init thread.
struct SendHandle(CommHandle);
// SAFETY: a fresh communicator handed from the thread that made it to its owner.
unsafe impl Send for SendHandle {}

impl NcclComm {
    /// Joins the NCCL communicator of `id`, within `deadline` (`ncclCommInitRank` blocks until
    /// every rank joins; a rank that never comes is an error here, not a hang).
    pub(super) fn init(
        lib: &'static Nccl,
        device: Arc<Device>,
        id: [u8; super::unique_id::ID_BYTES],
        rank: usize,
        size: usize,
        deadline: Duration,
    ) -> Result<Self, GpuError> {
        let (tx, rx) = mpsc::channel();
        let joiner = device.clone();
        std::thread::Builder::new()
            .name("ferrun-nccl-init".into())
            .spawn(move || {
                let made = joiner.bind().map(|()| {
                    let mut comm: CommHandle = std::ptr::null_mut();
                    // SAFETY: writes one handle; id and ranks as NCCL documents them.
                    let code = unsafe {
                        (lib.comm_init_rank)(&mut comm, size as c_int, UniqueId(id), rank as c_int)
                    };
                    (code, SendHandle(comm))
                });
                let _ = tx.send(made);
            })
            .map_err(|e| GpuError::Invalid {
                op: "init",
                what: format!("cannot start NCCL's init thread: {e}"),
            })?;
        let (code, comm) = match rx.recv_timeout(deadline) {
            Ok(made) => made?,
            // The thread stays blocked in NCCL; nothing else can end it.
            Err(_) => {
                return Err(GpuError::Timeout {
                    op: "ncclCommInitRank",
                    rank,
                    after: deadline,
                })
            }
        };
        if code != 0 {
            return Err(GpuError::Nccl {
                op: "ncclCommInitRank",
                rank,
                code,
                message: lib.describe(code, std::ptr::null_mut()),
            });
        }
        Ok(Self {
            lib,
            device,
            state: Mutex::new(State {
                comm: comm.0,
                broken: None,
            }),
            rank,
            size,
            deadline,
        })
    }

    fn dtype(op: &'static str, dtype: DType) -> Result<c_int, GpuError> {
        nccl_dtype(dtype).ok_or(GpuError::Invalid {
            op,
            what: format!(
                "NCCL has no {dtype:?}; convert the tensor, or set FERRUN_GPU_PATH=staged"
            ),
        })
    }

    /// Enqueues what `enqueue` calls on the stream, then waits for it under the deadline.
    fn run(
        &self,
        op: &'static str,
        enqueue: impl FnOnce(&Nccl, CommHandle, *mut c_void) -> c_int,
    ) -> Result<(), GpuError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(first) = &state.broken {
            return Err(GpuError::Broken {
                op,
                rank: self.rank,
                first: first.clone(),
            });
        }
        self.device.bind()?;
        let code = enqueue(self.lib, state.comm, self.device.stream().cast());
        if code != watchdog::NCCL_SUCCESS && code != watchdog::NCCL_IN_PROGRESS {
            return Err(self.abort(&mut state, op, code));
        }
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            let mut async_error = 0;
            // SAFETY: a live communicator (not broken); writes one int.
            unsafe { (self.lib.comm_get_async_error)(state.comm, &mut async_error) };
            let poll = Poll {
                elapsed: started.elapsed(),
                stream_done: self.device.stream_done()?,
                async_error,
                polls,
            };
            match watchdog::judge(poll, self.deadline) {
                Verdict::Done => return Ok(()),
                Verdict::Failed(code) => return Err(self.abort(&mut state, op, code)),
                Verdict::TimedOut => {
                    let err = GpuError::Timeout {
                        op,
                        rank: self.rank,
                        after: self.deadline,
                    };
                    self.abort_with(&mut state, err.to_string());
                    return Err(err);
                }
                Verdict::Wait(pause) if pause.is_zero() => std::thread::yield_now(),
                Verdict::Wait(pause) => std::thread::sleep(pause),
            }
            polls = polls.saturating_add(1);
        }
    }

    fn abort(&self, state: &mut State, op: &'static str, code: c_int) -> GpuError {
        let err = GpuError::Nccl {
            op,
            rank: self.rank,
            code,
            message: self.lib.describe(code, state.comm),
        };
        self.abort_with(state, err.to_string());
        err
    }

    /// Aborts the communicator: its queued and running ops end, here and (as their links
    /// drop) on the peers.
    fn abort_with(&self, state: &mut State, cause: String) {
        tracing::error!("aborting the NCCL communicator: {cause}");
        // SAFETY: a live communicator, aborted once (then forgotten).
        unsafe { (self.lib.comm_abort)(state.comm) };
        state.comm = std::ptr::null_mut();
        state.broken = Some(cause);
    }

    pub(super) fn all_reduce(&self, buf: &DeviceBuf, op: ReduceOp) -> Result<(), GpuError> {
        let dtype = Self::dtype("all_reduce", buf.dtype())?;
        self.run("all_reduce", |lib, comm, stream| unsafe {
            // SAFETY: in place on the caller's buffer (DeviceBuf's contract).
            let p = buf.ptr() as *mut c_void;
            (lib.all_reduce)(p, p, buf.count(), dtype, nccl_op(op), comm, stream)
        })
    }

    pub(super) fn broadcast(&self, buf: &DeviceBuf, root: usize) -> Result<(), GpuError> {
        let dtype = Self::dtype("broadcast", buf.dtype())?;
        self.run("broadcast", |lib, comm, stream| unsafe {
            // SAFETY: as all_reduce.
            let p = buf.ptr() as *mut c_void;
            (lib.broadcast)(p, p, buf.count(), dtype, root as c_int, comm, stream)
        })
    }

    pub(super) fn reduce(
        &self,
        buf: &DeviceBuf,
        op: ReduceOp,
        root: usize,
    ) -> Result<(), GpuError> {
        let dtype = Self::dtype("reduce", buf.dtype())?;
        self.run("reduce", |lib, comm, stream| unsafe {
            // SAFETY: as all_reduce.
            let p = buf.ptr() as *mut c_void;
            (lib.reduce)(
                p,
                p,
                buf.count(),
                dtype,
                nccl_op(op),
                root as c_int,
                comm,
                stream,
            )
        })
    }

    pub(super) fn all_gather(&self, input: &DeviceBuf, output: &DeviceBuf) -> Result<(), GpuError> {
        let dtype = Self::dtype("all_gather", input.dtype())?;
        self.run("all_gather", |lib, comm, stream| unsafe {
            // SAFETY: lengths checked by the caller (output = size × input).
            (lib.all_gather)(
                input.ptr() as *const c_void,
                output.ptr() as *mut c_void,
                input.count(),
                dtype,
                comm,
                stream,
            )
        })
    }

    pub(super) fn reduce_scatter(
        &self,
        input: &DeviceBuf,
        output: &DeviceBuf,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        let dtype = Self::dtype("reduce_scatter", input.dtype())?;
        self.run("reduce_scatter", |lib, comm, stream| unsafe {
            // SAFETY: lengths checked by the caller (input = size × output).
            (lib.reduce_scatter)(
                input.ptr() as *const c_void,
                output.ptr() as *mut c_void,
                output.count(),
                dtype,
                nccl_op(op),
                comm,
                stream,
            )
        })
    }

    /// Grouped send/recv (NCCL has no all-to-all of its own).
    pub(super) fn all_to_all(&self, input: &DeviceBuf, output: &DeviceBuf) -> Result<(), GpuError> {
        let dtype = Self::dtype("all_to_all", input.dtype())?;
        let m = input.count() / self.size;
        self.run("all_to_all", |lib, comm, stream| unsafe {
            // SAFETY: blocks of `m` elements inside the checked buffers.
            let mut code = (lib.group_start)();
            for peer in 0..self.size {
                if code != 0 {
                    break;
                }
                let (to, from) = (input.slice(peer * m, m), output.slice(peer * m, m));
                code = (lib.send)(
                    to.ptr() as *mut c_void,
                    m,
                    dtype,
                    peer as c_int,
                    comm,
                    stream,
                );
                if code == 0 {
                    code = (lib.recv)(
                        from.ptr() as *mut c_void,
                        m,
                        dtype,
                        peer as c_int,
                        comm,
                        stream,
                    );
                }
            }
            let end = (lib.group_end)();
            if code != 0 {
                code
            } else {
                end
            }
        })
    }

    pub(super) fn send(&self, buf: &DeviceBuf, peer: usize) -> Result<(), GpuError> {
        let dtype = Self::dtype("send", buf.dtype())?;
        self.run("send", |lib, comm, stream| unsafe {
            // SAFETY: the caller's buffer.
            (lib.send)(
                buf.ptr() as *mut c_void,
                buf.count(),
                dtype,
                peer as c_int,
                comm,
                stream,
            )
        })
    }

    pub(super) fn recv(&self, buf: &DeviceBuf, peer: usize) -> Result<(), GpuError> {
        let dtype = Self::dtype("recv", buf.dtype())?;
        self.run("recv", |lib, comm, stream| unsafe {
            // SAFETY: the caller's buffer.
            (lib.recv)(
                buf.ptr() as *mut c_void,
                buf.count(),
                dtype,
                peer as c_int,
                comm,
                stream,
            )
        })
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let state = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !state.comm.is_null() && self.device.bind().is_ok() {
            // SAFETY: a live communicator with nothing queued (every op waited), destroyed once.
            unsafe { (self.lib.comm_destroy)(state.comm) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_but_int16_has_an_nccl_code_and_codes_are_distinct() {
        let all = [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::Bf16,
            DType::I32,
            DType::I64,
            DType::U8,
            DType::I8,
        ];
        let mut codes: Vec<c_int> = all.iter().filter_map(|d| nccl_dtype(*d)).collect();
        assert_eq!(codes.len(), all.len());
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(nccl_dtype(DType::I16), None);
        assert_eq!(nccl_op(ReduceOp::Avg), 4);
    }
}
