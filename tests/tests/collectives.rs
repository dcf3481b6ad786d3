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
