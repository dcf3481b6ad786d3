//! The communicator: collectives over any [`Transport`], driven by the pure [`schedule`]s.
//!
//! # Guarantees
//! - Every rank ends an all-reduce, all-gather or broadcast with bitwise-identical buffers:
//!   each chunk is reduced along one fixed order and then copied, and every combination is
//!   commutative to the bit ([`crate::reduce`]).
//! - Any world size, any element count (zero included).
//! - No wait is unbounded: each receive has the communicator's deadline, and a peer that
//!   sends nothing in time is named in the error.
//!
//! # Caveats
//! All ranks must call the same collectives in the same order (as with Gloo and NCCL).
//!
//! [`schedule`]: crate::schedule

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::reduce::{bytes_of, bytes_of_mut, combine_into, finish, Element, ReduceOp};
use crate::schedule::{self, DoublingStep};
use crate::transport::{Envelope, Fold, Transport};

pub use failure::Failure;
pub use label::{Call, Kind, Label};

use failure::admits;
pub use witness::{LocalWitness, Witness};

/// A collective that failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommError {
    /// The ranks could not complete the collective; the communicator must be rebuilt.
    #[error("{op} on rank {rank}: {source}; this communicator must be rebuilt")]
    Transport {
        /// The collective.
        op: &'static str,
        /// This rank.
        rank: usize,
        /// What failed, naming the peer.
        source: Failure,
    },
    /// The arguments cannot work (caught before anything is sent).
    #[error("{op}: {what}")]
    Invalid {
        /// The collective.
        op: &'static str,
        /// What is wrong and what is expected.
        what: String,
    },
}

/// Tuning of a communicator.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// How long any receive may wait for its peer.
    pub deadline: Duration,
    /// All-reduces of at most this many bytes use recursive doubling (fewer steps); larger
    /// ones use the ring (less data per rank).
    pub small_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            deadline: Duration::from_secs(600),
            // Measured here (2 cores, shm): doubling beats the ring up to ~256 KiB with 4 ranks
            // and ~512 KiB with 2 (FERRUN_SMALL_BYTES=0 against a huge value, same sizes).
            small_bytes: 256 * 1024,
        }
    }
}

/// A group of ranks that run collectives together.
///
/// Ranks in errors are the transport's (the job's) ranks, also in sub-communicators.
#[derive(Debug)]
pub struct Communicator<T: Transport> {
    /// Shared with the sub-communicators split from this one.
    transport: Arc<T>,
    /// `members[i]`: the transport rank of this communicator's rank `i`.
    members: Arc<[usize]>,
    rank: usize,
    /// Tags of this communicator's messages carry it, apart from its parent's and siblings'.
    id: u32,
    options: Options,
    sequence: AtomicU64,
    splits: AtomicU64,
    /// Where the ranks sit, when large all-reduces go by hosts.
    hosts: Option<Hosts>,
    /// Where the ranks agree on the first failure (the job's store), when there is one.
    witness: Option<Arc<dyn Witness>>,
}

impl<T: Transport> Communicator<T> {
    /// A communicator of every rank of `transport`.
    pub fn new(transport: T, options: Options) -> Self {
        let (rank, size) = (transport.rank(), transport.size());
        let members: Arc<[usize]> = (0..size).collect();
        Self {
            hosts: Hosts::find(&members, rank, |r| transport.host_of(r)),
            transport: Arc::new(transport),
            members,
            rank,
            id: 0,
            options,
            sequence: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            witness: None,
        }
    }

    /// The same communicator, agreeing with its peers on the first failure through `witness`:
    /// a rank whose link breaks because a neighbour gave up then names the rank that the
    /// first to notice found gone, not the neighbour.
    #[must_use]
    pub fn with_witness(mut self, witness: Arc<dyn Witness>) -> Self {
        self.witness = Some(witness);
        self
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The transport underneath.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The next collective's label: all ranks count their collectives alike, and each
    /// message says what was called, so that peers that disagree are told so.
    fn next_label<E: Element>(
        &self,
        kind: Kind,
        count: usize,
        reduce: Option<ReduceOp>,
        root: Option<usize>,
    ) -> Label {
        let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
        let dtype = (kind != Kind::Barrier).then_some(E::DTYPE);
        let call = Call {
            kind,
            dtype,
            reduce,
            root: root.map(|r| r as u32),
            count: count as u64,
        };
        Label::collective(self.id, seq, call)
    }

    /// Moves bytes with peers named by this communicator's ranks.
    fn exchange(
        &self,
        op: &'static str,
        tag: Label,
        send: Option<(usize, &[u8])>,
        recv: Option<(usize, &mut [u8])>,
    ) -> Result<(), CommError> {
        let send = send.map(|(p, b)| (self.members[p], b));
        let recv = recv.map(|(p, b)| (self.members[p], b));
        let screen = |theirs: &Envelope| admits(&tag, theirs);
        let moved =
            self.transport
                .exchange(&tag.envelope(), &screen, send, recv, self.options.deadline);
        self.failed(op, tag, moved)
    }

    /// As [`Communicator::exchange`], combining what arrives into `recv`'s fold.
    fn exchange_fold(
        &self,
        op: &'static str,
        tag: Label,
        send: Option<(usize, &[u8])>,
        recv: Fold<'_>,
    ) -> Result<(), CommError> {
        let send = send.map(|(p, b)| (self.members[p], b));
        let recv = Fold {
            peer: self.members[recv.peer],
            ..recv
        };
        let screen = |theirs: &Envelope| admits(&tag, theirs);
        let moved = self.transport.exchange_fold(
            &tag.envelope(),
            &screen,
            send,
            Some(recv),
            self.options.deadline,
        );
        self.failed(op, tag, moved)
    }

    fn check_root(&self, op: &'static str, root: usize) -> Result<(), CommError> {
        if root < self.size() {
            Ok(())
        } else {
            Err(CommError::Invalid {
                op,
                what: format!(
                    "root {root} is not a rank of this {}-rank communicator",
                    self.size()
                ),
            })
        }
    }

    /// Reduces `buf` across all ranks, in place; every rank gets the result.
    ///
    /// # Errors
    /// [`CommError::Transport`] naming the peer that failed.
    pub fn all_reduce<E: Element>(&self, buf: &mut [E], op: ReduceOp) -> Result<(), CommError> {
        let tag = self.next_label::<E>(Kind::AllReduce, buf.len(), Some(op), None);
        let n = self.size();
        if n > 1 {
            if std::mem::size_of_val(buf) <= self.options.small_bytes {
                self.doubling_all_reduce(tag, buf, op)?;
            } else {
                self.ring_all_reduce(tag, buf, op)?;
            }
        }
        finish(op, buf, n);
        Ok(())
    }

    fn doubling_all_reduce<E: Element>(
        &self,
        tag: Label,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        const OP: &str = "all_reduce";
        let mut incoming = vec![E::ZERO; buf.len()];
        for step in schedule::recursive_doubling(self.rank(), self.size()) {
            match step {
                DoublingStep::Send(p) | DoublingStep::SendResult(p) => {
                    self.exchange(OP, tag, Some((p, bytes_of(buf))), None)?
                }
                DoublingStep::RecvCombine(p) => {
                    self.exchange(OP, tag, None, Some((p, bytes_of_mut(&mut incoming))))?;
                    combine_into(op, buf, &incoming);
                }
                DoublingStep::Exchange(p) => {
                    self.exchange(
                        OP,
                        tag,
                        Some((p, bytes_of(buf))),
                        Some((p, bytes_of_mut(&mut incoming))),
                    )?;
                    combine_into(op, buf, &incoming);
                }
                DoublingStep::RecvResult(p) => {
                    self.exchange(OP, tag, None, Some((p, bytes_of_mut(buf))))?
                }
            }
        }
        Ok(())
    }

    /// Copies `root`'s `buf` to every rank.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for a root out of range; [`CommError::Transport`] naming a peer.
    pub fn broadcast<E: Element>(&self, buf: &mut [E], root: usize) -> Result<(), CommError> {
        const OP: &str = "broadcast";
        self.check_root(OP, root)?;
        let tag = self.next_label::<E>(Kind::Broadcast, buf.len(), None, Some(root));
        let (parent, children) = schedule::broadcast_tree(self.rank(), self.size(), root);
        if let Some(p) = parent {
            self.exchange(OP, tag, None, Some((p, bytes_of_mut(buf))))?;
        }
        for c in children {
            self.exchange(OP, tag, Some((c, bytes_of(buf))), None)?;
        }
        Ok(())
    }

    /// Reduces every rank's `buf` into `root`'s; the other ranks' buffers are left as they were.
    ///
    /// # Errors
    /// As [`Communicator::broadcast`].
    pub fn reduce<E: Element>(
        &self,
        buf: &mut [E],
        op: ReduceOp,
        root: usize,
    ) -> Result<(), CommError> {
        const OP: &str = "reduce";
        self.check_root(OP, root)?;
        let tag = self.next_label::<E>(Kind::Reduce, buf.len(), Some(op), Some(root));
        let (children, parent) = schedule::reduce_tree(self.rank(), self.size(), root);
        let mut acc = buf.to_vec();
        let mut incoming = vec![E::ZERO; buf.len()];
        for c in children {
            self.exchange(OP, tag, None, Some((c, bytes_of_mut(&mut incoming))))?;
            combine_into(op, &mut acc, &incoming);
        }
        match parent {
            Some(p) => self.exchange(OP, tag, Some((p, bytes_of(&acc))), None)?,
            None => {
                finish(op, &mut acc, self.size());
                buf.copy_from_slice(&acc);
            }
        }
        Ok(())
    }

    /// Gathers every rank's `input` into `output` (rank order); `output` is `size × input` long.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for mismatched lengths; [`CommError::Transport`] naming a peer.
    pub fn all_gather<E: Element>(&self, input: &[E], output: &mut [E]) -> Result<(), CommError> {
        let (n, m) = (self.size(), input.len());
        if output.len() != n * m {
            return Err(CommError::Invalid {
                op: "all_gather",
                what: format!(
                    "output holds {} elements; it must hold size × input = {n} × {m}",
                    output.len()
                ),
            });
        }
        output[self.rank() * m..(self.rank() + 1) * m].copy_from_slice(input);
        self.all_gather_in_place(output)
    }

    /// [`Communicator::all_gather`] without a copy: `buf` holds `size` equal blocks, this rank's
    /// already in place at block `rank`; on return every block is its rank's. Matches
    /// `all_gather` calls on other ranks.
    ///
    /// # Errors
    /// [`CommError::Invalid`] unless `buf` holds a multiple of `size` elements;
    /// [`CommError::Transport`] naming a peer.
    pub fn all_gather_in_place<E: Element>(&self, buf: &mut [E]) -> Result<(), CommError> {
        let n = self.size();
        if buf.len() % n != 0 {
            return Err(CommError::Invalid {
                op: "all_gather",
                what: format!("{} elements do not split into {n} equal blocks", buf.len()),
            });
        }
        let tag = self.next_label::<E>(Kind::AllGather, buf.len() / n, None, None);
        self.flat_ring(|ring| self.ring_all_gather("all_gather", tag, ring, buf))
    }

    /// Reduces `input` (`size` equal blocks) across ranks; rank `r` gets block `r` in `output`.
    ///
    /// # Errors
    /// As [`Communicator::all_gather`].
    pub fn reduce_scatter<E: Element>(
        &self,
        input: &[E],
        output: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let (n, m) = (self.size(), output.len());
        if input.len() != n * m {
            return Err(CommError::Invalid {
                op: "reduce_scatter",
                what: format!(
                    "input holds {} elements; it must hold size × output = {n} × {m}",
                    input.len()
                ),
            });
        }
        let mut acc = input.to_vec();
        self.reduce_scatter_in_place(&mut acc, op)?;
        output.copy_from_slice(&acc[self.rank() * m..(self.rank() + 1) * m]);
        Ok(())
    }

    /// [`Communicator::reduce_scatter`] without a copy: `buf` holds `size` equal blocks; block
    /// `rank` ends reduced, the others hold partial reductions. Matches `reduce_scatter` calls
    /// on other ranks.
    ///
    /// # Errors
    /// [`CommError::Invalid`] unless `buf` holds a multiple of `size` elements;
    /// [`CommError::Transport`] naming a peer.
    pub fn reduce_scatter_in_place<E: Element>(
        &self,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let n = self.size();
        if buf.len() % n != 0 {
            return Err(CommError::Invalid {
                op: "reduce_scatter",
                what: format!("{} elements do not split into {n} equal blocks", buf.len()),
            });
        }
        let m = buf.len() / n;
        let tag = self.next_label::<E>(Kind::ReduceScatter, m, Some(op), None);
        self.flat_ring(|ring| self.ring_reduce_scatter(tag, ring, buf, op))?;
        finish(op, &mut buf[self.rank() * m..(self.rank() + 1) * m], n);
        Ok(())
    }

    /// Block `j` of this rank's `input` goes to rank `j`; block `i` of `output` comes from rank `i`.
    ///
    /// # Errors
    /// [`CommError::Invalid`] unless both hold the same multiple of `size` elements.
    pub fn all_to_all<E: Element>(&self, input: &[E], output: &mut [E]) -> Result<(), CommError> {
        const OP: &str = "all_to_all";
        let n = self.size();
        if input.len() != output.len() || input.len() % n != 0 {
            return Err(CommError::Invalid {
                op: OP,
                what: format!(
                    "input ({}) and output ({}) must hold the same multiple of {n} elements",
                    input.len(),
                    output.len()
                ),
            });
        }
        let (m, r) = (input.len() / n, self.rank());
        let tag = self.next_label::<E>(Kind::AllToAll, input.len(), None, None);
        output[r * m..(r + 1) * m].copy_from_slice(&input[r * m..(r + 1) * m]);
        for (to, from) in schedule::pairwise(r, n) {
            let sent = bytes_of(&input[to * m..(to + 1) * m]);
            let received = bytes_of_mut(&mut output[from * m..(from + 1) * m]);
            self.exchange(OP, tag, Some((to, sent)), Some((from, received)))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    ///
    /// # Errors
    /// [`CommError::Transport`] naming a rank that did not arrive in time.
    pub fn barrier(&self) -> Result<(), CommError> {
        let tag = self.next_label::<u8>(Kind::Barrier, 0, None, None);
        for (to, from) in schedule::dissemination(self.rank(), self.size()) {
            self.exchange("barrier", tag, Some((to, &[])), Some((from, &mut [])))?;
        }
        Ok(())
    }

    /// Sends `buf` to `peer` under a user `tag`.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for a peer that is this rank or out of range.
    pub fn send<E: Element>(&self, buf: &[E], peer: usize, tag: u32) -> Result<(), CommError> {
        self.check_peer("send", peer)?;
        self.exchange(
            "send",
            p2p_label::<E>(self.id, tag, buf.len()),
            Some((peer, bytes_of(buf))),
            None,
        )
    }

    /// Receives into `buf` what `peer` sent under `tag` (the sizes must agree).
    ///
    /// # Errors
    /// As [`Communicator::send`], and [`CommError::Transport`] on timeout or a size mismatch.
    pub fn recv<E: Element>(&self, buf: &mut [E], peer: usize, tag: u32) -> Result<(), CommError> {
        self.check_peer("recv", peer)?;
        self.exchange(
            "recv",
            p2p_label::<E>(self.id, tag, buf.len()),
            None,
            Some((peer, bytes_of_mut(buf))),
        )
    }

    fn check_peer(&self, op: &'static str, peer: usize) -> Result<(), CommError> {
        if peer < self.size() && peer != self.rank() {
            Ok(())
        } else {
            Err(CommError::Invalid {
                op,
                what: format!(
                    "peer {peer} must be another rank of this {}-rank communicator",
                    self.size()
                ),
            })
        }
    }
}

mod bootstrap;
mod failure;
mod label;
mod overlap;
mod personalized;
mod ring;
mod split;
mod witness;

use ring::Hosts;

#[cfg(feature = "nccl")]
pub(crate) use bootstrap::host_identity;
pub use bootstrap::{InitError, StoreWitness};
pub use overlap::{AsyncCommunicator, Handle};

/// The label of a user message on communicator `comm`: its tag, and what both sides must agree on.
fn p2p_label<E: Element>(comm: u32, tag: u32, count: usize) -> Label {
    let call = Call {
        kind: Kind::PointToPoint,
        dtype: Some(E::DTYPE),
        reduce: None,
        root: None,
        count: count as u64,
    };
    Label::user(comm, tag, call)
}

/// Ring chunks move in segments of this many bytes, so that a received segment is combined
/// while it is still in cache, and no step needs a chunk-sized scratch buffer.
const SEGMENT_BYTES: usize = 1 << 20;

#[cfg(test)]
mod tests;
