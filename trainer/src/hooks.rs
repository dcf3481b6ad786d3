//! Gradient hooks on libtorch tensors, which tch does not bind: `shim/hooks.cpp` registers a
//! C callback on a parameter's gradient, and this module wraps it.
//!
//! # Trust
//! The callback receives a pointer and a length from libtorch (this process's own memory, valid
//! for the call only); the length is checked against the parameter the hook was registered for
//! by the receiver before anything is copied.

#![allow(unsafe_code)]

use std::ffi::{c_char, c_void, CStr};

use tch::Tensor;

/// A gradient callback: the context, the parameter's index, the gradient's data and length.
pub(crate) type GradFn = unsafe extern "C" fn(*mut c_void, usize, *const f32, i64);

extern "C" {
    fn ferrun_register_grad_hook(
        t: *mut torch_sys::C_tensor,
        f: GradFn,
        ctx: *mut c_void,
        index: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> i64;
    fn ferrun_remove_hook(
        t: *mut torch_sys::C_tensor,
        handle: i64,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
    fn ferrun_clear_grad(t: *mut torch_sys::C_tensor);
    fn ferrun_register_reached_hook(
        t: *mut torch_sys::C_tensor,
        f: ReachedFn,
        ctx: *mut c_void,
        tag: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
    fn ferrun_storage_resize(
        t: *mut torch_sys::C_tensor,
        nbytes: usize,
        err: *mut c_char,
        err_cap: usize,
    ) -> i32;
}

/// A notification that backward reached a tensor: the context and a tag.
pub(crate) type ReachedFn = unsafe extern "C" fn(*mut c_void, usize);

/// The shim's error text.
fn shim_error(err: &[c_char]) -> String {
    // SAFETY: the shim writes NUL-terminated strings, and the buffer starts zeroed.
    unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Calls `f(ctx, tag)` when backward reaches `t` (before the node that produced it runs).
///
/// # Safety
/// `ctx` must be what `f` expects and stay valid while `t`'s autograd graph lives.
pub(crate) unsafe fn on_reached(
    t: &Tensor,
    f: ReachedFn,
    ctx: *mut c_void,
    tag: usize,
) -> Result<(), String> {
    let mut t = t.shallow_clone();
    let mut err = [0 as c_char; 512];
    // SAFETY: a live tensor; the shim catches C++ exceptions; the caller vouches for `ctx`.
    let rc = unsafe {
        ferrun_register_reached_hook(t.as_mut_ptr(), f, ctx, tag, err.as_mut_ptr(), err.len())
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(shim_error(&err))
    }
}

/// Gives `t`'s storage `nbytes` of fresh, uninitialized memory, or frees it (0), keeping the
/// storage object that `t`'s views share.
pub(crate) fn resize_storage(t: &Tensor, nbytes: usize) -> Result<(), String> {
    let mut t = t.shallow_clone();
    let mut err = [0 as c_char; 512];
    // SAFETY: a live tensor; the shim catches C++ exceptions.
    let rc = unsafe { ferrun_storage_resize(t.as_mut_ptr(), nbytes, err.as_mut_ptr(), err.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(shim_error(&err))
    }
}

/// Hooks registered on tensors, removed on drop.
///
/// The context pointer handed to [`GradHooks::register`] must stay valid until the hooks are
/// dropped (or removed): whoever owns both drops the hooks first.
#[derive(Debug, Default)]
pub(crate) struct GradHooks {
    registered: Vec<(Tensor, i64)>,
}

impl GradHooks {
    /// Calls `f(ctx, index, grad)` each time backward computes `t`'s gradient.
    ///
    /// # Safety
    /// `ctx` must be what `f` expects and stay valid until these hooks are dropped.
    pub(crate) unsafe fn register(
        &mut self,
        t: &Tensor,
        f: GradFn,
        ctx: *mut c_void,
        index: usize,
    ) -> Result<(), String> {
        let mut t = t.shallow_clone();
        let mut err = [0 as c_char; 512];
        // SAFETY: `t` is a live tensor; the shim catches C++ exceptions; the caller vouches
        // for `ctx`.
        let handle = unsafe {
            ferrun_register_grad_hook(t.as_mut_ptr(), f, ctx, index, err.as_mut_ptr(), err.len())
        };
        if handle < 0 {
            return Err(shim_error(&err));
        }
        self.registered.push((t, handle));
        Ok(())
    }
}

impl Drop for GradHooks {
    fn drop(&mut self) {
        for (t, handle) in &mut self.registered {
            let mut err = [0 as c_char; 256];
            // SAFETY: the handle came from registering on this tensor.
            let rc =
                unsafe { ferrun_remove_hook(t.as_mut_ptr(), *handle, err.as_mut_ptr(), err.len()) };
            if rc != 0 {
                tracing::warn!("removing a gradient hook: {}", shim_error(&err));
            }
        }
    }
}

/// Drops `t`'s accumulated `.grad` (torch's `zero_grad(set_to_none=True)`).
pub(crate) fn clear_grad(t: &Tensor) {
    let mut t = t.shallow_clone();
    // SAFETY: a live tensor; the shim catches everything.
    unsafe { ferrun_clear_grad(t.as_mut_ptr()) }
}
