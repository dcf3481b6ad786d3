//! The rings' counters, kept on each side: the consumer's tail and the producer's head are
//! authoritative where they are owned and checked where they are read, since the peer can
//! write anything into the memory it shares.

use std::sync::atomic::Ordering;

use super::segment::Segment;
use super::{CONTROL, RING};
use crate::transport::frame::{Inbox, Source};
use crate::transport::TransportError;

/// This rank's side of the ring from a peer: the consumer's own counters.
#[derive(Debug, Default)]
pub(super) struct Inbound {
    pub(super) inbox: Inbox,
    /// Consumed so far (authoritative; published for the producer).
    pub(super) tail: u64,
    /// The producer's head as last seen (it may only grow).
    pub(super) seen_head: u64,
}

/// This rank's side of the ring to a peer: the producer's own counters.
#[derive(Debug, Default)]
pub(super) struct Outbound {
    /// Produced so far (authoritative; published for the consumer).
    pub(super) head: u64,
    /// The consumer's tail as last seen (it may only grow).
    pub(super) seen_tail: u64,
    /// Why no frame can be sent any more (an earlier one stopped halfway).
    pub(super) unsendable: Option<String>,
}

pub(super) fn corrupt(peer: usize, what: String) -> TransportError {
    TransportError::Broken {
        peer,
        reason: format!("it wrote impossible ring counters ({what}): not a ferrun peer, or its memory is corrupt"),
    }
}

/// The ring from `peer` in this rank's segment, read through the consumer's own counters.
pub(super) struct RingIn<'a> {
    pub(super) segment: &'a Segment,
    pub(super) ring: usize,
    pub(super) tail: &'a mut u64,
    pub(super) seen_head: &'a mut u64,
    pub(super) peer: usize,
}

impl RingIn<'_> {
    fn available(&mut self) -> Result<usize, TransportError> {
        let head = self.segment.word(self.ring).load(Ordering::Acquire);
        let tail = *self.tail;
        if head < *self.seen_head || head < tail || head - tail > RING as u64 {
            return Err(corrupt(
                self.peer,
                format!("head {head} after {}, tail {tail}", self.seen_head),
            ));
        }
        *self.seen_head = head;
        Ok((head - tail) as usize)
    }

    fn consumed(&mut self, n: usize) {
        *self.tail += n as u64;
        self.segment
            .word(self.ring + 64)
            .store(*self.tail, Ordering::Release);
    }
}

impl Source for RingIn<'_> {
    fn read(&mut self, out: &mut [u8]) -> Result<usize, TransportError> {
        let n = self.available()?.min(out.len());
        if n > 0 {
            let [a, b] = self
                .segment
                .ring_view(self.ring + CONTROL, RING, *self.tail, n);
            out[..a.len()].copy_from_slice(a);
            out[a.len()..n].copy_from_slice(b);
            self.consumed(n);
        }
        Ok(n)
    }

    fn fold(
        &mut self,
        scratch: &mut [u8],
        fold: &mut dyn FnMut(&[u8]),
    ) -> Result<usize, TransportError> {
        let n = self.available()?.min(scratch.len());
        if n > 0 {
            for piece in self
                .segment
                .ring_view(self.ring + CONTROL, RING, *self.tail, n)
            {
                fold(piece);
            }
            self.consumed(n);
        }
        Ok(n)
    }
}
