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
    let out = ferrun_tests::output_within(child, Duration::from_secs(50));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    stdout.into_owned()
}

/// Starts `n` collective workers as plain processes (no launcher to stop the survivors), with
/// the env contract pointing at a store of this test; rank `r` runs under `wrap(r)` (a command
/// and its arguments before the worker's), if any.
fn spawn_without_launcher(
    n: u32,
    transport: &str,
    args: &[&str],
    wrap: impl Fn(u32) -> Vec<String>,
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
            let worker = env!("CARGO_BIN_EXE_collective-worker");
            let wrapper = wrap(rank);
            let mut cmd = match wrapper.split_first() {
                Some((program, rest)) => {
                    let mut cmd = Command::new(program);
                    cmd.args(rest).arg(worker);
                    cmd
                }
                None => Command::new(worker),
            };
            cmd.args(args)
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

/// Waits for every child (bounded: a hang fails the test); `(rank, output)` in exit order.
fn outcomes(children: Vec<std::process::Child>) -> Vec<(usize, std::process::Output)> {
    let n = children.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let pids: Vec<u32> = children.iter().map(std::process::Child::id).collect();
    for (rank, child) in children.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send((rank, child.wait_with_output()));
        });
    }
    drop(tx);
    let mut outcomes = Vec::new();
    for _ in 0..n {
        let Ok((rank, out)) = rx.recv_timeout(Duration::from_secs(60)) else {
            for pid in &pids {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            panic!("a worker hung: {} of {n} exited", outcomes.len());
        };
        outcomes.push((rank, out.expect("output")));
    }
    outcomes
}

/// Every survivor names `victim` as the rank that is gone, and no other rank.
fn assert_named(what: &str, victim: usize, outcomes: &[(usize, std::process::Output)]) {
    use std::os::unix::process::ExitStatusExt;
    for (rank, out) in outcomes {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if *rank == victim {
            assert_eq!(out.status.signal(), Some(9), "{what}: the victim: {stderr}");
            continue;
        }
        assert_eq!(out.status.code(), Some(1), "{what}: rank {rank}: {stderr}");
        let named = |r: usize| {
            stderr.contains(&format!("the link to rank {r} is broken"))
                || stderr.contains(&format!("rank {r} is gone"))
        };
        assert!(
            named(victim),
            "{what}: rank {rank} did not name the dead rank {victim}: {stderr}"
        );
        let blamed: Vec<usize> = (0..outcomes.len())
            .filter(|&r| r != victim && named(r))
            .collect();
        assert!(
            blamed.is_empty(),
            "{what}: rank {rank} blamed live ranks {blamed:?}: {stderr}"
        );
    }
}

#[test]
fn every_survivor_names_the_sigkilled_rank_on_both_transports() {
    for transport in ["tcp", "shm"] {
        for victim in 0..4 {
            let victim_arg = victim.to_string();
            let (children, _store) =
                spawn_without_launcher(4, transport, &["--die-rank", &victim_arg], |_| vec![]);
            let what = format!("{transport}, rank {victim} killed");
            assert_named(&what, victim, &outcomes(children));
        }
    }
}

/// `unshare --pid --fork`: the process in a PID namespace of its own, as in another container
/// of the same pod. A shell is the namespace's init (pid 1 ignores even SIGKILL from inside).
fn pid_namespace(rank: u32, namespaced: u32) -> Vec<String> {
    if rank == namespaced {
        [
            "unshare",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            "\"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec()
    } else {
        vec![]
    }
}

#[test]
fn a_peer_in_another_pid_namespace_shares_memory_and_its_death_is_seen() {
    // Alive: it must not be declared gone (a pid from its namespace means nothing here).
    let (children, _store) = spawn_without_launcher(2, "", &[], |r| pid_namespace(r, 1));
    for (rank, out) in outcomes(children) {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "rank {rank}: {stdout}{stderr}");
        assert!(
            stdout.contains("collectives ok over shm"),
            "rank {rank}: {stdout}"
        );
    }
    // Dead: its peers see it go, whichever side of the namespace boundary dies.
    for (victim, namespaced) in [(1, 1), (0, 1)] {
        let victim_arg = victim.to_string();
        let (children, _store) =
            spawn_without_launcher(3, "shm", &["--die-rank", &victim_arg], |r| {
                pid_namespace(r, namespaced)
            });
        let mut outcomes = outcomes(children);
        // The namespace's shell reports its child's SIGKILL as exit 128 + 9.
        for (rank, out) in &mut outcomes {
            if *rank == victim && *rank == namespaced as usize {
                use std::os::unix::process::ExitStatusExt;
                if out.status.code() == Some(128 + 9) {
                    out.status = std::process::ExitStatus::from_raw(9);
                }
            }
        }
        assert_named(
            &format!("rank {victim} killed, rank {namespaced} namespaced"),
            victim,
            &outcomes,
        );
    }
}

#[test]
fn ranks_killed_while_setting_up_shared_memory_leave_no_segment() {
    let files = || -> Vec<String> {
        std::fs::read_dir("/dev/shm")
            .expect("/dev/shm")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ferrun"))
            .collect()
    };
    for published in 0..3 {
        let (children, store) = spawn_without_launcher(3, "shm", &[], |_| vec![]);
        // The moment rank `published` has made its segment and offers it to its peers.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let t = Duration::from_secs(30);
            let mut client = ferrun_collective::store::StoreClient::connect(
                "127.0.0.1",
                store.local_addr().port(),
                t,
            )
            .await
            .expect("store");
            let key = format!("ferrun/comm/e2e/attempt_0/shm/{published}");
            client
                .wait(&[&key], t)
                .await
                .expect("rank published its segment");
        });
        for child in &children {
            let _ = Command::new("kill")
                .args(["-9", &child.id().to_string()])
                .status();
        }
        let _ = outcomes(children);
        assert!(files().is_empty(), "left in /dev/shm: {:?}", files());
    }
}
