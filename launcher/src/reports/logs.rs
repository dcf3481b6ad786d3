//! Where worker output goes: `--redirects`, `--tee`, `--local-ranks-filter`, `--log-dir`.
//!
//! The layout on disk is torchrun's (`DefaultLogsSpecs`):
//! `<log_dir>/<run_id>_<random>/attempt_<n>/<local_rank>/{stdout.log,stderr.log,error.json}`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Which of a worker's streams a `--redirects`/`--tee` value selects (torchrun's `Std` bitmask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streams {
    /// stdout is selected.
    pub stdout: bool,
    /// stderr is selected.
    pub stderr: bool,
}

impl Streams {
    fn from_mask(mask: u8) -> Self {
        Self {
            stdout: mask & 1 != 0,
            stderr: mask & 2 != 0,
        }
    }
}

/// A `--redirects`/`--tee` value: one mask for all local ranks, or one per listed rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StdSpec {
    /// The same streams for every local rank.
    All(Streams),
    /// Per local rank; ranks not listed get nothing.
    PerRank(Vec<(u32, Streams)>),
}

/// A malformed `--redirects`, `--tee` or `--local-ranks-filter` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogSpecError {
    /// `--redirects`/`--tee` is neither a mask nor a per-rank list.
    #[error("{flag} {value:?} is not valid: use 0 (none), 1 (stdout), 2 (stderr), 3 (both), or per local rank like 0:1,1:3")]
    Std {
        /// The flag.
        flag: &'static str,
        /// The value given.
        value: String,
    },
    /// `--local-ranks-filter` is not a list of integers.
    #[error("--local-ranks-filter {0:?} is not valid: use a comma-separated list of local ranks, e.g. 0,2")]
    Filter(String),
}

impl StdSpec {
    /// Parses `0`..`3` or `rank:mask,rank:mask`; `flag` names the option in errors.
    ///
    /// # Errors
    /// [`LogSpecError::Std`] for anything else.
    pub fn parse(flag: &'static str, value: &str) -> Result<Self, LogSpecError> {
        let bad = || LogSpecError::Std {
            flag,
            value: value.to_owned(),
        };
        let mask = |s: &str| match s.trim() {
            "0" => Ok(0),
            "1" => Ok(1),
            "2" => Ok(2),
            "3" => Ok(3),
            _ => Err(bad()),
        };
        let value_t = value.trim();
        if value_t.is_empty() {
            return Ok(Self::All(Streams::default()));
        }
        if !value_t.contains(':') {
            return Ok(Self::All(Streams::from_mask(mask(value_t)?)));
        }
        let mut per_rank = Vec::new();
        for item in value_t.split(',') {
            let (rank, m) = item.split_once(':').ok_or_else(bad)?;
            let rank = rank.trim().parse().map_err(|_| bad())?;
            per_rank.push((rank, Streams::from_mask(mask(m)?)));
        }
        Ok(Self::PerRank(per_rank))
    }

    /// The streams selected for `local_rank`.
    pub fn for_rank(&self, local_rank: u32) -> Streams {
        match self {
            Self::All(s) => *s,
            Self::PerRank(list) => list
                .iter()
                .find(|(r, _)| *r == local_rank)
                .map(|(_, s)| *s)
                .unwrap_or_default(),
        }
    }
}

/// Parses `--local-ranks-filter`: `None` shows every rank.
///
/// # Errors
/// [`LogSpecError::Filter`] when an item is not an integer.
pub fn parse_ranks_filter(value: &str) -> Result<Option<BTreeSet<u32>>, LogSpecError> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    value
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .map_err(|_| LogSpecError::Filter(value.to_owned()))
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// The run's log directory, laid out as torchrun lays it out.
#[derive(Debug, Clone)]
pub struct LogLayout {
    run_dir: PathBuf,
}

impl LogLayout {
    /// Creates `<base>/<run_id>_<random>/`; `base` defaults to a fresh `torchelastic_*` temp dir.
    ///
    /// # Errors
    /// The directory cannot be created (the error names it).
    pub fn create(base: Option<&Path>, run_id: &str) -> std::io::Result<Self> {
        let base = match base {
            Some(b) => {
                std::fs::create_dir_all(b).map_err(|e| with_path(e, b))?;
                b.to_path_buf()
            }
            None => tempfile::Builder::new()
                .prefix("torchelastic_")
                .tempdir()?
                .keep(),
        };
        let run_dir = tempfile::Builder::new()
            .prefix(&format!("{run_id}_"))
            .tempdir_in(&base)
            .map_err(|e| with_path(e, &base))?
            .keep();
        Ok(Self { run_dir })
    }

    /// `<log_dir>/<run_id>_<random>`.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Creates a fresh `attempt_<n>/<local_rank>/` for every local rank (removing an old one).
    ///
    /// # Errors
    /// A directory cannot be removed or created.
    pub fn prepare_attempt(&self, attempt: u32, local_world_size: u32) -> std::io::Result<PathBuf> {
        let dir = self.run_dir.join(format!("attempt_{attempt}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| with_path(e, &dir))?;
        }
        for local_rank in 0..local_world_size {
            let rank_dir = dir.join(local_rank.to_string());
            std::fs::create_dir_all(&rank_dir).map_err(|e| with_path(e, &rank_dir))?;
        }
        Ok(dir)
    }
}

/// The files of one worker within an attempt directory.
pub fn worker_files(attempt_dir: &Path, local_rank: u32) -> [PathBuf; 3] {
    let dir = attempt_dir.join(local_rank.to_string());
    [
        dir.join("stdout.log"),
        dir.join("stderr.log"),
        dir.join("error.json"),
    ]
}

fn with_path(e: std::io::Error, path: &Path) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_masks_and_per_rank_lists() {
        let all = StdSpec::parse("--tee", "3").expect("3");
        assert_eq!(
            all.for_rank(7),
            Streams {
                stdout: true,
                stderr: true
            }
        );
        let per = StdSpec::parse("--redirects", "0:1,1:2").expect("list");
        assert_eq!(
            per.for_rank(0),
            Streams {
                stdout: true,
                stderr: false
            }
        );
        assert_eq!(
            per.for_rank(1),
            Streams {
                stdout: false,
                stderr: true
            }
        );
        assert_eq!(per.for_rank(2), Streams::default());
        // Unlike torchrun's regex, local ranks above 9 work.
        assert!(
            StdSpec::parse("-t", "12:3")
                .expect("12")
                .for_rank(12)
                .stdout
        );
    }

    #[test]
    fn rejects_malformed_specs_naming_the_flag() {
        for bad in ["4", "x", "0:4", "a:1", "0:1,", "1;2"] {
            let err = StdSpec::parse("--redirects", bad).unwrap_err().to_string();
            assert!(err.starts_with("--redirects"), "{bad}: {err}");
        }
        assert!(parse_ranks_filter("0,x").is_err());
        assert_eq!(parse_ranks_filter("0, 2").expect("ok"), Some([0, 2].into()));
        assert_eq!(parse_ranks_filter("").expect("ok"), None);
    }

    #[test]
    fn lays_out_attempts_like_torchrun() {
        let base = tempfile::tempdir().expect("tempdir");
        let layout = LogLayout::create(Some(base.path()), "job").expect("layout");
        let name = layout
            .run_dir()
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with("job_"), "{name}");
        let attempt = layout.prepare_attempt(1, 2).expect("attempt");
        assert_eq!(attempt, layout.run_dir().join("attempt_1"));
        let [out, err, error] = worker_files(&attempt, 1);
        assert!(out.parent().expect("dir").is_dir());
        assert_eq!(error.file_name().expect("f"), "error.json");
        assert_eq!(err.file_name().expect("f"), "stderr.log");
    }
}
