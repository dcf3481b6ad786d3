//! A PyTorchJob run on this machine, no cluster: each replica's training container runs as a
//! local process with the environment the operator renders, the pods' service names resolving
//! to this machine (`127.0.0.1`), restart policies, `backoffLimit`, `activeDeadlineSeconds`
//! and `cleanPodPolicy` applied by the same rules as in a cluster, and the job's status printed
//! as it changes. Users try a job before they submit it; tests run real jobs.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use nix::sys::signal::Signal;

use crate::crd::{JobStatus, PyTorchJob, ReplicaSpec};
use crate::defaults::main_container;
use crate::lifecycle::{self, after_exit, AfterExit, Phase, PodState, Verdict};
use crate::names;
use crate::policy::{CleanPodPolicy, Condition, RestartPolicy};
use crate::render::{self, RenderOptions};

mod process;

pub(crate) use process::{forward_signals, start, stop_all, Proc};

/// Why a job could not be run locally.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A replica's container cannot run as a local process.
    #[error("{pod}: {why}")]
    Container {
        /// The pod.
        pod: String,
        /// What is missing, and what to do.
        why: String,
    },
    /// A process could not be started.
    #[error("{pod}: cannot start {program:?}: {source}")]
    Spawn {
        /// The pod.
        pod: String,
        /// The program.
        program: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Settings of a local run.
#[derive(Debug, Clone, Default)]
pub struct LocalOptions {
    /// Gives up (the job fails) after this long, on top of `activeDeadlineSeconds`.
    pub timeout: Option<Duration>,
    /// How pods are rendered.
    pub render: RenderOptions,
    /// Stop every pod and end the run on SIGINT, SIGTERM or SIGHUP (for the command line;
    /// it blocks those signals in the calling process).
    pub forward_signals: bool,
}

/// How a local run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The verdict.
    pub verdict: Verdict,
    /// The job's status at the end.
    pub status: JobStatus,
    /// Restarts and recreations, all replicas together.
    pub restarts: i32,
    /// The signal that ended the run, if one did.
    pub interrupted: Option<i32>,
}

/// One replica as a local process.
struct Replica {
    proc: Proc,
    state: PodState,
    policy: RestartPolicy,
    restarts: i32,
    exit_code: Option<i32>,
}

/// What the main loop waits for.
pub(crate) enum Event {
    /// Replica `.0`'s process of generation `.1` exited with code `.2`.
    Exited(usize, u32, i32),
    /// The operator itself got this signal.
    Signal(i32),
}

/// Runs `job` (defaults applied, validated) to its end; progress and the pods' output go to
/// standard output.
///
/// # Errors
/// [`LocalError`] when a container cannot run as a local process.
pub fn run(job: &PyTorchJob, options: &LocalOptions) -> Result<Outcome, LocalError> {
    let started = Instant::now();
    let mut replicas = Vec::new();
    let hosts: Vec<String> = names::replicas(job)
        .into_iter()
        .map(|(rtype, i)| names::pod_name(job.job_name(), &rtype, i))
        .collect();
    for (rtype, index) in names::replicas(job) {
        let pod = render::pod(job, &rtype, index, &options.render);
        let spec = pod.spec.clone().unwrap_or_default();
        let container = main_container(&spec.containers)
            .cloned()
            .unwrap_or_default();
        let policy = job
            .replica(&rtype)
            .map(ReplicaSpec::restart_policy)
            .unwrap_or_default();
        replicas.push(Replica {
            proc: Proc::new(&pod, &container, &hosts)?,
            state: PodState {
                rtype,
                index,
                phase: Phase::Pending,
            },
            policy,
            restarts: 0,
            exit_code: None,
        });
    }
    let (exits, exited) = mpsc::channel::<Event>();
    if options.forward_signals {
        forward_signals(exits.clone());
    }
    let mut interrupted = None;
    let mut status = JobStatus {
        start_time: Some(now()),
        ..JobStatus::default()
    };
    let mut shown = String::new();
    lifecycle::set_condition(
        &mut status,
        Condition::Created,
        "PyTorchJobCreated",
        &format!("PyTorchJob {} is created.", job.job_name()),
        &now(),
    );
    for (i, replica) in replicas.iter_mut().enumerate() {
        start(&mut replica.proc, i, &exits)?;
        replica.state.phase = Phase::Running;
    }
    let mut restarts = 0;
    let deadline = options.timeout.map(|t| started + t);
    let verdict = loop {
        let states: Vec<PodState> = replicas.iter().map(|r| r.state.clone()).collect();
        let age = started.elapsed().as_secs() as i64;
        let mut verdict = lifecycle::judge(job, &states, restarts, age);
        if verdict == Verdict::Running && deadline.is_some_and(|d| Instant::now() >= d) {
            let limit = options.timeout.unwrap_or_default();
            verdict = Verdict::Failed(
                "Timeout",
                format!("local mode's --timeout {limit:?} passed"),
            );
        }
        if verdict == Verdict::Running && states.iter().any(|p| p.phase == Phase::Running) {
            let message = format!("PyTorchJob {} is running.", job.job_name());
            lifecycle::set_condition(
                &mut status,
                Condition::Running,
                "PyTorchJobRunning",
                &message,
                &now(),
            );
        }
        status.replica_statuses = lifecycle::replica_statuses(job, &states);
        show(job, &status, &mut shown);
        if verdict != Verdict::Running {
            break verdict;
        }
        let wait = next_wait(job, started, deadline);
        let (i, generation, code) = match exited.recv_timeout(wait) {
            Ok(Event::Exited(i, generation, code)) => (i, generation, code),
            Ok(Event::Signal(signal)) => {
                interrupted = Some(signal);
                let name = Signal::try_from(signal).map_or("a signal", |s| s.as_str());
                break Verdict::Failed("Interrupted", format!("local mode got {name}"));
            }
            Err(_) => continue,
        };
        let replica = &mut replicas[i];
        if generation != replica.proc.generation {
            continue;
        }
        replica.proc.pid = None;
        replica.exit_code = Some(code);
        match after_exit(replica.policy, code) {
            AfterExit::Done => replica.state.phase = Phase::Succeeded,
            AfterExit::FailJob => replica.state.phase = Phase::Failed,
            again @ (AfterExit::RestartInPlace | AfterExit::Recreate) => {
                restarts += 1;
                replica.restarts += 1;
                let how = if again == AfterExit::Recreate {
                    "recreated"
                } else {
                    "restarted"
                };
                let message = format!(
                    "{} exited with code {code} and is {how} ({} restarts so far).",
                    replica.proc.name, restarts
                );
                lifecycle::set_condition(
                    &mut status,
                    Condition::Restarting,
                    "PyTorchJobRestarting",
                    &message,
                    &now(),
                );
                show(job, &status, &mut shown);
                let states: Vec<PodState> = replicas.iter().map(|r| r.state.clone()).collect();
                if let Verdict::Failed(..) =
                    lifecycle::judge(job, &states, restarts, started.elapsed().as_secs() as i64)
                {
                    continue;
                }
                start(&mut replicas[i].proc, i, &exits)?;
                replicas[i].state.phase = Phase::Running;
            }
        }
    };
    finish(job, &mut replicas, &mut status, &verdict, &exited);
    show(job, &status, &mut shown);
    summary(&replicas);
    Ok(Outcome {
        verdict,
        status,
        restarts,
        interrupted,
    })
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Until the next thing that happens by time alone: the job's deadline or local mode's timeout.
fn next_wait(job: &PyTorchJob, started: Instant, timeout: Option<Instant>) -> Duration {
    let active = job
        .spec
        .run_policy
        .as_ref()
        .and_then(|r| r.active_deadline_seconds)
        .map(|s| started + Duration::from_secs(s.max(0) as u64));
    [active, timeout]
        .into_iter()
        .flatten()
        .min()
        .map_or(Duration::from_secs(3600), |t| {
            t.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
        })
}

/// Ends the job: its condition, then `cleanPodPolicy` (on every terminal path, #3419), then
/// the pods a cluster would have kept running, which a local run cannot leave behind.
fn finish(
    job: &PyTorchJob,
    replicas: &mut [Replica],
    status: &mut JobStatus,
    verdict: &Verdict,
    exited: &mpsc::Receiver<Event>,
) {
    let name = job.job_name();
    match verdict {
        Verdict::Succeeded => {
            let message = format!("PyTorchJob {name} is successfully completed.");
            lifecycle::set_condition(
                status,
                Condition::Succeeded,
                "PyTorchJobSucceeded",
                &message,
                &now(),
            );
        }
        Verdict::Failed(reason, message) => {
            lifecycle::set_condition(status, Condition::Failed, reason, message, &now());
        }
        Verdict::Running => {}
    }
    status.completion_time = Some(now());
    // Pods that are ending on their own (workers after their master) get a moment to do so,
    // so that their own exit is what the summary shows — unless the user is interrupting.
    let interrupted = matches!(verdict, Verdict::Failed("Interrupted", _));
    let until = Instant::now()
        + if interrupted {
            Duration::ZERO
        } else {
            FINISHING
        };
    while replicas.iter().any(|r| r.proc.pid.is_some()) {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(event) = exited.recv_timeout(left) else {
            break;
        };
        let Event::Exited(i, generation, code) = event else {
            continue;
        };
        let r = &mut replicas[i];
        if generation == r.proc.generation {
            r.proc.pid = None;
            r.exit_code = Some(code);
            r.state.phase = if code == 0 {
                Phase::Succeeded
            } else {
                Phase::Failed
            };
        }
    }
    let policy = job.clean_pod_policy();
    let names: Vec<&str> = replicas
        .iter()
        .filter(|r| r.proc.pid.is_some())
        .map(|r| r.proc.name.as_str())
        .collect();
    if names.is_empty() {
        return;
    }
    if interrupted {
        println!("[ferrun-operator] stopping {}", names.join(", "));
    } else if policy == CleanPodPolicy::None {
        println!("[ferrun-operator] cleanPodPolicy None would leave {} running in a cluster; a local run stops them", names.join(", "));
    } else {
        println!(
            "[ferrun-operator] cleanPodPolicy {policy:?}: stopping {}",
            names.join(", ")
        );
    }
    for r in replicas.iter_mut().filter(|r| r.proc.pid.is_some()) {
        r.state.phase = Phase::Deleted;
    }
    let mut procs: Vec<&mut Proc> = replicas.iter_mut().map(|r| &mut r.proc).collect();
    stop_all(&mut procs, exited);
}

/// How long pods may take to end on their own once the job has ended.
const FINISHING: Duration = Duration::from_secs(3);

/// Prints the job's state and replica counts when they changed.
fn show(job: &PyTorchJob, status: &JobStatus, shown: &mut String) {
    let counts: Vec<String> = status
        .replica_statuses
        .iter()
        .map(|(rtype, s)| {
            format!(
                "{rtype} {} active, {} succeeded, {} failed",
                s.active, s.succeeded, s.failed
            )
        })
        .collect();
    let condition = status.conditions.last();
    let line = format!(
        "job {}: {} ({}){}",
        job.job_name(),
        lifecycle::state(status),
        counts.join("; "),
        condition
            .and_then(|c| c.message.as_deref())
            .filter(|m| !m.is_empty())
            .map(|m| format!(" — {m}"))
            .unwrap_or_default()
    );
    if *shown != line {
        println!("[ferrun-operator] {line}");
        *shown = line;
    }
}

/// The table at the end: each pod's phase, last exit code and restarts.
fn summary(replicas: &[Replica]) {
    let rows: Vec<SummaryRow<'_>> = replicas
        .iter()
        .map(|r| SummaryRow {
            pod: &r.proc.name,
            phase: format!("{:?}", r.state.phase),
            exit: r.exit_code,
            restarts: r.restarts,
        })
        .collect();
    print_summary(&rows);
}

/// A line of the table a local run ends with.
pub(crate) struct SummaryRow<'a> {
    pub(crate) pod: &'a str,
    pub(crate) phase: String,
    pub(crate) exit: Option<i32>,
    pub(crate) restarts: i32,
}

/// Prints the table: each pod's phase, last exit code and restarts.
pub(crate) fn print_summary(rows: &[SummaryRow<'_>]) {
    println!(
        "{:<40} {:<10} {:>5} {:>8}",
        "pod", "phase", "exit", "restarts"
    );
    for r in rows {
        let exit = r.exit.map_or("-".into(), |c| c.to_string());
        println!(
            "{:<40} {:<10} {:>5} {:>8}",
            r.pod, r.phase, exit, r.restarts
        );
    }
    let _ = std::io::stdout().flush();
}
