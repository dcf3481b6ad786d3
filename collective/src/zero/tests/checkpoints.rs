//! Checkpoints: saved at one world size and stage, loaded at others with the same master
//! weights, optimizer state, step count and loss scale; damaged ones refused.

use std::path::Path;

use super::*;

const SHARED: Run = Run {
    steps: 3,
    shared: true,
    overflow: None,
};

fn engine(
    comm: Communicator<MemTransport>,
    stage: Stage,
    opt: Optimizer,
) -> Zero<f32, MemTransport> {
    let world = comm.size();
    let plan = plan_for(DType::F32, world);
    // Not the values saved: loading must replace them all.
    let init: Vec<f32> = (0..plan.numel()).map(|i| i as f32).collect();
    Zero::new(comm, plan, config(stage, opt, LossScale::none()), &init).expect("engine")
}

/// Trains `steps` more steps from step `from`.
fn more(z: &mut Zero<f32, MemTransport>, from: usize, steps: usize) {
    for s in from..from + steps {
        train_step(z, s, SHARED);
    }
}

/// Trains 3 steps at `world` and `stage`, saves into `dir` (consolidated or sharded); the
/// full state saved, and after 2 more steps.
fn save_at(
    world: usize,
    stage: Stage,
    dir: &Path,
    consolidated: bool,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let out = on_ranks(world, |comm| {
        let mut z = engine(comm, stage, OPTIMIZERS[2]);
        more(&mut z, 0, SHARED.steps);
        if consolidated {
            z.save_consolidated(dir).expect("save consolidated");
        } else {
            z.save(dir).expect("save");
        }
        let saved = z.gather_full().expect("full");
        more(&mut z, SHARED.steps, 2);
        (saved, z.gather_full().expect("full"))
    });
    out.into_iter().next().expect("rank 0")
}

/// Loads `dir` at `world` and `stage`: the state loaded, and after 2 more steps.
fn load_at(world: usize, stage: Stage, dir: &Path) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, u64) {
    let out = on_ranks(world, |comm| {
        let mut z = engine(comm, stage, OPTIMIZERS[2]);
        z.load(dir).expect("load");
        let loaded = z.gather_full().expect("full");
        let steps = z.steps();
        more(&mut z, SHARED.steps, 2);
        (loaded, z.gather_full().expect("full"), steps)
    });
    out.into_iter().next().expect("rank 0")
}

#[test]
fn saved_at_4_loads_at_3_2_and_1_and_trains_on_as_if_unsharded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (saved, continued) = save_at(4, Stage::Gradients, dir.path(), false);
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("dir").count(),
        5,
        "4 shards and a manifest"
    );
    for (world, stage) in [
        (3, Stage::Parameters),
        (2, Stage::Optimizer),
        (1, Stage::Replicated),
    ] {
        let (loaded, went_on, steps) = load_at(world, stage, dir.path());
        assert!(
            loaded == saved,
            "N={world} {stage:?}: loaded state differs from the saved one"
        );
        assert_eq!(
            steps, 3,
            "the step count (Adam's bias correction) is restored"
        );
        // Every rank's loss is the same, so the averaged gradient is the same at any world
        // size up to the rounding of a mean (N·g/N): one ulp per step.
        for (a, b) in went_on.iter().zip(&continued) {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(
                d <= 1e-5,
                "N={world} {stage:?}: trains on {d} away from N=4"
            );
        }
    }
}

#[test]
fn saved_by_four_replicated_ranks_each_shard_holds_its_chunk_and_it_loads_at_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (saved, _) = save_at(4, Stage::Replicated, dir.path(), false);
    for stage in [Stage::Replicated, Stage::Parameters] {
        let (loaded, _, steps) = load_at(2, stage, dir.path());
        assert_eq!(loaded, saved, "{stage:?}");
        assert_eq!(steps, SHARED.steps as u64);
    }
}

#[test]
fn four_to_one_to_four_round_trips_to_the_bit() {
    let (a, b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let (saved, _) = save_at(4, Stage::Parameters, a.path(), false);
    on_ranks(1, |comm| {
        let mut z = engine(comm, Stage::Replicated, OPTIMIZERS[2]);
        z.load(a.path()).expect("load at 1");
        z.save(b.path()).expect("save at 1");
    });
    let (back, _, _) = load_at(4, Stage::Optimizer, b.path());
    assert!(back == saved);
}

#[test]
fn a_consolidated_checkpoint_is_one_shard_and_loads_anywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (saved, continued) = save_at(3, Stage::Gradients, dir.path(), true);
    assert!(dir.path().join("shard-00000-of-00001.bin").is_file());
    let (loaded, went_on, _) = load_at(2, Stage::Parameters, dir.path());
    assert!(loaded == saved);
    assert!(went_on
        .iter()
        .zip(&continued)
        .all(|(a, b)| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-5)));
}

/// Loading `dir` on 2 ranks: every rank's error.
fn load_errors(
    dir: &Path,
    change: impl Fn(&mut Vec<ParamSpec>) + Sync,
    opt: Optimizer,
) -> Vec<String> {
    on_ranks(2, |comm| {
        let mut params = model();
        change(&mut params);
        let plan = ShardPlan::new(
            params,
            DType::F32,
            2,
            PlanConfig {
                bucket_bytes: 256,
                align: 4,
                first_bucket_bytes: None,
            },
        )
        .expect("plan");
        let init = vec![0.0; plan.numel()];
        let mut z = Zero::new(
            comm,
            plan,
            config(Stage::Gradients, opt, LossScale::none()),
            &init,
        )
        .expect("engine");
        z.load(dir).expect_err("refused").to_string()
    })
}

#[test]
fn another_model_a_missing_or_damaged_shard_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    save_at(2, Stage::Optimizer, dir.path(), false);
    let same = |_: &mut Vec<ParamSpec>| {};
    for e in load_errors(dir.path(), |p| p[3].shape = vec![5, 7], OPTIMIZERS[2]) {
        assert!(e.contains("another model") && e.contains("\"w2\""), "{e}");
    }
    for e in load_errors(dir.path(), same, OPTIMIZERS[0]) {
        assert!(e.contains("saved with AdamW"), "{e}");
    }
    let shard = dir.path().join("shard-00001-of-00002.bin");
    let bytes = std::fs::read(&shard).expect("shard");
    std::fs::write(&shard, &bytes[..bytes.len() - 4]).expect("truncate");
    for e in load_errors(dir.path(), same, OPTIMIZERS[2]) {
        assert!(
            e.contains("could not load")
                || (e.contains("shard-00001") && e.contains("its header says")),
            "{e}"
        );
    }
    std::fs::remove_file(&shard).expect("remove");
    for e in load_errors(dir.path(), same, OPTIMIZERS[2]) {
        assert!(
            e.contains("could not load") || e.contains("missing or unreadable shard"),
            "{e}"
        );
    }
    let manifest = dir.path().join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(
        &manifest,
        text.replace("shard-00001-of-00002.bin", "../../etc/passwd"),
    )
    .expect("edit");
    for e in load_errors(dir.path(), same, OPTIMIZERS[2]) {
        assert!(
            e.contains("could not load") || e.contains("not a shard file"),
            "{e}"
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]

    /// A real shard cut anywhere, or overwritten anywhere in its magic and header, is an error
    /// naming the file: never a panic, never a huge allocation. (The values themselves carry
    /// no checksum: a flipped bit in them is not detected.)
    #[test]
    fn arbitrary_shard_bytes_are_refused_cleanly(
        noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64),
        cut in proptest::prelude::any::<proptest::sample::Index>(),
        at in proptest::prelude::any::<proptest::sample::Index>(),
    ) {
        let dir = tempfile::tempdir().expect("tempdir");
        save_at(2, Stage::Gradients, dir.path(), false);
        let shard = dir.path().join("shard-00000-of-00002.bin");
        let real = std::fs::read(&shard).expect("shard");
        let header_end = 12 + u32::from_le_bytes([real[8], real[9], real[10], real[11]]) as usize;
        let mut damaged = real[..header_end + cut.index(real.len() - header_end)].to_vec();
        let at = at.index(header_end);
        for (i, b) in noise.iter().enumerate() {
            match damaged.get_mut(at + i) {
                Some(x) => *x = *b,
                None => damaged.push(*b),
            }
        }
        proptest::prop_assume!(damaged != real);
        std::fs::write(&shard, &damaged).expect("write");
        for e in load_errors(dir.path(), |_| {}, OPTIMIZERS[2]) {
            proptest::prop_assert!(e.contains("checkpoint"), "{}", e);
        }
    }
}
