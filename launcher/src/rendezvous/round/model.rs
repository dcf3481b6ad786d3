//! What goes into the rendezvous and what each node is told: node descriptors, settings,
//! views, and the errors of calls that cannot apply.

use std::sync::Arc;
use std::time::Duration;

/// Nodes that may wait beyond MAX at once; more joins are refused (a flood, not a job).
pub const MAX_WAITING: usize = 65_536;
/// Most nodes a round may have (`--nnodes` MAX).
pub const MAX_NODES: u32 = 65_536;
/// Workers one node may declare.
pub const MAX_NPROC: u32 = 65_536;

/// A node's identity in the rendezvous, chosen by its agent: unique per agent process.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub String);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a node says about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDesc {
    /// Its identity.
    pub id: NodeId,
    /// An address the other nodes reach it at.
    pub addr: String,
    /// The port of its agent store: the job's MASTER_PORT in rounds where it has rank 0.
    pub store_port: u16,
    /// Its workers (`--nproc-per-node`).
    pub nproc: u32,
}

/// The rendezvous' parameters (torchrun's `--nnodes` and `--rdzv-conf` timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// MIN of `--nnodes MIN:MAX`.
    pub min_nodes: u32,
    /// MAX of `--nnodes MIN:MAX`.
    pub max_nodes: u32,
    /// How long a round may take to gather MIN nodes (`join_timeout`, 600 s).
    pub join_timeout: Duration,
    /// How long a round with MIN nodes waits for more (`last_call_timeout`, 30 s).
    pub last_call_timeout: Duration,
    /// Silence after which a node is lost (`keep_alive_interval` × `keep_alive_max_attempt`).
    pub heartbeat_timeout: Duration,
}

/// Why a running round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoundEnd {
    /// A participant's workers failed; the restart counts against `--max-restarts`.
    Failed {
        /// The node whose workers failed.
        node: NodeId,
        /// Its root cause, in one line.
        cause: String,
    },
    /// These participants stopped sending heartbeats.
    Lost(Vec<NodeId>),
    /// This participant left.
    Left(NodeId),
    /// This node joined while the round had room for it.
    ScaleUp(NodeId),
}

impl RoundEnd {
    /// Whether this end uses up one of `--max-restarts`.
    pub fn is_counted(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }
}

/// Where one node of a completed round sits, and where the job's master is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// This node's rank (`GROUP_RANK`).
    pub node_rank: u32,
    /// Nodes in the round (`GROUP_WORLD_SIZE`).
    pub nnodes: u32,
    /// Global rank of this node's local rank 0.
    pub base_rank: u32,
    /// Workers in the round (`WORLD_SIZE`).
    pub world_size: u32,
    /// Node 0's address (`MASTER_ADDR`).
    pub master_addr: String,
    /// Node 0's agent store port (`MASTER_PORT`).
    pub master_port: u16,
    /// Every node of the round is ready: start the workers.
    pub all_ready: bool,
    /// For node 0 (which serves the round's store): every node's address in rank order, the
    /// hosts its store admits when the job has a token. Empty for the other nodes.
    pub hosts: Arc<[String]>,
}

/// A node's standing in the rendezvous.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    /// In the round being gathered.
    Gathering {
        /// Nodes in it so far.
        joined: u32,
    },
    /// In the completed round, at this place.
    Assigned(Placement),
    /// Beyond MAX (or joined while the round is full): waits for a later round.
    Waiting,
    /// Not a member: never joined, left, or dropped for silence (it may join again).
    Unknown,
    /// Every node of the completed round finished it successfully: the job is done.
    Finished,
    /// The rendezvous is over.
    Closed {
        /// Why, as the closing node said.
        reason: String,
    },
    /// A round did not gather MIN nodes within the join timeout.
    TimedOut {
        /// The nodes that had joined it.
        joined: Vec<NodeId>,
    },
}

/// What one node should know now: pushed to it whenever [`Rendezvous::revision`] moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The current round.
    pub round: u64,
    /// Counted restarts so far (`TORCHELASTIC_RESTART_COUNT` of the round's workers).
    pub restart_count: u32,
    /// This node's standing.
    pub standing: Standing,
    /// Why the previous round ended.
    pub last_end: Option<RoundEnd>,
    /// Nodes waiting beyond the round.
    pub waiting: u32,
}

impl View {
    /// The rendezvous is over for this node: finished, closed or timed out.
    pub fn is_over(&self) -> bool {
        matches!(
            self.standing,
            Standing::Finished | Standing::Closed { .. } | Standing::TimedOut { .. }
        )
    }
}

/// A call that cannot apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    /// The rendezvous was closed.
    #[error("the rendezvous is closed: {0}")]
    Closed(String),
    /// Every node finished: the job is done.
    #[error(
        "the job's rendezvous is over: every node finished; start a new job with a new --rdzv-id"
    )]
    Finished,
    /// A round timed out; the rendezvous is over.
    #[error("the rendezvous timed out: {joined} of at least {min} nodes joined within the join timeout ({names}); start the missing nodes with the same --rdzv-endpoint and --rdzv-id, or raise --rdzv-conf join_timeout")]
    TimedOut {
        /// How many joined.
        joined: u32,
        /// MIN.
        min: u32,
        /// Their ids.
        names: String,
    },
    /// The node is not a member (never joined, or dropped for silence): it must join again.
    #[error("node {0} is not in the rendezvous (it left or was dropped after its heartbeats stopped); join again")]
    UnknownNode(NodeId),
    /// A node asked to restart a round it is not part of.
    #[error("node {0} is not a participant of the running round")]
    NotParticipant(NodeId),
    /// A node's descriptor is unusable.
    #[error("node {id}: {problem}")]
    InvalidNode {
        /// The node.
        id: NodeId,
        /// What is wrong, and the fix.
        problem: String,
    },
    /// Too many nodes wait already.
    #[error("{MAX_WAITING} nodes wait for a round already; refusing node {0}")]
    Full(NodeId),
}
