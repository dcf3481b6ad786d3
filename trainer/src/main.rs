//! `ferrun-train`: trains an MLP on the handwritten digits data-parallel, as one worker of a
//! job started by `ferrun` (or torchrun): `ferrun --standalone --nproc-per-node 4 ferrun-train`.
//!
//! Exit codes: 0 trained; 1 training failed (data, checkpoint, a peer); 2 bad arguments.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use ferrun_collective::zero::{Optimizer, Stage};
use ferrun_trainer::train::{self, Config};

/// What is sharded.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum StageArg {
    /// Plain data parallelism (stage 0), as torch DDP.
    Ddp,
    /// ZeRO stage 1: the optimizer state is sharded.
    Zero1,
    /// ZeRO stage 2: and the reduced gradients.
    Zero2,
    /// ZeRO stage 3: and the parameters.
    Zero3,
}

/// The optimizer.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum OptimArg {
    /// SGD with momentum.
    Sgd,
    /// AdamW.
    Adamw,
}

/// Data-parallel training of an MLP on the handwritten digits (scikit-learn's copy), on
/// ferrun's collectives. Run it under `ferrun` (or torchrun), which gives each worker its
/// rank and the job's store.
#[derive(Debug, Parser)]
#[command(name = "ferrun-train", version)]
struct Args {
    /// What is sharded across the ranks.
    #[arg(long, value_enum, default_value = "ddp")]
    stage: StageArg,
    /// Epochs to train.
    #[arg(long, default_value_t = 30)]
    epochs: u64,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.003)]
    lr: f32,
    /// The optimizer.
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptimArg,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Hidden layer widths, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "128,128")]
    hidden: Vec<i64>,
    /// Reduce the gradients after backward instead of during it.
    #[arg(long)]
    no_overlap: bool,
    /// Gradient bucket size in MiB (torch DDP's bucket_cap_mb).
    #[arg(long, default_value_t = 25.0)]
    bucket_mb: f64,
    /// The first bucket's size in MiB (torch DDP: 1).
    #[arg(long, default_value_t = 1.0)]
    first_bucket_mb: f64,
    /// Seeds the initial parameters and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where checkpoints go (none without it).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Checkpoint every N steps too (0: at the end of each epoch only).
    #[arg(long, default_value_t = 0)]
    checkpoint_every: u64,
    /// Resume from the latest complete checkpoint in --checkpoint-dir, if any (implied when the
    /// launcher restarts the workers: TORCHELASTIC_RESTART_COUNT > 0).
    #[arg(long)]
    resume: bool,
    /// Stop after this many steps.
    #[arg(long)]
    max_steps: Option<u64>,
    /// The digits file (default: sklearn/datasets/data/digits.csv.gz in the Python
    /// environment on PATH).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Intra-op threads of each worker's libtorch.
    #[arg(long, default_value_t = 1)]
    threads: i32,
    /// Rank 0 writes the final parameters to this file (f32, little-endian, in order).
    #[arg(long)]
    dump_params: Option<PathBuf>,
    /// Rank 0 writes the final metrics here as JSON (accuracy, loss, steps, samples/s, world
    /// size, stage): a pipeline step's metrics artifact.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
}

/// Writes `metrics` to `path` whole or not at all (a temporary file renamed), creating the
/// directory: a reader never sees half a file.
fn write_metrics(path: &std::path::Path, metrics: &serde_json::Value) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{metrics:#}\n"))?;
    std::fs::rename(&tmp, path)
}

fn mib(v: f64, flag: &str) -> Result<usize, String> {
    if v.is_finite() && v > 0.0 && v <= 1024.0 * 1024.0 {
        Ok((v * 1024.0 * 1024.0) as usize)
    } else {
        Err(format!("{flag} {v}: give a size in MiB above 0"))
    }
}

fn config(a: &Args) -> Result<Config, String> {
    if a.hidden.is_empty() || a.hidden.iter().any(|&h| h <= 0 || h > 1 << 16) {
        return Err(format!("--hidden {:?}: give widths 1–65536", a.hidden));
    }
    if a.batch_size == 0 || a.epochs == 0 {
        return Err("--batch-size and --epochs must be at least 1".into());
    }
    if !(a.lr.is_finite() && a.lr > 0.0) {
        return Err(format!("--lr {}: give a positive learning rate", a.lr));
    }
    if a.threads < 1 {
        return Err(format!("--threads {}: at least 1", a.threads));
    }
    let stage = match a.stage {
        StageArg::Ddp => Stage::Replicated,
        StageArg::Zero1 => Stage::Optimizer,
        StageArg::Zero2 => Stage::Gradients,
        StageArg::Zero3 => Stage::Parameters,
    };
    let optimizer = match a.optimizer {
        OptimArg::Sgd => Optimizer::sgd(a.lr, a.momentum),
        OptimArg::Adamw => Optimizer::adamw(a.lr),
    };
    if (a.resume || a.checkpoint_every > 0) && a.checkpoint_dir.is_none() {
        return Err("--resume and --checkpoint-every need --checkpoint-dir".into());
    }
    Ok(Config {
        stage,
        epochs: a.epochs,
        batch: a.batch_size,
        optimizer,
        hidden: a.hidden.clone(),
        overlap: !a.no_overlap,
        bucket_bytes: mib(a.bucket_mb, "--bucket-mb")?,
        first_bucket_bytes: mib(a.first_bucket_mb, "--first-bucket-mb")?,
        seed: a.seed,
        checkpoint_dir: a.checkpoint_dir.clone(),
        checkpoint_every: a.checkpoint_every,
        resume: a.resume,
        max_steps: a.max_steps,
        data: a.data.clone(),
        dump_params: a.dump_params.clone(),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FERRUN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let config = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrun-train: {e}");
            return ExitCode::from(2);
        }
    };
    tch::set_num_threads(args.threads);
    tch::set_num_interop_threads(1);
    let rank = std::env::var("RANK").unwrap_or_else(|_| "0".into());
    match train::run(&config) {
        Ok(s) => {
            if rank == "0" {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stdout(),
                    "final: accuracy={:.4} loss={:.4} steps={} samples/s={:.0} stage={:?} \
                     world={} params={:#018x}",
                    s.accuracy,
                    s.loss,
                    s.steps,
                    s.samples_per_s,
                    args.stage,
                    std::env::var("WORLD_SIZE").unwrap_or_else(|_| "1".into()),
                    s.checksum
                );
                if let Some(path) = &args.metrics_file {
                    let world = std::env::var("WORLD_SIZE").unwrap_or_else(|_| "1".into());
                    let metrics = serde_json::json!({
                        "accuracy": s.accuracy,
                        "loss": s.loss,
                        "steps": s.steps,
                        "samples_per_s": s.samples_per_s,
                        "world_size": world.parse::<u64>().ok(),
                        "stage": format!("{:?}", args.stage).to_lowercase(),
                    });
                    if let Err(e) = write_metrics(path, &metrics) {
                        eprintln!("ferrun-train: write --metrics-file {}: {e}", path.display());
                        return ExitCode::from(1);
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrun-train (rank {rank}): {e}");
            ExitCode::from(1)
        }
    }
}
