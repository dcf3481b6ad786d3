//! What the launcher tells GPU workers, decided once and printed once at start, so that users
//! see every variable ferrun injected and every NCCL variable of theirs it passed through:
//!
//! - `CUDA_VISIBLE_DEVICES` per local rank with `--virtual-local-rank` (alias `--pin-gpus`):
//!   each rank sees only its GPU, taken from the launcher's own `CUDA_VISIBLE_DEVICES` list
//!   when it has one, and ranks beyond the GPUs share them round-robin (ferrun's GPU
//!   collectives then stage through host memory, as NCCL refuses a shared GPU);
//! - `TORCH_NCCL_ASYNC_ERROR_HANDLING` (inherited, or 1), `NCCL_SOCKET_IFNAME` (the interface
//!   that reaches the master, unless set), and every other `NCCL_*` of the launcher's (passed
//!   through untouched, as the workers inherit the launcher's environment).
//!
//! Pure: the launcher hands in its environment and the GPU count.

/// The GPU local rank `local_rank` sees when pinned: entry `local_rank` (round-robin) of the
/// launcher's `CUDA_VISIBLE_DEVICES` (up to its first invalid entry, as CUDA reads it), else
/// of the `gpus` the machine has.
pub fn pinned_device(local_rank: u32, launcher_visible: Option<&str>, gpus: u32) -> String {
    let listed: Vec<&str> = launcher_visible
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .take_while(|d| !d.is_empty() && !d.starts_with('-'))
                .collect()
        })
        .unwrap_or_default();
    if listed.is_empty() {
        (local_rank % gpus.max(1)).to_string()
    } else {
        listed[local_rank as usize % listed.len()].to_owned()
    }
}

/// What the report is made from.
#[derive(Debug, Clone)]
pub struct GpuSetup<'a> {
    /// GPUs found, and where (see [`super::nproc::Devices`]).
    pub gpus: u32,
    /// Where the count came from.
    pub gpu_source: &'a str,
    /// Workers on this node.
    pub local_world_size: u32,
    /// `--virtual-local-rank` / `--pin-gpus`.
    pub pinned: bool,
    /// `TORCH_NCCL_ASYNC_ERROR_HANDLING` as the workers get it.
    pub async_error_handling: &'a str,
}

/// The lines to print at start (none on a machine without GPUs where the user set no NCCL
/// variable and asked for no pinning: a CPU job hears nothing about GPUs).
pub fn report(setup: &GpuSetup<'_>, env: &[(String, String)]) -> Vec<String> {
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let nccl: Vec<&(String, String)> = env.iter().filter(|(k, _)| k.starts_with("NCCL_")).collect();
    if setup.gpus == 0 && nccl.is_empty() && !setup.pinned {
        return Vec::new();
    }
    let mut lines = vec![format!("GPUs: {} ({})", setup.gpus, setup.gpu_source)];
    let visible = var("CUDA_VISIBLE_DEVICES");
    if setup.pinned {
        let ranks: Vec<String> = (0..setup.local_world_size)
            .map(|r| format!("{r}→{}", pinned_device(r, visible, setup.gpus)))
            .collect();
        lines.push(format!(
            "CUDA_VISIBLE_DEVICES per local rank (set by ferrun, --pin-gpus; LOCAL_RANK=0 in each): {}",
            ranks.join(" ")
        ));
        if setup.gpus > 0 && setup.local_world_size > setup.gpus {
            lines.push(format!(
                "{} ranks share {} GPUs: ferrun's GPU collectives stage through host memory (NCCL needs one GPU per rank)",
                setup.local_world_size, setup.gpus
            ));
        }
    } else {
        lines.push(match visible {
            Some(v) => format!("CUDA_VISIBLE_DEVICES={v} (yours, for every rank; --pin-gpus gives each rank its own)"),
            None => "every rank sees every GPU (--pin-gpus gives each rank its own)".to_owned(),
        });
    }
    let handling = if var("TORCH_NCCL_ASYNC_ERROR_HANDLING").is_some() {
        "yours"
    } else {
        "set by ferrun"
    };
    lines.push(format!(
        "TORCH_NCCL_ASYNC_ERROR_HANDLING={} ({handling})",
        setup.async_error_handling
    ));
    if var("NCCL_SOCKET_IFNAME").is_none() {
        lines.push(
            "NCCL_SOCKET_IFNAME: set by ferrun to the interface that reaches the master, once known"
                .to_owned(),
        );
    }
    for (k, v) in nccl {
        lines.push(format!("{k}={v} (yours, passed through)"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn setup(gpus: u32, ranks: u32, pinned: bool) -> GpuSetup<'static> {
        GpuSetup {
            gpus,
            gpu_source: "/proc/driver/nvidia/gpus",
            local_world_size: ranks,
            pinned,
            async_error_handling: "1",
        }
    }

    #[test]
    fn pinned_ranks_take_the_launchers_list_or_the_machines_gpus_round_robin() {
        assert_eq!(pinned_device(1, Some("4,5,6,7"), 8), "5");
        assert_eq!(pinned_device(5, Some("4,5"), 8), "5");
        assert_eq!(pinned_device(2, Some("GPU-aa,GPU-bb"), 8), "GPU-aa");
        assert_eq!(pinned_device(3, None, 8), "3");
        assert_eq!(pinned_device(9, None, 8), "1");
        assert_eq!(pinned_device(2, None, 0), "0");
        // CUDA stops at the first invalid entry; an empty list means the machine's GPUs.
        assert_eq!(pinned_device(1, Some("3,-1,2"), 8), "3");
        assert_eq!(pinned_device(1, Some(""), 2), "1");
    }

    #[test]
    fn a_cpu_job_hears_nothing_about_gpus() {
        assert!(report(&setup(0, 4, false), &env(&[("PATH", "/bin")])).is_empty());
    }

    #[test]
    fn a_gpu_job_sees_what_was_injected_and_what_passed_through() {
        let lines = report(
            &setup(2, 4, true),
            &env(&[("NCCL_DEBUG", "INFO"), ("CUDA_VISIBLE_DEVICES", "6,7")]),
        );
        let all = lines.join("\n");
        assert!(all.contains("GPUs: 2"), "{all}");
        assert!(all.contains("0→6 1→7 2→6 3→7"), "{all}");
        assert!(all.contains("4 ranks share 2 GPUs"), "{all}");
        assert!(
            all.contains("TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set by ferrun)"),
            "{all}"
        );
        assert!(all.contains("NCCL_SOCKET_IFNAME: set by ferrun"), "{all}");
        assert!(
            all.contains("NCCL_DEBUG=INFO (yours, passed through)"),
            "{all}"
        );

        let lines = report(
            &setup(8, 8, false),
            &env(&[
                ("NCCL_SOCKET_IFNAME", "ib0"),
                ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3"),
            ]),
        )
        .join("\n");
        assert!(lines.contains("every rank sees every GPU"), "{lines}");
        assert!(!lines.contains("set by ferrun to the interface"), "{lines}");
        assert!(
            lines.contains("NCCL_SOCKET_IFNAME=ib0 (yours, passed through)"),
            "{lines}"
        );
    }
}
