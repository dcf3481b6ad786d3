//! The etcd backend's pure core: the run's log of calls on the round state machine, its
//! keys, and the replica every agent rebuilds from it.
//!
//! # Why a log, not a state blob
//! Every agent appends its calls (join, ready, restart, finish, leave, lose, close, tick) as
//! new keys; etcd orders them by revision, and every agent replays them in that order into
//! its own [`Rendezvous`]. So no agent ever writes another's state, no compare-and-swap
//! round trips are needed, and every replica is a state the state machine reached through its
//! own calls — which it proves cannot panic — never a blob decoded from outside.
//!
//! # Time and liveness
//! Each entry carries its author's wall clock; replay time is the largest seen so far, so it
//! never runs backwards (hosts' clocks must agree to well under the last-call timeout, as NTP
//! gives). Liveness is etcd's: each node's `alive` key lives on a lease; a node whose key is
//! gone is lost (any agent appends the `lose`), so the state machine's own heartbeat timeout
//! is switched off ([`NO_HEARTBEAT`]).
//!
//! # Trust
//! Anyone who can write the run's prefix in etcd can steer it (etcd's own authentication and
//! TLS guard that); still, every entry is decoded with a bound on its size, and every field is
//! checked as the service checks its messages, so a bad entry is skipped — the same way by
//! every replica — and never a crash.

use std::collections::BTreeSet;
use std::time::Duration;

use prost::Message;

use crate::rendezvous::round::{NodeDesc, NodeId, Rendezvous, Settings, Standing, View};
use crate::rendezvous::service::{proto, wire};

/// Largest log entry read back.
pub const MAX_ENTRY: usize = 64 * 1024;
/// The state machine's heartbeat timeout under etcd: never (leases say who is alive).
pub const NO_HEARTBEAT: Duration = Duration::from_secs(u32::MAX as u64);

/// One call on the state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The author joins with these `--nnodes` and timeouts.
    Join {
        /// The author's descriptor.
        desc: NodeDesc,
        /// MIN, MAX and the timeouts the author was started with.
        settings: Settings,
    },
    /// Ready to start this round's workers.
    Ready(u64),
    /// The author's workers failed this round.
    Restart {
        /// The round.
        round: u64,
        /// The root cause.
        cause: String,
    },
    /// The author's workers finished this round.
    Finish(u64),
    /// The author leaves.
    Leave,
    /// This node's lease is gone.
    Lose(NodeId),
    /// The rendezvous ends; why.
    Close(String),
    /// A deadline passed.
    Tick,
}

/// One entry of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The author's wall clock (since the Unix epoch).
    pub at: Duration,
    /// The author.
    pub node: NodeId,
    /// The call.
    pub op: Op,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Entry {
    /// The entry as stored.
    pub fn encode(&self) -> Vec<u8> {
        use proto::log_entry::Op as P;
        let op = match &self.op {
            Op::Join { desc, settings } => P::Join(proto::JoinOp {
                node: Some(proto::Node {
                    id: desc.id.0.clone(),
                    addr: desc.addr.clone(),
                    store_port: u32::from(desc.store_port),
                    nproc: desc.nproc,
                }),
                limits: Some(proto::NodeLimits {
                    min_nodes: settings.min_nodes,
                    max_nodes: settings.max_nodes,
                }),
                join_timeout_ms: millis(settings.join_timeout),
                last_call_timeout_ms: millis(settings.last_call_timeout),
            }),
            Op::Ready(round) => P::Ready(*round),
            Op::Restart { round, cause } => P::Restart(proto::RestartOp {
                round: *round,
                cause: cause.clone(),
            }),
            Op::Finish(round) => P::Finish(*round),
            Op::Leave => P::Leave(proto::Empty {}),
            Op::Lose(id) => P::Lose(id.0.clone()),
            Op::Close(reason) => P::Close(reason.clone()),
            Op::Tick => P::Tick(proto::Empty {}),
        };
        proto::LogEntry {
            at_ms: millis(self.at),
            node_id: self.node.0.clone(),
            op: Some(op),
        }
        .encode_to_vec()
    }

    /// An entry read back from etcd, checked field by field.
    ///
    /// # Errors
    /// Too large, not a log entry, or a field out of bounds: what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        use proto::log_entry::Op as P;
        if bytes.len() > MAX_ENTRY {
            return Err(format!("{} bytes; at most {MAX_ENTRY}", bytes.len()));
        }
        let entry = proto::LogEntry::decode(bytes).map_err(|e| e.to_string())?;
        let said = |s: tonic::Status| s.message().to_owned();
        wire::name("node id", &entry.node_id, wire::MAX_NODE_ID).map_err(said)?;
        let op = match entry.op.ok_or("no call")? {
            P::Join(join) => {
                let desc = wire::node(join.node).map_err(said)?;
                if desc.id.0 != entry.node_id {
                    return Err(format!("{} joins for {}", entry.node_id, desc.id));
                }
                let limits = join.limits.unwrap_or_default();
                Op::Join {
                    desc,
                    settings: Settings {
                        min_nodes: limits.min_nodes,
                        max_nodes: limits.max_nodes,
                        join_timeout: Duration::from_millis(join.join_timeout_ms),
                        last_call_timeout: Duration::from_millis(join.last_call_timeout_ms),
                        heartbeat_timeout: NO_HEARTBEAT,
                    },
                }
            }
            P::Ready(round) => Op::Ready(round),
            P::Restart(r) => Op::Restart {
                round: r.round,
                cause: wire::text("cause", &r.cause).map_err(said)?.to_owned(),
            },
            P::Finish(round) => Op::Finish(round),
            P::Leave(_) => Op::Leave,
            P::Lose(id) => {
                wire::name("lost node id", &id, wire::MAX_NODE_ID).map_err(said)?;
                Op::Lose(NodeId(id))
            }
            P::Close(reason) => Op::Close(wire::text("reason", &reason).map_err(said)?.to_owned()),
            P::Tick(_) => Op::Tick,
        };
        Ok(Self {
            at: Duration::from_millis(entry.at_ms),
            node: NodeId(entry.node_id),
            op,
        })
    }
}

/// The keys of one run under a prefix (`/ferrun/rendezvous/<run id>` by default).
#[derive(Debug, Clone)]
pub struct Keys {
    run: String,
}

impl Keys {
    /// The keys of `run_id` under `prefix`.
    pub fn new(prefix: &str, run_id: &str) -> Self {
        Self {
            run: format!("{}/{run_id}", prefix.trim_end_matches('/')),
        }
    }

    /// Everything of the run (what an agent watches).
    pub fn run(&self) -> String {
        format!("{}/", self.run)
    }

    /// The log's entries.
    pub fn log(&self) -> String {
        format!("{}/log/", self.run)
    }

    /// `node`'s `seq`-th entry.
    pub fn entry(&self, node: &NodeId, seq: u64) -> String {
        format!("{}/log/{node}/{seq:020}", self.run)
    }

    /// The nodes' lease-held keys.
    pub fn alive(&self) -> String {
        format!("{}/alive/", self.run)
    }

    /// `node`'s lease-held key.
    pub fn alive_of(&self, node: &NodeId) -> String {
        format!("{}/alive/{node}", self.run)
    }

    /// The node an `alive` key stands for; `None` for any other key.
    pub fn node_of(&self, key: &[u8]) -> Option<NodeId> {
        let key = std::str::from_utf8(key).ok()?;
        let id = key.strip_prefix(&self.alive())?;
        wire::name("node id", id, wire::MAX_NODE_ID).ok()?;
        Some(NodeId(id.to_owned()))
    }
}

/// One agent's copy of the run's state, rebuilt by replaying the log.
#[derive(Debug, Clone, Default)]
pub struct Replica {
    rendezvous: Option<Rendezvous>,
    now: Duration,
}

impl Replica {
    /// A replica before any entry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one entry, as every replica does; the result is the call's, for its author.
    ///
    /// # Errors
    /// The call could not apply (a join with other `--nnodes`, a call of a dropped node, the
    /// rendezvous over): why, in the words the service would use.
    pub fn apply(&mut self, entry: &Entry) -> Result<(), String> {
        self.now = self.now.max(entry.at);
        let now = self.now;
        let node = &entry.node;
        if let Op::Join { settings, .. } = &entry.op {
            let run = self
                .rendezvous
                .get_or_insert_with(|| Rendezvous::new(*settings))
                .settings();
            if (settings.min_nodes, settings.max_nodes) != (run.min_nodes, run.max_nodes) {
                return Err(format!(
                    "node {node} was started with --nnodes {}:{} but this rendezvous runs --nnodes {}:{}; give every node the same --nnodes",
                    settings.min_nodes, settings.max_nodes, run.min_nodes, run.max_nodes
                ));
            }
        }
        let Some(r) = self.rendezvous.as_mut() else {
            return Err(format!("node {node} called before any node joined"));
        };
        let result = match &entry.op {
            Op::Join { desc, .. } => r.join(now, desc.clone()),
            Op::Ready(round) => r.ready(now, node, *round),
            Op::Restart { round, cause } => r.restart(now, node, *round, cause),
            Op::Finish(round) => r.finish(now, node, *round),
            Op::Leave => {
                r.leave(now, node);
                Ok(())
            }
            Op::Lose(id) => {
                r.lose(now, id);
                Ok(())
            }
            Op::Close(reason) => {
                r.close(reason);
                Ok(())
            }
            Op::Tick => {
                r.tick(now);
                Ok(())
            }
        };
        result.map_err(|e| e.to_string())
    }

    /// What `id` should know now.
    pub fn view(&self, id: &NodeId) -> View {
        match &self.rendezvous {
            Some(r) => r.view(id),
            None => View {
                round: 0,
                restart_count: 0,
                standing: Standing::Unknown,
                last_end: None,
                waiting: 0,
            },
        }
    }

    /// Members whose `alive` key is gone: each is to be lost.
    pub fn lost(&self, alive: &BTreeSet<NodeId>) -> Vec<NodeId> {
        match &self.rendezvous {
            Some(r) if r.over().is_none() => r
                .members()
                .filter(|id| !alive.contains(*id))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The wall-clock time at which a tick may change something.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.rendezvous.as_ref()?.next_deadline()
    }

    /// Whether the rendezvous is over (finished, closed or timed out).
    pub fn is_over(&self) -> bool {
        self.rendezvous.as_ref().is_some_and(|r| r.over().is_some())
    }
}

#[cfg(test)]
mod tests;
