//! ferrun's communication layer.
//!
//! # Layout
//! - [`store`]: the agent store, wire-compatible with torch's TCPStore.
//! - [`env`]: the worker environment contract (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//!   `TORCHELASTIC_*`, …) that the launcher writes and every worker reads, written down once
//!   as a typed struct.
//!
//! The store, the communicator and the collective algorithms build on this contract.

pub mod env;
pub mod reduce;
pub mod schedule;
pub mod store;

pub use env::{EnvError, WorkerEnv};
