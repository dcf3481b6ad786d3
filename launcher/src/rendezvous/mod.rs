//! How the nodes of a job come together.
//!
//! - [`agent_store`]: static multi-node rendezvous over the agent store, and the agents'
//!   coordination per attempt (barrier, failure propagation, exit barrier).
//! - [`elastic`]: one agent's side of the elastic rendezvous: hosting, its address, its id.
//! - [`etcd`]: the same rounds kept in etcd v3 (`--rdzv-backend etcd`).
//! - [`member`]: one node's membership, whichever backend keeps the rounds.
//! - [`round`]: the elastic rendezvous as a pure state machine (`--nnodes MIN:MAX`): rounds,
//!   joins, heartbeats, ranks; no I/O, time passed in.
//! - [`store_bind`]: where the agent store listens.
//! - [`netif`]: the network interface that reaches the master (for Gloo and NCCL).

pub mod agent_store;
pub mod elastic;
pub mod etcd;
pub mod member;
pub mod netif;
pub mod round;
pub mod service;
pub mod store_bind;
