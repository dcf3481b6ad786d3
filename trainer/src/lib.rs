//! ferrun's data-parallel trainer for tch-rs (libtorch) models.
//!
//! Not built yet: until it is, the main job (`scripts/train-example.sh`) trains with a Python
//! torch DDP script under `ferrun`. The trainer will read its rank and world from
//! [`ferrun_collective::WorkerEnv`], the contract the launcher writes.

pub use ferrun_collective::WorkerEnv;
