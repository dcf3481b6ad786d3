//! Cross-crate end-to-end tests: flows that span crates, run as real processes.
//!
//! - `collective-worker` (a binary): a worker built on `ferrun_collective`, launched by
//!   `ferrun`, that joins the job's communicator through the agent store and checks every
//!   collective against a plain reference.
//! - [`netns`]: two hosts on one machine (network namespaces), for multi-host tests and the
//!   cross-host benchmark.
//!
//! The launcher's own end-to-end tests live in `launcher/tests/`, where cargo hands them the
//! `ferrun` binary.

use std::path::PathBuf;

pub mod netns;

/// The `ferrun` binary of this build (next to this crate's test binaries).
///
/// # Panics
/// When it has not been built: `cargo test --workspace` builds it.
pub fn ferrun_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let ferrun = dir.join("ferrun");
    assert!(ferrun.is_file(), "{} is missing: run the suite with `cargo test --workspace` (or build ferrun-launcher first)", ferrun.display());
    ferrun
}
