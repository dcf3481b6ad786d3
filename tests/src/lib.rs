//! Cross-crate end-to-end tests: flows that span crates, run as real processes.
//!
//! - `collective-worker` (a binary): a worker built on `ferrun_collective`, launched by
//!   `ferrun`, that joins the job's communicator through the agent store and checks every
//!   collective against a plain reference.
//! - `zero-worker` (a binary): ZeRO stages 0–3 across the ranks `ferrun` launched, checked
//!   against stage 0 and to the bit across ranks; a checkpoint saved and loaded at another
//!   world size (`tests/zero.rs`).
//! - `tests/torch_backend.rs`: the `ferrun` torch.distributed backend (`import ferrun.torch`)
//!   with real torch in processes launched by `ferrun` and `torchrun`.
//! - `tests/operator_jobs.rs`: PyTorchJobs rendered by `ferrun-operator` and run in its local
//!   mode, their containers running `ferrun` with torch: the operator's environment and the
//!   launcher's contract must agree.
//! - `tests/kubeflow.rs`: the KFP pipelines of `examples/kfp/` compiled and run with
//!   kfp.local, the PyTorchJob their launcher step submits, and TrainJobs rendered as Trainer
//!   v2 would and run by `ferrun-operator local`, their nodes running `ferrun`.
//! - [`etcd`]: a real etcd on loopback or a namespaced host, for the etcd rendezvous tests.
//! - [`netns`]: two hosts on one machine (network namespaces), for multi-host tests and the
//!   cross-host benchmark.
//!
//! The launcher's own end-to-end tests live in `launcher/tests/`, where cargo hands them the
//! `ferrun` binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub mod etcd;
pub mod netns;

/// The `ferrun` binary of this build (next to this crate's test binaries).
///
/// # Panics
/// When it has not been built: `cargo test --workspace` builds it.
pub fn ferrun_binary() -> PathBuf {
    workspace_binary("ferrun")
}

/// A binary of this workspace's build (`ferrun`, `ferrun-operator`, `ferrun-train`), next to
/// this crate's test binaries.
///
/// # Panics
/// When it has not been built: `cargo test --workspace` builds every member's binaries.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the suite with `cargo test --workspace` (or build it first)",
        path.display()
    );
    path
}

/// Waits for `child` (stdout and stderr piped) at most `limit`, then kills it.
///
/// # Panics
/// When it runs past `limit`: a hang is a failure, named as one.
pub fn output_within(
    child: std::process::Child,
    limit: std::time::Duration,
) -> std::process::Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(limit) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("{pid} did not finish within {limit:?}");
    };
    out.expect("output")
}

/// The virtualenv with torch 2.13.0 that `scripts/setup-python.sh` installs (`FERRUN_VENV`,
/// or its default place).
///
/// # Panics
/// When torch 2.13.0 is not there, saying how to install it.
pub fn venv() -> PathBuf {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let venv = std::env::var_os("FERRUN_VENV").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/ferrun/venv-torch-2.13.0")
        });
        let ok = Command::new(venv.join("bin/python"))
            .args(["-c", "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "torch 2.13.0 is not installed in {}: run `scripts/test.sh` (it installs it), or set FERRUN_VENV",
            venv.display()
        );
        venv
    })
    .clone()
}
