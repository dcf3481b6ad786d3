//! Multi-node static launches across real network hosts (namespaces joined by veth), with no
//! GLOO_SOCKET_IFNAME given: ferrun finds the interface itself.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrun_tests::netns::Hosts;
use support::{ferrun, run_child, stdout_lines, text, wait_for_lines, worker};

const LIMIT: Duration = Duration::from_secs(50);

/// `launcher` run as node `rank` of a 2×2 job on its host, store on `master:port`.
fn node_with(
    launcher: Command,
    hosts: &Hosts,
    rank: usize,
    (master, port): (&str, u16),
    extra: &[&str],
    script: &[String],
) -> Command {
    let mut cmd = launcher;
    cmd.env_remove("GLOO_SOCKET_IFNAME")
        .env_remove("NCCL_SOCKET_IFNAME");
    cmd.args([
        "--nnodes",
        "2",
        "--node-rank",
        &rank.to_string(),
        "--nproc-per-node",
        "2",
    ])
    .args([
        "--master-addr",
        master,
        "--master-port",
        &port.to_string(),
        "--rdzv-id",
        "mh",
    ])
    .args(extra)
    .args(script);
    let mut wrapped = hosts.on(rank, &cmd);
    wrapped
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    wrapped
}

/// `ferrun` as node `rank`, store on `master:29561`.
fn node(hosts: &Hosts, rank: usize, master: &str, extra: &[&str], script: &[String]) -> Command {
    node_with(ferrun(), hosts, rank, (master, 29561), extra, script)
}

#[test]
fn two_hosts_all_reduce_and_a_late_node_0_is_waited_for() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let master = hosts.addrs[0].clone();
    let script = [worker("gloo_allreduce.py")];
    let conf = ["--rdzv-conf", "join_timeout=40"];
    // Node 1 starts first and keeps trying to reach node 0's store until it is there.
    let mut node1 = node(&hosts, 1, &master, &conf, &script);
    node1.env("RUST_LOG", "debug");
    let mut node1 = node1.spawn().expect("node 1");
    let node1_err = node1.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(node1_err)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("not reachable yet") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(LIMIT)
        .expect("node 1 is waiting for node 0");
    let node0 = node(&hosts, 0, &master, &conf, &script)
        .spawn()
        .expect("node 0");
    let out0 = run_child(node0, LIMIT);
    let out1 = run_child(node1, LIMIT);
    let (stdout0, stderr0) = text(&out0);
    let stdout1 = String::from_utf8_lossy(&out1.stdout);
    assert!(out0.status.success(), "node 0:\n{stdout0}\n{stderr0}");
    assert!(out1.status.success(), "node 1:\n{stdout1}");
    for (rank, (out, ifname)) in [
        (0, (&stdout0, 0)),
        (1, (&stdout0, 0)),
        (2, (&stdout1.to_string(), 1)),
        (3, (&stdout1.to_string(), 1)),
    ] {
        let expected = format!("rank {rank} of 4 sum 10 ifname {}", hosts.ifnames[ifname]);
        assert!(out.contains(&expected), "missing {expected:?} in:\n{out}");
    }
}

#[test]
fn a_wrong_master_address_fails_clearly_within_the_timeout() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let wrong = hosts.addrs[1]
        .rsplit_once('.')
        .map(|(net, _)| format!("{net}.99"))
        .expect("addr");
    let started = Instant::now();
    let out = run_child(
        node(
            &hosts,
            1,
            &wrong,
            &["--rdzv-conf", "join_timeout=3"],
            &[worker("output.py")],
        )
        .spawn()
        .expect("spawn"),
        LIMIT,
    );
    let elapsed = started.elapsed();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    assert!(
        stderr.contains(&format!("{wrong}:29561")) && stderr.contains("node 0"),
        "{stderr}"
    );
}

#[test]
fn a_worker_failure_on_node_1_ends_node_0s_group_too() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let master = hosts.addrs[0].clone();
    let script = [
        worker("gloo_allreduce.py"),
        "--fail-rank".into(),
        "3".into(),
    ];
    let extra = ["--rdzv-conf", "join_timeout=40", "--shutdown-timeout", "2"];
    let mut node0 = node(&hosts, 0, &master, &extra, &script)
        .spawn()
        .expect("node 0");
    let node0_lines = stdout_lines(&mut node0);
    let node1 = node(&hosts, 1, &master, &extra, &script)
        .spawn()
        .expect("node 1");
    // Node 0's ranks are blocked for good: only the failure report from node 1 ends them.
    wait_for_lines(&node0_lines, "waiting", 2, LIMIT);
    let started = Instant::now();
    let out0 = run_child(node0, LIMIT);
    let out1 = run_child(node1, LIMIT);
    let stderr0 = String::from_utf8_lossy(&out0.stderr);
    let stderr1 = String::from_utf8_lossy(&out1.stderr);
    assert_eq!(out1.status.code(), Some(1), "{stderr1}");
    let root = stderr1
        .split("Root Cause")
        .nth(1)
        .expect("node 1 reports the root cause");
    assert!(
        root.contains("rank      : 3 (local_rank: 1)") && root.contains("exitcode  : 5"),
        "{root}"
    );
    assert_eq!(out0.status.code(), Some(1), "{stderr0}");
    assert!(
        stderr0.contains("failed on another node") && stderr0.contains("rank 3 (node 1"),
        "{stderr0}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "node 0 took {:?} to stop",
        started.elapsed()
    );
}

/// Each rank's `{env, argv}` from envdump.py run on both hosts by `launcher` (ferrun or torchrun).
fn contract_on_two_hosts(
    hosts: &Hosts,
    torchrun: bool,
) -> std::collections::BTreeMap<u32, serde_json::Value> {
    let master = hosts.addrs[0].clone();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            let launcher = if torchrun {
                support::torchrun()
            } else {
                ferrun()
            };
            node_with(
                launcher,
                hosts,
                rank,
                (&master, 29562),
                &[],
                &[worker("envdump.py")],
            )
            .spawn()
            .expect("spawn")
        })
        .collect();
    let mut ranks = std::collections::BTreeMap::new();
    for child in children {
        let out = run_child(child, LIMIT);
        let (stdout, stderr) = text(&out);
        assert!(
            out.status.success(),
            "torchrun={torchrun}:\n{stdout}\n{stderr}"
        );
        ranks.extend(support::env_records(&stdout));
    }
    ranks
}

#[test]
fn the_env_contract_across_hosts_matches_torchrun() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let theirs = contract_on_two_hosts(&hosts, true);
    let ours = contract_on_two_hosts(&hosts, false);
    assert_eq!(theirs.len(), 4);
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (rank, t) in &theirs {
        for (name, tv) in t["env"].as_object().expect("env") {
            let ov = &ours[rank]["env"][name];
            if name != "TORCHELASTIC_ERROR_FILE" {
                assert_eq!(ov, tv, "rank {rank}: {name}");
            } else {
                assert!(
                    ov.as_str().is_some_and(|p| p.ends_with("/error.json")),
                    "{ov}"
                );
            }
        }
    }
    assert_eq!(ours[&3]["env"]["GROUP_RANK"], "1");
    assert_eq!(
        ours[&3]["env"]["MASTER_ADDR"].as_str(),
        Some(hosts.addrs[0].as_str())
    );
}

#[test]
fn a_port_in_use_on_node_0_is_named_with_the_fix() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let mut squatter = hosts.on(0, &{
        let mut c = Command::new(support::venv().join("bin/python"));
        c.args(["-c", "import socket,sys; s=socket.socket(); s.bind(('0.0.0.0', 29561)); s.listen(); print('bound', flush=True); sys.stdin.read()"]);
        c
    });
    let mut squatter = squatter
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("squatter");
    let lines = stdout_lines(&mut squatter);
    wait_for_lines(&lines, "bound", 1, LIMIT);
    let out = run_child(
        node(
            &hosts,
            0,
            &hosts.addrs[0].clone(),
            &["--rdzv-conf", "join_timeout=3"],
            &[worker("output.py")],
        )
        .spawn()
        .expect("spawn"),
        LIMIT,
    );
    drop(squatter.stdin.take());
    let _ = squatter.wait();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("29561")
            && stderr.contains("already in use")
            && stderr.contains("--master-port"),
        "{stderr}"
    );
}

/// The `collective-worker` binary of the `ferrun-tests` crate, built by `cargo test --workspace`.
fn collective_worker() -> String {
    let exe = std::env::current_exe().expect("test binary");
    let worker = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("collective-worker");
    assert!(
        worker.is_file(),
        "{} is missing: run the suite with `cargo test --workspace`",
        worker.display()
    );
    worker.display().to_string()
}

#[test]
fn ferruns_own_collectives_run_across_hosts_over_tcp_and_within_them_over_shared_memory() {
    let hosts = Hosts::create().expect("two namespaced hosts");
    let master = hosts.addrs[0].clone();
    let script = ["--no-python".to_owned(), collective_worker()];
    let extra = ["--rdzv-conf", "join_timeout=40"];
    let children: Vec<_> = (0..2)
        .map(|rank| {
            node_with(ferrun(), &hosts, rank, (&master, 29563), &extra, &script)
                .spawn()
                .expect("spawn")
        })
        .collect();
    let outputs: Vec<_> = children.into_iter().map(|c| run_child(c, LIMIT)).collect();
    let stdout: String = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    for (node, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "node {node}:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The hosts differ (network namespaces): TCP between them, shared memory within each.
    for rank in 0..4 {
        assert!(
            stdout.contains(&format!("rank {rank} of 4: collectives ok over shm+tcp")),
            "{stdout}"
        );
    }
}
