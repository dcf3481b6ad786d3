//! `ferrun-bench collective` under the launcher: the CPU sweep passes, and on a machine without
//! a GPU `--backend nccl --device cuda` exits non-zero with the error that names what is
//! missing (the GPU sweep itself runs in `bench/gpu-check.sh` on a GPU machine).

use std::process::{Command, Output};

fn collective(extra: &[&str]) -> Output {
    Command::new(ferrun_tests::ferrun_binary())
        .args(["--standalone", "--nproc-per-node", "2", "--no-python"])
        .arg(env!("CARGO_BIN_EXE_ferrun-bench"))
        .args(["collective", "all_reduce", "--sizes", "4,64K"])
        .args(extra)
        .env("FERRUN_TRANSPORT", "shm")
        .output()
        .expect("ferrun")
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_cpu_sweep_prints_both_sizes_with_nothing_wrong() {
    let out = collective(&[]);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    for size in ["4", "65536"] {
        // Rank 0's lines, as the launcher prefixes them.
        let row = all
            .lines()
            .filter_map(|l| l.strip_prefix("[default0]:"))
            .find(|l| l.split_whitespace().next() == Some(size))
            .unwrap_or_else(|| panic!("no row for {size} B:\n{all}"));
        assert_eq!(row.split_whitespace().last(), Some("0"), "{row}");
    }
}

#[test]
fn without_a_gpu_the_nccl_sweep_fails_naming_the_missing_driver() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        // A GPU machine runs the sweep for real in bench/gpu-check.sh.
        return;
    }
    let out = collective(&["--backend", "nccl", "--device", "cuda"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("libcuda.so.1"), "{all}");
    assert!(
        all.contains("--backend \"nccl\" --device cuda") || all.contains("no CUDA driver"),
        "{all}"
    );
}

#[test]
fn nccl_without_cuda_buffers_is_refused_with_the_fix() {
    let out = collective(&["--backend", "nccl"]);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("add --device cuda"), "{all}");
}

fn gpu_check(ranks: &str, extra: &[&str], spoil: bool) -> Output {
    let mut cmd = Command::new(ferrun_tests::ferrun_binary());
    cmd.args(["--standalone", "--nproc-per-node", ranks, "--no-python"])
        .arg(env!("CARGO_BIN_EXE_ferrun-bench"))
        .args(["gpu-check", "--count", "37"])
        .args(extra);
    if spoil {
        cmd.env("FERRUN_BENCH_SPOIL", "1");
    }
    cmd.output().expect("ferrun")
}

#[test]
fn the_checks_expected_values_hold_on_the_cpu_communicator_and_a_wrong_one_fails() {
    let out = gpu_check("3", &["--device", "cpu"], false);
    let all = text(&out);
    assert!(out.status.success(), "{all}");
    assert!(all.contains("74 passed, 0 failed"), "{all}");
    for row in [
        ["AllReduce(Avg)", "Bf16", "ok"],
        ["AllToAll", "U8", "ok"],
        ["SendRecv", "F16", "ok"],
    ] {
        let found = all
            .lines()
            .filter_map(|l| l.strip_prefix("[default0]:"))
            .any(|l| l.split_whitespace().eq(row));
        assert!(found, "{row:?}:\n{all}");
    }
    let out = gpu_check("2", &["--device", "cpu"], true);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("WRONG"), "{all}");
}

#[test]
fn without_a_gpu_the_gpu_check_fails_naming_the_missing_driver() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        return;
    }
    let out = gpu_check("1", &[], false);
    let all = text(&out);
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("no CUDA driver: libcuda.so.1"), "{all}");
}
