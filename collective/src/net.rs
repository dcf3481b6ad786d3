//! Listening sockets sized for a job's bursts.
//!
//! Every worker of a job connects to the store at once, and every rank to rank 0's transport
//! listener: thousands of SYNs in a millisecond. Rust's standard listener asks for a backlog of
//! 128; past it the kernel drops SYNs and each dropped client retries after a second (then
//! three, …) — 3.5 s for 4,096 clients to connect to the store, measured here, against 0.25 s
//! for torch's server. So listeners ask for the largest backlog the system allows
//! (`net.core.somaxconn`, 4,096 on current kernels).

use std::net::TcpListener;

use nix::sys::socket::{listen, Backlog};

/// Re-listens `listener` with the system's largest backlog (Linux applies a new backlog to a
/// listening socket at once); on failure it keeps the one it had.
pub(crate) fn deepen_backlog(listener: &TcpListener) {
    if let Err(e) = listen(listener, Backlog::MAXALLOWABLE) {
        tracing::debug!("kept the default listen backlog: {e}");
    }
}
