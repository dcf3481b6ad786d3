//! A tch model trained data-parallel on a [`Zero`] engine, at any stage: DDP is stage 0.
//!
//! - Parameters: rank 0's initial values reach every rank through the engine (and are checked
//!   equal by a checksum's minimum and maximum); at stages 0–2 each tch parameter then *is* a
//!   view of the engine's flat buffer (`from_blob` + `set_data`), so the optimizer's update is
//!   seen by the model without a copy; at stage 3 each bucket's parameters are gathered by
//!   [`Parallel::before_layer`] before their first layer runs, freed by
//!   [`Parallel::after_layer`] after their last, gathered again when backward reaches them and
//!   freed once their gradients are in (see `gathered`).
//! - Gradients: a hook on every parameter (see [`crate::hooks`]) adds its gradient into its
//!   bucket's buffer as backward produces it; with overlap on, a bucket is handed to the engine
//!   — and its reduction starts on the communicator's thread — the moment its last parameter
//!   arrives. [`Parallel::finish_backward`] hands in what is left; a parameter that got no
//!   gradient this step is reduced as zeros on every rank, so nobody waits for it.
//!
//! # Trust
//! Gradient lengths from the hooks are checked against the parameter's size before they are
//! added; everything else is this process's own state. A failure in a hook (a wrong length, a
//! failed collective) is kept and returned by `finish_backward`, never unwound through C++.

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use ferrun_collective::comm::Communicator;
use ferrun_collective::reduce::ReduceOp;
use ferrun_collective::transport::Transport;
use ferrun_collective::zero::{ShardPlan, Stage, StepReport, Zero, ZeroConfig};
use tch::{Device, Kind, Tensor};

use crate::hooks::{clear_grad, GradHooks};
use crate::TrainError;

mod gathered;
mod hooked;

use gathered::Gathered;
use hooked::{on_grad, on_reached};

/// What the hooks and the training loop share.
struct Shared<T: Transport + 'static> {
    zero: Zero<f32, T>,
    /// Per bucket: parameters whose gradient has not arrived this step.
    pending: Vec<usize>,
    /// Per bucket: handed to the engine this step.
    handed: Vec<bool>,
    overlap: bool,
    /// The first thing that went wrong in a hook this step.
    error: Option<TrainError>,
    /// Stage 3: the buckets' parameters in torch.
    gathered: Option<Gathered>,
}

/// A model's parameters bound to a ZeRO engine (see the module's docs).
pub struct Parallel<T: Transport + 'static> {
    // Dropped first: no hook may outlive what it points to.
    hooks: GradHooks,
    shared: Box<Mutex<Shared<T>>>,
    params: Vec<Tensor>,
    /// A sibling communicator for checks and metrics.
    check: Communicator<T>,
}

impl<T: Transport + 'static> std::fmt::Debug for Parallel<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parallel")
            .field("params", &self.params.len())
            .finish_non_exhaustive()
    }
}

impl<T: Transport + 'static> Parallel<T> {
    /// Binds `params` (shallow clones of the model's parameters, in the plan's order) to a
    /// ZeRO engine on `comm`; every rank ends with rank 0's values.
    ///
    /// # Errors
    /// [`TrainError`] when the plan does not fit the parameters, a collective fails, or the
    /// ranks' parameters differ after the broadcast.
    pub fn new(
        comm: Communicator<T>,
        params: Vec<Tensor>,
        plan: ShardPlan,
        config: ZeroConfig,
        overlap: bool,
    ) -> Result<Self, TrainError> {
        for (i, (p, spec)) in params.iter().zip(plan.params()).enumerate() {
            let shape: Vec<usize> = p.size().iter().map(|&d| d as usize).collect();
            if shape != spec.shape || p.kind() != Kind::Float || p.device() != Device::Cpu {
                return Err(TrainError::Model(format!(
                    "parameter {i} ({}) is {:?} {shape:?} on {:?}; the plan expects f32 {:?} on \
                     the CPU",
                    spec.name,
                    p.kind(),
                    p.device(),
                    spec.shape
                )));
            }
        }
        if params.len() != plan.params().len() {
            return Err(TrainError::Model(format!(
                "{} parameters for a plan of {}",
                params.len(),
                plan.params().len()
            )));
        }
        let check = comm
            .split(Some(0), 0)?
            .ok_or_else(|| TrainError::Model("split gave no communicator".into()))?;
        let initial = flatten(&params);
        let pending = plan.buckets().iter().map(|b| b.params.len()).collect();
        let nb = plan.buckets().len();
        let gathered = if config.stage == Stage::Parameters {
            Some(Gathered::new(&plan, &params)?)
        } else {
            None
        };
        let zero = Zero::new(comm, plan, config, &initial)?;
        let shared = Box::new(Mutex::new(Shared {
            zero,
            pending,
            handed: vec![false; nb],
            overlap,
            error: None,
            gathered,
        }));
        let mut me = Self {
            hooks: GradHooks::default(),
            shared,
            params,
            check,
        };
        me.bind_all()?;
        let ctx = me.ctx();
        for (i, p) in me.params.iter().enumerate() {
            // SAFETY: `ctx` is the boxed Mutex<Shared<T>> `on_grad::<T>` expects; the box lives
            // in `me` beside the hooks, which are dropped first.
            unsafe { me.hooks.register(p, on_grad::<T>, ctx, i) }.map_err(|why| {
                TrainError::Model(format!("cannot hook parameter {i}'s gradient: {why}"))
            })?;
        }
        let sum = me.checksum()?;
        let (lo, hi) = me.agree(sum)?;
        if lo != hi {
            return Err(TrainError::Model(format!(
                "the ranks' parameters differ after the broadcast (checksums {lo:#x}..{hi:#x})"
            )));
        }
        Ok(me)
    }

    /// What the hooks are handed: the boxed shared state.
    fn ctx(&self) -> *mut c_void {
        std::ptr::from_ref::<Mutex<Shared<T>>>(&self.shared)
            .cast_mut()
            .cast::<c_void>()
    }

    fn lock(&self) -> MutexGuard<'_, Shared<T>> {
        // A poisoned lock means a hook panicked; its error was kept, the state is still whole.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine's stage.
    pub fn stage(&self) -> Stage {
        self.lock().zero.config().stage
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.lock().zero.steps()
    }

    /// The communicator for checks and metrics (a sibling of the engine's).
    pub fn check_comm(&self) -> &Communicator<T> {
        &self.check
    }

    /// Stages 0–2: points every parameter at the engine's flat buffer.
    fn bind_all(&mut self) -> Result<(), TrainError> {
        if self.stage() == Stage::Parameters {
            return Ok(());
        }
        let shared = self.lock();
        for (i, p) in self.params.iter().enumerate() {
            let data = shared.zero.param(i).ok_or_else(|| missing(i))?;
            bind(p, data);
        }
        Ok(())
    }

    /// Before a layer that uses parameters `params` runs: stage 3 gathers their buckets
    /// (a no-op at other stages) and starts gathering those of `next`, the layer after.
    ///
    /// # Errors
    /// [`TrainError`] when a gather fails.
    pub fn before_layer(
        &mut self,
        params: Range<usize>,
        next: Range<usize>,
    ) -> Result<(), TrainError> {
        let mut guard = self.lock();
        let shared = &mut *guard;
        let Some(gathered) = shared.gathered.as_mut() else {
            return Ok(());
        };
        for b in buckets_of(shared.zero.plan(), params) {
            gathered.hold(&mut shared.zero, b)?;
        }
        for b in buckets_of(shared.zero.plan(), next) {
            if !gathered.held(b) {
                shared.zero.prefetch(b)?;
            }
        }
        Ok(())
    }

    /// After a layer that used parameters `params` produced `output`: stage 3 frees the
    /// buckets this layer used last and, when training, has backward gather them again when it
    /// reaches `output` — except after the model's `last` layer when training, whose buckets
    /// backward needs at once (as FSDP keeps its root's).
    ///
    /// # Errors
    /// [`TrainError`] when the hook cannot be registered.
    pub fn after_layer(
        &mut self,
        params: Range<usize>,
        output: &Tensor,
        training: bool,
        last: bool,
    ) -> Result<(), TrainError> {
        if training && last {
            return Ok(());
        }
        let ctx = self.ctx();
        let mut guard = self.lock();
        let shared = &mut *guard;
        let Some(gathered) = shared.gathered.as_mut() else {
            return Ok(());
        };
        for b in buckets_of(shared.zero.plan(), params.clone()) {
            let last = shared.zero.plan().buckets()[b].params.end - 1;
            if params.contains(&last) {
                gathered.free(b)?;
                if training && output.requires_grad() {
                    // SAFETY: `ctx` is the boxed shared state `on_reached::<T>` expects; it
                    // outlives this step's graph (a step ends before the engine can drop).
                    unsafe { crate::hooks::on_reached(output, on_reached::<T>, ctx, b) }.map_err(
                        |why| TrainError::Model(format!("cannot hook a layer's output: {why}")),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Stage 3: frees every gathered bucket (a no-op at other stages).
    ///
    /// # Errors
    /// [`TrainError`] when libtorch refuses.
    pub fn free_params(&mut self) -> Result<(), TrainError> {
        match self.lock().gathered.as_mut() {
            Some(g) => g.free_all(),
            None => Ok(()),
        }
    }

    /// After `loss.backward()`: hands in every bucket not handed in yet (zeros for parameters
    /// without a gradient), and reports what went wrong in the hooks.
    ///
    /// # Errors
    /// The first error of this step's hooks, or of handing in.
    pub fn finish_backward(&mut self) -> Result<(), TrainError> {
        let mut guard = self.lock();
        let shared = &mut *guard;
        if let Some(e) = shared.error.take() {
            return Err(e);
        }
        for b in 0..shared.handed.len() {
            if !shared.handed[b] {
                shared.zero.grads_mut(b)?;
                shared.zero.reduce(b)?;
                shared.handed[b] = true;
            }
        }
        Ok(())
    }

    /// Takes the optimizer step, then readies the next: gradients cleared, stage 3's buckets
    /// freed.
    ///
    /// # Errors
    /// [`TrainError`] when the engine's step fails.
    pub fn step(&mut self) -> Result<StepReport, TrainError> {
        let report = {
            let mut guard = self.lock();
            let shared = &mut *guard;
            let report = shared.zero.step()?;
            for (b, bucket) in shared.zero.plan().buckets().iter().enumerate() {
                shared.pending[b] = bucket.params.len();
            }
            shared.handed.fill(false);
            report
        };
        for p in &self.params {
            clear_grad(p);
        }
        self.free_params()?;
        Ok(report)
    }

    /// The whole model, in parameter order, as every rank holds it after a step.
    ///
    /// # Errors
    /// [`TrainError`] when a collective fails.
    pub fn gather_params(&self) -> Result<Vec<f32>, TrainError> {
        let mut full = self.lock().zero.gather_full()?;
        if full.is_empty() {
            return Ok(Vec::new());
        }
        Ok(full.swap_remove(0))
    }

    /// A checksum of the whole model, the same on every rank that holds the same model.
    ///
    /// # Errors
    /// As [`Parallel::gather_params`].
    pub fn checksum(&self) -> Result<u64, TrainError> {
        let full = self.gather_params()?;
        Ok(full.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
            (h ^ u64::from(x.to_bits())).wrapping_mul(0x0000_0100_0000_01b3)
        }))
    }

    /// The minimum and maximum of `value` over the ranks.
    ///
    /// # Errors
    /// [`TrainError`] when the collective fails.
    pub fn agree(&self, value: u64) -> Result<(u64, u64), TrainError> {
        let v = (value >> 1) as i64;
        let mut both = [v, -v];
        self.check.all_reduce(&mut both, ReduceOp::Max)?;
        Ok(((-both[1]) as u64, both[0] as u64))
    }

    /// Sums `values` over the ranks (metrics).
    ///
    /// # Errors
    /// [`TrainError`] when the collective fails.
    pub fn sum(&self, values: &mut [f64]) -> Result<(), TrainError> {
        Ok(self.check.all_reduce(values, ReduceOp::Sum)?)
    }

    /// Writes a sharded checkpoint of the engine into `dir` (every rank calls it).
    ///
    /// # Errors
    /// [`TrainError`] when writing fails on any rank.
    pub fn save(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        Ok(self.lock().zero.save(dir)?)
    }

    /// Writes the whole model and optimizer state as one shard into `dir` (every rank calls
    /// it).
    ///
    /// # Errors
    /// [`TrainError`] when writing fails.
    pub fn save_consolidated(&self, dir: &std::path::Path) -> Result<(), TrainError> {
        Ok(self.lock().zero.save_consolidated(dir)?)
    }

    /// Loads a checkpoint written at any world size or stage from `dir`.
    ///
    /// # Errors
    /// [`TrainError`] naming the file when it does not hold this model.
    pub fn load(&mut self, dir: &std::path::Path) -> Result<(), TrainError> {
        self.lock().zero.load(dir)?;
        self.bind_all()
    }
}

impl<T: Transport + 'static> Drop for Parallel<T> {
    fn drop(&mut self) {
        // The parameters outlive the engine's buffers: give them memory of their own — their
        // values at stages 0–2; at stage 3, where they hold nothing between uses, no elements
        // (take `gather_params` first to keep them).
        let _guard = tch::no_grad_guard();
        let stage3 = self.lock().gathered.is_some();
        for p in &self.params {
            let own = if stage3 {
                Tensor::zeros([0], (Kind::Float, Device::Cpu))
            } else {
                p.copy()
            };
            p.shallow_clone().set_data(&own);
        }
    }
}

/// The buckets holding parameters `params`, in order.
fn buckets_of(plan: &ShardPlan, params: Range<usize>) -> Vec<usize> {
    let mut b: Vec<usize> = params
        .filter_map(|i| plan.slot(i).map(|slot| slot.bucket))
        .collect();
    b.dedup();
    b
}

fn missing(i: usize) -> TrainError {
    TrainError::Model(format!("parameter {i} is not held by the engine"))
}

/// The parameters' values, in order, one flat vector.
fn flatten(params: &[Tensor]) -> Vec<f32> {
    let mut out = Vec::with_capacity(params.iter().map(Tensor::numel).sum());
    for p in params {
        let flat = p.detach().contiguous().view(-1);
        let n = flat.numel();
        let start = out.len();
        out.resize(start + n, 0.0);
        flat.copy_data(&mut out[start..], n);
    }
    out
}

/// Points parameter `p` at `data` (stages 0–2: the engine's flat buffer, which stays in
/// place for the engine's life).
fn bind(p: &Tensor, data: &[f32]) {
    let size = p.size();
    if data.is_empty() || data.len() as i64 != size.iter().product::<i64>() {
        return;
    }
    let strides = contiguous_strides(&size);
    // SAFETY: `data` holds numel(size) f32s and outlives the binding (the parameters get
    // memory of their own when the engine drops); torch only reads parameters, the engine
    // alone writes them.
    let view = unsafe {
        Tensor::from_blob(
            data.as_ptr().cast(),
            &size,
            &strides,
            Kind::Float,
            Device::Cpu,
        )
    };
    let _guard = tch::no_grad_guard();
    p.shallow_clone().set_data(&view);
}

fn contiguous_strides(size: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; size.len()];
    for d in (0..size.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * size[d + 1].max(1);
    }
    strides
}
