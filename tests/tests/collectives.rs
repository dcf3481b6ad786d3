//! Workers built on `ferrun_collective`, launched by `ferrun` as separate processes: the
//! communicator bootstraps through the agent store and runs over TCP.

use std::process::Command;
use std::time::Duration;

#[test]
fn four_processes_under_ferrun_run_every_collective_over_shared_memory_and_tcp() {
    for (forced, expected) in [("", "shm"), ("tcp", "tcp")] {
        let stdout = launch(4, forced);
        for r in 0..4 {
            assert!(
                stdout.contains(&format!(
                    "[default{r}]:rank {r} of 4: collectives ok over {expected}"
                )),
                "{stdout}"
            );
        }
    }
}

/// Runs `n` collective workers under `ferrun`; their output.
fn launch(n: usize, transport: &str) -> String {
    let mut cmd = Command::new(ferrun_tests::ferrun_binary());
    cmd.env("FERRUN_TRANSPORT", transport);
    let nproc = n.to_string();
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        &nproc,
        "--max-restarts",
        "0",
        "--no-python",
    ])
    .arg(env!("CARGO_BIN_EXE_collective-worker"))
    .env_remove("OMP_NUM_THREADS");
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ferrun");
    let (tx, rx) = std::sync::mpsc::channel();
    let pid = child.id();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(50)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("ferrun did not finish in time");
    };
    let out = out.expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout.into_owned()
}

/// Starts `n` collective workers as plain processes (no launcher to stop the survivors), with
/// the env contract pointing at a store of this test.
fn spawn_without_launcher(
    n: u32,
    transport: &str,
    args: &[&str],
) -> (
    Vec<std::process::Child>,
    ferrun_collective::store::StoreServer,
) {
    let store = ferrun_collective::store::StoreServer::bind("127.0.0.1:0".parse().expect("addr"))
        .expect("store");
    let children = (0..n)
        .map(|rank| {
            let env = ferrun_collective::WorkerEnv {
                rank,
                local_rank: rank,
                world_size: n,
                local_world_size: n,
                group_rank: 0,
                group_world_size: 1,
                role_name: "default".into(),
                role_rank: rank,
                role_world_size: n,
                master_addr: "127.0.0.1".into(),
                master_port: store.local_addr().port(),
                restart_count: 0,
                max_restarts: 0,
                run_id: "dead-peer".into(),
                use_agent_store: true,
                error_file: std::env::temp_dir().join(format!("ferrun-dead-peer-{rank}.json")),
                nccl_async_error_handling: "1".into(),
                omp_num_threads: Some(1),
            };
            Command::new(env!("CARGO_BIN_EXE_collective-worker"))
                .args(args)
                .envs(env.to_env())
                .env("FERRUN_TRANSPORT", transport)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("worker")
        })
        .collect();
    (children, store)
}

#[test]
fn a_sigkilled_rank_is_named_by_the_others_on_both_transports() {
    use std::os::unix::process::ExitStatusExt;
    for transport in ["shm", "tcp"] {
        let started = std::time::Instant::now();
        let (children, _store) = spawn_without_launcher(3, transport, &["--die-rank", "1"]);
        let (tx, rx) = std::sync::mpsc::channel();
        for (rank, child) in children.into_iter().enumerate() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let _ = tx.send((rank, child.wait_with_output()));
            });
        }
        drop(tx);
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let (rank, out) = rx
                .recv_timeout(Duration::from_secs(40))
                .expect("a worker hung after its peer died");
            outcomes.push((rank, out.expect("output")));
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{transport}: took {:?}",
            started.elapsed()
        );
        for (rank, out) in outcomes {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if rank == 1 {
                assert_eq!(
                    out.status.signal(),
                    Some(9),
                    "{transport}: the victim: {stderr}"
                );
            } else {
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "{transport}: rank {rank}: {stderr}"
                );
                // Either its own link to rank 1 broke, or the other survivor told it rank 1 is gone.
                assert!(
                    stderr.contains("the link to rank 1 is broken")
                        || stderr.contains("rank 1 is gone"),
                    "{transport}: rank {rank} did not name the dead peer: {stderr}"
                );
            }
        }
    }
}
