//! Sub-communicators: MPI's `comm_split` over the parent's links.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{CommError, Communicator};
use crate::transport::Transport;

impl<T: Transport> Communicator<T> {
    /// Splits this communicator (MPI's `comm_split`): ranks that pass the same `color` form a
    /// new communicator, ordered by `key` then by rank; `None` joins none (and returns `None`).
    /// Every rank of this communicator must call it. The new communicators share this one's
    /// links; their messages are told apart by the communicator's id in every tag.
    ///
    /// # Errors
    /// As [`Communicator::all_gather`] (the colors and keys are exchanged first).
    pub fn split(&self, color: Option<u32>, key: i64) -> Result<Option<Self>, CommError> {
        let mine = [color.map_or(-1, i64::from), key];
        let mut all = vec![0i64; 2 * self.size()];
        self.all_gather(&mine, &mut all)?;
        let split = self.splits.fetch_add(1, Ordering::Relaxed);
        let Some(color) = color else { return Ok(None) };
        let mut group: Vec<(i64, usize)> = (0..self.size())
            .filter(|&r| all[2 * r] == i64::from(color))
            .map(|r| (all[2 * r + 1], r))
            .collect();
        group.sort_unstable();
        let members: Arc<[usize]> = group.iter().map(|&(_, r)| self.members[r]).collect();
        let Some(rank) = group.iter().position(|&(_, r)| r == self.rank) else {
            // This rank passed `color`, so its own gathered entry has it: unreachable.
            debug_assert!(false, "rank {} missing from its own group", self.rank);
            return Err(CommError::Invalid {
                op: "split",
                what: format!("rank {} is missing from its own color's group", self.rank),
            });
        };
        Ok(Some(Self {
            hosts: super::Hosts::find(&members, rank, |r| self.transport.host_of(r)),
            transport: Arc::clone(&self.transport),
            members,
            rank,
            id: child_id(self.id, split, color),
            options: self.options,
            sequence: AtomicU64::new(0),
            splits: AtomicU64::new(0),
            witness: self.witness.clone(),
        }))
    }
}

/// A sub-communicator's id: the same on every member (they split alike), and unlike its
/// parent's and siblings' (FNV-1a over the lineage; 31 bits, never 0, the first's).
fn child_id(parent: u32, split: u64, color: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parent
        .to_le_bytes()
        .into_iter()
        .chain(split.to_le_bytes())
        .chain(color.to_le_bytes())
    {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    ((hash ^ (hash >> 31)) as u32 & 0x7fff_ffff).max(1)
}
