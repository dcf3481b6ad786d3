//! Sharded checkpoints of a [`Zero`] engine, loadable at any world size and stage.
//!
//! # Format
//! A directory: one `shard-RRRRR-of-WWWWW.bin` per rank and a `manifest.json`, written last.
//! A shard is the magic `FERRUNZ1`, a little-endian `u32` header length, a JSON header (the
//! model's parameters, the runs of logical elements the shard holds, the arrays) and then, array
//! after array (f32 master weights, then each optimizer state buffer), the f32 values of those
//! runs, little-endian. Because runs are in the logical order ([`super::plan`]) — not in any
//! plan's buckets — a rank of any other world size, bucket size or stage finds what it owns in
//! any shard: loading re-shards, optimizer state included. A consolidated checkpoint is the same
//! with one shard.
//!
//! # Guarantees
//! - Never half-written: each file is written to a temporary name, synced and renamed; the
//!   manifest only after every rank's shard is in place (a collective says so).
//! - Loading checks the model (names and shapes, in order, and the dtype), every file named by
//!   the manifest, and every length against the file's size before reading.
//!
//! # Trust
//! Files are untrusted input: a manifest may only name files of the shard pattern inside the
//! directory; headers are capped at [`MAX_HEADER`] bytes; runs must lie inside the model and
//! the file; any violation is [`ZeroError::Checkpoint`] naming the file.

use std::path::Path;

use crate::reduce::ReduceOp;
use crate::transport::Transport;

use crate::zero::engine::{Stage, Zero};
use crate::zero::optim::Optimizer;
use crate::zero::plan::ParamSpec;
use crate::zero::precision::{LossScale, ModelFloat};
use crate::zero::ZeroError;
pub use file::MAX_HEADER;
use file::{covers, read_capped, write_atomic, write_file, Shard};

mod file;

const MANIFEST: &str = "manifest.json";

/// The manifest: what the checkpoint holds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// The model.
    pub params: Vec<ParamSpec>,
    /// Its dtype (`F32`, `F16`, `Bf16`).
    pub dtype: String,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Optimizer steps taken.
    pub step: u64,
    /// The loss scaler.
    pub loss_scale: LossScale,
    /// The shard files, in rank order.
    pub shards: Vec<String>,
    /// The world size and stage it was saved at (for people; loading needs neither).
    pub saved_world: usize,
    /// The stage it was saved at.
    pub saved_stage: Stage,
}

pub(super) fn err(path: &Path, what: impl Into<String>) -> ZeroError {
    ZeroError::Checkpoint {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn shard_name(rank: usize, world: usize) -> String {
    format!("shard-{rank:05}-of-{world:05}.bin")
}

/// A run of logical elements this rank owns.
#[derive(Debug, Clone, Copy)]
struct Run {
    bucket: usize,
    logical: usize,
    len: usize,
}

/// The runs this engine owns, one per bucket (its chunk without the padding; stage 0: all), in
/// logical order (bucket 0 holds the last parameters).
fn owned_runs<E: ModelFloat, T: Transport + 'static>(z: &Zero<E, T>, whole: bool) -> Vec<Run> {
    let plan = &z.plan;
    (0..plan.buckets().len())
        .rev()
        .filter_map(|b| {
            // A shard holds this rank's chunk of each bucket, at every stage: at stage 0, where
            // every rank holds everything (`whole` takes all of it), the chunks make the ranks'
            // shards cover the model exactly once.
            let bucket = &plan.buckets()[b];
            let logical = if whole && z.config.stage == Stage::Replicated {
                bucket.logical..bucket.logical + bucket.len
            } else {
                plan.chunk_logical(b, z.rank)
            };
            (!logical.is_empty()).then_some(Run {
                bucket: b,
                logical: logical.start,
                len: logical.len(),
            })
        })
        .collect()
}

impl<E: ModelFloat, T: Transport + 'static> Zero<E, T> {
    /// The arrays of this rank's runs: f32 master weights (for an f32 model, the parameters
    /// themselves), then each state buffer.
    fn shard_arrays(&self, runs: &[Run]) -> Vec<Vec<f32>> {
        let total: usize = runs.iter().map(|r| r.len).sum();
        let mut arrays = vec![Vec::with_capacity(total); 1 + self.state.len()];
        for run in runs {
            // A run starts where its bucket's owned piece does (stage 0 owns the whole bucket:
            // the run is its chunk of it).
            let (params, owned) = self.owned_ranges(run.bucket);
            let skip = if self.config.stage == Stage::Replicated {
                run.logical - self.plan.buckets()[run.bucket].logical
            } else {
                0
            };
            let params = params.start + skip..params.end;
            let owned = owned.start + skip..owned.start + skip + run.len;
            match E::as_f32(&self.params[params.start..params.start + run.len]) {
                Some(p) if self.master.is_empty() => arrays[0].extend_from_slice(p),
                _ => arrays[0].extend_from_slice(&self.master[owned.clone()]),
            }
            for (a, s) in arrays[1..].iter_mut().zip(&self.state) {
                a.extend_from_slice(&s[owned.clone()]);
            }
        }
        arrays
    }

    fn manifest(&self, shards: Vec<String>) -> Manifest {
        Manifest {
            version: 1,
            params: self.plan.params().to_vec(),
            dtype: format!("{:?}", E::DTYPE),
            optimizer: self.config.optimizer,
            step: self.step,
            loss_scale: self.config.loss_scale,
            shards,
            saved_world: self.plan.world(),
            saved_stage: self.config.stage,
        }
    }

    /// Saves this rank's shard under `dir` (every rank calls it; the manifest is written by rank
    /// 0 once all shards are in place).
    ///
    /// # Errors
    /// [`ZeroError::Checkpoint`] when any rank could not write (all ranks return an error).
    pub fn save(&self, dir: &Path) -> Result<(), ZeroError> {
        let world = self.plan.world();
        let runs = owned_runs(self, false);
        let mine = self.write_shard(dir, &shard_name(self.rank, world), &runs);
        let names = (0..world).map(|r| shard_name(r, world)).collect();
        self.finish_save(dir, mine, names)
    }

    fn write_shard(&self, dir: &Path, name: &str, runs: &[Run]) -> Result<(), ZeroError> {
        let arrays = self.shard_arrays(runs);
        let runs: Vec<(usize, usize)> = runs.iter().map(|r| (r.logical, r.len)).collect();
        write_file(dir, name, &runs, &arrays)
    }

    /// All ranks agree whether every shard is written; rank 0 then writes the manifest.
    fn finish_save(
        &self,
        dir: &Path,
        mine: Result<(), ZeroError>,
        shards: Vec<String>,
    ) -> Result<(), ZeroError> {
        let failed = i32::from(mine.is_err());
        let failures = self.comm.all_reduce(vec![failed], ReduceOp::Sum).wait()?[0];
        mine?;
        if failures > 0 {
            return Err(err(
                dir,
                format!("{failures} rank(s) could not write their shard"),
            ));
        }
        let wrote = if self.rank == 0 {
            let manifest = serde_json::to_vec_pretty(&self.manifest(shards))
                .map_err(|e| err(dir, e.to_string()));
            manifest.and_then(|m| write_atomic(&dir.join(MANIFEST), &[&m]))
        } else {
            Ok(())
        };
        let failed = self
            .comm
            .all_reduce(vec![i32::from(wrote.is_err())], ReduceOp::Sum)
            .wait()?[0];
        wrote?;
        if failed > 0 {
            return Err(err(dir, "rank 0 could not write the manifest"));
        }
        Ok(())
    }

    /// The whole model's f32 master weights and optimizer state, in logical order, on every
    /// rank: `[master, state…]` (every rank calls it).
    ///
    /// # Errors
    /// [`ZeroError::Comm`].
    pub fn gather_full(&self) -> Result<Vec<Vec<f32>>, ZeroError> {
        let runs = owned_runs(self, true);
        let mine = self.shard_arrays(&runs);
        let mut whole: Vec<Vec<f32>> = vec![vec![0.0; self.plan.numel()]; mine.len()];
        let runs: Vec<(usize, usize)> = runs.iter().map(|r| (r.logical, r.len)).collect();
        if self.config.stage == Stage::Replicated || self.plan.world() == 1 {
            place(&mut whole, &runs, &mine);
            return Ok(whole);
        }
        // Every rank's runs and arrays, through all-gathers padded to the longest.
        let longest = self
            .comm
            .all_reduce(vec![runs.len() as i64, mine[0].len() as i64], ReduceOp::Max)
            .wait()?;
        let (nruns, nvals) = (longest[0] as usize, longest[1] as usize);
        let mut flat_runs = vec![-1i64; 2 * nruns];
        for (i, r) in runs.iter().enumerate() {
            flat_runs[2 * i] = r.0 as i64;
            flat_runs[2 * i + 1] = r.1 as i64;
        }
        let all_runs = self.comm.all_gather(flat_runs).wait()?;
        let mut all_arrays = Vec::with_capacity(mine.len());
        for a in &mine {
            let mut padded = a.clone();
            padded.resize(nvals, 0.0);
            all_arrays.push(self.comm.all_gather(padded).wait()?);
        }
        for r in 0..self.plan.world() {
            let their: Vec<(usize, usize)> = all_runs[2 * nruns * r..2 * nruns * (r + 1)]
                .chunks_exact(2)
                .filter(|p| p[0] >= 0)
                .map(|p| (p[0] as usize, p[1] as usize))
                .collect();
            let arrays: Vec<Vec<f32>> = all_arrays
                .iter()
                .map(|a| a[nvals * r..nvals * (r + 1)].to_vec())
                .collect();
            place(&mut whole, &their, &arrays);
        }
        Ok(whole)
    }

    /// Saves a consolidated checkpoint (one shard holding everything) under `dir`, written by
    /// rank 0; every rank calls it. Every rank assembles the whole state for a moment (through
    /// [`Zero::gather_full`]: master and optimizer state, `4Ψ` bytes each), so it needs that
    /// much memory free on every rank; [`Zero::save`] needs none.
    ///
    /// # Errors
    /// As [`Zero::save`].
    pub fn save_consolidated(&self, dir: &Path) -> Result<(), ZeroError> {
        let whole = self.gather_full()?;
        let mine = if self.rank == 0 {
            let numel = self.plan.numel();
            let runs = if numel > 0 {
                vec![(0, numel)]
            } else {
                Vec::new()
            };
            write_file(dir, &shard_name(0, 1), &runs, &whole)
        } else {
            Ok(())
        };
        self.finish_save(dir, mine, vec![shard_name(0, 1)])
    }

    /// Loads the checkpoint under `dir` (saved at any world size, bucket size or stage) into
    /// this engine: parameters, optimizer state, step count and loss scale.
    ///
    /// # Errors
    /// [`ZeroError::Checkpoint`] for another model, a missing or damaged shard, or an
    /// optimizer of another kind; every rank returns an error if any rank fails.
    pub fn load(&mut self, dir: &Path) -> Result<(), ZeroError> {
        let loaded = self.read_checkpoint(dir);
        let failed = self
            .comm
            .all_reduce(vec![i32::from(loaded.is_err())], ReduceOp::Sum)
            .wait()?[0];
        let manifest = loaded?;
        if failed > 0 {
            return Err(err(dir, format!("{failed} rank(s) could not load it")));
        }
        self.step = manifest.step;
        self.config.loss_scale = manifest.loss_scale;
        if matches!(self.config.stage, Stage::Optimizer | Stage::Gradients) {
            self.gather_updated()?;
        }
        Ok(())
    }

    fn read_checkpoint(&mut self, dir: &Path) -> Result<Manifest, ZeroError> {
        let path = dir.join(MANIFEST);
        let text = read_capped(&path, MAX_HEADER)?;
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| err(&path, format!("not a manifest: {e}")))?;
        if manifest.version != 1 {
            return Err(err(
                &path,
                format!("format version {}; this ferrun reads 1", manifest.version),
            ));
        }
        self.plan
            .same_model(&manifest.params)
            .map_err(|d| err(&path, format!("another model: {d}")))?;
        if manifest.dtype != format!("{:?}", E::DTYPE) {
            return Err(err(
                &path,
                format!("a {} model; this one is {:?}", manifest.dtype, E::DTYPE),
            ));
        }
        if manifest.optimizer.name() != self.config.optimizer.name()
            || manifest.optimizer.state_slots() != self.config.optimizer.state_slots()
        {
            return Err(err(
                &path,
                format!(
                    "saved with {:?}; this engine runs {:?}",
                    manifest.optimizer, self.config.optimizer
                ),
            ));
        }
        let shards = manifest
            .shards
            .iter()
            .map(|name| Shard::open(dir, name, self.plan.numel(), 1 + self.state.len()))
            .collect::<Result<Vec<_>, _>>()?;
        covers(&shards, self.plan.numel()).map_err(|what| err(dir, what))?;
        for (b, bucket) in self.plan.buckets().to_vec().iter().enumerate() {
            let (params, owned) = self.owned_ranges(b);
            let logical = if self.config.stage == Stage::Replicated {
                bucket.logical..bucket.logical + bucket.len
            } else {
                self.plan.chunk_logical(b, self.rank)
            };
            let mut arrays = vec![vec![0f32; owned.len()]; 1 + self.state.len()];
            for shard in &shards {
                shard.read_into(logical.clone(), &mut arrays)?;
            }
            for (s, a) in self.state.iter_mut().zip(&arrays[1..]) {
                s[owned.clone()].copy_from_slice(a);
            }
            E::narrow(&arrays[0], &mut self.params[params]);
            if !self.master.is_empty() {
                self.master[owned].copy_from_slice(&arrays[0]);
            }
        }
        Ok(manifest)
    }
}

/// Copies arrays of `runs` (value offsets in run order) into the logical `whole`.
fn place(whole: &mut [Vec<f32>], runs: &[(usize, usize)], arrays: &[Vec<f32>]) {
    let mut at = 0;
    for &(logical, len) in runs {
        for (w, a) in whole.iter_mut().zip(arrays) {
            w[logical..logical + len].copy_from_slice(&a[at..at + len]);
        }
        at += len;
    }
}
