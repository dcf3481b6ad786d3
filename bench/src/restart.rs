//! The restart of torch workers: 4 workers that import torch, rank 1 fails once; from its
//! failure to every worker of the restarted group running *with torch imported*, read from the
//! workers' own timestamps. torchrun, ferrun cold and ferrun `--warm-start`, interleaved in one
//! invocation, so all three see the same machine; the failure both as a crash ends a process
//! (`os._exit`) and as Python's `sys.exit`, whose interpreter teardown every launcher waits out.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context};

use crate::launcher::restart_gap;
use crate::stats::{ratio, summarize};

/// Options of `ferrun-bench restart`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Timed runs per launcher (after one warm-up run each).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Workers per job.
    #[arg(long, default_value_t = 4)]
    nproc: u32,
    /// Seconds the failing worker runs before it fails (the warm interpreters import meanwhile).
    #[arg(long, default_value_t = 8.0)]
    fail_after: f64,
    /// The worker.
    #[arg(long, default_value = "bench/python/torch_fail_once.py")]
    script: PathBuf,
    /// The torch 2.13 virtualenv (its python runs the workers, its torchrun is the peer).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// The ferrun binary to measure.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
}

const LAUNCHERS: [&str; 3] = ["torchrun", "ferrun cold", "ferrun --warm-start"];

/// How the failing worker ends.
const EXITS: [(&str, bool); 2] = [("a crash (os._exit)", true), ("sys.exit(1)", false)];

fn command(o: &Options, which: usize, hard: bool) -> Command {
    let mut cmd = crate::launcher::three_launchers(&o.venv, &o.ferrun, which);
    cmd.env("LOGLEVEL", "ERROR")
        .env("RUST_LOG", "error")
        .args(["--standalone", "--nproc-per-node", &o.nproc.to_string()])
        .args(["--max-restarts", "1"])
        .arg(&o.script)
        .args(["--fail-after", &o.fail_after.to_string()])
        .args(hard.then_some("--hard-exit"))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

fn time_restart(o: &Options, which: usize, hard: bool) -> anyhow::Result<Duration> {
    let name = LAUNCHERS[which];
    let out = command(o, which, hard)
        .output()
        .with_context(|| format!("{name}: cannot run it"))?;
    ensure!(
        out.status.success(),
        "{name}: the restart job failed: {}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    restart_gap(&stdout, o.nproc).with_context(|| format!("{name} printed:\n{stdout}"))
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(o.runs >= 1, "--runs must be at least 1");
    ensure!(
        o.script.is_file(),
        "{} not found: run from the repository root or pass --script",
        o.script.display()
    );
    ensure!(
        o.ferrun.is_file(),
        "{} not found: build it with `cargo build --release -p ferrun-launcher`",
        o.ferrun.display()
    );
    let mut samples: [[Vec<Duration>; 3]; 2] = Default::default();
    for round in 0..=o.runs {
        for ((_, hard), by_launcher) in EXITS.iter().zip(samples.iter_mut()) {
            for (which, kept) in by_launcher.iter_mut().enumerate() {
                let gap = time_restart(o, which, *hard)?;
                if round > 0 {
                    kept.push(gap);
                }
                eprint!(".");
            }
        }
    }
    eprintln!();
    println!(
        "restart benchmark: {} torch workers, rank 1 fails once; failure → every restarted worker running with torch imported; {} runs each after a warm-up",
        o.nproc, o.runs
    );
    println!(
        "{:<22} {:<20} {:>10} {:>10} {:>10} {:>12}",
        "launcher", "failure", "min", "median", "max", "× torchrun"
    );
    for ((exit, _), by_launcher) in EXITS.iter().zip(&samples) {
        let torchrun = summarize(&by_launcher[0]).context("no torchrun samples")?;
        for (name, kept) in LAUNCHERS.iter().zip(by_launcher) {
            let s = summarize(kept).context("no samples")?;
            let max = kept.iter().max().copied().unwrap_or_default();
            let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
            println!(
                "{name:<22} {exit:<20} {:>10} {:>10} {:>10} {:>12.3}",
                ms(s.min),
                ms(s.median),
                ms(max),
                ratio(s.median, torchrun.median)
            );
        }
    }
    println!("× torchrun = median / torchrun's median (goal for --warm-start: ≤ 0.10). With sys.exit the");
    println!("failing interpreter's own teardown comes first: no launcher sees the failure before it ends.");
    Ok(())
}
