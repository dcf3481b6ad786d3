//! The agent: run the worker group, restart it on failure while restarts remain, forward
//! signals, and say how the run ended.
//!
//! # Expected flow
//! start attempt 0 → wait for exit events → all exited 0: success; one failed: stop the rest
//! (SIGTERM, grace, SIGKILL), restart with `TORCHELASTIC_RESTART_COUNT + 1` while
//! `--max-restarts` allows, else fail with the root cause. A handled signal to the launcher is
//! forwarded to every worker's process group (same signal, grace, SIGKILL); a second signal
//! during the grace period kills at once.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrun_collective::store::{StoreError, StoreServer};
use nix::sys::signal::Signal;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::configuration::config::LaunchConfig;
use crate::rendezvous::agent_store::{Peers, RemoteFailure, RendezvousError};
use crate::rendezvous::elastic::ElasticError;
use crate::rendezvous::member::MemberError;
use crate::rendezvous::netif;
use crate::reports::logs::LogLayout;
use crate::reports::report::{self, Failure, SummaryRow};
use crate::supervision::decision::{self, AttemptEnd, Budget, Next, Verdict};
use crate::supervision::group::WorkerGroup;
use crate::supervision::warm::WarmPool;
use crate::supervision::worker::Bootstrap;

/// How long worker output may stay open after the workers have exited (a grandchild may hold
/// the pipe); past it, the launcher stops waiting for that output.
pub(super) const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(2);

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every worker of the last attempt exited 0.
    Succeeded,
    /// Workers failed and no restart was left; the failures of the last attempt.
    Failed(Vec<Failure>),
    /// The launcher was asked to stop by this signal.
    Signaled(Signal),
    /// Another node's workers failed (its summary) and no restart was left.
    FailedElsewhere(String),
}

/// The end of a run: how it ended, and a summary row per worker of the last attempt.
#[derive(Debug)]
pub struct RunResult {
    /// How it ended.
    pub outcome: Outcome,
    /// One row per local worker.
    pub rows: Vec<SummaryRow>,
    /// Restarts performed.
    pub restarts: u32,
    /// The run's log directory.
    pub log_dir: PathBuf,
}

/// What kept the agent from running the workers at all.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The log directory could not be prepared.
    #[error("cannot prepare the log directory: {0}; give --log-dir a directory this user can create and write")]
    Logs(io::Error),
    /// A handled signal could not be installed.
    #[error("cannot handle {0}: {1}")]
    Signal(Signal, io::Error),
    /// The agent store cannot be hosted.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A worker could not be started.
    #[error("cannot start the workers: {0}")]
    Spawn(io::Error),
    /// The nodes could not come together.
    #[error(transparent)]
    Rendezvous(#[from] RendezvousError),
    /// This agent cannot take part in the elastic rendezvous.
    #[error(transparent)]
    ElasticSetup(#[from] ElasticError),
    /// A call to the elastic rendezvous failed.
    #[error(transparent)]
    ElasticCall(#[from] MemberError),
    /// The elastic rendezvous ended without this node being placed.
    #[error("{0}")]
    Elastic(String),
}

impl RunResult {
    pub(super) fn nothing_ran(outcome: Outcome, layout: &LogLayout) -> Self {
        Self {
            outcome,
            rows: Vec::new(),
            restarts: 0,
            log_dir: layout.run_dir().to_path_buf(),
        }
    }
}

enum Event {
    AllSucceeded,
    Failed,
    Signal(Signal),
    /// Another node's group failed (its agent's summary), or the agent store was lost.
    Remote(String),
}

/// Where the workers' store lives, and who the other agents are.
enum Topology {
    /// One node: this agent hosts the store.
    Single(StoreServer),
    /// Several nodes, joined through node 0's store.
    Multi(Box<Peers>),
}

/// Runs the job described by `config` to its end.
///
/// # Errors
/// [`AgentError`] when the workers cannot be started at all; worker failures are an
/// [`Outcome`], not an error.
pub async fn run(config: &LaunchConfig) -> Result<RunResult, AgentError> {
    let layout =
        LogLayout::create(config.log_dir.as_deref(), &config.run_id).map_err(AgentError::Logs)?;
    let mut signals = listen(&config.signals)?;
    // Started first, so the interpreters import torch while the nodes come together.
    let mut warm = WarmPool::start(config);
    if let Some(spec) = &config.elastic {
        return super::elastic::run(config, spec, &layout, &mut signals, warm.as_mut()).await;
    }
    let (mut topology, boot) = match &config.nodes {
        None => {
            // The agent hosts the store the workers bootstrap through (TORCHELASTIC_USE_AGENT_STORE):
            // bound here and kept, so no other process can take MASTER_PORT before the workers use it.
            let store = crate::rendezvous::store_bind::bind_store(
                &config.master_addr,
                config.master_port.unwrap_or(0),
            )?;
            let boot = Bootstrap::single_node(config, store.local_addr().port());
            (Topology::Single(store), boot)
        }
        Some(spec) => {
            let peers = tokio::select! {
                joined = Peers::join(spec.clone()) => joined?,
                Some(sig) = signals.recv() => return Ok(RunResult::nothing_ran(Outcome::Signaled(sig), &layout)),
            };
            tracing::info!(
                "node {} of {} joined at {}:{}: global ranks {}..{} of {}",
                spec.node_rank,
                spec.nnodes,
                spec.master_addr,
                spec.master_port,
                peers.assignment.base_rank,
                peers.assignment.base_rank + config.local_world_size,
                peers.assignment.world_size
            );
            let boot = Bootstrap {
                assignment: peers.assignment.clone(),
                master_addr: spec.master_addr.clone(),
                master_port: spec.master_port,
                extra_env: socket_ifnames(
                    &spec.master_addr,
                    spec.master_port,
                    config.local_addr.as_deref(),
                ),
            };
            (Topology::Multi(Box::new(peers)), boot)
        }
    };
    let result = attempts(
        config,
        &layout,
        &mut signals,
        (&mut topology, warm.as_mut()),
        &boot,
    )
    .await;
    if let Topology::Multi(peers) = topology {
        (*peers).leave().await;
    }
    result
}

async fn attempts(
    config: &LaunchConfig,
    layout: &LogLayout,
    signals: &mut mpsc::UnboundedReceiver<Signal>,
    (topology, mut warm): (&mut Topology, Option<&mut WarmPool>),
    boot: &Bootstrap,
) -> Result<RunResult, AgentError> {
    let mut restart_count = 0;
    loop {
        let attempt_dir = layout
            .prepare_attempt(restart_count, config.local_world_size)
            .map_err(AgentError::Logs)?;
        let mut watch = match topology {
            // A restarted group must not read the keys of the attempt before it.
            Topology::Single(store) => {
                store.clear();
                None
            }
            Topology::Multi(peers) => tokio::select! {
                watch = peers.begin_attempt(restart_count) => Some(watch?),
                Some(sig) = signals.recv() => return Ok(RunResult::nothing_ran(Outcome::Signaled(sig), layout)),
            },
        };
        let mut group = WorkerGroup::start(
            config,
            boot,
            restart_count,
            &attempt_dir,
            warm.as_deref_mut(),
        )
        .map_err(AgentError::Spawn)?;
        tracing::debug!(attempt = restart_count, "workers started");
        let mut exit_order = Vec::new();
        let mut event = loop {
            tokio::select! {
                exit = group.next_exit() => match exit {
                    None => break Event::AllSucceeded,
                    Some(worker) => {
                        exit_order.push(worker.local_rank);
                        if worker.failed() {
                            if let (Topology::Multi(peers), Some(failure)) = (&mut *topology, worker.failure(0)) {
                                let summary = describe(&failure, boot.assignment.group_rank);
                                if let Err(e) = peers.publish_failure(restart_count, &summary).await {
                                    tracing::warn!("cannot tell the other nodes about the failure: {e}");
                                }
                            }
                            break Event::Failed;
                        }
                    }
                },
                Some(sig) = signals.recv() => break Event::Signal(sig),
                remote = remote_failure(&mut watch) => break Event::Remote(remote),
            }
        };
        if let (Event::AllSucceeded, Topology::Multi(peers)) = (&event, &mut *topology) {
            // The exit barrier; a failure elsewhere meanwhile still restarts the job everywhere.
            tokio::select! {
                finished = peers.finish(restart_count) => match finished {
                    Ok(true) => {}
                    Ok(false) => tracing::warn!("exit barrier timed out: some nodes did not finish"),
                    Err(e) => tracing::warn!("exit barrier failed: {e}"),
                },
                remote = remote_failure(&mut watch) => event = Event::Remote(remote),
            }
        }
        if let Some(w) = &watch {
            w.abort();
        }
        let stop_started = Instant::now();
        let (escalated, remote) = match event {
            Event::AllSucceeded => (None, None),
            Event::Failed => (
                group
                    .stop(Signal::SIGTERM, config.shutdown_timeout, signals)
                    .await,
                None,
            ),
            Event::Signal(sig) => {
                tracing::warn!("received {sig}: forwarding it to the workers");
                group.stop(sig, config.shutdown_timeout, signals).await;
                (Some(sig), None)
            }
            Event::Remote(summary) => {
                tracing::warn!(
                    "the job failed on another node ({summary}): stopping this node's workers"
                );
                (
                    group
                        .stop(Signal::SIGTERM, config.shutdown_timeout, signals)
                        .await,
                    Some(summary),
                )
            }
        };
        group.drain_output(OUTPUT_DRAIN_BOUND).await;
        let failures = failures_before(&group, &exit_order, stop_started);
        let rows = summary_rows(&group, stop_started, restart_count);
        let result = |outcome| RunResult {
            outcome,
            rows,
            restarts: restart_count,
            log_dir: layout.run_dir().to_path_buf(),
        };
        let end = AttemptEnd {
            signal: escalated,
            local_failure: !failures.is_empty(),
            remote_failure: remote.clone(),
            membership: None,
        };
        let budget = Budget {
            restarts_done: restart_count,
            max_restarts: config.max_restarts,
            min_nodes: 1,
        };
        match decision::next(&end, budget) {
            Next::Stop(verdict) => return Ok(result(outcome(verdict, failures))),
            Next::Restart { counted: true } => restart_count += 1,
            // Membership changes need the elastic rendezvous; a static job has none.
            Next::Restart { counted: false } => {}
        }
        let cause = match (report::root_cause(&failures), remote) {
            (Some(root), _) => describe(root, boot.assignment.group_rank),
            (None, Some(summary)) => summary,
            (None, None) => "unknown".to_owned(),
        };
        tracing::warn!(
            "worker group failed: {cause}; restarting it ({restart_count}/{} restarts)",
            config.max_restarts
        );
    }
}

/// The run's outcome for `verdict`; `failures` are this node's, from the last attempt.
pub(super) fn outcome(verdict: Verdict, failures: Vec<Failure>) -> Outcome {
    match verdict {
        Verdict::Succeeded => Outcome::Succeeded,
        Verdict::Failed => Outcome::Failed(failures),
        Verdict::FailedElsewhere(summary) => Outcome::FailedElsewhere(summary),
        Verdict::Signaled(sig) => Outcome::Signaled(sig),
        Verdict::NodesLost {
            nodes,
            remaining,
            min_nodes,
        } => Outcome::FailedElsewhere(format!(
            "lost node(s) {}: {remaining} node(s) remain, fewer than the --nnodes minimum {min_nodes}",
            nodes.join(", ")
        )),
    }
}

/// Completes when another node reports a failure; never without a watch (single node).
async fn remote_failure(watch: &mut Option<JoinHandle<RemoteFailure>>) -> String {
    match watch {
        None => std::future::pending().await,
        Some(handle) => match handle.await {
            Ok(Ok(summary)) => summary,
            Ok(Err(e)) => format!("lost the agent store, so node 0 is gone or unreachable: {e}"),
            Err(e) => format!("the failure watch ended: {e}"),
        },
    }
}

/// One line naming a failed worker, for the other nodes and the log.
pub(super) fn describe(f: &Failure, node_rank: u32) -> String {
    let host = nix::unistd::gethostname()
        .map_or_else(|_| "?".into(), |h| h.to_string_lossy().into_owned());
    let message = f
        .error
        .as_ref()
        .map(|e| format!(": {}", e.message))
        .unwrap_or_default();
    format!(
        "rank {} (node {node_rank}, host {host}, local_rank {}, pid {}) exited with {}{message}",
        f.rank,
        f.local_rank,
        f.pid,
        f.exit.words()
    )
}

/// `GLOO_SOCKET_IFNAME`/`NCCL_SOCKET_IFNAME` for the interface that reaches the master (or
/// holds `--local-addr`), unless the user set them.
pub(super) fn socket_ifnames(
    master_addr: &str,
    master_port: u16,
    local_addr: Option<&str>,
) -> Vec<(String, String)> {
    let chosen = match local_addr {
        Some(addr) => netif::resolve(addr, 0)
            .map(|a| a.ip())
            .and_then(netif::interface_with),
        None => netif::resolve(master_addr, master_port)
            .and_then(netif::source_address)
            .and_then(netif::interface_with),
    };
    let ifname = match chosen {
        Ok(name) => name,
        Err(e) => {
            tracing::warn!("cannot tell which interface reaches the master ({e}); leaving GLOO_SOCKET_IFNAME unset");
            return Vec::new();
        }
    };
    ["GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"]
        .into_iter()
        .filter(|var| std::env::var_os(var).is_none())
        .map(|var| {
            tracing::info!("{var}={ifname} (the interface that reaches the master)");
            (var.to_owned(), ifname.clone())
        })
        .collect()
}

/// Failures the workers had on their own, before the launcher began to stop the group.
pub(super) fn failures_before(
    group: &WorkerGroup,
    exit_order: &[u32],
    stop_started: Instant,
) -> Vec<Failure> {
    group
        .workers()
        .iter()
        .filter(|w| w.ended.is_some_and(|e| e.at <= stop_started))
        .filter_map(|w| {
            let seen = exit_order
                .iter()
                .position(|&r| r == w.local_rank)
                .unwrap_or(usize::MAX);
            w.failure(seen)
        })
        .collect()
}

pub(super) fn summary_rows(
    group: &WorkerGroup,
    stop_started: Instant,
    restarts: u32,
) -> Vec<SummaryRow> {
    group
        .workers()
        .iter()
        .map(|w| SummaryRow {
            rank: w.rank,
            local_rank: w.local_rank,
            pid: w.pid,
            outcome: report::outcome_text(
                w.ended.map(|e| e.exit),
                w.ended.is_some_and(|e| e.at > stop_started),
            ),
            duration: w
                .ended
                .map_or_else(|| w.started.elapsed(), |e| e.at.duration_since(w.started)),
            restarts,
        })
        .collect()
}

fn listen(signals: &[Signal]) -> Result<mpsc::UnboundedReceiver<Signal>, AgentError> {
    let (tx, rx) = mpsc::unbounded_channel();
    for &sig in signals {
        let mut stream =
            signal(SignalKind::from_raw(sig as i32)).map_err(|e| AgentError::Signal(sig, e))?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(sig).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}
