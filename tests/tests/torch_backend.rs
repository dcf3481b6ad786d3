//! The `ferrun` torch.distributed backend (`import ferrun.torch`), with real torch 2.13 in real
//! processes launched by `ferrun` and by `torchrun`: every op against gloo's, DDP, FSDP and
//! ZeroRedundancyOptimizer training to gloo's parameters, failures named on every rank, groups
//! that are released, and DDP across two namespaced hosts.
//!
//! The workers are in `tests/workers/torch_backend/`; each prints what it checked and exits
//! non-zero when a check fails.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Long enough for torch to start on a loaded 2-core machine; a hang fails well before the
/// group's own 60 s timeout would matter.
const LIMIT: Duration = Duration::from_secs(240);

fn worker(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("workers/torch_backend")
        .join(name)
}

/// The venv, checked to have this checkout's backend installed.
fn venv() -> PathBuf {
    let venv = ferrun_tests::venv();
    let ok = Command::new(venv.join("bin/python"))
        .args(["-c", "import ferrun.torch"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "the ferrun torch backend is not installed in {}: run scripts/setup-python.sh (scripts/test.sh does)",
        venv.display()
    );
    venv
}

fn path_with(venv: &std::path::Path) -> String {
    format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn run(mut cmd: Command) -> (bool, String) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let out: Output = ferrun_tests::output_within(child, LIMIT);
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `script args` on `n` ranks under ferrun (`torchrun` when `torchrun`), over `transport`.
fn launch(torchrun: bool, n: usize, transport: &str, script: &str, args: &[&str]) -> String {
    let venv = venv();
    let mut cmd = if torchrun {
        Command::new(venv.join("bin/torchrun"))
    } else {
        Command::new(ferrun_tests::ferrun_binary())
    };
    cmd.env("PATH", path_with(&venv))
        .env("FERRUN_TRANSPORT", transport)
        .args([
            "--standalone",
            "--nproc-per-node",
            &n.to_string(),
            "--max-restarts",
            "0",
        ])
        .arg(worker(script))
        .args(args);
    let (ok, text) = run(cmd);
    assert!(ok, "{script} {args:?} on {n} ranks failed:\n{text}");
    text
}

fn expect_every_rank(text: &str, n: usize, words: &str) {
    for r in 0..n {
        assert!(
            text.contains(&format!("rank {r}: {words}")),
            "rank {r} did not say {words:?}:\n{text}"
        );
    }
}

#[test]
fn every_op_matches_gloo_on_two_and_four_ranks_under_ferrun() {
    for n in [2, 4] {
        let text = launch(false, n, "", "ops.py", &[]);
        expect_every_rank(&text, n, "ops ok");
    }
}

#[test]
fn every_op_matches_gloo_over_tcp_on_three_ranks_and_under_torchrun() {
    let text = launch(false, 3, "tcp", "ops.py", &[]);
    expect_every_rank(&text, 3, "ops ok");
    let text = launch(true, 2, "", "ops.py", &[]);
    expect_every_rank(&text, 2, "ops ok");
}

#[test]
fn ddp_trains_to_gloos_parameters_under_ferrun_and_torchrun() {
    for (torchrun, n) in [(false, 2), (false, 4), (true, 2)] {
        let text = launch(torchrun, n, "", "train.py", &["ddp"]);
        expect_every_rank(&text, n, "ddp: max |gloo - ferrun|");
        assert!(!text.contains("identical across ranks: False"), "{text}");
    }
}

#[test]
fn fsdp_and_zero_redundancy_optimizer_train_to_gloos_parameters() {
    for mode in ["zero", "fsdp-full", "fsdp-grad"] {
        let n = if mode == "fsdp-full" { 4 } else { 2 };
        let text = launch(false, n, "", "train.py", &[mode]);
        expect_every_rank(&text, n, &format!("{mode}: max |gloo - ferrun|"));
    }
}

/// `failures.py case args` on `n` plain processes (no launcher to stop the survivors), with a
/// store of this test's, as a launcher's agent store.
fn spawn_ranks(n: usize, transport: &str, args: &[&str]) -> Vec<(usize, bool, String)> {
    let venv = venv();
    let store = ferrun_collective::store::StoreServer::bind("127.0.0.1:0".parse().expect("addr"))
        .expect("store");
    let port = store.local_addr().port();
    let children: Vec<_> = (0..n)
        .map(|rank| {
            let mut cmd = Command::new(venv.join("bin/python"));
            cmd.arg(worker("failures.py"))
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("FERRUN_TRANSPORT", transport)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .stdin(Stdio::null());
            cmd.spawn().expect("python")
        })
        .collect();
    children
        .into_iter()
        .enumerate()
        .map(|(rank, child)| {
            let out = ferrun_tests::output_within(child, LIMIT);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (rank, out.status.success(), text)
        })
        .collect()
}

#[test]
fn a_rank_killed_mid_training_is_named_by_every_survivor_within_the_timeout() {
    for (transport, victim) in [("", 0), ("", 1), ("", 2), ("tcp", 1)] {
        let victim_arg = victim.to_string();
        for (rank, ok, text) in spawn_ranks(3, transport, &["kill", &victim_arg]) {
            if rank == victim {
                continue;
            }
            assert!(
                ok && text.contains(&format!("rank {rank}: named")),
                "{transport:?}: rank {rank} with rank {victim} killed:\n{text}"
            );
        }
    }
}

#[test]
fn ranks_that_call_different_collectives_all_fail_saying_so() {
    for (rank, ok, text) in spawn_ranks(4, "", &["mismatch"]) {
        assert!(
            ok && text.contains(&format!("rank {rank}: told")),
            "rank {rank}:\n{text}"
        );
    }
}

#[test]
fn destroy_process_group_releases_the_group_and_a_new_one_works() {
    for (rank, ok, text) in spawn_ranks(2, "", &["lifecycle"]) {
        assert!(
            ok && text.contains(&format!("rank {rank}: released")),
            "rank {rank}:\n{text}"
        );
    }
}

#[test]
fn a_program_that_ends_with_ops_queued_exits_cleanly() {
    for (rank, ok, text) in spawn_ranks(2, "", &["exit"]) {
        assert!(
            ok && text.contains(&format!("rank {rank}: exiting")),
            "rank {rank}:\n{text}"
        );
    }
}

#[test]
fn ddp_trains_across_two_namespaced_hosts_over_tcp_and_shared_memory() {
    let venv = venv();
    let hosts = ferrun_tests::netns::Hosts::create().expect("two namespaced hosts");
    let master = hosts.addrs[0].clone();
    let children: Vec<_> = (0..2)
        .map(|node| {
            let mut cmd = Command::new(ferrun_tests::ferrun_binary());
            cmd.env("PATH", path_with(&venv))
                .args([
                    "--nnodes",
                    "2",
                    "--node-rank",
                    &node.to_string(),
                    "--nproc-per-node",
                    "2",
                ])
                .args([
                    "--master-addr",
                    &master,
                    "--master-port",
                    "29564",
                    "--max-restarts",
                    "0",
                ])
                .args(["--rdzv-conf", "join_timeout=120"])
                .arg(worker("train.py"))
                .arg("ddp");
            let mut wrapped = hosts.on(node, &cmd);
            wrapped
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .stdin(Stdio::null());
            wrapped.spawn().expect("ferrun")
        })
        .collect();
    let mut text = String::new();
    let mut ok = true;
    for child in children {
        let out = ferrun_tests::output_within(child, LIMIT);
        ok &= out.status.success();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    assert!(ok, "{text}");
    expect_every_rank(&text, 4, "ddp: max |gloo - ferrun|");
    assert!(text.contains("transport shm+tcp"), "{text}");
}
