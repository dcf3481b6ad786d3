//! torchrun against ferrun on the anchor jobs (`../shared/anchors`): `noop.py` (4 workers, start
//! to exit) and `fail_once.py` (rank 1 fails on attempt 0: from its failure to every worker of
//! the restarted group running, read from the workers' own `t=` timestamps).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};

use crate::stats::{ratio, summarize, Summary};

/// Options of `ferrun-bench launcher`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Timed runs per launcher and job (after one warm-up run each).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Workers per job.
    #[arg(long, default_value_t = 4)]
    nproc: u32,
    /// The anchors folder with noop.py and fail_once.py.
    #[arg(long, default_value = "../shared/anchors")]
    anchors: PathBuf,
    /// The torch 2.13 virtualenv (its python runs the workers, its torchrun is the peer).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// The ferrun binary to measure.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Launcher {
    Torchrun,
    Ferrun,
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(o.runs >= 1, "--runs must be at least 1");
    for script in ["noop.py", "fail_once.py"] {
        ensure!(
            o.anchors.join(script).is_file(),
            "{} not found: pass --anchors <shared/anchors folder>",
            o.anchors.join(script).display()
        );
    }
    ensure!(
        o.ferrun.is_file(),
        "{} not found: build it with `cargo build --release -p ferrun-launcher`",
        o.ferrun.display()
    );
    let torchrun = o.venv.join("bin/torchrun");
    ensure!(
        torchrun.is_file(),
        "{} not found: run scripts/setup-python.sh",
        torchrun.display()
    );

    let mut floor = Vec::new();
    let mut noop = [Vec::new(), Vec::new()];
    let mut restart = [Vec::new(), Vec::new()];
    // Interleave the launchers so that both see the same machine noise; the first round warms up.
    for round in 0..=o.runs {
        for (i, launcher) in [Launcher::Torchrun, Launcher::Ferrun]
            .into_iter()
            .enumerate()
        {
            let t = time_noop(o, launcher)?;
            let r = time_restart(o, launcher)?;
            if round > 0 {
                noop[i].push(t);
                restart[i].push(r);
            }
            eprint!(".");
        }
        let f = time_direct_start(o)?;
        if round > 0 {
            floor.push(f);
        }
    }
    eprintln!();
    println!(
        "launcher benchmark: {} workers, {} runs each after a warm-up (wall clock, this machine)",
        o.nproc, o.runs
    );
    println!(
        "{:<44} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "job", "torchrun min", "torchrun med", "ferrun min", "ferrun med", "min ×", "med ×"
    );
    print_row("(a) no-op job, start to exit", &noop);
    print_row("(b) failure → restarted group running", &restart);
    if let Some(f) = summarize(&floor) {
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<44} {:>12} {:>12}",
            "floor: start the workers with no launcher",
            ms(f.min),
            ms(f.median)
        );
    }
    println!("× = ferrun / torchrun (goal ≤ 0.10). The floor is what starting {} Python interpreters costs here:", o.nproc);
    println!("no launcher can restart a group faster than it.");
    Ok(())
}

fn print_row(name: &str, samples: &[Vec<Duration>; 2]) {
    let (Some(t), Some(f)) = (summarize(&samples[0]), summarize(&samples[1])) else {
        return;
    };
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let Summary {
        min: tmin,
        median: tmed,
    } = t;
    println!(
        "{name:<44} {:>12} {:>12} {:>12} {:>12} {:>9.3} {:>9.3}",
        ms(tmin),
        ms(tmed),
        ms(f.min),
        ms(f.median),
        ratio(f.min, tmin),
        ratio(f.median, tmed)
    );
}

fn command(o: &Options, launcher: Launcher, script: &str, extra: &[&str]) -> Command {
    let which = match launcher {
        Launcher::Torchrun => 0,
        Launcher::Ferrun => 1,
    };
    let mut cmd = three_launchers(&o.venv, &o.ferrun, which);
    cmd.env("LOGLEVEL", "ERROR")
        .env("RUST_LOG", "error")
        .args(["--standalone", "--nproc-per-node", &o.nproc.to_string()])
        .args(extra)
        .arg(o.anchors.join(script))
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// torchrun (0), ferrun (1) or ferrun `--warm-start` (2), with the venv first on `PATH`.
pub(crate) fn three_launchers(
    venv: &std::path::Path,
    ferrun: &std::path::Path,
    which: usize,
) -> Command {
    let mut cmd = match which {
        0 => Command::new(venv.join("bin/torchrun")),
        _ => Command::new(ferrun),
    };
    if which == 2 {
        cmd.arg("--warm-start");
    }
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path);
    cmd
}

fn time_noop(o: &Options, launcher: Launcher) -> anyhow::Result<Duration> {
    let mut cmd = command(o, launcher, "noop.py", &[]);
    let start = Instant::now();
    let status = cmd
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("{launcher:?} noop"))?;
    let elapsed = start.elapsed();
    ensure!(status.success(), "{launcher:?} no-op job failed: {status}");
    Ok(elapsed)
}

/// Starts the workers of a restarted attempt directly (no launcher): from spawn to the last one
/// running, by the same timestamps.
fn time_direct_start(o: &Options) -> anyhow::Result<Duration> {
    let python = o.venv.join("bin/python3");
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    let children = (0..o.nproc)
        .map(|rank| {
            Command::new(&python)
                .arg("-u")
                .arg(o.anchors.join("fail_once.py"))
                .env("RANK", rank.to_string())
                .env("TORCHELASTIC_RESTART_COUNT", "1")
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut last = t0;
    for child in children {
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let t = text
            .split("t=")
            .nth(1)
            .and_then(|t| t.trim().parse::<f64>().ok())
            .context("worker timestamp")?;
        last = last.max(t);
    }
    Ok(Duration::from_secs_f64(last - t0))
}

fn time_restart(o: &Options, launcher: Launcher) -> anyhow::Result<Duration> {
    let out = command(o, launcher, "fail_once.py", &["--max-restarts", "1"])
        .output()
        .with_context(|| format!("{launcher:?} fail_once"))?;
    ensure!(
        out.status.success(),
        "{launcher:?} restart job failed: {}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    restart_gap(&stdout, o.nproc).with_context(|| format!("{launcher:?} printed:\n{stdout}"))
}

/// From `rank R attempt A pid P t=T` lines: the time from rank 1's failed attempt 0 to the
/// last worker of attempt 1 running.
pub(crate) fn restart_gap(stdout: &str, nproc: u32) -> anyhow::Result<Duration> {
    let mut failed_at = None;
    let mut restarted = Vec::new();
    // torchrun's workers share its terminal unprefixed, so their lines can run into each other:
    // split on the records themselves, not on lines.
    for record in stdout.split("rank ").skip(1) {
        let fields: Vec<&str> = record.split_whitespace().take(6).collect();
        let [rank, "attempt", attempt, "pid", _, t] = fields.as_slice() else {
            continue;
        };
        let t: f64 = t.trim_start_matches("t=").parse()?;
        match (*rank, *attempt) {
            ("1", "0") => failed_at = Some(t),
            (_, "1") => restarted.push(t),
            _ => {}
        }
    }
    let Some(failed_at) = failed_at else {
        bail!("rank 1 never reported attempt 0")
    };
    ensure!(
        restarted.len() == nproc as usize,
        "{} of {nproc} workers reported attempt 1",
        restarted.len()
    );
    let last = restarted.iter().copied().fold(f64::MIN, f64::max);
    Ok(Duration::from_secs_f64((last - failed_at).max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_gap_from_worker_timestamps() {
        let out =
            "[default1]:rank 1 attempt 0 pid 10 t=100.000\nrank 0 attempt 0 pid 9 t=100.001\n\
                   rank 0 attempt 1 pid 11 t=100.020rank 1 attempt 1 pid 12 t=100.030\n";
        let gap = restart_gap(out, 2).expect("gap");
        assert!((gap.as_secs_f64() - 0.030).abs() < 1e-6, "{gap:?}");
        assert!(restart_gap("rank 0 attempt 1 pid 1 t=1.0\n", 2).is_err());
    }
}
