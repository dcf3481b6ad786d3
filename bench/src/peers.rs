//! Running each contender of `compare` once: ferrun's collective bench under `ferrun`, Gloo's
//! anchor under `torchrun`, OpenMPI's anchor under `mpirun` — on this host, or across two
//! namespaced hosts with half the ranks on each.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};

use anyhow::{ensure, Context};
use ferrun_tests::netns::Hosts;
use serde_json::Value;

/// `(size, time µs, busbw)` rows of one run.
/// Per size: bytes, time (µs), busbw (GB/s), wrong elements.
pub(crate) type Rows = Vec<(u64, f64, f64, u64)>;

/// Where the ranks run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Place<'a> {
    /// All on this host.
    OneHost,
    /// Half on each of two hosts, TCP between them.
    TwoHosts(&'a Hosts),
}

/// A launch of `n` ranks: `launcher` is `ferrun` or `torchrun`; `args` follow its own flags.
pub(crate) struct Launch<'a> {
    pub(crate) launcher: &'a Path,
    pub(crate) n: usize,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
}

/// A port for each multi-host launch, so that a run never meets the last one's sockets.
fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(29700);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Launch<'_> {
    /// Runs it to the end; an error names the launcher and its exit status.
    pub(crate) fn run(&self, place: Place<'_>) -> anyhow::Result<()> {
        let name = self.launcher.display();
        match place {
            Place::OneHost => {
                let n = self.n.to_string();
                let out = self
                    .command(&["--standalone", "--nproc-per-node", &n], None)
                    .stderr(Stdio::piped())
                    .output()
                    .with_context(|| format!("start {name}"))?;
                ensure!(
                    out.status.success(),
                    "{name} with {n} ranks failed: {}; the errors it printed:\n{}",
                    out.status,
                    error_lines(&out.stderr)
                );
            }
            Place::TwoHosts(hosts) => {
                ensure!(
                    self.n % 2 == 0,
                    "{} ranks cannot be split over two hosts: give even --ranks",
                    self.n
                );
                let (per, port) = ((self.n / 2).to_string(), next_port().to_string());
                let mut nodes = Vec::new();
                for node in 0..2 {
                    let flags = [
                        "--nnodes",
                        "2",
                        "--node-rank",
                        &node.to_string(),
                        "--nproc-per-node",
                        &per,
                        "--master-addr",
                        &hosts.addrs[0],
                        "--master-port",
                        &port,
                    ];
                    let cmd = self.command(&flags, Some(&hosts.ifnames[node]));
                    nodes.push(
                        hosts
                            .on(node, &cmd)
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .spawn()
                            .with_context(|| format!("start {name} on host {node}"))?,
                    );
                }
                let mut failed = None;
                for (node, child) in nodes.iter_mut().enumerate() {
                    let status = child.wait()?;
                    if !status.success() && failed.is_none() {
                        failed = Some(format!("{name} on host {node} failed: {status}"));
                    }
                }
                if let Some(why) = failed {
                    anyhow::bail!(why);
                }
            }
        }
        Ok(())
    }

    fn command(&self, flags: &[&str], ifname: Option<&str>) -> Command {
        let mut cmd = Command::new(self.launcher);
        cmd.args(flags)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("GLOO_SOCKET_IFNAME", ifname.unwrap_or("lo"))
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    }
}

/// The lines of a launch's output that say what went wrong (the workers' errors), or its last
/// lines when none does.
fn error_lines(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") || l.contains("error:"))
        .take(8)
        .collect();
    if errors.is_empty() {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(12)..].join("\n")
    } else {
        errors.join("\n")
    }
}

/// The TCP link between the two hosts, both directions at once: GB/s per direction, the
/// bound on a 2-rank all-reduce's algbw across them.
pub(crate) fn link_rate(hosts: &Hosts) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let addr = format!("{}:{}", hosts.addrs[0], next_port());
    let mut listen = Command::new(&exe);
    listen.args(["link", "--listen", &addr]);
    let mut listener = hosts
        .on(0, &listen)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut ready = String::new();
    let mut out = std::io::BufReader::new(listener.stdout.take().context("listener stdout")?);
    std::io::BufRead::read_line(&mut out, &mut ready)?;
    ensure!(
        ready.trim() == "listening",
        "the link test's listener did not start"
    );
    let mut connect = Command::new(&exe);
    connect.args(["link", "--connect", &addr]);
    let measured = hosts.on(1, &connect).stdin(Stdio::null()).output();
    if !measured.as_ref().is_ok_and(|m| m.status.success()) {
        // No connection will come: the listener would wait forever.
        let _ = listener.kill();
    }
    listener.wait()?;
    let measured = measured?;
    ensure!(
        measured.status.success(),
        "the link test failed: {}",
        String::from_utf8_lossy(&measured.stderr)
    );
    Ok(String::from_utf8_lossy(&measured.stdout).trim().parse()?)
}

/// Builds the OpenMPI anchor when mpicc and mpirun are installed.
pub(crate) fn build_mpi(anchors: &Path, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if which("mpicc").is_none() || which("mpirun").is_none() {
        return Ok(None);
    }
    let bin = dir.join("mpi_allreduce");
    let status = Command::new("mpicc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(anchors.join("mpi_allreduce.c"))
        .status()?;
    ensure!(
        status.success(),
        "mpicc failed on the OpenMPI anchor: {status}"
    );
    Ok(Some(bin))
}

/// Runs the OpenMPI anchor on `n` ranks of this host; its rows, the 4-byte latency as size 4.
pub(crate) fn run_mpi(bin: &Path, n: usize, dir: &Path) -> anyhow::Result<Rows> {
    let json = dir.join(format!("mpi_{n}.json"));
    let status = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &n.to_string(),
        ])
        .arg(bin)
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(
        status.success(),
        "OpenMPI's run with {n} ranks failed: {status}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json)?)?;
    let mut rows = vec![(
        4,
        v["latency_4B_us"]["median"].as_f64().unwrap_or(f64::NAN),
        0.0,
        0,
    )];
    for r in v["rows"].as_array().context("OpenMPI's JSON has no rows")? {
        rows.push(row(r));
    }
    Ok(rows)
}

/// A row as a runtime wrote it; one that does not say how many elements were wrong counts as
/// all wrong (a result that cannot be checked is not a result).
fn row(r: &Value) -> (u64, f64, f64, u64) {
    (
        r["size"].as_u64().unwrap_or(0),
        r["time_us"].as_f64().unwrap_or(f64::NAN),
        r["busbw"].as_f64().unwrap_or(f64::NAN),
        r["wrong"].as_u64().unwrap_or(u64::MAX),
    )
}

/// The rows `ferrun-bench collective --json` wrote.
pub(crate) fn read_ours(path: &Path) -> anyhow::Result<Rows> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .map(|line| Ok(row(&serde_json::from_str(line)?)))
        .collect()
}

/// The rows Gloo's anchor wrote for collective `name`.
pub(crate) fn read_gloo(path: &Path, name: &str) -> anyhow::Result<Rows> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let rows = v["collectives"][name]["rows"]
        .as_array()
        .context("Gloo's JSON has no rows for this collective")?;
    Ok(rows.iter().map(row).collect())
}

/// Per size, the median over runs of time and of busbw (runs interleave with the other
/// contenders', so that a noisy minute weighs on all alike).
pub(crate) fn median_rows(runs: &[Rows]) -> Rows {
    let Some(first) = runs.first() else {
        return Vec::new();
    };
    first
        .iter()
        .map(|&(size, _, _, _)| {
            let pick = |f: fn(&(u64, f64, f64, u64)) -> f64| {
                let mut xs: Vec<f64> = runs
                    .iter()
                    .filter_map(|rows| rows.iter().find(|r| r.0 == size).map(f))
                    .collect();
                xs.sort_by(f64::total_cmp);
                xs.get(xs.len() / 2).copied().unwrap_or(f64::NAN)
            };
            let wrong = runs
                .iter()
                .filter_map(|rows| rows.iter().find(|r| r.0 == size).map(|r| r.3))
                .max()
                .unwrap_or(0);
            (size, pick(|r| r.1), pick(|r| r.2), wrong)
        })
        .collect()
}

pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_are_taken_per_size_over_runs() {
        let runs = vec![
            vec![(4, 1.0, 0.0, 0), (1024, 10.0, 3.0, 0)],
            vec![(4, 3.0, 0.0, 0), (1024, 30.0, 1.0, 5)],
            vec![(4, 2.0, 0.0, 0), (1024, 20.0, 2.0, 0)],
        ];
        // Wrong results of any round stay visible.
        assert_eq!(
            median_rows(&runs),
            vec![(4, 2.0, 0.0, 0), (1024, 20.0, 2.0, 5)]
        );
        let missing: Value = serde_json::json!({"size": 8, "time_us": 1.0, "busbw": 1.0});
        assert_eq!(row(&missing).3, u64::MAX);
        assert!(median_rows(&[]).is_empty());
    }
}
