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

/// A raw connection that has done the handshake, as any client could.
async fn raw(server: &StoreServer) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let mut hello = vec![super::wire::Op::Validate as u8];
    hello.extend_from_slice(&super::wire::MAGIC.to_le_bytes());
    s.write_all(&hello).await.expect("handshake");
    s
}

/// The start of a SET whose value is declared `len` bytes long.
fn set_header(len: u64) -> Vec<u8> {
    let mut out = vec![super::wire::Op::Set as u8];
    super::wire::put_bytes(&mut out, b"big");
    out.extend_from_slice(&len.to_le_bytes());
    out
}

/// Reads until the server closes the connection (bounded).
async fn closed(s: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 64];
    loop {
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut sink)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn declared_lengths_hold_no_memory_and_the_store_keeps_serving() {
    use tokio::io::AsyncWriteExt;
    let (server, mut c) = pair().await;
    let mut hostile = Vec::new();
    for _ in 0..100 {
        let mut s = raw(&server).await;
        s.write_all(&set_header(super::wire::MAX_VALUE_LEN))
            .await
            .expect("declare");
        s.write_all(b"a few bytes").await.expect("write");
        hostile.push(s);
    }
    // The store answers between them, and what 100 declared 256 MiB values hold is a read
    // buffer each.
    c.set("k", b"v").await.expect("set");
    assert_eq!(c.get("k").await.expect("get"), b"v");
    let held = server.buffered_bytes();
    assert!(held <= 100 * 300 * 1024, "{held} bytes buffered");
}

#[tokio::test]
async fn a_connection_past_the_memory_limit_is_dropped_and_the_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let limits = super::Limits {
        memory: 2 << 20,
        ..super::Limits::default()
    };
    let server =
        StoreServer::bind_with("127.0.0.1:0".parse().expect("addr"), limits).expect("bind");
    let mut c = StoreClient::connect("127.0.0.1", server.local_addr().port(), T)
        .await
        .expect("connect");
    let mut greedy = raw(&server).await;
    greedy
        .write_all(&set_header(8 << 20))
        .await
        .expect("declare");
    // It sends its value for real: past 2 MiB buffered, it goes.
    let chunk = vec![7u8; 256 * 1024];
    for _ in 0..32 {
        if greedy.write_all(&chunk).await.is_err() {
            break;
        }
    }
    assert!(
        closed(&mut greedy).await,
        "the greedy connection stayed open"
    );
    c.set("k", b"v").await.expect("set");
    assert_eq!(c.get("k").await.expect("get"), b"v");
    assert!(server.buffered_bytes() <= 2 << 20);
}

#[tokio::test]
async fn a_client_that_stalls_inside_a_request_or_before_its_handshake_is_dropped() {
    use tokio::io::AsyncWriteExt;
    let limits = super::Limits {
        stall: Duration::from_millis(200),
        ..super::Limits::default()
    };
    let server =
        StoreServer::bind_with("127.0.0.1:0".parse().expect("addr"), limits).expect("bind");
    let mut partial = raw(&server).await;
    partial.write_all(&set_header(100)).await.expect("declare");
    partial.write_all(b"half").await.expect("write");
    assert!(closed(&mut partial).await, "a stalled request was kept");
    let mut silent = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    assert!(
        closed(&mut silent).await,
        "a connection without a handshake was kept"
    );
    // An idle client between requests stays (torch's clients idle for hours).
    let mut idle = StoreClient::connect("127.0.0.1", server.local_addr().port(), T)
        .await
        .expect("connect");
    let mut other = StoreClient::connect("127.0.0.1", server.local_addr().port(), T)
        .await
        .expect("connect");
    // Idle while another client's stalled request is dropped (> stall).
    let mut third = raw(&server).await;
    third.write_all(&set_header(5)).await.expect("declare");
    assert!(closed(&mut third).await);
    other.set("k", b"v").await.expect("set");
    assert_eq!(idle.get("k").await.expect("idle client served"), b"v");
}

#[tokio::test]
async fn past_the_connection_cap_new_clients_wait_until_one_closes() {
    let limits = super::Limits {
        max_connections: 3,
        ..super::Limits::default()
    };
    let server =
        StoreServer::bind_with("127.0.0.1:0".parse().expect("addr"), limits).expect("bind");
    let port = server.local_addr().port();
    let mut first = StoreClient::connect("127.0.0.1", port, T).await.expect("1");
    let _second = StoreClient::connect("127.0.0.1", port, T).await.expect("2");
    let _third = StoreClient::connect("127.0.0.1", port, T).await.expect("3");
    first.set("k", b"v").await.expect("set");
    // The fourth connects (the kernel queues it) but is not served while three are open.
    let waiting = tokio::spawn(async move {
        let mut c = StoreClient::connect("127.0.0.1", port, Duration::from_secs(30))
            .await
            .expect("4");
        c.get("k").await.expect("served once a slot frees")
    });
    let mut waiting = waiting;
    // Load only delays an answer, so an answer here means the cap let it through.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a fourth client was served past the cap of three"
    );
    drop(first);
    let got = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the fourth client was never served")
        .expect("task");
    assert_eq!(got, b"v");
}

#[tokio::test]
async fn a_burst_of_clients_past_128_is_queued_by_the_kernel_not_dropped() {
    // One served connection, so every other client stays in the listen backlog: with the
    // standard backlog of 128 the kernel drops the SYNs past it and those clients hang for a
    // second before their first retry — a job of thousands of workers connecting at once.
    let limits = super::Limits {
        max_connections: 1,
        ..super::Limits::default()
    };
    let server =
        StoreServer::bind_with("127.0.0.1:0".parse().expect("addr"), limits).expect("bind");
    let addr = server.local_addr();
    let mut held = Vec::new();
    for i in 0..600 {
        // A queued loopback handshake completes inside the connect call; only a dropped SYN
        // waits for the retry a second later, so 900 ms tells the two apart even under load.
        let c = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(900))
            .unwrap_or_else(|e| panic!("client {i} of a burst of 600 was not queued: {e}"));
        held.push(c);
    }
}
