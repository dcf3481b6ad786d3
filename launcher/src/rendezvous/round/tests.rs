use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const S: Duration = Duration::from_secs(1);

fn settings(min: u32, max: u32) -> Settings {
    Settings {
        min_nodes: min,
        max_nodes: max,
        join_timeout: 600 * S,
        last_call_timeout: 30 * S,
        heartbeat_timeout: 45 * S,
    }
}

fn id(name: &str) -> NodeId {
    NodeId(name.to_owned())
}

fn node(name: &str, nproc: u32) -> NodeDesc {
    NodeDesc {
        id: id(name),
        addr: format!("{name}.example"),
        store_port: 4000 + u16::try_from(name.len()).unwrap_or(0),
        nproc,
    }
}

fn placement(r: &Rendezvous, name: &str) -> Placement {
    match r.view(&id(name)).standing {
        Standing::Assigned(p) => p,
        other => panic!("{name} is not assigned: {other:?}"),
    }
}

fn ranks(r: &Rendezvous, names: &[&str]) -> Vec<u32> {
    names.iter().map(|n| placement(r, n).node_rank).collect()
}

#[test]
fn a_round_completes_at_once_when_max_nodes_join_with_ranks_in_id_order() {
    let mut r = Rendezvous::new(settings(2, 3));
    r.join(Duration::ZERO, node("c", 2)).unwrap();
    r.join(Duration::ZERO, node("a", 4)).unwrap();
    assert_eq!(r.view(&id("a")).standing, Standing::Gathering { joined: 2 });
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    assert_eq!(ranks(&r, &["a", "b", "c"]), [0, 1, 2]);
    let c = placement(&r, "c");
    assert_eq!((c.base_rank, c.world_size, c.nnodes), (5, 7, 3));
    assert_eq!((c.master_addr.as_str(), c.master_port), ("a.example", 4001));
}

#[test]
fn min_nodes_complete_when_the_last_call_has_passed() {
    let mut r = Rendezvous::new(settings(2, 3));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.join(S, node("b", 1)).unwrap();
    assert_eq!(r.next_deadline(), Some(31 * S));
    r.tick(30 * S);
    assert_eq!(r.view(&id("a")).standing, Standing::Gathering { joined: 2 });
    r.heartbeat(30 * S, &id("a")).unwrap();
    r.heartbeat(30 * S, &id("b")).unwrap();
    r.tick(31 * S);
    assert_eq!(placement(&r, "b").nnodes, 2);
}

#[test]
fn a_node_past_max_waits_and_takes_the_place_of_a_lost_one() {
    let mut r = Rendezvous::new(settings(2, 2));
    for n in ["a", "b", "c"] {
        r.join(Duration::ZERO, node(n, 1)).unwrap();
    }
    assert_eq!(r.view(&id("c")).standing, Standing::Waiting);
    assert_eq!(r.view(&id("a")).waiting, 1);
    r.heartbeat(40 * S, &id("b")).unwrap();
    r.heartbeat(40 * S, &id("c")).unwrap();
    assert_eq!(r.next_deadline(), Some(45 * S + Duration::from_millis(1)));
    r.tick(46 * S);
    let view = r.view(&id("b"));
    assert_eq!(view.round, 1);
    assert_eq!(view.last_end, Some(RoundEnd::Lost(vec![id("a")])));
    assert_eq!(
        view.restart_count, 0,
        "a lost node is not a counted restart"
    );
    // b keeps rank 1; c takes the free rank 0, so the master moves to c.
    assert_eq!(ranks(&r, &["b", "c"]), [1, 0]);
    assert_eq!(placement(&r, "b").master_addr, "c.example");
    assert_eq!(r.view(&id("a")).standing, Standing::Unknown);
    assert_eq!(
        r.heartbeat(46 * S, &id("a")),
        Err(RoundError::UnknownNode(id("a")))
    );
}

#[test]
fn a_node_joining_a_running_round_with_room_scales_it_up_keeping_ranks() {
    let mut r = Rendezvous::new(settings(2, 3));
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    r.join(Duration::ZERO, node("c", 1)).unwrap();
    r.tick(30 * S);
    assert_eq!(ranks(&r, &["b", "c"]), [0, 1]);
    r.join(30 * S, node("a", 1)).unwrap();
    let view = r.view(&id("a"));
    assert_eq!((view.round, view.restart_count), (1, 0));
    assert_eq!(view.last_end, Some(RoundEnd::ScaleUp(id("a"))));
    assert_eq!(
        ranks(&r, &["b", "c", "a"]),
        [0, 1, 2],
        "old ranks kept, the newcomer last"
    );
}

#[test]
fn a_failure_restarts_into_a_complete_round_at_once_and_counts_once() {
    let mut r = Rendezvous::new(settings(2, 3));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    r.tick(30 * S);
    r.restart(31 * S, &id("b"), 0, "rank 1 exited with code 1")
        .unwrap();
    // The other node reports its own failure of the same round: already handled.
    r.restart(31 * S, &id("a"), 0, "rank 0 exited with SIGTERM")
        .unwrap();
    let view = r.view(&id("a"));
    assert_eq!((view.round, view.restart_count), (1, 1));
    assert_eq!(
        view.last_end,
        Some(RoundEnd::Failed {
            node: id("b"),
            cause: "rank 1 exited with code 1".into()
        })
    );
    assert_eq!(
        ranks(&r, &["a", "b"]),
        [0, 1],
        "no last call before a restart"
    );
}

#[test]
fn a_participant_leaving_ends_the_round_and_below_min_the_rest_wait_then_time_out() {
    let mut r = Rendezvous::new(settings(2, 2));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    r.leave(5 * S, &id("b"));
    let view = r.view(&id("a"));
    assert_eq!(view.last_end, Some(RoundEnd::Left(id("b"))));
    assert_eq!(view.standing, Standing::Gathering { joined: 1 });
    for t in (15..600).step_by(10) {
        r.heartbeat(t * S, &id("a")).unwrap();
    }
    r.tick(604 * S);
    assert!(r.over().is_none());
    r.heartbeat(605 * S, &id("a")).unwrap();
    r.tick(605 * S);
    let err = r.join(606 * S, node("z", 1)).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("1 of at least 2 nodes joined") && text.contains("(a)"),
        "{text}"
    );
    assert_eq!(
        r.view(&id("a")).standing,
        Standing::TimedOut {
            joined: vec![id("a")]
        }
    );
}

#[test]
fn workers_start_when_every_node_of_the_round_is_ready_and_not_before() {
    let mut r = Rendezvous::new(settings(2, 2));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    r.ready(S, &id("a"), 0).unwrap();
    assert!(!placement(&r, "a").all_ready);
    r.ready(S, &id("b"), 0).unwrap();
    assert!(placement(&r, "a").all_ready && placement(&r, "b").all_ready);
    r.restart(S, &id("a"), 0, "exit 1").unwrap();
    assert!(!placement(&r, "b").all_ready, "a new round starts unready");
    r.ready(S, &id("b"), 0).unwrap();
    assert!(
        !placement(&r, "b").all_ready,
        "readiness for an old round does not count"
    );
}

#[test]
fn the_job_is_done_when_every_node_of_the_round_finished_it() {
    let mut r = Rendezvous::new(settings(2, 2));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.join(Duration::ZERO, node("b", 1)).unwrap();
    r.finish(S, &id("a"), 0).unwrap();
    r.finish(S, &id("a"), 0).unwrap();
    assert!(matches!(r.view(&id("a")).standing, Standing::Assigned(_)));
    // b's workers failed instead: the round restarts and a's finish no longer counts.
    r.restart(S, &id("b"), 0, "exit 1").unwrap();
    r.finish(2 * S, &id("a"), 1).unwrap();
    r.finish(2 * S, &id("b"), 1).unwrap();
    assert_eq!(r.view(&id("b")).standing, Standing::Finished);
    assert_eq!(r.join(3 * S, node("c", 1)), Err(RoundError::Finished));
}

#[test]
fn closing_ends_it_for_everyone_and_keeps_the_first_reason() {
    let mut r = Rendezvous::new(settings(1, 2));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    r.close("job finished");
    r.close("second");
    assert_eq!(
        r.join(S, node("b", 1)),
        Err(RoundError::Closed("job finished".into()))
    );
    assert_eq!(
        r.view(&id("a")).standing,
        Standing::Closed {
            reason: "job finished".into()
        }
    );
    assert_eq!(r.next_deadline(), None);
}

#[test]
fn a_retried_join_is_a_heartbeat_and_bad_descriptors_are_refused() {
    let mut r = Rendezvous::new(settings(2, 2));
    r.join(Duration::ZERO, node("a", 1)).unwrap();
    let revision = r.revision();
    r.join(10 * S, node("a", 1)).unwrap();
    assert_eq!(r.revision(), revision);
    r.tick(20 * S);
    assert_eq!(r.view(&id("a")).standing, Standing::Gathering { joined: 1 });
    let err = r.join(20 * S, node("b", 0)).unwrap_err();
    assert!(err.to_string().contains("--nproc-per-node 0"), "{err}");
    assert!(r.join(20 * S, node("b", MAX_NPROC + 1)).is_err());
}

#[test]
fn huge_timeouts_and_clock_steps_back_do_not_panic() {
    let mut r = Rendezvous::new(Settings {
        join_timeout: Duration::MAX,
        last_call_timeout: Duration::MAX,
        heartbeat_timeout: Duration::MAX,
        ..settings(1, 3)
    });
    r.join(100 * S, node("a", 1)).unwrap();
    r.tick(S);
    assert!(r.next_deadline().is_some());
    assert_eq!(r.view(&id("a")).standing, Standing::Gathering { joined: 1 });
    // The end of time is past every deadline: the last call has passed.
    r.tick(Duration::MAX);
    assert_eq!(placement(&r, "a").nnodes, 1);
}

#[test]
fn ranks_are_kept_below_the_new_count_and_free_ones_go_in_id_order() {
    let nodes = |names: &[&str]| names.iter().map(|n| id(n)).collect::<BTreeSet<_>>();
    let previous: BTreeMap<NodeId, u32> = [(id("x"), 0), (id("m"), 3), (id("b"), 1)].into();
    let ranked = assign_ranks(&nodes(&["a", "b", "m", "x"]), &previous);
    assert_eq!(ranked, [id("x"), id("b"), id("a"), id("m")]);
    // m's rank 3 does not exist among 3 nodes: it takes the first free one.
    let ranked = assign_ranks(&nodes(&["a", "m", "x"]), &previous);
    assert_eq!(ranked, [id("x"), id("a"), id("m")]);
}

#[derive(Debug, Clone)]
enum Op {
    Join(usize, u32),
    Heartbeat(usize),
    Leave(usize),
    Restart(usize, bool),
    Finish(usize),
    Ready(usize),
    Lose(usize),
    Close,
    Advance(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..7usize, 1..4u32).prop_map(|(n, p)| Op::Join(n, p)),
        8 => (0..7usize).prop_map(Op::Heartbeat),
        2 => (0..7usize).prop_map(Op::Leave),
        2 => (0..7usize, any::<bool>()).prop_map(|(n, current)| Op::Restart(n, current)),
        2 => (0..7usize).prop_map(Op::Finish),
        3 => (0..7usize).prop_map(Op::Ready),
        1 => (0..7usize).prop_map(Op::Lose),
        1 => Just(Op::Close),
        6 => (0..25_000u64).prop_map(Op::Advance),
    ]
}

fn names() -> Vec<NodeId> {
    (0..7).map(|i| NodeId(format!("node-{i}"))).collect()
}

/// Every invariant of the state, checked after each call.
fn check(r: &Rendezvous, now: Duration, ticked: bool) -> Result<(), TestCaseError> {
    let Settings {
        min_nodes,
        max_nodes,
        ..
    } = r.settings;
    let (min, max) = (min_nodes as usize, max_nodes as usize);
    prop_assert!(r.participants.len() <= max);
    prop_assert!(r.waiting.iter().all(|w| !r.participants.contains(w)));
    prop_assert!(r.finished.is_subset(&r.participants));
    prop_assert!(r.ready.is_subset(&r.participants));
    let gathering = matches!(r.phase, Phase::Gathering { .. });
    prop_assert!(
        r.finished.is_empty() || !gathering,
        "finished nodes in a gathering round"
    );
    if r.open().is_ok() {
        let mut known: BTreeSet<&NodeId> = r.participants.iter().collect();
        known.extend(r.waiting.iter());
        prop_assert_eq!(known, r.members.keys().collect::<BTreeSet<_>>());
        prop_assert!(r.waiting.is_empty() || r.participants.len() == max);
    }
    match &r.phase {
        Phase::Complete {
            ranks,
            places,
            world_size,
            hosts,
        } => {
            prop_assert!((min..=max).contains(&ranks.len()));
            let addrs: Vec<&String> = ranks.iter().map(|id| &r.members[id].desc.addr).collect();
            prop_assert_eq!(
                hosts.iter().collect::<Vec<_>>(),
                addrs,
                "node 0 admits the round's hosts"
            );
            prop_assert_eq!(
                ranks.iter().collect::<BTreeSet<_>>(),
                r.participants.iter().collect()
            );
            prop_assert_eq!(places.len(), ranks.len());
            let mut base = 0;
            for id in ranks {
                prop_assert_eq!(places[id].1, base);
                base += r.members[id].desc.nproc;
            }
            prop_assert_eq!(*world_size, base);
            for (rank, id) in ranks.iter().enumerate() {
                let Standing::Assigned(p) = r.view(id).standing else {
                    return Err(TestCaseError::fail(format!("{id} not assigned")));
                };
                prop_assert_eq!(p.node_rank as usize, rank);
                prop_assert_eq!(p.world_size, base);
                prop_assert_eq!(&p.master_addr, &r.members[&ranks[0]].desc.addr);
                prop_assert_eq!(p.hosts.len(), if rank == 0 { ranks.len() } else { 0 });
            }
        }
        Phase::Gathering {
            since,
            last_call_at,
        } => {
            prop_assert!(r.participants.len() < max, "a full round is complete");
            prop_assert_eq!(since.is_some(), !r.participants.is_empty());
            prop_assert_eq!(last_call_at.is_some(), r.participants.len() >= min);
            if ticked {
                prop_assert!(last_call_at.is_none_or(|at| at > now), "last call passed");
                let join_deadline = since.map(|s| s.saturating_add(r.settings.join_timeout));
                prop_assert!(
                    last_call_at.is_some() || join_deadline.is_none_or(|d| d > now),
                    "join timeout passed"
                );
            }
        }
        Phase::Finished | Phase::Closed(_) | Phase::TimedOut(_) => {}
    }
    if ticked && r.open().is_ok() {
        let timeout = r.settings.heartbeat_timeout;
        prop_assert!(r
            .members
            .values()
            .all(|m| now.saturating_sub(m.last_heartbeat) <= timeout));
    }
    Ok(())
}

fn complete_ranks(r: &Rendezvous) -> Option<Vec<NodeId>> {
    match &r.phase {
        Phase::Complete { ranks, .. } => Some(ranks.clone()),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn random_sequences_keep_the_invariants(
        min in 1..4u32,
        extra in 0..3u32,
        last_call_ms in 0..4_000u64,
        heartbeat_ms in 1_000..12_000u64,
        join_ms in 5_000..60_000u64,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut r = Rendezvous::new(Settings {
            min_nodes: min,
            max_nodes: min + extra,
            join_timeout: Duration::from_millis(join_ms),
            last_call_timeout: Duration::from_millis(last_call_ms),
            heartbeat_timeout: Duration::from_millis(heartbeat_ms),
        });
        let ids = names();
        let mut now = Duration::ZERO;
        let mut last_complete: Option<(u64, Vec<NodeId>)> = None;
        let mut terminal: Option<RoundError> = None;
        for op in ops {
            let op_seen = Some(op.clone());
            let before = (r.round, r.restart_count, r.revision, r.major);
            let views: Vec<View> = ids.iter().map(|i| r.view(i)).collect();
            let mut ticked = false;
            match op {
                Op::Join(n, nproc) => {
                    let desc = NodeDesc { id: ids[n].clone(), addr: format!("10.0.0.{n}"), store_port: 1, nproc };
                    let _ = r.join(now, desc);
                }
                Op::Heartbeat(n) => { let _ = r.heartbeat(now, &ids[n]); }
                Op::Leave(n) => r.leave(now, &ids[n]),
                Op::Restart(n, current) => {
                    let round = if current { r.round } else { r.round.saturating_sub(1) };
                    let _ = r.restart(now, &ids[n], round, "worker failed");
                }
                Op::Finish(n) => { let _ = r.finish(now, &ids[n], r.round); }
                Op::Ready(n) => { let _ = r.ready(now, &ids[n], r.round); }
                Op::Lose(n) => r.lose(now, &ids[n]),
                Op::Close => r.close("closed by the test"),
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    r.tick(now);
                    ticked = true;
                }
            }
            check(&r, now, ticked)?;
            // Rounds and counted restarts only move forward, one step a call; a counted
            // restart is exactly a round that ended by failure.
            prop_assert!(r.round == before.0 || r.round == before.0 + 1);
            let failed = matches!(r.last_end, Some(RoundEnd::Failed { .. }));
            prop_assert!(r.restart_count == before.1 || (r.restart_count == before.1 + 1 && failed));
            // Whoever's view changed was told: the revision moved; and the major revision,
            // unless only a gathering round's count changed.
            let changed = ids.iter().zip(&views).any(|(i, v)| &r.view(i) != v);
            prop_assert!(!changed || r.revision > before.2, "a view changed without a new revision");
            prop_assert!(r.revision >= before.2);
            let count_free = |v: &View| match v.standing {
                Standing::Gathering { .. } => View { standing: Standing::Gathering { joined: 0 }, ..v.clone() },
                _ => v.clone(),
            };
            // (A joining node learns its own standing from the join's reply.)
            let joiner = match op_seen { Some(Op::Join(n, _)) => Some(&ids[n]), _ => None };
            let major = ids
                .iter()
                .zip(&views)
                .filter(|(i, _)| Some(*i) != joiner)
                .any(|(i, v)| count_free(&r.view(i)) != count_free(v));
            prop_assert!(!major || r.major > before.3, "a view changed without a new major revision");
            // Over is over, with the same reason.
            if let Some(t) = &terminal {
                prop_assert_eq!(r.over(), Some(t.clone()));
            }
            terminal = r.over();
            // A node keeps its rank across completed rounds while that rank exists.
            if let Some(ranks) = complete_ranks(&r) {
                if let Some((round, previous)) = &last_complete {
                    if *round != r.round || previous != &ranks {
                        for (old, id) in previous.iter().enumerate() {
                            if let Some(new) = ranks.iter().position(|x| x == id) {
                                if old < ranks.len() {
                                    prop_assert_eq!(new, old, "{} moved from rank {} to {}", id, old, new);
                                }
                            }
                        }
                    }
                }
                last_complete = Some((r.round, ranks));
            }
        }
    }

    #[test]
    fn nodes_that_keep_beating_are_never_lost(
        nodes in 1..6usize,
        beats in proptest::collection::vec(1..9_999u64, 1..60),
    ) {
        let mut r = Rendezvous::new(Settings { heartbeat_timeout: 10 * S, ..settings(1, 8) });
        let ids = names();
        for n in ids.iter().take(nodes) {
            r.join(Duration::ZERO, NodeDesc { id: n.clone(), addr: "h".into(), store_port: 1, nproc: 1 }).unwrap();
        }
        let mut now = Duration::ZERO;
        for gap in beats {
            now += Duration::from_millis(gap);
            r.tick(now);
            for n in ids.iter().take(nodes) {
                prop_assert!(r.heartbeat(now, n).is_ok());
            }
        }
        prop_assert!(r.last_end.is_none(), "{:?}", r.last_end);
    }
}
