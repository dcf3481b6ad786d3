//! Pure communication schedules: which chunk goes to which peer at step k. No I/O here; the
//! communicator drives these over a transport, and the tests below run them on symbolic data.
//!
//! - Ring reduce-scatter and all-gather (bandwidth-optimal: each rank sends 2(n-1)/n of the
//!   buffer), for large all-reduces, reduce-scatter and all-gather.
//! - Recursive doubling with a fold for non-powers of two (latency-optimal: ⌈log₂ n⌉ + 2 steps),
//!   for small all-reduces.
//! - Binomial trees for broadcast and reduce, pairwise exchange for all-to-all, dissemination
//!   for barrier.
//!
//! Any world size works, and any element count: chunks are a balanced split.

use std::ops::Range;

/// Elements of chunk `i` when `count` elements are split into `parts` balanced chunks (sizes
/// differ by at most one; empty chunks when `count < parts`).
pub fn chunk(count: usize, parts: usize, i: usize) -> Range<usize> {
    let (base, extra) = (count / parts, count % parts);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// One step of a ring: send a chunk to the next rank, receive one from the previous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingStep {
    /// The rank sent to (`rank + 1`).
    pub send_to: usize,
    /// The chunk sent.
    pub send_chunk: usize,
    /// The rank received from (`rank - 1`).
    pub recv_from: usize,
    /// The chunk received (combined into ours for reduce-scatter, copied for all-gather).
    pub recv_chunk: usize,
}

/// Ring reduce-scatter: after these `n - 1` steps, rank `r` holds the full reduction of chunk `r`.
pub fn ring_reduce_scatter(rank: usize, n: usize) -> Vec<RingStep> {
    (0..n.saturating_sub(1))
        .map(|k| RingStep {
            send_to: (rank + 1) % n,
            send_chunk: (rank + 2 * n - k - 1) % n,
            recv_from: (rank + n - 1) % n,
            recv_chunk: (rank + 2 * n - k - 2) % n,
        })
        .collect()
}

/// Ring all-gather: rank `r` starts with chunk `r`; after these `n - 1` steps it has them all.
pub fn ring_all_gather(rank: usize, n: usize) -> Vec<RingStep> {
    (0..n.saturating_sub(1))
        .map(|k| RingStep {
            send_to: (rank + 1) % n,
            send_chunk: (rank + n - k) % n,
            recv_from: (rank + n - 1) % n,
            recv_chunk: (rank + 2 * n - k - 1) % n,
        })
        .collect()
}

/// One step of recursive doubling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoublingStep {
    /// Send the whole buffer to a peer (an extra rank folding into its partner).
    Send(usize),
    /// Receive a peer's buffer and combine it into ours.
    RecvCombine(usize),
    /// Send ours to a peer and combine theirs into ours (both end equal).
    Exchange(usize),
    /// Receive the final result from a peer, replacing ours.
    RecvResult(usize),
    /// Send the final result to a peer.
    SendResult(usize),
}

/// Recursive doubling all-reduce for any `n`: the `n - 2^⌊log₂ n⌋` extra ranks first fold into
/// a partner, the powers of two exchange with distance 1, 2, 4…, and the extras get the result.
pub fn recursive_doubling(rank: usize, n: usize) -> Vec<DoublingStep> {
    if n <= 1 {
        return Vec::new();
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let rem = n - p;
    let mut steps = Vec::new();
    // Ranks below 2·rem pair up: the even one folds into the odd one and sits out.
    if rank < 2 * rem && rank % 2 == 0 {
        return vec![
            DoublingStep::Send(rank + 1),
            DoublingStep::RecvResult(rank + 1),
        ];
    }
    if rank < 2 * rem {
        steps.push(DoublingStep::RecvCombine(rank - 1));
    }
    let virtual_rank = if rank < 2 * rem { rank / 2 } else { rank - rem };
    let real = |v: usize| if v < rem { 2 * v + 1 } else { v + rem };
    let mut mask = 1;
    while mask < p {
        steps.push(DoublingStep::Exchange(real(virtual_rank ^ mask)));
        mask <<= 1;
    }
    if rank < 2 * rem {
        steps.push(DoublingStep::SendResult(rank - 1));
    }
    steps
}

/// Broadcast over a binomial tree rooted at `root`: `(parent, children)` of `rank`.
pub fn broadcast_tree(rank: usize, n: usize, root: usize) -> (Option<usize>, Vec<usize>) {
    let vr = (rank + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut mask = 1;
    let mut parent = None;
    while mask < n {
        if vr & mask != 0 {
            parent = Some(real(vr - mask));
            break;
        }
        mask <<= 1;
    }
    let mut children = Vec::new();
    mask >>= 1;
    while mask > 0 {
        if vr + mask < n {
            children.push(real(vr + mask));
        }
        mask >>= 1;
    }
    (parent, children)
}

/// Reduce over a binomial tree to `root`: the children to receive from (in order), then the
/// parent to send to (none for the root).
pub fn reduce_tree(rank: usize, n: usize, root: usize) -> (Vec<usize>, Option<usize>) {
    let vr = (rank + n - root) % n;
    let real = |v: usize| (v + root) % n;
    let mut children = Vec::new();
    let mut mask = 1;
    while mask < n {
        if vr & mask == 0 {
            if vr | mask < n {
                children.push(real(vr | mask));
            }
        } else {
            return (children, Some(real(vr & !mask)));
        }
        mask <<= 1;
    }
    (children, None)
}

/// All-to-all by pairwise exchange: at step `k` (1..n), send to `rank + k`, receive from `rank - k`.
pub fn pairwise(rank: usize, n: usize) -> Vec<(usize, usize)> {
    (1..n)
        .map(|k| ((rank + k) % n, (rank + n - k) % n))
        .collect()
}

/// Barrier by dissemination: at distance 1, 2, 4…, send to `rank + d`, receive from `rank - d`.
pub fn dissemination(rank: usize, n: usize) -> Vec<(usize, usize)> {
    let mut steps = Vec::new();
    let mut d = 1;
    while d < n {
        steps.push(((rank + d) % n, (rank + n - d) % n));
        d <<= 1;
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every rank's contribution set per chunk, run through a schedule as sets.
    type Contributions = Vec<Vec<BTreeSet<usize>>>;

    #[test]
    fn chunks_are_balanced_and_cover_everything() {
        for count in [0, 1, 5, 7, 64, 1001] {
            for parts in 1..=9 {
                let ranges: Vec<_> = (0..parts).map(|i| chunk(count, parts, i)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, count);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                    assert!(w[0].len().abs_diff(w[1].len()) <= 1);
                }
            }
        }
    }

    #[test]
    fn ring_reduce_scatter_then_all_gather_reduces_everything_everywhere() {
        for n in 1..=9 {
            // held[r][c]: the ranks whose contribution rank r holds for chunk c.
            let mut held: Contributions = (0..n)
                .map(|r| (0..n).map(|_| BTreeSet::from([r])).collect())
                .collect();
            for k in 0..n - 1 {
                let sent: Vec<_> = (0..n).map(|r| ring_reduce_scatter(r, n)[k]).collect();
                let snapshot = held.clone();
                for r in 0..n {
                    let step = sent[r];
                    let from = sent[step.recv_from];
                    assert_eq!(
                        (from.send_to, from.send_chunk),
                        (r, step.recv_chunk),
                        "n={n} k={k} r={r}"
                    );
                    let incoming = snapshot[step.recv_from][step.recv_chunk].clone();
                    held[r][step.recv_chunk].extend(incoming);
                }
            }
            let all: BTreeSet<usize> = (0..n).collect();
            for (r, h) in held.iter().enumerate() {
                assert_eq!(
                    h[r], all,
                    "n={n}: rank {r} lacks contributions to its chunk"
                );
            }
            // All-gather: rank r owns chunk r; afterwards everyone has every chunk.
            let mut has: Vec<BTreeSet<usize>> = (0..n).map(|r| BTreeSet::from([r])).collect();
            for k in 0..n - 1 {
                let snapshot = has.clone();
                for (r, h) in has.iter_mut().enumerate() {
                    let step = ring_all_gather(r, n)[k];
                    let sender = ring_all_gather(step.recv_from, n)[k];
                    assert_eq!(sender.send_chunk, step.recv_chunk);
                    assert!(
                        snapshot[step.recv_from].contains(&step.recv_chunk),
                        "n={n}: sent a chunk it lacks"
                    );
                    h.insert(step.recv_chunk);
                }
            }
            assert!(has.iter().all(|h| h.len() == n), "n={n}");
        }
    }

    #[test]
    fn recursive_doubling_sends_match_receives_and_everyone_ends_complete() {
        for n in 1..=17 {
            let plans: Vec<_> = (0..n).map(|r| recursive_doubling(r, n)).collect();
            let mut held: Vec<BTreeSet<usize>> = (0..n).map(|r| BTreeSet::from([r])).collect();
            let mut cursor = vec![0usize; n];
            // Run the plans in lockstep rounds: a step proceeds when its peer's matching step is due.
            for _round in 0..64 {
                let snapshot = held.clone();
                let mut progressed = vec![false; n];
                for r in 0..n {
                    let Some(step) = plans[r].get(cursor[r]).copied() else {
                        continue;
                    };
                    let peer_step = |p: usize| plans[p].get(cursor[p]).copied();
                    let ready = match step {
                        DoublingStep::Send(p) => peer_step(p) == Some(DoublingStep::RecvCombine(r)),
                        DoublingStep::RecvCombine(p) => peer_step(p) == Some(DoublingStep::Send(r)),
                        DoublingStep::Exchange(p) => {
                            peer_step(p) == Some(DoublingStep::Exchange(r))
                        }
                        DoublingStep::RecvResult(p) => {
                            peer_step(p) == Some(DoublingStep::SendResult(r))
                        }
                        DoublingStep::SendResult(p) => {
                            peer_step(p) == Some(DoublingStep::RecvResult(r))
                        }
                    };
                    if ready {
                        match step {
                            DoublingStep::RecvCombine(p) | DoublingStep::Exchange(p) => {
                                held[r].extend(snapshot[p].iter())
                            }
                            DoublingStep::RecvResult(p) => held[r] = snapshot[p].clone(),
                            DoublingStep::Send(_) | DoublingStep::SendResult(_) => {}
                        }
                        progressed[r] = true;
                    }
                }
                for r in 0..n {
                    cursor[r] += usize::from(progressed[r]);
                }
            }
            for r in 0..n {
                assert_eq!(
                    cursor[r],
                    plans[r].len(),
                    "n={n}: rank {r} stuck at {:?}",
                    plans[r].get(cursor[r])
                );
                assert_eq!(held[r].len(), n, "n={n}: rank {r} has {:?}", held[r]);
            }
        }
    }

    #[test]
    fn trees_reach_every_rank_once() {
        for n in 1..=13 {
            for root in [0, n / 2, n - 1] {
                let mut reached = BTreeSet::from([root]);
                let mut frontier = vec![root];
                while let Some(r) = frontier.pop() {
                    for c in broadcast_tree(r, n, root).1 {
                        assert_eq!(broadcast_tree(c, n, root).0, Some(r));
                        assert!(reached.insert(c), "n={n} root={root}: {c} reached twice");
                        frontier.push(c);
                    }
                }
                assert_eq!(reached.len(), n);
                for r in 0..n {
                    let (children, parent) = reduce_tree(r, n, root);
                    assert_eq!(parent.is_none(), r == root);
                    for c in children {
                        assert_eq!(reduce_tree(c, n, root).1, Some(r), "n={n} root={root}");
                    }
                }
            }
        }
    }

    #[test]
    fn pairwise_and_dissemination_pair_up() {
        for n in 1..=9 {
            for r in 0..n {
                for (k, (to, from)) in pairwise(r, n).into_iter().enumerate() {
                    assert_eq!(pairwise(to, n)[k].1, r);
                    assert_eq!(pairwise(from, n)[k].0, r);
                }
                for (k, (to, _)) in dissemination(r, n).into_iter().enumerate() {
                    assert_eq!(dissemination(to, n)[k].1, r);
                }
            }
        }
    }
}
