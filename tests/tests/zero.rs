//! ZeRO across processes: 4 ranks under `ferrun` over shared memory run every stage, agree to
//! the bit and match stage 0; the stage-2 checkpoint they save loads at 2 and at 3 ranks with
//! the same master weights and optimizer state.

use std::process::Command;
use std::time::Duration;

/// Runs `n` zero workers under `ferrun`; their output.
fn launch(n: usize, args: &[&str]) -> String {
    let mut cmd = Command::new(ferrun_tests::ferrun_binary());
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        &n.to_string(),
        "--max-restarts",
        "0",
        "--no-python",
    ])
    .arg(env!("CARGO_BIN_EXE_zero-worker"))
    .args(args)
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let out = ferrun_tests::output_within(cmd.spawn().expect("ferrun"), Duration::from_secs(120));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn checksums(stdout: &str, word: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            l.split_once(&format!("{word} checksum "))
                .map(|(_, s)| s.trim().to_owned())
        })
        .collect()
}

#[test]
fn four_processes_run_every_stage_and_their_checkpoint_loads_at_two_and_three() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_str().expect("utf-8 path");
    let trained = launch(4, &["train", path]);
    for r in 0..4 {
        assert!(
            trained.contains(&format!(
                "[default{r}]:rank {r} of 4: zero stages ok over shm"
            )),
            "{trained}"
        );
    }
    let saved = checksums(&trained, "saved");
    assert_eq!(saved.len(), 4, "{trained}");
    assert!(saved.iter().all(|s| *s == saved[0]), "{saved:?}");
    for n in [2, 3] {
        let resumed = launch(n, &["resume", path]);
        let loaded = checksums(&resumed, "loaded");
        assert_eq!(loaded.len(), n, "{resumed}");
        assert!(
            loaded.iter().all(|s| *s == saved[0]),
            "N={n}: loaded {loaded:?}, saved {}",
            saved[0]
        );
    }
}
