//! `ferrun-bench rendezvous` with a few agents, so that its rounds, its checks of the ranks
//! handed out and its table cannot rot unnoticed.

use std::process::Command;

#[test]
fn rendezvous_prints_every_measurement() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrun-bench"))
        .args([
            "rendezvous",
            "--agents",
            "5,40",
            "--rounds",
            "2",
            "--heartbeat-ms",
            "200",
        ])
        .output()
        .expect("ferrun-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for row in [
        "5 agents join: all know their rank",
        "40 agents join: all know their rank",
        "1 of 8 silent (heartbeats stop) → survivors' new round",
        "1 of 8 killed (connection breaks) → survivors' new round",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .unwrap_or_else(|| panic!("no row {row:?}: {stdout}"));
        let median: f64 = line[row.len()..]
            .split_whitespace()
            .nth(2)
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no median in {line:?}"));
        assert!(median >= 0.0, "{line}");
    }
}
