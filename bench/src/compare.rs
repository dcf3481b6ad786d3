//! A collective beside its peers in one invocation: ferrun's communicator (launched by
//! `ferrun`), torch's Gloo (`../shared/anchors/gloo_allreduce.py` under torchrun, torch 2.13)
//! and, for all_reduce where OpenMPI is installed, `mpi_allreduce.c` (its own fixed sizes:
//! the 4 B latency, then 4 KiB … 64 MiB) — same ranks, ratios printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};
use serde_json::Value;

use crate::collective::{parse_size, Collective};

/// Options of `ferrun-bench compare`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// The collective (Gloo's anchor knows all_reduce, broadcast, all_gather, reduce_scatter).
    #[arg(value_enum, default_value = "all_reduce")]
    op: Collective,
    /// World sizes, comma separated.
    #[arg(long, default_value = "2,4", value_delimiter = ',')]
    ranks: Vec<usize>,
    /// Sizes in bytes, comma separated (K, M suffixes).
    #[arg(long, default_value = "4,4K,64K,1M,16M,64M", value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// The anchors folder (gloo_allreduce.py).
    #[arg(long, default_value = "../shared/anchors")]
    anchors: PathBuf,
    /// The torch 2.13 virtualenv.
    #[arg(long, env = "FERRUN_VENV")]
    venv: PathBuf,
    /// Also draw busbw against size for every runtime and world size to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The ferrun binary that launches this benchmark's ranks.
    #[arg(long, default_value = "target/release/ferrun")]
    ferrun: PathBuf,
}

fn op_name(op: Collective) -> &'static str {
    match op {
        Collective::AllReduce => "all_reduce",
        Collective::Broadcast => "broadcast",
        Collective::Reduce => "reduce",
        Collective::AllGather => "all_gather",
        Collective::ReduceScatter => "reduce_scatter",
        Collective::AllToAll => "all_to_all",
    }
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    let gloo = o.anchors.join("gloo_allreduce.py");
    ensure!(
        gloo.is_file(),
        "{} not found: pass --anchors <shared/anchors folder>",
        gloo.display()
    );
    ensure!(
        o.ferrun.is_file(),
        "{} not found: cargo build --release -p ferrun-launcher",
        o.ferrun.display()
    );
    let out = tempfile::tempdir()?;
    let sizes = o
        .sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let name = op_name(o.op);
    let mpi_binary = build_mpi(&o.anchors, out.path())?;
    let mut series: Vec<crate::plot::Series> = Vec::new();
    for &n in &o.ranks {
        let ours_path = out.path().join(format!("ferrun_{n}.json"));
        let status = Command::new(&o.ferrun)
            .args([
                "--standalone",
                "--nproc-per-node",
                &n.to_string(),
                "--no-python",
            ])
            .arg(std::env::current_exe()?)
            .args(["collective", name, "--sizes", &sizes, "--json"])
            .arg(&ours_path)
            .env("RUST_LOG", "error")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        ensure!(
            status.success(),
            "ferrun's run with {n} ranks failed: {status}"
        );
        let theirs_path = out.path().join("gloo").join(format!("{n}.json"));
        let status = Command::new(o.venv.join("bin/torchrun"))
            .args(["--standalone", "--nproc-per-node", &n.to_string()])
            .arg(&gloo)
            .args(["--colls", name, "--sizes", &sizes, "--json"])
            .arg(&theirs_path)
            .env("GLOO_SOCKET_IFNAME", "lo")
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    o.venv.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        ensure!(
            status.success(),
            "Gloo's run with {n} ranks failed: {status}"
        );
        let mpi = match (&mpi_binary, o.op) {
            (Some(bin), Collective::AllReduce) => Some(run_mpi(bin, n, out.path())?),
            _ => None,
        };
        let (ours, gloo) = (read_ours(&ours_path)?, read_gloo(&theirs_path, name)?);
        print_table(name, n, &ours, &gloo, mpi.as_ref());
        let line = |rows: &Rows| {
            rows.iter()
                .filter(|r| r.0 > 4)
                .map(|&(s, _, bw)| (s as f64, bw))
                .collect::<Vec<_>>()
        };
        series.push((format!("ferrun, {n} ranks"), line(&ours)));
        series.push((format!("Gloo, {n} ranks"), line(&gloo)));
        if let Some(m) = &mpi {
            series.push((format!("OpenMPI, {n} ranks"), line(m)));
        }
    }
    if let Some(line) = memcpy_bandwidth(&o.anchors, out.path()) {
        println!("{line}  ← one core's memcpy, the physical limit of a copy within this host\n");
    }
    if let Some(path) = &o.plot {
        crate::plot::busbw_png(path, &format!("{name} busbw (float32)"), &series)?;
        println!("plot: {}", path.display());
    }
    if mpi_binary.is_none() {
        println!("OpenMPI: not installed here (scripts/bench.sh installs openmpi-bin and libopenmpi-dev), so not compared");
    }
    Ok(())
}

/// One core's memcpy bandwidth at 64 MiB (`memcpy_bw.c`), when a C compiler is there.
fn memcpy_bandwidth(anchors: &Path, dir: &Path) -> Option<String> {
    let bin = dir.join("memcpy_bw");
    let built = Command::new("cc")
        .args(["-O2", "-o"])
        .arg(&bin)
        .arg(anchors.join("memcpy_bw.c"))
        .status()
        .ok()?;
    if !built.success() {
        return None;
    }
    let out = Command::new(&bin).args(["64", "11"]).output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds the OpenMPI anchor when mpicc and mpirun are installed.
fn build_mpi(anchors: &Path, dir: &Path) -> anyhow::Result<Option<PathBuf>> {
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

/// Runs the OpenMPI anchor on `n` ranks; its rows, with the 4-byte latency as size 4.
fn run_mpi(bin: &Path, n: usize, dir: &Path) -> anyhow::Result<Rows> {
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
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
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
    )];
    for r in v["rows"].as_array().context("OpenMPI's JSON has no rows")? {
        rows.push((
            r["size"].as_u64().unwrap_or(0),
            r["time_us"].as_f64().unwrap_or(f64::NAN),
            r["busbw"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(rows)
}

/// `(size, time µs, busbw)` rows.
type Rows = Vec<(u64, f64, f64)>;

fn read_ours(path: &Path) -> anyhow::Result<Rows> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)?;
            Ok((
                v["size"].as_u64().unwrap_or(0),
                v["time_us"].as_f64().unwrap_or(f64::NAN),
                v["busbw"].as_f64().unwrap_or(f64::NAN),
            ))
        })
        .collect()
}

fn read_gloo(path: &Path, name: &str) -> anyhow::Result<Rows> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
    )?;
    let rows = v["collectives"][name]["rows"]
        .as_array()
        .context("Gloo's JSON has no rows for this collective")?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r["size"].as_u64().unwrap_or(0),
                r["time_us"].as_f64().unwrap_or(f64::NAN),
                r["busbw"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect())
}

fn print_table(name: &str, n: usize, ours: &Rows, gloo: &Rows, mpi: Option<&Rows>) {
    println!("{name}, {n} ranks, float32 (same invocation; busbw in GB/s)");
    print!(
        "{:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>7}",
        "size", "gloo µs", "ferrun µs", "time ×", "gloo bw", "ferrun bw", "bw ×"
    );
    if mpi.is_some() {
        print!(" {:>9} {:>8} {:>9}", "mpi µs", "mpi bw", "× mpi");
    }
    println!();
    for (size, t, bw) in ours {
        let Some((_, gt, gbw)) = gloo.iter().find(|(s, _, _)| s == size) else {
            continue;
        };
        print!(
            "{size:>10} {gt:>10.1} {t:>10.1} {:>8.3} {gbw:>8.3} {bw:>9.3} {:>7.2}",
            t / gt,
            bw / gbw
        );
        if let Some((_, mt, mbw)) = mpi.and_then(|m| m.iter().find(|(s, _, _)| s == size)) {
            print!(
                " {mt:>9.1} {mbw:>8.3} {:>9.2}",
                if *size == 4 { mt / t } else { bw / mbw }
            );
        }
        println!();
    }
    println!("time × = ferrun / Gloo (lower is better); bw × = ferrun / Gloo; × mpi = ferrun / OpenMPI busbw (at 4 B: OpenMPI time / ferrun time; higher is better)\n");
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
