//! Every stage × optimizer × dtype × world size against stage 0 and a plain reference; loss
//! scaling; bad input.
//!
//! # Tolerances
//! Stages 1–3 reduce with a ring reduce-scatter where stage 0 all-reduces (recursive doubling
//! at these sizes): the same sums in another order, so the averaged gradients differ by at most
//! about `(N − 1)` roundings of the gradient's dtype (2⁻²⁴ f32, 2⁻¹¹ f16, 2⁻⁸ bf16, relative).
//! An update is at most `lr × |d|` with `|d|` the direction (≤ 1/(1−momentum) × |g| for SGD,
//! about 1 for Adam), so over the test's 4 steps with |g| ≲ 4, lr ≤ 0.1 and momentum 0.9, the
//! master weights may drift apart by `4 × 0.1 × 10 × 4 × N × ε`: 6e-5 at f32 N=8, and
//! for f16 and bf16, where a drift can also flip a model copy's rounding (one ulp of |p| ≲ 2),
//! 2e-2 and 2e-1. The bounds below are those, rounded up; at N ≤ 2 the sums are the same (two
//! terms commute to the bit) and equality is exact.

use half::{bf16, f16};

use super::*;
use crate::zero::optim::update;

const WORLDS: [usize; 5] = [1, 2, 3, 4, 8];

fn check_all_stages<E: ModelFloat>(tolerance: f32, loss_scale: LossScale) {
    let run = Run {
        steps: 4,
        shared: false,
        overflow: None,
    };
    for world in WORLDS {
        for opt in OPTIMIZERS {
            let reference = train::<E>(world, config(Stage::Replicated, opt, loss_scale), run);
            for stage in STAGES {
                let ranks = train::<E>(world, config(stage, opt, loss_scale), run);
                let what = format!("{:?} {stage:?} {opt:?} N={world}", E::DTYPE);
                for r in &ranks[1..] {
                    assert!(
                        r.full == ranks[0].full,
                        "{what}: ranks disagree on master/state"
                    );
                    assert!(
                        r.model == ranks[0].model,
                        "{what}: ranks disagree on the model"
                    );
                }
                assert!(
                    ranks[0].reports.iter().all(|r| !r.skipped),
                    "{what}: skipped a step"
                );
                let bound = if world <= 2 { 0.0 } else { tolerance };
                let diff = max_diff(&ranks[0].full[0], &reference[0].full[0]);
                assert!(
                    diff <= bound,
                    "{what}: master differs from stage 0 by {diff} > {bound}"
                );
            }
        }
    }
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn f32_every_stage_matches_stage_0_and_ranks_agree_to_the_bit() {
    check_all_stages::<f32>(1e-4, LossScale::none());
}

#[test]
fn f16_every_stage_matches_stage_0_and_ranks_agree_to_the_bit() {
    let scale = LossScale {
        scale: 1024.0,
        ..LossScale::default()
    };
    check_all_stages::<f16>(2e-2, scale);
}

#[test]
fn bf16_every_stage_matches_stage_0_and_ranks_agree_to_the_bit() {
    check_all_stages::<bf16>(2e-1, LossScale::none());
}

/// Stage 0 against the arithmetic done plainly in one process: the mean of every rank's
/// gradient, clipped, and the optimizer over the whole model.
#[test]
fn stage_0_is_plain_data_parallelism() {
    let run = Run {
        steps: 4,
        shared: false,
        overflow: None,
    };
    for world in [1, 3, 4] {
        for opt in OPTIMIZERS {
            let ranks = train::<f32>(
                world,
                config(Stage::Replicated, opt, LossScale::none()),
                run,
            );
            let numel = plan_for(DType::F32, world).numel();
            let mut p = initial(numel);
            let mut state = vec![vec![0f32; numel]; opt.state_slots()];
            for step in 0..run.steps {
                let mut g: Vec<f32> = (0..numel)
                    .map(|i| {
                        (0..world)
                            .map(|r| grad(r, step, i, p[i], false))
                            .sum::<f32>()
                            / world as f32
                    })
                    .collect();
                let norm = g
                    .iter()
                    .map(|&x| f64::from(x) * f64::from(x))
                    .sum::<f64>()
                    .sqrt();
                if norm > 8.0 {
                    let c = (8.0 / (norm + 1e-6)) as f32;
                    g.iter_mut().for_each(|x| *x *= c);
                }
                let mut views: Vec<&mut [f32]> = state.iter_mut().map(Vec::as_mut_slice).collect();
                update(&opt, step as u64 + 1, &mut p, &g, &mut views);
            }
            let diff = max_diff(&ranks[0].full[0], &p);
            assert!(
                diff <= 1e-4,
                "{opt:?} N={world}: {diff} from the plain reference"
            );
        }
    }
}

#[test]
fn an_overflow_on_one_rank_makes_every_rank_skip_and_back_off() {
    let scale = LossScale {
        scale: 1024.0,
        ..LossScale::default()
    };
    for stage in STAGES {
        let clean = Run {
            steps: 2,
            shared: false,
            overflow: None,
        };
        let before = train::<f16>(4, config(stage, OPTIMIZERS[2], scale), clean);
        let faulty = Run {
            steps: 3,
            overflow: Some((2, 3)),
            ..clean
        };
        let after = train::<f16>(4, config(stage, OPTIMIZERS[2], scale), faulty);
        for (rank, r) in after.iter().enumerate() {
            let last = r.reports[2];
            assert!(
                last.skipped,
                "{stage:?}: rank {rank} did not skip the overflowed step"
            );
            assert_eq!(
                last.loss_scale, 512.0,
                "{stage:?}: rank {rank}'s scale did not halve"
            );
            assert!(
                r.full == before[rank].full,
                "{stage:?}: rank {rank} changed in a skipped step"
            );
        }
    }
}

#[test]
fn bad_calls_are_errors_that_name_the_bucket() {
    let results = on_ranks(2, |comm| {
        let plan = plan_for(DType::F32, 2);
        let nb = plan.buckets().len();
        let init = initial(plan.numel());
        let cfg = config(Stage::Gradients, OPTIMIZERS[0], LossScale::none());
        let mut z = Zero::new(comm, plan, cfg, &init).expect("engine");
        let len = z.plan().buckets()[0].len;
        let short = z
            .hand_in(0, &vec![0.0; len - 1])
            .expect_err("short")
            .to_string();
        z.hand_in(0, &vec![0.0; len]).expect("hand in");
        let twice = z
            .hand_in(0, &vec![0.0; len])
            .expect_err("twice")
            .to_string();
        let missing = z.step().expect_err("missing").to_string();
        let nowhere = z.grads_mut(nb).expect_err("no such bucket").to_string();
        // The engine still works once every bucket is in.
        for b in 1..nb {
            let n = z.plan().buckets()[b].len;
            z.hand_in(b, &vec![0.0; n]).expect("hand in");
        }
        z.step().expect("step after the error");
        (short, twice, missing, nowhere)
    });
    for (short, twice, missing, nowhere) in results {
        assert!(
            short.contains("bucket 0 holds") && short.contains("were handed in"),
            "{short}"
        );
        assert!(twice.contains("handed in already"), "{twice}");
        assert!(
            missing.contains("were not handed in") && missing.contains("zeros"),
            "{missing}"
        );
        assert!(nowhere.contains("does not exist"), "{nowhere}");
    }
}

#[test]
fn ranks_that_built_different_plans_are_told_not_hung() {
    let results = on_ranks(3, |comm| {
        let bucket_bytes = if comm.rank() == 1 { 128 } else { 256 };
        let plan = ShardPlan::new(
            model(),
            DType::F32,
            3,
            PlanConfig {
                bucket_bytes,
                align: 4,
                first_bucket_bytes: None,
            },
        )
        .expect("plan");
        let init = initial(plan.numel());
        let cfg = config(Stage::Parameters, OPTIMIZERS[0], LossScale::none());
        Zero::new(comm, plan, cfg, &init)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    });
    for e in results {
        assert!(e.contains("different plans"), "{e}");
    }
}
