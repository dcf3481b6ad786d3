use super::*;
use crate::rendezvous::round::{Placement, RoundEnd};

fn settings(min: u32, max: u32) -> Settings {
    Settings {
        min_nodes: min,
        max_nodes: max,
        join_timeout: Duration::from_secs(60),
        last_call_timeout: Duration::from_secs(2),
        heartbeat_timeout: NO_HEARTBEAT,
    }
}

fn id(n: usize) -> NodeId {
    NodeId(format!("node{n}"))
}

fn at(node: usize, secs: u64, op: Op) -> Entry {
    Entry {
        at: Duration::from_secs(1_800_000_000 + secs),
        node: id(node),
        op,
    }
}

fn join(node: usize, secs: u64, (min, max): (u32, u32)) -> Entry {
    at(
        node,
        secs,
        Op::Join {
            desc: NodeDesc {
                id: id(node),
                addr: format!("10.0.0.{node}"),
                store_port: 4000 + u16::try_from(node).expect("small"),
                nproc: 2,
            },
            settings: settings(min, max),
        },
    )
}

fn placement(r: &Replica, node: usize) -> Placement {
    match r.view(&id(node)).standing {
        Standing::Assigned(p) => p,
        other => panic!("node {node} is not placed: {other:?}"),
    }
}

#[test]
fn every_entry_survives_the_round_trip() {
    let entries = [
        join(1, 0, (2, 3)),
        at(1, 1, Op::Ready(4)),
        at(
            1,
            2,
            Op::Restart {
                round: 4,
                cause: "rank 3 exited 1".into(),
            },
        ),
        at(1, 3, Op::Finish(5)),
        at(1, 4, Op::Leave),
        at(1, 5, Op::Lose(id(2))),
        at(1, 6, Op::Close("done".into())),
        at(1, 7, Op::Tick),
    ];
    for entry in entries {
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
    }
}

#[test]
fn bad_entries_are_refused_with_what_is_wrong() {
    let huge = vec![0u8; MAX_ENTRY + 1];
    assert!(Entry::decode(&huge)
        .expect_err("too big")
        .contains("at most"));
    assert!(Entry::decode(b"\xff\xff\xff").is_err(), "not protobuf");
    let mut forged = join(1, 0, (2, 3));
    forged.node = id(2);
    let err = Entry::decode(&forged.encode()).expect_err("joins for another");
    assert!(err.contains("node2 joins for node1"), "{err}");
    let mut spaced = at(1, 0, Op::Tick);
    spaced.node = NodeId("has space".into());
    assert!(Entry::decode(&spaced.encode())
        .expect_err("bad id")
        .contains("node id"));
    let long = at(1, 0, Op::Close("x".repeat(wire::MAX_CAUSE + 1)));
    assert!(Entry::decode(&long.encode())
        .expect_err("long")
        .contains("reason"));
    let empty = proto::LogEntry {
        at_ms: 1,
        node_id: "n".into(),
        op: None,
    };
    assert_eq!(
        Entry::decode(&empty.encode_to_vec()),
        Err("no call".to_owned())
    );
}

#[test]
fn replicas_that_replay_the_same_log_agree_and_place_every_node() {
    let log = [
        join(1, 0, (2, 3)),
        join(2, 1, (2, 3)),
        // MIN is here: the last call runs out 2 s later, and some agent ticks.
        at(2, 3, Op::Tick),
    ];
    let (mut a, mut b) = (Replica::new(), Replica::new());
    for entry in &log {
        a.apply(entry).expect("applies");
        b.apply(entry).expect("applies");
    }
    for node in [1, 2] {
        assert_eq!(a.view(&id(node)), b.view(&id(node)));
    }
    let (p1, p2) = (placement(&a, 1), placement(&a, 2));
    assert_eq!((p1.nnodes, p1.world_size), (2, 4));
    assert_ne!(p1.node_rank, p2.node_rank);
    assert_eq!(p1.master_addr, p2.master_addr);
    assert!(!p1.all_ready);
    let round = a.view(&id(1)).round;
    a.apply(&at(1, 4, Op::Ready(round))).expect("ready");
    a.apply(&at(2, 4, Op::Ready(round))).expect("ready");
    assert!(placement(&a, 1).all_ready);
}

#[test]
fn replay_time_never_runs_backwards() {
    let mut r = Replica::new();
    r.apply(&join(1, 0, (2, 2))).expect("joins");
    r.apply(&join(2, 0, (2, 2))).expect("joins");
    let deadline_free = r.next_deadline();
    // A tick from a host whose clock is behind changes nothing and moves no time back.
    r.apply(&at(2, 0, Op::Tick)).expect("tick");
    assert_eq!(r.next_deadline(), deadline_free);
    assert!(matches!(r.view(&id(1)).standing, Standing::Assigned(_)));
}

#[test]
fn a_join_with_other_nnodes_is_refused_for_its_author_only() {
    let mut r = Replica::new();
    r.apply(&join(1, 0, (2, 3))).expect("joins");
    let err = r.apply(&join(2, 0, (2, 4))).expect_err("other --nnodes");
    assert!(err.contains("--nnodes 2:4"), "{err}");
    assert!(err.contains("--nnodes 2:3"), "{err}");
    assert_eq!(r.view(&id(2)).standing, Standing::Unknown);
    assert_eq!(r.view(&id(1)).standing, Standing::Gathering { joined: 1 });
    let err = Replica::new()
        .apply(&at(1, 0, Op::Tick))
        .expect_err("nothing yet");
    assert!(err.contains("before any node joined"), "{err}");
}

#[test]
fn a_node_without_its_alive_key_is_lost_and_the_survivors_go_on() {
    let mut r = Replica::new();
    for node in 1..=3 {
        r.apply(&join(node, 0, (2, 3))).expect("joins");
    }
    let round = r.view(&id(1)).round;
    let alive: BTreeSet<NodeId> = [id(1), id(3)].into();
    assert_eq!(r.lost(&alive), vec![id(2)]);
    r.apply(&at(1, 5, Op::Lose(id(2)))).expect("lose");
    // Another agent saw the same deletion: a second lose is harmless.
    r.apply(&at(3, 5, Op::Lose(id(2)))).expect("lose again");
    let view = r.view(&id(1));
    assert!(view.round > round);
    assert_eq!(view.last_end, Some(RoundEnd::Lost(vec![id(2)])));
    assert_eq!(placement(&r, 1).nnodes, 2);
    assert!(r.lost(&alive).is_empty());
    assert_eq!(r.view(&id(2)).standing, Standing::Unknown);
}

#[test]
fn heartbeats_do_not_drop_anyone_under_etcd() {
    let mut r = Replica::new();
    r.apply(&join(1, 0, (1, 1))).expect("joins");
    // A year later, with no entry in between, a tick drops nobody: leases decide that.
    r.apply(&at(1, 365 * 24 * 3600, Op::Tick)).expect("tick");
    assert!(matches!(r.view(&id(1)).standing, Standing::Assigned(_)));
}

#[test]
fn keys_name_their_node_and_nothing_else() {
    let keys = Keys::new("/ferrun/rendezvous/", "job-1");
    assert_eq!(
        keys.alive_of(&id(3)),
        "/ferrun/rendezvous/job-1/alive/node3"
    );
    assert_eq!(
        keys.entry(&id(3), 7),
        "/ferrun/rendezvous/job-1/log/node3/00000000000000000007"
    );
    assert!(keys.entry(&id(3), 7).starts_with(&keys.log()));
    assert!(keys.alive().starts_with(&keys.run()));
    assert_eq!(keys.node_of(keys.alive_of(&id(3)).as_bytes()), Some(id(3)));
    assert_eq!(keys.node_of(b"/ferrun/rendezvous/job-1/alive/a/b"), None);
    assert_eq!(keys.node_of(b"/ferrun/rendezvous/job-2/alive/node3"), None);
    assert_eq!(keys.node_of(&[0xff, 0xfe]), None);
}
