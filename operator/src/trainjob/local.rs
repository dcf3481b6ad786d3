//! A TrainJob run on this machine, no cluster: every pod Trainer would create runs its
//! container's command as a local process with the environment Trainer renders (`PET_NODE_RANK`
//! from its completion index), the pods' names resolving to this machine. Replicated jobs run
//! in the runtime's order, each to completion before the next (as initializers precede the
//! trainer through `dependsOn`); a pod that fails is restarted until its Job's failures pass
//! `backoffLimit`, which fails the JobSet and the TrainJob (Kubernetes' and JobSet's default
//! rules); `activeDeadlineSeconds` and Ctrl-C end it.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use nix::sys::signal::Signal;

use super::crd::{TrainJob, TrainingRuntime};
use super::render::{self, RenderedPod, NODE_CONTAINER};
use super::TrainJobError;
use crate::lifecycle::Phase;
use crate::local::{
    forward_signals, print_summary, start, stop_all, Event, LocalError, Proc, SummaryRow,
};

/// Settings of a local TrainJob run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Gives up (the job fails) after this long, on top of `activeDeadlineSeconds`.
    pub timeout: Option<Duration>,
    /// The master's port instead of Trainer's 29500 (several jobs on one machine).
    pub master_port: Option<u16>,
    /// Stop every pod and end the run on SIGINT, SIGTERM or SIGHUP (blocks them in the
    /// calling process).
    pub forward_signals: bool,
}

/// A TrainJob's terminal condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// Every pod of every replicated job succeeded.
    Complete,
    /// A Job failed (or the deadline passed, or the run was interrupted).
    Failed,
}

/// How a local TrainJob run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The TrainJob's terminal condition.
    pub condition: Terminal,
    /// Its reason (one word).
    pub reason: String,
    /// For people.
    pub message: String,
    /// Pod restarts, all pods together.
    pub restarts: i32,
    /// The signal that ended the run, if one did.
    pub interrupted: Option<i32>,
}

impl Outcome {
    /// Whether the job completed.
    pub fn succeeded(&self) -> bool {
        self.condition == Terminal::Complete
    }
}

/// A pod as a local process, with what the summary shows.
struct Node {
    rendered: RenderedPod,
    proc: Proc,
    phase: Phase,
    exit: Option<i32>,
    restarts: i32,
}

/// Runs `job` on `runtime` to its end; progress and the pods' output go to standard output.
///
/// # Errors
/// The job is invalid or suspended, or a container cannot run as a local process.
pub fn run(
    job: &TrainJob,
    runtime: &TrainingRuntime,
    options: &RunOptions,
) -> Result<Outcome, TrainJobError> {
    super::validate(job, runtime)?;
    let name = job.metadata.name.clone().unwrap_or_default();
    if job.spec.suspend == Some(true) {
        return Err(TrainJobError::Invalid(vec![format!(
            "spec.suspend is true: TrainJob {name} runs nothing until it is resumed; drop it to run the job"
        )]));
    }
    let ignored = [
        (
            "spec.runtimePatches",
            job.spec
                .runtime_patches
                .as_ref()
                .is_some_and(|p| !p.is_empty()),
        ),
        ("spec.initializer", job.spec.initializer.is_some()),
    ];
    for (field, _) in ignored.iter().filter(|(_, set)| *set) {
        println!("[ferrun-operator] trainjob {name}: {field} is not applied in local mode (the runtime's own jobs run as written)");
    }
    let mut rendered = render::pods(job, runtime);
    if let Some(port) = options.master_port {
        for pod in rendered.iter_mut().filter(|p| p.trainer) {
            set_master_port(&mut pod.pod, port);
        }
    }
    let mut hosts: Vec<String> = rendered
        .iter()
        .filter_map(|p| p.pod.metadata.name.as_ref())
        .map(|host| format!("{host}.{name}"))
        .collect();
    hosts.extend(rendered.iter().filter_map(|p| p.pod.metadata.name.clone()));
    let mut nodes = Vec::new();
    for r in rendered {
        let spec = r.pod.spec.clone().unwrap_or_default();
        let container = spec
            .containers
            .iter()
            .find(|c| c.name == NODE_CONTAINER)
            .or(spec.containers.first())
            .cloned()
            .unwrap_or_default();
        nodes.push(Node {
            proc: Proc::new(&r.pod, &container, &hosts)?,
            rendered: r,
            phase: Phase::Pending,
            exit: None,
            restarts: 0,
        });
    }
    let (exits, exited) = mpsc::channel::<Event>();
    if options.forward_signals {
        forward_signals(exits.clone());
    }
    println!(
        "[ferrun-operator] trainjob {name}: Created ({} pods on runtime {})",
        nodes.len(),
        runtime.metadata.name.as_deref().unwrap_or_default()
    );
    let started = Instant::now();
    let deadlines = [
        job.spec.active_deadline_seconds.map(|s| {
            (
                Duration::from_secs(s.max(0) as u64),
                "activeDeadlineSeconds",
            )
        }),
        options.timeout.map(|t| (t, "local mode's --timeout")),
    ];
    let deadline = deadlines
        .into_iter()
        .flatten()
        .min_by_key(|(d, _)| *d)
        .map(|(d, why)| (started + d, d, why));
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        match groups.last_mut() {
            Some((job, members)) if *job == node.rendered.replicated_job => members.push(i),
            _ => groups.push((node.rendered.replicated_job.clone(), vec![i])),
        }
    }
    let mut ended = None;
    for (replicated_job, members) in &groups {
        if let Some(end) = run_group(
            &name,
            replicated_job,
            members,
            &mut nodes,
            &exits,
            &exited,
            deadline,
        )? {
            ended = Some(end);
            break;
        }
    }
    let (condition, reason, message, interrupted) = ended.unwrap_or_else(|| {
        (
            Terminal::Complete,
            "JobsCompleted".into(),
            format!("TrainJob {name} is completed"),
            None,
        )
    });
    for node in nodes.iter_mut().filter(|n| n.proc.pid.is_some()) {
        node.phase = Phase::Deleted;
    }
    let mut procs: Vec<&mut Proc> = nodes.iter_mut().map(|n| &mut n.proc).collect();
    stop_all(&mut procs, &exited);
    println!("[ferrun-operator] trainjob {name}: {condition:?} ({reason}) — {message}");
    let rows: Vec<SummaryRow<'_>> = nodes
        .iter()
        .map(|n| SummaryRow {
            pod: &n.proc.name,
            phase: format!("{:?}", n.phase),
            exit: n.exit,
            restarts: n.restarts,
        })
        .collect();
    print_summary(&rows);
    Ok(Outcome {
        condition,
        reason,
        message,
        restarts: nodes.iter().map(|n| n.restarts).sum(),
        interrupted,
    })
}

/// How a run ended early: condition, reason, message, the signal if one ended it.
type End = (Terminal, String, String, Option<i32>);

/// Runs one replicated job's pods until all succeed (`None`) or the run ends.
#[allow(clippy::too_many_arguments)]
fn run_group(
    job: &str,
    replicated_job: &str,
    members: &[usize],
    nodes: &mut [Node],
    exits: &mpsc::Sender<Event>,
    exited: &mpsc::Receiver<Event>,
    deadline: Option<(Instant, Duration, &str)>,
) -> Result<Option<End>, LocalError> {
    for &i in members {
        start(&mut nodes[i].proc, i, exits)?;
        nodes[i].phase = Phase::Running;
    }
    let backoff_limit = members
        .first()
        .map_or(6, |&i| nodes[i].rendered.backoff_limit);
    let mut failures = 0;
    let mut shown = String::new();
    loop {
        let count = |phase| members.iter().filter(|&&i| nodes[i].phase == phase).count();
        let line = format!(
            "[ferrun-operator] trainjob {job}: {replicated_job} {} active, {} succeeded, {failures} failed",
            count(Phase::Running),
            count(Phase::Succeeded)
        );
        if line != shown {
            println!("{line}");
            shown = line;
        }
        if count(Phase::Succeeded) == members.len() {
            return Ok(None);
        }
        let wait = match deadline {
            Some((at, limit, why)) => {
                if Instant::now() >= at {
                    let message = format!("the job ran past {why} ({limit:?})");
                    return Ok(Some((
                        Terminal::Failed,
                        "DeadlineExceeded".into(),
                        message,
                        None,
                    )));
                }
                at.saturating_duration_since(Instant::now()) + Duration::from_millis(1)
            }
            None => Duration::from_secs(3600),
        };
        let (i, generation, code) = match exited.recv_timeout(wait) {
            Ok(Event::Exited(i, generation, code)) => (i, generation, code),
            Ok(Event::Signal(signal)) => {
                let what = Signal::try_from(signal).map_or("a signal", |s| s.as_str());
                let message = format!("local mode got {what}");
                return Ok(Some((
                    Terminal::Failed,
                    "Interrupted".into(),
                    message,
                    Some(signal),
                )));
            }
            Err(_) => continue,
        };
        let node = &mut nodes[i];
        if generation != node.proc.generation {
            continue;
        }
        node.proc.pid = None;
        node.exit = Some(code);
        if code == 0 {
            node.phase = Phase::Succeeded;
            continue;
        }
        failures += 1;
        if failures > backoff_limit {
            node.phase = Phase::Failed;
            let message = format!(
                "job {job}-{replicated_job}-0 failed: {} exited with code {code}, {failures} failures past backoffLimit {backoff_limit}",
                node.proc.name
            );
            return Ok(Some((Terminal::Failed, "FailedJobs".into(), message, None)));
        }
        println!(
            "[ferrun-operator] {} exited with code {code}; restarted ({failures} of backoffLimit {backoff_limit})",
            node.proc.name
        );
        node.restarts += 1;
        start(&mut node.proc, i, exits)?;
    }
}

/// `PET_MASTER_PORT` (and the container port Trainer adds for it) set to `port`.
fn set_master_port(pod: &mut Pod, port: u16) {
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    for container in spec
        .containers
        .iter_mut()
        .filter(|c| c.name == NODE_CONTAINER)
    {
        for var in container.env.iter_mut().flatten() {
            if var.name == "PET_MASTER_PORT" {
                var.value = Some(port.to_string());
            }
        }
        for p in container.ports.iter_mut().flatten() {
            if p.container_port == render::MASTER_PORT {
                p.container_port = i32::from(port);
            }
        }
    }
}
