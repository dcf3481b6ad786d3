//! What every message carries besides its bytes: which collective it belongs to (a sequence
//! number every rank counts alike) and what was called (op, dtype, count, reduction, root).
//! A receiver compares the sender's call with its own, so ranks that call different
//! collectives get an error naming both calls instead of a hang or garbage.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use super::{classify, Arrival, TransportError};
use crate::reduce::{DType, ReduceOp};

/// Tags with this bit belong to user `send`/`recv`; without it, to collectives.
pub const USER_TAG: u64 = 1 << 63;
/// Bits 32..63 of a tag: the communicator (0 for the first; sub-communicators get their own).
const COMM_SHIFT: u32 = 32;
const COMM_MASK: u64 = (1 << 31) - 1;
const LOW: u64 = u32::MAX as u64;
/// The sequence number of the message a rank sends its peers when it gives up on a collective
/// because the ranks disagree, so that none of them waits for it until the deadline.
pub const ABORT_SEQ: u64 = LOW;
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
pub const CALL_BYTES: usize = 16;

const KINDS: [Kind; 8] = [
    Kind::AllReduce,
    Kind::Broadcast,
    Kind::Reduce,
    Kind::AllGather,
    Kind::ReduceScatter,
    Kind::AllToAll,
    Kind::Barrier,
    Kind::PointToPoint,
];
const DTYPES: [DType; 7] = [
    DType::F32,
    DType::F64,
    DType::F16,
    DType::Bf16,
    DType::I32,
    DType::I64,
    DType::U8,
];
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

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::AllReduce => "all_reduce",
            Self::Broadcast => "broadcast",
            Self::Reduce => "reduce",
            Self::AllGather => "all_gather",
            Self::ReduceScatter => "reduce_scatter",
            Self::AllToAll => "all_to_all",
            Self::Barrier => "barrier",
            Self::PointToPoint => "send/recv",
        })
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.kind)?;
        if let Some(d) = self.dtype {
            write!(f, "{d:?} × {}", self.count)?;
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

/// Bytes of a frame header on a byte stream: tag, payload length, call.
pub(crate) const FRAME_HEADER: usize = 16 + CALL_BYTES;

/// The header of a frame carrying `len` bytes under `label`.
pub(crate) fn frame_header(label: &Label, len: usize) -> [u8; FRAME_HEADER] {
    let mut h = [0u8; FRAME_HEADER];
    h[..8].copy_from_slice(&label.tag.to_le_bytes());
    h[8..16].copy_from_slice(&(len as u64).to_le_bytes());
    h[16..].copy_from_slice(&label.call.encode());
    h
}

/// A frame header's label and payload length.
pub(crate) fn parse_frame_header(h: &[u8; FRAME_HEADER]) -> (Label, usize) {
    let word = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let mut call = [0u8; CALL_BYTES];
    call.copy_from_slice(&h[16..]);
    (
        Label {
            tag: word(0),
            call: Call::decode(&call),
        },
        word(8) as usize,
    )
}

/// What to do with a frame whose header just arrived for a receive awaiting `awaited` into a
/// buffer of `expected` bytes: `true` to read it into that buffer, `false` to keep it aside.
///
/// # Errors
/// A mismatched call, or the awaited frame with another size.
pub(crate) fn accept(
    peer: usize,
    awaited: &Label,
    expected: usize,
    theirs: &Label,
    len: usize,
) -> Result<bool, TransportError> {
    match classify(peer, awaited, theirs)? {
        Arrival::Awaited if len != expected => Err(TransportError::Size {
            peer,
            expected,
            got: len,
        }),
        Arrival::Awaited => Ok(true),
        Arrival::Other => Ok(false),
    }
}

/// Frames that arrived before the receive that wants them (another tag).
#[derive(Debug, Default)]
pub(crate) struct Stash(HashMap<u64, VecDeque<(Label, Vec<u8>)>>);

impl Stash {
    /// Keeps a whole frame for later.
    pub(crate) fn keep(&mut self, label: Label, payload: Vec<u8>) {
        self.0
            .entry(label.tag)
            .or_default()
            .push_back((label, payload));
    }

    /// Delivers a kept frame for `awaited` into `out`; whether there was one.
    ///
    /// # Errors
    /// As [`accept`].
    pub(crate) fn deliver(
        &mut self,
        peer: usize,
        awaited: &Label,
        out: &mut [u8],
    ) -> Result<bool, TransportError> {
        let payload = self.take(peer, awaited, out.len())?;
        if let Some(payload) = &payload {
            out.copy_from_slice(payload);
        }
        Ok(payload.is_some())
    }

    /// The kept payload of a frame for `awaited` (`expected` bytes), if one came early.
    ///
    /// # Errors
    /// As [`accept`].
    pub(crate) fn take(
        &mut self,
        peer: usize,
        awaited: &Label,
        expected: usize,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        let Some((label, payload)) = self.0.get_mut(&awaited.tag).and_then(VecDeque::pop_front)
        else {
            return Ok(None);
        };
        accept(peer, awaited, expected, &label, payload.len())?;
        Ok(Some(payload))
    }
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
