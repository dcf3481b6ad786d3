//! Static multi-node rendezvous over the agent store, and the agents' coordination per attempt.
//!
//! # Expected flow
//! 1. Node 0's agent hosts the store on `--master-addr:--master-port`; every agent (node 0's
//!    too) connects to it, retrying until the join timeout, and claims its `--node-rank`.
//! 2. Each agent publishes its local world size; node 0 assigns contiguous global ranks,
//!    ordered by node rank, as torchrun's `_assign_worker_ranks` does.
//! 3. Per attempt: a barrier of all agents, after which node 0 clears the workers' keys; then
//!    the groups start. A failing agent publishes its root cause; every other agent watches for
//!    it and stops its own group, so one node's failure ends (and restarts) the job everywhere.
//! 4. On success, a bounded exit barrier.
//!
//! # Errors
//! Every wait is bounded by the join timeout (`--rdzv-conf join_timeout=<s>`, default 600),
//! and each error names the address, the node rank or the missing nodes.

use std::time::Duration;

use ferrun_collective::store::{StoreClient, StoreError, StoreServer};
use tokio::task::JoinHandle;

/// Where this node's workers sit in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// This node's rank.
    pub group_rank: u32,
    /// Number of nodes.
    pub group_world_size: u32,
    /// Global rank of this node's local rank 0.
    pub base_rank: u32,
    /// Workers in the whole job.
    pub world_size: u32,
}

/// Global ranks from the local world sizes of every node, in node-rank order:
/// `(base_rank, world_size)` per node.
pub fn assign_ranks(local_world_sizes: &[u32]) -> Vec<(u32, u32)> {
    let world: u32 = local_world_sizes.iter().sum();
    let mut base = 0;
    local_world_sizes
        .iter()
        .map(|&n| {
            let at = base;
            base += n;
            (at, world)
        })
        .collect()
}

/// Why the nodes could not come together.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// The store failed (unreachable master, port in use, timeout…).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another agent already claimed this node rank.
    #[error("--node-rank {0} is claimed by another agent: every node needs its own --node-rank in 0..--nnodes")]
    NodeRankTaken(u32),
    /// Some nodes never joined.
    #[error("rendezvous timed out after {after:?}: node rank(s) {missing:?} never joined {addr}; start them with the same --master-addr/--master-port, or raise --rdzv-conf join_timeout")]
    Missing {
        /// Node ranks that did not register.
        missing: Vec<u32>,
        /// The store address.
        addr: String,
        /// The join timeout.
        after: Duration,
    },
    /// A published value did not parse.
    #[error("rendezvous: malformed value for {key}: {value:?}")]
    Malformed {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// Parameters of a static multi-node rendezvous.
#[derive(Debug, Clone)]
pub struct StaticSpec {
    /// Number of nodes.
    pub nnodes: u32,
    /// This node's rank.
    pub node_rank: u32,
    /// The master's address (node 0's).
    pub master_addr: String,
    /// The store's port on node 0.
    pub master_port: u16,
    /// The run id (namespaces the agents' keys).
    pub run_id: String,
    /// Workers on this node.
    pub local_world_size: u32,
    /// Bound on joining and on every barrier.
    pub join_timeout: Duration,
    /// Bound on the exit barrier.
    pub exit_timeout: Duration,
}

/// The agents of a multi-node job, joined through the store.
#[derive(Debug)]
pub struct Peers {
    spec: StaticSpec,
    client: StoreClient,
    /// Node 0 hosts the store; kept alive for the whole run.
    server: Option<StoreServer>,
    /// This node's place in the job.
    pub assignment: Assignment,
}

/// What another node's agent published about its failure.
pub type RemoteFailure = Result<String, StoreError>;

impl Peers {
    /// Joins the job: hosts the store on node 0, connects, claims the node rank, gets ranks.
    ///
    /// # Errors
    /// [`RendezvousError`] naming what is wrong.
    pub async fn join(spec: StaticSpec) -> Result<Self, RendezvousError> {
        let server = if spec.node_rank == 0 {
            Some(crate::rendezvous::store_bind::bind_store(
                &spec.master_addr,
                spec.master_port,
            )?)
        } else {
            None
        };
        let client =
            StoreClient::connect(&spec.master_addr, spec.master_port, spec.join_timeout).await?;
        let mut client = client.prefixed(&spec.run_id);
        if client
            .add(&format!("torchelastic/node_rank/{}", spec.node_rank), 1)
            .await?
            > 1
        {
            return Err(RendezvousError::NodeRankTaken(spec.node_rank));
        }
        client
            .set(
                &format!("torchelastic/role_info/{}", spec.node_rank),
                spec.local_world_size.to_string().as_bytes(),
            )
            .await?;
        if spec.node_rank == 0 {
            let sizes = Self::gather_sizes(&mut client, &spec).await?;
            let pairs: Vec<(String, Vec<u8>)> = assign_ranks(&sizes)
                .into_iter()
                .enumerate()
                .map(|(i, (base, world))| {
                    (
                        format!("torchelastic/assigned_ranks/{i}"),
                        format!("{base},{world}").into_bytes(),
                    )
                })
                .collect();
            let refs: Vec<(&str, &[u8])> = pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect();
            client.multi_set(&refs).await?;
        }
        let key = format!("torchelastic/assigned_ranks/{}", spec.node_rank);
        let value = String::from_utf8_lossy(&client.get(&key).await?).into_owned();
        let parsed = value
            .split_once(',')
            .and_then(|(b, w)| Some((b.parse().ok()?, w.parse().ok()?)));
        let (base_rank, world_size) = parsed.ok_or(RendezvousError::Malformed { key, value })?;
        let assignment = Assignment {
            group_rank: spec.node_rank,
            group_world_size: spec.nnodes,
            base_rank,
            world_size,
        };
        Ok(Self {
            spec,
            client,
            server,
            assignment,
        })
    }

    async fn gather_sizes(
        client: &mut StoreClient,
        spec: &StaticSpec,
    ) -> Result<Vec<u32>, RendezvousError> {
        let keys: Vec<String> = (0..spec.nnodes)
            .map(|i| format!("torchelastic/role_info/{i}"))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let values = match client.multi_get(&refs).await {
            Ok(values) => values,
            Err(StoreError::Timeout { .. }) => {
                let mut missing = Vec::new();
                for (i, key) in refs.iter().enumerate() {
                    if !client.check(&[key]).await? {
                        missing.push(i as u32);
                    }
                }
                return Err(RendezvousError::Missing {
                    missing,
                    addr: client.addr().to_owned(),
                    after: spec.join_timeout,
                });
            }
            Err(e) => return Err(e.into()),
        };
        keys.iter()
            .zip(values)
            .map(|(key, v)| {
                let value = String::from_utf8_lossy(&v).into_owned();
                value.parse().map_err(|_| RendezvousError::Malformed {
                    key: key.clone(),
                    value,
                })
            })
            .collect()
    }

    /// Waits until every agent is ready for attempt `n`; node 0 then clears the workers' keys
    /// (never the agents'), so the attempt starts on a clean store. Returns a watch that
    /// completes when another node's agent reports a failure in this attempt.
    ///
    /// # Errors
    /// A store error or timeout (a node that does not come back within the join timeout).
    pub async fn begin_attempt(
        &mut self,
        n: u32,
    ) -> Result<JoinHandle<RemoteFailure>, RendezvousError> {
        let base = format!("torchelastic/attempt/{n}");
        if self.client.add(&format!("{base}/joined"), 1).await? == i64::from(self.spec.nnodes) {
            self.client.set(&format!("{base}/all_joined"), b"").await?;
        }
        if let Some(server) = &self.server {
            self.client
                .wait(&[&format!("{base}/all_joined")], self.spec.join_timeout)
                .await?;
            server.clear_except(self.client.namespace());
            self.client.set(&format!("{base}/go"), b"").await?;
        }
        self.client
            .wait(&[&format!("{base}/go")], self.spec.join_timeout)
            .await?;
        // A connection of its own: a WAIT occupies it until the key appears.
        let mut watcher = StoreClient::connect(
            &self.spec.master_addr,
            self.spec.master_port,
            self.spec.join_timeout,
        )
        .await?
        .prefixed(&self.spec.run_id);
        let key = format!("{base}/failed");
        Ok(tokio::spawn(async move {
            // Effectively unbounded: a healthy attempt may run for days; the task is aborted
            // when the attempt ends, and a lost store ends the wait with an error at once.
            let forever = Duration::from_secs(365 * 24 * 3600);
            watcher.set_timeout(forever);
            watcher.wait(&[&key], forever).await?;
            watcher.set_timeout(Duration::from_secs(30));
            watcher
                .get(&key)
                .await
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        }))
    }

    /// Tells the other agents that this node's group failed in attempt `n`.
    ///
    /// # Errors
    /// A store error.
    pub async fn publish_failure(&mut self, n: u32, summary: &str) -> Result<(), RendezvousError> {
        let key = format!("torchelastic/attempt/{n}/failed");
        // The first failure wins: it is the root cause the others report.
        self.client
            .compare_set(&key, b"", summary.as_bytes())
            .await?;
        Ok(())
    }

    /// The exit barrier after this node's workers all succeeded: waits (bounded) for the other
    /// nodes to finish too. Returns `false` when it timed out.
    ///
    /// # Errors
    /// A store error other than the timeout.
    pub async fn finish(&mut self, n: u32) -> Result<bool, RendezvousError> {
        let base = format!("torchelastic/attempt/{n}");
        if self.client.add(&format!("{base}/succeeded"), 1).await? == i64::from(self.spec.nnodes) {
            self.client
                .set(&format!("{base}/all_succeeded"), b"")
                .await?;
        }
        match self
            .client
            .wait(&[&format!("{base}/all_succeeded")], self.spec.exit_timeout)
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Timeout { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Leaves the job. Node 0 keeps the store up until every agent has left (bounded by the
    /// exit timeout), so that none of them loses it mid-exit.
    pub async fn leave(mut self) {
        let left = self.client.add("torchelastic/left", 1).await;
        if left.is_ok_and(|n| n == i64::from(self.spec.nnodes)) {
            let _ = self.client.set("torchelastic/all_left", b"").await;
        }
        if self.server.is_some() {
            // The others only need the store for the moment it takes them to read their last
            // keys; an agent that died must not hold node 0 for the whole exit timeout.
            let bound = self.spec.exit_timeout.min(Duration::from_secs(30));
            if self
                .client
                .wait(&["torchelastic/all_left"], bound)
                .await
                .is_err()
            {
                tracing::warn!("not every node left within {bound:?}; shutting the store down");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_contiguous_per_node_in_node_rank_order() {
        assert_eq!(assign_ranks(&[2, 2]), [(0, 4), (2, 4)]);
        assert_eq!(assign_ranks(&[4, 1, 3]), [(0, 8), (4, 8), (5, 8)]);
    }

    fn spec(node_rank: u32, port: u16) -> StaticSpec {
        StaticSpec {
            nnodes: 2,
            node_rank,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            run_id: "job".into(),
            local_world_size: 1 + node_rank,
            join_timeout: Duration::from_secs(5),
            exit_timeout: Duration::from_secs(5),
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("port")
    }

    #[tokio::test]
    async fn two_agents_join_and_one_failure_reaches_the_other() {
        let port = free_port();
        let node1 = tokio::spawn(Peers::join(spec(1, port)));
        let mut node0 = Peers::join(spec(0, port)).await.expect("node 0 joins");
        let mut node1 = node1
            .await
            .expect("task")
            .expect("node 1 joins (started first)");
        assert_eq!(
            node0.assignment,
            Assignment {
                group_rank: 0,
                group_world_size: 2,
                base_rank: 0,
                world_size: 3
            }
        );
        assert_eq!(node1.assignment.base_rank, 1);
        let (w0, w1) = tokio::join!(node0.begin_attempt(0), node1.begin_attempt(0));
        let (w0, _w1) = (w0.expect("attempt 0"), w1.expect("attempt 0"));
        node1
            .publish_failure(0, "rank 2 exited with 1")
            .await
            .expect("publish");
        assert_eq!(
            w0.await.expect("task").expect("watch"),
            "rank 2 exited with 1"
        );
    }

    #[tokio::test]
    async fn a_second_agent_with_the_same_node_rank_is_refused() {
        let port = free_port();
        let _node0 = tokio::spawn(Peers::join(spec(0, port)));
        let mut twin = spec(1, port);
        let first = tokio::spawn(Peers::join(twin.clone()));
        twin.join_timeout = Duration::from_secs(2);
        let results = [first.await.expect("task"), Peers::join(twin).await];
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(RendezvousError::NodeRankTaken(1))))
            .count();
        assert_eq!(refused, 1, "{results:?}");
    }
}
