//! The hooks' side of [`Parallel`](super::Parallel): a parameter's gradient into its bucket,
//! and (stage 3) a bucket gathered again when backward reaches its layers.
//!
//! # Trust
//! Gradient lengths from libtorch are checked against the parameter before anything is added.
//! A failure is kept for `finish_backward` to return, never unwound through C++.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::sync::Mutex;

use ferrun_collective::transport::Transport;

use super::{missing, Shared};
use crate::TrainError;

/// Runs `f` on the shared state behind `ctx`, keeping its error (or a panic) for later.
///
/// # Safety
/// `ctx` is a live `Mutex<Shared<T>>`.
unsafe fn with_shared<T: Transport + 'static>(
    ctx: *mut c_void,
    what: &str,
    f: impl FnOnce(&mut Shared<T>) -> Result<(), TrainError>,
) {
    // SAFETY: as the function's contract says.
    let shared = unsafe { &*ctx.cast::<Mutex<Shared<T>>>() };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        let s = &mut *guard;
        if s.error.is_none() {
            if let Err(e) = f(s) {
                s.error = Some(e);
            }
        }
    }));
    if result.is_err() {
        let mut guard = shared.lock().unwrap_or_else(|e| e.into_inner());
        guard.error = Some(TrainError::Model(format!("{what} panicked")));
    }
}

/// A parameter's gradient hook: adds parameter `index`'s gradient into its bucket; with
/// overlap hands the bucket in once it is complete; at stage 3 frees it then.
///
/// # Safety
/// `ctx` is a live `Mutex<Shared<T>>`; `data` holds `numel` f32s for the call.
pub(super) unsafe extern "C" fn on_grad<T: Transport + 'static>(
    ctx: *mut c_void,
    index: usize,
    data: *const f32,
    numel: i64,
) {
    let grad = match usize::try_from(numel) {
        // SAFETY: libtorch hands a contiguous f32 buffer of `numel` elements.
        Ok(n) if !data.is_null() => unsafe { std::slice::from_raw_parts(data, n) },
        _ => &[],
    };
    // SAFETY: as the function's contract says.
    unsafe {
        with_shared::<T>(ctx, "a gradient hook", |s| s.take_grad(index, grad));
    }
}

/// Backward reached the last layer that uses bucket `b` (stage 3): gather it again.
///
/// # Safety
/// `ctx` is a live `Mutex<Shared<T>>`.
pub(super) unsafe extern "C" fn on_reached<T: Transport + 'static>(ctx: *mut c_void, b: usize) {
    // SAFETY: as the function's contract says.
    unsafe {
        with_shared::<T>(ctx, "a gather hook", |s| match s.gathered.as_mut() {
            Some(g) => g.hold(&mut s.zero, b),
            None => Ok(()),
        });
    }
}

impl<T: Transport + 'static> Shared<T> {
    fn take_grad(&mut self, index: usize, grad: &[f32]) -> Result<(), TrainError> {
        let slot = self.zero.plan().slot(index).ok_or_else(|| missing(index))?;
        if grad.len() != slot.numel {
            return Err(TrainError::Model(format!(
                "parameter {index} got a gradient of {} elements, it has {}",
                grad.len(),
                slot.numel
            )));
        }
        let b = slot.bucket;
        if self.handed[b] {
            return Err(TrainError::Model(format!(
                "parameter {index} got a gradient after its bucket was reduced this step: call \
                 backward once per step (accumulating over several backward calls needs \
                 --no-overlap)"
            )));
        }
        let buf = self.zero.grads_mut(b)?;
        for (d, g) in buf[slot.offset..slot.offset + slot.numel]
            .iter_mut()
            .zip(grad)
        {
            *d += g;
        }
        // Only the arrival that completes the bucket acts (a second backward in one step,
        // accumulating without overlap, finds it complete already and frees nothing early).
        let was = self.pending[b];
        self.pending[b] = was.saturating_sub(1);
        if was == 1 {
            if let Some(g) = self.gathered.as_mut() {
                g.free(b)?;
            }
            if self.overlap {
                self.zero.reduce(b)?;
                self.handed[b] = true;
            }
        }
        Ok(())
    }
}
