//! Collectives where each rank's data is its own: gather and scatter through a root, and
//! all-to-all with counts that differ by pair (torch's `alltoall_base` with split sizes).
//!
//! Linear schedules: the root talks to every rank in rank order. These collectives move each
//! byte once and serve object collectives and uneven exchanges, not bandwidth-bound training.

use super::{CommError, Communicator, Kind};
use crate::reduce::{bytes_of, bytes_of_mut, Element};
use crate::schedule;
use crate::transport::Transport;

impl<T: Transport> Communicator<T> {
    /// Gathers every rank's `input` at `root`, whose `output` (`size × input` long, rank
    /// order) receives them; the other ranks pass `None`.
    ///
    /// # Errors
    /// [`CommError::Invalid`] for a bad root, or a root without an output of the right length;
    /// [`CommError::Transport`] naming a peer.
    pub fn gather<E: Element>(
        &self,
        input: &[E],
        output: Option<&mut [E]>,
        root: usize,
    ) -> Result<(), CommError> {
        const OP: &str = "gather";
        self.check_root(OP, root)?;
        let (n, m) = (self.size(), input.len());
        let tag = self.next_label::<E>(Kind::Gather, m, None, Some(root));
        if self.rank() != root {
            return self.exchange(OP, tag, Some((root, bytes_of(input))), None);
        }
        let output = blocks(OP, output, n, m)?;
        for r in 0..n {
            let block = &mut output[r * m..(r + 1) * m];
            if r == root {
                block.copy_from_slice(input);
            } else {
                self.exchange(OP, tag, None, Some((r, bytes_of_mut(block))))?;
            }
        }
        Ok(())
    }

    /// Sends block `r` of `root`'s `input` (`size × output` long) to rank `r`'s `output`; the
    /// other ranks pass `None` as input.
    ///
    /// # Errors
    /// As [`Communicator::gather`].
    pub fn scatter<E: Element>(
        &self,
        input: Option<&[E]>,
        output: &mut [E],
        root: usize,
    ) -> Result<(), CommError> {
        const OP: &str = "scatter";
        self.check_root(OP, root)?;
        let (n, m) = (self.size(), output.len());
        let tag = self.next_label::<E>(Kind::Scatter, m, None, Some(root));
        if self.rank() != root {
            return self.exchange(OP, tag, None, Some((root, bytes_of_mut(output))));
        }
        let Some(input) = input.filter(|i| i.len() == n * m) else {
            return Err(CommError::Invalid {
                op: OP,
                what: format!("the root's input must hold size × output = {n} × {m} elements"),
            });
        };
        for r in 0..n {
            let block = &input[r * m..(r + 1) * m];
            if r == root {
                output.copy_from_slice(block);
            } else {
                self.exchange(OP, tag, Some((r, bytes_of(block))), None)?;
            }
        }
        Ok(())
    }

    /// All-to-all with a count per pair: `send_counts[j]` elements of `input` (in rank order)
    /// go to rank `j`, and `recv_counts[i]` elements from rank `i` land in `output` (in rank
    /// order). Rank `j`'s `recv_counts[i]` must equal rank `i`'s `send_counts[j]`; a pair that
    /// disagrees fails with the lengths named.
    ///
    /// # Errors
    /// [`CommError::Invalid`] when the counts do not match the buffers or the world;
    /// [`CommError::Transport`] naming a peer.
    pub fn all_to_all_v<E: Element>(
        &self,
        input: &[E],
        send_counts: &[usize],
        output: &mut [E],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        const OP: &str = "all_to_all_v";
        let n = self.size();
        let sums = (
            send_counts
                .iter()
                .try_fold(0usize, |a, &c| a.checked_add(c)),
            recv_counts
                .iter()
                .try_fold(0usize, |a, &c| a.checked_add(c)),
        );
        if send_counts.len() != n
            || recv_counts.len() != n
            || sums != (Some(input.len()), Some(output.len()))
        {
            return Err(CommError::Invalid {
                op: OP,
                what: format!(
                    "{n} send and {n} receive counts must add up to the input ({}) and output ({}) lengths; got {send_counts:?} and {recv_counts:?}",
                    input.len(),
                    output.len()
                ),
            });
        }
        let offsets = |counts: &[usize]| -> Vec<usize> {
            counts
                .iter()
                .scan(0, |at, &c| {
                    let start = *at;
                    *at += c;
                    Some(start)
                })
                .collect()
        };
        let (send_at, recv_at) = (offsets(send_counts), offsets(recv_counts));
        let r = self.rank();
        if send_counts[r] != recv_counts[r] {
            return Err(CommError::Invalid {
                op: OP,
                what: format!(
                    "rank {r} sends itself {} elements but expects {}",
                    send_counts[r], recv_counts[r]
                ),
            });
        }
        // Each rank's counts are its own: the label carries none (lengths are checked per
        // message by the transport).
        let tag = self.next_label::<E>(Kind::AllToAllV, 0, None, None);
        output[recv_at[r]..recv_at[r] + recv_counts[r]]
            .copy_from_slice(&input[send_at[r]..send_at[r] + send_counts[r]]);
        for (to, from) in schedule::pairwise(r, n) {
            let sent = bytes_of(&input[send_at[to]..send_at[to] + send_counts[to]]);
            let received =
                bytes_of_mut(&mut output[recv_at[from]..recv_at[from] + recv_counts[from]]);
            self.exchange(OP, tag, Some((to, sent)), Some((from, received)))?;
        }
        Ok(())
    }
}

/// The root's output, checked to hold `n` blocks of `m`.
fn blocks<'a, E>(
    op: &'static str,
    output: Option<&'a mut [E]>,
    n: usize,
    m: usize,
) -> Result<&'a mut [E], CommError> {
    output
        .filter(|o| o.len() == n * m)
        .ok_or_else(|| CommError::Invalid {
            op,
            what: format!("the root's output must hold size × input = {n} × {m} elements"),
        })
}

#[cfg(test)]
mod tests {
    use crate::comm::tests::{options, spawn};

    #[test]
    fn gather_and_scatter_from_every_root() {
        for n in 1..=5 {
            for root in 0..n {
                for m in [0, 1, 7] {
                    let results = spawn(n, options(0), move |c| {
                        let r = c.rank();
                        let mine: Vec<i32> = (0..m).map(|i| (r * 100 + i) as i32).collect();
                        let mut all = vec![-1i32; n * m];
                        let out = (r == root).then_some(all.as_mut_slice());
                        c.gather(&mine, out, root).expect("gather");
                        let mut back = vec![-1i32; m];
                        let input = (r == root).then_some(all.as_slice());
                        c.scatter(input, &mut back, root).expect("scatter");
                        (r, all, back, mine)
                    });
                    for (r, all, back, mine) in results {
                        assert_eq!(back, mine, "n={n} root={root} m={m} rank {r}");
                        if r == root {
                            let want: Vec<i32> = (0..n)
                                .flat_map(|q| (0..m).map(move |i| (q * 100 + i) as i32))
                                .collect();
                            assert_eq!(all, want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn all_to_all_v_moves_uneven_blocks() {
        for n in 1..=5 {
            // Rank i sends i + j elements to rank j (zero from rank 0 to itself).
            let results = spawn(n, options(0), move |c| {
                let r = c.rank();
                let send: Vec<usize> = (0..n).map(|j| r + j).collect();
                let recv: Vec<usize> = (0..n).map(|i| i + r).collect();
                let input: Vec<u8> = (0..n)
                    .flat_map(|j| std::iter::repeat_n((r * 10 + j) as u8, r + j))
                    .collect();
                let mut output = vec![0u8; recv.iter().sum()];
                c.all_to_all_v(&input, &send, &mut output, &recv)
                    .expect("all_to_all_v");
                (r, output)
            });
            for (r, output) in results {
                let want: Vec<u8> = (0..n)
                    .flat_map(|i| std::iter::repeat_n((i * 10 + r) as u8, i + r))
                    .collect();
                assert_eq!(output, want, "n={n} rank {r}");
            }
        }
    }

    #[test]
    fn uneven_counts_that_disagree_are_named() {
        let results = spawn(2, options(0), |c| {
            let r = c.rank();
            // Rank 0 sends 3 to rank 1, which expects 2.
            let (send, recv) = if r == 0 {
                ([1, 3], [1, 1])
            } else {
                ([1, 1], [2, 1])
            };
            let input = vec![0u8; send.iter().sum()];
            let mut output = vec![0u8; recv.iter().sum()];
            c.all_to_all_v(&input, &send, &mut output, &recv)
        });
        // The receiver of the wrong length names the sender and both lengths.
        let err = results[1]
            .as_ref()
            .expect_err("a short receive")
            .to_string();
        assert!(
            err.contains("rank 0") && err.contains('2') && err.contains('3'),
            "{err}"
        );
        let bad = spawn(1, options(0), |c| {
            c.all_to_all_v(&[1u8], &[2], &mut [0u8], &[1])
        });
        let err = bad[0].as_ref().expect_err("sums disagree").to_string();
        assert!(err.contains("must add up"), "{err}");
    }
}
