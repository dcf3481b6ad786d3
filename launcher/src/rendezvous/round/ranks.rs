//! Deterministic node ranks across rounds (no I/O).

use std::collections::{BTreeMap, BTreeSet};

use super::NodeId;

/// Node ids in rank order: each node keeps its previous rank while it is below the new node
/// count, the rest fill the free ranks in id order.
pub fn assign_ranks(nodes: &BTreeSet<NodeId>, previous: &BTreeMap<NodeId, u32>) -> Vec<NodeId> {
    let n = nodes.len();
    let mut slots: Vec<Option<NodeId>> = vec![None; n];
    let mut rest = Vec::new();
    for id in nodes {
        match previous.get(id).map(|&r| r as usize) {
            Some(r) if r < n && slots[r].is_none() => slots[r] = Some(id.clone()),
            _ => rest.push(id.clone()),
        }
    }
    let mut rest = rest.into_iter();
    slots
        .into_iter()
        .map(|slot| slot.or_else(|| rest.next()))
        .collect::<Option<Vec<_>>>()
        .unwrap_or_default()
}
