//! `ferrun-bench zero`: per-rank memory and step time of ZeRO stages 0–3 (`collective::zero`)
//! for a model of Ψ parameters at several world sizes, beside ZeRO's formulas and beside
//! torch 2.13's own sharding (DDP, `ZeroRedundancyOptimizer`, FSDP `SHARD_GRAD_OP` and
//! `FULL_SHARD`) on the same layers, in the same invocation, every run under `ferrun`.
//!
//! Memory is measured: by a counting allocator (what the engine's buffers hold, and the peak in
//! a step) and by the resident set's high-water mark (`VmHWM`, reset before the model is built),
//! the only figure torch's side offers. Each ferrun run checks its result: with the same
//! gradient on every rank, every element must end equal to a one-element reference (a wrong
//! shard, gather or reduction shows) on every rank; a wrong result exits non-zero.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use ferrun_collective::comm::{Communicator, Options as CommOptions};
use ferrun_collective::reduce::DType;
use ferrun_collective::zero::optim::update;
use ferrun_collective::zero::{
    formula_bytes, LossScale, ModelFloat, Optimizer, ParamSpec, PlanConfig, ShardPlan, Stage, Zero,
    ZeroConfig,
};
use half::bf16;
use serde_json::{json, Value};

use crate::alloc;

/// Options of `ferrun-bench zero`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Model parameters (Ψ): a count, with K/M/G for 10³/10⁶/10⁹.
    #[arg(long, default_value = "100M", value_parser = parse_count)]
    params: usize,
    /// World sizes, comma separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    ranks: Vec<usize>,
    /// Stages, comma separated.
    #[arg(long, default_value = "0,1,2,3", value_delimiter = ',')]
    stages: Vec<u8>,
    /// The model's dtype: f32 (compared with torch's f32) or bf16 (mixed precision, f32 master
    /// weights: the formulas of the ZeRO paper).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Timed steps (after one untimed).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// The ferrun binary that launches the ranks.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
    /// The torch 2.13 virtualenv; without it torch's side is not run.
    #[arg(long, env = "FERRUN_VENV")]
    venv: Option<PathBuf>,
    /// The torch side's script.
    #[arg(long, default_value = "bench/python/zero_torch.py")]
    script: PathBuf,
}

/// Options of the hidden `zero-worker` subcommand (one rank, under `ferrun`).
#[derive(Debug, clap::Args)]
pub(crate) struct WorkerOptions {
    #[arg(long, value_parser = parse_count)]
    params: usize,
    #[arg(long)]
    stage: u8,
    #[arg(long)]
    dtype: String,
    #[arg(long)]
    steps: usize,
    /// Where rank 0 writes its measurements (JSON).
    #[arg(long)]
    json: PathBuf,
}

fn parse_count(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1_000),
        Some('M') => (&t[..t.len() - 1], 1_000_000),
        Some('G') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t, 1),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{text:?} is not a parameter count: use e.g. 100M, 1500K, 2G"))
}

/// The layers both sides train: `Linear(d, d)` layers (weight and bias), Ψ rounded up to whole
/// layers.
fn layers(params: usize) -> (usize, usize) {
    let d = 4096usize.min((params as f64).sqrt() as usize).max(1);
    (d, params.div_ceil(d * d + d))
}

fn specs(params: usize) -> Vec<ParamSpec> {
    let (d, n) = layers(params);
    (0..n)
        .flat_map(|l| {
            [
                ParamSpec::new(format!("{l}.weight"), &[d, d]),
                ParamSpec::new(format!("{l}.bias"), &[d]),
            ]
        })
        .collect()
}

const OPTIMIZER: Optimizer = Optimizer::AdamW {
    lr: 1e-3,
    beta1: 0.9,
    beta2: 0.999,
    eps: 1e-8,
    weight_decay: 0.01,
};
/// Initial value and gradient of every element: exact in bf16, and any world size's average of
/// equal gradients is exact, so the result is known.
const INIT: f32 = 0.5;
const GRAD: f32 = 0.25;

pub(crate) fn worker(o: &WorkerOptions) -> anyhow::Result<()> {
    match o.dtype.as_str() {
        "f32" => worker_as::<f32>(o),
        "bf16" => worker_as::<bf16>(o),
        other => bail!("--dtype {other}: use f32 or bf16"),
    }
}

fn worker_as<E: ModelFloat>(o: &WorkerOptions) -> anyhow::Result<()> {
    let stage = Stage::from_number(o.stage).context("--stage: use 0, 1, 2 or 3")?;
    let comm = Communicator::from_env("zero", CommOptions::default())
        .context("ferrun-bench zero-worker runs under `ferrun --no-python`")?;
    let (rank, world) = (comm.rank(), comm.size());
    let plan = ShardPlan::new(specs(o.params), E::DTYPE, world, PlanConfig::default())?;
    let numel = plan.numel();
    let mut one = [E::ZERO];
    E::narrow(&[INIT], &mut one);
    let (live0, (rss0, _)) = (alloc::live(), alloc::rss()?);
    alloc::reset_rss_peak();
    let initial = vec![one[0]; numel];
    let config = ZeroConfig {
        stage,
        optimizer: OPTIMIZER,
        max_grad_norm: None,
        loss_scale: LossScale::none(),
    };
    let mut z = Zero::new(comm, plan, config, &initial)?;
    drop(initial);
    let held = alloc::live() - live0;
    let memory = z.memory();
    alloc::reset_peak();
    let mut grad = [E::ZERO];
    E::narrow(&[GRAD], &mut grad);
    let mut times = Vec::new();
    for step in 0..=o.steps {
        let t = Instant::now();
        let nb = z.plan().buckets().len();
        if stage == Stage::Parameters {
            for b in (0..nb).rev() {
                if b > 0 {
                    z.prefetch(b - 1)?;
                }
                z.gather(b)?;
                z.release(b);
            }
        }
        for b in 0..nb {
            if stage == Stage::Parameters {
                if b + 1 < nb {
                    z.prefetch(b + 1)?;
                }
                z.gather(b)?;
                z.release(b);
            }
            z.grads_mut(b)?.fill(grad[0]);
            z.reduce(b)?;
        }
        let report = z.step()?;
        ensure!(!report.skipped, "step {step} was skipped: a wrong result");
        if step > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let peak = alloc::peak() - live0;
    let (_, hwm) = alloc::rss()?;
    let wrong = check(&mut z, o.steps + 1)?;
    times.sort_by(f64::total_cmp);
    if rank == 0 {
        let row = json!({
            "side": "ferrun", "stage": o.stage, "ranks": world, "numel": numel,
            "params_bytes": memory.params, "grads_bytes": memory.grads, "optim_bytes": memory.optim,
            "held_bytes": held, "peak_bytes": peak, "rss_peak_bytes": hwm.saturating_sub(rss0),
            "step_s": times[times.len() / 2], "wrong": wrong,
        });
        std::fs::write(&o.json, row.to_string())?;
    }
    ensure!(
        wrong == 0,
        "rank {rank}: {wrong} parameters differ from the reference: a wrong result"
    );
    Ok(())
}

/// Elements that differ from the one-element reference after `steps` steps, summed over the
/// ranks; the ranks' checksums must also agree to the bit.
fn check<E: ModelFloat, T: ferrun_collective::transport::Transport + 'static>(
    z: &mut Zero<E, T>,
    steps: usize,
) -> anyhow::Result<usize> {
    let (mut p, mut m, mut v) = ([INIT], [0f32], [0f32]);
    let mut one = [E::ZERO];
    E::narrow(&[INIT], &mut one);
    E::widen_scaled(&one, &mut p, 1.0);
    for s in 1..=steps {
        update(&OPTIMIZER, s as u64, &mut p, &[GRAD], &mut [&mut m, &mut v]);
    }
    E::narrow(&p, &mut one);
    let mut wrong = 0usize;
    for b in 0..z.plan().buckets().len() {
        wrong += z.gather(b)?.iter().filter(|&&x| x != one[0]).count();
        z.release(b);
    }
    Ok(wrong)
}

/// The optimizers' update loops against the same arithmetic written plainly, interleaved over
/// rounds, on 4 Mi elements; the two must agree to the bit.
fn loops() -> anyhow::Result<()> {
    use ferrun_collective::zero::optim::plain_update;
    let n = 4 << 20;
    let sgd = Optimizer::Sgd {
        lr: 0.01,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 1e-4,
    };
    println!(
        "update loops, {n} elements, ns per element (median of 7 interleaved rounds [range]):"
    );
    for opt in [OPTIMIZER, sgd] {
        let grads: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 1e-3 - 0.05).collect();
        let slots = opt.state_slots();
        let (mut fast, mut plain) = (Vec::new(), Vec::new());
        let mut results = Vec::new();
        for round in 0..7 {
            for which in [round % 2 == 0, round % 2 != 0] {
                let mut p = vec![0.5f32; n];
                let mut state = vec![vec![0f32; n]; slots];
                let mut views: Vec<&mut [f32]> = state.iter_mut().map(Vec::as_mut_slice).collect();
                let t = Instant::now();
                for step in 1..=3 {
                    if which {
                        update(&opt, step, &mut p, &grads, &mut views);
                    } else {
                        plain_update(&opt, step, &mut p, &grads, &mut views);
                    }
                }
                let ns = t.elapsed().as_secs_f64() * 1e9 / (3 * n) as f64;
                if which {
                    fast.push(ns)
                } else {
                    plain.push(ns)
                }
                results.push((which, p));
            }
        }
        let same = results.windows(2).all(|w| w[0].1 == w[1].1);
        ensure!(
            same,
            "{}: the update loop and the plain loop disagree: a wrong result",
            opt.name()
        );
        let show = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            (v[v.len() / 2], v[0], v[v.len() - 1])
        };
        let (f, fl, fh) = show(&mut fast);
        let (pl, pll, plh) = show(&mut plain);
        println!("  {:<6} update {f:.2} [{fl:.2}–{fh:.2}]  plain {pl:.2} [{pll:.2}–{plh:.2}]  speed-up {:.2}×", opt.name(), pl / f);
    }
    Ok(())
}

/// `ferrun` running `n` ranks of a program on this host (the program and its arguments follow).
fn under_ferrun(ferrun: &Path, n: usize) -> Command {
    let mut cmd = Command::new(ferrun);
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        &n.to_string(),
        "--no-python",
    ]);
    cmd
}

fn run_json(mut cmd: Command, json: &Path, what: &str) -> anyhow::Result<Value> {
    let out = cmd.output().with_context(|| format!("start {what}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect();
        bail!(
            "{what} failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let text = std::fs::read_to_string(json).with_context(|| format!("{what} wrote no result"))?;
    Ok(serde_json::from_str(&text)?)
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(
        o.ferrun.is_file(),
        "{} not found: cargo build --release -p ferrun-launcher",
        o.ferrun.display()
    );
    let dtype = match o.dtype.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::Bf16,
        other => bail!("--dtype {other}: use f32 or bf16"),
    };
    let torch = o
        .venv
        .as_ref()
        .map(|v| v.join("bin/python"))
        .filter(|p| p.is_file());
    let dir = tempfile::tempdir()?;
    let (d, nl) = layers(o.params);
    let psi = nl * (d * d + d);
    println!(
        "ZeRO memory and step time: Ψ = {psi} parameters ({nl} × Linear({d}, {d})), {:?}, AdamW, {} timed steps; every run under ferrun on this host",
        dtype, o.steps
    );
    loops()?;
    let mut rows = Vec::new();
    for &n in &o.ranks {
        for &s in &o.stages {
            let json = dir.path().join(format!("ferrun-{n}-{s}.json"));
            let mut cmd = under_ferrun(&o.ferrun, n);
            cmd.arg(std::env::current_exe()?)
                .args([
                    "zero-worker",
                    "--params",
                    &psi.to_string(),
                    "--stage",
                    &s.to_string(),
                    "--dtype",
                    &o.dtype,
                ])
                .args(["--steps", &o.steps.to_string(), "--json"])
                .arg(&json);
            eprintln!("ferrun stage {s}, {n} ranks");
            let ours = run_json(cmd, &json, &format!("ferrun stage {s} on {n} ranks"))?;
            let theirs = match (&torch, dtype) {
                (Some(python), DType::F32) => {
                    let json = dir.path().join(format!("torch-{n}-{s}.json"));
                    let mut cmd = under_ferrun(&o.ferrun, n);
                    cmd.arg(python)
                        .arg(&o.script)
                        .args([
                            "--stage",
                            &s.to_string(),
                            "--dim",
                            &d.to_string(),
                            "--layers",
                            &nl.to_string(),
                        ])
                        .args(["--steps", &o.steps.to_string(), "--json"])
                        .arg(&json);
                    eprintln!("torch stage-{s} analogue, {n} ranks");
                    Some(
                        run_json(
                            cmd,
                            &json,
                            &format!("torch's stage-{s} analogue on {n} ranks"),
                        )
                        .unwrap_or_else(|e| json!({"error": e.to_string()})),
                    )
                }
                _ => None,
            };
            rows.push((n, s, ours, theirs));
        }
    }
    print_tables(&rows, psi, dtype);
    Ok(())
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

fn gb(bytes: f64) -> String {
    format!("{:.3}", bytes / 1e9)
}

fn print_tables(rows: &[(usize, u8, Value, Option<Value>)], psi: usize, dtype: DType) {
    println!("\nferrun, per rank (GB; params/grads/optim: the engine's buffers; total: the allocator's count once built; peak: the allocator's most in a step):");
    println!(
        "{:>5} {:>5} {:>12} {:>11} {:>11} {:>11} {:>13} {:>6} {:>10} {:>9} {:>9}",
        "stage",
        "ranks",
        "params_bytes",
        "grads_bytes",
        "optim_bytes",
        "total_bytes",
        "formula_bytes",
        "ratio",
        "peak_bytes",
        "step_ms",
        "× stage0"
    );
    for (n, s, ours, _) in rows {
        let stage = Stage::from_number(*s).unwrap_or(Stage::Replicated);
        let formula = formula_bytes(stage, psi, dtype.size(), OPTIMIZER.state_slots(), *n);
        let total = num(ours, "held_bytes");
        let base = rows
            .iter()
            .find(|r| r.0 == *n && r.1 == 0)
            .map_or(f64::NAN, |r| num(&r.2, "step_s"));
        println!(
            "{s:>5} {n:>5} {:>12} {:>11} {:>11} {:>11} {:>13} {:>6.3} {:>10} {:>9.0} {:>9.2}",
            gb(num(ours, "params_bytes")),
            gb(num(ours, "grads_bytes")),
            gb(num(ours, "optim_bytes")),
            gb(total),
            gb(formula),
            total / formula,
            gb(num(ours, "peak_bytes")),
            num(ours, "step_s") * 1e3,
            num(ours, "step_s") / base
        );
    }
    if rows.iter().all(|r| r.3.is_none()) {
        return;
    }
    println!("\nbeside torch 2.13 on Gloo (the same layers, f32, AdamW; peak resident set above the process's before the model, GB; step ms):");
    println!(
        "{:>5} {:>5} {:<28} {:>11} {:>11} {:>7} {:>9} {:>9} {:>7}",
        "stage",
        "ranks",
        "torch analogue",
        "torch peak",
        "ferrun peak",
        "mem ×",
        "torch ms",
        "ferrun ms",
        "time ×"
    );
    for (n, s, ours, theirs) in rows {
        let Some(t) = theirs else { continue };
        let name = t.get("name").and_then(Value::as_str).unwrap_or("?");
        if let Some(e) = t.get("error").and_then(Value::as_str) {
            println!(
                "{s:>5} {n:>5} could not run: {}",
                e.lines().last().unwrap_or(e)
            );
            continue;
        }
        let (tp, fp) = (num(t, "rss_peak_bytes"), num(ours, "rss_peak_bytes"));
        let (tt, ft) = (num(t, "step_s"), num(ours, "step_s"));
        println!(
            "{s:>5} {n:>5} {name:<28} {:>11} {:>11} {:>7.2} {:>9.0} {:>9.0} {:>7.2}",
            gb(tp),
            gb(fp),
            fp / tp,
            tt * 1e3,
            ft * 1e3,
            ft / tt
        );
    }
    println!("mem × and time × = ferrun / torch (goal: mem × ≤ 1, time × ≤ 0.5)");
}
