//! The rendezvous service over real gRPC on loopback: nodes join and learn their ranks, a
//! silent node is dropped and the survivors are pushed the new round, strangers without the
//! token are refused, and malformed calls get errors while the service keeps serving.

use std::io::Write;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use ferrun_launcher::rendezvous::round::{NodeDesc, NodeId, RoundEnd, Settings, Standing, View};
use ferrun_launcher::rendezvous::service::client::{ClientError, ElasticClient, Views};
use ferrun_launcher::rendezvous::service::{RendezvousService, Tls, Token};
use tonic::Code;

/// Every wait in these tests is bounded by this; none should come near it.
const BOUND: Duration = Duration::from_secs(60);

fn settings(min: u32, max: u32, heartbeat: Duration) -> Settings {
    Settings {
        min_nodes: min,
        max_nodes: max,
        join_timeout: BOUND,
        last_call_timeout: Duration::from_millis(300),
        heartbeat_timeout: heartbeat,
    }
}

fn serve(settings: Settings, token: Option<Token>) -> RendezvousService {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    RendezvousService::serve(listener, settings, token, None).expect("the service starts")
}

fn node(name: &str, nproc: u32) -> NodeDesc {
    NodeDesc {
        id: NodeId(name.to_owned()),
        addr: format!("{name}.test"),
        store_port: 29_000,
        nproc,
    }
}

fn client(service: &RendezvousService, token: Option<&Token>, name: &str) -> ElasticClient {
    let endpoint = service.local_addr().to_string();
    ElasticClient::new(&endpoint, token, None, "job-1", node(name, 2)).expect("a client")
}

/// Waits (bounded) until the watched view satisfies `done`.
async fn until(views: &mut Views, done: impl Fn(&View) -> bool) -> View {
    let result = {
        let wait = views.wait_for(|v| v.as_ref().is_ok_and(&done));
        tokio::time::timeout(BOUND, wait)
            .await
            .map(|r| r.map(|v| v.clone()))
    };
    match result {
        Ok(Ok(view)) => view.expect("a view"),
        Ok(Err(_)) => panic!("the watch ended: {:?}", *views.borrow()),
        Err(_) => panic!("no such view within {BOUND:?}: last {:?}", *views.borrow()),
    }
}

fn assigned(view: &View) -> Option<(u32, u32, u32)> {
    match &view.standing {
        Standing::Assigned(p) => Some((p.node_rank, p.nnodes, p.base_rank)),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_learn_their_ranks_and_a_silent_one_is_dropped_at_once() {
    let service = serve(settings(2, 3, Duration::from_millis(1500)), None);
    let deadline = Instant::now() + BOUND;
    let nodes: Vec<ElasticClient> = ["a", "b", "c"]
        .iter()
        .map(|n| client(&service, None, n))
        .collect();
    let mut watches = Vec::new();
    let mut tasks = Vec::new();
    for c in &nodes {
        c.join(2, 3, deadline).await.expect("join");
        let (views, [watcher, beats]) = c
            .watch(Duration::from_millis(200), BOUND)
            .await
            .expect("watch");
        watches.push(views);
        tasks.push((watcher, beats));
    }
    for (rank, views) in watches.iter_mut().enumerate() {
        let view = until(views, |v| assigned(v).is_some()).await;
        let rank = u32::try_from(rank).expect("small");
        assert_eq!(assigned(&view), Some((rank, 3, 2 * rank)));
        let Standing::Assigned(p) = &view.standing else {
            unreachable!()
        };
        assert_eq!((p.world_size, p.master_addr.as_str()), (6, "a.test"));
    }
    // c's agent goes silent (its heartbeats stop; no Leave): a and b get round 1 without it.
    tasks[2].1.abort();
    let silent_at = Instant::now();
    for views in &mut watches[..2] {
        let view = until(views, |v| v.round == 1 && assigned(v).is_some()).await;
        assert_eq!(
            view.last_end,
            Some(RoundEnd::Lost(vec![NodeId("c".into())]))
        );
        assert_eq!(view.restart_count, 0);
        assert_eq!(assigned(&view).map(|(_, n, _)| n), Some(2));
    }
    let noticed = silent_at.elapsed();
    eprintln!("the silent node was dropped after {noticed:?} (heartbeat timeout 1.5 s)");
    // A failure restarts every node into the next round, counted once.
    nodes[1]
        .restart(1, "rank 3 exited with code 1")
        .await
        .expect("restart");
    nodes[0]
        .restart(1, "rank 0 exited with SIGTERM")
        .await
        .expect("restart");
    for views in &mut watches[..2] {
        let view = until(views, |v| v.round == 2).await;
        assert_eq!(view.restart_count, 1);
        assert!(
            matches!(&view.last_end, Some(RoundEnd::Failed { node, .. }) if node.0 == "b"),
            "{view:?}"
        );
    }
    for c in &nodes[..2] {
        c.finish(2).await.expect("finish");
    }
    for views in &mut watches[..2] {
        until(views, |v| v.standing == Standing::Finished).await;
    }
    let err = nodes[2]
        .join(2, 3, deadline)
        .await
        .expect_err("the job is over");
    assert!(err.to_string().contains("every node finished"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_connection_breaks_is_dropped_without_waiting_for_its_heartbeats() {
    // Heartbeats time out long after every bounded wait here: only the broken watch can tell.
    let service = serve(settings(2, 2, 10 * BOUND), None);
    let deadline = Instant::now() + BOUND;
    let (a, b) = (client(&service, None, "a"), client(&service, None, "b"));
    a.join(2, 2, deadline).await.expect("join");
    b.join(2, 2, deadline).await.expect("join");
    let (mut views, _a_tasks) = a.watch(BOUND, 10 * BOUND).await.expect("watch");
    let (_, b_tasks) = b.watch(BOUND, 10 * BOUND).await.expect("watch");
    until(&mut views, |v| assigned(v).is_some()).await;
    // b's agent dies: its tasks end and its stream is reset.
    for task in b_tasks {
        task.abort();
    }
    drop(b);
    let view = until(&mut views, |v| v.round == 1).await;
    assert_eq!(
        view.last_end,
        Some(RoundEnd::Lost(vec![NodeId("b".into())]))
    );
    assert_eq!(view.standing, Standing::Gathering { joined: 1 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_token_or_with_another_nnodes_is_refused_with_the_fix() {
    let token = Token::new("s3cret-token-0123456789").expect("a token");
    let service = serve(settings(1, 2, BOUND), Some(token.clone()));
    let deadline = Instant::now() + BOUND;
    let wrong = Token::new("another-token-0123456789").expect("a token");
    for (who, given) in [("none", None), ("wrong", Some(&wrong))] {
        let err = client(&service, given, who)
            .join(1, 2, deadline)
            .await
            .expect_err("refused");
        assert!(
            matches!(
                &err,
                ClientError::Refused {
                    code: Code::Unauthenticated,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("token"), "{err}");
    }
    let err = client(&service, Some(&token), "x")
        .join(2, 4, deadline)
        .await
        .expect_err("other --nnodes");
    assert!(
        err.to_string()
            .contains("--nnodes 2:4 but this rendezvous runs --nnodes 1:2"),
        "{err}"
    );
    let view = client(&service, Some(&token), "ok")
        .join(1, 2, deadline)
        .await
        .expect("the right token joins");
    assert!(
        matches!(view.standing, Standing::Gathering { joined: 1 }),
        "{view:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_and_garbage_bytes_get_errors_and_the_service_keeps_serving() {
    let service = serve(settings(1, 1, BOUND), None);
    let deadline = Instant::now() + BOUND;
    // Not gRPC at all.
    let mut raw = std::net::TcpStream::connect(service.local_addr()).expect("connect");
    raw.write_all(&[0xff; 4096]).expect("write");
    drop(raw);
    let endpoint = service.local_addr().to_string();
    let bad_id = ElasticClient::new(&endpoint, None, None, "job-1", node("a b/../../etc", 1))
        .expect("client");
    let err = bad_id.join(1, 1, deadline).await.expect_err("bad id");
    assert!(err.to_string().contains("node id must be"), "{err}");
    let bad_run =
        ElasticClient::new(&endpoint, None, None, &"r".repeat(200), node("a", 1)).expect("client");
    let err = bad_run.join(1, 1, deadline).await.expect_err("long run id");
    assert!(err.to_string().contains("run id must be"), "{err}");
    let zero = ElasticClient::new(&endpoint, None, None, "job-1", node("z", 0)).expect("client");
    let err = zero.join(1, 1, deadline).await.expect_err("no workers");
    assert!(err.to_string().contains("--nproc-per-node 0"), "{err}");
    let mut fine = client(&service, None, "fine");
    let view = fine.join(1, 1, deadline).await.expect("still serving");
    assert_eq!(assigned(&view), Some((0, 1, 0)));
    fine = client(&service, None, "fine");
    let (mut views, _) = fine.watch(BOUND, BOUND).await.expect("watch");
    assert!(until(&mut views, |v| assigned(v).is_some()).await.round == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_to_no_service_fails_at_the_deadline_naming_the_endpoint() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let endpoint = format!("127.0.0.1:{port}");
    let c = ElasticClient::new(&endpoint, None, None, "job-1", node("a", 1)).expect("client");
    let err = c
        .join(1, 1, Instant::now() + Duration::from_millis(700))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&endpoint), "{err}");
}

/// A CA and a certificate signed by it for 127.0.0.1: `(ca_pem, cert_pem, key_pem)`.
fn certificates() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .signed_by(&key, &ca)
        .expect("cert");
    (
        ca.pem().into_bytes(),
        cert.pem().into_bytes(),
        key.serialize_pem().into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_node_with_the_ca_joins_and_one_without_it_is_refused() {
    let (ca, cert, key) = certificates();
    let server_tls = Tls::from_pem(Some((cert, key)), ca.clone());
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let service =
        RendezvousService::serve(listener, settings(1, 2, BOUND), None, Some(&server_tls))
            .expect("serves");
    let endpoint = service.local_addr().to_string();
    let deadline = Instant::now() + Duration::from_secs(3);
    let with_ca = Tls::from_pem(None, ca);
    let good =
        ElasticClient::new(&endpoint, None, Some(&with_ca), "job-1", node("a", 1)).expect("client");
    let view = good.join(1, 2, deadline).await.expect("joins over TLS");
    assert!(
        matches!(view.standing, Standing::Gathering { joined: 1 }),
        "{view:?}"
    );
    // Another CA: the handshake fails, the node never gets in.
    let (other_ca, _, _) = certificates();
    let stranger_tls = Tls::from_pem(None, other_ca);
    let stranger = ElasticClient::new(&endpoint, None, Some(&stranger_tls), "job-1", node("b", 1))
        .expect("client");
    let err = stranger.join(1, 2, deadline).await.expect_err("refused");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    // Plain text to a TLS service gets nowhere either.
    let plain = ElasticClient::new(&endpoint, None, None, "job-1", node("c", 1)).expect("client");
    plain.join(1, 2, deadline).await.expect_err("refused");
}
