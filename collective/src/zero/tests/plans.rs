//! The shard plan's invariants, for every world size and bucket size.

use super::*;

#[test]
fn every_element_is_owned_by_exactly_one_rank_and_chunks_are_equal() {
    for world in 1..=9 {
        for bucket_bytes in [2, 64, 256, 4096, 1 << 20] {
            let config = PlanConfig {
                bucket_bytes,
                align: 4,
                first_bucket_bytes: None,
            };
            let plan = ShardPlan::new(model(), DType::F16, world, config).expect("plan");
            let mut owner = vec![usize::MAX; plan.numel()];
            for (b, bucket) in plan.buckets().iter().enumerate() {
                assert_eq!(bucket.padded(world) % (world * 4), 0);
                assert!(
                    bucket.padded(world) - bucket.len < world * 4,
                    "padding is bounded"
                );
                assert!(
                    bucket.len * 2 <= bucket_bytes || bucket.params.len() == 1,
                    "a bucket exceeds its size only to hold one large parameter"
                );
                for rank in 0..world {
                    for i in plan.chunk_logical(b, rank) {
                        assert_eq!(owner[i], usize::MAX, "element {i} owned twice");
                        owner[i] = rank;
                    }
                }
            }
            assert!(owner.iter().all(|&o| o < world), "every element owned");
            assert_eq!(plan.flat_len(), plan.shard_len() * world);
        }
    }
}

#[test]
fn buckets_hold_whole_parameters_from_the_last_backwards() {
    let plan = plan_for(DType::F32, 3);
    let buckets = plan.buckets();
    assert_eq!(
        buckets[0].params.end,
        model().len(),
        "bucket 0 holds the last parameter"
    );
    for pair in buckets.windows(2) {
        assert_eq!(
            pair[1].params.end, pair[0].params.start,
            "contiguous, in reverse"
        );
    }
    assert_eq!(buckets.last().map(|b| b.params.start), Some(0));
    for (i, p) in model().iter().enumerate() {
        let slot = plan.slot(i).expect("slot");
        let bucket = &buckets[slot.bucket];
        assert!(bucket.params.contains(&i));
        assert_eq!(slot.numel, p.numel().expect("numel"));
        assert!(slot.offset + slot.numel <= bucket.len);
    }
}

#[test]
fn bad_plans_are_refused_with_the_reason() {
    let err = |r: Result<ShardPlan, ZeroError>| r.expect_err("refused").to_string();
    let c = PlanConfig::default();
    assert!(err(ShardPlan::new(model(), DType::F32, 0, c)).contains("world of 0"));
    let tiny = PlanConfig {
        bucket_bytes: 1,
        align: 1,
        first_bucket_bytes: None,
    };
    assert!(err(ShardPlan::new(model(), DType::F32, 2, tiny)).contains("holds no"));
    let mut twice = model();
    twice.push(ParamSpec::new("w1", &[2]));
    assert!(err(ShardPlan::new(twice, DType::F32, 2, c)).contains("\"w1\" is listed twice"));
    let huge = vec![ParamSpec::new("h", &[usize::MAX, 2])];
    assert!(err(ShardPlan::new(huge, DType::F32, 2, c)).contains("overflows"));
}

#[test]
fn the_first_bucket_has_its_own_smaller_cap() {
    let config = PlanConfig {
        bucket_bytes: 4096,
        align: 4,
        first_bucket_bytes: Some(64),
    };
    let plan = ShardPlan::new(model(), DType::F16, 2, config).expect("plan");
    let (first, rest) = plan.buckets().split_first().expect("buckets");
    assert!(
        first.len * 2 <= 64 || first.params.len() == 1,
        "the first bucket keeps to its cap"
    );
    assert_eq!(
        first.params.end,
        plan.params().len(),
        "the first bucket holds the last parameters"
    );
    assert!(
        rest.iter().any(|b| b.len * 2 > 64),
        "later buckets use the larger cap"
    );
}
