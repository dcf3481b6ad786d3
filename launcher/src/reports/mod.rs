//! What people and tools read about a run.
//!
//! - [`exit`]: how a process ended, in words.
//! - [`report`]: the failure report (root cause first) and the summary table.
//! - [`error_file`]: torchrun's `TORCHELASTIC_ERROR_FILE` JSON.
//! - [`logs`]: `--redirects`, `--tee`, `--log-dir` and torchrun's log layout.
//! - [`output`]: worker output, line by line, prefixed, to console and files.

pub mod error_file;
pub mod exit;
pub mod logs;
pub mod output;
pub mod report;
