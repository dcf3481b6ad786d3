//! Transports: how bytes move between two ranks. The algorithms see only [`Transport`].
//!
//! - [`mem`]: ranks as threads of one process (the test harness, gloo's `spawn` pattern).
//! - [`tcp`]: one TCP connection per pair of ranks, bootstrapped through the store.
//! - [`shm`]: shared-memory rings between the ranks of one host.
//! - [`Auto`]: shared memory when every rank is on this host, TCP otherwise.

use std::time::Duration;

pub mod mem;
pub mod shm;
pub mod tcp;

/// A failure to move bytes, naming the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// Nothing arrived from the peer within the deadline.
    #[error(
        "rank {peer} sent nothing within {after:?} (dead, hung, or calling a different collective)"
    )]
    Timeout {
        /// The peer waited for.
        peer: usize,
        /// The deadline.
        after: Duration,
    },
    /// The peer's message has another size than the one expected.
    #[error("rank {peer} sent {got} bytes where {expected} were expected (the ranks passed different counts or dtypes)")]
    Size {
        /// The peer.
        peer: usize,
        /// Bytes expected.
        expected: usize,
        /// Bytes received.
        got: usize,
    },
    /// The link to the peer is gone.
    #[error("the link to rank {peer} is broken: {reason}")]
    Broken {
        /// The peer.
        peer: usize,
        /// Why.
        reason: String,
    },
}

/// Tagged point-to-point messages between the ranks of one communicator.
///
/// Messages between two ranks with the same tag arrive in the order they were sent.
pub trait Transport: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Sends `send` (if any) to its peer and receives from another peer into `recv` (if any),
    /// both at once, so that a ring step never waits on itself.
    ///
    /// # Errors
    /// [`TransportError`] naming the peer; the communicator must then be rebuilt.
    fn exchange(
        &self,
        tag: u64,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError>;
}

/// The transport a communicator picked: shared memory when all its ranks share a host (and
/// network namespace), TCP otherwise; `FERRUN_TRANSPORT=tcp|shm` forces one.
#[derive(Debug)]
pub enum Auto {
    /// Shared memory.
    Shm(shm::ShmTransport),
    /// TCP.
    Tcp(tcp::TcpTransport),
}

impl Auto {
    /// `"shm"` or `"tcp"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Shm(_) => "shm",
            Self::Tcp(_) => "tcp",
        }
    }
}

impl Transport for Auto {
    fn rank(&self) -> usize {
        match self {
            Self::Shm(t) => t.rank(),
            Self::Tcp(t) => t.rank(),
        }
    }

    fn size(&self) -> usize {
        match self {
            Self::Shm(t) => t.size(),
            Self::Tcp(t) => t.size(),
        }
    }

    fn exchange(
        &self,
        tag: u64,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match self {
            Self::Shm(t) => t.exchange(tag, send, recv, deadline),
            Self::Tcp(t) => t.exchange(tag, send, recv, deadline),
        }
    }
}
