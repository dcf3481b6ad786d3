//! The keeper: renews this node's lease every keep-alive interval, and when the lease is
//! gone (etcd lost it, or this node was cut off past its time to live) takes a new one and
//! puts the node's `alive` key on it again, so the node can join again.

use std::time::Duration;

use etcd_client::Client;

use super::{grant, CALL_BOUND, RETRY};

pub(super) struct Keeper {
    pub(super) client: Client,
    pub(super) alive_key: String,
    pub(super) ttl: i64,
    pub(super) interval: Duration,
}

/// Why renewing stopped.
enum Stopped {
    /// The lease no longer exists.
    Gone,
    /// etcd did not answer.
    Broken(String),
}

impl Keeper {
    pub(super) async fn run(self, mut lease: i64) {
        loop {
            match self.renew(lease).await {
                Stopped::Gone => {
                    tracing::warn!("this node's etcd lease ran out; taking a new one");
                    lease = self.regrant().await;
                }
                Stopped::Broken(why) => {
                    tracing::debug!("etcd lease keep-alive: {why}; retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    async fn renew(&self, lease: i64) -> Stopped {
        let mut client = self.client.clone();
        let (mut keeper, mut stream) =
            match tokio::time::timeout(CALL_BOUND, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return Stopped::Broken(e.to_string()),
                Err(_) => return Stopped::Broken(format!("no answer within {CALL_BOUND:?}")),
            };
        let mut every = tokio::time::interval(self.interval);
        loop {
            every.tick().await;
            if let Err(e) = keeper.keep_alive().await {
                return Stopped::Broken(e.to_string());
            }
            match tokio::time::timeout(CALL_BOUND, stream.message()).await {
                Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Stopped::Gone,
                Ok(Ok(None)) => return Stopped::Broken("the keep-alive stream ended".into()),
                Ok(Err(e)) => return Stopped::Broken(e.to_string()),
                Err(_) => return Stopped::Broken(format!("no answer within {CALL_BOUND:?}")),
            }
        }
    }

    /// A new lease with the `alive` key on it; retried until etcd gives one.
    async fn regrant(&self) -> i64 {
        loop {
            match grant(&self.client, self.alive_key.clone(), self.ttl).await {
                Ok(lease) => return lease,
                Err(e) => tracing::debug!("etcd lease grant: {e}; retrying"),
            }
            tokio::time::sleep(RETRY).await;
        }
    }
}
