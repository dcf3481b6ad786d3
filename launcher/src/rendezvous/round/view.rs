//! What one node is told: its [`View`] of the rendezvous, and its placement in a completed
//! round (no I/O).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{len_u32, NodeId, Phase, Placement, Rendezvous, Standing, View};

impl Rendezvous {
    /// What `id` should know now.
    pub fn view(&self, id: &NodeId) -> View {
        let standing = match &self.phase {
            Phase::Finished => Standing::Finished,
            Phase::Closed(reason) => Standing::Closed {
                reason: reason.clone(),
            },
            Phase::TimedOut(joined) => Standing::TimedOut {
                joined: joined.clone(),
            },
            _ if !self.members.contains_key(id) => Standing::Unknown,
            _ if !self.participants.contains(id) => Standing::Waiting,
            Phase::Gathering { .. } => Standing::Gathering {
                joined: len_u32(self.participants.len()),
            },
            Phase::Complete {
                ranks,
                places,
                world_size,
                hosts,
            } => self.placement(id, ranks, places, *world_size, hosts),
        };
        View {
            round: self.round,
            restart_count: self.restart_count,
            standing,
            last_end: self.last_end.clone(),
            waiting: len_u32(self.waiting.len()),
        }
    }

    fn placement(
        &self,
        id: &NodeId,
        ranks: &[NodeId],
        places: &BTreeMap<NodeId, (u32, u32)>,
        world_size: u32,
        hosts: &Arc<[String]>,
    ) -> Standing {
        let Some(&(node_rank, base_rank)) = places.get(id) else {
            return Standing::Unknown;
        };
        let master = ranks.first().and_then(|m| self.members.get(m));
        Standing::Assigned(Placement {
            node_rank,
            nnodes: len_u32(ranks.len()),
            base_rank,
            world_size,
            master_addr: master.map(|m| m.desc.addr.clone()).unwrap_or_default(),
            master_port: master.map_or(0, |m| m.desc.store_port),
            all_ready: self.ready.len() == ranks.len(),
            hosts: if node_rank == 0 {
                Arc::clone(hosts)
            } else {
                Arc::default()
            },
        })
    }
}
