//! The elastic rendezvous kept in etcd v3 (`--rdzv-backend etcd`, or `etcd-v2` by torchrun's
//! name): the same rounds as the rendezvous service, for users whose HA etcd should hold
//! them, so no training node hosts anything and the job survives the loss of any one.
//!
//! # Expected flow
//! [`EtcdMember::join`] connects (retrying until the join timeout), puts this node's `alive`
//! key on a lease, starts two tasks — the keeper renews the lease (and puts the key again
//! should the lease be lost), the follower replays the run's [`log`] and then watches it —
//! and appends the node's join. Every later call is an entry appended to the log; every view
//! comes from the follower's replica, pushed by etcd's watch, never polled. The follower
//! also appends `lose` for a member whose `alive` key disappears and `tick` when a deadline
//! of the round passes; any agent may, and duplicates are harmless.
//!
//! If etcd goes away, both tasks retry; on reconnecting the follower replays the log afresh
//! (a restarted etcd keeps its data and renews every lease when a leader is elected). Only
//! an outage longer than the join timeout ends this node's run.
//!
//! # Trust
//! See [`log`]: entries are bounded and checked before replay. Access to the prefix is
//! etcd's to guard (its users and TLS); the job's rendezvous token, if given, only narrows
//! the round's agent store to the round's hosts (see `store_bind`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::rendezvous::round::{NodeDesc, NodeId, Settings, View};
use crate::rendezvous::service::client::Views;
use crate::rendezvous::service::Tls;

pub mod log;

use log::{Entry, Keys, Op, Replica};

/// Where a run's keys live unless `--rdzv-conf etcd_prefix` says otherwise.
pub const DEFAULT_PREFIX: &str = "/ferrun/rendezvous";
/// etcd's client port.
pub const DEFAULT_PORT: u16 = 2379;
/// How long one call to etcd may take before it is retried.
const CALL_BOUND: Duration = Duration::from_secs(5);
/// Pause between tries while etcd does not answer.
const RETRY: Duration = Duration::from_millis(200);
/// Results of this node's own entries kept for its calls to read.
const OWN_RESULTS: usize = 64;

/// Why a call to the etcd rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd did not answer in time.
    #[error(
        "etcd at {endpoints} did not answer within {after:?} ({last}); {}",
        fix_for(last, endpoints)
    )]
    Unreachable {
        /// The endpoints.
        endpoints: String,
        /// How long the agent tried.
        after: Duration,
        /// The last error seen.
        last: String,
    },
    /// The rendezvous refused this node's join.
    #[error("the etcd rendezvous at {endpoints} refused node {node}: {message}")]
    Refused {
        /// The endpoints.
        endpoints: String,
        /// This node.
        node: NodeId,
        /// Why, in the state machine's words.
        message: String,
    },
}

/// The fix for what etcd's last error says: a TLS handshake that failed (or a TLS connection
/// etcd closed) needs other files, anything else the address or more time.
fn fix_for(last: &str, endpoints: &str) -> &'static str {
    // etcd refuses a client certificate after the client's side of the handshake is done:
    // the client may see only the connection it then closes.
    let closed_over_tls = endpoints.contains("https://")
        && ["closed", "canceled", "reset"]
            .iter()
            .any(|w| last.contains(w));
    if tls_failure(last) || closed_over_tls {
        "the TLS handshake failed: check --rdzv-conf cacert (the CA that signed etcd's certificate) and cert/key (a client certificate etcd trusts)"
    } else {
        "check that etcd runs there and the address and port (--rdzv-endpoint host:port[,host:port...]), or raise --rdzv-conf join_timeout"
    }
}

/// Whether an error of etcd's client says the TLS handshake failed.
fn tls_failure(error: &str) -> bool {
    ["certificate", "Certificate", "tls", "TLS", "handshake"]
        .iter()
        .any(|w| error.contains(w))
}

/// The error worth reporting of `kept` and `new`: a failed TLS handshake stays, because the
/// retries after it may only see the connection the peer closed.
fn telling(kept: String, new: String) -> String {
    if kept.is_empty() || !tls_failure(&kept) || tls_failure(&new) {
        new
    } else {
        kept
    }
}

/// What the tasks and the calls share.
struct Inner {
    replica: Replica,
    /// Results of this node's own entries, by revision.
    own: BTreeMap<i64, Result<(), String>>,
    alive: BTreeSet<NodeId>,
    /// Members whose loss this node appended already.
    lose_sent: BTreeSet<NodeId>,
    /// The deadline this node appended a tick for already.
    tick_sent: Option<Duration>,
}

/// One node's membership in an etcd-kept rendezvous.
pub struct EtcdMember {
    client: Client,
    endpoints: String,
    keys: Keys,
    node: NodeDesc,
    settings: Settings,
    keep_alive: Duration,
    seq: Arc<std::sync::atomic::AtomicU64>,
    inner: Arc<Mutex<Inner>>,
    /// The latest revision the follower replayed.
    applied: watch::Sender<i64>,
    views: Arc<watch::Sender<Result<View, String>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

fn wall_clock() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

/// etcd-client's URLs for `host:port,...` (a bare host gets etcd's port).
pub fn urls(endpoints: &[(String, u16)], tls: bool) -> Vec<String> {
    let scheme = if tls { "https" } else { "http" };
    endpoints
        .iter()
        .map(|(host, port)| {
            if host.contains(':') {
                format!("{scheme}://[{host}]:{port}")
            } else {
                format!("{scheme}://{host}:{port}")
            }
        })
        .collect()
}

impl EtcdMember {
    /// A member for `node` in `run_id`'s rendezvous in the etcd at `urls` under `prefix`; it
    /// connects on [`EtcdMember::join`], over TLS when `tls` is given (URLs `https://`).
    ///
    /// # Errors
    /// The URLs are unusable.
    pub async fn new(
        urls: &[String],
        prefix: &str,
        run_id: &str,
        node: NodeDesc,
        settings: Settings,
        keep_alive: Duration,
        tls: Option<&Tls>,
    ) -> Result<Self, EtcdError> {
        let endpoints = urls.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CALL_BOUND)
            .with_timeout(CALL_BOUND)
            .with_keep_alive(keep_alive, CALL_BOUND);
        if let Some(tls) = tls {
            options = options.with_tls(tls.client_of_etcd());
        }
        let client =
            Client::connect(urls, Some(options))
                .await
                .map_err(|e| EtcdError::Unreachable {
                    endpoints: endpoints.clone(),
                    after: Duration::ZERO,
                    last: e.to_string(),
                })?;
        let first = Ok(Replica::new().view(&node.id));
        Ok(Self {
            client,
            endpoints,
            keys: Keys::new(prefix, run_id),
            node,
            settings,
            keep_alive,
            seq: Arc::default(),
            inner: Arc::new(Mutex::new(Inner {
                replica: Replica::new(),
                own: BTreeMap::new(),
                alive: BTreeSet::new(),
                lose_sent: BTreeSet::new(),
                tick_sent: None,
            })),
            applied: watch::channel(0).0,
            views: Arc::new(watch::channel(first).0),
            tasks: Mutex::new(Vec::new()),
        })
    }

    /// This node.
    pub fn node(&self) -> &NodeDesc {
        &self.node
    }

    /// The lease's time to live: the heartbeat timeout, in whole seconds (etcd's unit).
    fn ttl(&self) -> i64 {
        let secs = self.settings.heartbeat_timeout.as_secs_f64().ceil();
        // etcd raises anything shorter to its minimum anyway.
        (secs as i64).max(2)
    }

    /// Joins the rendezvous: lease, tasks, the join entry; then waits for its result.
    ///
    /// # Errors
    /// etcd did not answer by `deadline`, or the state machine refused the join.
    pub async fn join(&self, deadline: Instant) -> Result<(), EtcdError> {
        let started = Instant::now();
        let mut last = String::new();
        let lease = loop {
            match grant(&self.client, self.keys.alive_of(&self.node.id), self.ttl()).await {
                Ok(lease) => break lease,
                Err(e) if Instant::now() < deadline => {
                    last = telling(last, e);
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoints.clone(),
                        after: started.elapsed(),
                        last: telling(last, e),
                    })
                }
            }
        };
        self.start_tasks(lease);
        let op = Op::Join {
            desc: self.node.clone(),
            settings: self.settings,
        };
        let revision = self.append_until(op, deadline).await?;
        let mut applied = self.applied.subscribe();
        let waited = tokio::time::timeout_at(
            deadline.into(),
            applied.wait_for(|&applied| applied >= revision),
        )
        .await;
        if waited.is_err() {
            return Err(self.unreachable(started, "the join was written but not read back"));
        }
        match lock(&self.inner).own.get(&revision).cloned() {
            Some(Err(message)) => Err(EtcdError::Refused {
                endpoints: self.endpoints.clone(),
                node: self.node.id.clone(),
                message,
            }),
            _ => Ok(()),
        }
    }

    fn unreachable(&self, started: Instant, last: &str) -> EtcdError {
        EtcdError::Unreachable {
            endpoints: self.endpoints.clone(),
            after: started.elapsed(),
            last: last.to_owned(),
        }
    }

    fn start_tasks(&self, lease: i64) {
        let mut tasks = lock(&self.tasks);
        if !tasks.is_empty() {
            return;
        }
        let follower = follow::Follower {
            client: self.client.clone(),
            endpoints: self.endpoints.clone(),
            keys: self.keys.clone(),
            me: self.node.id.clone(),
            seq: self.seq.clone(),
            inner: self.inner.clone(),
            applied: self.applied.clone(),
            views: self.views.clone(),
            outage: self.settings.join_timeout,
        };
        tasks.push(tokio::spawn(follower.run()));
        let keeper = keep::Keeper {
            client: self.client.clone(),
            alive_key: self.keys.alive_of(&self.node.id),
            ttl: self.ttl(),
            interval: self.keep_alive,
        };
        tasks.push(tokio::spawn(keeper.run(lease)));
    }

    /// This node's view, kept current by the follower, and the tasks behind it (the caller
    /// aborts them when done).
    pub fn watch(&self) -> (Views, Vec<JoinHandle<()>>) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        (self.views.subscribe(), tasks)
    }

    async fn append_until(&self, op: Op, deadline: Instant) -> Result<i64, EtcdError> {
        let started = Instant::now();
        append(
            &self.client,
            &self.keys,
            &self.node.id,
            &self.seq,
            op,
            deadline,
        )
        .await
        .map_err(|last| self.unreachable(started, &last))
    }

    async fn append_bounded(&self, op: Op) -> Result<(), EtcdError> {
        self.append_until(op, Instant::now() + CALL_BOUND * 2)
            .await
            .map(drop)
    }

    /// This node's workers failed `round`: a counted restart everywhere.
    ///
    /// # Errors
    /// etcd did not take the entry.
    pub async fn restart(&self, round: u64, cause: &str) -> Result<(), EtcdError> {
        let cause = truncated(cause);
        self.append_bounded(Op::Restart { round, cause }).await
    }

    /// This node stopped its earlier workers and is ready to start `round`'s.
    ///
    /// # Errors
    /// etcd did not take the entry.
    pub async fn ready(&self, round: u64) -> Result<(), EtcdError> {
        self.append_bounded(Op::Ready(round)).await
    }

    /// This node's workers finished `round`.
    ///
    /// # Errors
    /// etcd did not take the entry.
    pub async fn finish(&self, round: u64) -> Result<(), EtcdError> {
        self.append_bounded(Op::Finish(round)).await
    }

    /// Leaves the rendezvous (best effort: the lease runs out anyway).
    pub async fn leave(&self) {
        if let Err(e) = self.append_bounded(Op::Leave).await {
            tracing::debug!("could not say that this node leaves: {e}");
        }
    }

    /// Ends the rendezvous for every node.
    ///
    /// # Errors
    /// etcd did not take the entry.
    pub async fn close(&self, reason: &str) -> Result<(), EtcdError> {
        self.append_bounded(Op::Close(truncated(reason))).await
    }
}

/// `text` cut to what an entry may carry.
fn truncated(text: &str) -> String {
    let max = crate::rendezvous::service::wire::MAX_CAUSE;
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// Appends `op` by `me` as a new key (written only if absent, so a retry after a lost
/// answer cannot write it twice); retried until `deadline`. The entry's revision.
async fn append(
    client: &Client,
    keys: &Keys,
    me: &NodeId,
    seq: &std::sync::atomic::AtomicU64,
    op: Op,
    deadline: Instant,
) -> Result<i64, String> {
    let key = keys.entry(me, seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let value = Entry {
        at: wall_clock(),
        node: me.clone(),
        op,
    }
    .encode();
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), value, None)])
        .or_else([TxnOp::get(key, None)]);
    loop {
        let mut client = client.clone();
        let tried = tokio::time::timeout(CALL_BOUND, client.txn(txn.clone())).await;
        let last = match tried {
            Ok(Ok(response)) => {
                // Written now: the answer's revision; written by an earlier try whose
                // answer was lost: the key's. Either must be there (etcd always sends them).
                let revision = if response.succeeded() {
                    response.header().map(|h| h.revision())
                } else {
                    response.op_responses().into_iter().find_map(|r| match r {
                        etcd_client::TxnOpResponse::Get(get) => {
                            get.kvs().first().map(|kv| kv.create_revision())
                        }
                        _ => None,
                    })
                };
                return revision
                    .filter(|&r| r > 0)
                    .ok_or_else(|| "etcd took the entry but said no revision for it".to_owned());
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {CALL_BOUND:?}"),
        };
        if Instant::now() + RETRY >= deadline {
            return Err(last);
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A fresh lease of `ttl` seconds with `alive_key` on it.
async fn grant(client: &Client, alive_key: String, ttl: i64) -> Result<i64, String> {
    let mut client = client.clone();
    let granted = tokio::time::timeout(CALL_BOUND, async move {
        let lease = client.lease_grant(ttl, None).await?.id();
        let options = PutOptions::new().with_lease(lease);
        client.put(alive_key, "", Some(options)).await?;
        Ok::<_, etcd_client::Error>(lease)
    })
    .await;
    match granted {
        Ok(Ok(lease)) => Ok(lease),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {CALL_BOUND:?}")),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

mod follow;
mod keep;

/// Options of a range over a prefix, oldest key first.
fn prefix_sorted() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
}

/// A watch of a prefix from `revision` on.
fn watch_from(revision: i64) -> WatchOptions {
    WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision)
}

fn is_put(event: &etcd_client::Event) -> bool {
    event.event_type() == EventType::Put
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_tls_handshake_outlives_the_closed_connections_after_it() {
        let tls = "invalid peer certificate: BadSignature".to_owned();
        let closed = "operation was canceled: connection closed".to_owned();
        assert_eq!(telling(String::new(), closed.clone()), closed);
        assert_eq!(telling(closed.clone(), tls.clone()), tls);
        assert_eq!(telling(tls.clone(), closed.clone()), tls);
        let err = EtcdError::Unreachable {
            endpoints: "https://etcd:2379".into(),
            after: Duration::from_secs(2),
            last: telling(tls, closed),
        };
        assert!(
            err.to_string().contains("the TLS handshake failed"),
            "{err}"
        );
    }
}
