//! The follower: replays the run's log, then watches the run's prefix and applies each new
//! entry as etcd delivers it; appends `lose` for members whose lease is gone and `tick` when
//! a deadline of the round passes.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, KeyValue};
use tokio::sync::watch;

use super::log::{Entry, Keys, Op};
use super::{
    append, is_put, lock, prefix_sorted, wall_clock, watch_from, Inner, CALL_BOUND, OWN_RESULTS,
    RETRY,
};
use crate::rendezvous::round::{NodeId, View};

pub(super) struct Follower {
    pub(super) client: Client,
    pub(super) endpoints: String,
    pub(super) keys: Keys,
    pub(super) me: NodeId,
    pub(super) seq: Arc<AtomicU64>,
    pub(super) inner: Arc<Mutex<Inner>>,
    pub(super) applied: watch::Sender<i64>,
    pub(super) views: Arc<watch::Sender<Result<View, String>>>,
    /// How long etcd may be out of reach before this node gives up.
    pub(super) outage: Duration,
}

/// Why a session with etcd ended.
enum Ended {
    /// The rendezvous is over: nothing more to follow.
    Over,
    /// etcd went away or cancelled the watch: follow again from a fresh replay.
    Broken(String),
}

impl Follower {
    pub(super) async fn run(self) {
        let mut down_since: Option<Instant> = None;
        loop {
            match self.session(&mut down_since).await {
                Ended::Over => return,
                Ended::Broken(why) => {
                    let since = *down_since.get_or_insert_with(Instant::now);
                    tracing::warn!("etcd rendezvous at {}: {why}; reconnecting", self.endpoints);
                    if since.elapsed() > self.outage {
                        let _ = self.views.send(Err(format!(
                            "lost the etcd rendezvous at {}: {why} (out of reach for {:?}, longer than the join timeout)",
                            self.endpoints,
                            since.elapsed()
                        )));
                        return;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// One connection's worth of following: replay, then watch.
    async fn session(&self, down_since: &mut Option<Instant>) -> Ended {
        let mut client = self.client.clone();
        let snapshot = tokio::time::timeout(
            CALL_BOUND,
            client.get(self.keys.run(), Some(prefix_sorted())),
        )
        .await;
        let snapshot = match snapshot {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(e)) => return Ended::Broken(e.to_string()),
            Err(_) => return Ended::Broken(format!("no answer within {CALL_BOUND:?}")),
        };
        let Some(revision) = snapshot.header().map(|h| h.revision()) else {
            return Ended::Broken("etcd's answer had no revision".into());
        };
        {
            let mut inner = lock(&self.inner);
            inner.replica = super::Replica::new();
            inner.own.clear();
            inner.alive.clear();
            inner.lose_sent.clear();
            inner.tick_sent = None;
            for kv in snapshot.kvs() {
                self.take(&mut inner, kv, true);
            }
        }
        *down_since = None;
        self.publish(revision);
        let mut stream = match client
            .watch(self.keys.run(), Some(watch_from(revision + 1)))
            .await
        {
            Ok(stream) => stream,
            Err(e) => return Ended::Broken(e.to_string()),
        };
        loop {
            if lock(&self.inner).replica.is_over() {
                return Ended::Over;
            }
            self.lose_the_silent().await;
            let tick_at = self.due_tick();
            let message = tokio::select! {
                message = stream.message() => message,
                () = sleep_until_wall(tick_at) => {
                    lock(&self.inner).tick_sent = tick_at;
                    self.send(Op::Tick).await;
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) => return Ended::Broken("the watch ended".into()),
                Err(e) => return Ended::Broken(e.to_string()),
            };
            if response.canceled() {
                return Ended::Broken(format!(
                    "the watch was cancelled ({})",
                    response.cancel_reason()
                ));
            }
            // Without a header the events' own revisions say how far this replica is.
            let mut latest = response.header().map_or(0, |h| h.revision());
            {
                let mut inner = lock(&self.inner);
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    latest = latest.max(kv.mod_revision());
                    self.take(&mut inner, kv, is_put(event));
                }
            }
            self.publish(latest);
        }
    }

    /// One key of the run, put (`true`) or deleted.
    fn take(&self, inner: &mut Inner, kv: &KeyValue, put: bool) {
        if let Some(node) = self.keys.node_of(kv.key()) {
            if put {
                inner.alive.insert(node);
            } else {
                inner.alive.remove(&node);
                inner.lose_sent.remove(&node);
            }
            return;
        }
        // Entries are written once; a key put again was not written by an agent.
        if !put || !kv.key().starts_with(self.keys.log().as_bytes()) || kv.version() != 1 {
            return;
        }
        let entry = match Entry::decode(kv.value()) {
            Ok(entry) => entry,
            Err(why) => {
                tracing::warn!(
                    "etcd rendezvous: skipping log entry {}: {why}",
                    String::from_utf8_lossy(kv.key())
                );
                return;
            }
        };
        let result = inner.replica.apply(&entry);
        if entry.node == self.me {
            inner.own.insert(kv.create_revision(), result);
            while inner.own.len() > OWN_RESULTS {
                inner.own.pop_first();
            }
        } else if let Err(why) = result {
            tracing::debug!(
                "etcd rendezvous: {}'s call did not apply: {why}",
                entry.node
            );
        }
    }

    fn publish(&self, revision: i64) {
        let view = lock(&self.inner).replica.view(&self.me);
        self.views.send_if_modified(|current| {
            let changed = current.as_ref() != Ok(&view);
            if changed {
                *current = Ok(view);
            }
            changed
        });
        self.applied.send_if_modified(|applied| {
            let moved = revision > *applied;
            *applied = (*applied).max(revision);
            moved
        });
    }

    /// Appends the loss of every member whose lease is gone (once each).
    async fn lose_the_silent(&self) {
        let lost: Vec<NodeId> = {
            let mut inner = lock(&self.inner);
            let lost: Vec<NodeId> = inner
                .replica
                .lost(&inner.alive)
                .into_iter()
                .filter(|id| !inner.lose_sent.contains(id))
                .collect();
            inner.lose_sent.extend(lost.iter().cloned());
            lost
        };
        for id in lost {
            tracing::info!("etcd rendezvous: node {id}'s lease is gone: it is lost");
            self.send(Op::Lose(id)).await;
        }
    }

    /// The round's next deadline, unless this node ticked for it already.
    fn due_tick(&self) -> Option<Duration> {
        let inner = lock(&self.inner);
        let next = inner.replica.next_deadline()?;
        (inner.tick_sent != Some(next)).then_some(next)
    }

    async fn send(&self, op: Op) {
        let deadline = Instant::now() + CALL_BOUND;
        if let Err(e) = append(&self.client, &self.keys, &self.me, &self.seq, op, deadline).await {
            tracing::debug!("etcd rendezvous: could not append: {e}");
        }
    }
}

/// Sleeps until the wall-clock time `at` (forever when `None`).
async fn sleep_until_wall(at: Option<Duration>) {
    match at {
        Some(at) => tokio::time::sleep(at.saturating_sub(wall_clock())).await,
        None => std::future::pending().await,
    }
}
