//! Server and client together, in process.

use std::time::Duration;

use super::{StoreClient, StoreError, StoreServer};

const T: Duration = Duration::from_secs(5);

async fn pair() -> (StoreServer, StoreClient) {
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let client = StoreClient::connect("127.0.0.1", server.local_addr().port(), T)
        .await
        .expect("connect");
    (server, client)
}

#[tokio::test]
async fn set_get_add_compare_set_delete_append_and_counts() {
    let (server, mut c) = pair().await;
    c.set("k", b"v").await.expect("set");
    assert_eq!(c.get("k").await.expect("get"), b"v");
    assert_eq!(c.add("n", 5).await.expect("add"), 5);
    assert_eq!(c.add("n", -2).await.expect("add"), 3);
    assert_eq!(c.compare_set("k", b"v", b"w").await.expect("cas"), b"w");
    assert_eq!(c.compare_set("k", b"x", b"y").await.expect("cas"), b"w");
    assert_eq!(c.compare_set("new", b"", b"z").await.expect("cas"), b"z");
    assert_eq!(
        c.compare_set("absent", b"e", b"z").await.expect("cas"),
        b"e"
    );
    c.append("k", b"!").await.expect("append");
    assert_eq!(c.get("k").await.expect("get"), b"w!");
    assert!(c.check(&["k", "n"]).await.expect("check"));
    assert!(!c.check(&["k", "nope"]).await.expect("check"));
    assert_eq!(c.num_keys().await.expect("num"), 3);
    assert!(c.delete_key("new").await.expect("delete"));
    assert!(!c.delete_key("new").await.expect("delete"));
    c.multi_set(&[("a", b"1"), ("b", b"2")])
        .await
        .expect("multi_set");
    assert_eq!(
        c.multi_get(&["b", "a"]).await.expect("multi_get"),
        [b"2".to_vec(), b"1".to_vec()]
    );
    assert_eq!(server.len(), 4);
    server.clear();
    assert!(!c.check(&["k"]).await.expect("check"));
}

#[tokio::test]
async fn a_wait_is_woken_by_another_client() {
    let (server, mut waiter) = pair().await;
    let port = server.local_addr().port();
    let setter = tokio::spawn(async move {
        let mut c = StoreClient::connect("127.0.0.1", port, T)
            .await
            .expect("connect");
        c.set("ready", b"1").await.expect("set");
        c.add("count", 1).await.expect("add");
    });
    waiter.wait(&["ready", "count"], T).await.expect("woken");
    setter.await.expect("setter");
}

#[tokio::test]
async fn a_wait_times_out_cancels_and_the_connection_stays_usable() {
    let (_server, mut c) = pair().await;
    let err = c
        .wait(&["never"], Duration::from_millis(100))
        .await
        .expect_err("timeout");
    assert!(matches!(err, StoreError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains("/never"), "{err}");
    c.set("after", b"ok").await.expect("set");
    assert_eq!(c.get("after").await.expect("get"), b"ok");
}

#[tokio::test]
async fn prefixes_namespace_keys_like_torchs_prefix_store() {
    let (_server, c) = pair().await;
    let mut run = c.prefixed("run1");
    run.set("x", b"1").await.expect("set");
    let port = _server.local_addr().port();
    let mut plain = StoreClient::connect("127.0.0.1", port, T)
        .await
        .expect("connect");
    assert!(plain.check(&["run1/x"]).await.expect("check"));
    assert!(!plain.check(&["x"]).await.expect("check"));
}

#[tokio::test]
async fn many_clients_count_together() {
    let (server, mut c) = pair().await;
    let port = server.local_addr().port();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            tokio::spawn(async move {
                let mut c = StoreClient::connect("127.0.0.1", port, T)
                    .await
                    .expect("connect");
                if c.add("n", 1).await.expect("add") == 64 {
                    c.set("all", b"").await.expect("set");
                }
                c.wait(&["go"], T).await.expect("go");
            })
        })
        .collect();
    c.wait(&["all"], T).await.expect("all 64 added");
    assert_eq!(c.get("n").await.expect("n"), b"64");
    c.set("go", b"").await.expect("go");
    for t in tasks {
        t.await.expect("task");
    }
}

#[tokio::test]
async fn errors_name_the_address() {
    let err = StoreClient::connect("127.0.0.1", 1, Duration::from_millis(200))
        .await
        .expect_err("refused");
    assert!(
        err.to_string().contains("127.0.0.1:1") && err.to_string().contains("node 0"),
        "{err}"
    );
    let server = StoreServer::bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let taken = server.local_addr();
    let err = StoreServer::bind(taken).expect_err("in use");
    assert!(
        matches!(err, StoreError::AddrInUse { .. }) && err.to_string().contains("--master-port"),
        "{err}"
    );
}
