//! A distributed sampler, as torch's `DistributedSampler`, that can also resume mid-epoch at
//! another world size (pure: no I/O).
//!
//! An epoch's order is one permutation of the data set, the same for the same seed and epoch
//! on every rank and at every world size. Rank `r` of `W` takes positions `r, r + W, r + 2W, …`
//! of what is left of it, so after every rank has taken `k` samples the ranks together have
//! taken exactly the first `k·W` of the order. That prefix is the only position a checkpoint
//! needs: a job resumed at any world size takes the rest of the order from there, and every
//! sample of the epoch is seen once (up to the padding of the epoch's last, shared, step).

/// How the remainder that does not divide by the world size is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remainder {
    /// Repeat samples from the start of what is left until it divides (torch's default).
    Pad,
    /// Leave the last few out.
    Drop,
}

/// One rank's view of the data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampler {
    /// Samples in the data set.
    pub len: usize,
    /// Ranks sharing it.
    pub world: usize,
    /// This rank.
    pub rank: usize,
    /// Shuffles by this seed (plus the epoch); `None` keeps the data set's order.
    pub seed: Option<u64>,
    /// What happens to the remainder.
    pub remainder: Remainder,
}

impl Sampler {
    /// The epoch's order, shared by every rank and world size.
    pub fn order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len).collect();
        if let Some(seed) = self.seed {
            let mut rng = SplitMix(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for i in (1..order.len()).rev() {
                let j = (rng.next() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        order
    }

    /// This rank's samples of `epoch`, when the first `consumed` of the epoch's order were
    /// taken already (by this or any other world size).
    pub fn indices(&self, epoch: u64, consumed: usize) -> Vec<usize> {
        let order = self.order(epoch);
        let rest = order.get(consumed..).unwrap_or(&[]);
        let world = self.world.max(1);
        let per_rank = match self.remainder {
            Remainder::Pad => rest.len().div_ceil(world),
            Remainder::Drop => rest.len() / world,
        };
        (0..per_rank)
            .map(|j| rest[(self.rank + j * world) % rest.len()])
            .collect()
    }

    /// Where the epoch stands after every rank took `taken` more samples from `consumed`.
    pub fn advance(&self, consumed: usize, taken: usize) -> usize {
        consumed
            .saturating_add(taken.saturating_mul(self.world))
            .min(self.len)
    }
}

/// SplitMix64: small, seedable, the same everywhere.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sampler(len: usize, world: usize, rank: usize, remainder: Remainder) -> Sampler {
        Sampler {
            len,
            world,
            rank,
            seed: Some(7),
            remainder,
        }
    }

    #[test]
    fn the_order_is_a_permutation_that_depends_on_seed_and_epoch_only() {
        let a = sampler(100, 4, 0, Remainder::Pad);
        let mut sorted = a.order(3);
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a.order(3), sampler(100, 2, 1, Remainder::Drop).order(3));
        assert_ne!(a.order(3), a.order(4), "each epoch reshuffles");
        let plain = Sampler { seed: None, ..a };
        assert_eq!(plain.order(9), (0..100).collect::<Vec<_>>());
    }

    proptest! {
        #[test]
        fn every_sample_is_seen_once_per_epoch_across_ranks(len in 1usize..300, world in 1usize..9) {
            let mut seen = vec![0usize; len];
            for rank in 0..world {
                for i in sampler(len, world, rank, Remainder::Pad).indices(2, 0) {
                    seen[i] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n >= 1));
            // Padding repeats at most world - 1 samples.
            prop_assert!(seen.iter().sum::<usize>() - len < world);
            let per: Vec<usize> = (0..world)
                .map(|r| sampler(len, world, r, Remainder::Drop).indices(2, 0).len())
                .collect();
            prop_assert!(per.iter().all(|&n| n == len / world), "equal shares when dropping");
        }

        #[test]
        fn resuming_at_another_world_size_sees_the_rest_exactly_once(
            len in 8usize..300, w1 in 1usize..9, w2 in 1usize..9, batch in 1usize..16, steps in 0usize..20,
        ) {
            // The first job takes `steps` batches of `batch` per rank, then stops.
            let first = sampler(len, w1, 0, Remainder::Drop);
            let taken = (steps * batch).min(first.indices(5, 0).len());
            let consumed = first.advance(0, taken);
            let mut seen = vec![0usize; len];
            for rank in 0..w1 {
                for &i in &sampler(len, w1, rank, Remainder::Drop).indices(5, 0)[..taken] {
                    seen[i] += 1;
                }
            }
            // The second job, at another world size, takes the rest.
            for rank in 0..w2 {
                for i in sampler(len, w2, rank, Remainder::Pad).indices(5, consumed) {
                    seen[i] += 1;
                }
            }
            prop_assert!(seen.iter().all(|&n| n >= 1), "nothing skipped");
            let repeats = seen.iter().sum::<usize>() - len;
            prop_assert!(repeats < w2, "only the last step's padding repeats ({repeats})");
        }
    }
}
