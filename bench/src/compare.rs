//! A collective beside its peers in one invocation: ferrun's communicator (launched by
//! `ferrun`), torch's Gloo (`../shared/anchors/gloo_allreduce.py` under torchrun, torch 2.13)
//! and, for all_reduce where OpenMPI is installed, `mpi_allreduce.c` (its own fixed sizes:
//! the 4 B latency, then 4 KiB … 64 MiB) — same ranks, runs interleaved, ratios printed. With
//! `--two-hosts`, across two namespaced hosts over TCP.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context};
use ferrun_tests::netns::Hosts;

use crate::collective::{parse_size, Collective};
use crate::peers::{
    build_mpi, link_rate, median_rows, read_gloo, read_ours, run_mpi, Launch, Place, Rows,
};

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
    /// Runs of each contender, interleaved; the tables show per-size medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Half the ranks on each of two hosts (network namespaces joined by a veth pair; needs
    /// root), TCP between them; OpenMPI is then not run.
    #[arg(long)]
    two_hosts: bool,
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
    ensure!(o.rounds > 0, "--rounds must be at least 1");
    let hosts = if o.two_hosts {
        Some(Hosts::create().map_err(|e| anyhow::anyhow!(e))?)
    } else {
        None
    };
    let place = hosts.as_ref().map_or(Place::OneHost, Place::TwoHosts);
    let out = tempfile::tempdir()?;
    let name = op_name(o.op);
    // OpenMPI across the namespaced hosts would need ssh between them: one host only.
    let mpi_binary = match (o.two_hosts, o.op) {
        (false, Collective::AllReduce) => build_mpi(&o.anchors, out.path())?,
        _ => None,
    };
    let mut series: Vec<crate::plot::Series> = Vec::new();
    let mut wrong_results = Vec::new();
    for &n in &o.ranks {
        let (mut ours, mut theirs, mut mpi) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..o.rounds {
            eprintln!("{name}, {n} ranks: round {}/{}", round + 1, o.rounds);
            ours.push(run_ferrun(o, n, place, out.path())?);
            theirs.push(run_gloo(o, n, place, out.path())?);
            if let Some(bin) = &mpi_binary {
                mpi.push(run_mpi(bin, n, out.path())?);
            }
        }
        let (ours, gloo) = (median_rows(&ours), median_rows(&theirs));
        let mpi = (!mpi.is_empty()).then(|| median_rows(&mpi));
        print_table(name, n, place, o.rounds, &ours, &gloo, mpi.as_ref());
        for (who, rows) in [
            ("ferrun", Some(&ours)),
            ("Gloo", Some(&gloo)),
            ("OpenMPI", mpi.as_ref()),
        ] {
            for &(size, _, _, wrong) in rows.into_iter().flatten() {
                if wrong > 0 {
                    wrong_results.push(format!(
                        "{who}, {n} ranks, {size} B: {}",
                        wrong_count(wrong)
                    ));
                }
            }
        }
        let line = |rows: &Rows| {
            rows.iter()
                .filter(|r| r.0 > 4)
                .map(|&(s, _, bw, _)| (s as f64, bw))
                .collect::<Vec<_>>()
        };
        series.push((format!("ferrun, {n} ranks"), line(&ours)));
        series.push((format!("Gloo, {n} ranks"), line(&gloo)));
        if let Some(m) = &mpi {
            series.push((format!("OpenMPI, {n} ranks"), line(m)));
        }
    }
    if let Some(hosts) = &hosts {
        let rate = link_rate(hosts)?;
        println!("link between the hosts: {rate:.2} GB/s each way with both ways busy  ← bounds a 2-rank all_reduce's algbw across them\n");
    }
    if let Some(line) = memcpy_bandwidth(&o.anchors, out.path()) {
        println!("{line}  ← one core's memcpy, the physical limit of a copy within this host\n");
    }
    if let Some(path) = &o.plot {
        crate::plot::busbw_png(path, &format!("{name} busbw (float32)"), &series)?;
        println!("plot: {}", path.display());
    }
    if o.two_hosts {
        println!("OpenMPI: not run across hosts (its launcher would need ssh between them)");
    } else if mpi_binary.is_none() && o.op == Collective::AllReduce {
        println!("OpenMPI: not installed here (scripts/bench.sh installs openmpi-bin and libopenmpi-dev), so not compared");
    }
    ensure!(
        wrong_results.is_empty(),
        "wrong results: {}",
        wrong_results.join("; ")
    );
    Ok(())
}

fn wrong_count(wrong: u64) -> String {
    if wrong == u64::MAX {
        "not checked".into()
    } else {
        format!("{wrong} wrong elements")
    }
}

fn sizes_arg(o: &Options) -> String {
    o.sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// One run of ferrun's collective bench on `n` ranks.
fn run_ferrun(o: &Options, n: usize, place: Place<'_>, dir: &Path) -> anyhow::Result<Rows> {
    let json = dir.join(format!("ferrun_{n}.json"));
    let _ = std::fs::remove_file(&json);
    let bench = std::env::current_exe()?.display().to_string();
    Launch {
        launcher: &o.ferrun,
        n,
        args: vec![
            "--no-python".into(),
            bench,
            "collective".into(),
            op_name(o.op).into(),
            "--sizes".into(),
            sizes_arg(o),
            "--json".into(),
            json.display().to_string(),
        ],
        env: Vec::new(),
    }
    .run(place)
    .context("ferrun's run")?;
    read_ours(&json)
}

/// One run of Gloo's anchor under torchrun on `n` ranks.
fn run_gloo(o: &Options, n: usize, place: Place<'_>, dir: &Path) -> anyhow::Result<Rows> {
    let json = dir.join("gloo").join(format!("{n}.json"));
    let _ = std::fs::remove_file(&json);
    let path = format!(
        "{}:{}",
        o.venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Launch {
        launcher: &o.venv.join("bin/torchrun"),
        n,
        args: vec![
            o.anchors.join("gloo_allreduce.py").display().to_string(),
            "--colls".into(),
            op_name(o.op).into(),
            "--sizes".into(),
            sizes_arg(o),
            "--json".into(),
            json.display().to_string(),
        ],
        env: vec![("PATH".into(), path)],
    }
    .run(place)
    .context("Gloo's run")?;
    read_gloo(&json, op_name(o.op))
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

fn print_table(
    name: &str,
    n: usize,
    place: Place<'_>,
    rounds: usize,
    ours: &Rows,
    gloo: &Rows,
    mpi: Option<&Rows>,
) {
    let place = match place {
        Place::OneHost => "one host".to_owned(),
        Place::TwoHosts(_) => format!("two hosts, {} ranks each, TCP between them", n / 2),
    };
    println!("{name}, {n} ranks on {place}, float32 (same invocation, medians of {rounds} interleaved rounds; busbw in GB/s)");
    print!(
        "{:>10} {:>10} {:>10} {:>8} {:>8} {:>9} {:>7}",
        "size", "gloo µs", "ferrun µs", "time ×", "gloo bw", "ferrun bw", "bw ×"
    );
    if mpi.is_some() {
        print!(" {:>9} {:>8} {:>9}", "mpi µs", "mpi bw", "× mpi");
    }
    println!(" {:>8}", "#wrong");
    let shown = |w: u64| {
        if w == u64::MAX {
            "?".to_owned()
        } else {
            w.to_string()
        }
    };
    for (size, t, bw, wrong) in ours {
        let Some((_, gt, gbw, gwrong)) = gloo.iter().find(|r| r.0 == *size) else {
            continue;
        };
        print!(
            "{size:>10} {gt:>10.1} {t:>10.1} {:>8.3} {gbw:>8.3} {bw:>9.3} {:>7.2}",
            t / gt,
            bw / gbw
        );
        let mut wrongs = vec![shown(*wrong), shown(*gwrong)];
        if let Some((_, mt, mbw, mwrong)) = mpi.and_then(|m| m.iter().find(|r| r.0 == *size)) {
            print!(
                " {mt:>9.1} {mbw:>8.3} {:>9.2}",
                if *size == 4 { mt / t } else { bw / mbw }
            );
            wrongs.push(shown(*mwrong));
        }
        println!(" {:>8}", wrongs.join("/"));
    }
    println!("time × = ferrun / Gloo (lower is better); bw × = ferrun / Gloo; × mpi = ferrun / OpenMPI busbw (at 4 B: OpenMPI time / ferrun time; higher is better); #wrong = ferrun/Gloo[/OpenMPI] wrong elements\n");
}
