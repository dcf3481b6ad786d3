//! Training checkpoints: the engine's sharded checkpoint (`collective::zero::checkpoint`,
//! loadable at any world size and stage) plus `state.json`, where training stood — step,
//! epoch, and how much of the epoch's sample order was consumed — so that a resumed job, at
//! any world size, sees every sample of the epoch once.
//!
//! # Layout
//! `DIR/step-NNNNNNNN/` per checkpoint (shards, the engine's manifest, then `state.json`,
//! written last, by rank 0, to a temporary name and renamed): a directory without
//! `state.json` is incomplete and ignored. The latest two complete ones are kept.
//! `DIR/final/` holds a consolidated (one-shard) checkpoint of the finished model.
//!
//! # Trust
//! Checkpoint directories are untrusted: only entries named `step-` and digits that are real
//! directories (not links) are considered; `state.json` is capped at 64 KiB and every field is
//! checked; the shards are checked by the engine.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::TrainError;

/// The state file's name.
pub const STATE: &str = "state.json";
const MAX_STATE: u64 = 64 << 10;
/// Complete checkpoints kept.
const KEEP: usize = 2;

/// Where training stood when a checkpoint was taken.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch under way (0-based).
    pub epoch: u64,
    /// Samples of the epoch's order consumed (see [`crate::sampler`]).
    pub consumed: usize,
    /// The shuffling seed.
    pub seed: u64,
    /// The world size that wrote it.
    pub world: usize,
    /// The layer sizes of the model.
    pub sizes: Vec<i64>,
}

fn bad(path: &Path, what: impl Into<String>) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        what: what.into(),
    }
}

/// The directory for the checkpoint after `step` steps.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// Writes `state` into `dir` (rank 0, after every rank's shard is in).
///
/// # Errors
/// [`TrainError::Checkpoint`] when it cannot be written.
pub fn write_state(dir: &Path, state: &State) -> Result<(), TrainError> {
    let path = dir.join(STATE);
    let tmp = dir.join(format!(".{STATE}.tmp"));
    let body = serde_json::to_vec_pretty(state).map_err(|e| bad(&path, e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| bad(&path, e.to_string()))
}

/// Reads the state of the checkpoint in `dir`.
///
/// # Errors
/// [`TrainError::Checkpoint`] when it is missing, too large or not a state.
pub fn read_state(dir: &Path) -> Result<State, TrainError> {
    let path = dir.join(STATE);
    let meta = std::fs::symlink_metadata(&path)
        .map_err(|e| bad(&path, format!("{e}: the checkpoint is incomplete")))?;
    if !meta.is_file() || meta.len() > MAX_STATE {
        return Err(bad(&path, "not a state file (a link, or over 64 KiB)"));
    }
    let text = std::fs::read(&path).map_err(|e| bad(&path, e.to_string()))?;
    let state: State = serde_json::from_slice(&text)
        .map_err(|e| bad(&path, format!("not a ferrun-train state: {e}")))?;
    if state.world == 0 || state.sizes.len() < 2 || state.sizes.iter().any(|&s| s <= 0) {
        return Err(bad(&path, "a world of 0 or a model without layers"));
    }
    Ok(state)
}

/// The complete checkpoints under `root`, oldest first.
pub fn complete(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let step: u64 = name.to_str()?.strip_prefix("step-")?.parse().ok()?;
            let path = e.path();
            let is_dir = std::fs::symlink_metadata(&path).ok()?.is_dir();
            (is_dir && path.join(STATE).is_file()).then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// The latest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Option<(u64, PathBuf)> {
    complete(root).pop()
}

/// Removes all but the newest complete checkpoints, and incomplete ones older than them.
pub fn prune(root: &Path) {
    let done = complete(root);
    let Some(&(oldest_kept, _)) = done.get(done.len().saturating_sub(KEEP)) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let path = e.path();
        let is_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
        if is_dir && step < oldest_kept {
            if let Err(err) = std::fs::remove_dir_all(&path) {
                tracing::warn!("removing old checkpoint {}: {err}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> State {
        State {
            step,
            epoch: 1,
            consumed: 64,
            seed: 3,
            world: 4,
            sizes: vec![64, 32, 10],
        }
    }

    #[test]
    fn only_checkpoints_with_their_state_count_and_the_latest_two_are_kept() {
        let root = tempfile::tempdir().expect("tempdir");
        for step in [10, 20, 30] {
            let dir = step_dir(root.path(), step);
            std::fs::create_dir_all(&dir).expect("mkdir");
            write_state(&dir, &state(step)).expect("state");
        }
        // Half-written: shards but no state.
        std::fs::create_dir_all(step_dir(root.path(), 40)).expect("mkdir");
        std::fs::create_dir_all(root.path().join("step-x")).expect("mkdir");
        let (step, dir) = latest(root.path()).expect("latest");
        assert_eq!(step, 30);
        assert_eq!(read_state(&dir).expect("read"), state(30));
        prune(root.path());
        let left: Vec<u64> = complete(root.path()).iter().map(|c| c.0).collect();
        assert_eq!(left, vec![20, 30]);
        assert!(
            step_dir(root.path(), 40).exists(),
            "a newer partial one may be in progress"
        );
    }

    #[test]
    fn a_corrupt_state_is_an_error_naming_the_file() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = step_dir(root.path(), 1);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join(STATE), b"{\"step\": \"many\"}").expect("write");
        let err = read_state(&dir).expect_err("refused").to_string();
        assert!(
            err.contains("state.json") && err.contains("not a ferrun-train state"),
            "{err}"
        );
        let err = read_state(&root.path().join("nothing"))
            .expect_err("missing")
            .to_string();
        assert!(err.contains("incomplete"), "{err}");
    }
}
