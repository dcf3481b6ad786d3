//! `ferrun`, a drop-in replacement for `torchrun`.
//!
//! It takes torchrun's command line, hands every worker torchrun's environment contract
//! ([`ferrun_collective::WorkerEnv`]), supervises the workers as a group, restarts the group on
//! failure, and reports the root cause.
//!
//! # Layout
//! - [`cli`]: torchrun's flags (both spellings, `PET_*` defaults, the legacy `launch` form).
//! - [`config`]: flags checked and resolved into a [`config::LaunchConfig`]; every user error
//!   is found here, before a process starts.
//! - [`flags`]: parsers for flag values (`--nnodes`, endpoints, `--rdzv-conf`, signals).
//! - [`entrypoint`]: the worker's command line (`python -u`, `-m`, `--no-python`, `--run-path`).
//! - [`nproc`]: `--nproc-per-node` as an integer, `cpu`, `gpu` or `auto`.
//! - [`worker`]: one worker process: its environment and its binding to the launcher's life.
//! - [`group`]: the workers of an attempt: exit events, stop with grace then SIGKILL.
//! - [`output`]: worker output, line by line, prefixed, to console and files.
//! - [`logs`]: `--redirects`, `--tee`, `--log-dir` and torchrun's log layout.
//! - [`error_file`]: torchrun's `TORCHELASTIC_ERROR_FILE` JSON.
//! - [`rendezvous`]: static multi-node rendezvous over the agent store, and the agents'
//!   coordination per attempt (barrier, failure propagation, exit barrier).
//! - [`netif`]: the network interface that reaches the master (for Gloo and NCCL).
//! - [`agent`]: the supervision loop: restarts and signals.
//! - [`report`]: the failure report and the summary table.

pub mod agent;
pub mod cli;
pub mod config;
pub mod descendants;
pub mod entrypoint;
pub mod error_file;
pub mod flags;
pub mod group;
pub mod keeper;
pub mod logs;
pub mod netif;
pub mod nproc;
pub mod output;
pub mod rendezvous;
pub mod report;
pub mod store_bind;
pub mod worker;
