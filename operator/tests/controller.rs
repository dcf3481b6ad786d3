//! The controller's reconcile against a mock API server (kube-rs's tower-test pattern): the
//! requests it makes for a job — children, status by server-side apply, events — and those it
//! must not make.

use std::sync::Arc;
use std::time::Duration;

use ferrun_operator::controller::plan::PlanOptions;
use ferrun_operator::controller::{reconcile, Context, Metrics};
use ferrun_operator::crd::PyTorchJob;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::Client;
use serde_json::{json, Value};

/// A request as the mock API server saw it.
#[derive(Debug)]
struct Seen {
    method: String,
    /// Path and query.
    uri: String,
    content_type: String,
    body: Value,
}

/// Answers requests as an API server holding `job`, `pods` and no services would, until the
/// client is dropped; every request, in order.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
    job: Value,
    pods: Vec<Value>,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    while let Ok(Some((request, respond))) =
        tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
    {
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.expect("request body");
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let (method, uri) = (parts.method.to_string(), parts.uri.to_string());
        let path = parts.uri.path().to_owned();
        let reply = match (method.as_str(), path.as_str()) {
            ("GET", p) if p.ends_with("/pods") => {
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
            }
            ("GET", p) if p.ends_with("/services") => {
                json!({"apiVersion": "v1", "kind": "ServiceList", "metadata": {}, "items": []})
            }
            ("POST", _) => body.clone(),
            // A repeated event becomes a series: the recorder patches the first one.
            ("PATCH", p) if p.contains("/events/") => body.clone(),
            ("DELETE", _) => {
                json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"})
            }
            ("PATCH", p) if p.ends_with("/status") => {
                let mut updated = job.clone();
                updated["status"] = body["status"].clone();
                updated
            }
            _ => panic!("unexpected request {method} {uri}"),
        };
        let content_type = parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        seen.push(Seen {
            method,
            uri,
            content_type,
            body,
        });
        respond.send_response(
            Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                .expect("response"),
        );
    }
    seen
}

/// Runs one reconcile of `job` against the mock; its action and the requests made.
async fn reconcile_with(job: Value, pods: Vec<Value>) -> (Action, Vec<Seen>) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(serve(handle, job.clone(), pods));
    let client = Client::new(service, "default");
    let ctx = Arc::new(Context::new(
        client,
        PlanOptions::default(),
        Some("test".into()),
        Arc::new(Metrics::default()),
    ));
    let parsed: PyTorchJob = serde_json::from_value(job).expect("job");
    let action = tokio::time::timeout(Duration::from_secs(10), reconcile(Arc::new(parsed), ctx))
        .await
        .expect("reconcile within 10 s")
        .expect("reconcile");
    let seen = server.await.expect("mock server");
    (action, seen)
}

fn job(run_policy: Value, status: Value) -> Value {
    let container = json!({"name": "pytorch", "image": "img", "command": ["ferrun", "t.py"]});
    json!({
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u-1"},
        "spec": {
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": {
                "Master": {"replicas": 1, "template": {"spec": {"containers": [container.clone()]}}},
                "Worker": {"replicas": 1, "template": {"spec": {"containers": [container]}}}
            }
        },
        "status": status
    })
}

fn running_pod(rtype: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("j-{rtype}-0"),
            "namespace": "ns",
            "labels": {
                "training.kubeflow.org/operator-name": "pytorchjob-controller",
                "training.kubeflow.org/job-name": "j",
                "training.kubeflow.org/replica-type": rtype,
                "training.kubeflow.org/replica-index": "0"
            }
        },
        "status": {"phase": "Running"}
    })
}

/// The requests other than events, as `METHOD path`.
fn calls(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| !s.uri.contains("/events"))
        .map(|s| {
            format!(
                "{} {}",
                s.method,
                s.uri.split('?').next().unwrap_or_default()
            )
        })
        .collect()
}

fn event_reasons(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.uri.contains("/events"))
        .map(|s| s.body["reason"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_new_job_gets_pods_services_a_status_by_server_side_apply_and_events() {
    let (action, seen) = reconcile_with(job(json!({}), json!(null)), vec![]).await;
    assert_eq!(
        calls(&seen),
        [
            "GET /api/v1/namespaces/ns/pods",
            "GET /api/v1/namespaces/ns/services",
            "POST /api/v1/namespaces/ns/pods",
            "POST /api/v1/namespaces/ns/pods",
            "POST /api/v1/namespaces/ns/services",
            "POST /api/v1/namespaces/ns/services",
            "PATCH /apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j/status",
        ]
    );
    let list = &seen[0].uri;
    assert!(
        list.contains("labelSelector=training.kubeflow.org%2Fjob-name%3Dj"),
        "{list}"
    );
    let created = &seen
        .iter()
        .find(|s| {
            s.method == "POST"
                && s.uri
                    .split('?')
                    .next()
                    .is_some_and(|p| p.ends_with("/pods"))
        })
        .expect("pod")
        .body;
    assert_eq!(created["metadata"]["name"], "j-master-0");
    assert_eq!(created["metadata"]["ownerReferences"][0]["uid"], "u-1");
    let patch = seen
        .iter()
        .find(|s| s.method == "PATCH" && s.uri.contains("/status"))
        .expect("status write");
    assert_eq!(patch.content_type, "application/apply-patch+yaml");
    assert!(
        patch.uri.contains("fieldManager=ferrun-operator") && patch.uri.contains("force=true"),
        "{}",
        patch.uri
    );
    assert_eq!(patch.body["status"]["conditions"][0]["type"], "Created");
    assert_eq!(
        event_reasons(&seen),
        [
            "SuccessfulCreatePod",
            "SuccessfulCreatePod",
            "SuccessfulCreateService",
            "SuccessfulCreateService"
        ]
    );
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn a_job_past_its_deadline_fails_and_is_cleaned_up_with_no_other_event() {
    let status = json!({"startTime": "2020-01-01T00:00:00Z", "conditions": [
        {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
        {"type": "Running", "status": "True", "reason": "PyTorchJobRunning"}]});
    let run_policy = json!({"activeDeadlineSeconds": 60, "cleanPodPolicy": "All"});
    let pods = vec![running_pod("master"), running_pod("worker")];
    let (action, seen) = reconcile_with(job(run_policy, status), pods).await;
    assert_eq!(
        calls(&seen),
        [
            "GET /api/v1/namespaces/ns/pods",
            "GET /api/v1/namespaces/ns/services",
            "DELETE /api/v1/namespaces/ns/pods/j-master-0",
            "DELETE /api/v1/namespaces/ns/pods/j-worker-0",
            "PATCH /apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j/status",
        ]
    );
    let conditions = &seen.last().expect("patch").body["status"]["conditions"];
    let failed = conditions
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Failed")
        .expect("Failed");
    assert_eq!(failed["reason"], "DeadlineExceeded");
    assert!(event_reasons(&seen).contains(&"PyTorchJobFailed".to_owned()));
    assert_eq!(
        action,
        Action::await_change(),
        "a finished job without TTL waits for changes"
    );
}

#[tokio::test]
async fn another_controllers_job_is_left_alone() {
    let (action, seen) = reconcile_with(
        job(json!({"managedBy": "example.com/other"}), json!(null)),
        vec![],
    )
    .await;
    assert!(seen.is_empty(), "{seen:?}");
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn an_invalid_job_is_failed_with_the_reason_and_gets_no_pods() {
    let mut invalid = job(json!({}), json!(null));
    invalid["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = json!(2);
    let (_, seen) = reconcile_with(invalid, vec![]).await;
    assert_eq!(
        calls(&seen),
        ["PATCH /apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j/status"]
    );
    let condition = &seen[0].body["status"]["conditions"][0];
    assert_eq!(
        (condition["type"].as_str(), condition["reason"].as_str()),
        (Some("Failed"), Some("InvalidSpec"))
    );
    assert!(condition["message"]
        .as_str()
        .unwrap_or_default()
        .contains("exactly one Master"));
}

#[tokio::test]
async fn a_suspended_job_loses_its_pods_and_says_so() {
    let status = json!({"startTime": "2020-01-01T00:00:00Z", "conditions": [
        {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
        {"type": "Running", "status": "True", "reason": "PyTorchJobRunning"}]});
    let pods = vec![running_pod("master"), running_pod("worker")];
    let (_, seen) = reconcile_with(job(json!({"suspend": true}), status), pods).await;
    assert_eq!(
        calls(&seen),
        [
            "GET /api/v1/namespaces/ns/pods",
            "GET /api/v1/namespaces/ns/services",
            "DELETE /api/v1/namespaces/ns/pods/j-master-0",
            "DELETE /api/v1/namespaces/ns/pods/j-worker-0",
            "PATCH /apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j/status",
        ]
    );
    assert!(event_reasons(&seen).contains(&"PyTorchJobSuspended".to_owned()));
}

#[tokio::test]
async fn a_job_past_its_ttl_is_deleted() {
    let status = json!({"completionTime": "2020-01-01T00:00:00Z", "conditions": [
        {"type": "Succeeded", "status": "True", "reason": "PyTorchJobSucceeded"}]});
    let (action, seen) =
        reconcile_with(job(json!({"ttlSecondsAfterFinished": 60}), status), vec![]).await;
    assert_eq!(
        calls(&seen),
        [
            "GET /api/v1/namespaces/ns/pods",
            "GET /api/v1/namespaces/ns/services",
            "DELETE /apis/kubeflow.org/v1/namespaces/ns/pytorchjobs/j",
        ]
    );
    assert_eq!(action, Action::await_change());
}

/// A pod of the job in `phase`, its training container terminated with `code` (if any) after
/// `restarts` restarts.
fn pod_in(rtype: &str, phase: &str, code: Option<i32>, restarts: i32) -> Value {
    let mut pod = running_pod(rtype);
    let state = code.map_or(
        json!({"running": {}}),
        |c| json!({"terminated": {"exitCode": c}}),
    );
    pod["status"] = json!({"phase": phase, "containerStatuses": [{
        "name": "pytorch", "image": "img", "imageID": "", "ready": false,
        "restartCount": restarts, "state": state}]});
    pod
}

fn running_status() -> Value {
    json!({"startTime": "2099-01-01T00:00:00Z", "conditions": [
        {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
        {"type": "Running", "status": "True", "reason": "PyTorchJobRunning"}]})
}

/// The condition of `kind` in the status the reconcile wrote: (status, reason).
fn written(seen: &[Seen], kind: &str) -> Option<(String, String)> {
    let patch = seen
        .iter()
        .rev()
        .find(|s| s.method == "PATCH" && s.uri.contains("/status"))?;
    let c = patch.body["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
    ))
}

fn with_worker_policy(mut job: Value, policy: &str) -> Value {
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["restartPolicy"] = json!(policy);
    job
}

#[tokio::test]
async fn scenarios_of_success_failure_and_restart() {
    let truth = |s: &str, r: &str| Some((s.to_owned(), r.to_owned()));
    // The master succeeds: the job does; cleanPodPolicy None leaves the worker.
    let pods = vec![
        pod_in("master", "Succeeded", Some(0), 0),
        pod_in("worker", "Running", None, 0),
    ];
    let (_, seen) = reconcile_with(job(json!({}), running_status()), pods).await;
    assert_eq!(
        written(&seen, "Succeeded"),
        truth("True", "PyTorchJobSucceeded")
    );
    assert!(
        !calls(&seen).iter().any(|c| c.starts_with("DELETE")),
        "{:?}",
        calls(&seen)
    );

    // A worker fails under each restart policy.
    let failed = |code| {
        vec![
            pod_in("master", "Running", None, 0),
            pod_in("worker", "Failed", Some(code), 0),
        ]
    };
    for (policy, code, recreated) in [
        ("OnFailure", 1, true),
        ("ExitCode", 137, true),
        ("ExitCode", 1, false),
        ("Never", 1, false),
    ] {
        let job = with_worker_policy(job(json!({}), running_status()), policy);
        let (_, seen) = reconcile_with(job, failed(code)).await;
        let deletes = calls(&seen)
            .iter()
            .any(|c| c == "DELETE /api/v1/namespaces/ns/pods/j-worker-0");
        assert_eq!(deletes, recreated, "{policy} {code}: {:?}", calls(&seen));
        if recreated {
            assert_eq!(
                written(&seen, "Restarting"),
                truth("True", "PyTorchJobRestarting"),
                "{policy}"
            );
        } else {
            assert_eq!(
                written(&seen, "Failed").map(|c| c.0),
                Some("True".into()),
                "{policy} {code}"
            );
        }
    }

    // backoffLimit: the containers' restarts count.
    let pods = vec![
        pod_in("master", "Running", None, 0),
        pod_in("worker", "Running", None, 3),
    ];
    let (_, seen) = reconcile_with(job(json!({"backoffLimit": 2}), running_status()), pods).await;
    assert_eq!(
        written(&seen, "Failed"),
        truth("True", "BackoffLimitExceeded")
    );

    // Resumed: the pods come back.
    let suspended = json!({"startTime": "2020-01-01T00:00:00Z", "conditions": [
        {"type": "Created", "status": "True", "reason": "PyTorchJobCreated"},
        {"type": "Suspended", "status": "True", "reason": "PyTorchJobSuspended"}]});
    let (_, seen) = reconcile_with(job(json!({"suspend": false}), suspended), vec![]).await;
    assert_eq!(
        calls(&seen)
            .iter()
            .filter(|c| c.as_str() == "POST /api/v1/namespaces/ns/pods")
            .count(),
        2
    );
    assert_eq!(
        written(&seen, "Suspended"),
        truth("False", "PyTorchJobResumed")
    );
}
