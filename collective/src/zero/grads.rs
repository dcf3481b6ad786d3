//! Gradients into the engine: each bucket's buffer, handed in as backward completes it and
//! reduced at once on the communicator's thread — all-reduced (stage 0) or reduce-scattered
//! in place into the owner's chunk (stages 1–3; stages 2–3 keep only the chunk and give the
//! bucket's buffer back for reuse as soon as it is reduced) — in bucket order on every rank.

use crate::comm::Handle;
use crate::reduce::ReduceOp;
use crate::transport::Transport;

use super::engine::{input, Stage, Zero};
use super::precision::ModelFloat;
use super::ZeroError;

/// Stage 2–3 reductions left running while backward writes the next bucket.
const IN_FLIGHT: usize = 2;

/// A bucket's gradients this step.
pub(super) enum Grad<E> {
    /// Not written yet.
    Idle,
    /// Being written, or handed in and waiting for an earlier bucket.
    Open { buf: Vec<E>, handed: bool },
    /// Being reduced: the handle gives back the buffer to keep (stages 0–1) and the chunk.
    Reducing(Handle<(Vec<E>, Vec<E>)>),
    /// Reduced (stages 2–3 keep the chunk in the shard buffer, `buf` is empty).
    Reduced,
}

impl<E: ModelFloat, T: Transport + 'static> Zero<E, T> {
    pub(super) fn check_bucket(&self, b: usize, what: &str) -> Result<(), ZeroError> {
        let n = self.plan.buckets().len();
        if b < n {
            Ok(())
        } else {
            Err(input(format!(
                "{what}: bucket {b} does not exist (the plan has {n})"
            )))
        }
    }

    /// Bucket `b`'s gradient buffer for this step (its parameters in order, zeroed at first
    /// use in a step); write the gradients (times the loss scale) there, then [`Zero::reduce`].
    ///
    /// # Errors
    /// [`ZeroError::Input`] when the bucket does not exist or was handed in already this step.
    pub fn grads_mut(&mut self, b: usize) -> Result<&mut [E], ZeroError> {
        self.check_bucket(b, "grads_mut")?;
        let len = self.plan.buckets()[b].len;
        if let Grad::Idle = self.grads[b] {
            let buf = if self.kept.is_empty() {
                // Backward may outrun the reductions: wait for the oldest, so that the bucket
                // buffers alive stay a few, not the whole model's gradients.
                let reducing: Vec<usize> = (0..self.grads.len())
                    .filter(|&i| matches!(self.grads[i], Grad::Reducing(_)))
                    .collect();
                for &i in reducing
                    .iter()
                    .take(reducing.len().saturating_sub(IN_FLIGHT))
                {
                    self.settle(i)?;
                }
                self.pool
                    .take(self.plan.buckets()[b].padded(self.plan.world()), E::ZERO)
            } else {
                let mut buf = std::mem::take(&mut self.kept[b]);
                buf.fill(E::ZERO);
                buf
            };
            self.grads[b] = Grad::Open { buf, handed: false };
        }
        match &mut self.grads[b] {
            Grad::Open { buf, handed: false } => Ok(&mut buf[..len]),
            _ => Err(input(format!(
                "bucket {b}'s gradients were handed in already this step"
            ))),
        }
    }

    /// Copies `grads` (bucket `b`'s, its parameters in order) in and hands the bucket in.
    ///
    /// # Errors
    /// As [`Zero::grads_mut`], and [`ZeroError::Input`] for a length other than the bucket's.
    pub fn hand_in(&mut self, b: usize, grads: &[E]) -> Result<(), ZeroError> {
        self.check_bucket(b, "hand_in")?;
        let len = self.plan.buckets()[b].len;
        if grads.len() != len {
            return Err(input(format!(
                "bucket {b} holds {len} gradient elements, {} were handed in",
                grads.len()
            )));
        }
        self.grads_mut(b)?.copy_from_slice(grads);
        self.reduce(b)
    }

    /// Hands bucket `b`'s gradients in: its reduction starts as soon as every lower bucket is
    /// in (so all ranks reduce in the same order).
    ///
    /// # Errors
    /// [`ZeroError::Input`] when the bucket was handed in already this step.
    pub fn reduce(&mut self, b: usize) -> Result<(), ZeroError> {
        self.grads_mut(b)?;
        if let Grad::Open { handed, .. } = &mut self.grads[b] {
            *handed = true;
        }
        while self.next_reduce < self.grads.len() {
            let b = self.next_reduce;
            let Grad::Open { handed: true, .. } = self.grads[b] else {
                break;
            };
            let Grad::Open { buf, .. } = std::mem::replace(&mut self.grads[b], Grad::Idle) else {
                unreachable!("matched above")
            };
            self.grads[b] = Grad::Reducing(self.start_reduction(b, buf));
            self.next_reduce += 1;
        }
        Ok(())
    }

    fn start_reduction(&mut self, b: usize, buf: Vec<E>) -> Handle<(Vec<E>, Vec<E>)> {
        let rank = self.rank;
        match self.config.stage {
            Stage::Replicated => self.comm.submit(move |c| {
                let mut buf = buf;
                c.all_reduce(&mut buf, ReduceOp::Avg)?;
                Ok((buf, Vec::new()))
            }),
            // In place: the owned chunk of the kept buffer ends reduced.
            Stage::Optimizer => self.comm.submit(move |c| {
                let mut buf = buf;
                c.reduce_scatter_in_place(&mut buf, ReduceOp::Avg)?;
                Ok((buf, Vec::new()))
            }),
            Stage::Gradients | Stage::Parameters => {
                let mut chunk = std::mem::take(&mut self.grad_shard[b]);
                let pool = self.pool.clone();
                self.comm.submit(move |c| {
                    let mut buf = buf;
                    let result = c.reduce_scatter_in_place(&mut buf, ReduceOp::Avg);
                    if result.is_ok() {
                        let m = chunk.len();
                        chunk.copy_from_slice(&buf[rank * m..(rank + 1) * m]);
                    }
                    // The bucket's whole gradients go as soon as they are reduced.
                    pool.give(buf);
                    result.map(|()| (Vec::new(), chunk))
                })
            }
        }
    }

    /// Waits for every reduction; the buckets not handed in are named.
    pub(super) fn finish_reductions(&mut self) -> Result<(), ZeroError> {
        let missing: Vec<usize> = (0..self.grads.len())
            .filter(|&b| matches!(self.grads[b], Grad::Idle | Grad::Open { handed: false, .. }))
            .collect();
        if let Some(&first) = missing.first() {
            let names: Vec<&str> = self.plan.buckets()[first]
                .params
                .clone()
                .map(|i| self.plan.params()[i].name.as_str())
                .take(3)
                .collect();
            return Err(input(format!(
                "step: bucket(s) {missing:?} were not handed in this step (bucket {first} holds \
                 {names:?}…); hand in every bucket — zeros for parameters without gradients"
            )));
        }
        for b in 0..self.grads.len() {
            self.settle(b)?;
        }
        Ok(())
    }

    /// Waits for bucket `b`'s reduction, if it is running, and keeps its result.
    fn settle(&mut self, b: usize) -> Result<(), ZeroError> {
        if let Grad::Reducing(handle) = std::mem::replace(&mut self.grads[b], Grad::Reduced) {
            let (buf, chunk) = handle.wait()?;
            match self.config.stage {
                Stage::Replicated | Stage::Optimizer => self.kept[b] = buf,
                Stage::Gradients | Stage::Parameters => self.grad_shard[b] = chunk,
            }
        }
        Ok(())
    }

    /// Bucket `b`'s reduced gradients this rank updates from.
    pub(super) fn owned_grads(&self, b: usize) -> &[E] {
        match self.config.stage {
            Stage::Replicated => &self.kept[b],
            Stage::Optimizer => &self.kept[b][self.plan.chunk(b, self.rank)],
            Stage::Gradients | Stage::Parameters => &self.grad_shard[b],
        }
    }
}
