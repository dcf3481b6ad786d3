//! One reconcile as a pure function: from a job (defaults applied), the pods and services that
//! exist and the time, what to create, delete and write — no API calls, so every scenario is a
//! plain test.
//!
//! The training-operator's order (finished → clean up and TTL; suspended → delete all; deadline
//! and back-off; pods and services by index; status), with its bugs fixed: the deadline and
//! TTL requeue by time (#3358); `cleanPodPolicy` holds on every terminal path (#3419);
//! recreations count against `backoffLimit` (#2045); pods stuck terminating on a lost node are
//! force-deleted after a grace period (#2072).

use std::time::Duration;

use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::core::DynamicObject;

use crate::crd::{JobStatus, PyTorchJob};
use crate::lifecycle::{self, after_exit, is_true, AfterExit, Phase, PodState, Verdict};
use crate::names;
use crate::policy::{CleanPodPolicy, Condition};
use crate::render::{self, RenderOptions};
use crate::scheduling::{autoscaler, Gang};

pub use super::observe::{observe, Observed};

/// A deletion to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// The object's name.
    pub name: String,
    /// With no grace period (a pod stuck terminating).
    pub force: bool,
}

/// An event to record on the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// A warning (else normal).
    pub warning: bool,
    /// One word.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// What one reconcile does.
#[derive(Debug, Default)]
pub struct Plan {
    /// Pods to create.
    pub create_pods: Vec<Pod>,
    /// Services to create.
    pub create_services: Vec<Service>,
    /// Pods to delete.
    pub delete_pods: Vec<Deletion>,
    /// Services to delete.
    pub delete_services: Vec<String>,
    /// The job's status to write.
    pub status: JobStatus,
    /// Events to record.
    pub notes: Vec<Note>,
    /// Reconcile again after this long even if nothing happens (deadline, TTL, grace).
    pub requeue_after: Option<Duration>,
    /// The job's TTL has passed: delete it.
    pub delete_job: bool,
    /// The job's PodGroup, to apply (gang scheduling).
    pub apply_pod_group: Option<DynamicObject>,
    /// Delete the job's PodGroup (it ended, or is suspended).
    pub delete_pod_group: bool,
    /// The job's HorizontalPodAutoscaler, to apply (elastic metrics).
    pub apply_autoscaler: Option<HorizontalPodAutoscaler>,
    /// Delete the job's HorizontalPodAutoscaler (suspended).
    pub delete_autoscaler: bool,
}

/// Settings of the planner (the operator's flags).
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// How pods are rendered.
    pub render: RenderOptions,
    /// How long a pod may stay terminating before it is force-deleted.
    pub terminating_grace: Duration,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            render: RenderOptions::default(),
            terminating_grace: Duration::from_secs(300),
        }
    }
}

fn seconds_between(from: Timestamp, to: Timestamp) -> i64 {
    to.as_second() - from.as_second()
}

fn states(pods: &[Observed]) -> Vec<PodState> {
    pods.iter()
        .map(|p| PodState {
            rtype: p.rtype.clone(),
            index: p.index,
            phase: p.phase,
        })
        .collect()
}

/// What the pods are, sorted out: those that stay, and failed ones to create anew.
struct Sorted {
    /// Not terminating, of a wanted index, not failed into a retry.
    kept: Vec<Observed>,
    /// Failed pods whose restart policy retries them (unless the job fails: then they stay,
    /// for inspection).
    recreate: Vec<Deletion>,
}

/// Plans one reconcile of `job` (defaults applied and valid) at `now`; `pod_group_phase` is
/// the phase of its PodGroup when gang scheduling is on and the group exists.
pub fn plan(
    job: &PyTorchJob,
    pods: &[Observed],
    services: &[String],
    pod_group_phase: Option<&str>,
    now: Timestamp,
    options: &PlanOptions,
) -> Plan {
    let mut plan = Plan {
        status: job.status.clone().unwrap_or_default(),
        ..Plan::default()
    };
    plan.status.replica_statuses = lifecycle::replica_statuses(job, &states(pods));
    let gang = options.render.gang.as_ref();
    if is_true(&plan.status, Condition::Succeeded) || is_true(&plan.status, Condition::Failed) {
        plan.finished(job, pods, services, gang, now);
        return plan;
    }
    if job.spec.run_policy.as_ref().and_then(|r| r.suspend) == Some(true) {
        plan.suspend(job, pods, services, gang, now);
        return plan;
    }
    if is_true(&plan.status, Condition::Suspended) {
        plan.resume(job, now);
    }
    let started = plan.mark_started(job, now);
    let sorted = plan.sort_pods(job, pods, services, now, options.terminating_grace);
    let recreated = sorted.recreate.len() as i32;
    let recreations = plan.status.pod_recreations.unwrap_or(0) + recreated;
    if recreations > 0 {
        plan.status.pod_recreations = Some(recreations);
    }
    let restarts = recreations + pods.iter().map(|p| p.restarts).sum::<i32>();
    let age = seconds_between(started, now);
    match lifecycle::judge(job, &states(&sorted.kept), restarts, age) {
        Verdict::Running => {
            plan.delete_pods.extend(sorted.recreate);
            plan.keep_running(job, pods, services, pod_group_phase, options, now);
            plan.report_progress(job, &sorted.kept, recreated, now);
            if let Some(deadline) = job
                .spec
                .run_policy
                .as_ref()
                .and_then(|r| r.active_deadline_seconds)
            {
                plan.requeue(Duration::from_secs((deadline - age).max(1) as u64));
            }
        }
        verdict => plan.end(job, &sorted.kept, services, gang, verdict, now),
    }
    plan.status.replica_statuses = lifecycle::replica_statuses(job, &states(&sorted.kept));
    plan
}

impl Plan {
    fn requeue(&mut self, after: Duration) {
        self.requeue_after = Some(self.requeue_after.map_or(after, |a| a.min(after)));
    }

    fn note(&mut self, warning: bool, reason: &str, message: String) {
        self.notes.push(Note {
            warning,
            reason: reason.into(),
            message,
        });
    }

    fn delete_pod(&mut self, name: &str, force: bool) {
        self.delete_pods.push(Deletion {
            name: name.into(),
            force,
        });
    }

    /// The job had ended before: its pods are cleaned up and its TTL kept.
    fn finished(
        &mut self,
        job: &PyTorchJob,
        pods: &[Observed],
        services: &[String],
        gang: Option<&Gang>,
        now: Timestamp,
    ) {
        self.delete_pod_group = gang.is_some();
        self.clean_up(job, pods, services);
        self.time_to_live(job, now);
    }

    /// `runPolicy.suspend`: every pod, service, PodGroup and autoscaler goes; `Running` is
    /// no longer true.
    fn suspend(
        &mut self,
        job: &PyTorchJob,
        pods: &[Observed],
        services: &[String],
        gang: Option<&Gang>,
        now: Timestamp,
    ) {
        for pod in pods {
            self.delete_pod(&pod.name, false);
        }
        self.delete_services = services.to_vec();
        self.delete_pod_group = gang.is_some();
        self.delete_autoscaler = autoscaler(job).is_some();
        let message = format!("PyTorchJob {} is suspended.", job.job_name());
        let stamp = Time(now);
        if lifecycle::set_condition(
            &mut self.status,
            Condition::Suspended,
            "PyTorchJobSuspended",
            &message,
            &stamp,
        ) {
            self.note(false, "PyTorchJobSuspended", message);
        }
        if let Some(c) = lifecycle::condition_mut(&mut self.status, Condition::Running) {
            c.status = "False".into();
        }
    }

    /// A suspended job is resumed: `Suspended` turns false and the deadline counts from now.
    fn resume(&mut self, job: &PyTorchJob, now: Timestamp) {
        let message = format!("PyTorchJob {} is resumed.", job.job_name());
        if let Some(c) = lifecycle::condition_mut(&mut self.status, Condition::Suspended) {
            c.status = "False".into();
            c.reason = Some("PyTorchJobResumed".into());
            c.message = Some(message.clone());
            c.last_transition_time = Some(Time(now));
        }
        self.note(false, "PyTorchJobResumed", message);
        self.status.start_time = Some(Time(now));
    }

    /// The start time (set now if the job had none) and the `Created` condition.
    fn mark_started(&mut self, job: &PyTorchJob, now: Timestamp) -> Timestamp {
        let stamp = Time(now);
        let started = self
            .status
            .start_time
            .get_or_insert_with(|| stamp.clone())
            .0;
        if lifecycle::condition_mut(&mut self.status, Condition::Created).is_none() {
            let message = format!("PyTorchJob {} is created.", job.job_name());
            lifecycle::set_condition(
                &mut self.status,
                Condition::Created,
                "PyTorchJobCreated",
                &message,
                &stamp,
            );
        }
        started
    }

    /// Sorts the pods: terminating ones wait out their grace (then are force-deleted), those
    /// of a replica or index the job no longer has go, failed ones their policy retries are
    /// to be recreated; the rest stay.
    fn sort_pods(
        &mut self,
        job: &PyTorchJob,
        pods: &[Observed],
        services: &[String],
        now: Timestamp,
        grace: Duration,
    ) -> Sorted {
        let mut sorted = Sorted {
            kept: Vec::new(),
            recreate: Vec::new(),
        };
        for pod in pods {
            if let Some(since) = pod.deleting_since {
                let grace = grace.as_secs() as i64;
                let left = grace - seconds_between(since, now);
                if left <= 0 {
                    self.delete_pod(&pod.name, true);
                    self.note(true, "ForceDeletePod", format!("{} stayed terminating for over {grace} s (its node is likely gone); deleted without grace", pod.name));
                } else {
                    self.requeue(Duration::from_secs(left as u64));
                }
                continue;
            }
            let replica = job.replica(&pod.rtype);
            let Some(replica) = replica.filter(|r| pod.index < r.count()) else {
                self.delete_pod(&pod.name, false);
                if services.contains(&pod.name) {
                    self.delete_services.push(pod.name.clone());
                }
                continue;
            };
            if pod.phase == Phase::Failed {
                // No terminated state recorded: the training-operator's sentinel, retryable.
                let code = pod.exit_code.unwrap_or(0xbeef);
                if after_exit(replica.restart_policy(), code) != AfterExit::FailJob {
                    sorted.recreate.push(Deletion {
                        name: pod.name.clone(),
                        force: false,
                    });
                    self.note(
                        true,
                        "PyTorchJobRestarting",
                        format!("{} failed with exit code {code}; it is recreated", pod.name),
                    );
                    continue;
                }
            }
            sorted.kept.push(pod.clone());
        }
        sorted
    }

    /// The job goes on: its autoscaler and PodGroup applied, missing pods (once the gang is
    /// admitted) and services created.
    fn keep_running(
        &mut self,
        job: &PyTorchJob,
        pods: &[Observed],
        services: &[String],
        pod_group_phase: Option<&str>,
        options: &PlanOptions,
        now: Timestamp,
    ) {
        let gang = options.render.gang.as_ref();
        self.apply_autoscaler = autoscaler(job);
        self.apply_pod_group = gang.map(|g| g.pod_group(job));
        // Volcano admits a group as a whole: no pods until it is past Pending.
        let admitted = gang != Some(&Gang::Volcano)
            || pod_group_phase.is_some_and(|p| !p.is_empty() && p != "Pending");
        if !admitted {
            self.status.last_reconcile_time = Some(Time(now));
            self.requeue(Duration::from_secs(5));
        }
        for (rtype, index) in names::replicas(job) {
            let pod_name = names::pod_name(job.job_name(), &rtype, index);
            if admitted && !pods.iter().any(|p| p.name == pod_name) {
                self.create_pods
                    .push(render::pod(job, &rtype, index, &options.render));
            }
            if !services.contains(&pod_name) {
                self.create_services
                    .push(render::service(job, &rtype, index));
            }
        }
    }

    /// `Restarting` when pods are recreated, else `Running` once one runs.
    fn report_progress(
        &mut self,
        job: &PyTorchJob,
        kept: &[Observed],
        recreated: i32,
        now: Timestamp,
    ) {
        let name = job.job_name();
        let (kind, reason, message) = if recreated > 0 {
            (
                Condition::Restarting,
                "PyTorchJobRestarting",
                format!("PyTorchJob {name} is restarting: {recreated} pod(s) recreated."),
            )
        } else if kept.iter().any(|p| p.phase == Phase::Running) {
            (
                Condition::Running,
                "PyTorchJobRunning",
                format!("PyTorchJob {name} is running."),
            )
        } else {
            return;
        };
        lifecycle::set_condition(&mut self.status, kind, reason, &message, &Time(now));
    }

    /// The job ends with `verdict`: its condition, an event, the completion time, clean-up
    /// and TTL.
    fn end(
        &mut self,
        job: &PyTorchJob,
        kept: &[Observed],
        services: &[String],
        gang: Option<&Gang>,
        verdict: Verdict,
        now: Timestamp,
    ) {
        let stamp = Time(now);
        match verdict {
            Verdict::Succeeded => {
                let message = format!("PyTorchJob {} is successfully completed.", job.job_name());
                lifecycle::set_condition(
                    &mut self.status,
                    Condition::Succeeded,
                    "PyTorchJobSucceeded",
                    &message,
                    &stamp,
                );
                self.note(false, "PyTorchJobSucceeded", message);
            }
            Verdict::Failed(reason, message) => {
                lifecycle::set_condition(
                    &mut self.status,
                    Condition::Failed,
                    reason,
                    &message,
                    &stamp,
                );
                self.note(true, "PyTorchJobFailed", message);
            }
            Verdict::Running => return,
        }
        self.delete_pod_group = gang.is_some();
        self.status.completion_time = Some(stamp);
        self.clean_up(job, kept, services);
        self.time_to_live(job, now);
    }

    /// Deletes the pods (and their services) that `cleanPodPolicy` names.
    fn clean_up(&mut self, job: &PyTorchJob, pods: &[Observed], services: &[String]) {
        let policy = job.clean_pod_policy();
        for pod in pods.iter().filter(|p| p.deleting_since.is_none()) {
            let doomed = match policy {
                CleanPodPolicy::All => true,
                CleanPodPolicy::Running => matches!(pod.phase, Phase::Running | Phase::Pending),
                CleanPodPolicy::None => false,
            };
            if doomed {
                self.delete_pod(&pod.name, false);
                if services.contains(&pod.name) {
                    self.delete_services.push(pod.name.clone());
                }
            }
        }
        if policy == CleanPodPolicy::All {
            for service in services {
                if !self.delete_services.contains(service) {
                    self.delete_services.push(service.clone());
                }
            }
        }
    }

    /// Requeues for the TTL, or asks for the job's deletion once it has passed.
    fn time_to_live(&mut self, job: &PyTorchJob, now: Timestamp) {
        let ttl = job
            .spec
            .run_policy
            .as_ref()
            .and_then(|r| r.ttl_seconds_after_finished);
        let done = self.status.completion_time.as_ref().map(|t| t.0);
        if let (Some(ttl), Some(done)) = (ttl, done) {
            let left = i64::from(ttl) - seconds_between(done, now);
            if left <= 0 {
                self.delete_job = true;
            } else {
                self.requeue(Duration::from_secs(left as u64));
            }
        }
    }
}
