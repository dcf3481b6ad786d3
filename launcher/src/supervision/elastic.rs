//! The agent of an elastic job (`--nnodes MIN:MAX`, `--rdzv-backend c10d` or `etcd`): rounds
//! of the rendezvous instead of one static assignment.
//!
//! # Expected flow
//! Host the service if this host owns the endpoint; bind this agent's store (node 0's serves
//! the round's workers); join; watch. Per round: wait to be placed; node 0 clears its store
//! (and, with a token, serves only the round's hosts); say ready; when every node is ready, start the workers with the round's ranks. The round
//! ends when a worker here fails (tell the service: a counted restart everywhere), when the
//! service pushes a new round (a failure elsewhere, a lost node, a scale-up), or on a signal;
//! [`decision::next`] says what then. On success every node says so; the last one ends the
//! rendezvous, and the host keeps serving until the others have read that.

use std::time::{Duration, Instant};

use ferrun_collective::store::{Admission, StoreServer};
use nix::sys::signal::Signal;
use tokio::sync::mpsc;

use super::agent::{
    describe, failures_before, outcome, socket_ifnames, summary_rows, AgentError, Outcome,
    RunResult, OUTPUT_DRAIN_BOUND,
};
use crate::configuration::config::LaunchConfig;
use crate::rendezvous::agent_store::Assignment;
use crate::rendezvous::elastic::{node_id, ElasticSpec};
use crate::rendezvous::member::Member;
use crate::rendezvous::round::{NodeDesc, Placement, RoundEnd, RoundError, Standing, View};
use crate::rendezvous::service::client::Views;
use crate::rendezvous::store_bind;
use crate::reports::logs::LogLayout;
use crate::reports::report;
use crate::supervision::decision::{self, AttemptEnd, Budget, MembershipChange, Next, Verdict};
use crate::supervision::group::WorkerGroup;
use crate::supervision::warm::WarmPool;
use crate::supervision::worker::Bootstrap;

/// How long the host keeps serving after the rendezvous is over, for the others to read it.
const HOST_LINGER: Duration = Duration::from_secs(10);

/// What woke the agent while it waited on the rendezvous.
enum Wake {
    View(View),
    Signal(Signal),
    /// The watch ended: the service is gone.
    Lost(String),
}

/// Waits for the next view (or the current one when `fresh`), or a signal.
async fn next_view(
    views: &mut Views,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    fresh: bool,
) -> Wake {
    if !fresh {
        tokio::select! {
            changed = views.changed() => if changed.is_err() {
                // The sender is gone; its last value says why.
            },
            Some(sig) = signals.recv() => return Wake::Signal(sig),
        }
    }
    match views.borrow_and_update().clone() {
        Ok(view) => Wake::View(view),
        Err(why) => Wake::Lost(why),
    }
}

/// Runs an elastic job to its end.
///
/// # Errors
/// [`AgentError`] when this agent cannot take part at all.
pub async fn run(
    config: &LaunchConfig,
    spec: &ElasticSpec,
    layout: &LogLayout,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    warm: Option<&mut WarmPool>,
) -> Result<RunResult, AgentError> {
    let service = spec.host_if_ours()?;
    // `--standalone` serves on a free port: the agent joins where the service listens.
    let spec = &match &service {
        Some(service) if spec.port == 0 => ElasticSpec {
            port: service.local_addr().port(),
            ..spec.clone()
        },
        _ => spec.clone(),
    };
    let addr = spec.advertised_addr()?;
    let store = store_bind::bind_store(&addr, 0)?;
    if spec.token.is_some() {
        // Until a round makes this node 0, its store serves nobody else.
        store.admit(Admission::hosts([]));
    }
    let node = NodeDesc {
        id: node_id(),
        addr,
        store_port: store.local_addr().port(),
        nproc: spec.local_world_size,
    };
    tracing::info!(
        "joining the rendezvous at {} as {}",
        spec.endpoint(),
        node.id
    );
    let client = Member::new(spec, node).await?;
    let deadline = Instant::now() + spec.settings.join_timeout;
    tokio::select! {
        joined = client.join(spec, deadline) => { joined?; }
        Some(sig) = signals.recv() => return Ok(RunResult::nothing_ran(Outcome::Signaled(sig), layout)),
    }
    let (mut views, tasks) = client.watch(spec).await?;
    let result = rounds(
        config,
        spec,
        layout,
        signals,
        (&client, &store, &mut views),
        warm,
    )
    .await;
    for task in tasks {
        task.abort();
    }
    if let Some(service) = service {
        service.wait_idle(HOST_LINGER).await;
    }
    result
}

/// The round's placement once this node is placed and every node is ready; `None` when the
/// run ended first (its result).
async fn placed(
    spec: &ElasticSpec,
    layout: &LogLayout,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    client: &Member,
    store: &StoreServer,
    views: &mut Views,
) -> Result<Result<(View, Placement), RunResult>, AgentError> {
    let mut fresh = true;
    let mut said_ready: Option<u64> = None;
    loop {
        let view = match next_view(views, signals, fresh).await {
            Wake::View(view) => view,
            Wake::Signal(sig) => {
                return Ok(Err(RunResult::nothing_ran(Outcome::Signaled(sig), layout)))
            }
            Wake::Lost(why) => {
                return Ok(Err(RunResult::nothing_ran(
                    Outcome::FailedElsewhere(why),
                    layout,
                )))
            }
        };
        fresh = false;
        tracing::debug!(round = view.round, standing = ?view.standing, "view");
        match &view.standing {
            Standing::Assigned(p) if p.all_ready && said_ready == Some(view.round) => {
                return Ok(Ok((view.clone(), p.clone())));
            }
            Standing::Assigned(p) if said_ready != Some(view.round) => {
                if p.node_rank == 0 {
                    // The round's workers bootstrap through this store: no key of an earlier
                    // round may be in it. Every node's old workers are stopped before it says
                    // ready, so none can write one after this.
                    store.clear();
                }
                if spec.token.is_some() {
                    let hosts: &[String] = if p.node_rank == 0 { &p.hosts } else { &[] };
                    store_bind::admit_round(store, hosts).await;
                }
                client.ready(view.round).await?;
                said_ready = Some(view.round);
            }
            Standing::Assigned(_) => {}
            Standing::Gathering { joined } => tracing::info!(
                "round {}: {joined} node(s) joined, waiting for {}..{}",
                view.round,
                spec.settings.min_nodes,
                spec.settings.max_nodes
            ),
            Standing::Waiting => tracing::info!(
                "round {} runs with the most nodes it takes (--nnodes max {}); this node waits for the next",
                view.round,
                spec.settings.max_nodes
            ),
            Standing::Unknown => {
                tracing::warn!("the rendezvous dropped this node (its heartbeats were late); joining again");
                let deadline = Instant::now() + spec.settings.join_timeout;
                client.join(spec, deadline).await?;
            }
            Standing::Finished => {
                return Ok(Err(RunResult::nothing_ran(Outcome::Succeeded, layout)));
            }
            Standing::Closed { reason } => {
                return Ok(Err(RunResult::nothing_ran(
                    Outcome::FailedElsewhere(reason.clone()),
                    layout,
                )));
            }
            Standing::TimedOut { joined } => {
                let names: Vec<String> = joined.iter().map(ToString::to_string).collect();
                return Err(AgentError::Elastic(
                    RoundError::TimedOut {
                        joined: u32::try_from(joined.len()).unwrap_or(u32::MAX),
                        min: spec.settings.min_nodes,
                        names: if names.is_empty() { "none".into() } else { names.join(", ") },
                    }
                    .to_string(),
                ));
            }
        }
    }
}

/// How the attempt ended, before the group was stopped.
enum Event {
    AllSucceeded,
    Failed,
    Signal(Signal),
    /// The service moved on (another round, or the end): its view.
    Moved(View),
    Lost(String),
}

async fn rounds(
    config: &LaunchConfig,
    spec: &ElasticSpec,
    layout: &LogLayout,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    (client, store, views): (&Member, &StoreServer, &mut Views),
    mut warm: Option<&mut WarmPool>,
) -> Result<RunResult, AgentError> {
    loop {
        let (view, placement) = match placed(spec, layout, signals, client, store, views).await? {
            Ok(placed) => placed,
            Err(ended) => return Ok(ended),
        };
        let round = view.round;
        tracing::info!(
            "round {round}: node {} of {}, global ranks {}..{} of {}, master {}:{}",
            placement.node_rank,
            placement.nnodes,
            placement.base_rank,
            placement.base_rank + spec.local_world_size,
            placement.world_size,
            placement.master_addr,
            placement.master_port
        );
        let boot = Bootstrap {
            assignment: Assignment {
                group_rank: placement.node_rank,
                group_world_size: placement.nnodes,
                base_rank: placement.base_rank,
                world_size: placement.world_size,
            },
            master_addr: placement.master_addr.clone(),
            master_port: placement.master_port,
            extra_env: socket_ifnames(
                &placement.master_addr,
                placement.master_port,
                config.local_addr.as_deref(),
            ),
        };
        let attempt = u32::try_from(round).unwrap_or(u32::MAX);
        let attempt_dir = layout
            .prepare_attempt(attempt, config.local_world_size)
            .map_err(AgentError::Logs)?;
        let restart_count = view.restart_count;
        let mut group = WorkerGroup::start(
            config,
            &boot,
            restart_count,
            &attempt_dir,
            warm.as_deref_mut(),
        )
        .map_err(AgentError::Spawn)?;
        let mut exit_order = Vec::new();
        let mut event = loop {
            tokio::select! {
                exit = group.next_exit() => match exit {
                    None => break Event::AllSucceeded,
                    Some(worker) => {
                        exit_order.push(worker.local_rank);
                        if worker.failed() {
                            break Event::Failed;
                        }
                    }
                },
                wake = next_view(views, signals, false) => match wake {
                    Wake::View(v) if v.round != round || v.is_over() => break Event::Moved(v),
                    Wake::View(_) => {}
                    Wake::Signal(sig) => break Event::Signal(sig),
                    Wake::Lost(why) => break Event::Lost(why),
                },
            }
        };
        if let Event::AllSucceeded = event {
            event = exit_barrier(spec, client, views, signals, round).await;
        }
        let stop_started = Instant::now();
        let escalated = match &event {
            Event::Signal(sig) => {
                tracing::warn!("received {sig}: forwarding it to the workers");
                group.stop(*sig, config.shutdown_timeout, signals).await;
                Some(*sig)
            }
            Event::AllSucceeded => None,
            _ => {
                group
                    .stop(Signal::SIGTERM, config.shutdown_timeout, signals)
                    .await
            }
        };
        group.drain_output(OUTPUT_DRAIN_BOUND).await;
        if let Event::Failed = event {
            // A peer that vanished tears the workers' connections, so they may fail before
            // the service has said it is lost; by now it may have.
            let moved = views
                .borrow()
                .as_ref()
                .ok()
                .filter(|v| v.round != round)
                .cloned();
            if let Some(view) = moved {
                event = Event::Moved(view);
            }
        }
        let failures = failures_before(&group, &exit_order, stop_started);
        let rows = summary_rows(&group, stop_started, restart_count);
        let cause = report::root_cause(&failures).map(|f| describe(f, placement.node_rank));
        let end = attempt_end(&event, escalated, cause.is_some(), &client.node().id.0);
        let budget = Budget {
            restarts_done: restart_count,
            max_restarts: config.max_restarts,
            min_nodes: spec.settings.min_nodes,
        };
        let next = decision::next(&end, budget);
        tracing::debug!(round, ?next, "round ended");
        match next {
            Next::Stop(verdict) => {
                match &verdict {
                    // Cut off from the service: nobody to tell.
                    _ if matches!(event, Event::Lost(_)) => {}
                    Verdict::Signaled(_) => client.leave().await,
                    Verdict::Succeeded => {}
                    other => {
                        let why = match (&cause, other) {
                            (Some(cause), _) => format!("{cause}; no restarts left"),
                            (None, Verdict::FailedElsewhere(summary)) => summary.clone(),
                            _ => format!("{other:?}"),
                        };
                        let _ = client.close(&why).await;
                    }
                }
                return Ok(RunResult {
                    outcome: outcome(verdict, failures),
                    rows,
                    restarts: restart_count,
                    log_dir: layout.run_dir().to_path_buf(),
                });
            }
            Next::Restart { counted } => {
                if let (true, Some(cause)) = (counted, &cause) {
                    tracing::warn!("worker group failed: {cause}; restarting every node");
                    client.restart(round, cause).await?;
                } else {
                    tracing::warn!(
                        "round {round} ended ({}); restarting into the next",
                        moved_words(&event)
                    );
                }
            }
        }
    }
}

/// After this node's workers all succeeded: tell the service, and wait (bounded) for the
/// other nodes to finish too, or for the round to end otherwise.
async fn exit_barrier(
    spec: &ElasticSpec,
    client: &Member,
    views: &mut Views,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    round: u64,
) -> Event {
    if let Err(e) = client.finish(round).await {
        tracing::warn!("cannot tell the rendezvous that this node finished: {e}");
        return Event::AllSucceeded;
    }
    let deadline = tokio::time::Instant::now() + spec.exit_timeout;
    let mut fresh = true;
    loop {
        let wake = tokio::select! {
            wake = next_view(views, signals, fresh) => wake,
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!("exit barrier timed out: some nodes did not finish");
                return Event::AllSucceeded;
            }
        };
        fresh = false;
        match wake {
            Wake::View(v) if v.standing == Standing::Finished => return Event::AllSucceeded,
            Wake::View(v) if v.round != round || v.is_over() => return Event::Moved(v),
            Wake::View(_) => {}
            Wake::Signal(sig) => return Event::Signal(sig),
            Wake::Lost(_) => return Event::AllSucceeded,
        }
    }
}

/// What the decision needs to know about how the attempt ended.
fn attempt_end(
    event: &Event,
    escalated: Option<Signal>,
    local_failure: bool,
    me: &str,
) -> AttemptEnd {
    let mut end = AttemptEnd {
        signal: escalated,
        local_failure,
        ..AttemptEnd::default()
    };
    match event {
        Event::Moved(view) => match (&view.standing, &view.last_end) {
            (Standing::Closed { reason }, _) => end.remote_failure = Some(reason.clone()),
            (Standing::TimedOut { .. }, _) => {
                end.remote_failure = Some("the rendezvous timed out".into())
            }
            (_, Some(RoundEnd::Failed { node, cause })) if node.0 != me => {
                end.remote_failure = Some(format!("node {node}: {cause}"));
            }
            (_, Some(RoundEnd::Failed { .. })) => {}
            (standing, Some(RoundEnd::Lost(ids))) => {
                end.membership = Some(lost(standing, ids.iter().map(|i| i.0.clone()).collect()))
            }
            (standing, Some(RoundEnd::Left(id))) => {
                end.membership = Some(lost(standing, vec![id.0.clone()]))
            }
            (_, Some(RoundEnd::ScaleUp(_))) => end.membership = Some(MembershipChange::ScaleUp),
            (_, None) => {}
        },
        Event::Lost(why) => end.remote_failure = Some(why.clone()),
        _ => {}
    }
    end
}

fn lost(standing: &Standing, nodes: Vec<String>) -> MembershipChange {
    let remaining = match standing {
        Standing::Assigned(p) => p.nnodes,
        Standing::Gathering { joined } => *joined,
        _ => 0,
    };
    MembershipChange::Lost { nodes, remaining }
}

fn moved_words(event: &Event) -> String {
    match event {
        Event::Moved(View {
            last_end: Some(end),
            ..
        }) => match end {
            RoundEnd::Failed { node, cause } => format!("node {node} failed: {cause}"),
            RoundEnd::Lost(ids) => format!(
                "lost node(s) {}",
                ids.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            RoundEnd::Left(id) => format!("node {id} left"),
            RoundEnd::ScaleUp(id) => format!("node {id} joined: scale-up"),
        },
        _ => "the rendezvous moved on".to_owned(),
    }
}
