//! Collectives on GPU buffers, behind the same calls as the CPU [`Communicator`]: NCCL when
//! every rank has it and a GPU of its own, else staged through pinned host memory over the CPU
//! transports ([`placement`]). Built with the `nccl` feature; CUDA and NCCL are loaded at run
//! time, so the build needs neither, and a machine without them gets a [`GpuError`] naming
//! what is missing — never a panic from a loader.
//!
//! # Guarantees (as on CPU)
//! - No wait is unbounded: a [`watchdog`] polls every NCCL op and aborts the communicator past
//!   the op's deadline or on an NCCL error, so a dead peer is an error on every rank (their
//!   ops fail once the communicator of the rank that gave up is gone).
//! - Ranks that call different collectives get an error naming both calls ([`fingerprint`]),
//!   checked before NCCL sees the op.
//! - After a failure the communicator refuses every op, naming the first failure: it must be
//!   rebuilt (`ncclCommAbort` leaves nothing to reuse).
//!
//! # Layout
//! - [`locate`]: where `libnccl.so.2` is (pip's wheels, Debian, an NCCL torch already loaded).
//! - [`placement`]: NCCL or staged, decided alike on every rank.
//! - [`unique_id`]: the `ncclUniqueId` from rank 0 through the agent store.
//! - [`watchdog`]: an op's deadline, judged from polls.
//! - [`fingerprint`]: mismatch detection before each op.
//! - `library`, `device`, `nccl`, `staged`, `communicator` (with the feature): NCCL's symbols,
//!   the CUDA device and memory, and the two paths.
//!
//! # Trust
//! A [`DeviceBuf`] is the caller's promise (it is made by an `unsafe` constructor, or from a
//! [`DeviceMemory`] this module allocated); lengths are checked against each other before any
//! op is enqueued. What peers send is covered by each module's own notes.
//!
//! [`Communicator`]: crate::comm::Communicator

use std::time::Duration;

use crate::comm::{CommError, InitError};
use crate::reduce::DType;
use crate::store::StoreError;

pub mod fingerprint;
pub mod locate;
pub mod placement;
pub mod unique_id;
pub mod watchdog;

#[cfg(feature = "nccl")]
mod communicator;
#[cfg(feature = "nccl")]
mod device;
#[cfg(feature = "nccl")]
mod library;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(feature = "nccl")]
mod staged;

#[cfg(feature = "nccl")]
pub use communicator::GpuCommunicator;
#[cfg(feature = "nccl")]
pub use device::{Device, DeviceMemory};
#[cfg(feature = "nccl")]
pub use library::{nccl_version, Nccl};
pub use placement::GpuPath;

#[cfg(not(feature = "nccl"))]
mod disabled;
#[cfg(not(feature = "nccl"))]
pub use disabled::{Device, DeviceMemory, GpuCommunicator};

/// Why a GPU collective or communicator failed.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// This build has no GPU support.
    #[error("this build of ferrun has no GPU collectives: rebuild with `--features nccl` (cargo build --release --features ferrun-collective/nccl)")]
    NotBuilt,
    /// The CUDA driver library is missing.
    #[error("no CUDA driver: libcuda.so.1 cannot be loaded (is the NVIDIA driver installed, and the container started with GPUs?); run on CPU tensors, or on a GPU machine")]
    NoCuda,
    /// The CUDA driver failed.
    #[error("CUDA {what}: {message}")]
    Cuda {
        /// The call.
        what: &'static str,
        /// The driver's words.
        message: String,
    },
    /// There is no such GPU.
    #[error("no GPU {ordinal}: this process sees {count} (CUDA_VISIBLE_DEVICES={visible:?}); use CPU tensors, or give the job GPUs")]
    NoDevice {
        /// The device asked for.
        ordinal: usize,
        /// The devices visible.
        count: usize,
        /// `CUDA_VISIBLE_DEVICES`, if set.
        visible: Option<String>,
    },
    /// NCCL cannot be loaded.
    #[error("no NCCL: {0}")]
    NoNccl(String),
    /// NCCL failed.
    #[error(
        "{op} on rank {rank}: NCCL error {code} ({message}); this communicator must be rebuilt"
    )]
    Nccl {
        /// The call.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// NCCL's result code.
        code: i32,
        /// NCCL's words (`ncclGetErrorString` and `ncclGetLastError`).
        message: String,
    },
    /// An op outlived its deadline; the communicator was aborted.
    #[error("{op} on rank {rank} did not complete within {after:?} (a peer is gone or stuck?); the communicator was aborted and must be rebuilt")]
    Timeout {
        /// The call.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// The deadline.
        after: Duration,
    },
    /// An earlier failure broke the communicator.
    #[error("{op} on rank {rank}: this communicator was aborted after an earlier failure ({first}); rebuild it")]
    Broken {
        /// The call.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// The first failure.
        first: String,
    },
    /// The arguments cannot work (caught before anything is enqueued).
    #[error("{op}: {what}")]
    Invalid {
        /// The call.
        op: &'static str,
        /// What is wrong and what is expected.
        what: String,
    },
    /// The ranks called different collectives.
    #[error("{op} on rank {rank}: {what}")]
    Mismatch {
        /// The call.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// Both calls.
        what: String,
    },
    /// The value of the unique-id key is not an `ncclUniqueId`.
    #[error("the store's {key:?} holds {len} bytes, not an ncclUniqueId's 128: another job or an older ferrun shares this store? use a fresh --rdzv-id")]
    BadUniqueId {
        /// The key.
        key: &'static str,
        /// What it held.
        len: usize,
    },
    /// The ranks could not agree on a path.
    #[error("{0}")]
    Placement(String),
    /// The host side of a collective failed.
    #[error(transparent)]
    Host(#[from] CommError),
    /// The host communicator could not be created.
    #[error(transparent)]
    Init(#[from] InitError),
    /// The agent store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Device memory a collective reads or writes: an address on the communicator's GPU, an
/// element count and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceBuf {
    ptr: u64,
    count: usize,
    dtype: DType,
}

impl DeviceBuf {
    /// A buffer at device address `ptr`.
    ///
    /// # Safety
    /// `ptr` must address `count` elements of `dtype` on the communicator's GPU, kept alive and
    /// not written by other work until the op that takes it returns.
    #[allow(unsafe_code)]
    pub unsafe fn from_raw(ptr: u64, count: usize, dtype: DType) -> Self {
        Self { ptr, count, dtype }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements.
    pub fn count(&self) -> usize {
        self.count
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes.
    pub fn bytes(&self) -> usize {
        self.count * self.dtype.size()
    }

    /// Elements `[start, start + count)` (checked by the caller).
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    fn slice(&self, start: usize, count: usize) -> Self {
        Self {
            ptr: self.ptr + (start * self.dtype.size()) as u64,
            count,
            dtype: self.dtype,
        }
    }
}

/// Checks that `input` and `output` have one dtype and the gathered side holds `size` × the
/// other.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
fn check_lengths(
    op: &'static str,
    input: &DeviceBuf,
    output: &DeviceBuf,
    size: usize,
    gathered_output: bool,
) -> Result<(), GpuError> {
    if input.dtype != output.dtype {
        return Err(GpuError::Invalid {
            op,
            what: format!(
                "input is {:?} and output {:?}: they must have one dtype",
                input.dtype, output.dtype
            ),
        });
    }
    let (small, large, names) = if gathered_output {
        (input, output, "output must hold size × input")
    } else {
        (output, input, "input must hold size × output")
    };
    if small.count.checked_mul(size) != Some(large.count) {
        return Err(GpuError::Invalid {
            op,
            what: format!(
                "input holds {} and output {} elements; {names} ({size} ranks)",
                input.count, output.count
            ),
        });
    }
    Ok(())
}

/// The device this rank uses: `FERRUN_CUDA_DEVICE` if set, else its local rank modulo the
/// GPUs it sees (one GPU per rank when there are enough, several ranks on one GPU otherwise).
pub fn device_ordinal(local_rank: usize, visible: usize) -> Result<usize, GpuError> {
    match std::env::var("FERRUN_CUDA_DEVICE") {
        Ok(v) => v.trim().parse().map_err(|_| GpuError::Invalid {
            op: "init",
            what: format!("FERRUN_CUDA_DEVICE={v:?} is not a device number"),
        }),
        Err(_) if visible == 0 => Err(GpuError::NoDevice {
            ordinal: 0,
            count: 0,
            visible: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }),
        Err(_) => Ok(local_rank % visible),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn buf(count: usize, dtype: DType) -> DeviceBuf {
        // SAFETY: never handed to a device; the checks only read the fields.
        unsafe { DeviceBuf::from_raw(0x1000, count, dtype) }
    }

    #[test]
    fn gathers_and_scatters_check_lengths_and_dtypes() {
        assert!(check_lengths(
            "all_gather",
            &buf(4, DType::F32),
            &buf(12, DType::F32),
            3,
            true
        )
        .is_ok());
        let err = check_lengths(
            "all_gather",
            &buf(4, DType::F32),
            &buf(8, DType::F32),
            3,
            true,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("output must hold size × input"),
            "{err}"
        );
        assert!(check_lengths(
            "reduce_scatter",
            &buf(12, DType::F16),
            &buf(4, DType::F16),
            3,
            false
        )
        .is_ok());
        let err = check_lengths(
            "reduce_scatter",
            &buf(12, DType::F16),
            &buf(4, DType::Bf16),
            3,
            false,
        )
        .unwrap_err();
        assert!(err.to_string().contains("one dtype"), "{err}");
        let huge = buf(usize::MAX, DType::U8);
        assert!(check_lengths("all_gather", &huge, &buf(1, DType::U8), 2, true).is_err());
    }

    #[test]
    fn slices_move_by_whole_elements() {
        let b = buf(10, DType::F64).slice(3, 2);
        assert_eq!((b.ptr(), b.count(), b.bytes()), (0x1000 + 24, 2, 16));
    }
}
