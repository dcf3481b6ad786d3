//! Bad input gets a clear error and a non-zero exit, never a panic or a hang.

mod support;

use std::time::Duration;

use support::{ferrun, run, text, worker};

/// Runs ferrun and returns (exit code, stderr), checking that it did not panic.
fn reject(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = ferrun();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run(cmd, Duration::from_secs(10));
    let (_, stderr) = text(&out);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code(), stderr)
}

#[test]
fn unknown_flag_names_the_flag() {
    let (code, stderr) = reject(&["--nproc-per-nodes", "2", "x.py"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("unexpected argument '--nproc-per-nodes'")
            && stderr.contains("--nproc-per-node"),
        "{stderr}"
    );
}

#[test]
fn inverted_nnodes_range_is_rejected() {
    let (code, stderr) = reject(&["--nnodes", "3:2", &worker("output.py")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--nnodes \"3:2\" is not valid: use N or MIN:MAX with 0 < MIN <= MAX"),
        "{stderr}"
    );
}

#[test]
fn gpu_workers_without_gpus_are_rejected() {
    let has_gpu = std::path::Path::new("/proc/driver/nvidia/gpus").exists();
    let (code, stderr) = reject(
        &["--nproc-per-node", "gpu", &worker("output.py")],
        &[("CUDA_VISIBLE_DEVICES", "")],
    );
    // CUDA_VISIBLE_DEVICES="" hides every GPU, so this holds on GPU machines too.
    assert_eq!(code, Some(2), "gpu present: {has_gpu}; {stderr}");
    assert!(
        stderr.contains("--nproc-per-node gpu: no GPU found"),
        "{stderr}"
    );
}

#[test]
fn a_missing_script_is_named() {
    let (code, stderr) = reject(&["--nproc-per-node", "2", "no/such/train.py"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("training script \"no/such/train.py\" does not exist"),
        "{stderr}"
    );
}

#[test]
fn a_missing_program_is_named() {
    let (code, stderr) = reject(&["--no-python", "ferrun-no-such-program"], &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("\"ferrun-no-such-program\" was not found"),
        "{stderr}"
    );
}

#[test]
fn malformed_values_and_pet_booleans_are_named() {
    let (code, stderr) = reject(&["--max-restarts", "-1", "x.py"], &[]);
    assert_eq!(code, Some(2), "{stderr}");
    let (code, stderr) = reject(&["--redirects", "7", &worker("output.py")], &[]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("--redirects \"7\" is not valid"),
        "{stderr}"
    );
    let (code, stderr) = reject(&[&worker("output.py")], &[("PET_STANDALONE", "yes")]);
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("PET_STANDALONE=\"yes\" is not a boolean"),
        "{stderr}"
    );
    let (code, stderr) = reject(
        &["--signals-to-handle", "SIGKILL", &worker("output.py")],
        &[],
    );
    assert_eq!(code, Some(2));
    assert!(stderr.contains("SIGKILL"), "{stderr}");
}

#[test]
fn signals_that_cannot_be_forwarded_are_refused() {
    for signal in ["SIGCHLD", "SIGKILL", "SIGSEGV", "SIGTSTP"] {
        let (code, stderr) = reject(&["--signals-to-handle", signal, "--no-python", "true"], &[]);
        assert_eq!(code, Some(2), "{signal}: {stderr}");
        assert!(
            stderr.contains(signal) && stderr.contains("SIGTERM"),
            "{stderr}"
        );
    }
}

#[test]
fn rendezvous_settings_are_checked_on_one_node_too() {
    for conf in [
        "join_timeout=abc",
        "exit_barrier_timeout=-1",
        "bogus_key=1",
        "is_host=maybe",
    ] {
        let (code, stderr) = reject(
            &["--standalone", "--rdzv-conf", conf, "--no-python", "true"],
            &[],
        );
        assert_eq!(code, Some(2), "{conf}: {stderr}");
        let key = conf.split('=').next().unwrap_or_default();
        assert!(stderr.contains(key), "{conf}: {stderr}");
    }
}

#[test]
fn an_unwritable_log_dir_is_bad_input() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").expect("file");
    let under_a_file = file.join("logs");
    let (code, stderr) = reject(
        &[
            "--standalone",
            "--log-dir",
            under_a_file.to_str().unwrap_or_default(),
            "--no-python",
            "true",
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("log directory") && stderr.contains("--log-dir"),
        "{stderr}"
    );
}
