//! `ferrun-bench gpu-check`: every collective in every dtype against expected values, run by
//! every rank under `ferrun`. `--device cuda` checks ferrun's GPU communicator (NCCL at one rank
//! per GPU, staged when ranks share one); `--device cpu` runs the same checks on the CPU
//! communicator, which is how the expected values themselves are tested without a GPU.
//!
//! Values are small integers, exact in every dtype (bf16 included) for sums over up to 8
//! ranks. Any wrong element fails the run (exit 1) after the table is printed.

use anyhow::Context;
use ferrun_collective::comm::{Communicator, Options as CommOptions};
use ferrun_collective::reduce::{DType, Element, ReduceOp};
use ferrun_collective::transport::Auto;
use half::{bf16, f16};

use crate::collective::Device;

/// Options of `ferrun-bench gpu-check`.
#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Where the buffers live.
    #[arg(long, value_enum, default_value = "cuda")]
    device: Device,
    /// Elements per rank block (gathers and scatters move `ranks ×` this).
    #[arg(long, default_value_t = 1031)]
    count: usize,
    /// Write one JSON line per check to this file (rank 0).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// One check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Case {
    AllReduce(ReduceOp),
    Broadcast,
    Reduce,
    AllGather,
    ReduceScatter,
    AllToAll,
    SendRecv,
    Barrier,
}

const CASES: [Case; 11] = [
    Case::AllReduce(ReduceOp::Sum),
    Case::AllReduce(ReduceOp::Max),
    Case::AllReduce(ReduceOp::Min),
    Case::AllReduce(ReduceOp::Avg),
    Case::Broadcast,
    Case::Reduce,
    Case::AllGather,
    Case::ReduceScatter,
    Case::AllToAll,
    Case::SendRecv,
    Case::Barrier,
];

const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::Bf16,
    DType::I32,
    DType::I64,
    DType::U8,
];

/// What rank `r` puts at element `i`.
fn value(r: usize, i: usize) -> f64 {
    (r + 1 + i % 5) as f64
}

/// (input length, output length) per rank (`m` = block).
fn lengths(case: Case, n: usize, m: usize) -> (usize, usize) {
    match case {
        Case::AllGather => (m, n * m),
        Case::ReduceScatter => (n * m, m),
        Case::AllToAll => (n * m, n * m),
        Case::Barrier => (0, 0),
        _ => (m, 0),
    }
}

/// Whether the case means anything for `dtype` on `n` ranks (an integer average rounds, and a
/// rank cannot send to itself).
fn applies(case: Case, dtype: DType, n: usize) -> bool {
    match case {
        Case::AllReduce(ReduceOp::Avg) => {
            matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::Bf16)
        }
        Case::SendRecv => n > 1,
        _ => true,
    }
}

/// What rank `r` of `n` must hold after `case`: the buffer that is checked (the output of
/// gathers and scatters, else the input), or `None` where it is unspecified.
pub(crate) fn expected(case: Case, r: usize, n: usize, m: usize) -> Option<Vec<f64>> {
    let all = |i: usize| (0..n).map(move |q| value(q, i));
    let root = n - 1;
    Some(match case {
        Case::AllReduce(op) => (0..m)
            .map(|i| match op {
                ReduceOp::Sum => all(i).sum(),
                ReduceOp::Max => all(i).fold(f64::MIN, f64::max),
                ReduceOp::Min => all(i).fold(f64::MAX, f64::min),
                ReduceOp::Avg => all(i).sum::<f64>() / n as f64,
                ReduceOp::Prod => all(i).product(),
            })
            .collect(),
        Case::Broadcast => (0..m).map(|i| value(root, i)).collect(),
        Case::Reduce if r == root => (0..m).map(|i| all(i).sum()).collect(),
        Case::Reduce => return None,
        Case::AllGather => (0..n * m).map(|j| value(j / m, j % m)).collect(),
        // Block r of every rank's input: element r·m + i.
        Case::ReduceScatter => (0..m).map(|i| all(r * m + i).sum()).collect(),
        // Block r of rank q's input lands in block q.
        Case::AllToAll => (0..n * m).map(|j| value(j / m, r * m + j % m)).collect(),
        Case::SendRecv => (0..m).map(|i| value((r + n - 1) % n, i)).collect(),
        Case::Barrier => Vec::new(),
    })
}

/// Element types as exact small integers.
pub(crate) trait Num: Element {
    fn of(x: f64) -> Self;
    fn to(self) -> f64;
}

macro_rules! num {
    ($($t:ty),*) => {$(
        impl Num for $t {
            fn of(x: f64) -> Self { x as $t }
            fn to(self) -> f64 { self as f64 }
        }
    )*};
}
num!(f32, f64, i32, i64, u8);
impl Num for f16 {
    fn of(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to(self) -> f64 {
        self.to_f64()
    }
}
impl Num for bf16 {
    fn of(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to(self) -> f64 {
        self.to_f64()
    }
}

/// A communicator under test, in host terms: runs `case` on `input` (and an output of
/// `out_len`) as `E`s and returns the checked buffer.
pub(crate) trait UnderTest {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    fn path(&self) -> String;
    fn apply<E: Num>(&self, case: Case, input: Vec<E>, out_len: usize) -> anyhow::Result<Vec<E>>;
}

/// Runs `$body` with `$E` the element type of `$dtype` (the checked dtypes).
macro_rules! typed {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $E = f32;
                $body
            }
            DType::F64 => {
                type $E = f64;
                $body
            }
            DType::F16 => {
                type $E = f16;
                $body
            }
            DType::Bf16 => {
                type $E = bf16;
                $body
            }
            DType::I32 => {
                type $E = i32;
                $body
            }
            DType::I64 => {
                type $E = i64;
                $body
            }
            _ => {
                type $E = u8;
                $body
            }
        }
    };
}

fn one<E: Num, U: UnderTest>(u: &U, case: Case, m: usize) -> anyhow::Result<usize> {
    let (r, n) = (u.rank(), u.size());
    let (ilen, olen) = lengths(case, n, m);
    let input: Vec<E> = (0..ilen).map(|i| E::of(value(r, i))).collect();
    let mut got = u.apply(case, input, olen)?;
    // The check's own test: a result spoiled on purpose must fail the run.
    if std::env::var_os("FERRUN_BENCH_SPOIL").is_some() {
        if let Some(x) = got.first_mut() {
            *x = E::of(x.to() + 1.0);
        }
    }
    Ok(match expected(case, r, n, m) {
        None => 0,
        Some(want) if want.len() != got.len() => want.len().max(got.len()),
        Some(want) => want.iter().zip(&got).filter(|(w, g)| **w != g.to()).count(),
    })
}

impl UnderTest for Communicator<Auto> {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn size(&self) -> usize {
        Communicator::size(self)
    }
    fn path(&self) -> String {
        format!("CPU communicator ({})", self.transport().kind())
    }
    fn apply<E: Num>(
        &self,
        case: Case,
        mut input: Vec<E>,
        out_len: usize,
    ) -> anyhow::Result<Vec<E>> {
        let (r, n) = (Communicator::rank(self), Communicator::size(self));
        let mut output = vec![E::ZERO; out_len];
        match case {
            Case::AllReduce(op) => self.all_reduce(&mut input, op)?,
            Case::Broadcast => self.broadcast(&mut input, n - 1)?,
            Case::Reduce => self.reduce(&mut input, ReduceOp::Sum, n - 1)?,
            Case::AllGather => self.all_gather(&input, &mut output)?,
            Case::ReduceScatter => self.reduce_scatter(&input, &mut output, ReduceOp::Sum)?,
            Case::AllToAll => self.all_to_all(&input, &mut output)?,
            Case::SendRecv => {
                let sent = input.clone();
                self.send(&sent, (r + 1) % n, 7)?;
                self.recv(&mut input, (r + n - 1) % n, 7)?;
            }
            Case::Barrier => self.barrier()?,
        }
        Ok(if out_len > 0 { output } else { input })
    }
}

/// Runs every check; prints the table on rank 0; fails if anything was wrong anywhere.
pub(crate) fn check_all<U: UnderTest>(
    u: &U,
    m: usize,
    json: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (rank, n) = (u.rank(), u.size());
    if rank == 0 {
        println!(
            "# ferrun gpu-check: {n} ranks, {m} elements per block, {}",
            u.path()
        );
        println!(
            "#{:<21} {:<6} result (wrong elements over all ranks)",
            "collective", "dtype"
        );
    }
    let (mut rows, mut failed, mut ran) = (Vec::new(), 0usize, 0usize);
    for case in CASES {
        for dtype in DTYPES {
            if !applies(case, dtype, n) {
                continue;
            }
            let wrong = typed!(dtype, E => one::<E, U>(u, case, m))
                .with_context(|| format!("{case:?} on {dtype:?}"))?;
            // Summed over ranks through the communicator under test (as u8 could overflow:
            // one flag per rank, as i64).
            let total = u.apply::<i64>(Case::AllReduce(ReduceOp::Sum), vec![wrong as i64], 0)?[0];
            ran += 1;
            if total != 0 {
                failed += 1;
            }
            if rank == 0 {
                let result = if total == 0 {
                    "ok".to_owned()
                } else {
                    format!("WRONG ({total})")
                };
                println!(
                    " {:<21} {:<6} {result}",
                    format!("{case:?}"),
                    format!("{dtype:?}")
                );
                rows.push(format!(
                    "{{\"case\":\"{case:?}\",\"dtype\":\"{dtype:?}\",\"ranks\":{n},\"wrong\":{total}}}"
                ));
            }
        }
    }
    if rank == 0 {
        println!("{} passed, {failed} failed", ran - failed);
        if let Some(path) = json {
            std::fs::write(path, rows.join("\n") + "\n")
                .with_context(|| format!("write {}", path.display()))?;
        }
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {ran} checks gave wrong results on {}",
        u.path()
    );
    Ok(())
}

pub(crate) fn run(o: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(o.count > 0, "--count must be positive");
    match o.device {
        Device::Cpu => {
            let comm = Communicator::from_env("gpu-check", CommOptions::default())
                .context(crate::collective::AS_WORKER)?;
            check_all(&comm, o.count, o.json.as_deref())
        }
        Device::Cuda => crate::gpu_check_cuda::run(o.count, o.json.as_deref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_of_a_two_rank_job() {
        // Rank q's element i is q + 1 + i % 5.
        assert_eq!(
            expected(Case::AllReduce(ReduceOp::Sum), 0, 2, 2),
            Some(vec![3.0, 5.0])
        );
        assert_eq!(
            expected(Case::AllReduce(ReduceOp::Max), 1, 2, 2),
            Some(vec![2.0, 3.0])
        );
        assert_eq!(expected(Case::Broadcast, 0, 2, 2), Some(vec![2.0, 3.0]));
        assert_eq!(expected(Case::Reduce, 0, 2, 2), None);
        assert_eq!(
            expected(Case::AllGather, 0, 2, 2),
            Some(vec![1.0, 2.0, 2.0, 3.0])
        );
        assert_eq!(expected(Case::ReduceScatter, 1, 2, 2), Some(vec![7.0, 9.0]));
        assert_eq!(expected(Case::AllToAll, 1, 2, 1), Some(vec![2.0, 3.0]));
        assert_eq!(expected(Case::SendRecv, 0, 2, 1), Some(vec![2.0]));
    }

    #[test]
    fn sums_stay_exact_in_every_dtype() {
        // The largest value checked: a sum over 8 ranks of at most 8 + 4.
        let top: f64 = (0..8).map(|q| value(q, 4)).sum();
        assert!(top <= 255.0 && bf16::from_f64(top).to_f64() == top, "{top}");
    }
}
