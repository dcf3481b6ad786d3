//! `ferrun`, a drop-in replacement for `torchrun`.
//!
//! It takes torchrun's command line, hands every worker torchrun's environment contract
//! ([`ferrun_collective::WorkerEnv`]), supervises the workers as a group, restarts the group on
//! failure, and reports the root cause.
//!
//! # Layout
//! Four parts; the arrows are the only imports between them, so there are no cycles
//! (`tests/layout.rs` checks it):
//!
//! ```text
//! supervision ──► configuration ──► rendezvous
//!      │                │
//!      └───────────────►└──────────► reports
//! ```
//!
//! - [`configuration`]: torchrun's command line checked and resolved into a
//!   [`configuration::config::LaunchConfig`]; every user error is found there, before a
//!   process starts.
//! - [`rendezvous`]: how the nodes come together: the static rendezvous over the agent store,
//!   the elastic round state machine, where the store listens, which interface reaches the
//!   master.
//! - [`supervision`]: the agent loop and its pure decision, the worker group, one worker, and
//!   what keeps no process alive past the launcher.
//! - [`reports`]: what people and tools read: the failure report and summary table, torchrun's
//!   error file, log layout and worker output.

pub mod configuration;
pub mod rendezvous;
pub mod reports;
pub mod supervision;
