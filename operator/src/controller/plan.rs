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
use crate::defaults::CONTAINER;
use crate::lifecycle::{self, after_exit, AfterExit, Phase, PodState, Verdict};
use crate::render::{self, RenderOptions, REPLICA_INDEX, REPLICA_TYPE};

/// A pod as a reconcile sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Its name.
    pub name: String,
    /// `Master` or `Worker` (from its label).
    pub rtype: String,
    /// Its index (from its label).
    pub index: i32,
    /// Its phase.
    pub phase: Phase,
    /// The training container's exit code, once terminated.
    pub exit_code: Option<i32>,
    /// Restarts of its containers, init containers included.
    pub restarts: i32,
    /// When its deletion was asked for (it is terminating).
    pub deleting_since: Option<Timestamp>,
}

/// A pod of the job as observed, or `None` when its labels do not name a replica.
pub fn observe(pod: &Pod) -> Option<Observed> {
    let labels = pod.metadata.labels.as_ref()?;
    let rtype = match labels.get(REPLICA_TYPE)?.as_str() {
        "master" => crate::crd::MASTER,
        "worker" => crate::crd::WORKER,
        _ => return None,
    };
    let index = labels.get(REPLICA_INDEX)?.parse().ok()?;
    let status = pod.status.clone().unwrap_or_default();
    let phase = match status.phase.as_deref() {
        Some("Running") => Phase::Running,
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ => Phase::Pending,
    };
    let containers = status.container_statuses.clone().unwrap_or_default();
    let inits = status.init_container_statuses.clone().unwrap_or_default();
    let exit_code = containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .and_then(|c| c.state.as_ref()?.terminated.as_ref())
        .map(|t| t.exit_code);
    Some(Observed {
        name: pod.metadata.name.clone()?,
        rtype: rtype.to_owned(),
        index,
        phase,
        exit_code,
        restarts: containers
            .iter()
            .chain(&inits)
            .map(|c| c.restart_count)
            .sum(),
        deleting_since: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
    })
}

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

fn is_true(status: &JobStatus, kind: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == kind && c.status == "True")
}

fn seconds_between(from: Timestamp, to: Timestamp) -> i64 {
    to.as_second() - from.as_second()
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

    /// Deletes the pods (and their services) that `cleanPodPolicy` names.
    fn clean_up(&mut self, job: &PyTorchJob, pods: &[Observed], services: &[String]) {
        let policy = job
            .spec
            .run_policy
            .as_ref()
            .and_then(|r| r.clean_pod_policy.as_deref())
            .unwrap_or("None");
        for pod in pods.iter().filter(|p| p.deleting_since.is_none()) {
            let doomed = match policy {
                "All" => true,
                "Running" => matches!(pod.phase, Phase::Running | Phase::Pending),
                _ => false,
            };
            if doomed {
                self.delete_pods.push(Deletion {
                    name: pod.name.clone(),
                    force: false,
                });
                if services.contains(&pod.name) {
                    self.delete_services.push(pod.name.clone());
                }
            }
        }
        if policy == "All" {
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
    let gang = options.render.gang.as_ref();
    let mut plan = Plan {
        status: job.status.clone().unwrap_or_default(),
        ..Plan::default()
    };
    let stamp = Time(now);
    let name = job.job_name().to_owned();
    let states = |pods: &[Observed]| -> Vec<PodState> {
        pods.iter()
            .map(|p| PodState {
                rtype: p.rtype.clone(),
                index: p.index,
                phase: p.phase,
            })
            .collect()
    };
    plan.status.replica_statuses = lifecycle::replica_statuses(job, &states(pods));
    if is_true(&plan.status, "Succeeded") || is_true(&plan.status, "Failed") {
        plan.delete_pod_group = gang.is_some();
        plan.clean_up(job, pods, services);
        plan.time_to_live(job, now);
        return plan;
    }
    let run = job.spec.run_policy.clone().unwrap_or_default();
    if run.suspend == Some(true) {
        for pod in pods {
            plan.delete_pods.push(Deletion {
                name: pod.name.clone(),
                force: false,
            });
        }
        plan.delete_services = services.to_vec();
        plan.delete_pod_group = gang.is_some();
        plan.delete_autoscaler = crate::scheduling::autoscaler(job).is_some();
        let message = format!("PyTorchJob {name} is suspended.");
        if lifecycle::set_condition(
            &mut plan.status,
            "Suspended",
            "PyTorchJobSuspended",
            &message,
            &stamp,
        ) {
            plan.note(false, "PyTorchJobSuspended", message);
        }
        for c in plan
            .status
            .conditions
            .iter_mut()
            .filter(|c| c.type_ == "Running")
        {
            c.status = "False".into();
        }
        return plan;
    }
    if is_true(&plan.status, "Suspended") {
        for c in plan
            .status
            .conditions
            .iter_mut()
            .filter(|c| c.type_ == "Suspended")
        {
            c.status = "False".into();
            c.reason = Some("PyTorchJobResumed".into());
            c.message = Some(format!("PyTorchJob {name} is resumed."));
            c.last_transition_time = Some(stamp.clone());
        }
        plan.note(
            false,
            "PyTorchJobResumed",
            format!("PyTorchJob {name} is resumed."),
        );
        // The deadline counts from the resume.
        plan.status.start_time = Some(stamp.clone());
    }
    let started = plan
        .status
        .start_time
        .get_or_insert_with(|| stamp.clone())
        .0;
    if !plan.status.conditions.iter().any(|c| c.type_ == "Created") {
        let message = format!("PyTorchJob {name} is created.");
        lifecycle::set_condition(
            &mut plan.status,
            "Created",
            "PyTorchJobCreated",
            &message,
            &stamp,
        );
    }

    // Pods that stay: not terminating, of a wanted index, not failed into a retry.
    let mut kept: Vec<Observed> = Vec::new();
    // Failed pods to create anew, unless the job fails (then they stay, for inspection).
    let mut recreate: Vec<Deletion> = Vec::new();
    for pod in pods {
        if let Some(since) = pod.deleting_since {
            let grace = options.terminating_grace.as_secs() as i64;
            let left = grace - seconds_between(since, now);
            if left <= 0 {
                plan.delete_pods.push(Deletion {
                    name: pod.name.clone(),
                    force: true,
                });
                plan.note(true, "ForceDeletePod", format!("{} stayed terminating for over {grace} s (its node is likely gone); deleted without grace", pod.name));
            } else {
                plan.requeue(Duration::from_secs(left as u64));
            }
            continue;
        }
        let replica = job.replica(&pod.rtype);
        if replica.is_none_or(|r| pod.index >= r.count()) {
            plan.delete_pods.push(Deletion {
                name: pod.name.clone(),
                force: false,
            });
            if services.contains(&pod.name) {
                plan.delete_services.push(pod.name.clone());
            }
            continue;
        }
        if pod.phase == Phase::Failed {
            let policy = replica
                .and_then(|r| r.restart_policy.as_deref())
                .unwrap_or("OnFailure");
            // No terminated state recorded: the training-operator's sentinel, retryable.
            let code = pod.exit_code.unwrap_or(0xbeef);
            if after_exit(policy, code) != AfterExit::FailJob {
                recreate.push(Deletion {
                    name: pod.name.clone(),
                    force: false,
                });
                plan.note(
                    true,
                    "PyTorchJobRestarting",
                    format!("{} failed with exit code {code}; it is recreated", pod.name),
                );
                continue;
            }
        }
        kept.push(pod.clone());
    }
    let recreated = recreate.len() as i32;
    let recreations = plan.status.pod_recreations.unwrap_or(0) + recreated;
    if recreations > 0 {
        plan.status.pod_recreations = Some(recreations);
    }
    let restarts = recreations + pods.iter().map(|p| p.restarts).sum::<i32>();
    let age = seconds_between(started, now);
    match lifecycle::judge(job, &states(&kept), restarts, age) {
        Verdict::Running => {
            plan.delete_pods.extend(recreate);
            plan.apply_autoscaler = crate::scheduling::autoscaler(job);
            plan.apply_pod_group = gang.map(|g| g.pod_group(job));
            // Volcano admits a group as a whole: no pods until it is past Pending.
            let admitted = gang != Some(&crate::scheduling::Gang::Volcano)
                || pod_group_phase.is_some_and(|p| !p.is_empty() && p != "Pending");
            if !admitted {
                plan.status.last_reconcile_time = Some(stamp.clone());
                plan.requeue(Duration::from_secs(5));
            }
            for (rtype, index) in render::replicas(job) {
                let pod_name = render::pod_name(&name, &rtype, index);
                if admitted && !pods.iter().any(|p| p.name == pod_name) {
                    plan.create_pods
                        .push(render::pod(job, &rtype, index, &options.render));
                }
                if !services.contains(&pod_name) {
                    plan.create_services
                        .push(render::service(job, &rtype, index));
                }
            }
            if recreated > 0 {
                let message =
                    format!("PyTorchJob {name} is restarting: {recreated} pod(s) recreated.");
                lifecycle::set_condition(
                    &mut plan.status,
                    "Restarting",
                    "PyTorchJobRestarting",
                    &message,
                    &stamp,
                );
            } else if kept.iter().any(|p| p.phase == Phase::Running) {
                let message = format!("PyTorchJob {name} is running.");
                lifecycle::set_condition(
                    &mut plan.status,
                    "Running",
                    "PyTorchJobRunning",
                    &message,
                    &stamp,
                );
            }
            if let Some(deadline) = run.active_deadline_seconds {
                plan.requeue(Duration::from_secs((deadline - age).max(1) as u64));
            }
        }
        Verdict::Succeeded => {
            let message = format!("PyTorchJob {name} is successfully completed.");
            lifecycle::set_condition(
                &mut plan.status,
                "Succeeded",
                "PyTorchJobSucceeded",
                &message,
                &stamp,
            );
            plan.note(false, "PyTorchJobSucceeded", message);
            plan.delete_pod_group = gang.is_some();
            plan.status.completion_time = Some(stamp.clone());
            plan.clean_up(job, &kept, services);
            plan.time_to_live(job, now);
        }
        Verdict::Failed(reason, message) => {
            lifecycle::set_condition(&mut plan.status, "Failed", reason, &message, &stamp);
            plan.note(true, "PyTorchJobFailed", message);
            plan.delete_pod_group = gang.is_some();
            plan.status.completion_time = Some(stamp.clone());
            plan.clean_up(job, &kept, services);
            plan.time_to_live(job, now);
        }
    }
    plan.status.replica_statuses = lifecycle::replica_statuses(job, &states(&kept));
    plan
}
