//! An agent's side of the rendezvous service: join (retrying while the service is not up
//! yet), a watch of its view, heartbeats, and the calls that end a round or the run.
//!
//! # Trust
//! The service holds the job's token, so its views are believed as far as their meaning goes,
//! but their numbers are checked ([`wire::view_in`]) before they become a worker's env.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

use super::{proto, wire, Tls, Token, MAX_MESSAGE, MAX_VIEW};
use crate::rendezvous::round::{NodeDesc, View};

/// How long one call (other than the join and the watch) may take.
pub const CALL_BOUND: Duration = Duration::from_secs(10);

type Rpc = proto::rendezvous_client::RendezvousClient<InterceptedService<Channel, Bearer>>;

/// Adds the job's token to every call.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        Ok(request)
    }
}

/// Why a call to the rendezvous failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a `host:port` a channel can use.
    #[error("--rdzv-endpoint {endpoint:?} is not usable: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The service did not answer within the join timeout.
    #[error("the rendezvous at {endpoint} did not answer within {after:?} ({last}); start the node that hosts it (the one whose address is the endpoint), check the address and port, or raise --rdzv-conf join_timeout")]
    Unreachable {
        /// The endpoint.
        endpoint: String,
        /// How long the agent tried.
        after: Duration,
        /// The last error seen.
        last: String,
    },
    /// The service refused the call.
    #[error("the rendezvous at {endpoint} refused {call}: {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The call.
        call: &'static str,
        /// The service's words.
        message: String,
        /// The gRPC code.
        code: Code,
    },
    /// The service sent something that cannot be used.
    #[error("the rendezvous at {endpoint} sent an unusable view: {problem}")]
    Malformed {
        /// What is wrong.
        #[source]
        problem: MalformedView,
        /// The endpoint.
        endpoint: String,
    },
}

/// A view whose numbers do not add up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct MalformedView(pub String);

/// A connection of one node to the rendezvous of one run.
#[derive(Clone)]
pub struct ElasticClient {
    rpc: Rpc,
    endpoint: String,
    run_id: String,
    node: NodeDesc,
}

/// The latest view pushed by the service, or why the watch ended.
pub type Views = watch::Receiver<Result<View, String>>;

impl ElasticClient {
    /// A client of the rendezvous at `endpoint` (`host:port`) for `node` in `run_id`, over
    /// TLS when `tls` is given; it connects on first use.
    ///
    /// # Errors
    /// The endpoint cannot make a URI.
    pub fn new(
        endpoint: &str,
        token: Option<&Token>,
        tls: Option<&Tls>,
        run_id: &str,
        node: NodeDesc,
    ) -> Result<Self, ClientError> {
        let unusable = |reason: String| ClientError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut channel = Endpoint::from_shared(format!("{scheme}://{endpoint}"))
            .map_err(|e| unusable(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let host = endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h);
            channel = channel
                .tls_config(tls.client(host))
                .map_err(|e| unusable(e.to_string()))?;
        }
        let channel = channel.connect_lazy();
        let rpc = proto::rendezvous_client::RendezvousClient::with_interceptor(
            channel,
            Bearer(token.map(Token::header)),
        )
        .max_decoding_message_size(MAX_VIEW)
        .max_encoding_message_size(MAX_MESSAGE);
        Ok(Self {
            rpc,
            endpoint: endpoint.to_owned(),
            run_id: run_id.to_owned(),
            node,
        })
    }

    /// A client for another node over this one's connection (simulated agents, many to a
    /// connection).
    pub fn for_node(&self, node: NodeDesc) -> Self {
        Self {
            node,
            ..self.clone()
        }
    }

    /// This node.
    pub fn node(&self) -> &NodeDesc {
        &self.node
    }

    fn refused(&self, call: &'static str, status: &Status) -> ClientError {
        ClientError::Refused {
            endpoint: self.endpoint.clone(),
            call,
            message: status.message().to_owned(),
            code: status.code(),
        }
    }

    fn view(&self, view: proto::View) -> Result<View, ClientError> {
        wire::view_in(view).map_err(|problem| ClientError::Malformed {
            problem: MalformedView(problem),
            endpoint: self.endpoint.clone(),
        })
    }

    /// `call`, answered within [`CALL_BOUND`]: a host cut off from the service must not wait
    /// on a connection whose packets go nowhere.
    async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(CALL_BOUND, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(status)) => Err(self.refused(what, &status)),
            Err(_) => Err(ClientError::Unreachable {
                endpoint: self.endpoint.clone(),
                after: CALL_BOUND,
                last: format!("{what} was not answered"),
            }),
        }
    }

    /// Joins with `--nnodes min:max`, retrying while the service cannot be reached, until
    /// `deadline`.
    ///
    /// # Errors
    /// Unreachable until the deadline, or refused (wrong token, other `--nnodes`, closed…).
    pub async fn join(
        &self,
        min_nodes: u32,
        max_nodes: u32,
        deadline: Instant,
    ) -> Result<View, ClientError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            let request = proto::JoinRequest {
                run_id: self.run_id.clone(),
                node: Some(proto::Node {
                    id: self.node.id.0.clone(),
                    addr: self.node.addr.clone(),
                    store_port: u32::from(self.node.store_port),
                    nproc: self.node.nproc,
                }),
                limits: Some(proto::NodeLimits {
                    min_nodes,
                    max_nodes,
                }),
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match tokio::time::timeout(left, self.rpc.clone().join(request)).await {
                Ok(Ok(view)) => return self.view(view.into_inner()),
                Ok(Err(status)) if status.code() != Code::Unavailable => {
                    return Err(self.refused("the join", &status));
                }
                Ok(Err(status)) => status.message().to_owned(),
                Err(_) => "no answer".to_owned(),
            };
            if Instant::now() + pause >= deadline {
                return Err(ClientError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    after: started.elapsed(),
                    last,
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// The node's view, kept current by a task until the rendezvous is over or the stream
    /// breaks, and a heartbeat every `interval`. When no heartbeat is answered for `timeout`
    /// (the service is gone, or this host's link is), the receiver holds the error: the
    /// service has dropped this node by then, so it must not go on as if placed.
    ///
    /// # Errors
    /// The service refused the watch.
    pub async fn watch(
        &self,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(Views, [JoinHandle<()>; 2]), ClientError> {
        let request = proto::NodeRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
        };
        let mut stream = self
            .rpc
            .clone()
            .watch(request)
            .await
            .map_err(|s| self.refused("the watch", &s))?
            .into_inner();
        let first = match stream.message().await {
            Ok(Some(view)) => self.view(view)?,
            Ok(None) => {
                let ended = Status::unavailable("the stream ended at once");
                return Err(self.refused("the watch", &ended));
            }
            Err(status) => return Err(self.refused("the watch", &status)),
        };
        let tx = Arc::new(watch::channel(Ok(first)).0);
        let rx = tx.subscribe();
        let this = self.clone();
        let views = tx.clone();
        let watcher = tokio::spawn(async move {
            loop {
                let next = match stream.message().await {
                    Ok(Some(view)) => this.view(view).map_err(|e| e.to_string()),
                    Ok(None) => Err(format!(
                        "the rendezvous at {} ended the watch",
                        this.endpoint
                    )),
                    Err(status) => Err(format!(
                        "lost the rendezvous at {}: {}",
                        this.endpoint,
                        status.message()
                    )),
                };
                // The service ends the stream after the rendezvous is over; that last view
                // stays what the agent reads.
                let over = next.as_ref().map_or(true, View::is_over);
                if views.send(next).is_err() || over {
                    return;
                }
            }
        });
        let beats = tokio::spawn(self.clone().heartbeats(interval, timeout, tx));
        Ok((rx, [watcher, beats]))
    }

    async fn heartbeats(
        self,
        interval: Duration,
        timeout: Duration,
        views: Arc<watch::Sender<Result<View, String>>>,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut answered = Instant::now();
        let bound = interval.max(Duration::from_millis(100));
        loop {
            ticks.tick().await;
            let request = proto::NodeRequest {
                run_id: self.run_id.clone(),
                node_id: self.node.id.0.clone(),
            };
            match tokio::time::timeout(bound, self.rpc.clone().heartbeat(request)).await {
                Ok(Ok(_)) => answered = Instant::now(),
                Ok(Err(s)) if s.code() != Code::Unavailable => {
                    // Dropped or over: the watch says which.
                    tracing::debug!("heartbeats stop: {}", s.message());
                    return;
                }
                _ if answered.elapsed() > timeout => {
                    let _ = views.send(Err(format!(
                        "no heartbeat answered by the rendezvous at {} for {:.1?}: it is gone, or this host is cut off from it",
                        self.endpoint,
                        answered.elapsed()
                    )));
                    return;
                }
                _ => tracing::debug!("heartbeat not answered"),
            }
        }
    }

    /// This node's workers failed in `round`: a counted restart for every node.
    ///
    /// # Errors
    /// The service refused or cannot be reached.
    pub async fn restart(&self, round: u64, cause: &str) -> Result<(), ClientError> {
        let cause: String = cause.chars().take(wire::MAX_CAUSE / 4).collect();
        let request = proto::RestartRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
            round,
            cause,
        };
        let mut rpc = self.rpc.clone();
        let call = rpc.restart(request);
        self.bounded("the restart", call).await?;
        Ok(())
    }

    /// This node stopped its earlier workers (node 0: and cleared its store) and is ready to
    /// start `round`'s.
    ///
    /// # Errors
    /// The service refused or cannot be reached.
    pub async fn ready(&self, round: u64) -> Result<(), ClientError> {
        let request = proto::RoundRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
            round,
        };
        let mut rpc = self.rpc.clone();
        let call = rpc.ready(request);
        self.bounded("the ready", call).await?;
        Ok(())
    }

    /// This node's workers finished `round` successfully.
    ///
    /// # Errors
    /// The service refused or cannot be reached.
    pub async fn finish(&self, round: u64) -> Result<(), ClientError> {
        let request = proto::RoundRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
            round,
        };
        let mut rpc = self.rpc.clone();
        let call = rpc.finish(request);
        self.bounded("the finish", call).await?;
        Ok(())
    }

    /// Leaves the rendezvous (best effort: a node that cannot reach it is dropped when its
    /// heartbeats stop).
    pub async fn leave(&self) {
        let request = proto::NodeRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
        };
        if let Err(e) = self
            .bounded("the leave", self.rpc.clone().leave(request))
            .await
        {
            tracing::debug!("leave not delivered: {e}");
        }
    }

    /// Ends the rendezvous for every node, saying why.
    ///
    /// # Errors
    /// The service refused or cannot be reached.
    pub async fn close(&self, reason: &str) -> Result<(), ClientError> {
        let reason: String = reason.chars().take(wire::MAX_CAUSE / 4).collect();
        let request = proto::CloseRequest {
            run_id: self.run_id.clone(),
            node_id: self.node.id.0.clone(),
            reason,
        };
        let mut rpc = self.rpc.clone();
        let call = rpc.close(request);
        self.bounded("the close", call).await?;
        Ok(())
    }
}
