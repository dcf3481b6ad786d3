//! Mismatch detection for GPU collectives: before an op, the ranks gather each one's
//! fingerprint (its collective number and [`Call`]) over the host transports, so ranks that
//! call different collectives get an error naming both calls instead of an NCCL hang or
//! garbage. 24 bytes per rank per op: a few µs on shared memory, so it stays on.
//!
//! # Trust
//! Fingerprints come from peers; an unknown code decodes as the closest call and only ever
//! ends in an error message.

use crate::comm::Call;

/// Bytes of one rank's fingerprint.
pub const BYTES: usize = 24;

/// Collective number `seq` calling `call`.
pub fn encode(seq: u64, call: &Call) -> [u8; BYTES] {
    let mut out = [0u8; BYTES];
    out[..8].copy_from_slice(&seq.to_le_bytes());
    out[8..].copy_from_slice(&call.encode());
    out
}

fn decode(bytes: &[u8]) -> Option<(u64, Call)> {
    let seq = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let call: &[u8; 16] = bytes.get(8..BYTES)?.try_into().ok()?;
    Some((seq, Call::decode(call)))
}

/// The first rank whose fingerprint in `gathered` (every rank's, in rank order) differs from
/// `rank`'s, described for an error.
pub fn disagreement(gathered: &[u8], rank: usize) -> Option<String> {
    let ours = gathered.get(rank * BYTES..(rank + 1) * BYTES)?;
    let (peer, theirs) = gathered
        .chunks(BYTES)
        .enumerate()
        .find(|(_, fp)| *fp != ours)?;
    let describe = |fp: &[u8]| match decode(fp) {
        Some((seq, call)) => format!("collective #{seq} {call}"),
        None => "an unreadable call".to_owned(),
    };
    Some(format!(
        "the ranks called different collectives: rank {rank} called {}, rank {peer} called {}; every rank must call the same collectives in the same order",
        describe(ours),
        describe(theirs)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Kind;
    use crate::reduce::{DType, ReduceOp};

    fn call(kind: Kind, count: u64) -> Call {
        Call {
            kind,
            dtype: Some(DType::F32),
            reduce: (kind == Kind::AllReduce).then_some(ReduceOp::Sum),
            root: None,
            count,
        }
    }

    #[test]
    fn agreeing_ranks_pass_and_a_different_call_or_count_is_named() {
        let a = encode(3, &call(Kind::AllReduce, 1024));
        let same = [a, a, a].concat();
        assert_eq!(disagreement(&same, 1), None);

        let other = encode(3, &call(Kind::AllReduce, 512));
        let err = disagreement(&[a, a, other].concat(), 0).expect("mismatch");
        assert!(
            err.contains("rank 0 called collective #3 all_reduce(F32 × 1024, Sum)"),
            "{err}"
        );
        assert!(
            err.contains("rank 2 called collective #3 all_reduce(F32 × 512, Sum)"),
            "{err}"
        );

        let ahead = encode(4, &call(Kind::Broadcast, 1024));
        let err = disagreement(&[ahead, a].concat(), 1).expect("mismatch");
        assert!(
            err.contains("rank 0 called collective #4 broadcast"),
            "{err}"
        );
    }

    #[test]
    fn a_short_gather_is_no_panic() {
        assert_eq!(disagreement(&[0u8; 10], 0), None);
        assert_eq!(disagreement(&[], 3), None);
    }
}
