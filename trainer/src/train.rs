//! The training loop of `ferrun-train`: the digits, an MLP, any ZeRO stage, checkpoints and
//! elastic resume; one progress line per epoch from rank 0 and a final summary line.
//!
//! A resumed job (asked for, or started by the launcher after a failure, with
//! `TORCHELASTIC_RESTART_COUNT` > 0) loads the latest complete checkpoint at whatever world
//! size it now has and continues the epoch where its sample order stood.
//!
//! For the tests of that path, `FERRUN_TRAIN_KILL_AT_STEP=STEP:RANK` makes rank `RANK` of the
//! first attempt SIGKILL itself before step `STEP`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use ferrun_collective::comm::{Communicator, Options};
use ferrun_collective::reduce::DType;
use ferrun_collective::transport::Transport;
use ferrun_collective::zero::{LossScale, Optimizer, PlanConfig, ShardPlan, Stage, ZeroConfig};
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::{self, State};
use crate::data::{self, Split, FEATURES};
use crate::model::Mlp;
use crate::parallel::Parallel;
use crate::sampler::{Remainder, Sampler};
use crate::TrainError;

/// How to train.
#[derive(Debug, Clone)]
pub struct Config {
    /// What is sharded (stage 0 is DDP).
    pub stage: Stage,
    /// Epochs to train.
    pub epochs: u64,
    /// Samples per rank per step.
    pub batch: usize,
    /// The optimizer.
    pub optimizer: Optimizer,
    /// Hidden layer widths.
    pub hidden: Vec<i64>,
    /// Reduce each bucket during backward (off: after it).
    pub overlap: bool,
    /// Bytes of a gradient bucket, and of the first one.
    pub bucket_bytes: usize,
    /// The first (last parameters') bucket's bytes.
    pub first_bucket_bytes: usize,
    /// Seeds the initial parameters and the shuffling.
    pub seed: u64,
    /// Where checkpoints go.
    pub checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every this many steps (0: at the end of each epoch only).
    pub checkpoint_every: u64,
    /// Resume from the latest complete checkpoint if there is one.
    pub resume: bool,
    /// Stop after this many steps (all epochs otherwise).
    pub max_steps: Option<u64>,
    /// The digits file (found in the Python environment otherwise).
    pub data: Option<PathBuf>,
    /// Rank 0 writes the final parameters here (f32 little-endian).
    pub dump_params: Option<PathBuf>,
}

/// How training ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Held-out accuracy.
    pub accuracy: f64,
    /// Held-out mean loss.
    pub loss: f64,
    /// Steps taken in all (resumed ones included).
    pub steps: u64,
    /// Training samples a second, over the ranks, in this run.
    pub samples_per_s: f64,
    /// The checksum of the final parameters, equal on every rank.
    pub checksum: u64,
    /// Where training resumed from.
    pub resumed_from: Option<u64>,
}

/// Trains as `config` says, as one worker of the job the environment describes.
///
/// # Errors
/// [`TrainError`] naming what failed: data, checkpoint, model or collective.
pub fn run(config: &Config) -> Result<Summary, TrainError> {
    // Absent: a first attempt; anything but a count is refused rather than read as one (it
    // decides whether the worker resumes).
    let restarted = match std::env::var("TORCHELASTIC_RESTART_COUNT") {
        Err(_) => 0,
        Ok(v) => v.trim().parse::<u32>().map_err(|_| {
            TrainError::Model(format!(
                "TORCHELASTIC_RESTART_COUNT={v:?} is not a restart count; the launcher sets it \
                 to 0, 1, …"
            ))
        })?,
    };
    let path = data::locate(config.data.as_deref())?;
    let digits = data::load(&path)?;
    let comm = Communicator::from_env("ferrun-train", Options::default())
        .map_err(|e| TrainError::Model(format!("joining the job: {e}")))?;
    Trainer::new(comm, config, restarted)?.train(&digits.train, &digits.held_out)
}

struct Trainer<'c, T: Transport + 'static> {
    config: &'c Config,
    model: Mlp,
    _vs: nn::VarStore,
    par: Parallel<T>,
    rank: usize,
    world: usize,
    sizes: Vec<i64>,
    restarted: u32,
    out: Progress,
}

impl<'c, T: Transport + 'static> Trainer<'c, T> {
    fn new(comm: Communicator<T>, config: &'c Config, restarted: u32) -> Result<Self, TrainError> {
        let (rank, world) = (comm.rank(), comm.size());
        tch::manual_seed(config.seed as i64);
        let vs = nn::VarStore::new(Device::Cpu);
        let mut sizes = vec![FEATURES as i64];
        sizes.extend(&config.hidden);
        sizes.push(data::CLASSES as i64);
        let model = Mlp::new(&vs.root(), &sizes);
        let (specs, tensors): (Vec<_>, Vec<_>) = model.parameters().into_iter().unzip();
        let plan = ShardPlan::new(
            specs,
            DType::F32,
            world,
            PlanConfig {
                bucket_bytes: config.bucket_bytes,
                align: 16,
                first_bucket_bytes: Some(config.first_bucket_bytes),
            },
        )?;
        let zero = ZeroConfig {
            stage: config.stage,
            optimizer: config.optimizer,
            max_grad_norm: None,
            loss_scale: LossScale::none(),
        };
        let par = Parallel::new(comm, tensors, plan, zero, config.overlap)?;
        Ok(Self {
            config,
            model,
            _vs: vs,
            par,
            rank,
            world,
            sizes,
            restarted,
            out: Progress::new(rank == 0),
        })
    }

    /// Loads the latest complete checkpoint, if asked to and there is one.
    fn resume(&mut self) -> Result<Option<State>, TrainError> {
        let Some(root) = &self.config.checkpoint_dir else {
            return Ok(None);
        };
        if !self.config.resume && self.restarted == 0 {
            return Ok(None);
        }
        let Some((_, dir)) = checkpoint::latest(root) else {
            self.out.line(&format!(
                "no complete checkpoint in {}: starting afresh",
                root.display()
            ));
            return Ok(None);
        };
        let state = checkpoint::read_state(&dir)?;
        if state.sizes != self.sizes {
            return Err(TrainError::Checkpoint {
                path: dir.display().to_string(),
                what: format!(
                    "it holds a model of layers {:?}, this run builds {:?}: pass the same \
                     --hidden, or another --checkpoint-dir",
                    state.sizes, self.sizes
                ),
            });
        }
        self.par.load(&dir)?;
        self.out.line(&format!(
            "resumed from {} (step {}, epoch {}, {} samples into it; written by {} ranks, now {})",
            dir.display(),
            state.step,
            state.epoch + 1,
            state.consumed,
            state.world,
            self.world
        ));
        Ok(Some(state))
    }

    /// Where training stands, as a checkpoint records it.
    fn state(&self, step: u64, epoch: u64, consumed: usize, seed: u64) -> State {
        State {
            step,
            epoch,
            consumed,
            seed,
            world: self.world,
            sizes: self.sizes.clone(),
        }
    }

    fn save(&self, root: &std::path::Path, state: &State) -> Result<(), TrainError> {
        let dir = checkpoint::step_dir(root, state.step);
        self.par.save(&dir)?;
        if self.rank == 0 {
            checkpoint::write_state(&dir, state)?;
            checkpoint::prune(root);
        }
        Ok(())
    }

    fn train(mut self, train: &Split, held_out: &Split) -> Result<Summary, TrainError> {
        let resumed = self.resume()?;
        let mut seed = self.config.seed;
        let (mut epoch, mut consumed, mut step) = (0, 0, 0);
        if let Some(s) = &resumed {
            (epoch, consumed, step, seed) = (s.epoch, s.consumed, s.step, s.seed);
        }
        let kill = kill_at(self.restarted, self.rank);
        let started = Instant::now();
        let mut seen = 0usize;
        let batch = self.config.batch.max(1);
        'epochs: while epoch < self.config.epochs {
            let sampler = Sampler {
                len: train.len(),
                world: self.world,
                rank: self.rank,
                seed: Some(seed),
                remainder: Remainder::Pad,
            };
            let mut loss_sum = [0f64; 2];
            let epoch_start = Instant::now();
            let mut epoch_seen = 0usize;
            let indices = sampler.indices(epoch, consumed);
            for chunk in indices.chunks(batch) {
                if self.config.max_steps.is_some_and(|m| step >= m) {
                    break 'epochs;
                }
                if kill == Some(step) {
                    kill_self();
                }
                let loss = self.train_step(train, chunk)?;
                loss_sum[0] += loss * chunk.len() as f64;
                loss_sum[1] += chunk.len() as f64;
                step += 1;
                consumed = sampler.advance(consumed, chunk.len());
                seen += chunk.len() * self.world;
                epoch_seen += chunk.len() * self.world;
                if let Some(root) = &self.config.checkpoint_dir {
                    let every = self.config.checkpoint_every;
                    if every > 0 && step % every == 0 && consumed < train.len() {
                        self.save(root, &self.state(step, epoch, consumed, seed))?;
                    }
                }
            }
            epoch += 1;
            consumed = 0;
            self.par.sum(&mut loss_sum)?;
            let (acc, _) = self.evaluate(held_out)?;
            let rate = epoch_seen as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
            self.out.epoch(
                epoch,
                self.config.epochs,
                loss_sum[0] / loss_sum[1].max(1.0),
                acc,
                rate,
            );
            if let Some(root) = &self.config.checkpoint_dir {
                self.save(root, &self.state(step, epoch, consumed, seed))?;
            }
        }
        let samples_per_s = seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
        let (accuracy, loss) = self.evaluate(held_out)?;
        let checksum = self.par.checksum()?;
        let (lo, hi) = self.par.agree(checksum)?;
        if lo != hi {
            return Err(TrainError::Model(format!(
                "the ranks ended with different parameters (checksums {lo:#x}..{hi:#x})"
            )));
        }
        if let Some(root) = &self.config.checkpoint_dir {
            let dir = root.join("final");
            self.par.save_consolidated(&dir)?;
            if self.rank == 0 {
                checkpoint::write_state(&dir, &self.state(step, epoch, 0, seed))?;
            }
        }
        if let (Some(path), 0) = (&self.config.dump_params, self.rank) {
            let full = self.par.gather_params()?;
            let bytes: Vec<u8> = full.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(path, bytes).map_err(|e| TrainError::Checkpoint {
                path: path.display().to_string(),
                what: e.to_string(),
            })?;
        } else if self.config.dump_params.is_some() {
            self.par.gather_params()?;
        }
        Ok(Summary {
            accuracy,
            loss,
            steps: step,
            samples_per_s,
            checksum,
            resumed_from: resumed.map(|s| s.step),
        })
    }

    /// One step on the samples `chunk`: forward, backward (buckets reduced as they fill),
    /// optimizer. Returns the batch's mean loss.
    fn train_step(&mut self, data: &Split, chunk: &[usize]) -> Result<f64, TrainError> {
        let (x, y) = batch(data, chunk);
        let logits = self.forward(&x, true)?;
        let loss = logits.cross_entropy_for_logits(&y);
        loss.backward();
        self.par.finish_backward()?;
        self.par.step()?;
        Ok(loss.double_value(&[]))
    }

    fn forward(&mut self, x: &Tensor, training: bool) -> Result<Tensor, TrainError> {
        let mut h = x.shallow_clone();
        let depth = self.model.depth();
        for l in 0..depth {
            let next = if l + 1 < depth {
                self.model.layer_params(l + 1)
            } else {
                0..0
            };
            let params = self.model.layer_params(l);
            self.par.before_layer(params.clone(), next)?;
            h = self.model.forward_layer(l, &h);
            self.par.after_layer(params, &h, training, l + 1 == depth)?;
        }
        Ok(h)
    }

    /// Held-out (accuracy, mean loss), each rank taking its share.
    fn evaluate(&mut self, held_out: &Split) -> Result<(f64, f64), TrainError> {
        let mine: Vec<usize> = (self.rank..held_out.len()).step_by(self.world).collect();
        let mut totals = [0f64; 3];
        if !mine.is_empty() {
            let _guard = tch::no_grad_guard();
            let (x, y) = batch(held_out, &mine);
            let logits = self.forward(&x, false)?;
            let loss = logits.cross_entropy_for_logits(&y).double_value(&[]);
            let correct = logits
                .argmax(-1, false)
                .eq_tensor(&y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            totals = [correct as f64, mine.len() as f64, loss * mine.len() as f64];
        } else {
            // Every rank takes part in the gathers, with a sample or not.
            let _guard = tch::no_grad_guard();
            let (x, _) = batch(held_out, &[0]);
            let _ = self.forward(&x, false)?;
        }
        self.par.sum(&mut totals)?;
        Ok((
            totals[0] / totals[1].max(1.0),
            totals[2] / totals[1].max(1.0),
        ))
    }
}

/// The samples `idx` of `data` as (features, labels).
fn batch(data: &Split, idx: &[usize]) -> (Tensor, Tensor) {
    let mut x = Vec::with_capacity(idx.len() * FEATURES);
    let mut y = Vec::with_capacity(idx.len());
    for &i in idx {
        x.extend_from_slice(&data.features[i * FEATURES..(i + 1) * FEATURES]);
        y.push(data.labels[i]);
    }
    (
        Tensor::from_slice(&x).view([idx.len() as i64, FEATURES as i64]),
        Tensor::from_slice(&y),
    )
}

/// The step before which this rank of the first attempt kills itself (tests).
fn kill_at(restarted: u32, rank: usize) -> Option<u64> {
    let spec = std::env::var("FERRUN_TRAIN_KILL_AT_STEP").ok()?;
    let (step, who) = spec.split_once(':')?;
    (restarted == 0 && who.parse::<usize>().ok()? == rank).then_some(step.parse().ok()?)
}

fn kill_self() {
    #[allow(unsafe_code)]
    // SAFETY: signalling this process; nothing is dereferenced.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Rank 0's progress lines (a bar when stdout is a terminal); writes that fail (a closed pipe)
/// are dropped: training goes on.
struct Progress {
    on: bool,
    terminal: bool,
}

impl Progress {
    fn new(on: bool) -> Self {
        Self {
            on,
            terminal: std::io::stdout().is_terminal(),
        }
    }

    fn line(&self, text: &str) {
        if self.on {
            let _ = writeln!(std::io::stdout(), "{text}");
        }
    }

    fn epoch(&self, epoch: u64, epochs: u64, loss: f64, acc: f64, rate: f64) {
        let pct = 100 * epoch / epochs.max(1);
        let bar = if self.terminal {
            let filled = (20 * epoch / epochs.max(1)) as usize;
            format!(
                "  [{}{}]",
                "#".repeat(filled),
                ".".repeat(20 - filled.min(20))
            )
        } else {
            String::new()
        };
        self.line(&format!(
            "epoch {epoch:>3}/{epochs}  loss {loss:.4}  held-out accuracy {acc:.4}  \
             {rate:>8.0} samples/s{bar} {pct:>3}%"
        ));
    }
}
