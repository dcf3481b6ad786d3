//! NCCL's symbols, loaded from the file [`super::locate`] finds.
//!
//! cudarc's NCCL loader looks only for `libnccl.so` (not the soname `libnccl.so.2` that pip
//! and Debian ship) and panics when it finds nothing, so ferrun loads NCCL itself. Only calls
//! whose signatures are the same in every NCCL ≥ 2.12 are used, with enums passed as `int`: a
//! result code a newer NCCL adds is a number in an error, not undefined behaviour, and no
//! struct whose layout changed between versions (`ncclConfig_t`) is ever built.
//!
//! # Trust
//! The library is the one this process would load anyway; its version is read
//! (`ncclGetVersion`) and an NCCL older than 2.12 is refused by name.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

use super::locate;

/// `ncclComm_t`.
pub(super) type CommHandle = *mut c_void;
/// `cudaStream_t`.
pub(super) type StreamHandle = *mut c_void;

/// The oldest NCCL used: `ncclAvg`, bf16, `ncclGetLastError` and grouped send/recv are there.
const MIN_VERSION: i32 = 21200;

/// `ncclUniqueId`, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UniqueId(pub(super) [u8; super::unique_id::ID_BYTES]);

/// `(send, recv, count, dtype, op or root, comm, stream)`: all-reduce, reduce-scatter, broadcast.
type Collective = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    CommHandle,
    StreamHandle,
) -> c_int;
/// `(send, recv, count, dtype, op, root, comm, stream)`: reduce.
type Rooted = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    c_int,
    CommHandle,
    StreamHandle,
) -> c_int;
type Gather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    CommHandle,
    StreamHandle,
) -> c_int;
type PointToPoint =
    unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, CommHandle, StreamHandle) -> c_int;

/// The NCCL this process uses.
pub struct Nccl {
    /// Kept loaded for the process's life (the symbols below point into it).
    _library: libloading::Library,
    /// Where it was loaded from.
    pub path: PathBuf,
    /// `ncclGetVersion`: e.g. 22907 for 2.29.7.
    pub version: i32,
    pub(super) get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    pub(super) comm_init_rank:
        unsafe extern "C" fn(*mut CommHandle, c_int, UniqueId, c_int) -> c_int,
    pub(super) comm_destroy: unsafe extern "C" fn(CommHandle) -> c_int,
    pub(super) comm_abort: unsafe extern "C" fn(CommHandle) -> c_int,
    pub(super) comm_get_async_error: unsafe extern "C" fn(CommHandle, *mut c_int) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    get_last_error: unsafe extern "C" fn(CommHandle) -> *const c_char,
    pub(super) all_reduce: Collective,
    pub(super) reduce_scatter: Collective,
    pub(super) broadcast: Collective,
    pub(super) reduce: Rooted,
    pub(super) all_gather: Gather,
    pub(super) send: PointToPoint,
    pub(super) recv: PointToPoint,
    pub(super) group_start: unsafe extern "C" fn() -> c_int,
    pub(super) group_end: unsafe extern "C" fn() -> c_int,
}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NCCL {} ({})",
            version_text(self.version),
            self.path.display()
        )
    }
}

/// `22907` → `2.29.7` (and the pre-2.9 scheme, `2708` → `2.7.8`).
pub(super) fn version_text(code: i32) -> String {
    if code >= 10000 {
        format!("{}.{}.{}", code / 10000, code / 100 % 100, code % 100)
    } else {
        format!("{}.{}.{}", code / 1000, code / 100 % 10, code % 100)
    }
}

impl Nccl {
    /// This process's NCCL, loaded once.
    ///
    /// # Errors
    /// Every place looked at, when none held a usable NCCL.
    pub fn get() -> Result<&'static Nccl, super::GpuError> {
        static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
        NCCL.get_or_init(|| load(&locate::candidates(&locate::this_process())))
            .as_ref()
            .map_err(|e| super::GpuError::NoNccl(e.clone()))
    }

    /// NCCL's words for `code`, and for the last error on `comm` when there is one.
    pub(super) fn describe(&self, code: c_int, comm: CommHandle) -> String {
        // SAFETY: both return static or comm-owned NUL-terminated strings (or null).
        let text = |p: *const c_char| {
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        let general = text(unsafe { (self.get_error_string)(code) }).unwrap_or_default();
        let last = if comm.is_null() {
            None
        } else {
            text(unsafe { (self.get_last_error)(comm) }).filter(|s| !s.is_empty())
        };
        match last {
            Some(last) => format!("{general}: {last}"),
            None => general,
        }
    }
}

/// The version of this process's NCCL, e.g. `2.29.7`.
///
/// # Errors
/// As [`Nccl::get`].
pub fn nccl_version() -> Result<String, super::GpuError> {
    Nccl::get().map(|n| version_text(n.version))
}

fn load(candidates: &[PathBuf]) -> Result<Nccl, String> {
    let mut tried = Vec::new();
    for path in candidates {
        // SAFETY: loading NCCL runs its initializers, which only set up NCCL's own state.
        match unsafe { libloading::Library::new(path) } {
            Ok(library) => return bind(library, path.clone()),
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    Err(format!(
        "libnccl.so.2 was found in none of: {}; install NCCL (pip install nvidia-nccl-cu13, or Debian's libnccl2), or set FERRUN_NCCL_LIBRARY to its path",
        tried.join("; ")
    ))
}

fn bind(library: libloading::Library, path: PathBuf) -> Result<Nccl, String> {
    macro_rules! symbol {
        ($name:literal) => {
            // SAFETY: the type is NCCL's signature for this name in every NCCL ≥ 2.12.
            *unsafe { library.get($name) }.map_err(|e| {
                format!(
                    "{} lacks {}: {e}; it is not a usable NCCL 2",
                    path.display(),
                    String::from_utf8_lossy(&$name[..$name.len() - 1])
                )
            })?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> c_int = symbol!(b"ncclGetVersion\0");
    let mut version = 0;
    // SAFETY: writes one int.
    if unsafe { get_version(&mut version) } != 0 || version < MIN_VERSION {
        return Err(format!(
            "{} is NCCL {}; ferrun needs NCCL ≥ {}",
            path.display(),
            version_text(version),
            version_text(MIN_VERSION)
        ));
    }
    Ok(Nccl {
        get_unique_id: symbol!(b"ncclGetUniqueId\0"),
        comm_init_rank: symbol!(b"ncclCommInitRank\0"),
        comm_destroy: symbol!(b"ncclCommDestroy\0"),
        comm_abort: symbol!(b"ncclCommAbort\0"),
        comm_get_async_error: symbol!(b"ncclCommGetAsyncError\0"),
        get_error_string: symbol!(b"ncclGetErrorString\0"),
        get_last_error: symbol!(b"ncclGetLastError\0"),
        all_reduce: symbol!(b"ncclAllReduce\0"),
        reduce_scatter: symbol!(b"ncclReduceScatter\0"),
        broadcast: symbol!(b"ncclBroadcast\0"),
        reduce: symbol!(b"ncclReduce\0"),
        all_gather: symbol!(b"ncclAllGather\0"),
        send: symbol!(b"ncclSend\0"),
        recv: symbol!(b"ncclRecv\0"),
        group_start: symbol!(b"ncclGroupStart\0"),
        group_end: symbol!(b"ncclGroupEnd\0"),
        version,
        path,
        _library: library,
    })
}

impl Nccl {
    /// A fresh `ncclUniqueId` (needs no GPU).
    ///
    /// # Errors
    /// NCCL's, e.g. when no network interface is usable for its bootstrap.
    pub fn unique_id(&self) -> Result<[u8; super::unique_id::ID_BYTES], super::GpuError> {
        let mut id = UniqueId([0; super::unique_id::ID_BYTES]);
        // SAFETY: writes one ncclUniqueId.
        let code = unsafe { (self.get_unique_id)(&mut id) };
        if code != 0 {
            return Err(super::GpuError::Nccl {
                op: "ncclGetUniqueId",
                rank: 0,
                code,
                message: self.describe(code, std::ptr::null_mut()),
            });
        }
        Ok(id.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_as_nccl_prints_them() {
        assert_eq!(version_text(22907), "2.29.7");
        assert_eq!(version_text(21200), "2.12.0");
        assert_eq!(version_text(2708), "2.7.8");
    }

    #[test]
    fn a_missing_library_lists_where_it_was_looked_for_and_the_fix() {
        let err = load(&[PathBuf::from("/nonexistent/libnccl.so.2")]).unwrap_err();
        assert!(err.contains("/nonexistent/libnccl.so.2"), "{err}");
        assert!(err.contains("FERRUN_NCCL_LIBRARY"), "{err}");
    }

    #[test]
    fn a_library_that_is_not_nccl_is_refused_by_name() {
        // libc loads, but has no NCCL symbols.
        let err = load(&[PathBuf::from("libc.so.6")]).unwrap_err();
        assert!(err.contains("lacks ncclGetVersion"), "{err}");
    }
}
