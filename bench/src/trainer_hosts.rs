//! `ferrun-bench trainer`'s two-host part: what overlapping backward with communication gains
//! where communication waits on a link rather than on this machine's two cores. Two network
//! namespaces joined by a veth pair shaped by `tc` to `--link-gbit` are the hosts, one rank on
//! each (TCP between them), training the wide model with overlap and after backward,
//! alternating which goes first.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use ferrun_tests::netns::Hosts;

use crate::trainer::{parse_final, Options};

/// Shapes both ends of the link to `gbit`.
fn shape(hosts: &Hosts, gbit: f64) -> anyhow::Result<()> {
    for i in 0..2 {
        let rate = format!("{}mbit", (gbit * 1000.0).round() as u64);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &hosts.names[i],
                "tc",
                "qdisc",
                "add",
                "dev",
            ])
            .arg(&hosts.ifnames[i])
            .args([
                "root", "tbf", "rate", &rate, "burst", "1mb", "latency", "50ms",
            ])
            .output()
            .context("run tc (iproute2)")?;
        if !out.status.success() {
            bail!(
                "tc on {}: {}",
                hosts.names[i],
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

fn node(o: &Options, hosts: &Hosts, rank: usize, overlap: bool) -> anyhow::Result<Child> {
    let path = format!(
        "{}:{}",
        o.venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new(&o.ferrun);
    c.args([
        "--nnodes",
        "2",
        "--node-rank",
        &rank.to_string(),
        "--nproc-per-node",
        "1",
    ])
    .args([
        "--master-addr",
        &hosts.addrs[0],
        "--master-port",
        "29500",
        "--no-python",
    ])
    .arg(&o.train)
    .args(["--hidden", &o.wide, "--epochs", &o.wide_epochs.to_string()])
    .args([
        "--batch-size",
        &o.link_batch.to_string(),
        "--bucket-mb",
        "4",
    ])
    .env("PATH", path);
    if !overlap {
        c.arg("--no-overlap");
    }
    let mut wrapped = hosts.on(rank, &c);
    wrapped.stdout(Stdio::piped()).stderr(Stdio::piped());
    wrapped.spawn().context("start a node")
}

/// One two-host run: (accuracy, samples/s) from node 0.
fn run_once(o: &Options, hosts: &Hosts, overlap: bool) -> anyhow::Result<(f64, f64)> {
    let a = node(o, hosts, 0, overlap)?;
    let b = node(o, hosts, 1, overlap)?;
    let (a, b) = (a.wait_with_output()?, b.wait_with_output()?);
    for (i, out) in [&a, &b].into_iter().enumerate() {
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(10).collect();
            bail!(
                "node {i} failed: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
    let stdout = String::from_utf8_lossy(&a.stdout);
    parse_final(&stdout).with_context(|| format!("node 0 printed no final line:\n{stdout}"))
}

/// Per round: (overlap, after backward) samples/s; wrong results pushed to `wrong`.
pub(super) fn overlap_over_link(
    o: &Options,
    wrong: &mut Vec<String>,
) -> anyhow::Result<Vec<(f64, f64)>> {
    if !Path::new("/proc/self/ns/net").exists() {
        bail!("network namespaces are not available");
    }
    let hosts = Hosts::create().map_err(|e| anyhow::anyhow!(e))?;
    shape(&hosts, o.link_gbit)?;
    let mut rounds = Vec::new();
    for round in 0..o.rounds {
        let mut pair = [f64::NAN; 2];
        for k in 0..2 {
            let overlap = (k + round) % 2 == 0;
            let (acc, rate) = run_once(o, &hosts, overlap)?;
            eprintln!(
                "round {}/{} · 2 hosts over {} Gbit/s · wide, {:<16} {rate:>7.0} samples/s  \
                 accuracy {acc:.4}",
                round + 1,
                o.rounds,
                o.link_gbit,
                if overlap { "overlap" } else { "after backward" }
            );
            if acc < o.min_accuracy {
                wrong.push(format!(
                    "two-host run (overlap {overlap}): accuracy {acc:.4}"
                ));
            }
            pair[usize::from(!overlap)] = rate;
        }
        rounds.push((pair[0], pair[1]));
    }
    Ok(rounds)
}
