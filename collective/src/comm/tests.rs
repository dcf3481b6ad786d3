//! Every collective on an in-process N-rank harness (ranks as threads over [`MemTransport`],
//! gloo's `spawn` pattern), against a reference computed plainly: every dtype × reduce op ×
//! world size 1..8 × awkward counts, both all-reduce algorithms.

use std::sync::Arc;
use std::time::Duration;

use half::{bf16, f16};

use super::{AsyncCommunicator, CommError, Communicator, Options};
use crate::reduce::{finish, Element, ReduceOp};
use crate::transport::{mem::MemTransport, TransportError};

const OPS: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];

/// Runs `f` on `n` ranks, one thread each; results in rank order.
pub(super) fn spawn<R: Send + 'static>(
    n: usize,
    options: Options,
    f: impl Fn(Communicator<MemTransport>) -> R + Send + Sync + 'static,
) -> Vec<R> {
    spawn_on(MemTransport::network(n), options, f)
}

/// Runs `f` on the ranks of `network`, one thread each; results in rank order.
fn spawn_on<R: Send + 'static>(
    network: Vec<MemTransport>,
    options: Options,
    f: impl Fn(Communicator<MemTransport>) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let f = Arc::new(f);
    let threads: Vec<_> = network
        .into_iter()
        .map(|t| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(Communicator::new(t, options)))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("rank thread panicked"))
        .collect()
}

pub(super) fn options(small_bytes: usize) -> Options {
    Options {
        deadline: Duration::from_secs(10),
        small_bytes,
    }
}

/// Small integers, exact in every dtype, so any reduction order gives the reference's bits.
trait Small: Element {
    fn small(v: u8) -> Self;
}
macro_rules! small {
    ($($t:ty => $conv:expr),*) => {$(impl Small for $t { fn small(v: u8) -> Self { ($conv)(v) } })*};
}
small!(f32 => f32::from, f64 => f64::from, i32 => i32::from, i64 => i64::from, u8 => |v| v,
       i8 => |v| v as i8, i16 => i16::from,
       f16 => |v| f16::from_f32(f32::from(v)), bf16 => |v| bf16::from_f32(f32::from(v)));

/// Rank `r`'s element `i` for a reduction: values up to 11, or 1 and 2 for products (2⁸ stays exact).
fn value<E: Small>(op: ReduceOp, r: usize, i: usize) -> E {
    let v = if op == ReduceOp::Prod {
        1 + (r + i) % 2
    } else {
        (r * 7 + i * 3) % 11 + 1
    };
    E::small(v as u8)
}

fn reference<E: Small>(op: ReduceOp, n: usize, count: usize) -> Vec<E> {
    let mut acc: Vec<E> = (0..count).map(|i| value(op, 0, i)).collect();
    for r in 1..n {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = E::combine(op, *a, value(op, r, i));
        }
    }
    finish(op, &mut acc, n);
    acc
}

fn counts(n: usize) -> Vec<usize> {
    let mut c = vec![0, 1, 2, 13, 300, n.saturating_sub(1), n + 1, 3 * n + 2];
    c.sort_unstable();
    c.dedup();
    c
}

fn check_all_reduce<E: Small>() {
    for n in 1..=8 {
        for small_bytes in [0, usize::MAX] {
            let results = spawn(n, options(small_bytes), |c| {
                let mut out = Vec::new();
                for op in OPS {
                    for count in counts(c.size()) {
                        let mut buf: Vec<E> = (0..count).map(|i| value(op, c.rank(), i)).collect();
                        c.all_reduce(&mut buf, op).expect("all_reduce");
                        out.push((op, count, buf));
                    }
                }
                out
            });
            for rank in results {
                for (op, count, buf) in rank {
                    assert_eq!(
                        buf,
                        reference::<E>(op, n, count),
                        "{:?} n={n} {op:?} count={count} small={small_bytes}",
                        E::DTYPE
                    );
                }
            }
        }
    }
}

fn check_all_reduce_by_hosts<E: Small>() {
    let layouts: [&[usize]; 6] = [
        &[0, 0, 1, 1],
        &[0, 1, 0, 1],
        &[5, 5, 5, 2, 2, 2],
        &[0, 0, 1, 1, 2, 2],
        &[0, 1, 2, 3, 0, 1, 2, 3],
        &[0, 0, 1],
    ];
    for hosts in layouts {
        let n = hosts.len();
        let results = spawn_on(MemTransport::network_on_hosts(hosts), options(0), |c| {
            let by_hosts = c.hosts.is_some();
            let mut out = Vec::new();
            for op in OPS {
                for count in counts(c.size()).into_iter().chain([5000]) {
                    let mut buf: Vec<E> = (0..count).map(|i| value(op, c.rank(), i)).collect();
                    c.all_reduce(&mut buf, op).expect("all_reduce");
                    out.push((op, count, buf));
                }
            }
            (by_hosts, out)
        });
        for (by_hosts, rank) in results {
            assert_eq!(by_hosts, n != 3, "{hosts:?}: by hosts when even");
            for (op, count, buf) in rank {
                assert_eq!(
                    buf,
                    reference::<E>(op, n, count),
                    "{:?} hosts {hosts:?} {op:?} count={count}",
                    E::DTYPE
                );
            }
        }
    }
}

#[test]
fn all_reduce_by_hosts_every_layout() {
    check_all_reduce_by_hosts::<f32>();
    check_all_reduce_by_hosts::<i64>();
    check_all_reduce_by_hosts::<bf16>();
}

#[test]
fn all_reduce_every_dtype_op_world_and_count() {
    check_all_reduce::<f32>();
    check_all_reduce::<f64>();
    check_all_reduce::<f16>();
    check_all_reduce::<bf16>();
    check_all_reduce::<i32>();
    check_all_reduce::<i64>();
    check_all_reduce::<u8>();
    check_all_reduce::<i8>();
    check_all_reduce::<i16>();
}

#[test]
fn all_reduce_results_are_bitwise_identical_on_every_rank() {
    for n in [3, 5, 7, 8] {
        for small_bytes in [0, usize::MAX] {
            let results = spawn(n, options(small_bytes), |c| {
                // Values whose sums round: only one reduction order everywhere gives equal bits.
                let mut buf: Vec<f32> = (0..1001)
                    .map(|i| ((c.rank() * 1000 + i) as f32).sin() * 1e-3)
                    .collect();
                c.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                buf.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            });
            assert!(
                results.iter().all(|r| *r == results[0]),
                "n={n} small={small_bytes}: ranks differ"
            );
        }
    }
}

#[test]
fn broadcast_and_reduce_from_every_root() {
    for n in 1..=7 {
        for root in 0..n {
            let results = spawn(n, options(0), move |c| {
                let mut b: Vec<i64> = (0..11).map(|i| (c.rank() * 100 + i) as i64).collect();
                c.broadcast(&mut b, root).expect("broadcast");
                let mut r: Vec<f64> = (0..5).map(|i| value(ReduceOp::Sum, c.rank(), i)).collect();
                let before = r.clone();
                c.reduce(&mut r, ReduceOp::Max, root).expect("reduce");
                (b, r, before)
            });
            let expected_b: Vec<i64> = (0..11).map(|i| (root * 100 + i) as i64).collect();
            let reduced: Vec<f64> = reference(ReduceOp::Max, n, 5);
            for (rank, (b, r, before)) in results.into_iter().enumerate() {
                assert_eq!(b, expected_b, "n={n} root={root}");
                assert_eq!(
                    r,
                    if rank == root {
                        reduced.clone()
                    } else {
                        before
                    },
                    "n={n} root={root} rank={rank}"
                );
            }
        }
    }
}

#[test]
fn all_gather_reduce_scatter_and_all_to_all() {
    for n in 1..=8 {
        for m in [0, 1, 3, 17] {
            let results = spawn(n, options(0), move |c| {
                let (r, n) = (c.rank(), c.size());
                let input: Vec<u8> = (0..m).map(|i| (r * 10 + i) as u8).collect();
                let mut gathered = vec![0u8; n * m];
                c.all_gather(&input, &mut gathered).expect("all_gather");
                let scatter_in: Vec<i32> = (0..n * m).map(|i| value(ReduceOp::Sum, r, i)).collect();
                let mut scattered = vec![0i32; m];
                c.reduce_scatter(&scatter_in, &mut scattered, ReduceOp::Sum)
                    .expect("reduce_scatter");
                let a2a_in: Vec<f32> = (0..n * m).map(|i| (r * 1000 + i) as f32).collect();
                let mut a2a_out = vec![0f32; n * m];
                c.all_to_all(&a2a_in, &mut a2a_out).expect("all_to_all");
                c.barrier().expect("barrier");
                (gathered, scattered, a2a_out)
            });
            let full: Vec<i32> = reference(ReduceOp::Sum, n, n * m);
            for (r, (gathered, scattered, a2a)) in results.into_iter().enumerate() {
                let expected: Vec<u8> = (0..n)
                    .flat_map(|s| (0..m).map(move |i| (s * 10 + i) as u8))
                    .collect();
                assert_eq!(gathered, expected, "all_gather n={n} m={m}");
                assert_eq!(
                    scattered,
                    full[r * m..(r + 1) * m],
                    "reduce_scatter n={n} m={m} rank={r}"
                );
                let expected: Vec<f32> = (0..n)
                    .flat_map(|s| (0..m).map(move |i| (s * 1000 + r * m + i) as f32))
                    .collect();
                assert_eq!(a2a, expected, "all_to_all n={n} m={m} rank={r}");
            }
        }
    }
}

#[test]
fn send_and_recv_match_by_tag() {
    let results = spawn(2, options(0), |c| {
        if c.rank() == 0 {
            c.send(&[1.5f32, 2.5], 1, 7).expect("send 7");
            c.send(&[9i64], 1, 3).expect("send 3");
            (Vec::new(), Vec::new())
        } else {
            let mut three = [0i64];
            let mut seven = [0f32; 2];
            c.recv(&mut three, 0, 3).expect("recv 3");
            c.recv(&mut seven, 0, 7).expect("recv 7");
            (three.to_vec(), seven.to_vec())
        }
    });
    assert_eq!(results[1], (vec![9], vec![1.5, 2.5]));
}

#[test]
fn bad_arguments_are_named_before_anything_is_sent() {
    let results = spawn(2, options(0), |c| {
        let mut buf = [0f32; 4];
        [
            c.broadcast(&mut buf, 2).expect_err("root"),
            c.all_gather(&[1f32], &mut buf).expect_err("gather length"),
            c.reduce_scatter(&buf, &mut [0f32; 3], ReduceOp::Sum)
                .expect_err("scatter length"),
            c.all_to_all(&buf, &mut [0f32; 3]).expect_err("a2a length"),
            c.send(&buf, c.rank(), 0).expect_err("self"),
        ]
        .map(|e| e.to_string())
    });
    let texts = &results[0];
    assert!(texts[0].contains("root 2 is not a rank"), "{texts:?}");
    assert!(texts[1].contains("size × input = 2 × 1"), "{texts:?}");
    assert!(texts[2].contains("size × output = 2 × 3"), "{texts:?}");
    assert!(texts[3].contains("same multiple of 2"), "{texts:?}");
    assert!(texts[4].contains("another rank"), "{texts:?}");
}

#[test]
fn a_rank_that_never_comes_is_named_within_the_deadline() {
    let deadline = Duration::from_millis(200);
    let results = spawn(
        3,
        Options {
            deadline,
            small_bytes: 0,
        },
        |c| {
            if c.rank() == 2 {
                return None;
            }
            let mut buf = [1f32; 8];
            let started = std::time::Instant::now();
            let err = c
                .all_reduce(&mut buf, ReduceOp::Sum)
                .expect_err("rank 2 never joins");
            Some((err, started.elapsed()))
        },
    );
    for (err, took) in results.into_iter().flatten() {
        assert!(took < Duration::from_secs(5), "{took:?}");
        match &err {
            CommError::Transport {
                source: super::Failure::Link(TransportError::Timeout { .. }),
                ..
            } => {}
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(err.to_string().contains("must be rebuilt"), "{err}");
    }
}

/// Runs a different call on each of two ranks; their errors, as text.
fn mismatch(
    f: impl Fn(&Communicator<MemTransport>) -> Result<(), CommError> + Send + Sync + 'static,
) -> Vec<String> {
    spawn(
        2,
        Options {
            deadline: Duration::from_secs(30),
            small_bytes: 0,
        },
        move |c| {
            let started = std::time::Instant::now();
            let err = f(&c).expect_err("the ranks called different collectives");
            // Told at once, not at the deadline (generous for a loaded machine).
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "found only after {:?}: {err}",
                started.elapsed()
            );
            err.to_string()
        },
    )
}

#[test]
fn ranks_that_call_different_collectives_are_told_what_each_called() {
    let errs = mismatch(|c| {
        let mut buf = [1f32; 64];
        if c.rank() == 0 {
            c.all_reduce(&mut buf, ReduceOp::Sum)
        } else {
            c.broadcast(&mut buf, 0)
        }
    });
    // Rank 1 (a broadcast receiver) sees rank 0's all_reduce message and names both calls;
    // rank 0, which waits on a message rank 1 will never send, hears that rank 1 gave up.
    assert!(
        errs[1].contains("rank 0 called all_reduce(F32 × 64, Sum)")
            && errs[1].contains("broadcast(F32 × 64, root 0)"),
        "{errs:?}"
    );
    assert!(
        errs[0].contains("rank 1 gave up on its broadcast(F32 × 64, root 0)"),
        "{errs:?}"
    );
}

#[test]
fn different_counts_dtypes_and_ops_are_caught() {
    let errs = mismatch(|c| {
        let n = if c.rank() == 0 { 10 } else { 12 };
        c.all_reduce(&mut vec![0i32; n], ReduceOp::Sum)
    });
    assert!(
        errs[0].contains("I32 × 12") && errs[0].contains("I32 × 10"),
        "{errs:?}"
    );
    let errs = mismatch(|c| {
        if c.rank() == 0 {
            c.all_reduce(&mut [0f32; 8], ReduceOp::Max)
        } else {
            c.all_reduce(&mut [0f64; 4], ReduceOp::Max)
        }
    });
    assert!(errs[0].contains("F64 × 4"), "{errs:?}");
    let errs = mismatch(|c| {
        let op = if c.rank() == 0 {
            ReduceOp::Sum
        } else {
            ReduceOp::Max
        };
        c.all_reduce(&mut [0f32; 8], op)
    });
    assert!(
        errs[0].contains("Max") && errs[0].contains("Sum"),
        "{errs:?}"
    );
}

#[test]
fn a_rank_that_skipped_a_collective_is_caught_at_once() {
    let errs = mismatch(|c| {
        if c.rank() == 1 {
            c.barrier()?;
        }
        c.all_reduce(&mut [1f32; 16], ReduceOp::Sum)?;
        c.all_reduce(&mut [1f32; 16], ReduceOp::Sum)
    });
    assert!(
        errs.iter()
            .any(|e| e.contains("every rank must call the same collectives")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.contains("barrier()")), "{errs:?}");
}

#[test]
fn split_makes_independent_groups_that_share_the_links() {
    let results = spawn(6, options(0), |c| {
        let r = c.rank();
        // Two groups by parity, ordered by descending rank.
        let group = c
            .split(Some((r % 2) as u32), -(r as i64))
            .expect("split")
            .expect("member");
        let mut mine = [r as f32];
        group
            .all_reduce(&mut mine, ReduceOp::Sum)
            .expect("group all_reduce");
        // The parent keeps working between and around the group's collectives.
        let mut everyone = [1i32];
        c.all_reduce(&mut everyone, ReduceOp::Sum)
            .expect("parent all_reduce");
        let mut gathered = vec![0u8; group.size()];
        group
            .all_gather(&[r as u8], &mut gathered)
            .expect("group all_gather");
        // A nested split, and a rank that joins no group.
        let pairs = group
            .split((group.rank() < 2).then_some(0), 0)
            .expect("nested split");
        let pair_sum = pairs.map(|p| {
            let mut x = [r as i64];
            p.all_reduce(&mut x, ReduceOp::Sum)
                .expect("pair all_reduce");
            (p.size(), x[0])
        });
        (
            group.rank(),
            group.size(),
            mine[0],
            everyone[0],
            gathered,
            pair_sum,
        )
    });
    for (r, (grank, gsize, sum, everyone, gathered, pair)) in results.into_iter().enumerate() {
        let odd = r % 2 == 1;
        let members: Vec<usize> = if odd { vec![5, 3, 1] } else { vec![4, 2, 0] };
        assert_eq!(gsize, 3);
        assert_eq!(
            grank,
            members.iter().position(|&m| m == r).expect("member"),
            "rank {r}"
        );
        assert_eq!(sum, members.iter().sum::<usize>() as f32, "rank {r}");
        assert_eq!(everyone, 6);
        assert_eq!(
            gathered,
            members.iter().map(|&m| m as u8).collect::<Vec<_>>(),
            "rank {r}"
        );
        let expected_pair = (grank < 2).then(|| (2, (members[0] + members[1]) as i64));
        assert_eq!(pair, expected_pair, "rank {r}");
    }
}

#[test]
fn queued_collectives_overlap_work_and_complete_in_order() {
    let results = spawn(3, options(0), |c| {
        let r = c.rank() as f32;
        let comm = AsyncCommunicator::new(c).expect("thread");
        let big = comm.all_reduce(vec![r; 1 << 16], ReduceOp::Sum);
        let gathered = comm.all_gather(vec![r]);
        let scattered = comm.reduce_scatter(vec![1i32; 6], ReduceOp::Sum);
        let done = comm.barrier();
        // Work meanwhile: the collectives run on the communicator's thread.
        let work: f64 = (0..100_000).map(|i| f64::from(i).sqrt()).sum();
        (
            big.wait().expect("all_reduce")[0],
            gathered.wait().expect("all_gather"),
            scattered.wait().expect("reduce_scatter"),
            done.wait().is_ok(),
            work > 0.0,
        )
    });
    for (big, gathered, scattered, barrier, worked) in results {
        assert_eq!(big, 3.0);
        assert_eq!(gathered, [0.0, 1.0, 2.0]);
        assert_eq!(scattered, [3, 3]);
        assert!(barrier && worked);
    }
}
