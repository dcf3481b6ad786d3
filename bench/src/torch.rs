//! `ferrun-bench torch`: torch.distributed through torch's own API on `gloo` and on `ferrun`
//! (`import ferrun.torch`), side by side in one invocation: `dist.all_reduce` of CPU f32
//! tensors from 4 B to 64 MiB (Python overhead included; nccl-tests' time, algbw and busbw),
//! and DDP step time of a communication-bound MLP. Every run is launched by `ferrun`; the two
//! backends alternate which goes first in each round, and the tables give the median over
//! rounds with the spread of the per-round ratio. A run whose result is wrong (an element of an
//! all-reduce, or DDP parameters that differ between ranks) fails the benchmark.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context};
use serde_json::Value;

use crate::collective::parse_size;
use crate::peers::{median_rows, Rows};

/// Options of `ferrun-bench torch`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// World sizes, comma separated.
    #[arg(long, default_value = "2,4", value_delimiter = ',')]
    ranks: Vec<usize>,
    /// All-reduce sizes in bytes, comma separated (K, M suffixes).
    #[arg(long, default_value = "4,64,1K,4K,64K,1M,16M,64M", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Rounds; each runs both backends, alternating which goes first.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Parameters of the DDP model (0: no DDP runs).
    #[arg(long, default_value_t = 25_000_000)]
    params: usize,
    /// Timed DDP steps per run.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// The torch 2.13 virtualenv with the ferrun backend (scripts/setup-python.sh prints it).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// The ferrun binary that launches the ranks.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
    /// The benchmark's torch script.
    #[arg(long, default_value = "bench/python/torch_backend.py")]
    script: PathBuf,
}

const BACKENDS: [&str; 2] = ["gloo", "ferrun"];

/// One run of the script on `n` ranks; what rank 0 wrote.
fn run_script(
    o: &Options,
    n: usize,
    backend: &str,
    args: &[String],
    json: &Path,
) -> anyhow::Result<Value> {
    let _ = std::fs::remove_file(json);
    let path = format!(
        "{}:{}",
        o.venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new(&o.ferrun)
        .env("PATH", path)
        .args(["--standalone", "--nproc-per-node", &n.to_string()])
        .arg(&o.script)
        .args(["--backend", backend, "--json"])
        .arg(json)
        .args(args)
        .output()
        .with_context(|| format!("start {}", o.ferrun.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        bail!(
            "{backend} on {n} ranks failed ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    let text =
        std::fs::read_to_string(json).with_context(|| format!("{backend} wrote no result"))?;
    Ok(serde_json::from_str(&text)?)
}

/// The sweep's rows; a row without its size is an error (a size of 0 would pair it with
/// nothing), a missing time reads NaN and a missing count of wrong elements as unchecked.
fn rows(v: &Value) -> anyhow::Result<Rows> {
    let rows = v["sweep"].as_array().context("the result holds no sweep")?;
    rows.iter()
        .map(|r| {
            Ok((
                r["size"].as_u64().context("a sweep row without its size")?,
                r["time_us"].as_f64().unwrap_or(f64::NAN),
                r["busbw"].as_f64().unwrap_or(f64::NAN),
                r["wrong"].as_u64().unwrap_or(u64::MAX),
            ))
        })
        .collect()
}

/// Median and range of `xs`.
fn spread(xs: &[f64]) -> (f64, f64, f64) {
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => (f64::NAN, f64::NAN, f64::NAN),
        n => (s[n / 2], s[0], s[n - 1]),
    }
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(
        o.ferrun.is_file(),
        "{} not found: cargo build --release -p ferrun-launcher",
        o.ferrun.display()
    );
    ensure!(
        o.script.is_file(),
        "{} not found: run from the repository's root",
        o.script.display()
    );
    ensure!(o.rounds > 0, "--rounds must be at least 1");
    let dir = tempfile::tempdir()?;
    let sizes = o
        .sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut wrong = Vec::new();
    for &n in &o.ranks {
        // [backend][round]
        let mut sweeps: [Vec<Rows>; 2] = [Vec::new(), Vec::new()];
        let mut steps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..o.rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for b in order {
                let backend = BACKENDS[b];
                eprintln!(
                    "{n} ranks, round {}/{}: {backend} all_reduce sweep",
                    round + 1,
                    o.rounds
                );
                let json = dir.path().join(format!("{backend}-{n}.json"));
                let v = run_script(
                    o,
                    n,
                    backend,
                    &[
                        "--mode".into(),
                        "sweep".into(),
                        "--sizes".into(),
                        sizes.clone(),
                    ],
                    &json,
                )?;
                sweeps[b].push(rows(&v)?);
                if o.params > 0 {
                    eprintln!(
                        "{n} ranks, round {}/{}: {backend} DDP steps",
                        round + 1,
                        o.rounds
                    );
                    let args = [
                        "--mode".into(),
                        "ddp".into(),
                        "--params".into(),
                        o.params.to_string(),
                        "--steps".into(),
                        o.steps.to_string(),
                    ];
                    let v = run_script(o, n, backend, &args, &json)?;
                    if v["ddp"]["identical"].as_bool() != Some(true) {
                        wrong.push(format!(
                            "{backend}, {n} ranks: DDP parameters differ between ranks"
                        ));
                    }
                    steps[b].push(v["ddp"]["step_ms"].as_f64().unwrap_or(f64::NAN));
                }
            }
        }
        for (b, runs) in sweeps.iter().enumerate() {
            for &(size, _, _, w) in runs.iter().flatten() {
                if w > 0 {
                    wrong.push(format!(
                        "{}, {n} ranks, {size} B: {}",
                        BACKENDS[b],
                        if w == u64::MAX {
                            "not checked".into()
                        } else {
                            format!("{w} wrong elements")
                        }
                    ));
                }
            }
        }
        print_sweep(n, o.rounds, &sweeps);
        if o.params > 0 {
            let ratios: Vec<f64> = steps[0].iter().zip(&steps[1]).map(|(g, f)| g / f).collect();
            let (g, f) = (spread(&steps[0]).0, spread(&steps[1]).0);
            let (r, lo, hi) = spread(&ratios);
            println!(
                "DDP, {n} ranks, MLP of {:.0} M parameters, batch 8: step {g:.1} ms on gloo, {f:.1} ms on ferrun: {r:.2}× faster [{lo:.2}–{hi:.2}]\n",
                o.params as f64 / 1e6
            );
        }
    }
    ensure!(wrong.is_empty(), "wrong results: {}", wrong.join("; "));
    Ok(())
}

fn print_sweep(n: usize, rounds: usize, sweeps: &[Vec<Rows>; 2]) {
    let (gloo, ours) = (median_rows(&sweeps[0]), median_rows(&sweeps[1]));
    println!("dist.all_reduce (SUM, float32) through torch's API, {n} ranks, one host; medians of {rounds} rounds, [range of the per-round ratio]");
    println!(
        "{:>8} {:>11} {:>11} {:>22} {:>10} {:>10} {:>22}",
        "size",
        "gloo µs",
        "ferrun µs",
        "time ferrun/gloo",
        "gloo GB/s",
        "ferrun GB/s",
        "busbw ferrun/gloo"
    );
    for (i, (g, f)) in gloo.iter().zip(&ours).enumerate() {
        let per_round = |k: fn(&(u64, f64, f64, u64)) -> f64, inv: bool| -> Vec<f64> {
            sweeps[0]
                .iter()
                .zip(&sweeps[1])
                .filter_map(|(gr, fr)| Some((k(gr.get(i)?), k(fr.get(i)?))))
                .map(|(a, b)| if inv { b / a } else { a / b })
                .collect()
        };
        let (t, tlo, thi) = spread(&per_round(|r| r.1, true));
        let (bw, blo, bhi) = spread(&per_round(|r| r.2, true));
        println!(
            "{:>8} {:>11.1} {:>11.1} {:>7.3} [{:.3}–{:.3}] {:>10.3} {:>10.3} {:>7.2} [{:.2}–{:.2}]",
            human(g.0),
            g.1,
            f.1,
            t,
            tlo,
            thi,
            g.2,
            f.2,
            bw,
            blo,
            bhi
        );
    }
    println!();
}
