//! ZeRO on ranks as threads ([`MemTransport`]): the plan's invariants, every stage against the
//! stage-0 reference and a plain single-process reference, loss scaling, checkpoints that
//! re-shard, and bad input.

use std::time::Duration;

use super::*;
use crate::comm::{Communicator, Options};
use crate::reduce::DType;
use crate::transport::mem::MemTransport;

mod checkpoints;
mod plans;
mod stages;

/// Runs `f` on `n` ranks, one thread each; results in rank order.
fn on_ranks<R: Send>(n: usize, f: impl Fn(Communicator<MemTransport>) -> R + Sync) -> Vec<R> {
    let options = Options {
        deadline: Duration::from_secs(20),
        ..Options::default()
    };
    std::thread::scope(|s| {
        let threads: Vec<_> = MemTransport::network(n)
            .into_iter()
            .map(|t| {
                let f = &f;
                s.spawn(move || f(Communicator::new(t, options)))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("rank thread panicked"))
            .collect()
    })
}

/// A small model with awkward sizes: buckets of a few parameters, one larger than a bucket,
/// an empty one, counts no world size divides.
fn model() -> Vec<ParamSpec> {
    vec![
        ParamSpec::new("w1", &[13, 7]),
        ParamSpec::new("b1", &[7]),
        ParamSpec::new("empty", &[0]),
        ParamSpec::new("w2", &[7, 5]),
        ParamSpec::new("b2", &[5]),
        ParamSpec::new("big", &[300]),
        ParamSpec::new("scale", &[1]),
    ]
}

fn plan_for(dtype: DType, world: usize) -> ShardPlan {
    ShardPlan::new(
        model(),
        dtype,
        world,
        PlanConfig {
            bucket_bytes: 256,
            align: 4,
            first_bucket_bytes: None,
        },
    )
    .expect("a valid plan")
}

/// A deterministic value in [-1, 1) from a few integers.
fn noise(a: usize, b: usize, c: usize) -> f32 {
    let mut x = (a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (b as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ (c as u64).wrapping_mul(0x1656_67B1_9E37_79F9);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 32;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn initial(n: usize) -> Vec<f32> {
    (0..n).map(|i| noise(i, 7, 7)).collect()
}

/// The gradient of rank `rank`'s loss Σ ½ aᵢ (pᵢ − tᵢ)² at element `i`, step `step`
/// (`shared`: the same loss on every rank, so the average is independent of the world size).
fn grad(rank: usize, step: usize, i: usize, p: f32, shared: bool) -> f32 {
    let r = if shared { 0 } else { rank + 1 };
    let a = 1.0 + noise(r, step, i).abs();
    let t = noise(i, r, step + 100);
    a * (p - t)
}

/// How the training loop of a test behaves.
#[derive(Clone, Copy)]
struct Run {
    steps: usize,
    shared: bool,
    /// `(step, rank)`: that rank's gradients are infinite at that step.
    overflow: Option<(usize, usize)>,
}

/// One training step the way a loop would take it: forward through the buckets (last bucket
/// first, prefetching the next), backward from bucket 0 (gathered again at stage 3), gradients
/// handed in bucket by bucket.
fn train_step<E: ModelFloat>(z: &mut Zero<E, MemTransport>, step: usize, run: Run) -> StepReport {
    let rank = z.rank;
    let nb = z.plan().buckets().len();
    for b in (0..nb).rev() {
        if b > 0 {
            z.prefetch(b - 1).expect("prefetch");
        }
        let _forward: f32 = z
            .gather(b)
            .expect("gather")
            .iter()
            .map(|p| to_f32(*p))
            .sum();
        z.release(b);
    }
    let scale = z.loss_scale();
    for b in 0..nb {
        let logical = z.plan().buckets()[b].logical;
        let params: Vec<f32> = z
            .gather(b)
            .expect("gather")
            .iter()
            .map(|p| to_f32(*p))
            .collect();
        z.release(b);
        let grads: Vec<E> = params
            .iter()
            .enumerate()
            .map(|(j, &p)| {
                let g = if run.overflow == Some((step, rank)) && j == 0 {
                    f32::INFINITY
                } else {
                    grad(rank, step, logical + j, p, run.shared) * scale
                };
                from_f32(g)
            })
            .collect();
        z.hand_in(b, &grads).expect("hand in");
    }
    z.step().expect("step")
}

fn to_f32<E: ModelFloat>(x: E) -> f32 {
    let mut out = [0f32];
    E::widen_scaled(&[x], &mut out, 1.0);
    out[0]
}

fn from_f32<E: ModelFloat>(x: f32) -> E {
    let mut out = [E::ZERO];
    E::narrow(&[x], &mut out);
    out[0]
}

/// The model's parameters as every rank holds them after `run`, and the full master and state.
struct Trained {
    model: Vec<Vec<f32>>,
    full: Vec<Vec<f32>>,
    reports: Vec<StepReport>,
}

fn config(stage: Stage, optimizer: Optimizer, loss_scale: LossScale) -> ZeroConfig {
    ZeroConfig {
        stage,
        optimizer,
        max_grad_norm: Some(8.0),
        loss_scale,
    }
}

fn train<E: ModelFloat>(world: usize, cfg: ZeroConfig, run: Run) -> Vec<Trained> {
    on_ranks(world, |comm| {
        let plan = plan_for(E::DTYPE, world);
        let init: Vec<E> = initial(plan.numel()).into_iter().map(from_f32).collect();
        let mut z = Zero::new(comm, plan, cfg, &init).expect("engine");
        let reports = (0..run.steps).map(|s| train_step(&mut z, s, run)).collect();
        Trained {
            model: model_of(&mut z),
            full: z.gather_full().expect("gather full"),
            reports,
        }
    })
}

/// Every bucket's model parameters, in logical order.
fn model_of<E: ModelFloat>(z: &mut Zero<E, MemTransport>) -> Vec<Vec<f32>> {
    (0..z.plan().buckets().len())
        .map(|b| {
            let v = z
                .gather(b)
                .expect("gather")
                .iter()
                .map(|p| to_f32(*p))
                .collect();
            z.release(b);
            v
        })
        .collect()
}

const OPTIMIZERS: [Optimizer; 3] = [
    Optimizer::Sgd {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
    },
    Optimizer::Sgd {
        lr: 0.1,
        momentum: 0.0,
        nesterov: false,
        weight_decay: 0.0,
    },
    Optimizer::AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    },
];

const STAGES: [Stage; 4] = [
    Stage::Replicated,
    Stage::Optimizer,
    Stage::Gradients,
    Stage::Parameters,
];
