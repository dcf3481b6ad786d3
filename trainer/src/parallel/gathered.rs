//! Stage 3's parameters in torch: one torch-allocated flat tensor per bucket, whose storage
//! holds the bucket's gathered values only while they are in use and is freed (resized to 0
//! bytes, the storage object kept) otherwise — FSDP's `FULL_SHARD`. Each parameter is a view of
//! its bucket's flat tensor, set once: autograd's saved views of it read whatever memory the
//! storage has when backward runs, so a bucket freed after its layers' forward is gathered
//! again just before their backward (a hook on the last layer's output) and freed once their
//! gradients are in.
//!
//! Values are written straight into the storage's memory, not through a torch op: an op would
//! bump the version counter that autograd checks on its saved views.

#![allow(unsafe_code)]

use ferrun_collective::transport::Transport;
use ferrun_collective::zero::{ShardPlan, Zero};
use tch::{Device, Kind, Tensor};

use crate::hooks::resize_storage;
use crate::TrainError;

/// The buckets' flat tensors and which are held now.
pub(super) struct Gathered {
    flats: Vec<Tensor>,
    held: Vec<bool>,
}

fn torch_err(what: String) -> TrainError {
    TrainError::Model(what)
}

impl Gathered {
    /// Makes every parameter a view of its bucket's (freed) flat tensor.
    pub(super) fn new(plan: &ShardPlan, params: &[Tensor]) -> Result<Self, TrainError> {
        let _guard = tch::no_grad_guard();
        let mut flats = Vec::with_capacity(plan.buckets().len());
        for bucket in plan.buckets() {
            let flat = Tensor::zeros([bucket.len as i64], (Kind::Float, Device::Cpu));
            for i in bucket.params.clone() {
                let slot = plan
                    .slot(i)
                    .ok_or_else(|| torch_err(format!("no slot {i}")))?;
                let view = flat
                    .narrow(0, slot.offset as i64, slot.numel as i64)
                    .view(params[i].size().as_slice());
                params[i].shallow_clone().set_data(&view);
            }
            resize_storage(&flat, 0).map_err(torch_err)?;
            flats.push(flat);
        }
        let held = vec![false; flats.len()];
        Ok(Self { flats, held })
    }

    /// Whether bucket `b` is held.
    pub(super) fn held(&self, b: usize) -> bool {
        self.held.get(b).copied().unwrap_or(false)
    }

    /// Gathers bucket `b` (if not held) into its flat tensor.
    pub(super) fn hold<T: Transport + 'static>(
        &mut self,
        zero: &mut Zero<f32, T>,
        b: usize,
    ) -> Result<(), TrainError> {
        if self.held(b) {
            return Ok(());
        }
        let flat = &self.flats[b];
        let values = zero.gather(b)?;
        let n = flat.numel();
        if values.len() != n {
            return Err(torch_err(format!(
                "bucket {b} gathered {} values for {n} elements",
                values.len()
            )));
        }
        resize_storage(flat, n * std::mem::size_of::<f32>()).map_err(torch_err)?;
        if n > 0 {
            // SAFETY: the storage was just given n f32s, contiguous from offset 0; `values`
            // holds n f32s; the two do not overlap (one is torch's, one the engine's).
            unsafe {
                std::ptr::copy_nonoverlapping(values.as_ptr(), flat.data_ptr().cast::<f32>(), n);
            }
        }
        zero.release(b);
        self.held[b] = true;
        Ok(())
    }

    /// Frees bucket `b`'s values (its views stay; they must not be read until held again).
    pub(super) fn free(&mut self, b: usize) -> Result<(), TrainError> {
        if self.held(b) {
            resize_storage(&self.flats[b], 0).map_err(torch_err)?;
            self.held[b] = false;
        }
        Ok(())
    }

    /// Frees every bucket.
    pub(super) fn free_all(&mut self) -> Result<(), TrainError> {
        (0..self.flats.len()).try_for_each(|b| self.free(b))
    }
}
