//! Transports: how bytes move between two ranks. The algorithms see only [`Transport`].
//!
//! - [`mem`]: ranks as threads of one process (the test harness, gloo's `spawn` pattern).
//! - [`tcp`]: one TCP connection per pair of ranks, bootstrapped through the store.
//! - [`shm`]: shared-memory rings between the ranks of one host.
//! - [`mixed`]: shared memory to this host's ranks, TCP to the others.
//! - [`Auto`]: whichever of these fits where the ranks are.

use std::time::Duration;

pub mod label;
pub mod mem;
pub mod mixed;
pub mod shm;
pub mod tcp;

pub use label::{Call, Kind, Label};

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
    /// The peer called another collective than this rank at this point.
    #[error("rank {peer} called {theirs} as its collective #{their_seq} where this rank called {ours} as #{seq}: every rank must call the same collectives in the same order, with the same dtype, count, reduction and root")]
    Mismatch {
        /// The peer.
        peer: usize,
        /// This rank's collective number.
        seq: u64,
        /// What this rank called.
        ours: Call,
        /// The peer's collective number.
        their_seq: u64,
        /// What the peer called.
        theirs: Call,
    },
    /// The peer gave up on the collective because the ranks disagree.
    #[error("rank {peer} gave up on its {call}: it found that the ranks called different collectives (its error names them)")]
    Aborted {
        /// The peer.
        peer: usize,
        /// What the peer was calling.
        call: Call,
    },
    /// Another rank lost its link to a rank, which is presumably gone.
    #[error("rank {lost} is gone: rank {peer} lost its link to it during its {call}")]
    PeerLost {
        /// The rank that reported it.
        peer: usize,
        /// The rank that is gone.
        lost: usize,
        /// What the reporter was calling.
        call: Call,
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
    /// The same error with its peer renamed through `map` (an index into a group → a job rank).
    pub(crate) fn with_peer_map(self, map: &[usize]) -> Self {
        let g = |p: usize| map.get(p).copied().unwrap_or(p);
        match self {
            Self::Timeout { peer, after } => Self::Timeout {
                peer: g(peer),
                after,
            },
            Self::Size {
                peer,
                expected,
                got,
            } => Self::Size {
                peer: g(peer),
                expected,
                got,
            },
            Self::Mismatch {
                peer,
                seq,
                ours,
                their_seq,
                theirs,
            } => Self::Mismatch {
                peer: g(peer),
                seq,
                ours,
                their_seq,
                theirs,
            },
            Self::Aborted { peer, call } => Self::Aborted {
                peer: g(peer),
                call,
            },
            Self::PeerLost { peer, lost, call } => Self::PeerLost {
                peer: g(peer),
                lost,
                call,
            },
            Self::Broken { peer, reason } => Self::Broken {
                peer: g(peer),
                reason,
            },
        }
    }
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
    /// Sends `send` (if any) to its peer and receives from another peer into `recv` (if any),
    /// both at once, so that a ring step never waits on itself.
    ///
    /// # Errors
    /// [`TransportError`] naming the peer; the communicator must then be rebuilt.
    fn exchange(
        &self,
        label: Label,
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
        label: Label,
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
                self.exchange(label, send, Some((peer, &mut *scratch)), deadline)?;
                fold(scratch);
                Ok(())
            }
            None => self.exchange(label, send, None, deadline),
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

/// The transport a communicator picked: shared memory when all its ranks share a host (and
/// network namespace), shared memory within hosts and TCP across them when a host holds several
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
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match self {
            Self::Shm(t) => t.exchange(label, send, recv, deadline),
            Self::Tcp(t) => t.exchange(label, send, recv, deadline),
            Self::Mixed(t) => t.exchange(label, send, recv, deadline),
        }
    }

    fn exchange_fold(
        &self,
        label: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<Fold<'_>>,
        deadline: Duration,
    ) -> Result<(), TransportError> {
        match self {
            Self::Shm(t) => t.exchange_fold(label, send, recv, deadline),
            Self::Tcp(t) => t.exchange_fold(label, send, recv, deadline),
            Self::Mixed(t) => t.exchange_fold(label, send, recv, deadline),
        }
    }
}

/// How a frame that arrived relates to the one awaited.
#[derive(Debug)]
pub(crate) enum Arrival {
    /// It is the awaited message.
    Awaited,
    /// It belongs to another tag: keep it for its own receive.
    Other,
}

/// Classifies a frame from `peer` labelled `theirs` for a receive awaiting `ours`.
///
/// # Errors
/// [`TransportError::Mismatch`] when the same collective number carries another call, or when
/// the peer is already at a later collective (messages between two ranks keep their order, so
/// it will never send the awaited one).
pub(crate) fn classify(
    peer: usize,
    ours: &Label,
    theirs: &Label,
) -> Result<Arrival, TransportError> {
    let same_comm = theirs.comm() == ours.comm();
    if let (Some(lost), true) = (theirs.lost_rank(), same_comm) {
        return Err(TransportError::PeerLost {
            peer,
            lost,
            call: theirs.call,
        });
    }
    if theirs.is_abort() && same_comm {
        return Err(TransportError::Aborted {
            peer,
            call: theirs.call,
        });
    }
    let mismatch = || TransportError::Mismatch {
        peer,
        seq: ours.seq(),
        ours: ours.call,
        their_seq: theirs.seq(),
        theirs: theirs.call,
    };
    if theirs.tag == ours.tag {
        return if theirs.call == ours.call {
            Ok(Arrival::Awaited)
        } else {
            Err(mismatch())
        };
    }
    if ours.is_collective() && theirs.is_collective() && same_comm && theirs.seq() > ours.seq() {
        return Err(mismatch());
    }
    Ok(Arrival::Other)
}
