//! The elastic rendezvous (`--nnodes MIN:MAX`) as a pure state machine: no I/O, no clock of
//! its own — every call is handed `now` (time since the service started) — so every rule
//! below is tested on its own, including randomized sequences against the invariants.
//!
//! # Rules (torchrun's dynamic rendezvous, made event-driven)
//! - A round gathers nodes and completes when MAX have joined, or when MIN have joined and
//!   the last-call timeout has passed since the MIN-th arrived. Nodes past MAX wait for the
//!   next round.
//! - A round that has not gathered MIN nodes within the join timeout of its first node times
//!   out; that ends the rendezvous (every agent reports how many joined and who).
//! - A node whose heartbeats stop for the heartbeat timeout is dropped. If it took part in the
//!   running round, that round ends at once ([`RoundEnd::Lost`]) and the next one opens.
//! - A running round also ends when a participant's workers fail ([`Rendezvous::restart`], the
//!   one kind of end counted against `--max-restarts`), when a participant leaves, and when a
//!   node joins while the round has room for it (scale-up).
//! - When a round ends, its surviving participants and the waiting nodes (first come first)
//!   are carried into the next round; they need not join again. If they are at least MIN, the
//!   next round completes at once: every node the rendezvous knows of is already in it, so a
//!   restart waits for no last call.
//! - Node ranks are deterministic: a node keeps its rank of the previous completed round when
//!   that rank still exists; the free ranks go to the other nodes in node-id order. So node
//!   0 (the master) stays where it was across restarts unless it is the node that left.
//! - Close ends the rendezvous for everyone (the job finished, or failed for good).
//!
//! # Trust
//! Node descriptors come from agents over the network. The service bounds the sizes of their
//! strings; here every count is bounded: at most MAX participants, at most
//! [`MAX_WAITING`] waiting nodes, and at most [`MAX_NPROC`] workers a node, so sums cannot
//! overflow. No sequence of calls panics; a call that cannot apply is a [`RoundError`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

mod model;
mod ranks;
mod view;

pub use ranks::assign_ranks;

pub use model::{
    NodeDesc, NodeId, Placement, RoundEnd, RoundError, Settings, Standing, View, MAX_NODES,
    MAX_NPROC, MAX_WAITING,
};

#[derive(Debug, Clone)]
enum Phase {
    /// `since`: when the round's first node arrived (the join timeout runs from there).
    Gathering {
        since: Option<Duration>,
        last_call_at: Option<Duration>,
    },
    /// Node ids in rank order; each node's rank and the global rank of its local rank 0.
    Complete {
        ranks: Vec<NodeId>,
        places: BTreeMap<NodeId, (u32, u32)>,
        world_size: u32,
        /// The nodes' addresses in rank order (shared by every view of node 0).
        hosts: Arc<[String]>,
    },
    Finished,
    Closed(String),
    TimedOut(Vec<NodeId>),
}

#[derive(Debug, Clone)]
struct Member {
    desc: NodeDesc,
    last_heartbeat: Duration,
}

/// The rendezvous of one run id.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    settings: Settings,
    round: u64,
    restart_count: u32,
    phase: Phase,
    participants: BTreeSet<NodeId>,
    /// Participants of the completed round whose workers finished it.
    finished: BTreeSet<NodeId>,
    /// Participants of the completed round ready to start its workers.
    ready: BTreeSet<NodeId>,
    /// Arrival order.
    waiting: Vec<NodeId>,
    members: BTreeMap<NodeId, Member>,
    /// Ranks of the last completed round.
    previous_ranks: BTreeMap<NodeId, u32>,
    last_end: Option<RoundEnd>,
    revision: u64,
    /// Moves with `revision`, except when only a gathering round's count of nodes changed.
    major: u64,
}

impl Rendezvous {
    /// An empty rendezvous at round 0. `settings` must have `1 <= min_nodes <= max_nodes`
    /// (the launcher's flag parsing sees to it; a bad pair is clamped, never a panic).
    pub fn new(settings: Settings) -> Self {
        let max_nodes = settings.max_nodes.max(1);
        let settings = Settings {
            min_nodes: settings.min_nodes.clamp(1, max_nodes),
            max_nodes,
            ..settings
        };
        Self {
            settings,
            round: 0,
            restart_count: 0,
            phase: Phase::Gathering {
                since: None,
                last_call_at: None,
            },
            participants: BTreeSet::new(),
            finished: BTreeSet::new(),
            ready: BTreeSet::new(),
            waiting: Vec::new(),
            members: BTreeMap::new(),
            previous_ranks: BTreeMap::new(),
            last_end: None,
            revision: 0,
            major: 0,
        }
    }

    /// Moves whenever any node's [`View`] may have changed (heartbeats alone do not move it).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Moves whenever a node's [`View`] changed in more than a gathering round's count of
    /// joined nodes: what the service pushes on (a join must not wake every waiting node).
    pub fn major_revision(&self) -> u64 {
        self.major
    }

    fn changed(&mut self) {
        self.revision += 1;
        self.major += 1;
    }

    /// The current round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The parameters in force.
    pub fn settings(&self) -> Settings {
        self.settings
    }

    /// Adds `desc` to the rendezvous: to the gathering round if it has room, else to the
    /// waiting nodes; a join while a round runs with room ends that round (scale-up). Joining
    /// again with the same id is a no-op beyond a heartbeat (a retried call).
    ///
    /// # Errors
    /// The rendezvous is over, the descriptor is unusable, or too many nodes wait.
    pub fn join(&mut self, now: Duration, desc: NodeDesc) -> Result<(), RoundError> {
        self.open()?;
        if desc.nproc == 0 || desc.nproc > MAX_NPROC {
            return Err(RoundError::InvalidNode {
                id: desc.id,
                problem: format!("--nproc-per-node {} is outside 1..={MAX_NPROC}", desc.nproc),
            });
        }
        let id = desc.id.clone();
        if let Some(member) = self.members.get_mut(&id) {
            member.last_heartbeat = now;
            return Ok(());
        }
        let room = self.participants.len() < self.settings.max_nodes as usize;
        if !room && self.waiting.len() >= MAX_WAITING {
            return Err(RoundError::Full(id));
        }
        self.members.insert(
            id.clone(),
            Member {
                desc,
                last_heartbeat: now,
            },
        );
        match (&self.phase, room) {
            (Phase::Gathering { .. }, true) => {
                // Only the count of joined nodes changes for the others: no push to all.
                self.revision += 1;
                self.participants.insert(id);
                self.after_gathering_change(now);
            }
            (Phase::Complete { .. }, true) => {
                self.changed();
                self.waiting.insert(0, id.clone());
                self.end_round(now, RoundEnd::ScaleUp(id));
            }
            _ => {
                self.changed();
                self.waiting.push(id);
            }
        }
        Ok(())
    }

    /// Records that `id` is alive.
    ///
    /// # Errors
    /// The rendezvous is over, or `id` is not a member (it must join again).
    pub fn heartbeat(&mut self, now: Duration, id: &NodeId) -> Result<(), RoundError> {
        self.open()?;
        let member = self
            .members
            .get_mut(id)
            .ok_or_else(|| RoundError::UnknownNode(id.clone()))?;
        member.last_heartbeat = now;
        Ok(())
    }

    /// `id`'s workers failed in `round`: end it and open the next (a counted restart). A call
    /// for a round that has already ended is a no-op, so every node may report its failure.
    ///
    /// # Errors
    /// The rendezvous is over, or `id` is not a participant of the running round.
    pub fn restart(
        &mut self,
        now: Duration,
        id: &NodeId,
        round: u64,
        cause: &str,
    ) -> Result<(), RoundError> {
        self.heartbeat(now, id)?;
        if round != self.round || !matches!(self.phase, Phase::Complete { .. }) {
            return Ok(());
        }
        if !self.participants.contains(id) {
            return Err(RoundError::NotParticipant(id.clone()));
        }
        self.end_round(
            now,
            RoundEnd::Failed {
                node: id.clone(),
                cause: cause.to_owned(),
            },
        );
        Ok(())
    }

    /// `id` has stopped the workers of earlier rounds (node 0: and cleared its store) and is
    /// ready to start `round`'s; when every participant is, the round's placements say so
    /// ([`Placement::all_ready`]) and the workers start everywhere. A call for another round
    /// is a no-op.
    ///
    /// # Errors
    /// The rendezvous is over, or `id` is not a participant of the running round.
    pub fn ready(&mut self, now: Duration, id: &NodeId, round: u64) -> Result<(), RoundError> {
        self.heartbeat(now, id)?;
        if round != self.round || !matches!(self.phase, Phase::Complete { .. }) {
            return Ok(());
        }
        if !self.participants.contains(id) {
            return Err(RoundError::NotParticipant(id.clone()));
        }
        if self.ready.insert(id.clone()) && self.ready.len() == self.participants.len() {
            self.changed();
        }
        Ok(())
    }

    /// `id`'s workers finished `round` successfully; when every participant has, the job is
    /// done ([`Standing::Finished`]). A call for another round is a no-op.
    ///
    /// # Errors
    /// The rendezvous is over, or `id` is not a participant of the running round.
    pub fn finish(&mut self, now: Duration, id: &NodeId, round: u64) -> Result<(), RoundError> {
        self.heartbeat(now, id)?;
        if round != self.round || !matches!(self.phase, Phase::Complete { .. }) {
            return Ok(());
        }
        if !self.participants.contains(id) {
            return Err(RoundError::NotParticipant(id.clone()));
        }
        if self.finished.insert(id.clone()) && self.finished.len() == self.participants.len() {
            self.phase = Phase::Finished;
            self.changed();
        }
        Ok(())
    }

    /// `id` leaves; if it took part in the running round, that round ends. Leaving twice, or
    /// after the rendezvous is over, is a no-op.
    pub fn leave(&mut self, now: Duration, id: &NodeId) {
        if self.open().is_err() || self.members.remove(id).is_none() {
            return;
        }
        self.changed();
        self.waiting.retain(|w| w != id);
        if self.participants.remove(id) {
            match self.phase {
                Phase::Complete { .. } => self.end_round(now, RoundEnd::Left(id.clone())),
                _ => self.after_gathering_change(now),
            }
        }
    }

    /// Ends the rendezvous for every node; the first reason given is kept.
    pub fn close(&mut self, reason: &str) {
        if self.open().is_ok() {
            self.phase = Phase::Closed(reason.to_owned());
            self.changed();
        }
    }

    /// Applies the passage of time: drops silent nodes, completes a round whose last call has
    /// passed, times out a round that did not gather MIN nodes.
    pub fn tick(&mut self, now: Duration) {
        if self.open().is_err() {
            return;
        }
        let timeout = self.settings.heartbeat_timeout;
        let silent: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, m)| now.saturating_sub(m.last_heartbeat) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        self.drop_lost(now, &silent);
        self.complete_or_time_out(now);
    }

    /// `id` is gone without leaving (its connection to the service broke: its agent was
    /// killed): dropped at once, as if its heartbeats had stopped. Unknown ids are a no-op.
    pub fn lose(&mut self, now: Duration, id: &NodeId) {
        if self.open().is_ok() && self.members.contains_key(id) {
            self.drop_lost(now, std::slice::from_ref(id));
        }
    }

    fn drop_lost(&mut self, now: Duration, silent: &[NodeId]) {
        if !silent.is_empty() {
            self.changed();
            for id in silent {
                self.members.remove(id);
            }
            self.waiting.retain(|w| !silent.contains(w));
            let lost: Vec<NodeId> = silent
                .iter()
                .filter(|id| self.participants.remove(*id))
                .cloned()
                .collect();
            match self.phase {
                Phase::Complete { .. } if !lost.is_empty() => {
                    self.end_round(now, RoundEnd::Lost(lost));
                }
                Phase::Gathering { .. } => self.after_gathering_change(now),
                _ => {}
            }
        }
    }

    fn complete_or_time_out(&mut self, now: Duration) {
        if let Phase::Gathering {
            since,
            last_call_at,
        } = self.phase
        {
            let enough = self.participants.len() >= self.settings.min_nodes as usize;
            if enough && last_call_at.is_some_and(|at| now >= at) {
                self.complete();
            } else if !enough
                && since.is_some_and(|s| now >= s.saturating_add(self.settings.join_timeout))
            {
                self.phase = Phase::TimedOut(self.participants.iter().cloned().collect());
                self.changed();
            }
        }
    }

    /// The earliest time at which [`Rendezvous::tick`] may change something; `None` when only
    /// a call can.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.open().is_err() {
            return None;
        }
        let silence = self
            .members
            .values()
            .map(|m| {
                m.last_heartbeat
                    .saturating_add(self.settings.heartbeat_timeout)
                    .saturating_add(Duration::from_millis(1))
            })
            .min();
        let gathering = match self.phase {
            Phase::Gathering {
                since,
                last_call_at,
            } => last_call_at.or(since.map(|s| s.saturating_add(self.settings.join_timeout))),
            _ => None,
        };
        [silence, gathering].into_iter().flatten().min()
    }

    /// Every node the rendezvous knows of: participants and waiting nodes.
    pub fn members(&self) -> impl Iterator<Item = &NodeId> {
        self.members.keys()
    }

    /// The error a node's agent reports when the rendezvous is over; `None` while it is not.
    pub fn over(&self) -> Option<RoundError> {
        self.open().err()
    }

    fn open(&self) -> Result<(), RoundError> {
        match &self.phase {
            Phase::Finished => Err(RoundError::Finished),
            Phase::Closed(reason) => Err(RoundError::Closed(reason.clone())),
            Phase::TimedOut(joined) => Err(RoundError::TimedOut {
                joined: len_u32(joined.len()),
                min: self.settings.min_nodes,
                names: if joined.is_empty() {
                    "none".to_owned()
                } else {
                    joined
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
            _ => Ok(()),
        }
    }

    /// The gathering round's membership changed: fill it from the waiting nodes, start or stop
    /// its clocks, complete it at MAX.
    fn after_gathering_change(&mut self, now: Duration) {
        // A gathering round with room takes the waiting nodes, first come first.
        let room = (self.settings.max_nodes as usize).saturating_sub(self.participants.len());
        let taken = room.min(self.waiting.len());
        self.participants.extend(self.waiting.drain(..taken));
        let n = self.participants.len();
        let Settings {
            min_nodes,
            max_nodes,
            last_call_timeout,
            ..
        } = self.settings;
        if let Phase::Gathering {
            since,
            last_call_at,
        } = &mut self.phase
        {
            *since = if n == 0 { None } else { since.or(Some(now)) };
            *last_call_at = if n >= min_nodes as usize {
                last_call_at.or(Some(now.saturating_add(last_call_timeout)))
            } else {
                None
            };
        }
        if n >= max_nodes as usize {
            self.complete();
        }
    }

    /// Ends the running round: the survivors and the waiting nodes (first come first, up to
    /// MAX) make the next one, complete at once when they are at least MIN.
    fn end_round(&mut self, now: Duration, end: RoundEnd) {
        if let Phase::Complete { ranks, .. } = &self.phase {
            self.previous_ranks = ranks.iter().cloned().zip(0..).collect();
        }
        self.round += 1;
        if end.is_counted() {
            self.restart_count = self.restart_count.saturating_add(1);
        }
        self.last_end = Some(end);
        self.finished.clear();
        self.ready.clear();
        self.changed();
        let room = (self.settings.max_nodes as usize).saturating_sub(self.participants.len());
        let carried = room.min(self.waiting.len());
        self.participants.extend(self.waiting.drain(..carried));
        let n = self.participants.len();
        self.phase = Phase::Gathering {
            since: (n > 0).then_some(now),
            last_call_at: None,
        };
        if n >= self.settings.min_nodes as usize {
            self.complete();
        }
    }

    fn complete(&mut self) {
        let ranks = assign_ranks(&self.participants, &self.previous_ranks);
        let mut base = 0u32;
        let mut places = BTreeMap::new();
        for (rank, id) in (0u32..).zip(&ranks) {
            places.insert(id.clone(), (rank, base));
            base = base.saturating_add(self.members.get(id).map_or(0, |m| m.desc.nproc));
        }
        let hosts = ranks
            .iter()
            .map(|id| {
                self.members
                    .get(id)
                    .map(|m| m.desc.addr.clone())
                    .unwrap_or_default()
            })
            .collect();
        self.phase = Phase::Complete {
            ranks,
            places,
            world_size: base,
            hosts,
        };
        self.changed();
    }
}

/// Counts here are bounded by MAX nodes or [`MAX_WAITING`], both far below `u32::MAX`.
fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
