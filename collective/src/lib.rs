//! ferrun's communication layer.
//!
//! # Layout
//! - [`env`]: the worker environment contract (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
//!   `TORCHELASTIC_*`, …) that the launcher writes and every worker reads, written down once
//!   as a typed struct.
//! - [`store`]: the agent store, wire-compatible with torch's TCPStore.
//! - [`reduce`]: element types (f32, f64, f16, bf16, i32, i64, u8) and reductions (sum, prod,
//!   min, max, avg), commutative to the bit.
//! - [`schedule`]: pure communication schedules (ring, recursive doubling, binomial trees,
//!   pairwise, dissemination), tested without sockets.
//! - [`transport`]: how bytes move between two ranks; [`transport::mem`] runs ranks as threads.
//! - [`comm`]: the communicator: every collective over any transport.
//! - [`zero`]: ZeRO stages 0–3 on flat buffers: sharded optimizers, mixed precision,
//!   checkpoints that re-shard.

pub mod comm;
pub mod env;
pub mod gpu;
mod net;
pub mod reduce;
pub mod schedule;
pub mod store;
pub mod transport;
pub mod zero;

pub use env::{EnvError, WorkerEnv};
