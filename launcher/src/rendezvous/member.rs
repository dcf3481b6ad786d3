//! One node's membership in an elastic rendezvous, whichever backend keeps the rounds: the
//! rendezvous service (`c10d`) or etcd (`etcd`, `etcd-v2`). The agent's round loop calls
//! these and reads the same [`Views`] from either.

use std::time::Instant;

use tokio::task::JoinHandle;

use crate::rendezvous::elastic::{Backend, ElasticSpec};
use crate::rendezvous::etcd::{EtcdError, EtcdMember};
use crate::rendezvous::round::NodeDesc;
use crate::rendezvous::service::client::{ClientError, ElasticClient, Views};

/// Why a call to the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// The rendezvous service.
    #[error(transparent)]
    Service(#[from] ClientError),
    /// etcd.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// A node's membership.
pub enum Member {
    /// Through the rendezvous service.
    Service(Box<ElasticClient>),
    /// Through etcd.
    Etcd(Box<EtcdMember>),
}

impl Member {
    /// A member for `node` of the rendezvous `spec` names; it connects when it joins.
    ///
    /// # Errors
    /// The endpoint is unusable.
    pub async fn new(spec: &ElasticSpec, node: NodeDesc) -> Result<Self, MemberError> {
        Ok(match &spec.backend {
            Backend::Service => Self::Service(Box::new(ElasticClient::new(
                &spec.endpoint(),
                spec.token.as_ref(),
                spec.tls.as_ref(),
                &spec.run_id,
                node,
            )?)),
            Backend::Etcd { urls, prefix } => Self::Etcd(Box::new(
                EtcdMember::new(
                    urls,
                    prefix,
                    &spec.run_id,
                    node,
                    spec.settings,
                    spec.keep_alive,
                    spec.tls.as_ref(),
                )
                .await?,
            )),
        })
    }

    /// This node.
    pub fn node(&self) -> &NodeDesc {
        match self {
            Self::Service(c) => c.node(),
            Self::Etcd(e) => e.node(),
        }
    }

    /// Joins, retrying while the rendezvous cannot be reached, until `deadline`.
    ///
    /// # Errors
    /// Unreachable by `deadline`, or the join was refused.
    pub async fn join(&self, spec: &ElasticSpec, deadline: Instant) -> Result<(), MemberError> {
        let (min, max) = (spec.settings.min_nodes, spec.settings.max_nodes);
        match self {
            Self::Service(c) => c.join(min, max, deadline).await.map(drop)?,
            Self::Etcd(e) => e.join(deadline).await?,
        }
        Ok(())
    }

    /// This node's view, kept current, and the tasks that keep it (and this node's liveness)
    /// going; the caller aborts them when done.
    ///
    /// # Errors
    /// The service refused the watch.
    pub async fn watch(
        &self,
        spec: &ElasticSpec,
    ) -> Result<(Views, Vec<JoinHandle<()>>), MemberError> {
        Ok(match self {
            Self::Service(c) => {
                let (views, tasks) = c
                    .watch(spec.keep_alive, spec.settings.heartbeat_timeout)
                    .await?;
                (views, tasks.into())
            }
            Self::Etcd(e) => e.watch(),
        })
    }

    /// This node's workers failed `round`: a counted restart on every node.
    ///
    /// # Errors
    /// The rendezvous did not take it.
    pub async fn restart(&self, round: u64, cause: &str) -> Result<(), MemberError> {
        match self {
            Self::Service(c) => c.restart(round, cause).await?,
            Self::Etcd(e) => e.restart(round, cause).await?,
        }
        Ok(())
    }

    /// This node stopped its earlier workers and is ready to start `round`'s.
    ///
    /// # Errors
    /// The rendezvous did not take it.
    pub async fn ready(&self, round: u64) -> Result<(), MemberError> {
        match self {
            Self::Service(c) => c.ready(round).await?,
            Self::Etcd(e) => e.ready(round).await?,
        }
        Ok(())
    }

    /// This node's workers finished `round`.
    ///
    /// # Errors
    /// The rendezvous did not take it.
    pub async fn finish(&self, round: u64) -> Result<(), MemberError> {
        match self {
            Self::Service(c) => c.finish(round).await?,
            Self::Etcd(e) => e.finish(round).await?,
        }
        Ok(())
    }

    /// Leaves (best effort).
    pub async fn leave(&self) {
        match self {
            Self::Service(c) => c.leave().await,
            Self::Etcd(e) => e.leave().await,
        }
    }

    /// Ends the rendezvous for every node.
    ///
    /// # Errors
    /// The rendezvous did not take it.
    pub async fn close(&self, reason: &str) -> Result<(), MemberError> {
        match self {
            Self::Service(c) => c.close(reason).await?,
            Self::Etcd(e) => e.close(reason).await?,
        }
        Ok(())
    }
}
