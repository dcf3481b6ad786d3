//! Collective benchmarks in nccl-tests' style, run by every rank under `ferrun`:
//!
//! ```text
//! ferrun --standalone --nproc-per-node 4 --no-python ferrun-bench collective all_reduce -b 4 -e 64M -f 2
//! ```
//!
//! Method (as `../shared/anchors/gloo_allreduce.py`, so the numbers compare): warm-up ops, then
//! samples of back-to-back ops after a barrier; a sample's time is the slowest rank's; the
//! reported time is the median sample. algbw = size / time; busbw = algbw × the nccl-tests
//! factor (all_reduce 2(n-1)/n; all_gather, reduce_scatter, all_to_all (n-1)/n; others 1).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferrun_collective::comm::{Communicator, Options as CommOptions};
use ferrun_collective::reduce::ReduceOp;
use ferrun_collective::transport::Auto;

/// The collectives the benchmark knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub(crate) enum Collective {
    /// all_reduce (sum).
    AllReduce,
    /// broadcast from rank 0.
    Broadcast,
    /// reduce (sum) to rank 0.
    Reduce,
    /// all_gather; size is the gathered output.
    AllGather,
    /// reduce_scatter (sum); size is the input.
    ReduceScatter,
    /// all_to_all; size is each rank's buffer.
    AllToAll,
}

/// Options of `ferrun-bench collective`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// The collective.
    #[arg(value_enum)]
    pub(crate) op: Collective,
    /// Smallest size in bytes (K, M, G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "4", value_parser = parse_size)]
    min: usize,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "64M", value_parser = parse_size)]
    max: usize,
    /// Multiplication factor between sizes.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    factor: usize,
    /// Explicit sizes, comma separated (replaces -b/-e/-f), e.g. 4,4K,1M,64M.
    #[arg(long, value_delimiter = ',', value_parser = parse_size)]
    sizes: Vec<usize>,
    /// Write the results as JSON lines to this file (rank 0).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write the results as CSV to this file (rank 0).
    #[arg(long)]
    csv: Option<std::path::PathBuf>,
    /// Whose collectives: ferrun's own transports, or NCCL (GPU buffers; needs --device cuda).
    #[arg(long, value_enum, default_value = "ferrun")]
    pub(crate) backend: Backend,
    /// Where the buffers live: host memory, or the rank's GPU (with --backend ferrun, GPU
    /// buffers are staged through pinned host memory).
    #[arg(long, value_enum, default_value = "cpu")]
    pub(crate) device: Device,
}

/// Whose collectives a benchmark runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Backend {
    /// ferrun's shared-memory and TCP transports.
    Ferrun,
    /// NCCL (through ferrun's GPU communicator).
    Nccl,
}

/// Where a benchmark's buffers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Device {
    /// Host memory.
    Cpu,
    /// The rank's GPU.
    Cuda,
}

/// `4`, `64K`, `16M`, `1G` → bytes.
pub(crate) fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => t.split_at(i),
        None => (t, ""),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size: use e.g. 4, 64K, 16M, 1G"))?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{text:?}: unknown unit {unit:?}; use K, M or G")),
    };
    Ok(n * scale)
}

/// (warm-up ops, samples, ops per sample) for a size, as the Gloo anchor plans them.
fn plan(size: usize) -> (usize, usize, usize) {
    match size {
        s if s <= 64 << 10 => (20, 25, 20),
        s if s <= 1 << 20 => (5, 15, 5),
        s if s <= 16 << 20 => (3, 11, 1),
        _ => (2, 7, 1),
    }
}

fn busbw_factor(op: Collective, n: usize) -> f64 {
    let n = n as f64;
    match op {
        Collective::AllReduce => 2.0 * (n - 1.0) / n,
        Collective::AllGather | Collective::ReduceScatter | Collective::AllToAll => (n - 1.0) / n,
        Collective::Broadcast | Collective::Reduce => 1.0,
    }
}

/// What a benchmark needs of its ranks besides the measured op: sync and small reductions.
pub(crate) trait Ranks {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Every rank here.
    fn barrier(&self) -> anyhow::Result<()>;
    /// `x` reduced over the ranks.
    fn reduce_f64(&self, x: f64, op: ReduceOp) -> anyhow::Result<f64>;
}

impl Ranks for Communicator<Auto> {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn size(&self) -> usize {
        Communicator::size(self)
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(Communicator::barrier(self)?)
    }
    fn reduce_f64(&self, x: f64, op: ReduceOp) -> anyhow::Result<f64> {
        let mut v = [x];
        self.all_reduce(&mut v, op)?;
        Ok(v[0])
    }
}

/// Buffers for one collective at one size, and how to run them.
pub(crate) trait Case<R: Ranks> {
    /// Elements of the larger buffer.
    fn count(&self) -> usize;
    /// One op.
    fn run(&mut self, ranks: &R) -> anyhow::Result<()>;
    /// Fills the input with `rank + 1` and the output with -1, runs once, and returns (input,
    /// output) as they came out.
    fn outcome(&mut self, ranks: &R) -> anyhow::Result<(Vec<f32>, Vec<f32>)>;
}

/// (input, output) element counts of `op` at `size` bytes of float32 over `n` ranks.
pub(crate) fn buffer_counts(op: Collective, size: usize, n: usize) -> (usize, usize) {
    let count = size / 4;
    let per = count / n;
    match op {
        Collective::AllReduce | Collective::Broadcast | Collective::Reduce => (count, 0),
        Collective::AllGather => (per, per * n),
        Collective::ReduceScatter => (per * n, per),
        Collective::AllToAll => (per * n, per * n),
    }
}

/// Host buffers for one collective at one size.
struct HostCase {
    op: Collective,
    input: Vec<f32>,
    output: Vec<f32>,
}

impl HostCase {
    fn new(op: Collective, size: usize, n: usize) -> Self {
        let (i, o) = buffer_counts(op, size, n);
        Self {
            op,
            input: vec![0.0; i],
            output: vec![0.0; o],
        }
    }
}

impl Case<Communicator<Auto>> for HostCase {
    fn count(&self) -> usize {
        self.input.len().max(self.output.len())
    }

    fn run(&mut self, c: &Communicator<Auto>) -> anyhow::Result<()> {
        match self.op {
            Collective::AllReduce => c.all_reduce(&mut self.input, ReduceOp::Sum)?,
            Collective::Broadcast => c.broadcast(&mut self.input, 0)?,
            Collective::Reduce => c.reduce(&mut self.input, ReduceOp::Sum, 0)?,
            Collective::AllGather => c.all_gather(&self.input, &mut self.output)?,
            Collective::ReduceScatter => {
                c.reduce_scatter(&self.input, &mut self.output, ReduceOp::Sum)?
            }
            Collective::AllToAll => c.all_to_all(&self.input, &mut self.output)?,
        }
        Ok(())
    }

    fn outcome(&mut self, c: &Communicator<Auto>) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let r = c.rank();
        self.input.iter_mut().for_each(|x| *x = (r + 1) as f32);
        self.output.iter_mut().for_each(|x| *x = -1.0);
        self.run(c)?;
        Ok((self.input.clone(), self.output.clone()))
    }
}

/// The number of elements of `op`'s outcome on rank `r` of `n` that are wrong.
pub(crate) fn wrong_elements(
    op: Collective,
    r: usize,
    n: usize,
    mut input: Vec<f32>,
    mut output: Vec<f32>,
) -> usize {
    let sum = (n * (n + 1) / 2) as f32;
    // The benchmark's own test: a result spoiled on purpose must be caught and fail the run.
    if std::env::var_os("FERRUN_BENCH_SPOIL").is_some() {
        for buf in [&mut input, &mut output] {
            if let Some(x) = buf.first_mut() {
                *x += 1.0;
            }
        }
    }
    let wrong = |buf: &[f32], expected: &dyn Fn(usize) -> f32| {
        buf.iter()
            .enumerate()
            .filter(|(i, x)| **x != expected(*i))
            .count()
    };
    let per = output.len().checked_div(n).unwrap_or(0);
    match op {
        Collective::AllReduce => wrong(&input, &|_| sum),
        Collective::Broadcast => wrong(&input, &|_| 1.0),
        Collective::Reduce if r == 0 => wrong(&input, &|_| sum),
        Collective::Reduce => 0,
        Collective::AllGather => wrong(&output, &|i| (i / per.max(1) + 1) as f32),
        Collective::ReduceScatter => wrong(&output, &|_| sum),
        Collective::AllToAll => wrong(&output, &|i| (i / per.max(1) + 1) as f32),
    }
}

fn check<R: Ranks, C: Case<R>>(op: Collective, ranks: &R, case: &mut C) -> anyhow::Result<usize> {
    let (input, output) = case.outcome(ranks)?;
    Ok(wrong_elements(
        op,
        ranks.rank(),
        ranks.size(),
        input,
        output,
    ))
}

/// One row of results.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    pub(crate) time: Duration,
    pub(crate) algbw: f64,
    pub(crate) busbw: f64,
    pub(crate) wrong: usize,
}

/// The sizes to measure: `--sizes`, or `-b` to `-e` by `-f`.
fn sizes(o: &Options) -> Vec<usize> {
    if !o.sizes.is_empty() {
        return o.sizes.clone();
    }
    std::iter::successors(Some(o.min), |s| s.checked_mul(o.factor))
        .take_while(|s| *s <= o.max)
        .collect()
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    if o.sizes.is_empty() && (o.factor < 2 || o.min == 0 || o.min > o.max) {
        bail!(
            "sizes: need 0 < -b <= -e and -f >= 2 (got -b {} -e {} -f {})",
            o.min,
            o.max,
            o.factor
        );
    }
    match (o.backend, o.device) {
        (Backend::Ferrun, Device::Cpu) => {
            let comm =
                Communicator::from_env("bench", CommOptions::default()).context(AS_WORKER)?;
            let transport = comm.transport().kind().to_owned();
            sweep(o, &comm, &transport, |size, n| {
                Ok(HostCase::new(o.op, size, n))
            })
        }
        (Backend::Nccl, Device::Cpu) => {
            bail!("--backend nccl moves GPU buffers: add --device cuda")
        }
        (backend, Device::Cuda) => crate::collective_gpu::run(o, backend),
    }
}

/// How a benchmark must be started, for its errors.
pub(crate) const AS_WORKER: &str = "ferrun-bench collective runs as a worker: launch it with `ferrun --no-python ferrun-bench collective ...`";

/// Measures every size of `o` with `make`'s cases over `ranks`, printing and writing the rows.
pub(crate) fn sweep<R: Ranks, C: Case<R>>(
    o: &Options,
    ranks: &R,
    transport: &str,
    make: impl Fn(usize, usize) -> anyhow::Result<C>,
) -> anyhow::Result<()> {
    let (rank, n) = (ranks.rank(), ranks.size());
    if rank == 0 {
        println!(
            "# ferrun collective benchmark: {:?}, {n} ranks, float32, sum, {transport}",
            o.op,
        );
        println!(
            "#{:>11} {:>12} {:>6} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}",
            "size", "count", "type", "redop", "root", "time(us)", "algbw", "busbw", "#wrong"
        );
    }
    let mut json = Vec::new();
    let mut csv = vec![
        "collective,ranks,transport,size_bytes,count,time_us,algbw_gbs,busbw_gbs,wrong".to_owned(),
    ];
    let mut wrong_sizes = Vec::new();
    for size in sizes(o) {
        let mut case = make(size, n)?;
        let row = measure(o.op, ranks, &mut case, size)?;
        if row.wrong > 0 {
            wrong_sizes.push(format!("{size} B: {} wrong elements", row.wrong));
        }
        if rank == 0 {
            println!(
                "{:>12} {:>12} {:>6} {:>6} {:>5} {:>10.1} {:>8.3} {:>8.3} {:>7}",
                size,
                case.count(),
                "float",
                "sum",
                0,
                row.time.as_secs_f64() * 1e6,
                row.algbw,
                row.busbw,
                row.wrong
            );
            csv.push(format!(
                "{:?},{n},{transport},{size},{},{},{},{},{}",
                o.op,
                case.count(),
                row.time.as_secs_f64() * 1e6,
                row.algbw,
                row.busbw,
                row.wrong
            ));
            json.push(format!(
                "{{\"coll\":\"{:?}\",\"ranks\":{n},\"size\":{size},\"time_us\":{},\"algbw\":{},\"busbw\":{},\"wrong\":{}}}",
                o.op,
                row.time.as_secs_f64() * 1e6,
                row.algbw,
                row.busbw,
                row.wrong
            ));
        }
    }
    if let (0, Some(path)) = (rank, &o.json) {
        std::fs::write(path, json.join("\n") + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let (0, Some(path)) = (rank, &o.csv) {
        std::fs::write(path, csv.join("\n") + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    anyhow::ensure!(
        wrong_sizes.is_empty(),
        "{:?} gave wrong results on rank {rank}'s view: {}",
        o.op,
        wrong_sizes.join("; ")
    );
    Ok(())
}

fn measure<R: Ranks, C: Case<R>>(
    op: Collective,
    ranks: &R,
    case: &mut C,
    size: usize,
) -> anyhow::Result<Row> {
    let (warm, samples, k) = plan(size);
    let mut wrong = ranks.reduce_f64(check(op, ranks, case)? as f64, ReduceOp::Sum)?;
    for _ in 0..warm {
        case.run(ranks)?;
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        ranks.barrier()?;
        let t0 = Instant::now();
        for _ in 0..k {
            case.run(ranks)?;
        }
        let slowest = t0.elapsed().as_secs_f64() / k as f64;
        times.push(ranks.reduce_f64(slowest, ReduceOp::Max)?);
    }
    // Checked after the timed loop too: a result that goes wrong under load must show.
    wrong += ranks.reduce_f64(check(op, ranks, case)? as f64, ReduceOp::Sum)?;
    times.sort_by(f64::total_cmp);
    let time = times[times.len() / 2];
    let algbw = size as f64 / time / 1e9;
    Ok(Row {
        time: Duration::from_secs_f64(time),
        algbw,
        busbw: algbw * busbw_factor(op, ranks.size()),
        wrong: wrong as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_nccl_tests() {
        assert_eq!(parse_size("4"), Ok(4));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert!(parse_size("x").is_err() && parse_size("3Q").is_err());
        assert_eq!(busbw_factor(Collective::AllReduce, 4), 1.5);
    }
}
