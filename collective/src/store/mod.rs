//! The agent store: a key/value store wire-compatible with torch's c10d `TCPStore`.
//!
//! Under torchrun the node-0 agent hosts a TCPStore and every worker connects to it
//! (`TORCHELASTIC_USE_AGENT_STORE=True`). ferrun's launcher hosts a [`StoreServer`]; torch
//! workers reach it with their own TCPStore client, and ferrun's agents and collectives with
//! [`StoreClient`].
//!
//! # Layout
//! - [`wire`]: opcodes and field encoding of torch 2.13's protocol.
//! - [`request`]: the server's request parser, without I/O (bounded, fuzzed).
//! - [`server`]: the server (its own thread; waits are wake-ups, not polls).
//! - [`client`]: the client, with `PrefixStore`-style namespacing.
//! - [`kv`]: what a communicator's bootstrap needs of any store (ferrun's client or torch's).

use std::net::SocketAddr;
use std::time::Duration;

pub mod client;
pub mod kv;
pub mod request;
pub mod server;
pub mod wire;

pub use client::StoreClient;
pub use kv::KeyValue;
pub use server::{Admission, Limits, StoreServer};

/// What went wrong with the store, naming the address involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process listens on the port.
    #[error("cannot host the store on {addr}: the port is already in use (another job or torchrun on this host?); choose another --master-port, or find the owner with `ss -ltnp 'sport = :{}'`", addr.port())]
    AddrInUse {
        /// The address asked for.
        addr: SocketAddr,
    },
    /// The address cannot be bound for another reason.
    #[error("cannot host the store on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// No store answered at the address within the timeout.
    #[error("cannot reach the store at {addr} within {timeout:?}: {reason}; check that the master address and port are right and that node 0 is running")]
    Connect {
        /// `host:port`.
        addr: String,
        /// How long connecting was tried.
        timeout: Duration,
        /// The last reason (e.g. connection refused, no route to host).
        reason: String,
    },
    /// The store did not answer in time.
    #[error("store at {addr}: timed out after {after:?} {what}")]
    Timeout {
        /// `host:port`.
        addr: String,
        /// What was being waited for.
        what: String,
        /// The timeout.
        after: Duration,
    },
    /// The connection broke.
    #[error("store at {addr}: connection lost: {source}")]
    Io {
        /// `host:port`.
        addr: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A store of another kind (torch's, through the torch backend) failed.
    #[error("{store}: {what}")]
    Foreign {
        /// Which store.
        store: String,
        /// What it said.
        what: String,
    },
    /// The peer does not speak the protocol.
    #[error("store at {addr}: unexpected answer: {what}")]
    Protocol {
        /// `host:port`.
        addr: String,
        /// What was wrong.
        what: String,
    },
}

#[cfg(test)]
mod tests;
