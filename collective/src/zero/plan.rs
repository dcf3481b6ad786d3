//! The shard plan: where every parameter lives in one flat buffer, how that buffer is cut into
//! communication buckets, and which piece of each bucket every rank owns. Pure: no I/O.
//!
//! # Layout
//! Parameters are grouped into buckets from the *last* parameter backwards (gradients become
//! ready roughly in reverse order during backward, as torch DDP assumes), so bucket 0 holds
//! the last parameters. A bucket is a contiguous run of whole parameters; a parameter larger
//! than the bucket size gets a bucket of its own. Each bucket is padded to a multiple of
//! `world × align` elements and cut into `world` equal chunks: rank `r` owns chunk `r` of every
//! bucket, one contiguous range per bucket (FSDP's flat-parameter layout, one flat parameter
//! per bucket). So each bucket is exactly one `reduce_scatter` of equal chunks and one
//! `all_gather`, for any world size and any element count; the padding is zeros, at most
//! `world × align − 1` elements a bucket.
//!
//! The *logical* order — every parameter's elements, in parameter order, without padding — does
//! not depend on the world size or the bucket size: checkpoints are written and re-sharded in
//! it.
//!
//! # Bucket size
//! The default is 25 MiB, torch DDP's `bucket_cap_mb`. DeepSpeed's `reduce_bucket_size` and
//! `allgather_bucket_size` default to 5e8 *elements* (1 GB at 16 bits): made for GPUs with
//! memory to spare, on a CPU they make stage 3's live gathered parameters (two buckets: the one
//! in use and the prefetched one) as large as a small model, and leave one bucket per step to
//! overlap. 25 MiB is large enough that a collective's fixed cost (tens of µs over shared
//! memory) is lost in its transfer (milliseconds), and small enough to overlap several buckets
//! per step and to keep stage 3's transient memory far below its 16Ψ/N.

use std::ops::Range;

use crate::reduce::DType;

use super::ZeroError;

/// One parameter of the model, as the training loop names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ParamSpec {
    /// Its name (shown in errors and checkpoints).
    pub name: String,
    /// Its shape; the element count is the product.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// A parameter named `name` of `shape`.
    pub fn new(name: impl Into<String>, shape: &[usize]) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
        }
    }

    /// Its element count, or `None` if the product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// How to cut the flat buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanConfig {
    /// Bytes of one communication bucket (of the model's dtype), at least one element.
    pub bucket_bytes: usize,
    /// Every chunk is a multiple of this many elements (vector-friendly loops).
    pub align: usize,
    /// A smaller cap for the first bucket (the last parameters, whose gradients backward
    /// finishes first), so that communication starts early, as torch DDP's 1 MiB first
    /// bucket; `None` caps it as the others.
    pub first_bucket_bytes: Option<usize>,
}

impl Default for PlanConfig {
    fn default() -> Self {
        Self {
            bucket_bytes: 25 << 20,
            align: 16,
            first_bucket_bytes: None,
        }
    }
}

/// One communication bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// The parameters it holds (indices into the plan's list).
    pub params: Range<usize>,
    /// Where its elements start in logical order.
    pub logical: usize,
    /// Its elements without padding.
    pub len: usize,
    /// Each rank's chunk; `world × chunk` is the padded length.
    pub chunk: usize,
    /// Where it starts in the flat (padded) buffer.
    pub flat: usize,
    /// Where this bucket's chunk starts in every rank's shard buffer.
    pub shard: usize,
}

impl Bucket {
    /// Its padded length.
    pub fn padded(&self, world: usize) -> usize {
        self.chunk * world
    }
}

/// Where a parameter sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// Its bucket.
    pub bucket: usize,
    /// Its first element within the bucket.
    pub offset: usize,
    /// Its element count.
    pub numel: usize,
}

/// Per-rank layout of a model's parameters for a given world size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    params: Vec<ParamSpec>,
    slots: Vec<Slot>,
    buckets: Vec<Bucket>,
    dtype: DType,
    world: usize,
    numel: usize,
    flat_len: usize,
    shard_len: usize,
}

impl ShardPlan {
    /// The plan for `params` of `dtype` over `world` ranks.
    ///
    /// # Errors
    /// [`ZeroError::Plan`] for a world of 0, an alignment or bucket of 0 elements, duplicate
    /// names, or sizes that overflow.
    pub fn new(
        params: Vec<ParamSpec>,
        dtype: DType,
        world: usize,
        config: PlanConfig,
    ) -> Result<Self, ZeroError> {
        let bad = |what: String| Err(ZeroError::Plan { what });
        if world == 0 {
            return bad("a world of 0 ranks; it must be at least 1".into());
        }
        if config.align == 0 {
            return bad("an alignment of 0 elements; use 1 for none".into());
        }
        let bucket_elems = config.bucket_bytes / dtype.size();
        let first_elems = config.first_bucket_bytes.unwrap_or(config.bucket_bytes) / dtype.size();
        if bucket_elems == 0 || first_elems == 0 {
            return bad(format!(
                "a bucket of {} bytes holds no {dtype:?} element",
                config
                    .bucket_bytes
                    .min(config.first_bucket_bytes.unwrap_or(usize::MAX))
            ));
        }
        let mut names = std::collections::HashSet::new();
        let mut numels = Vec::with_capacity(params.len());
        for p in &params {
            if !names.insert(p.name.as_str()) {
                return bad(format!("parameter {:?} is listed twice", p.name));
            }
            match p.numel() {
                Some(n) => numels.push(n),
                None => {
                    return bad(format!(
                        "parameter {:?} of shape {:?} overflows",
                        p.name, p.shape
                    ))
                }
            }
        }
        // Logical starts, in parameter order.
        let mut starts = Vec::with_capacity(params.len() + 1);
        let mut numel = 0usize;
        for &n in &numels {
            starts.push(numel);
            numel = match numel.checked_add(n) {
                Some(t) => t,
                None => return bad("the parameters' element count overflows".into()),
            };
        }
        starts.push(numel);
        // Buckets from the last parameter backwards.
        let granule = world
            .checked_mul(config.align)
            .ok_or_else(|| ZeroError::Plan {
                what: "world × align overflows".into(),
            })?;
        let mut buckets = Vec::new();
        let mut slots = vec![
            Slot {
                bucket: 0,
                offset: 0,
                numel: 0
            };
            params.len()
        ];
        let (mut end, mut flat, mut shard) = (params.len(), 0usize, 0usize);
        while end > 0 {
            let mut begin = end - 1;
            let mut len = numels[begin];
            let cap = if buckets.is_empty() {
                first_elems
            } else {
                bucket_elems
            };
            while begin > 0 && len + numels[begin - 1] <= cap {
                begin -= 1;
                len += numels[begin];
            }
            let padded =
                len.div_ceil(granule)
                    .checked_mul(granule)
                    .ok_or_else(|| ZeroError::Plan {
                        what: "a padded bucket overflows".into(),
                    })?;
            let b = buckets.len();
            for (i, slot) in slots.iter_mut().enumerate().take(end).skip(begin) {
                *slot = Slot {
                    bucket: b,
                    offset: starts[i] - starts[begin],
                    numel: numels[i],
                };
            }
            buckets.push(Bucket {
                params: begin..end,
                logical: starts[begin],
                len,
                chunk: padded / world,
                flat,
                shard,
            });
            flat += padded;
            shard += padded / world;
            end = begin;
        }
        Ok(Self {
            params,
            slots,
            buckets,
            dtype,
            world,
            numel,
            flat_len: flat,
            shard_len: shard,
        })
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Where parameter `i` sits.
    pub fn slot(&self, i: usize) -> Option<Slot> {
        self.slots.get(i).copied()
    }

    /// The buckets; bucket 0 holds the last parameters (the first gradients ready).
    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    /// The model's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Elements of the model (Ψ).
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Elements of the flat, padded buffer.
    pub fn flat_len(&self) -> usize {
        self.flat_len
    }

    /// Elements each rank owns (its chunks of every bucket together).
    pub fn shard_len(&self) -> usize {
        self.shard_len
    }

    /// Rank `rank`'s chunk of bucket `b`, as a range within the bucket.
    pub fn chunk(&self, b: usize, rank: usize) -> Range<usize> {
        let c = self.buckets[b].chunk;
        rank * c..(rank + 1) * c
    }

    /// Bucket `b`'s chunk in a shard buffer.
    pub fn shard_range(&self, b: usize) -> Range<usize> {
        let bucket = &self.buckets[b];
        bucket.shard..bucket.shard + bucket.chunk
    }

    /// Bucket `b` in the flat buffer (padding included).
    pub fn flat_range(&self, b: usize) -> Range<usize> {
        let bucket = &self.buckets[b];
        bucket.flat..bucket.flat + bucket.padded(self.world)
    }

    /// The logical elements in rank `rank`'s chunk of bucket `b` (the padding left out): the
    /// chunk's first `len` elements are logical elements `start..start + len`.
    pub fn chunk_logical(&self, b: usize, rank: usize) -> Range<usize> {
        let bucket = &self.buckets[b];
        let chunk = self.chunk(b, rank);
        let first = chunk.start.min(bucket.len);
        let last = chunk.end.min(bucket.len);
        bucket.logical + first..bucket.logical + last
    }

    /// What identifies the model: names and shapes in order, and the dtype.
    pub fn same_model(&self, other: &[ParamSpec]) -> Result<(), String> {
        if self.params.len() != other.len() {
            return Err(format!(
                "{} parameters here, {} there",
                self.params.len(),
                other.len()
            ));
        }
        for (i, (a, b)) in self.params.iter().zip(other).enumerate() {
            if a != b {
                return Err(format!(
                    "parameter {i} is {:?} of shape {:?} here, {:?} of shape {:?} there",
                    a.name, a.shape, b.name, b.shape
                ));
            }
        }
        Ok(())
    }
}
