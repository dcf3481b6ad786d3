//! One CUDA device through cudarc's driver bindings: its primary context (the one torch uses),
//! a stream for this communicator, device memory and pinned host memory.
//!
//! cudarc loads `libcuda.so.1` lazily and panics when it is missing, so [`Device::count`] and
//! [`Device::open`] check that it is there first and say so when it is not.
//!
//! The stream is a blocking one: work on it waits for what callers queued on the legacy default
//! stream (torch's, unless it runs per-thread streams), and theirs for it, so buffers torch just
//! wrote are complete before a collective reads them.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::{result, sys, DriverError};

use super::{DeviceBuf, GpuError};
use crate::reduce::{bytes_of, bytes_of_mut, Element};

fn cuda(what: &'static str) -> impl Fn(DriverError) -> GpuError {
    move |e| GpuError::Cuda {
        what,
        message: format!("{e}"),
    }
}

fn driver() -> Result<(), GpuError> {
    // SAFETY: only tries to open the library; no CUDA call yet.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoCuda);
    }
    match result::init() {
        Ok(()) => Ok(()),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Err(GpuError::NoDevice {
            ordinal: 0,
            count: 0,
            visible: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
        }),
        Err(e) => Err(cuda("cuInit")(e)),
    }
}

/// A CUDA device, bound to its primary context, with a stream of its own.
#[derive(Debug)]
pub struct Device {
    ordinal: usize,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    name: String,
    uuid: String,
}

// SAFETY: a CUDA context and stream may be used from any thread once bound to it (`bind`).
unsafe impl Send for Device {}
// SAFETY: as above; the driver serializes calls on one stream.
unsafe impl Sync for Device {}

impl Device {
    /// The GPUs this process sees.
    ///
    /// # Errors
    /// [`GpuError::NoCuda`] without a driver.
    pub fn count() -> Result<usize, GpuError> {
        match driver() {
            Err(GpuError::NoDevice { .. }) => return Ok(0),
            other => other?,
        }
        let n = result::device::get_count().map_err(cuda("cuDeviceGetCount"))?;
        usize::try_from(n).map_err(|_| GpuError::Cuda {
            what: "cuDeviceGetCount",
            message: format!("the driver counted {n} devices"),
        })
    }

    /// GPU `ordinal`, its primary context bound to this thread.
    ///
    /// # Errors
    /// [`GpuError::NoCuda`], [`GpuError::NoDevice`], or the driver's.
    pub fn open(ordinal: usize) -> Result<Arc<Self>, GpuError> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(GpuError::NoDevice {
                ordinal,
                count,
                visible: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            });
        }
        let dev = result::device::get(ordinal as i32).map_err(cuda("cuDeviceGet"))?;
        // SAFETY: `dev` came from cuDeviceGet.
        let ctx = unsafe { result::primary_ctx::retain(dev) }
            .map_err(cuda("cuDevicePrimaryCtxRetain"))?;
        // SAFETY: a context just retained.
        unsafe { result::ctx::set_current(ctx) }.map_err(cuda("cuCtxSetCurrent"))?;
        let stream = result::stream::create(result::stream::StreamKind::Default)
            .map_err(cuda("cuStreamCreate"))?;
        let name = result::device::get_name(dev).unwrap_or_default();
        let uuid = result::device::get_uuid(dev)
            .map(|u| {
                let b: Vec<String> = u
                    .bytes
                    .iter()
                    .map(|b| format!("{:02x}", *b as u8))
                    .collect();
                format!("GPU-{}", b.concat())
            })
            .map_err(cuda("cuDeviceGetUuid"))?;
        Ok(Arc::new(Self {
            ordinal,
            dev,
            ctx,
            stream,
            name,
            uuid,
        }))
    }

    /// The device number in this process.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's UUID (`GPU-…`, as `nvidia-smi -L` prints it).
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Makes the device's context current on the calling thread.
    pub(super) fn bind(&self) -> Result<(), GpuError> {
        // SAFETY: a context this value holds a reference to.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(cuda("cuCtxSetCurrent"))
    }

    /// The communicator's stream.
    pub(super) fn stream(&self) -> sys::CUstream {
        self.stream
    }

    /// Whether everything queued on the stream has run.
    pub(super) fn stream_done(&self) -> Result<bool, GpuError> {
        // SAFETY: a stream of this context, which the caller bound.
        match unsafe { sys::cuStreamQuery(self.stream) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            other => Err(cuda("cuStreamQuery")(DriverError(other))),
        }
    }

    /// Copies `src` (device) into `dst` (host), after the stream's queued work.
    pub(super) fn to_host(&self, dst: &mut [u8], src: &DeviceBuf) -> Result<(), GpuError> {
        debug_assert_eq!(dst.len(), src.bytes());
        self.bind()?;
        // SAFETY: `src` is a live device buffer of `dst.len()` bytes (DeviceBuf's contract).
        unsafe {
            result::memcpy_dtoh_async(dst, src.ptr(), self.stream)
                .map_err(cuda("cuMemcpyDtoHAsync"))?;
            result::stream::synchronize(self.stream).map_err(cuda("cuStreamSynchronize"))
        }
    }

    /// Copies `src` (host) into `dst` (device), and waits for it.
    pub(super) fn to_device(&self, dst: &DeviceBuf, src: &[u8]) -> Result<(), GpuError> {
        debug_assert_eq!(src.len(), dst.bytes());
        self.bind()?;
        // SAFETY: as `to_host`.
        unsafe {
            result::memcpy_htod_async(dst.ptr(), src, self.stream)
                .map_err(cuda("cuMemcpyHtoDAsync"))?;
            result::stream::synchronize(self.stream).map_err(cuda("cuStreamSynchronize"))
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: this value's stream and context reference; errors at teardown are moot.
        unsafe {
            if self.bind().is_ok() {
                let _ = result::stream::destroy(self.stream);
            }
            let _ = result::primary_ctx::release(self.dev);
        }
    }
}

/// Memory on a [`Device`], freed on drop.
#[derive(Debug)]
pub struct DeviceMemory {
    device: Arc<Device>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl DeviceMemory {
    /// `bytes` of device memory (at least one byte is allocated, so that empty buffers have an
    /// address).
    ///
    /// # Errors
    /// The driver's, e.g. out of memory.
    pub fn alloc(device: &Arc<Device>, bytes: usize) -> Result<Self, GpuError> {
        device.bind()?;
        // SAFETY: plain allocation in the bound context.
        let ptr = unsafe { result::malloc_sync(bytes.max(1)) }.map_err(cuda("cuMemAlloc"))?;
        Ok(Self {
            device: device.clone(),
            ptr,
            bytes,
        })
    }

    /// Device memory holding `values`.
    ///
    /// # Errors
    /// As [`DeviceMemory::alloc`].
    pub fn upload<E: Element>(device: &Arc<Device>, values: &[E]) -> Result<Self, GpuError> {
        let memory = Self::alloc(device, std::mem::size_of_val(values))?;
        device.to_device(&memory.buf(E::DTYPE), bytes_of(values))?;
        Ok(memory)
    }

    /// The memory's contents as `E`s.
    ///
    /// # Errors
    /// The driver's.
    pub fn download<E: Element>(&self) -> Result<Vec<E>, GpuError> {
        let mut out = vec![E::ZERO; self.bytes / std::mem::size_of::<E>()];
        let buf = self.buf(E::DTYPE);
        self.device.to_host(bytes_of_mut(&mut out), &buf)?;
        Ok(out)
    }

    /// The whole memory as a buffer of `dtype` elements.
    pub fn buf(&self, dtype: crate::reduce::DType) -> DeviceBuf {
        // SAFETY: this allocation, alive as long as `self`; the borrow rules on `self` are the
        // caller's to keep while an op runs.
        unsafe { DeviceBuf::from_raw(self.ptr, self.bytes / dtype.size(), dtype) }
    }

    /// Bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceMemory {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: this value's allocation, freed once.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory, grown on demand: where staged collectives meet the CPU transports.
#[derive(Debug)]
pub(super) struct Pinned {
    device: Arc<Device>,
    ptr: *mut c_void,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for Pinned {}

impl Pinned {
    pub(super) fn new(device: &Arc<Device>) -> Self {
        Self {
            device: device.clone(),
            ptr: std::ptr::null_mut(),
            bytes: 0,
        }
    }

    /// At least `bytes` of pinned memory, 64-byte aligned (page-aligned in fact), zeroed
    /// contents not promised.
    pub(super) fn reserve(&mut self, bytes: usize) -> Result<&mut [u8], GpuError> {
        if bytes > self.bytes {
            self.release();
            self.device.bind()?;
            // SAFETY: plain allocation; the memory is written before it is read.
            self.ptr = unsafe { result::malloc_host(bytes, 0) }.map_err(cuda("cuMemHostAlloc"))?;
            self.bytes = bytes;
        }
        if bytes == 0 {
            return Ok(&mut []);
        }
        // SAFETY: `bytes` of this value's allocation, borrowed mutably through `self`; the
        // driver allocated it so it holds initialized (if arbitrary) bytes.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.cast::<u8>(), bytes) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() && self.device.bind().is_ok() {
            // SAFETY: this value's allocation, freed once.
            let _ = unsafe { result::free_host(self.ptr) };
        }
        self.ptr = std::ptr::null_mut();
        self.bytes = 0;
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        self.release();
    }
}

/// `bytes` as `E`s (pinned memory is page-aligned, so any element type fits).
pub(super) fn elements_mut<E: Element>(bytes: &mut [u8]) -> &mut [E] {
    let size = std::mem::size_of::<E>();
    debug_assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<E>(), 0);
    // SAFETY: aligned (checked), in bounds, and every bit pattern is a valid `E` (plain numbers).
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<E>(), bytes.len() / size) }
}
