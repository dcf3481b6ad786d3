//! `ferrun-bench compare` at tiny sizes, so that its parsing of every runtime's output cannot
//! rot unnoticed, and so that a wrong result is seen to fail the run.

use std::path::PathBuf;
use std::process::Command;

fn anchors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/anchors")
}

fn compare(spoil: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrun-bench"));
    cmd.args([
        "compare",
        "all_reduce",
        "--ranks",
        "2",
        "--sizes",
        "4,4K",
        "--rounds",
        "1",
    ])
    .arg("--anchors")
    .arg(anchors())
    .arg("--venv")
    .arg(ferrun_tests::venv())
    .arg("--ferrun")
    .arg(ferrun_tests::ferrun_binary())
    .current_dir(env!("CARGO_MANIFEST_DIR"));
    if spoil {
        cmd.env("FERRUN_BENCH_SPOIL", "1");
    }
    cmd.output().expect("ferrun-bench")
}

#[test]
fn compare_prints_every_size_with_correct_results_from_every_runtime() {
    assert!(
        anchors().join("gloo_allreduce.py").is_file(),
        "the anchors are missing at {}",
        anchors().display()
    );
    let out = compare(false);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    for size in ["4", "4096"] {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(size))
            .unwrap_or_else(|| panic!("no row for {size} B: {stdout}"));
        let fields: Vec<&str> = row.split_whitespace().collect();
        // Times and bandwidths parsed to numbers, not NaN; nothing wrong anywhere.
        assert!(
            fields[1..3]
                .iter()
                .all(|f| f.parse::<f64>().is_ok_and(f64::is_finite)),
            "{row}"
        );
        let wrong = fields.last().copied().unwrap_or_default();
        assert!(wrong.split('/').all(|w| w == "0"), "{row}");
    }
}

#[test]
fn a_wrong_result_fails_the_benchmark() {
    let out = compare(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("wrong"), "{stderr}");
}
