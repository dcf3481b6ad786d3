//! A host cut off mid-training, torchrun beside ferrun on the same cut: three namespaced hosts
//! run Gloo workers (ferrun's also with `--warm-start`) under `--nnodes 2:3 --rdzv-backend c10d` with the same `--rdzv-conf`; host
//! 2's link goes down (no reset reaches anyone); the time until both survivors' workers run
//! again in a world of two, read from the workers' own timestamps, or "none" within the cap.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use ferrun_tests::netns::Hosts;

/// Options of `ferrun-bench lost-node`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Runs per launcher.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// How long to wait for the survivors' new round before calling it a hang, in seconds.
    #[arg(long, default_value_t = 60)]
    cap_s: u64,
    /// Heartbeat interval in whole seconds (`keep_alive_interval`, which torchrun takes only
    /// whole; × 2 attempts = the timeout).
    #[arg(long, default_value_t = 1)]
    keep_alive: u64,
    /// Let the launchers' stderr through (to see why a run did not start).
    #[arg(long)]
    verbose: bool,
    /// The worker.
    #[arg(long, default_value = "bench/python/gloo_world.py")]
    script: PathBuf,
    /// The torch 2.13 virtualenv (its python runs the workers, its torchrun is the peer).
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// The ferrun binary to measure.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
}

const LAUNCHERS: [&str; 3] = ["torchrun", "ferrun", "ferrun --warm-start"];

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One agent on host `i`, its stdout lines as `(world, t)` on a channel.
fn agent(
    o: &Options,
    hosts: &Hosts,
    i: usize,
    which: usize,
) -> anyhow::Result<(Child, mpsc::Receiver<(u32, f64)>)> {
    let mut cmd = crate::launcher::three_launchers(&o.venv, &o.ferrun, which);
    // Host 0 serves the rendezvous (torchrun cannot tell: the endpoint is no address its
    // hostname resolves to).
    let conf = format!(
        "last_call_timeout=2,keep_alive_interval={},keep_alive_max_attempt=2,join_timeout=120,is_host={}",
        o.keep_alive,
        i == 0
    );
    cmd.env("LOGLEVEL", if o.verbose { "INFO" } else { "ERROR" })
        .env("RUST_LOG", if o.verbose { "info" } else { "error" })
        // torchrun needs it named (the hosts share a hostname that maps to loopback).
        .env("GLOO_SOCKET_IFNAME", &hosts.ifnames[i])
        .args([
            "--nnodes",
            "2:3",
            "--nproc-per-node",
            "1",
            "--max-restarts",
            "3",
        ])
        .args(["--rdzv-backend", "c10d", "--rdzv-id", "lost-node"])
        .args(["--rdzv-endpoint", &format!("{}:29400", hosts.addrs[0])])
        .args(["--rdzv-conf", &conf, "--local-addr", &hosts.addrs[i]])
        .arg(&o.script);
    let mut on = hosts.on(i, &cmd);
    on.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if o.verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        });
    let mut child = on
        .spawn()
        .with_context(|| format!("{}: cannot start it", LAUNCHERS[which]))?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(record) = parse(&line) {
                let _ = tx.send(record);
            }
        }
    });
    Ok((child, rx))
}

/// `(world, t)` from a worker's `world W rank R t=T` line (prefixed or not).
fn parse(line: &str) -> Option<(u32, f64)> {
    let rest = &line[line.find("world ")? + 6..];
    let world = rest.split_whitespace().next()?.parse().ok()?;
    let t = rest.split("t=").nth(1)?.trim().parse().ok()?;
    Some((world, t))
}

/// Waits until `rx` reports a worker in `world`; its time.
fn wait_world(rx: &mpsc::Receiver<(u32, f64)>, world: u32, until: Instant) -> Option<f64> {
    loop {
        let left = until.checked_duration_since(Instant::now())?;
        match rx.recv_timeout(left) {
            Ok((w, t)) if w == world => return Some(t),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// One run: the time from the cut to both survivors running in a world of two (`None`: not
/// within the cap).
fn lose_one(o: &Options, which: usize) -> anyhow::Result<Option<Duration>> {
    let hosts = Hosts::bridged(3).map_err(|e| anyhow::anyhow!(e))?;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(agent(o, &hosts, i, which)?);
    }
    let start_by = Instant::now() + Duration::from_secs(120);
    for (i, (_, rx)) in agents.iter().enumerate() {
        if wait_world(rx, 3, start_by).is_none() {
            hosts.kill_processes();
            bail!(
                "{}: host {i}'s worker never ran in a world of 3",
                LAUNCHERS[which]
            );
        }
    }
    let cut_at = now();
    hosts.cut(2).map_err(|e| anyhow::anyhow!(e))?;
    let cap = Instant::now() + Duration::from_secs(o.cap_s);
    let mut last = cut_at;
    let mut all = true;
    for (_, rx) in &agents[..2] {
        match wait_world(rx, 2, cap) {
            Some(t) => last = last.max(t),
            None => all = false,
        }
    }
    hosts.kill_processes();
    for (mut child, _) in agents {
        let _ = child.kill();
        let _ = child.wait();
    }
    Ok(all.then(|| Duration::from_secs_f64((last - cut_at).max(0.0))))
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    ensure!(o.runs >= 1, "--runs must be at least 1");
    ensure!(
        o.script.is_file() && o.ferrun.is_file(),
        "{} or {} not found: run from the repository root after `cargo build --release -p ferrun-launcher`",
        o.script.display(),
        o.ferrun.display()
    );
    let mut samples: [Vec<Option<Duration>>; 3] = Default::default();
    for _ in 0..o.runs {
        for (which, kept) in samples.iter_mut().enumerate() {
            kept.push(lose_one(o, which)?);
            eprint!(".");
        }
    }
    eprintln!();
    println!(
        "lost-node benchmark: 3 namespaced hosts, Gloo workers, --nnodes 2:3, keep-alive {} s × 2; host 2's link cut",
        o.keep_alive
    );
    println!(
        "{:<20} {:>44}",
        "launcher", "cut → both survivors training in a world of 2"
    );
    for (name, kept) in LAUNCHERS.iter().zip(&samples) {
        let words: Vec<String> = kept
            .iter()
            .map(|s| match s {
                Some(d) => format!("{:.2} s", d.as_secs_f64()),
                None => format!("none within {} s", o.cap_s),
            })
            .collect();
        println!("{name:<20} {:>44}", words.join(", "));
    }
    println!(
        "goal for ferrun: the heartbeat timeout ({} s) + 1 s for the new round, plus the restarted workers' start (import torch, Gloo).",
        o.keep_alive * 2
    );
    if samples[1..].iter().flatten().any(Option::is_none) {
        bail!("ferrun's survivors did not reach a new round within the cap");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn reads_world_and_time_with_or_without_a_prefix() {
        assert_eq!(parse("[default0]:world 2 rank 1 t=12.5"), Some((2, 12.5)));
        assert_eq!(parse("world 3 rank 0 t=1.0"), Some((3, 1.0)));
        assert_eq!(parse("rank 0 attempt 1"), None);
    }
}
