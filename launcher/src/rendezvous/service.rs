//! The rendezvous service: the [`round`](crate::rendezvous::round) state machine behind
//! gRPC (`proto/rendezvous.proto`), one state machine per run id, pushing each node's view
//! to it as it changes instead of being polled.
//!
//! # Expected flow
//! An agent calls `Join` (retried until its join timeout while the service is not up yet),
//! opens `Watch`, and sends `Heartbeat`s every keep-alive interval. A ticker applies time to
//! every run at its next deadline (a last call, a join timeout, a node's heartbeat timeout),
//! so a silent node is dropped within a millisecond of its timeout and every survivor's
//! watch gets the new round at once.
//!
//! # Trust
//! Callers must hold the job's token (`authorization: Bearer <token>`) when the service has
//! one; without it every call is refused before it is read further. Messages are at most
//! [`MAX_MESSAGE`] bytes; every field is checked in [`wire`]; runs are capped at
//! [`MAX_RUNS`]. The token guards the rendezvous against strangers on the network, not
//! against the job's own agents, which may join, restart, and close the run.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::rendezvous::round::{self, NodeId, Rendezvous, RoundError, Settings, Standing, View};

mod auth;
pub mod client;
pub mod tls;
pub mod wire;

/// The generated gRPC code.
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod proto {
    tonic::include_proto!("ferrun.rendezvous.v1");
}

pub use auth::{Token, TOKEN_ENV};
pub use tls::Tls;

/// Largest request the service accepts from an agent.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest view an agent accepts: node 0's names every node's address (up to
/// [`round::MAX_NODES`] of [`wire::MAX_ADDR`] bytes each, and their framing).
pub const MAX_VIEW: usize = MAX_MESSAGE + round::MAX_NODES as usize * (wire::MAX_ADDR + 3);
/// Runs one service keeps at once (finished ones are dropped first to make room).
pub const MAX_RUNS: usize = 1024;
/// Gathering views (which differ only in the count of joined nodes) go to a node at most
/// this often; a completed round goes at once.
const GATHERING_UPDATE: Duration = Duration::from_millis(100);

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The listener could not be used.
    #[error("the rendezvous service cannot listen: {0}")]
    Listen(std::io::Error),
    /// The TLS certificate or key is unusable.
    #[error("the rendezvous service cannot use its TLS certificate and key: {0}")]
    Tls(String),
    /// TLS was asked for, but this node has no certificate to serve with.
    #[error("the rendezvous uses TLS but this node has no certificate to serve it with: give --rdzv-conf tls_cert and tls_key, or is_host=false")]
    NoCertificate,
}

struct Run {
    rdzv: Rendezvous,
    revision: watch::Sender<u64>,
}

impl Run {
    fn publish(&self) {
        let revision = self.rdzv.major_revision();
        self.revision.send_if_modified(|seen| {
            let changed = *seen != revision;
            *seen = revision;
            changed
        });
    }
}

struct Shared {
    start: Instant,
    settings: Settings,
    runs: Mutex<HashMap<String, Run>>,
    wake: Notify,
    /// A watch stream ended.
    watch_ended: Notify,
}

impl Shared {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn runs(&self) -> MutexGuard<'_, HashMap<String, Run>> {
        // A panic while holding the lock cannot leave a run half-changed in a way the next
        // call could not handle: every call checks its own preconditions.
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies `change` to `run_id`'s state machine (creating it when `create`), then tells
    /// the watchers and the ticker.
    fn apply<T>(
        &self,
        run_id: &str,
        create: bool,
        change: impl FnOnce(&mut Rendezvous, Duration) -> Result<T, RoundError>,
    ) -> Result<T, Status> {
        wire::name("run id", run_id, wire::MAX_RUN_ID)?;
        let mut runs = self.runs();
        if create && !runs.contains_key(run_id) {
            make_room(&mut runs)?;
            runs.insert(
                run_id.to_owned(),
                Run {
                    rdzv: Rendezvous::new(self.settings),
                    revision: watch::channel(0).0,
                },
            );
        }
        let run = runs.get_mut(run_id).ok_or_else(|| {
            Status::not_found(format!(
                "no rendezvous for run id {run_id:?}: join it first"
            ))
        })?;
        let result = change(&mut run.rdzv, self.now());
        run.publish();
        drop(runs);
        self.wake.notify_one();
        result.map_err(|e| wire::status(&e))
    }
}

fn no_run(run_id: &str) -> Status {
    Status::not_found(format!(
        "no rendezvous for run id {run_id:?}: join it first"
    ))
}

fn make_room(runs: &mut HashMap<String, Run>) -> Result<(), Status> {
    if runs.len() < MAX_RUNS {
        return Ok(());
    }
    runs.retain(|_, run| run.rdzv.over().is_none() || run.revision.receiver_count() > 0);
    if runs.len() < MAX_RUNS {
        return Ok(());
    }
    Err(Status::resource_exhausted(format!(
        "this rendezvous service holds {MAX_RUNS} runs already"
    )))
}

/// A running rendezvous service; dropping it stops it.
pub struct RendezvousService {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl RendezvousService {
    /// Serves on `listener` every run that joins, each with `settings`; with a `token`, only
    /// callers that present it; with `tls`, over TLS only.
    ///
    /// # Errors
    /// The listener cannot be handed to the runtime, or the TLS identity is unusable.
    pub fn serve(
        listener: std::net::TcpListener,
        settings: Settings,
        token: Option<Token>,
        tls: Option<&Tls>,
    ) -> Result<Self, ServiceError> {
        let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
        if let Some(tls) = tls {
            let config = tls.server().ok_or(ServiceError::NoCertificate)?;
            builder = builder
                .tls_config(config)
                .map_err(|e| ServiceError::Tls(e.to_string()))?;
        }
        listener
            .set_nonblocking(true)
            .map_err(ServiceError::Listen)?;
        // Every agent of a large job joins at once: past the standard backlog of 128 the
        // kernel drops SYNs and each dropped agent waits a second to retry.
        if let Err(e) = nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXALLOWABLE)
        {
            tracing::debug!("kept the default listen backlog: {e}");
        }
        let addr = listener.local_addr().map_err(ServiceError::Listen)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(ServiceError::Listen)?;
        let shared = Arc::new(Shared {
            start: Instant::now(),
            settings,
            runs: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            watch_ended: Notify::new(),
        });
        let service = proto::rendezvous_server::RendezvousServer::new(Handler {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_VIEW);
        let service =
            tonic::service::interceptor::InterceptedService::new(service, auth::check(token));
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // The builder's tcp_nodelay covers only listeners it binds itself: without it here,
            // Nagle holds each small view back until the peer's delayed ACK (~40 ms).
            let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |s| {
                s.inspect(|s| {
                    let _ = s.set_nodelay(true);
                })
            });
            let result = builder
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!("the rendezvous service stopped: {e}");
            }
        });
        let ticker = tokio::spawn(tick(shared.clone()));
        Ok(Self {
            addr,
            shutdown: Some(tx),
            tasks: vec![server, ticker],
            shared,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until no node watches any run any more (they have read how it ended), at most
    /// `bound`.
    pub async fn wait_idle(&self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let gone = self.shared.watch_ended.notified();
            let watching: usize = self
                .shared
                .runs()
                .values()
                .map(|run| run.revision.receiver_count())
                .sum();
            if watching == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, gone).await.is_err() {
                tracing::debug!("{watching} watch(es) still open; the service stops anyway");
                return;
            }
        }
    }
}

impl std::fmt::Debug for RendezvousService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RendezvousService")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Drop for RendezvousService {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Applies time to every run at its next deadline, or after any call (which may move one).
async fn tick(shared: Arc<Shared>) {
    loop {
        let next = shared
            .runs()
            .values()
            .filter_map(|run| run.rdzv.next_deadline())
            .min();
        let at = next
            .and_then(|d| shared.start.checked_add(d))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep_until(at.into()) => {}
            () = shared.wake.notified() => {}
        }
        let now = shared.now();
        for run in shared.runs().values_mut() {
            run.rdzv.tick(now);
            run.publish();
        }
    }
}

struct Handler {
    shared: Arc<Shared>,
}

type ViewStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::View, Status>> + Send>>;

fn node_id(id: &str) -> Result<NodeId, Status> {
    wire::name("node id", id, wire::MAX_NODE_ID)?;
    Ok(NodeId(id.to_owned()))
}

#[tonic::async_trait]
impl proto::rendezvous_server::Rendezvous for Handler {
    async fn join(
        &self,
        request: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::View>, Status> {
        let request = request.into_inner();
        let desc = wire::node(request.node)?;
        let settings = self.shared.settings;
        let limits = request.limits.unwrap_or_default();
        if (limits.min_nodes, limits.max_nodes) != (settings.min_nodes, settings.max_nodes) {
            return Err(Status::failed_precondition(format!(
                "node {} was started with --nnodes {}:{} but this rendezvous runs --nnodes {}:{}; give every node the same --nnodes",
                desc.id, limits.min_nodes, limits.max_nodes, settings.min_nodes, settings.max_nodes
            )));
        }
        let id = desc.id.clone();
        let view = self.shared.apply(&request.run_id, true, |r, now| {
            r.join(now, desc)?;
            Ok(r.view(&id))
        })?;
        Ok(Response::new(wire::view_out(&view)))
    }

    type WatchStream = ViewStream;

    async fn watch(
        &self,
        request: Request<proto::NodeRequest>,
    ) -> Result<Response<ViewStream>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        wire::name("run id", &request.run_id, wire::MAX_RUN_ID)?;
        let revisions = self
            .shared
            .runs()
            .get(&request.run_id)
            .map(|run| run.revision.subscribe())
            .ok_or_else(|| no_run(&request.run_id))?;
        let (tx, rx) = mpsc::channel(4);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            if push_views(&shared, &request.run_id, &id, revisions, tx).await == Ended::HungUp {
                // Its agent's connection broke (killed, or its host went down with a reset):
                // the others need not wait out its heartbeats.
                let _ = shared.apply(&request.run_id, false, |r, now| {
                    r.lose(now, &id);
                    Ok(())
                });
            }
            shared.watch_ended.notify_waiters();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn heartbeat(
        &self,
        request: Request<proto::NodeRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        self.shared
            .apply(&request.run_id, false, |r, now| r.heartbeat(now, &id))?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn restart(
        &self,
        request: Request<proto::RestartRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        let cause = wire::text("cause", &request.cause)?;
        self.shared.apply(&request.run_id, false, |r, now| {
            r.restart(now, &id, request.round, cause)
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn ready(
        &self,
        request: Request<proto::RoundRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        self.shared.apply(&request.run_id, false, |r, now| {
            r.ready(now, &id, request.round)
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn finish(
        &self,
        request: Request<proto::RoundRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        self.shared.apply(&request.run_id, false, |r, now| {
            r.finish(now, &id, request.round)
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn leave(
        &self,
        request: Request<proto::NodeRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        self.shared.apply(&request.run_id, false, |r, now| {
            r.leave(now, &id);
            Ok(())
        })?;
        Ok(Response::new(proto::Empty {}))
    }

    async fn close(
        &self,
        request: Request<proto::CloseRequest>,
    ) -> Result<Response<proto::Empty>, Status> {
        let request = request.into_inner();
        let id = node_id(&request.node_id)?;
        let reason = wire::text("reason", &request.reason)?;
        let reason = format!("closed by node {id}: {reason}");
        self.shared.apply(&request.run_id, false, |r, _| {
            r.close(&reason);
            Ok(())
        })?;
        Ok(Response::new(proto::Empty {}))
    }
}

/// Why a watch ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The rendezvous is over (or the run is gone).
    Over,
    /// The node hung up while the rendezvous went on.
    HungUp,
}

/// Sends `id` its view now and after every change, until the rendezvous is over or the node
/// hangs up.
async fn push_views(
    shared: &Shared,
    run_id: &str,
    id: &NodeId,
    mut revisions: watch::Receiver<u64>,
    tx: mpsc::Sender<Result<proto::View, Status>>,
) -> Ended {
    let mut last: Option<(View, Instant)> = None;
    loop {
        revisions.borrow_and_update();
        let Some(view) = shared.runs().get(run_id).map(|run| run.rdzv.view(id)) else {
            return Ended::Over;
        };
        if last.as_ref().is_none_or(|(seen, _)| *seen != view) {
            if tx.send(Ok(wire::view_out(&view))).await.is_err() {
                return Ended::HungUp;
            }
            if view.is_over() {
                return Ended::Over;
            }
            last = Some((view, Instant::now()));
        }
        tokio::select! {
            changed = revisions.changed() => if changed.is_err() {
                return Ended::Over;
            },
            () = tx.closed() => return Ended::HungUp,
        }
        if let Some((
            View {
                standing: Standing::Gathering { .. },
                ..
            },
            sent,
        )) = &last
        {
            tokio::time::sleep_until((*sent + GATHERING_UPDATE).into()).await;
        }
    }
}
