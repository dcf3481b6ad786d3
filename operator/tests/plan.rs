//! Reconcile scenarios on the pure planner: what a reconcile creates, deletes and writes for a
//! job and the pods that exist — the training-operator's rules, and its bugs fixed.

use std::time::Duration;

use ferrun_operator::controller::plan::{plan, Observed, Plan, PlanOptions};
use ferrun_operator::crd::{JobStatus, PyTorchJob};
use ferrun_operator::lifecycle::{self, Phase};
use ferrun_operator::load_job;
use ferrun_operator::policy::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

const T0: i64 = 1_800_000_000;

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(T0 + seconds).expect("time")
}

/// Master + 2 Workers; `run_policy` and the workers' restart policy as given.
fn job(run_policy: &str, worker_policy: &str) -> PyTorchJob {
    load_job(&format!(
        r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {{name: j, namespace: ns, uid: u-1}}
spec:
  runPolicy: {run_policy}
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      template: {{spec: {{containers: [{{name: pytorch, image: img, command: [ferrun, t.py]}}]}}}}
    Worker:
      replicas: 2
      restartPolicy: {worker_policy}
      template: {{spec: {{containers: [{{name: pytorch, image: img, command: [ferrun, t.py]}}]}}}}
"#
    ))
    .expect("job")
}

fn pod(rtype: &str, index: i32, phase: Phase) -> Observed {
    Observed {
        name: format!("j-{}-{index}", rtype.to_ascii_lowercase()),
        rtype: rtype.into(),
        index,
        phase,
        exit_code: None,
        restarts: 0,
        deleting_since: None,
    }
}

fn all_running() -> Vec<Observed> {
    vec![
        pod("Master", 0, Phase::Running),
        pod("Worker", 0, Phase::Running),
        pod("Worker", 1, Phase::Running),
    ]
}

fn services() -> Vec<String> {
    ["j-master-0", "j-worker-0", "j-worker-1"]
        .map(String::from)
        .to_vec()
}

/// The job as a previous reconcile left it: started at T0, Running.
fn started(mut job: PyTorchJob) -> PyTorchJob {
    let mut status = JobStatus {
        start_time: Some(Time(at(0))),
        ..JobStatus::default()
    };
    lifecycle::set_condition(
        &mut status,
        Condition::Created,
        "PyTorchJobCreated",
        "",
        &Time(at(0)),
    );
    lifecycle::set_condition(
        &mut status,
        Condition::Running,
        "PyTorchJobRunning",
        "",
        &Time(at(0)),
    );
    job.status = Some(status);
    job
}

fn condition<'a>(plan: &'a Plan, kind: &str) -> Option<(&'a str, &'a str)> {
    plan.status
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| (c.status.as_str(), c.reason.as_deref().unwrap_or_default()))
}

fn deleted(plan: &Plan) -> Vec<&str> {
    plan.delete_pods.iter().map(|d| d.name.as_str()).collect()
}

fn run(job: &PyTorchJob, pods: &[Observed], services: &[String], seconds: i64) -> Plan {
    plan(
        job,
        pods,
        services,
        None,
        at(seconds),
        &PlanOptions::default(),
    )
}

#[test]
fn a_new_job_gets_its_pods_and_services_and_is_created() {
    let job = job("{}", "OnFailure");
    let p = run(&job, &[], &[], 0);
    let names: Vec<_> = p
        .create_pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(names, ["j-master-0", "j-worker-0", "j-worker-1"]);
    assert_eq!(p.create_services.len(), 3);
    assert_eq!(
        condition(&p, "Created"),
        Some(("True", "PyTorchJobCreated"))
    );
    assert_eq!(p.status.start_time, Some(Time(at(0))));
    // Only the missing ones, next time.
    let p = run(
        &started(job),
        &[pod("Master", 0, Phase::Pending)],
        &services()[..1],
        1,
    );
    assert_eq!(p.create_pods.len(), 2);
    assert_eq!(p.create_services.len(), 2);
}

#[test]
fn the_master_succeeding_ends_the_job_and_clean_pod_policy_decides_on_the_workers() {
    let mut pods = all_running();
    pods[0].phase = Phase::Succeeded;
    let p = run(&started(job("{}", "OnFailure")), &pods, &services(), 60);
    assert_eq!(
        condition(&p, "Succeeded"),
        Some(("True", "PyTorchJobSucceeded"))
    );
    assert_eq!(condition(&p, "Running").map(|c| c.0), Some("False"));
    assert_eq!(p.status.completion_time, Some(Time(at(60))));
    assert!(
        p.delete_pods.is_empty(),
        "cleanPodPolicy None (the default) keeps them"
    );
    let p = run(
        &started(job("{cleanPodPolicy: Running}", "OnFailure")),
        &pods,
        &services(),
        60,
    );
    assert_eq!(deleted(&p), ["j-worker-0", "j-worker-1"]);
    assert_eq!(p.delete_services, ["j-worker-0", "j-worker-1"]);
}

#[test]
fn a_failed_worker_under_each_restart_policy() {
    let failed = |code: Option<i32>| {
        let mut pods = all_running();
        pods[2].phase = Phase::Failed;
        pods[2].exit_code = code;
        pods
    };
    // OnFailure (the pod failed as a whole: evicted, node lost): deleted and created anew.
    let p = run(
        &started(job("{}", "OnFailure")),
        &failed(Some(1)),
        &services(),
        5,
    );
    assert_eq!(deleted(&p), ["j-worker-1"]);
    assert_eq!(
        condition(&p, "Restarting"),
        Some(("True", "PyTorchJobRestarting"))
    );
    assert_eq!(p.status.pod_recreations, Some(1));
    // Never: the job fails, with its completion time.
    let p = run(
        &started(job("{}", "Never")),
        &failed(Some(1)),
        &services(),
        5,
    );
    assert_eq!(condition(&p, "Failed").map(|c| c.0), Some("True"));
    assert_eq!(p.status.completion_time, Some(Time(at(5))));
    // ExitCode: 137 (killed) is retried, 1 (the program's own) is final; no terminated state
    // at all is the training-operator's retryable sentinel.
    let p = run(
        &started(job("{}", "ExitCode")),
        &failed(Some(137)),
        &services(),
        5,
    );
    assert_eq!(deleted(&p), ["j-worker-1"]);
    let p = run(
        &started(job("{}", "ExitCode")),
        &failed(None),
        &services(),
        5,
    );
    assert_eq!(deleted(&p), ["j-worker-1"]);
    let p = run(
        &started(job("{}", "ExitCode")),
        &failed(Some(1)),
        &services(),
        5,
    );
    assert_eq!(condition(&p, "Failed").map(|c| c.0), Some("True"));
    assert!(
        p.status.completion_time.is_some(),
        "#2044: a completion time, so TTL works"
    );
}

#[test]
fn backoff_limit_counts_restarts_and_recreations_and_keeps_clean_pod_policy() {
    let mut pods = all_running();
    pods[1].restarts = 2;
    let mut job = started(job("{backoffLimit: 3}", "ExitCode"));
    // One recreation already, two in-place restarts: 3, at the limit, not past it.
    if let Some(s) = job.status.as_mut() {
        s.pod_recreations = Some(1);
    }
    let p = run(&job, &pods, &services(), 5);
    assert_eq!(condition(&p, "Failed"), None);
    pods[2].phase = Phase::Failed;
    pods[2].exit_code = Some(143);
    let p = run(&job, &pods, &services(), 6);
    assert_eq!(
        condition(&p, "Failed"),
        Some(("True", "BackoffLimitExceeded"))
    );
    // #3419: cleanPodPolicy None means the pods stay, even on this path (the failed one too,
    // for inspection).
    assert!(p.delete_pods.is_empty(), "{:?}", deleted(&p));
}

#[test]
fn the_deadline_requeues_by_time_and_fails_the_job_with_no_other_event() {
    let job = started(job(
        "{activeDeadlineSeconds: 100, cleanPodPolicy: All}",
        "OnFailure",
    ));
    let p = run(&job, &all_running(), &services(), 40);
    assert_eq!(
        p.requeue_after,
        Some(Duration::from_secs(60)),
        "#3358: woken at the deadline"
    );
    let p = run(&job, &all_running(), &services(), 100);
    assert_eq!(condition(&p, "Failed"), Some(("True", "DeadlineExceeded")));
    assert_eq!(deleted(&p), ["j-master-0", "j-worker-0", "j-worker-1"]);
    assert_eq!(p.delete_services.len(), 3);
}

#[test]
fn suspend_deletes_everything_and_resume_starts_the_clock_again() {
    let p = run(
        &started(job("{suspend: true}", "OnFailure")),
        &all_running(),
        &services(),
        10,
    );
    assert_eq!(deleted(&p).len(), 3);
    assert_eq!(p.delete_services.len(), 3);
    assert_eq!(
        condition(&p, "Suspended"),
        Some(("True", "PyTorchJobSuspended"))
    );
    assert_eq!(condition(&p, "Running").map(|c| c.0), Some("False"));
    assert!(p.create_pods.is_empty());
    let mut resumed = job("{suspend: false}", "OnFailure");
    resumed.status = Some(p.status.clone());
    let p = run(&resumed, &[], &[], 500);
    assert_eq!(
        condition(&p, "Suspended"),
        Some(("False", "PyTorchJobResumed"))
    );
    assert_eq!(p.status.start_time, Some(Time(at(500))));
    assert_eq!(p.create_pods.len(), 3);
}

#[test]
fn a_finished_job_is_deleted_once_its_ttl_has_passed() {
    let mut job = job("{ttlSecondsAfterFinished: 30}", "OnFailure");
    let mut status = JobStatus {
        completion_time: Some(Time(at(100))),
        ..JobStatus::default()
    };
    lifecycle::set_condition(
        &mut status,
        Condition::Succeeded,
        "PyTorchJobSucceeded",
        "",
        &Time(at(100)),
    );
    job.status = Some(status);
    let p = run(&job, &[], &[], 110);
    assert_eq!(
        (p.delete_job, p.requeue_after),
        (false, Some(Duration::from_secs(20)))
    );
    assert!(run(&job, &[], &[], 130).delete_job);
}

#[test]
fn pods_stuck_terminating_are_force_deleted_after_the_grace() {
    let mut pods = all_running();
    pods[1].deleting_since = Some(at(0));
    let job = started(job("{}", "OnFailure"));
    let p = run(&job, &pods, &services(), 100);
    assert!(p.delete_pods.is_empty());
    assert_eq!(p.requeue_after, Some(Duration::from_secs(200)));
    let p = run(&job, &pods, &services(), 300);
    assert_eq!(p.delete_pods.len(), 1);
    assert!(
        p.delete_pods[0].force,
        "#2072: no grace for a pod on a lost node"
    );
    assert!(p.notes.iter().any(|n| n.reason == "ForceDeletePod"));
}

#[test]
fn workers_past_the_replica_count_are_deleted() {
    let mut pods = all_running();
    pods.push(pod("Worker", 2, Phase::Running));
    let mut names = services();
    names.push("j-worker-2".into());
    let p = run(&started(job("{}", "OnFailure")), &pods, &names, 5);
    assert_eq!(deleted(&p), ["j-worker-2"]);
    assert_eq!(p.delete_services, ["j-worker-2"]);
}

#[test]
fn volcano_admits_the_group_before_any_pod_is_created() {
    let options = PlanOptions {
        render: ferrun_operator::render::RenderOptions {
            gang: ferrun_operator::scheduling::Gang::from_flag("volcano"),
            ..Default::default()
        },
        ..PlanOptions::default()
    };
    let job = job("{}", "OnFailure");
    let waiting = plan(&job, &[], &[], None, at(0), &options);
    assert!(waiting.apply_pod_group.is_some());
    assert!(
        waiting.create_pods.is_empty(),
        "no pods while the group is not admitted"
    );
    assert_eq!(waiting.requeue_after, Some(Duration::from_secs(5)));
    let pending = plan(&job, &[], &[], Some("Pending"), at(1), &options);
    assert!(pending.create_pods.is_empty());
    let admitted = plan(&job, &[], &[], Some("Inqueue"), at(2), &options);
    assert_eq!(admitted.create_pods.len(), 3);
    let mut pods = all_running();
    pods[0].phase = Phase::Succeeded;
    let done = plan(
        &started(job),
        &pods,
        &services(),
        Some("Running"),
        at(3),
        &options,
    );
    assert!(done.delete_pod_group, "the group goes when the job ends");
}
