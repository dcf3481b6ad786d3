//! Transports: how bytes move between two ranks. The algorithms see only [`Transport`].
//!
//! - [`mem`]: ranks as threads of one process (the test harness, gloo's `spawn` pattern).
//! - [`tcp`]: one TCP connection per pair of ranks, bootstrapped through the store.
//! - [`shm`]: shared-memory rings between the ranks of one host.
//! - [`mixed`]: shared memory to this host's ranks, TCP to the others.
//! - [`Auto`]: whichever of these fits where the ranks are.
//! - [`frame`]: frames on a byte stream, read in one place for TCP and shared memory.
//!
//! Transports carry opaque tags: a message is its [`Envelope`] and its bytes, a receive awaits
//! one tag and judges every header with the caller's [`Screen`] (as gloo's pairs know nothing
//! of collectives). What a tag means — which collective, which call — is the communicator's.

use std::time::Duration;

pub mod frame;
pub mod mem;
pub mod mixed;
pub mod shm;
pub mod tcp;

pub use frame::{Envelope, Screen};

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
        /// Bytes the peer declared.
        got: u64,
    },
    /// The receive's screen refused a header from the peer (the layer above says why).
    #[error("rank {peer} sent a message this receive refuses (tag {:#x})", envelope.tag)]
    Refused {
        /// The peer.
        peer: usize,
        /// The refused header.
        envelope: Envelope,
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

impl TransportError {
    /// The peer the error names.
    pub fn peer(&self) -> usize {
        match self {
            Self::Timeout { peer, .. }
            | Self::Size { peer, .. }
            | Self::Refused { peer, .. }
            | Self::Broken { peer, .. } => *peer,
        }
    }

    /// The same error with its peer renamed through `map` (an index into a group → a job rank).
    pub(crate) fn with_peer_map(mut self, map: &[usize]) -> Self {
        let renamed = map.get(self.peer()).copied();
        debug_assert!(renamed.is_some(), "peer {} outside the group", self.peer());
        if let Some(job_rank) = renamed {
            match &mut self {
                Self::Timeout { peer, .. }
                | Self::Size { peer, .. }
                | Self::Refused { peer, .. }
                | Self::Broken { peer, .. } => *peer = job_rank,
            }
        }
        self
    }
}

/// 16 random bytes from the kernel (a secret published in the store, a socket name).
pub(crate) fn random_secret() -> std::io::Result<[u8; 16]> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// Tagged point-to-point messages between the ranks of one communicator.
///
/// Messages between two ranks with the same tag arrive in the order they were sent.
pub trait Transport: Send + Sync {
    /// This rank.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// The host `rank` runs on, as a number: ranks on one host share memory. Unless a
    /// transport knows better, every rank is a host of its own.
    fn host_of(&self, rank: usize) -> usize {
        rank
    }
    /// Sends `send` (if any) to its peer under `envelope` and receives from another peer into
    /// `recv` (if any) the message with `envelope`'s tag, both at once, so that a ring step
    /// never waits on itself. Every header that arrives from the receive's peer meanwhile is
    /// judged by `screen`; admitted ones with other tags are kept for their own receive.
    ///
    /// # Errors
    /// [`TransportError`] naming the peer; the communicator must then be rebuilt.
    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError>;

    /// As [`Transport::exchange`], but what arrives is handed to `fold` piece by piece, in
    /// order, instead of landing in a buffer: a reduction combines straight from the
    /// transport's memory where it can (shared memory), saving a copy. `scratch` has the
    /// expected length; transports that cannot hand out their memory receive into it first.
    ///
    /// # Errors
    /// As [`Transport::exchange`].
    fn exchange_fold(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match recv {
            Some(Fold {
                peer,
                scratch,
                fold,
            }) => {
                self.exchange(
                    envelope,
                    screen,
                    send,
                    Some((peer, &mut *scratch)),
                    deadline,
                )?;
                fold(scratch);
                Ok(())
            }
            None => self.exchange(envelope, screen, send, None, deadline),
        }
    }
}

/// The receive side of [`Transport::exchange_fold`].
pub struct Fold<'a> {
    /// The sender.
    pub peer: usize,
    /// As long as the message expected; the bytes land here where they cannot be folded in place.
    pub scratch: &'a mut [u8],
    /// Takes the message's bytes, in order, in pieces cut anywhere.
    pub fold: &'a mut dyn FnMut(&[u8]),
}

impl std::fmt::Debug for Fold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fold")
            .field("peer", &self.peer)
            .field("len", &self.scratch.len())
            .finish_non_exhaustive()
    }
}

/// The transport a communicator picked: shared memory when all its ranks share a host (kernel,
/// network namespace and user), shared memory within hosts and TCP across them when a host holds several
/// ranks, TCP otherwise; `FERRUN_TRANSPORT=tcp|shm` forces one.
#[derive(Debug)]
pub enum Auto {
    /// Shared memory.
    Shm(shm::ShmTransport),
    /// TCP.
    Tcp(tcp::TcpTransport),
    /// Shared memory within this host, TCP across hosts.
    Mixed(mixed::Mixed),
}

impl Auto {
    /// `"shm"` or `"tcp"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Shm(_) => "shm",
            Self::Tcp(_) => "tcp",
            Self::Mixed(_) => "shm+tcp",
        }
    }
}

impl Transport for Auto {
    fn rank(&self) -> usize {
        match self {
            Self::Shm(t) => t.rank(),
            Self::Tcp(t) => t.rank(),
            Self::Mixed(t) => t.rank(),
        }
    }

    fn size(&self) -> usize {
        match self {
            Self::Shm(t) => t.size(),
            Self::Tcp(t) => t.size(),
            Self::Mixed(t) => t.size(),
        }
    }

    fn host_of(&self, rank: usize) -> usize {
        match self {
            Self::Shm(t) => t.host_of(rank),
            Self::Tcp(t) => t.host_of(rank),
            Self::Mixed(t) => t.host_of(rank),
        }
    }

    fn exchange(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match self {
            Self::Shm(t) => t.exchange(envelope, screen, send, recv, deadline),
            Self::Tcp(t) => t.exchange(envelope, screen, send, recv, deadline),
            Self::Mixed(t) => t.exchange(envelope, screen, send, recv, deadline),
        }
    }

    fn exchange_fold(
        &self,
        envelope: &Envelope,
        screen: Screen<'_>,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match self {
            Self::Shm(t) => t.exchange_fold(envelope, screen, send, recv, deadline),
            Self::Tcp(t) => t.exchange_fold(envelope, screen, send, recv, deadline),
            Self::Mixed(t) => t.exchange_fold(envelope, screen, send, recv, deadline),
        }
    }
}
