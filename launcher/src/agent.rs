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

use crate::config::LaunchConfig;
use crate::group::{Exit, WorkerGroup};
use crate::logs::LogLayout;
use crate::report::{self, Failure, SummaryRow};

/// How long worker output may stay open after the workers have exited (a grandchild may hold
/// the pipe); past it, the launcher stops waiting for that output.
const OUTPUT_DRAIN_BOUND: Duration = Duration::from_secs(2);

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// Every worker of the last attempt exited 0.
    Succeeded,
    /// Workers failed and no restart was left; the failures of the last attempt.
    Failed(Vec<Failure>),
    /// The launcher was asked to stop by this signal.
    Signaled(Signal),
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
    #[error("cannot prepare the log directory: {0}")]
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
}

enum Event {
    AllSucceeded,
    Failed,
    Signal(Signal),
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
    // The agent hosts the store the workers bootstrap through (TORCHELASTIC_USE_AGENT_STORE):
    // bound here and kept, so no other process can take MASTER_PORT before the workers use it.
    let store = StoreServer::bind_any(config.master_port.unwrap_or(0))?;
    let port = store.local_addr().port();
    let mut restart_count = 0;
    loop {
        let attempt_dir = layout
            .prepare_attempt(restart_count, config.local_world_size)
            .map_err(AgentError::Logs)?;
        // A restarted group must not read the keys of the attempt before it.
        store.clear();
        let mut group = WorkerGroup::start(config, restart_count, port, &attempt_dir)
            .map_err(AgentError::Spawn)?;
        tracing::debug!(
            attempt = restart_count,
            master_port = port,
            "workers started"
        );
        let mut exit_order = Vec::new();
        let event = loop {
            tokio::select! {
                exit = group.next_exit() => match exit {
                    None => break Event::AllSucceeded,
                    Some(worker) => {
                        exit_order.push(worker.local_rank);
                        if worker.exit.is_some_and(|(e, _, _)| !e.is_success()) {
                            break Event::Failed;
                        }
                    }
                },
                Some(sig) = signals.recv() => break Event::Signal(sig),
            }
        };
        let stop_started = Instant::now();
        let escalated = match event {
            Event::AllSucceeded => None,
            Event::Failed => {
                group
                    .stop(Signal::SIGTERM, config.shutdown_timeout, &mut signals)
                    .await
            }
            Event::Signal(sig) => {
                tracing::warn!("received {sig}: forwarding it to the workers");
                group.stop(sig, config.shutdown_timeout, &mut signals).await;
                Some(sig)
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
        if let Some(sig) = escalated {
            return Ok(result(Outcome::Signaled(sig)));
        }
        if failures.is_empty() {
            return Ok(result(Outcome::Succeeded));
        }
        if restart_count >= config.max_restarts {
            return Ok(result(Outcome::Failed(failures)));
        }
        restart_count += 1;
        if let Some(root) = report::root_cause(&failures) {
            tracing::warn!(
                "worker group failed: rank {} (local_rank {}, pid {}) exited with {}; restarting it ({restart_count}/{} restarts)",
                root.rank,
                root.local_rank,
                root.pid,
                exit_words(root.exit),
                config.max_restarts
            );
        }
    }
}

fn exit_words(exit: Exit) -> String {
    match exit {
        Exit::Code(c) => format!("code {c}"),
        Exit::Signal(s) => report::signal_name(s),
    }
}

/// Failures the workers had on their own, before the launcher began to stop the group.
fn failures_before(group: &WorkerGroup, exit_order: &[u32], stop_started: Instant) -> Vec<Failure> {
    group
        .workers()
        .iter()
        .filter(|w| w.exit.is_some_and(|(_, at, _)| at <= stop_started))
        .filter_map(|w| {
            let seen = exit_order
                .iter()
                .position(|&r| r == w.local_rank)
                .unwrap_or(usize::MAX);
            Failure::of(w, seen)
        })
        .collect()
}

fn summary_rows(group: &WorkerGroup, stop_started: Instant, restarts: u32) -> Vec<SummaryRow> {
    group
        .workers()
        .iter()
        .map(|w| SummaryRow {
            rank: w.rank,
            local_rank: w.local_rank,
            pid: w.pid,
            outcome: report::outcome_text(
                w.exit.map(|e| e.0),
                w.exit.is_some_and(|(_, at, _)| at > stop_started),
            ),
            duration: w.exit.map_or_else(
                || w.started.elapsed(),
                |(_, at, _)| at.duration_since(w.started),
            ),
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
