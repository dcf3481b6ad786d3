//! The communicator over its real transports — TCP sockets on loopback and shared-memory
//! rings — bootstrapped through the store: ranks as threads, each with its own sockets or maps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrun_collective::comm::{CommError, Communicator, Failure, Options};
use ferrun_collective::reduce::ReduceOp;
use ferrun_collective::store::{StoreClient, StoreServer};
use ferrun_collective::transport::mixed::Mixed;
use ferrun_collective::transport::shm::ShmTransport;
use ferrun_collective::transport::tcp::TcpTransport;
use ferrun_collective::transport::{Auto, TransportError};

#[derive(Debug, Clone, Copy)]
enum Kind {
    Tcp,
    Shm,
    /// Ranks paired into pretend hosts (0-1, 2-3, …): shm within a pair, TCP across.
    Mixed,
}

const KINDS: [Kind; 3] = [Kind::Tcp, Kind::Shm, Kind::Mixed];

fn spawn<R: Send + 'static>(
    kind: Kind,
    n: usize,
    options: Options,
    f: impl Fn(Communicator<Auto>) -> R + Send + Sync + 'static,
) -> Vec<R> {
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("store");
    let port = server.local_addr().port();
    let f = Arc::new(f);
    let threads: Vec<_> = (0..n)
        .map(|rank| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let transport = rt.block_on(async {
                    let timeout = Duration::from_secs(10);
                    let mut store = StoreClient::connect("127.0.0.1", port, timeout)
                        .await
                        .expect("store")
                        .prefixed("comm");
                    match kind {
                        Kind::Tcp => Auto::Tcp(
                            TcpTransport::connect(&mut store, rank, n, timeout)
                                .await
                                .expect("mesh"),
                        ),
                        Kind::Shm => Auto::Shm(
                            ShmTransport::connect(&mut store, rank, n, timeout)
                                .await
                                .expect("segments"),
                        ),
                        Kind::Mixed => {
                            let tcp = TcpTransport::connect(&mut store, rank, n, timeout)
                                .await
                                .expect("mesh");
                            // Hosts of two ranks each: 0 and 1 share one, 2 and 3 the next…
                            let hosts: Vec<usize> = (0..n).map(|r| r / 2).collect();
                            let group: Vec<usize> =
                                (0..n).filter(|&r| hosts[r] == hosts[rank]).collect();
                            let shm = ShmTransport::connect_group(&mut store, group, rank, timeout)
                                .await
                                .expect("segments");
                            Auto::Mixed(Mixed::new(shm, tcp, &hosts))
                        }
                    }
                });
                f(Communicator::new(transport, options))
            })
        })
        .collect();
    let results = threads
        .into_iter()
        .map(|t| t.join().expect("rank"))
        .collect();
    drop(server);
    results
}

#[test]
fn all_reduce_small_and_large_any_world_on_both_transports() {
    // With shared memory and TCP mixed, 4 ranks are two hosts of two: all-reduce by hosts.
    for (kind, n) in KINDS
        .into_iter()
        .flat_map(|k| [1, 2, 3, 4, 5].map(|n| (k, n)))
    {
        for small_bytes in [0, usize::MAX] {
            let results = spawn(
                kind,
                n,
                Options {
                    deadline: Duration::from_secs(20),
                    small_bytes,
                },
                |c| {
                    let mut out = Vec::new();
                    // Up to 4 MiB per rank: far past socket buffers, so sends and receives interleave.
                    for count in [0usize, 1, 7, 1001, 1 << 20] {
                        let mut buf: Vec<f32> = (0..count)
                            .map(|i| ((c.rank() * 31 + i) % 17) as f32)
                            .collect();
                        c.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
                        out.push(buf);
                    }
                    out
                },
            );
            for rank in &results {
                for (buf, count) in rank.iter().zip([0usize, 1, 7, 1001, 1 << 20]) {
                    let expected: Vec<f32> = (0..count)
                        .map(|i| (0..n).map(|r| ((r * 31 + i) % 17) as f32).sum())
                        .collect();
                    assert!(
                        *buf == expected,
                        "{kind:?} n={n} count={count} small={small_bytes}"
                    );
                }
            }
        }
    }
}

#[test]
fn every_collective_on_both_transports() {
    for kind in KINDS {
        every_collective(kind);
    }
}

fn every_collective(kind: Kind) {
    let n = 4;
    let results = spawn(kind, n, Options::default(), |c| {
        let r = c.rank();
        let mut b = vec![r as i64; 5];
        c.broadcast(&mut b, 2).expect("broadcast");
        let mut gathered = vec![0u8; 4 * 3];
        c.all_gather(&[r as u8; 3], &mut gathered)
            .expect("all_gather");
        let mut scattered = vec![0i32; 2];
        c.reduce_scatter(&[1i32; 8], &mut scattered, ReduceOp::Sum)
            .expect("reduce_scatter");
        let input: Vec<f64> = (0..8).map(|i| (r * 10 + i) as f64).collect();
        let mut a2a = vec![0f64; 8];
        c.all_to_all(&input, &mut a2a).expect("all_to_all");
        c.barrier().expect("barrier");
        if r == 0 {
            c.send(&[42u8], 3, 9).expect("send");
        }
        let mut got = [0u8];
        if r == 3 {
            c.recv(&mut got, 0, 9).expect("recv");
        }
        let half = c
            .split(Some((r / 2) as u32), r as i64)
            .expect("split")
            .expect("member");
        let mut pair = [r as i32];
        half.all_reduce(&mut pair, ReduceOp::Sum)
            .expect("sub-communicator all_reduce");
        (b, gathered, scattered, a2a, got[0], pair[0])
    });
    for (r, (b, gathered, scattered, a2a, got, pair)) in results.into_iter().enumerate() {
        assert_eq!(
            pair,
            if r < 2 { 1 } else { 5 },
            "{kind:?} rank {r}: the pair's sum"
        );
        assert_eq!(b, vec![2; 5]);
        assert_eq!(gathered, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
        assert_eq!(scattered, [4, 4]);
        let expected: Vec<f64> = (0..n)
            .flat_map(|s| (0..2).map(move |i| (s * 10 + r * 2 + i) as f64))
            .collect();
        assert_eq!(a2a, expected);
        assert_eq!(got, if r == 3 { 42 } else { 0 });
    }
}

#[test]
fn a_peer_that_dies_is_named_and_nobody_hangs() {
    let results = spawn(
        Kind::Tcp,
        3,
        Options {
            deadline: Duration::from_secs(60),
            small_bytes: 0,
        },
        |c| {
            let mut buf = vec![1f32; 1 << 16];
            c.all_reduce(&mut buf, ReduceOp::Sum)
                .expect("first all_reduce");
            if c.rank() == 1 {
                return None; // rank 1 leaves: its sockets close
            }
            let started = Instant::now();
            let err = c
                .all_reduce(&mut buf, ReduceOp::Sum)
                .expect_err("rank 1 is gone");
            Some((err, started.elapsed()))
        },
    );
    let survivors: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(survivors.len(), 2);
    // Each survivor names rank 1: through its own broken link, or because the other survivor
    // told it that rank 1 is gone.
    for (err, took) in &survivors {
        // Named at once, not at the deadline (generous for a loaded machine).
        assert!(*took < Duration::from_secs(20), "took {took:?}: {err}");
        assert!(
            matches!(
                err,
                CommError::Transport {
                    source: Failure::Link(TransportError::Broken { peer: 1, .. })
                        | Failure::PeerLost { lost: 1, .. },
                    ..
                }
            ),
            "{err}"
        );
    }
}

#[test]
fn shared_memory_names_no_file_while_or_after_it_runs() {
    let ferrun_files = || -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .expect("/dev/shm")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ferrun"))
            .collect()
    };
    let results = spawn(Kind::Shm, 3, Options::default(), move |c| {
        let mut buf = vec![c.rank() as f32; 4096];
        c.all_reduce(&mut buf, ReduceOp::Sum).expect("all_reduce");
        (buf[0], ferrun_files())
    });
    for (sum, files) in results {
        assert_eq!(sum, 3.0);
        assert!(files.is_empty(), "segments named in /dev/shm: {files:?}");
    }
    assert!(ferrun_files().is_empty());
}

#[test]
fn mismatched_collectives_are_named_on_both_transports() {
    for kind in KINDS {
        let results = spawn(
            kind,
            2,
            Options {
                deadline: Duration::from_secs(60),
                small_bytes: 0,
            },
            |c| {
                let started = Instant::now();
                let count = if c.rank() == 0 { 1000 } else { 1001 };
                let err = c
                    .all_reduce(&mut vec![0f32; count], ReduceOp::Sum)
                    .expect_err("counts differ");
                (err.to_string(), started.elapsed())
            },
        );
        for (err, took) in results {
            // Told at once, not at the deadline (generous for a loaded machine).
            assert!(took < Duration::from_secs(20), "{kind:?}: {took:?}");
            assert!(
                err.contains("F32 × 1000") && err.contains("F32 × 1001"),
                "{kind:?}: {err}"
            );
        }
    }
}

#[test]
fn stray_connections_to_a_rank_are_dropped_and_the_mesh_forms() {
    use std::io::Write;
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("store");
    let port = server.local_addr().port();
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    };
    // A foreign process: it finds rank 0's port in the store and connects first — one
    // connection greets with garbage, one without the secret, one says nothing at all.
    let stray = std::thread::spawn(move || {
        let published = rt().block_on(async {
            let mut store = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10))
                .await
                .expect("store")
                .prefixed("comm");
            store.get("addr/0").await.expect("rank 0's address")
        });
        let text = String::from_utf8(published).expect("utf-8");
        let addr = text.split(' ').next().expect("address").to_owned();
        let mut garbage = std::net::TcpStream::connect(&addr).expect("connect");
        garbage
            .write_all(b"GET / HTTP/1.1\r\n\r\n........")
            .expect("write");
        let mut no_secret = std::net::TcpStream::connect(&addr).expect("connect");
        let mut hello = b"ferrun\x00\x01".to_vec();
        hello.extend_from_slice(&[0u8; 16]);
        hello.extend_from_slice(&1u64.to_le_bytes());
        no_secret.write_all(&hello).expect("write");
        let silent = std::net::TcpStream::connect(&addr).expect("connect");
        (garbage, no_secret, silent)
    });
    let rank = move |rank: usize| {
        std::thread::spawn(move || {
            let transport = rt().block_on(async {
                let t = Duration::from_secs(20);
                let mut store = StoreClient::connect("127.0.0.1", port, t)
                    .await
                    .expect("store")
                    .prefixed("comm");
                TcpTransport::connect(&mut store, rank, 3, t).await
            });
            let c = Communicator::new(Auto::Tcp(transport.expect("mesh")), Options::default());
            let mut v = [rank as i32 + 1];
            c.all_reduce(&mut v, ReduceOp::Sum).expect("all_reduce");
            v[0]
        })
    };
    // Rank 0 first; the others once the strays are queued at its listener, ahead of them.
    let mut ranks = vec![rank(0)];
    let strays = stray.join().expect("stray");
    ranks.extend([rank(1), rank(2)]);
    for r in ranks {
        assert_eq!(r.join().expect("rank"), 6);
    }
    drop(strays);
}
