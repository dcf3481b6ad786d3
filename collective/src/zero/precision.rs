//! Mixed precision: the model's float types beside f32 master weights, and dynamic loss
//! scaling for f16.
//!
//! # Guarantees
//! - A model copy is the master weight rounded once (round to nearest even, `half`'s
//!   conversion), so every rank that holds the same master holds the same model copy.
//! - The scaler is a pure state machine fed only with the overflow flag that every rank got
//!   from the same all-reduce, so the scales of all ranks move together.

use half::{bf16, f16};

use crate::reduce::Element;

mod sealed {
    pub trait Sealed {}
}

/// A float type a model may hold its parameters and gradients in: f32, f16 or bf16.
pub trait ModelFloat: Element + sealed::Sealed {
    /// Widens `src` into `dst` (same length), times `factor`.
    fn widen_scaled(src: &[Self], dst: &mut [f32], factor: f32);
    /// Rounds `src` into `dst` (same length).
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The buffer itself as f32, when the type is f32 (the master weights then need no copy).
    fn as_f32_mut(buf: &mut [Self]) -> Option<&mut [f32]>;
    /// As [`ModelFloat::as_f32_mut`], read-only.
    fn as_f32(buf: &[Self]) -> Option<&[f32]>;
}

impl sealed::Sealed for f32 {}
impl ModelFloat for f32 {
    fn widen_scaled(src: &[Self], dst: &mut [f32], factor: f32) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = s * factor;
        }
    }
    fn narrow(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
    fn as_f32_mut(buf: &mut [Self]) -> Option<&mut [f32]> {
        Some(buf)
    }
    fn as_f32(buf: &[Self]) -> Option<&[f32]> {
        Some(buf)
    }
}

macro_rules! half_float {
    ($t:ty) => {
        impl sealed::Sealed for $t {}
        impl ModelFloat for $t {
            fn widen_scaled(src: &[Self], dst: &mut [f32], factor: f32) {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = s.to_f32() * factor;
                }
            }
            fn narrow(src: &[f32], dst: &mut [Self]) {
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = <$t>::from_f32(s);
                }
            }
            fn as_f32_mut(_: &mut [Self]) -> Option<&mut [f32]> {
                None
            }
            fn as_f32(_: &[Self]) -> Option<&[f32]> {
                None
            }
        }
    };
}
half_float!(f16);
half_float!(bf16);

/// Dynamic loss scaling, torch's `GradScaler` defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    /// The scale the loss is multiplied by now.
    pub scale: f32,
    /// Multiplied by this after `interval` steps without overflow.
    pub growth: f32,
    /// Multiplied by this on an overflow.
    pub backoff: f32,
    /// Steps without overflow before the scale grows.
    pub interval: u32,
    /// Steps without overflow so far.
    pub good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        Self {
            scale: 65536.0,
            growth: 2.0,
            backoff: 0.5,
            interval: 2000,
            good_steps: 0,
        }
    }
}

impl LossScale {
    /// A fixed scale of 1: for f32 and bf16, whose range needs none.
    pub fn none() -> Self {
        Self {
            scale: 1.0,
            growth: 1.0,
            backoff: 1.0,
            interval: u32::MAX,
            good_steps: 0,
        }
    }

    /// The scale after a step that did (or did not) overflow on some rank.
    pub fn update(&mut self, overflow: bool) {
        if overflow {
            self.scale = (self.scale * self.backoff).max(f32::MIN_POSITIVE);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= self.interval {
                let grown = self.scale * self.growth;
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.good_steps = 0;
            }
        }
    }
}
