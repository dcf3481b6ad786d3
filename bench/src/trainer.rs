//! `ferrun-bench trainer`: ferrun-train's samples/s at 1, 2 and 4 ranks — DDP with and without
//! overlap, ZeRO stages 1–3 — beside torch 2.13 DDP over Gloo under torchrun training the same
//! model on the same digits with the same batch, in one invocation. Every round runs every
//! configuration, the first one rotating; the tables give medians over rounds with the range
//! of the per-round ratio. Overlap is measured on a wider model (several buckets, backward
//! long enough to hide a reduction behind). A run whose held-out accuracy falls below
//! `--min-accuracy` is a wrong result: the benchmark prints it and exits non-zero.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};

/// Options of `ferrun-bench trainer`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// World sizes, comma separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub(crate) ranks: Vec<usize>,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Epochs per run (the main job's model).
    #[arg(long, default_value_t = 10)]
    pub(crate) epochs: u64,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 32)]
    pub(crate) batch_size: usize,
    /// Hidden widths of the wider model the overlap is measured on.
    #[arg(long, default_value = "1024,1024,1024")]
    pub(crate) wide: String,
    /// Epochs of each wide run.
    #[arg(long, default_value_t = 2)]
    pub(crate) wide_epochs: u64,
    /// The two-host overlap runs' link rate in Gbit/s (0: no two-host runs; needs root).
    #[arg(long, default_value_t = 2.0)]
    pub(crate) link_gbit: f64,
    /// Samples per rank per step of the two-host runs.
    #[arg(long, default_value_t = 128)]
    pub(crate) link_batch: usize,
    /// A run below this held-out accuracy is wrong.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) min_accuracy: f64,
    /// The torch 2.13 virtualenv (scripts/setup-python.sh prints it).
    #[arg(long, env = "FERRUN_VENV")]
    pub(crate) venv: PathBuf,
    /// The ferrun binary.
    #[arg(long, default_value = "target/release/ferrun")]
    pub(crate) ferrun: PathBuf,
    /// The trainer binary.
    #[arg(long, default_value = "target/release/ferrun-train")]
    pub(crate) train: PathBuf,
    /// torch's side.
    #[arg(long, default_value = "bench/python/trainer_torch.py")]
    pub(crate) script: PathBuf,
}

/// One configuration of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Torch,
    Ferrun { stage: &'static str, overlap: bool },
    Wide { overlap: bool },
}

impl Run {
    fn name(self) -> String {
        match self {
            Self::Torch => "torch DDP (gloo)".into(),
            Self::Ferrun {
                stage,
                overlap: true,
            } => format!("ferrun {stage}"),
            Self::Ferrun {
                stage,
                overlap: false,
            } => format!("ferrun {stage} no-overlap"),
            Self::Wide { overlap: true } => "wide: ferrun ddp".into(),
            Self::Wide { overlap: false } => "wide: ferrun ddp no-overlap".into(),
        }
    }
}

const RUNS: [Run; 8] = [
    Run::Torch,
    Run::Ferrun {
        stage: "ddp",
        overlap: true,
    },
    Run::Ferrun {
        stage: "ddp",
        overlap: false,
    },
    Run::Ferrun {
        stage: "zero1",
        overlap: true,
    },
    Run::Ferrun {
        stage: "zero2",
        overlap: true,
    },
    Run::Ferrun {
        stage: "zero3",
        overlap: true,
    },
    Run::Wide { overlap: true },
    Run::Wide { overlap: false },
];

/// (accuracy, samples/s) from a `final:` line.
pub(crate) fn parse_final(stdout: &str) -> Option<(f64, f64)> {
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("final: ").map(|p| p.1))?;
    let get = |key: &str| -> Option<f64> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    };
    Some((get("accuracy=")?, get("samples/s=")?))
}

fn launch(o: &Options, n: usize, run: Run) -> anyhow::Result<(f64, f64)> {
    let path = format!(
        "{}:{}",
        o.venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let (epochs, batch) = (o.epochs.to_string(), o.batch_size.to_string());
    let wide_epochs = o.wide_epochs.to_string();
    let mut cmd = match run {
        Run::Torch => {
            let mut c = Command::new(o.venv.join("bin/torchrun"));
            c.args(["--standalone", "--nproc-per-node", &n.to_string()])
                .arg(&o.script)
                .args(["--epochs", &epochs, "--batch-size", &batch]);
            c
        }
        Run::Ferrun { .. } | Run::Wide { .. } => {
            let mut c = Command::new(&o.ferrun);
            c.args([
                "--standalone",
                "--nproc-per-node",
                &n.to_string(),
                "--no-python",
            ])
            .arg(&o.train)
            .args(["--batch-size", &batch]);
            match run {
                Run::Ferrun { stage, overlap } => {
                    c.args(["--stage", stage, "--epochs", &epochs]);
                    if !overlap {
                        c.arg("--no-overlap");
                    }
                }
                Run::Wide { overlap } => {
                    c.args([
                        "--hidden",
                        &o.wide,
                        "--epochs",
                        &wide_epochs,
                        "--bucket-mb",
                        "4",
                    ]);
                    if !overlap {
                        c.arg("--no-overlap");
                    }
                }
                Run::Torch => {}
            }
            c
        }
    };
    let out = cmd
        .env("PATH", path)
        .output()
        .with_context(|| format!("start {}", run.name()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(12).collect();
        bail!(
            "{} on {n} ranks failed ({}):\n{}",
            run.name(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    parse_final(&stdout).with_context(|| format!("{} printed no final line:\n{stdout}", run.name()))
}

/// Median of the finite values (a failed run is NaN).
fn median(xs: &[f64]) -> f64 {
    let mut s: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn range(xs: &[f64]) -> (f64, f64) {
    let finite = xs.iter().copied().filter(|x| x.is_finite());
    let lo = finite.clone().fold(f64::INFINITY, f64::min);
    let hi = finite.fold(f64::NEG_INFINITY, f64::max);
    (lo, hi)
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    for bin in [&o.ferrun, &o.train] {
        if !bin.is_file() {
            bail!(
                "{} is missing: build it with `eval \"$(scripts/libtorch-env.sh)\" && cargo build \
                 --release -p ferrun-launcher -p ferrun-trainer`",
                bin.display()
            );
        }
    }
    // rates[n][run] = samples/s per round.
    let mut rates = vec![vec![Vec::new(); RUNS.len()]; o.ranks.len()];
    let mut wrong = Vec::new();
    let mut peer_failures = 0usize;
    for round in 0..o.rounds {
        for (ni, &n) in o.ranks.iter().enumerate() {
            for k in 0..RUNS.len() {
                let ri = (k + round) % RUNS.len();
                // A peer's crash (torch's gloo aborts now and then here) loses its sample, not
                // the benchmark; ferrun's own failing is a wrong result.
                let (acc, rate) = match launch(o, n, RUNS[ri]) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("round {} · {n} ranks · {e:#}", round + 1);
                        if RUNS[ri] != Run::Torch {
                            wrong.push(format!("{} on {n} ranks failed", RUNS[ri].name()));
                        } else {
                            peer_failures += 1;
                        }
                        // Kept as NaN so that per-round ratios stay paired by round.
                        rates[ni][ri].push(f64::NAN);
                        continue;
                    }
                };
                eprintln!(
                    "round {}/{} · {n} ranks · {:<28} {rate:>9.0} samples/s  accuracy {acc:.4}",
                    round + 1,
                    o.rounds,
                    RUNS[ri].name()
                );
                if acc < o.min_accuracy {
                    wrong.push(format!(
                        "{} on {n} ranks: accuracy {acc:.4}",
                        RUNS[ri].name()
                    ));
                }
                rates[ni][ri].push(rate);
            }
        }
    }
    let torch = 0;
    let ddp = 1;
    println!(
        "\nsamples/s (median of {} rounds; {} epochs, batch {} per rank, MLP 64-128-128-10)",
        o.rounds, o.epochs, o.batch_size
    );
    print!("{:<6}", "ranks");
    for run in &RUNS[..6] {
        print!("{:>22}", run.name());
    }
    println!("{:>26}{:>18}", "ferrun ddp / torch", "scaling f / t");
    let base = |ri: usize| median(&rates[0][ri]) * o.ranks[0] as f64;
    for (ni, &n) in o.ranks.iter().enumerate() {
        print!("{n:<6}");
        for per_round in &rates[ni][..6] {
            print!("{:>22.0}", median(per_round));
        }
        let ratios: Vec<f64> = rates[ni][ddp]
            .iter()
            .zip(&rates[ni][torch])
            .map(|(f, t)| f / t)
            .collect();
        let (lo, hi) = range(&ratios);
        let scale = |ri: usize| median(&rates[ni][ri]) / (base(ri) / o.ranks[0] as f64 * n as f64);
        println!(
            "{:>12.2}× ({lo:.2}–{hi:.2}){:>11.2} / {:.2}",
            median(&ratios),
            scale(ddp),
            scale(torch)
        );
    }
    println!(
        "\noverlap, wide MLP 64-{}-10, 4 MiB buckets, {} epochs (median samples/s)",
        o.wide.replace(',', "-"),
        o.wide_epochs
    );
    println!(
        "{:<6}{:>16}{:>16}{:>24}",
        "ranks", "overlap", "after backward", "overlap / after"
    );
    for (ni, &n) in o.ranks.iter().enumerate() {
        let ratios: Vec<f64> = rates[ni][6]
            .iter()
            .zip(&rates[ni][7])
            .map(|(a, b)| a / b)
            .collect();
        let (lo, hi) = range(&ratios);
        println!(
            "{n:<6}{:>16.0}{:>16.0}{:>14.3}× ({lo:.3}–{hi:.3})",
            median(&rates[ni][6]),
            median(&rates[ni][7]),
            median(&ratios)
        );
    }
    if o.link_gbit > 0.0 {
        let rounds = crate::trainer_hosts::overlap_over_link(o, &mut wrong)?;
        let ratios: Vec<f64> = rounds.iter().map(|(a, b)| a / b).collect();
        let (lo, hi) = range(&ratios);
        let (ov, af): (Vec<f64>, Vec<f64>) = rounds.into_iter().unzip();
        println!(
            "\noverlap across two hosts (network namespaces, one rank each, TCP over a {} Gbit/s \
             link), wide MLP, batch {} per rank",
            o.link_gbit, o.link_batch
        );
        println!(
            "{:>16}{:>16}{:>24}\n{:>16.0}{:>16.0}{:>14.3}× ({lo:.3}–{hi:.3})",
            "overlap",
            "after backward",
            "overlap / after",
            median(&ov),
            median(&af),
            median(&ratios)
        );
    }
    if peer_failures > 0 {
        println!("\ntorch DDP failed in {peer_failures} run(s) (left out of its medians)");
    }
    if !wrong.is_empty() {
        bail!("wrong results:\n{}", wrong.join("\n"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_line_gives_accuracy_and_rate() {
        let out = "[default0]:epoch 1/1 …\n[default0]:final: accuracy=0.9611 loss=0.1 samples/s=1234 stage=Ddp\n";
        assert_eq!(parse_final(out), Some((0.9611, 1234.0)));
        assert_eq!(
            parse_final("final: accuracy=0.9"),
            None,
            "no rate: no result"
        );
    }
}
