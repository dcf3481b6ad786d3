//! A job's life as pure rules: what a pod's exit means under its restart policy, when the job
//! has succeeded or failed, and how its conditions change — the training-operator's rules,
//! with its bugs fixed: every recreation counts against `backoffLimit` (#2045, #2342),
//! `ExitCode` failures are bounded and stamp a completion time (#2044), and the deadline is
//! checked by time, not only when some event happens to arrive (#3358).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{JobCondition, JobStatus, PyTorchJob, ReplicaStatus, MASTER, WORKER};
use crate::names::{CONTROLLER_NAME, JOB_NAME, OPERATOR_NAME, REPLICA_TYPE};
use crate::policy::{Condition, RestartPolicy};

/// What happens after a pod's training container exits with `code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// The pod is done (it succeeded).
    Done,
    /// The kubelet restarts the container in place (`Always`, `OnFailure`).
    RestartInPlace,
    /// The operator deletes the pod and creates it anew (`ExitCode` with a retryable code).
    Recreate,
    /// The job fails (`Never`, or `ExitCode` with a permanent code).
    FailJob,
}

/// The consequence of an exit under a replica's restart policy. `ExitCode` retries codes of
/// 128 and more (killed by a signal: preemption, OOM, eviction); 1–127 are the program's own.
pub fn after_exit(policy: RestartPolicy, code: i32) -> AfterExit {
    match (policy, code) {
        (RestartPolicy::Always, _) => AfterExit::RestartInPlace,
        (_, 0) => AfterExit::Done,
        (RestartPolicy::OnFailure, _) => AfterExit::RestartInPlace,
        (RestartPolicy::ExitCode, c) if c >= 128 => AfterExit::Recreate,
        (RestartPolicy::ExitCode | RestartPolicy::Never, _) => AfterExit::FailJob,
    }
}

/// A pod as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodState {
    /// `Master` or `Worker`.
    pub rtype: String,
    /// Its index.
    pub index: i32,
    /// `Pending`, `Running`, `Succeeded` or `Failed`.
    pub phase: Phase,
}

/// A pod's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Not started yet.
    Pending,
    /// Running.
    Running,
    /// Exited 0, not to be restarted.
    Succeeded,
    /// Exited otherwise, not to be restarted.
    Failed,
    /// Stopped and removed once the job ended (`cleanPodPolicy`).
    Deleted,
}

/// The job's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Still going.
    Running,
    /// Done: the master (or the workers, per the success rule) succeeded.
    Succeeded,
    /// Done: the reason (one word) and a message for people.
    Failed(&'static str, String),
}

/// Judges a job from its pods, the restarts so far and its age, in this order: deadline,
/// back-off, success, failure.
pub fn judge(job: &PyTorchJob, pods: &[PodState], restarts: i32, age_seconds: i64) -> Verdict {
    let run = job.spec.run_policy.clone().unwrap_or_default();
    if let Some(deadline) = run.active_deadline_seconds {
        if age_seconds >= deadline {
            return Verdict::Failed(
                "DeadlineExceeded",
                format!("the job ran {age_seconds} s, past activeDeadlineSeconds {deadline}"),
            );
        }
    }
    if let Some(limit) = run.backoff_limit {
        if restarts > limit {
            return Verdict::Failed(
                "BackoffLimitExceeded",
                format!("{restarts} restarts exceed backoffLimit {limit}"),
            );
        }
    }
    let done = |rtype: &str| {
        pods.iter()
            .filter(|p| p.rtype == rtype && p.phase == Phase::Succeeded)
            .count() as i32
    };
    let succeeded = match job.replica(MASTER) {
        Some(_) => done(MASTER) >= 1,
        None => {
            let workers = job.replica(WORKER).map_or(0, |w| w.count());
            let any_worker = job.spec.elastic_policy.is_some() && done(WORKER) >= 1;
            any_worker || (workers > 0 && done(WORKER) >= workers)
        }
    };
    if succeeded {
        return Verdict::Succeeded;
    }
    if let Some(failed) = pods.iter().find(|p| p.phase == Phase::Failed) {
        return Verdict::Failed(
            "PyTorchJobFailed",
            format!(
                "{} replica {} failed and its restart policy does not retry it",
                failed.rtype, failed.index
            ),
        );
    }
    Verdict::Running
}

/// Replica counts by type, as the status reports them.
pub fn replica_statuses(job: &PyTorchJob, pods: &[PodState]) -> BTreeMap<String, ReplicaStatus> {
    let mut out = BTreeMap::new();
    for rtype in job.spec.pytorch_replica_specs.keys() {
        let count = |phase| {
            pods.iter()
                .filter(|p| &p.rtype == rtype && p.phase == phase)
                .count() as i32
        };
        out.insert(
            rtype.clone(),
            ReplicaStatus {
                active: count(Phase::Running),
                succeeded: count(Phase::Succeeded),
                failed: count(Phase::Failed),
                selector: Some(format!(
                    "{JOB_NAME}={},{OPERATOR_NAME}={CONTROLLER_NAME},{REPLICA_TYPE}={}",
                    job.job_name(),
                    rtype.to_ascii_lowercase()
                )),
            },
        );
    }
    out
}

/// Whether the status holds condition `kind` as `True`.
pub fn is_true(status: &JobStatus, kind: Condition) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == kind.as_str() && c.status == "True")
}

/// The status's condition `kind`, whatever its truth.
pub fn condition_mut(status: &mut JobStatus, kind: Condition) -> Option<&mut JobCondition> {
    status
        .conditions
        .iter_mut()
        .find(|c| c.type_ == kind.as_str())
}

/// Sets condition `kind` to `True` with `reason`/`message`, as the training-operator does:
/// the same status and reason is a no-op; `Running` and `Restarting` replace each other;
/// `Succeeded` and `Failed` turn `Running` to `False`; after `Failed` nothing changes.
/// Whether anything changed.
pub fn set_condition(
    status: &mut JobStatus,
    kind: Condition,
    reason: &str,
    message: &str,
    now: &Time,
) -> bool {
    if is_true(status, Condition::Failed) {
        return false;
    }
    let name = kind.as_str();
    if let Some(c) = status.conditions.iter().find(|c| c.type_ == name) {
        if c.status == "True" && c.reason.as_deref() == Some(reason) {
            return false;
        }
    }
    let drop = |other: Condition, status: &mut JobStatus| {
        status.conditions.retain(|c| c.type_ != other.as_str());
    };
    match kind {
        Condition::Running => drop(Condition::Restarting, status),
        Condition::Restarting => drop(Condition::Running, status),
        Condition::Succeeded | Condition::Failed => {
            if let Some(c) =
                condition_mut(status, Condition::Running).filter(|c| c.status == "True")
            {
                c.status = "False".into();
                c.last_transition_time = Some(now.clone());
                c.last_update_time = Some(now.clone());
            }
        }
        Condition::Created | Condition::Suspended => {}
    }
    drop(kind, status);
    status.conditions.push(JobCondition {
        type_: name.into(),
        status: "True".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now.clone()),
    });
    true
}

/// The `State` column: the last condition's type.
pub fn state(status: &JobStatus) -> &str {
    status.conditions.last().map_or("", |c| c.type_.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exits_under_each_restart_policy() {
        assert_eq!(after_exit(RestartPolicy::OnFailure, 0), AfterExit::Done);
        assert_eq!(
            after_exit(RestartPolicy::OnFailure, 3),
            AfterExit::RestartInPlace
        );
        assert_eq!(
            after_exit(RestartPolicy::Always, 0),
            AfterExit::RestartInPlace
        );
        assert_eq!(after_exit(RestartPolicy::Never, 1), AfterExit::FailJob);
        assert_eq!(after_exit(RestartPolicy::ExitCode, 1), AfterExit::FailJob);
        assert_eq!(after_exit(RestartPolicy::ExitCode, 127), AfterExit::FailJob);
        assert_eq!(
            after_exit(RestartPolicy::ExitCode, 137),
            AfterExit::Recreate
        );
        assert_eq!(after_exit(RestartPolicy::ExitCode, 0), AfterExit::Done);
    }

    #[test]
    fn conditions_follow_the_training_operators_transitions() {
        let now = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        let mut s = JobStatus::default();
        assert!(set_condition(
            &mut s,
            Condition::Created,
            "PyTorchJobCreated",
            "",
            &now
        ));
        assert!(set_condition(
            &mut s,
            Condition::Running,
            "PyTorchJobRunning",
            "",
            &now
        ));
        assert!(!set_condition(
            &mut s,
            Condition::Running,
            "PyTorchJobRunning",
            "",
            &now
        ));
        assert!(set_condition(
            &mut s,
            Condition::Restarting,
            "PyTorchJobRestarting",
            "",
            &now
        ));
        assert_eq!(state(&s), "Restarting");
        assert!(!s.conditions.iter().any(|c| c.type_ == "Running"));
        assert!(set_condition(
            &mut s,
            Condition::Running,
            "PyTorchJobRunning",
            "",
            &now
        ));
        assert!(set_condition(
            &mut s,
            Condition::Failed,
            "PyTorchJobFailed",
            "",
            &now
        ));
        let running = s.conditions.iter().find(|c| c.type_ == "Running");
        assert_eq!(running.map(|c| c.status.as_str()), Some("False"));
        assert!(!set_condition(
            &mut s,
            Condition::Succeeded,
            "PyTorchJobSucceeded",
            "",
            &now
        ));
        assert_eq!(state(&s), "Failed");
    }
}
