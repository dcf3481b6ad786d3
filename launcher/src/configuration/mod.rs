//! The command line, checked and resolved before any process starts.
//!
//! - [`cli`]: torchrun's flags (both spellings, `PET_*` defaults, the legacy `launch` form).
//! - [`config`]: flags checked and resolved into a [`config::LaunchConfig`].
//! - [`elastic_conf`]: `--nnodes MIN:MAX` with c10d resolved into an elastic rendezvous.
//! - [`flags`]: parsers for flag values (`--nnodes`, endpoints, `--rdzv-conf`, signals).
//! - [`entrypoint`]: the worker's command line (`python -u`, `-m`, `--no-python`, `--run-path`).
//! - [`serve`]: `ferrun rendezvous serve`'s flags.
//! - [`nproc`]: `--nproc-per-node` as an integer, `cpu`, `gpu` or `auto`.
//! - [`gpu_env`]: what GPU workers are told (pinned devices, NCCL variables), printed once.

pub mod cli;
pub mod config;
pub mod elastic_conf;
pub mod entrypoint;
pub mod flags;
pub mod gpu_env;
pub mod nproc;
pub mod serve;
