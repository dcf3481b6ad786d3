//! The ZeRO engine: what a data-parallel training loop calls, at any stage.
//!
//! A step, at every stage:
//! 1. forward: [`Zero::gather`] each bucket's parameters before its layers run (stage 3
//!    all-gathers them, prefetching with [`Zero::prefetch`]; stages 0–2 hold them all) and
//!    [`Zero::release`] them after;
//! 2. backward: write each bucket's gradients into [`Zero::grads_mut`] and hand it in with
//!    [`Zero::reduce`] as soon as it is complete — its reduction starts at once, on the
//!    communicator's thread, while backward goes on (buckets are reduced in index order on
//!    every rank, whatever order they are handed in);
//! 3. [`Zero::step`]: unscale, agree on overflow and the gradient norm (one all-reduce), clip,
//!    update the shard this rank owns, and (stages 1–2) all-gather the updated parameters.
//!
//! # Caveats
//! Every rank must make the same calls in the same order (gathers, prefetches and hand-ins), as
//! with FSDP and DeepSpeed: the collectives they start are matched by order.

use crate::comm::{AsyncCommunicator, Communicator, Handle};
use crate::reduce::ReduceOp;
use crate::transport::Transport;

use super::grads::Grad;
use super::optim::{update, Optimizer};
use super::plan::ShardPlan;
use super::pool::Pool;
use super::precision::{LossScale, ModelFloat};
use super::ZeroError;

/// Elements widened and updated at a time (64 KiB of f32: stays in L2).
const BLOCK: usize = 16 * 1024;

/// What is sharded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    /// Stage 0: plain data parallelism, every rank holding and updating everything.
    Replicated,
    /// Stage 1: the optimizer state (and master weights).
    Optimizer,
    /// Stage 2: and the reduced gradients.
    Gradients,
    /// Stage 3: and the parameters, gathered bucket by bucket when used.
    Parameters,
}

impl Stage {
    /// The stage of ZeRO's numbering (0–3).
    pub fn from_number(n: u8) -> Option<Self> {
        [
            Self::Replicated,
            Self::Optimizer,
            Self::Gradients,
            Self::Parameters,
        ]
        .get(usize::from(n))
        .copied()
    }

    /// Its number, 0–3.
    pub fn number(self) -> u8 {
        self as u8
    }
}

/// How the engine trains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZeroConfig {
    /// What is sharded.
    pub stage: Stage,
    /// The optimizer on the shards.
    pub optimizer: Optimizer,
    /// Clip the gradients to this global L2 norm (torch's `clip_grad_norm_`).
    pub max_grad_norm: Option<f32>,
    /// The loss scale the gradients come multiplied by ([`LossScale::none`] for none).
    pub loss_scale: LossScale,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Some rank's gradients were not finite: no rank updated anything.
    pub skipped: bool,
    /// The global norm of the unscaled gradients (before clipping).
    pub grad_norm: f64,
    /// The loss scale for the next step.
    pub loss_scale: f32,
}

/// A bucket's gathered parameters (stage 3).
pub(super) enum Live<E> {
    Absent,
    Gathering(Handle<Vec<E>>),
    Here(Vec<E>),
}

impl<E> Live<E> {
    /// Elements held.
    pub(super) fn capacity(&self) -> usize {
        match self {
            Self::Here(v) => v.capacity(),
            _ => 0,
        }
    }
}

/// A ZeRO engine: the model's parameters, gradients and optimizer state as this rank holds
/// them at its stage, and the communicator that shards them.
pub struct Zero<E: ModelFloat, T: Transport + 'static> {
    pub(super) comm: AsyncCommunicator<T>,
    pub(super) plan: ShardPlan,
    pub(super) rank: usize,
    pub(super) config: ZeroConfig,
    /// Optimizer steps taken (skipped ones not counted).
    pub(super) step: u64,
    /// Stages 0–2: the whole flat model; stage 3: this rank's shard.
    pub(super) params: Vec<E>,
    /// f32 master weights where `E` is not f32: stage 0 flat, else this rank's shard.
    pub(super) master: Vec<f32>,
    /// The optimizer's state buffers, laid out as `master`.
    pub(super) state: Vec<Vec<f32>>,
    pub(super) grads: Vec<Grad<E>>,
    /// Stages 0–1: each bucket's whole gradient buffer, kept between steps.
    pub(super) kept: Vec<Vec<E>>,
    /// Stages 2–3: this rank's reduced gradient chunk of each bucket.
    pub(super) grad_shard: Vec<Vec<E>>,
    pub(super) next_reduce: usize,
    pub(super) live: Vec<Live<E>>,
    /// Bucket buffers for reuse.
    pub(super) pool: Pool<E>,
}

impl<E: ModelFloat, T: Transport + 'static> std::fmt::Debug for Zero<E, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zero")
            .field("rank", &self.rank)
            .field("world", &self.plan.world())
            .field("stage", &self.config.stage)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

pub(super) fn input(what: String) -> ZeroError {
    ZeroError::Input { what }
}

impl<E: ModelFloat, T: Transport + 'static> Zero<E, T> {
    /// An engine for `plan` on `comm`, starting from `initial` (every parameter in order; rank
    /// 0's values are broadcast, so all ranks start equal). Checks that every rank built the
    /// same plan and configuration.
    ///
    /// # Errors
    /// [`ZeroError::Input`] when the plan does not fit the communicator, `E` or `initial`, or
    /// differs between ranks; [`ZeroError::Comm`] when a collective fails.
    pub fn new(
        comm: Communicator<T>,
        plan: ShardPlan,
        config: ZeroConfig,
        initial: &[E],
    ) -> Result<Self, ZeroError> {
        if plan.world() != comm.size() {
            return Err(input(format!(
                "the plan is for {} ranks, the communicator has {}",
                plan.world(),
                comm.size()
            )));
        }
        if plan.dtype() != E::DTYPE {
            return Err(input(format!(
                "the plan is for {:?} parameters, the engine holds {:?}",
                plan.dtype(),
                E::DTYPE
            )));
        }
        if initial.len() != plan.numel() {
            return Err(input(format!(
                "{} initial values for a model of {} elements",
                initial.len(),
                plan.numel()
            )));
        }
        let rank = comm.rank();
        let comm = AsyncCommunicator::new(comm)?;
        agree(&comm, &plan, &config)?;
        let mut engine = Self::empty(comm, plan, rank, config);
        engine.load_initial(initial)?;
        Ok(engine)
    }

    /// An engine with zeroed parameters and state, laid out for its stage.
    pub(super) fn empty(
        comm: AsyncCommunicator<T>,
        plan: ShardPlan,
        rank: usize,
        config: ZeroConfig,
    ) -> Self {
        let stage = config.stage;
        let nb = plan.buckets().len();
        let owned = if stage == Stage::Replicated {
            plan.flat_len()
        } else {
            plan.shard_len()
        };
        let params_len = if stage == Stage::Parameters {
            plan.shard_len()
        } else {
            plan.flat_len()
        };
        let mixed = E::as_f32(&[]).is_none();
        let kept = if matches!(stage, Stage::Replicated | Stage::Optimizer) {
            plan.buckets()
                .iter()
                .map(|b| vec![E::ZERO; b.padded(plan.world())])
                .collect()
        } else {
            Vec::new()
        };
        let grad_shard = if matches!(stage, Stage::Gradients | Stage::Parameters) {
            plan.buckets()
                .iter()
                .map(|b| vec![E::ZERO; b.chunk])
                .collect()
        } else {
            Vec::new()
        };
        Self {
            comm,
            rank,
            step: 0,
            params: vec![E::ZERO; params_len],
            master: if mixed { vec![0.0; owned] } else { Vec::new() },
            state: (0..config.optimizer.state_slots())
                .map(|_| vec![0.0; owned])
                .collect(),
            grads: (0..nb).map(|_| Grad::Idle).collect(),
            kept,
            grad_shard,
            next_reduce: 0,
            live: (0..nb).map(|_| Live::Absent).collect(),
            pool: Pool::new(),
            plan,
            config,
        }
    }

    /// Broadcasts rank 0's `initial` bucket by bucket and keeps what this rank holds.
    fn load_initial(&mut self, initial: &[E]) -> Result<(), ZeroError> {
        let world = self.plan.world();
        let send = |comm: &AsyncCommunicator<T>, plan: &ShardPlan, b: usize| {
            let bucket = &plan.buckets()[b];
            let mut buf = vec![E::ZERO; bucket.padded(world)];
            buf[..bucket.len]
                .copy_from_slice(&initial[bucket.logical..bucket.logical + bucket.len]);
            comm.broadcast(buf, 0)
        };
        // Two buckets in flight: the next one travels while this one is kept, and no more than
        // two buckets' worth is ever held beside the engine.
        let nb = self.plan.buckets().len();
        let mut next = (nb > 0).then(|| send(&self.comm, &self.plan, 0));
        for b in 0..nb {
            let Some(handle) = next.take() else { break };
            next = (b + 1 < nb).then(|| send(&self.comm, &self.plan, b + 1));
            let full = handle.wait()?;
            let (params, _) = self.owned_ranges(b);
            let src = match self.config.stage {
                Stage::Parameters => &full[self.plan.chunk(b, self.rank)],
                _ => &full[..],
            };
            let dst = if self.config.stage == Stage::Parameters {
                self.plan.shard_range(b)
            } else {
                self.plan.flat_range(b)
            };
            self.params[dst].copy_from_slice(src);
            self.refresh_master(b, params);
        }
        Ok(())
    }

    /// Bucket `b`'s piece this rank updates: its range in `params`, and in `master`/`state`.
    pub(super) fn owned_ranges(
        &self,
        b: usize,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let plan = &self.plan;
        match self.config.stage {
            Stage::Replicated => (plan.flat_range(b), plan.flat_range(b)),
            Stage::Optimizer | Stage::Gradients => {
                let flat = plan.flat_range(b).start;
                let chunk = plan.chunk(b, self.rank);
                (flat + chunk.start..flat + chunk.end, plan.shard_range(b))
            }
            Stage::Parameters => (plan.shard_range(b), plan.shard_range(b)),
        }
    }

    /// Sets the master weights of bucket `b` from the model copy.
    pub(super) fn refresh_master(&mut self, b: usize, params: std::ops::Range<usize>) {
        if !self.master.is_empty() {
            let (_, owned) = self.owned_ranges(b);
            E::widen_scaled(&self.params[params], &mut self.master[owned], 1.0);
        }
    }

    /// The plan.
    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The configuration.
    pub fn config(&self) -> &ZeroConfig {
        &self.config
    }

    /// Optimizer steps taken (skipped steps not counted).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The loss scale to multiply the next loss by.
    pub fn loss_scale(&self) -> f32 {
        self.config.loss_scale.scale
    }

    /// Starts gathering bucket `b`'s parameters (stage 3), so that a later [`Zero::gather`]
    /// finds them; a no-op at other stages or when already there.
    ///
    /// # Errors
    /// [`ZeroError::Input`] for a bucket that does not exist.
    pub fn prefetch(&mut self, b: usize) -> Result<(), ZeroError> {
        self.check_bucket(b, "prefetch")?;
        if self.config.stage == Stage::Parameters && matches!(self.live[b], Live::Absent) {
            let chunk = &self.params[self.plan.shard_range(b)];
            // Overwritten whole: this rank's chunk now, the others' by the gather.
            let mut full = self.pool.take_any(chunk.len() * self.plan.world(), E::ZERO);
            full[self.plan.chunk(b, self.rank)].copy_from_slice(chunk);
            self.live[b] = Live::Gathering(
                self.comm
                    .submit(move |c| c.all_gather_in_place(&mut full).map(|()| full)),
            );
        }
        Ok(())
    }

    /// Bucket `b`'s parameters (its parameters in order, as [`ShardPlan::slot`] places them),
    /// gathered first at stage 3.
    ///
    /// # Errors
    /// [`ZeroError::Input`] for a bucket that does not exist; [`ZeroError::Comm`].
    pub fn gather(&mut self, b: usize) -> Result<&[E], ZeroError> {
        self.prefetch(b)?;
        let len = self.plan.buckets()[b].len;
        if self.config.stage != Stage::Parameters {
            let start = self.plan.flat_range(b).start;
            return Ok(&self.params[start..start + len]);
        }
        if let Live::Gathering(_) = self.live[b] {
            let Live::Gathering(handle) = std::mem::replace(&mut self.live[b], Live::Absent) else {
                unreachable!("matched above")
            };
            self.live[b] = Live::Here(handle.wait()?);
        }
        match &self.live[b] {
            Live::Here(full) => Ok(&full[..len]),
            _ => Err(input(format!("bucket {b} was not gathered"))),
        }
    }

    /// Frees bucket `b`'s gathered parameters (stage 3; a no-op otherwise).
    pub fn release(&mut self, b: usize) {
        if let Some(live) = self.live.get_mut(b) {
            match std::mem::replace(live, Live::Absent) {
                Live::Here(full) => self.pool.give(full),
                // Released before it was used: the gather still runs (it is queued, so the
                // ranks stay matched); its buffer comes back when it is done.
                Live::Gathering(h) => {
                    if let Ok(full) = h.wait() {
                        self.pool.give(full);
                    }
                }
                Live::Absent => {}
            }
        }
    }

    /// Parameter `i`, when its bucket is held (always at stages 0–2; at stage 3 once gathered).
    pub fn param(&self, i: usize) -> Option<&[E]> {
        let slot = self.plan.slot(i)?;
        let range = slot.offset..slot.offset + slot.numel;
        if self.config.stage == Stage::Parameters {
            match &self.live[slot.bucket] {
                Live::Here(full) => Some(&full[range]),
                _ => None,
            }
        } else {
            let start = self.plan.flat_range(slot.bucket).start;
            Some(&self.params[start + range.start..start + range.end])
        }
    }

    /// Takes an optimizer step from the reduced gradients (see the module's steps).
    ///
    /// # Errors
    /// [`ZeroError::Input`] when a bucket was not handed in: nothing is updated, and the step
    /// can be taken once it is (reductions already started stay matched across ranks);
    /// [`ZeroError::Comm`].
    pub fn step(&mut self) -> Result<StepReport, ZeroError> {
        self.finish_reductions()?;
        self.next_reduce = 0;
        for g in &mut self.grads {
            *g = Grad::Idle;
        }
        let inv_scale = 1.0 / self.config.loss_scale.scale;
        // This rank's share of the norm and of the non-finite count (stage 0: all of it).
        let mut sumsq = 0f64;
        let mut block = [0f32; BLOCK];
        for b in 0..self.plan.buckets().len() {
            for grads in self.owned_grads(b).chunks(BLOCK) {
                let block = &mut block[..grads.len()];
                E::widen_scaled(grads, block, inv_scale);
                sumsq += sum_of_squares(block);
            }
        }
        // A non-finite gradient makes the sum non-finite (finite f32 squares cannot overflow
        // an f64 sum), so one flag tells it.
        let mut bad = f64::from(u8::from(!sumsq.is_finite()));
        if self.config.stage != Stage::Replicated {
            let totals = self
                .comm
                .all_reduce(vec![bad, sumsq], ReduceOp::Sum)
                .wait()?;
            (bad, sumsq) = (totals[0], totals[1]);
        }
        let grad_norm = sumsq.sqrt();
        if bad > 0.0 {
            self.config.loss_scale.update(true);
            (0..self.live.len()).for_each(|b| self.release(b));
            return Ok(StepReport {
                skipped: true,
                grad_norm: f64::INFINITY,
                loss_scale: self.config.loss_scale.scale,
            });
        }
        let clip = match self.config.max_grad_norm {
            Some(max) if grad_norm > f64::from(max) => (f64::from(max) / (grad_norm + 1e-6)) as f32,
            _ => 1.0,
        };
        self.step += 1;
        for b in 0..self.plan.buckets().len() {
            self.update_bucket(b, inv_scale * clip);
        }
        match self.config.stage {
            Stage::Optimizer | Stage::Gradients => self.gather_updated()?,
            Stage::Parameters => (0..self.live.len()).for_each(|b| self.release(b)),
            Stage::Replicated => {}
        }
        self.config.loss_scale.update(false);
        Ok(StepReport {
            skipped: false,
            grad_norm,
            loss_scale: self.config.loss_scale.scale,
        })
    }

    fn update_bucket(&mut self, b: usize, factor: f32) {
        let (params, owned) = self.owned_ranges(b);
        let (params_again, owned_again) = (params.clone(), owned.clone());
        let opt: Optimizer = self.config.optimizer;
        let step = self.step;
        // Block by block, so that the widened gradients stay in cache between the two loops.
        let mut block = [0f32; BLOCK];
        let grads = match self.config.stage {
            Stage::Replicated => &self.kept[b][..],
            Stage::Optimizer => &self.kept[b][self.plan.chunk(b, self.rank)],
            Stage::Gradients | Stage::Parameters => &self.grad_shard[b][..],
        };
        let mut state: Vec<&mut [f32]> = self
            .state
            .iter_mut()
            .map(|s| &mut s[owned.clone()])
            .collect();
        // An f32 model is its own master; any other keeps f32 masters (`empty` made them).
        let mixed = E::as_f32(&[]).is_none();
        let master: &mut [f32] = match E::as_f32_mut(&mut self.params[params]) {
            Some(model) => model,
            None => &mut self.master[owned],
        };
        for (i, g) in grads.chunks(BLOCK).enumerate() {
            let at = i * BLOCK..i * BLOCK + g.len();
            let block = &mut block[..g.len()];
            E::widen_scaled(g, block, factor);
            let mut views: Vec<&mut [f32]> = state.iter_mut().map(|s| &mut s[at.clone()]).collect();
            update(&opt, step, &mut master[at.clone()], block, &mut views);
        }
        if mixed {
            E::narrow(&self.master[owned_again], &mut self.params[params_again]);
        }
    }

    /// Stages 1–2: every bucket's updated chunks to every rank, in one job on the
    /// communicator's thread.
    pub(super) fn gather_updated(&mut self) -> Result<(), ZeroError> {
        // In place: the flat buffer travels to the communicator's thread and back, each owned
        // chunk already where the gather puts it.
        let pieces: Vec<_> = (0..self.plan.buckets().len())
            .map(|b| self.plan.flat_range(b))
            .collect();
        let mut params = std::mem::take(&mut self.params);
        let gathered = self
            .comm
            .submit(move |c| {
                let result = pieces
                    .into_iter()
                    .try_for_each(|flat| c.all_gather_in_place(&mut params[flat]));
                Ok((params, result))
            })
            .wait();
        let (params, result) = gathered?;
        self.params = params;
        Ok(result?)
    }
}

/// Σ x², in f64, with independent accumulators so that it vectorizes instead of waiting on
/// one chain of additions.
fn sum_of_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    let tail: f64 = rest.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
    acc.iter().sum::<f64>() + tail
}

/// Every rank must have built the same plan and configuration: a fingerprint's minimum and
/// maximum over the ranks must both be this rank's.
fn agree<T: Transport + 'static>(
    comm: &AsyncCommunicator<T>,
    plan: &ShardPlan,
    config: &ZeroConfig,
) -> Result<(), ZeroError> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    plan.params().hash(&mut h);
    for b in plan.buckets() {
        (b.params.start, b.params.end, b.chunk).hash(&mut h);
    }
    config.stage.number().hash(&mut h);
    format!("{:?}{:?}", config.optimizer, config.max_grad_norm).hash(&mut h);
    let mine = (h.finish() >> 1) as i64;
    let seen = comm.all_reduce(vec![mine, -mine], ReduceOp::Max).wait()?;
    if seen[0] != mine || seen[1] != -mine {
        return Err(input(
            "the ranks built different plans or configurations (parameters, bucket size, stage \
             or optimizer differ); build them from the same model and settings on every rank"
                .into(),
        ));
    }
    Ok(())
}
