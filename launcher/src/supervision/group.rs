//! The local worker group: start every worker of an attempt, learn of each exit as it happens,
//! and stop the group.
//!
//! Exits are events: one task per worker awaits the child (tokio reaps on SIGCHLD) and sends
//! `(index, exit)` on a channel, so a failure is seen the moment the kernel reports it.
//!
//! # Stopping
//! [`WorkerGroup::stop`] sends one signal to every worker's process group, waits up to the grace
//! period for the workers to exit, then sends SIGKILL to the process groups and waits for them.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::configuration::config::LaunchConfig;
use crate::reports::error_file;
use crate::reports::exit::Exit;
use crate::reports::logs::worker_files;
use crate::reports::output::{self, Console, Duplicate, Sink};
use crate::reports::report::Failure;
use crate::supervision::warm::WarmPool;
use crate::supervision::worker::{self, Bootstrap, Piped};

/// When and how a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// How it ended.
    pub exit: Exit,
    /// When the launcher saw it (monotonic: for ordering and durations).
    pub at: Instant,
    /// When the launcher saw it (wall clock: for the report).
    pub wall: SystemTime,
}

/// One worker's exit, as its watcher task reports it.
#[derive(Debug)]
struct ExitEvent {
    index: usize,
    ended: Ended,
}

/// One worker of an attempt, as the group sees it.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Rank within the node.
    pub local_rank: u32,
    /// Global rank.
    pub rank: u32,
    /// Process id (and process group id).
    pub pid: u32,
    /// When it was started.
    pub started: Instant,
    /// Its `TORCHELASTIC_ERROR_FILE`.
    pub error_file: PathBuf,
    /// How and when it ended, once it has.
    pub ended: Option<Ended>,
}

impl Worker {
    /// Its failure record, reading its error file, when it exited unsuccessfully; `seen` is
    /// the order in which the launcher saw the exit.
    pub fn failure(&self, seen: usize) -> Option<Failure> {
        let ended = self.ended?;
        if ended.exit.is_success() {
            return None;
        }
        let error = error_file::read(&self.error_file);
        Some(Failure {
            rank: self.rank,
            local_rank: self.local_rank,
            pid: self.pid,
            exit: ended.exit,
            when: ended.wall,
            error_file: error.is_some().then(|| self.error_file.clone()),
            error,
            seen,
        })
    }

    /// It exited unsuccessfully.
    pub fn failed(&self) -> bool {
        self.ended.is_some_and(|e| !e.exit.is_success())
    }
}

/// The workers of one attempt.
#[derive(Debug)]
pub struct WorkerGroup {
    workers: Vec<Worker>,
    exits: mpsc::UnboundedReceiver<ExitEvent>,
    forwarders: Vec<JoinHandle<()>>,
}

impl WorkerGroup {
    /// Starts `local_world_size` workers for attempt `restart_count` in `attempt_dir`, placed as
    /// `boot` says: handed to `warm`'s pre-started interpreters where it has them (then
    /// refilled for the next attempt), else started afresh.
    ///
    /// # Errors
    /// A worker cannot be started; those already started are killed before returning.
    pub fn start(
        config: &LaunchConfig,
        boot: &Bootstrap,
        restart_count: u32,
        attempt_dir: &Path,
        mut warm: Option<&mut WarmPool>,
    ) -> io::Result<Self> {
        let (tx, exits) = mpsc::unbounded_channel();
        let mut group = Self {
            workers: Vec::new(),
            exits,
            forwarders: Vec::new(),
        };
        let duplicates = [
            duplicate_file(
                attempt_dir,
                "filtered_stdout.log",
                &config.output.stdout_filters,
            )?,
            duplicate_file(
                attempt_dir,
                "filtered_stderr.log",
                &config.output.stderr_filters,
            )?,
        ];
        for local_rank in 0..config.local_world_size {
            if let Err(e) = group.start_one(
                config,
                boot,
                (local_rank, restart_count),
                attempt_dir,
                (&duplicates, warm.as_deref_mut()),
                &tx,
            ) {
                group.kill_all();
                return Err(e);
            }
        }
        if let Some(pool) = warm {
            pool.refill(config);
        }
        Ok(group)
    }

    fn start_one(
        &mut self,
        config: &LaunchConfig,
        boot: &Bootstrap,
        (local_rank, restart_count): (u32, u32),
        attempt_dir: &Path,
        (duplicates, warm): (&[Option<Duplicate>; 2], Option<&mut WarmPool>),
        tx: &mpsc::UnboundedSender<ExitEvent>,
    ) -> io::Result<()> {
        let [stdout_log, stderr_log, error_file] = worker_files(attempt_dir, local_rank);
        let env = worker::worker_env(config, boot, local_rank, restart_count, &error_file);
        let out = &config.output;
        let redirect = out.redirects.for_rank(local_rank);
        let tee = out.tee.for_rank(local_rank);
        let shown = out
            .ranks_filter
            .as_ref()
            .is_none_or(|f| f.contains(&local_rank));
        let prefix = output::prefix(
            out.prefix_template.as_deref(),
            &config.role,
            env.rank,
            local_rank,
        );
        // Per stream: (to file, to console, piped through the launcher).
        let route = |to_file: bool, redirected: bool, dup: &Option<Duplicate>| {
            let console = shown && !redirected;
            let piped = to_file || dup.is_some() || !shown || (console && !out.raw);
            (to_file, console, piped)
        };
        let streams = [
            route(
                redirect.stdout || tee.stdout,
                redirect.stdout,
                &duplicates[0],
            ),
            route(
                redirect.stderr || tee.stderr,
                redirect.stderr,
                &duplicates[1],
            ),
        ];
        let piped = Piped {
            stdout: streams[0].2,
            stderr: streams[1].2,
        };
        let warm = match warm {
            Some(pool) => {
                let launch = worker::launch_of(config, &env, &boot.extra_env)?;
                pool.activate(local_rank, &launch, &std::env::current_dir()?, piped)
            }
            None => None,
        };
        let mut child = match warm {
            Some(Ok(child)) => child,
            Some(Err(e)) => {
                tracing::warn!(
                    "warm start of local rank {local_rank} failed ({e}); starting it cold"
                );
                worker::spawn(config, &env, &boot.extra_env, piped)?
            }
            None => worker::spawn(config, &env, &boot.extra_env, piped)?,
        };
        let pid = child.id().unwrap_or(0);
        let sink = |(to_file, console, _): (bool, bool, bool),
                    kind: Console,
                    log: &Path,
                    dup: &Option<Duplicate>| {
            Ok::<_, io::Error>(Sink {
                console: console.then(|| (kind, prefix.clone())),
                file: if to_file {
                    Some(File::create(log)?)
                } else {
                    None
                },
                duplicate: dup.clone(),
                prefix: prefix.clone(),
            })
        };
        if let Some(stdout) = child.stdout.take() {
            let sink = sink(streams[0], Console::Stdout, &stdout_log, &duplicates[0])?;
            self.forwarders
                .push(tokio::spawn(output::forward(stdout, sink)));
        }
        if let Some(stderr) = child.stderr.take() {
            let sink = sink(streams[1], Console::Stderr, &stderr_log, &duplicates[1])?;
            self.forwarders
                .push(tokio::spawn(output::forward(stderr, sink)));
        }
        let index = self.workers.len();
        let tx = tx.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => Exit::from(status),
                Err(_) => Exit::Code(-1),
            };
            let ended = Ended {
                exit,
                at: Instant::now(),
                wall: SystemTime::now(),
            };
            let _ = tx.send(ExitEvent { index, ended });
        });
        self.workers.push(Worker {
            local_rank,
            rank: env.rank,
            pid,
            started: Instant::now(),
            error_file,
            ended: None,
        });
        Ok(())
    }

    /// The workers, with the exits seen so far.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Waits for the next worker to exit; `None` once every worker has exited.
    pub async fn next_exit(&mut self) -> Option<&Worker> {
        if self.workers.iter().all(|w| w.ended.is_some()) {
            return None;
        }
        let ExitEvent { index, ended } = self.exits.recv().await?;
        self.workers[index].ended = Some(ended);
        Some(&self.workers[index])
    }

    /// Stops the group: `signal` to every process group, then SIGKILL after `grace`, or as soon
    /// as `escalate` yields (a second signal to the launcher). Returns the signal that escalated.
    pub async fn stop(
        &mut self,
        signal: Signal,
        grace: Duration,
        escalate: &mut mpsc::UnboundedReceiver<Signal>,
    ) -> Option<Signal> {
        self.signal_all(signal);
        let deadline = tokio::time::Instant::now() + grace;
        let mut escalated = None;
        loop {
            tokio::select! {
                exit = self.next_exit() => if exit.is_none() { break },
                () = tokio::time::sleep_until(deadline) => break,
                Some(sig) = escalate.recv(), if escalated.is_none() => {
                    tracing::warn!("{sig} received while stopping the workers: killing them now");
                    escalated = Some(sig);
                    break;
                }
            }
        }
        self.kill_all();
        while self.next_exit().await.is_some() {}
        escalated
    }

    /// Waits (bounded) for the output of every worker to be passed on.
    pub async fn drain_output(&mut self, bound: Duration) {
        let forwarders = std::mem::take(&mut self.forwarders);
        let all = async {
            for f in forwarders {
                let _ = f.await;
            }
        };
        if tokio::time::timeout(bound, all).await.is_err() {
            tracing::warn!("worker output still open after the workers exited (a child process holds it); not waiting for it");
        }
    }

    fn signal_all(&self, signal: Signal) {
        // A running worker's group is its own. An exited worker's group may still hold its
        // children, but once empty its number can be recycled: signal it only while a process
        // of it carries this launcher's mark.
        let mut marked: Option<Vec<(i32, i32)>> = None;
        for w in self.workers.iter().filter(|w| w.pid != 0) {
            let pgid = w.pid as i32;
            let ours = w.ended.is_none()
                || marked
                    .get_or_insert_with(|| {
                        crate::supervision::descendants::find(
                            crate::supervision::descendants::mark_value(),
                        )
                    })
                    .iter()
                    .any(|&(_, g)| g == pgid);
            if ours {
                let _ = killpg(Pid::from_raw(pgid), signal);
            }
        }
    }

    fn kill_all(&self) {
        self.signal_all(Signal::SIGKILL);
    }
}

fn duplicate_file(
    attempt_dir: &Path,
    name: &str,
    patterns: &[String],
) -> io::Result<Option<Duplicate>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let file = File::create(attempt_dir.join(name))?;
    Ok(Some(Duplicate {
        patterns: Arc::new(patterns.to_vec()),
        file: Arc::new(Mutex::new(file)),
    }))
}
