//! Rings: reduce-scatter and all-gather around some of a communicator's ranks, and the large
//! all-reduce built from them — flat, or by hosts when the ranks sit on several hosts.
//!
//! By hosts (as NCCL's and Horovod's hierarchical all-reduce): the ranks of each host
//! reduce-scatter through shared memory, rank `j` of every host all-reduces chunk `j` with
//! its peers on the other hosts, then each host all-gathers. Between two hosts every byte
//! then crosses the network once each way, where a flat ring sends 2(n−1)/n of it through
//! each of its links, host boundaries included.
//!
//! Every message keeps the collective's own label, so ranks that called different
//! collectives are still told so (both calls named) rather than left waiting.

use std::ops::Range;

use super::label::Label;
use super::{CommError, Communicator, SEGMENT_BYTES};
use crate::reduce::{bytes_of, bytes_of_mut, ByteFold, Element, ReduceOp};
use crate::schedule;
use crate::transport::{Fold, Transport};

/// A ring over some of a communicator's ranks: `ranks` in ring order, this rank at `me`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ring<'a> {
    pub(super) ranks: &'a [usize],
    pub(super) me: usize,
}

/// Where a communicator's ranks sit, when they can all-reduce by hosts: two or more hosts,
/// each with the same number (two or more) of this communicator's ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hosts {
    /// This host's ranks, in rank order.
    local: Vec<usize>,
    /// The ranks with this rank's local index, one per host, in host order.
    across: Vec<usize>,
    /// This rank's place in `local`, and in `across`.
    in_local: usize,
    in_across: usize,
}

impl Hosts {
    /// The layout of `members` (transport ranks, by communicator rank) as `host_of` tells it,
    /// seen from communicator rank `me`; `None` when all-reducing by hosts does not apply.
    pub(super) fn find(
        members: &[usize],
        me: usize,
        host_of: impl Fn(usize) -> usize,
    ) -> Option<Self> {
        let mut hosts: Vec<(usize, Vec<usize>)> = Vec::new();
        for (rank, &member) in members.iter().enumerate() {
            let host = host_of(member);
            match hosts.iter_mut().find(|(h, _)| *h == host) {
                Some((_, ranks)) => ranks.push(rank),
                None => hosts.push((host, vec![rank])),
            }
        }
        let per_host = hosts.first()?.1.len();
        if hosts.len() < 2 || per_host < 2 || hosts.iter().any(|(_, r)| r.len() != per_host) {
            return None;
        }
        let local = hosts.iter().find(|(_, r)| r.contains(&me))?.1.clone();
        let index = local.iter().position(|&r| r == me)?;
        let across: Vec<usize> = hosts.iter().map(|(_, r)| r[index]).collect();
        let in_across = across.iter().position(|&r| r == me)?;
        Some(Self {
            local,
            across,
            in_local: index,
            in_across,
        })
    }

    fn local(&self) -> Ring<'_> {
        Ring {
            ranks: &self.local,
            me: self.in_local,
        }
    }

    fn across(&self) -> Ring<'_> {
        Ring {
            ranks: &self.across,
            me: self.in_across,
        }
    }
}

impl<T: Transport> Communicator<T> {
    /// Every rank of this communicator, in rank order, as a ring for `f`.
    pub(super) fn flat_ring<R>(&self, f: impl FnOnce(Ring<'_>) -> R) -> R {
        let everyone: Vec<usize> = (0..self.size()).collect();
        f(self.ring_of(&everyone))
    }

    /// `ranks` (this rank among them, in rank order) as a ring.
    fn ring_of<'a>(&self, ranks: &'a [usize]) -> Ring<'a> {
        Ring {
            ranks,
            me: self.rank,
        }
    }

    /// All-reduce by rings, slab by slab, so that a reduced chunk goes out again while it is
    /// still in cache: each byte then crosses memory once in and once out. Without the
    /// division of `Avg`.
    pub(super) fn ring_all_reduce<E: Element>(
        &self,
        tag: Label,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let segment = (SEGMENT_BYTES / std::mem::size_of::<E>()).max(1);
        let slab = self.size() * segment;
        let everyone: Vec<usize> = (0..self.size()).collect();
        let flat = self.ring_of(&everyone);
        for part in buf.chunks_mut(slab) {
            match &self.hosts {
                Some(hosts) => {
                    let (local, across) = (hosts.local(), hosts.across());
                    self.ring_reduce_scatter(tag, local, part, op)?;
                    let mine = schedule::chunk(part.len(), local.ranks.len(), local.me);
                    let chunk = &mut part[mine];
                    self.ring_reduce_scatter(tag, across, chunk, op)?;
                    self.ring_all_gather("all_reduce", tag, across, chunk)?;
                    self.ring_all_gather("all_reduce", tag, local, part)?;
                }
                None => {
                    self.ring_reduce_scatter(tag, flat, part, op)?;
                    self.ring_all_gather("all_reduce", tag, flat, part)?;
                }
            }
        }
        Ok(())
    }

    /// Ring reduce-scatter in place: afterwards chunk `ring.me` of `buf` is fully reduced over
    /// the ring.
    pub(super) fn ring_reduce_scatter<E: Element>(
        &self,
        tag: Label,
        ring: Ring<'_>,
        buf: &mut [E],
        op: ReduceOp,
    ) -> Result<(), CommError> {
        let (n, len) = (ring.ranks.len(), buf.len());
        let segment = (SEGMENT_BYTES / std::mem::size_of::<E>()).max(1);
        let mut incoming = vec![E::ZERO; schedule::chunk(len, n, 0).len().min(segment)];
        for step in schedule::ring_reduce_scatter(ring.me, n) {
            let send = schedule::chunk(len, n, step.send_chunk);
            let recv = schedule::chunk(len, n, step.recv_chunk);
            for (s, r) in segment_pairs(send, recv, segment) {
                let scratch = bytes_of_mut(&mut incoming[..r.len()]);
                // The chunk sent and the chunk received differ, so both views can stand together.
                let (sent, received) = split_pair(buf, s, r);
                let mut into = ByteFold::new(op, received);
                self.exchange_fold(
                    // The all-reduce's own name when it is a phase of one.
                    tag.call.kind.name(),
                    tag,
                    Some((ring.ranks[step.send_to], bytes_of(sent))),
                    Fold {
                        peer: ring.ranks[step.recv_from],
                        scratch,
                        fold: &mut |piece: &[u8]| into.feed(piece),
                    },
                )?;
            }
        }
        Ok(())
    }

    /// Ring all-gather in place: chunk `ring.me` of `buf` is this rank's; afterwards all are.
    pub(super) fn ring_all_gather<E: Element>(
        &self,
        op: &'static str,
        tag: Label,
        ring: Ring<'_>,
        buf: &mut [E],
    ) -> Result<(), CommError> {
        let (n, len) = (ring.ranks.len(), buf.len());
        let segment = (SEGMENT_BYTES / std::mem::size_of::<E>()).max(1);
        for step in schedule::ring_all_gather(ring.me, n) {
            let send = schedule::chunk(len, n, step.send_chunk);
            let recv = schedule::chunk(len, n, step.recv_chunk);
            for (s, r) in segment_pairs(send, recv, segment) {
                let (sent, received) = split_pair(buf, s, r);
                self.exchange(
                    op,
                    tag,
                    Some((ring.ranks[step.send_to], bytes_of(sent))),
                    Some((ring.ranks[step.recv_from], bytes_of_mut(received))),
                )?;
            }
        }
        Ok(())
    }
}

/// The segments of a sent and a received chunk, paired step by step. Both sides of a link cut
/// the same chunk the same way; the two chunks may differ by one element, so one side may
/// have a last, empty segment.
fn segment_pairs(
    send: Range<usize>,
    recv: Range<usize>,
    segment: usize,
) -> Vec<(Range<usize>, Range<usize>)> {
    let count = send.len().max(recv.len()).div_ceil(segment).max(1);
    let cut = |r: &Range<usize>, i: usize| {
        let start = (r.start + i * segment).min(r.end);
        start..(start + segment).min(r.end)
    };
    (0..count).map(|i| (cut(&send, i), cut(&recv, i))).collect()
}

/// Two disjoint ranges of one buffer, the first shared and the second writable.
fn split_pair<E>(buf: &mut [E], a: Range<usize>, b: Range<usize>) -> (&[E], &mut [E]) {
    if a.start >= b.end {
        let (low, high) = buf.split_at_mut(a.start);
        (&high[..a.len()], &mut low[b])
    } else {
        debug_assert!(a.end <= b.start, "ranges {a:?} and {b:?} overlap");
        let (low, high) = buf.split_at_mut(b.start);
        (&low[a], &mut high[..b.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_apply_only_to_even_multi_host_layouts() {
        // Ranks 0,2 on host 7 and 1,3 on host 9 (interleaved, as a launcher may place them).
        let members = [0, 1, 2, 3];
        let host = |r: usize| if r % 2 == 0 { 7 } else { 9 };
        let seen = Hosts::find(&members, 3, host).expect("2 hosts × 2 ranks");
        assert_eq!(seen.local, vec![1, 3]);
        assert_eq!(seen.across, vec![2, 3]);
        // One host; one rank per host; uneven hosts: a flat ring.
        assert_eq!(Hosts::find(&members, 0, |_| 0), None);
        assert_eq!(Hosts::find(&members, 0, |r| r), None);
        assert_eq!(Hosts::find(&members, 0, |r| usize::from(r == 3)), None);
    }
}
