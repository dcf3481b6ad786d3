//! Leader election against a mock API server: an absent lease is created, a fresh one held by
//! another replica is left alone, an expired one is taken over, a lost race is "not ours".

use std::time::Duration;

use ferrun_operator::controller::lease::LeaseLock;
use http::{Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{json, Value};

const NOW: i64 = 1_800_000_000;

fn lease(holder: &str, renewed: i64) -> Value {
    let time = Timestamp::from_second(renewed).expect("time").to_string();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "op", "namespace": "ns", "resourceVersion": "7"},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "renewTime": time, "acquireTime": time, "leaseTransitions": 2}
    })
}

/// Answers GET with `current` (404 when `None`) and writes with `write_status`; the writes seen.
async fn try_acquire(
    current: Option<Value>,
    write_status: StatusCode,
) -> (bool, Vec<(String, Value)>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut writes = Vec::new();
        while let Ok(Some((request, respond))) =
            tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await
        {
            let (parts, body) = request.into_parts();
            let body: Value = serde_json::from_slice(&body.collect_bytes().await.expect("body"))
                .unwrap_or(Value::Null);
            let (status, reply) = match (parts.method.as_str(), &current) {
                ("GET", Some(lease)) => (StatusCode::OK, lease.clone()),
                ("GET", None) => (
                    StatusCode::NOT_FOUND,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
                ),
                (method, _) if write_status == StatusCode::CONFLICT => {
                    writes.push((method.to_owned(), body));
                    (
                        StatusCode::CONFLICT,
                        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "Conflict", "code": 409, "message": "conflict"}),
                    )
                }
                (method, _) => {
                    writes.push((method.to_owned(), body.clone()));
                    (StatusCode::OK, body)
                }
            };
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).expect("json")))
                    .expect("response"),
            );
        }
        writes
    });
    let lock = LeaseLock::new(
        Api::namespaced(Client::new(service, "ns"), "ns"),
        "op",
        "me",
        Duration::from_secs(15),
    );
    let won = lock
        .try_acquire(Timestamp::from_second(NOW).expect("now"))
        .await
        .expect("acquire");
    drop(lock);
    (won, server.await.expect("mock"))
}

#[tokio::test]
async fn an_absent_lease_is_created_with_this_replica_holding_it() {
    let (won, writes) = try_acquire(None, StatusCode::OK).await;
    assert!(won);
    assert_eq!(writes.len(), 1);
    assert_eq!(writes[0].0, "POST");
    assert_eq!(writes[0].1["spec"]["holderIdentity"], "me");
}

#[tokio::test]
async fn a_fresh_lease_of_another_replica_is_left_alone() {
    let (won, writes) = try_acquire(Some(lease("other", NOW - 5)), StatusCode::OK).await;
    assert!(!won);
    assert!(writes.is_empty());
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_and_its_own_is_renewed() {
    let (won, writes) = try_acquire(Some(lease("other", NOW - 20)), StatusCode::OK).await;
    assert!(won);
    let (method, body) = &writes[0];
    assert_eq!(method, "PUT");
    assert_eq!(body["spec"]["holderIdentity"], "me");
    assert_eq!(body["spec"]["leaseTransitions"], 3);
    assert_eq!(
        body["metadata"]["resourceVersion"], "7",
        "the write is conditional"
    );
    let (won, writes) = try_acquire(Some(lease("me", NOW - 10)), StatusCode::OK).await;
    assert!(won);
    assert_eq!(
        writes[0].1["spec"]["leaseTransitions"], 2,
        "a renewal is no transition"
    );
}

#[tokio::test]
async fn a_lost_race_is_not_leadership() {
    let (won, writes) = try_acquire(Some(lease("other", NOW - 60)), StatusCode::CONFLICT).await;
    assert!(!won);
    assert_eq!(writes.len(), 1);
}
