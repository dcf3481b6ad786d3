//! Which path a GPU communicator takes: NCCL when every rank has NCCL and a GPU of its own,
//! else GPU buffers staged through pinned host memory over the CPU transports (several ranks
//! sharing one GPU, which NCCL refuses; or hosts without NCCL). Every rank publishes what it
//! has and every rank decides from all of it, so they all take the same path.
//!
//! Pure; `FERRUN_GPU_PATH=nccl|staged|auto` forces a path.
//!
//! # Trust
//! Peers' records are parsed leniently: a malformed one counts as "no NCCL", which only ever
//! picks the slower, always-working path.

/// How a GPU communicator moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuPath {
    /// NCCL, device to device.
    Nccl,
    /// Copied to pinned host memory, moved by the CPU transports, copied back.
    Staged,
}

/// What one rank has, as published to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankGpu {
    /// The host (the same string on ranks that share a machine).
    pub host: String,
    /// The GPU's UUID.
    pub device: String,
    /// Whether this rank could load NCCL.
    pub nccl: bool,
}

impl RankGpu {
    /// The record the store carries.
    pub fn encode(&self) -> String {
        format!("{}\n{}\n{}", u8::from(self.nccl), self.device, self.host)
    }

    /// A record from the store.
    pub fn decode(text: &str) -> Self {
        let mut parts = text.splitn(3, '\n');
        let nccl = parts.next() == Some("1");
        let device = parts.next().unwrap_or_default().to_owned();
        let host = parts.next().unwrap_or_default().to_owned();
        Self {
            host,
            nccl: nccl && !device.is_empty(),
            device,
        }
    }
}

/// The path for ranks `ranks` (in rank order), and why, for the log.
///
/// # Errors
/// A forced path that cannot work, or an unknown `forced` value.
pub fn choose(forced: Option<&str>, ranks: &[RankGpu]) -> Result<(GpuPath, String), String> {
    let without_nccl = ranks.iter().position(|r| !r.nccl);
    let shared = ranks.iter().enumerate().find_map(|(i, a)| {
        ranks[i + 1..]
            .iter()
            .position(|b| b.host == a.host && b.device == a.device)
            .map(|j| (i, i + 1 + j))
    });
    let blocker = match (without_nccl, shared) {
        (Some(r), _) => Some(format!("rank {r} has no NCCL")),
        (None, Some((a, b))) => Some(format!(
            "ranks {a} and {b} share GPU {} (NCCL needs one GPU per rank)",
            ranks[a].device
        )),
        (None, None) => None,
    };
    match (forced.unwrap_or("auto"), blocker) {
        ("auto" | "", None) | ("nccl", None) => Ok((GpuPath::Nccl, "NCCL".to_owned())),
        ("auto" | "", Some(why)) => Ok((
            GpuPath::Staged,
            format!("staged through host memory: {why}"),
        )),
        ("staged", _) => Ok((
            GpuPath::Staged,
            "staged through host memory (FERRUN_GPU_PATH=staged)".to_owned(),
        )),
        ("nccl", Some(why)) => Err(format!(
            "FERRUN_GPU_PATH=nccl cannot work: {why}; unset it to stage through host memory"
        )),
        (other, _) => Err(format!(
            "FERRUN_GPU_PATH={other:?}: use nccl, staged or auto"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(host: &str, device: &str, nccl: bool) -> RankGpu {
        RankGpu {
            host: host.into(),
            device: device.into(),
            nccl,
        }
    }

    #[test]
    fn one_gpu_per_rank_with_nccl_everywhere_takes_nccl() {
        let ranks = [
            rank("a", "GPU-0", true),
            rank("a", "GPU-1", true),
            rank("b", "GPU-0", true),
        ];
        assert_eq!(choose(None, &ranks).map(|c| c.0), Ok(GpuPath::Nccl));
    }

    #[test]
    fn a_shared_gpu_or_a_rank_without_nccl_stages_and_says_why() {
        let shared = [rank("a", "GPU-0", true), rank("a", "GPU-0", true)];
        let (path, why) = choose(None, &shared).expect("choice");
        assert_eq!(path, GpuPath::Staged);
        assert!(why.contains("ranks 0 and 1 share GPU GPU-0"), "{why}");
        let missing = [rank("a", "GPU-0", true), rank("b", "GPU-0", false)];
        let (path, why) = choose(Some("auto"), &missing).expect("choice");
        assert_eq!(path, GpuPath::Staged);
        assert!(why.contains("rank 1 has no NCCL"), "{why}");
    }

    #[test]
    fn forced_paths_are_honoured_or_refused_with_the_fix() {
        let shared = [rank("a", "GPU-0", true), rank("a", "GPU-0", true)];
        let err = choose(Some("nccl"), &shared).unwrap_err();
        assert!(err.contains("unset it"), "{err}");
        let own = [rank("a", "GPU-0", true), rank("a", "GPU-1", true)];
        assert_eq!(
            choose(Some("staged"), &own).map(|c| c.0),
            Ok(GpuPath::Staged)
        );
        assert!(choose(Some("gloo"), &own)
            .unwrap_err()
            .contains("use nccl, staged or auto"));
    }

    #[test]
    fn records_round_trip_and_garbage_reads_as_no_nccl() {
        let r = rank("host|netns|uid 0", "GPU-5d1c", true);
        assert_eq!(RankGpu::decode(&r.encode()), r);
        assert!(!RankGpu::decode("").nccl);
        assert!(!RankGpu::decode("1").nccl);
        assert!(!RankGpu::decode("\u{0}\u{ffff}").nccl);
    }
}
