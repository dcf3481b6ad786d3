//! What every message carries besides its bytes: which collective it belongs to (a sequence
//! number every rank counts alike) and what was called (op, dtype, count, reduction, root).
//! A receiver compares the sender's call with its own ([`classify`], the receive's screen),
//! so ranks that call different collectives get an error naming both calls instead of a hang
//! or garbage. Transports carry a label as an opaque [`Envelope`].

use std::fmt;

use crate::reduce::{DType, ReduceOp};
use crate::transport::Envelope;

/// Tags with this bit belong to user `send`/`recv`; without it, to collectives.
pub(super) const USER_TAG: u64 = 1 << 63;
/// Bits 32..63 of a tag: the communicator (0 for the first; sub-communicators get their own).
const COMM_SHIFT: u32 = 32;
const COMM_MASK: u64 = (1 << 31) - 1;
const LOW: u64 = u32::MAX as u64;
/// The sequence number of the message a rank sends its peers when it gives up on a collective
/// because the ranks disagree, so that none of them waits for it until the deadline.
pub(super) const ABORT_SEQ: u64 = LOW;
/// Sequence numbers just below [`ABORT_SEQ`] say "I lost rank `LOST_BASE - seq`": a rank that
/// finds a peer gone tells the others, so that each names the dead rank, not a neighbour that
/// gave up first.
const LOST_BASE: u64 = LOW - 1;
/// Most ranks a lost-peer message can name.
const MAX_LOST: u64 = 1 << 24;
/// Collective numbers wrap below the reserved ones.
const SEQ_SPACE: u64 = LOST_BASE - MAX_LOST;

/// Which operation a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// all_reduce.
    AllReduce,
    /// broadcast.
    Broadcast,
    /// reduce.
    Reduce,
    /// all_gather.
    AllGather,
    /// reduce_scatter.
    ReduceScatter,
    /// all_to_all.
    AllToAll,
    /// barrier.
    Barrier,
    /// send / recv.
    PointToPoint,
    /// gather.
    Gather,
    /// scatter.
    Scatter,
    /// all_to_all with counts of each rank's own (the call's count is the elements it sends).
    AllToAllV,
}

/// What a rank called, as far as its peers must agree on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// The operation.
    pub kind: Kind,
    /// The element type (none for a barrier).
    pub dtype: Option<DType>,
    /// The reduction, for reducing collectives.
    pub reduce: Option<ReduceOp>,
    /// The root, for rooted collectives.
    pub root: Option<u32>,
    /// Elements per rank (the input of gathers, the output of scatters).
    pub count: u64,
}

/// A message's label: its tag (communicator and sequence number, or user tag) and the call it
/// belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label {
    /// `[user bit | communicator (31 bits) | sequence or user tag (32 bits)]`.
    pub tag: u64,
    /// What was called.
    pub call: Call,
}

impl Label {
    /// Collective number `seq` of communicator `comm` (numbers wrap after 2³² − 1 collectives).
    pub fn collective(comm: u32, seq: u64, call: Call) -> Self {
        Self {
            tag: ((u64::from(comm) & COMM_MASK) << COMM_SHIFT) | (seq % SEQ_SPACE),
            call,
        }
    }

    /// A user message with `tag` on communicator `comm`.
    pub fn user(comm: u32, tag: u32, call: Call) -> Self {
        Self {
            tag: USER_TAG | ((u64::from(comm) & COMM_MASK) << COMM_SHIFT) | u64::from(tag),
            call,
        }
    }

    /// The message that says a rank gave up on `call` in communicator `comm`.
    pub fn abort(comm: u32, call: Call) -> Self {
        Self {
            tag: ((u64::from(comm) & COMM_MASK) << COMM_SHIFT) | ABORT_SEQ,
            call,
        }
    }

    /// Whether the tag is a collective's (not a user tag).
    pub fn is_collective(&self) -> bool {
        self.tag & USER_TAG == 0
    }

    /// The communicator.
    pub fn comm(&self) -> u32 {
        ((self.tag >> COMM_SHIFT) & COMM_MASK) as u32
    }

    /// The collective number (or user tag).
    pub fn seq(&self) -> u64 {
        self.tag & LOW
    }

    /// Whether this is an abort message.
    pub fn is_abort(&self) -> bool {
        self.is_collective() && self.seq() == ABORT_SEQ
    }

    /// The message that says this rank lost its link to rank `lost` (a transport rank).
    pub fn lost(comm: u32, lost: usize, call: Call) -> Self {
        let seq = LOST_BASE - (lost as u64).min(MAX_LOST - 1);
        Self {
            tag: ((u64::from(comm) & COMM_MASK) << COMM_SHIFT) | seq,
            call,
        }
    }

    /// The rank a lost-peer message names.
    pub fn lost_rank(&self) -> Option<usize> {
        let seq = self.seq();
        (self.is_collective() && seq <= LOST_BASE && seq > LOST_BASE - MAX_LOST)
            .then(|| (LOST_BASE - seq) as usize)
    }
}

/// Bytes of an encoded call.
pub(super) const CALL_BYTES: usize = crate::transport::frame::META;

// New entries go at the end: a code is what peers of other builds read.
const KINDS: [Kind; 11] = [
    Kind::AllReduce,
    Kind::Broadcast,
    Kind::Reduce,
    Kind::AllGather,
    Kind::ReduceScatter,
    Kind::AllToAll,
    Kind::Barrier,
    Kind::PointToPoint,
    Kind::Gather,
    Kind::Scatter,
    Kind::AllToAllV,
];
const DTYPES: [DType; 9] = DType::ALL;
const REDUCES: [ReduceOp; 5] = [
    ReduceOp::Sum,
    ReduceOp::Prod,
    ReduceOp::Min,
    ReduceOp::Max,
    ReduceOp::Avg,
];
const NONE: u8 = u8::MAX;

fn code<T: PartialEq>(table: &[T], value: Option<&T>) -> u8 {
    value
        .and_then(|v| table.iter().position(|t| t == v))
        .map_or(NONE, |i| i as u8)
}

impl Call {
    /// The call's 16 wire bytes.
    pub fn encode(&self) -> [u8; CALL_BYTES] {
        let mut out = [0u8; CALL_BYTES];
        out[0] = code(&KINDS, Some(&self.kind));
        out[1] = code(&DTYPES, self.dtype.as_ref());
        out[2] = code(&REDUCES, self.reduce.as_ref());
        out[4..8].copy_from_slice(&self.root.unwrap_or(u32::MAX).to_le_bytes());
        out[8..].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    /// A call from its wire bytes (unknown codes read as the closest thing: a point-to-point).
    pub fn decode(bytes: &[u8; CALL_BYTES]) -> Self {
        let root = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let mut count = [0u8; 8];
        count.copy_from_slice(&bytes[8..]);
        Self {
            kind: KINDS
                .get(usize::from(bytes[0]))
                .copied()
                .unwrap_or(Kind::PointToPoint),
            dtype: DTYPES.get(usize::from(bytes[1])).copied(),
            reduce: REDUCES.get(usize::from(bytes[2])).copied(),
            root: (root != u32::MAX).then_some(root),
            count: u64::from_le_bytes(count),
        }
    }
}

impl Kind {
    /// The operation's name, as errors give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllReduce => "all_reduce",
            Self::Broadcast => "broadcast",
            Self::Reduce => "reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
            Self::AllToAll => "all_to_all",
            Self::Barrier => "barrier",
            Self::PointToPoint => "send/recv",
            Self::Gather => "gather",
            Self::Scatter => "scatter",
            Self::AllToAllV => "all_to_all_v",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.kind)?;
        match self.dtype {
            // Its counts are each rank's own; the call carries none.
            Some(d) if self.kind == Kind::AllToAllV => write!(f, "{d:?}")?,
            Some(d) => write!(f, "{d:?} × {}", self.count)?,
            None => {}
        }
        if let Some(r) = self.reduce {
            write!(f, ", {r:?}")?;
        }
        if let Some(root) = self.root {
            write!(f, ", root {root}")?;
        }
        f.write_str(")")
    }
}

impl Label {
    /// The envelope transports carry: the tag, and the call as opaque bytes.
    pub fn envelope(&self) -> Envelope {
        Envelope {
            tag: self.tag,
            meta: self.call.encode(),
        }
    }

    /// The label an envelope carries.
    pub fn of(envelope: &Envelope) -> Self {
        Self {
            tag: envelope.tag,
            call: Call::decode(&envelope.meta),
        }
    }
}

/// What a message from a peer means for a receive awaiting `ours`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The awaited message (same tag, same call).
    Awaited,
    /// Another tag's: kept for its own receive.
    Other,
    /// The same collective number with another call, or the peer already at a later
    /// collective (messages between two ranks keep their order, so the awaited one never comes).
    Mismatch,
    /// The peer gave up on the collective because the ranks disagree.
    Aborted,
    /// The peer lost its link to this rank.
    Lost(usize),
}

/// Classifies a message labelled `theirs` for a receive awaiting `ours`.
pub(crate) fn classify(ours: &Label, theirs: &Label) -> Arrival {
    let same_comm = theirs.comm() == ours.comm();
    if let (Some(lost), true) = (theirs.lost_rank(), same_comm) {
        return Arrival::Lost(lost);
    }
    if theirs.is_abort() && same_comm {
        return Arrival::Aborted;
    }
    if theirs.tag == ours.tag {
        return if theirs.call == ours.call {
            Arrival::Awaited
        } else {
            Arrival::Mismatch
        };
    }
    if ours.is_collective() && theirs.is_collective() && same_comm && theirs.seq() > ours.seq() {
        return Arrival::Mismatch;
    }
    Arrival::Other
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_round_trip_and_read_well() {
        let call = Call {
            kind: Kind::Reduce,
            dtype: Some(DType::Bf16),
            reduce: Some(ReduceOp::Max),
            root: Some(3),
            count: 1 << 40,
        };
        assert_eq!(Call::decode(&call.encode()), call);
        assert_eq!(
            call.to_string(),
            "reduce(Bf16 × 1099511627776, Max, root 3)"
        );
        let barrier = Call {
            kind: Kind::Barrier,
            dtype: None,
            reduce: None,
            root: None,
            count: 0,
        };
        assert_eq!(Call::decode(&barrier.encode()), barrier);
        assert_eq!(barrier.to_string(), "barrier()");
    }
}
