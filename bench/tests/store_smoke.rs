//! `ferrun-bench store` with a handful of clients, so that its client processes, torch's server
//! peer and its table cannot rot unnoticed, and so that a wrong result is seen to fail the run.

use std::process::Command;

fn store(spoil: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrun-bench"));
    cmd.args([
        "store",
        "--clients",
        "3,8",
        "--rounds",
        "3",
        "--repeats",
        "2",
        "--client-processes",
        "2",
    ])
    .arg("--venv")
    .arg(ferrun_tests::venv());
    if spoil {
        cmd.env("FERRUN_BENCH_SPOIL", "1");
    }
    cmd.output().expect("ferrun-bench")
}

#[test]
fn store_prints_both_servers_at_every_client_count() {
    let out = store(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for clients in ["3", "8"] {
        for server in ["torch", "ferrun"] {
            let row = stdout
                .lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.first() == Some(&clients) && f.get(2) == Some(&server))
                .unwrap_or_else(|| panic!("no {server} row for {clients} clients: {stdout}"));
            let ops: f64 = row[3].parse().unwrap_or(f64::NAN);
            assert!(ops.is_finite() && ops > 0.0, "{row:?}");
        }
        let ferrun = stdout
            .lines()
            .find(|l| l.split_whitespace().take(3).eq([clients, "3", "ferrun"]))
            .unwrap_or_default();
        // The ratio follows ferrun's ops/s and its range.
        let ratio = ferrun.split_whitespace().nth(6).unwrap_or_default();
        assert!(ratio.parse::<f64>().is_ok_and(|r| r > 0.0), "{ferrun}");
    }
}

#[test]
fn a_wrong_result_fails_the_store_benchmark() {
    let out = store(true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("wrong result"), "{stderr}");
}
