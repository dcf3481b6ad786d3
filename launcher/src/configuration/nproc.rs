//! `--nproc-per-node`: an integer, `cpu`, `gpu` or `auto`.
//!
//! GPUs are counted without linking CUDA: the NVIDIA driver lists one directory per GPU under
//! `/proc/driver/nvidia/gpus`, and `nvidia-smi -L` prints one `GPU n: …` line per GPU. A set
//! `CUDA_VISIBLE_DEVICES` narrows the count, as it does for `torch.cuda.device_count()`.

use std::path::Path;
use std::process::Command;

/// Why `--nproc-per-node` could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NprocError {
    /// The value is none of the accepted forms.
    #[error("--nproc-per-node {0:?} is not valid: use a positive integer, cpu, gpu or auto")]
    Invalid(String),
    /// `gpu` was asked for on a machine without visible GPUs.
    #[error("--nproc-per-node gpu: no GPU found ({0}); use an integer or cpu to run on CPUs")]
    NoGpus(String),
}

/// What was found about this machine's accelerators and CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    /// Visible GPUs.
    pub gpus: u32,
    /// Where the GPU count came from, or where it was looked for.
    pub gpu_source: String,
    /// CPUs this process may run on (affinity and cgroup quota respected).
    pub cpus: u32,
}

impl Devices {
    /// Probes this machine.
    pub fn probe() -> Self {
        let (gpus, gpu_source) = count_gpus(
            Path::new("/proc/driver/nvidia/gpus"),
            nvidia_smi_list,
            std::env::var("CUDA_VISIBLE_DEVICES").ok().as_deref(),
        );
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        Self {
            gpus,
            gpu_source,
            cpus,
        }
    }
}

/// Resolves a `--nproc-per-node` value; `devices` is only probed for cpu/gpu/auto.
///
/// # Errors
/// [`NprocError::Invalid`] for a value that is none of the forms, [`NprocError::NoGpus`] for
/// `gpu` without GPUs.
pub fn resolve(
    value: &str,
    devices: impl FnOnce() -> Devices,
) -> Result<(u32, String), NprocError> {
    match value.trim() {
        "cpu" => {
            let d = devices();
            Ok((d.cpus, format!("cpu: {} CPUs available", d.cpus)))
        }
        "gpu" => {
            let d = devices();
            if d.gpus == 0 {
                return Err(NprocError::NoGpus(d.gpu_source));
            }
            Ok((d.gpus, format!("gpu: {} GPUs ({})", d.gpus, d.gpu_source)))
        }
        "auto" => {
            let d = devices();
            if d.gpus > 0 {
                Ok((d.gpus, format!("auto: {} GPUs ({})", d.gpus, d.gpu_source)))
            } else {
                Ok((
                    d.cpus,
                    format!(
                        "auto: no GPU ({}), so one worker per CPU: {}",
                        d.gpu_source, d.cpus
                    ),
                ))
            }
        }
        n => match n.parse::<u32>() {
            Ok(n) if n > 0 => Ok((n, format!("{n}"))),
            _ => Err(NprocError::Invalid(value.to_owned())),
        },
    }
}

fn nvidia_smi_list() -> Option<String> {
    let out = Command::new("nvidia-smi").arg("-L").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn count_gpus(
    proc_dir: &Path,
    smi: impl FnOnce() -> Option<String>,
    cuda_visible: Option<&str>,
) -> (u32, String) {
    let (physical, source) = match std::fs::read_dir(proc_dir) {
        Ok(entries) => (entries.count() as u32, proc_dir.display().to_string()),
        Err(_) => match smi() {
            Some(list) => (
                list.lines()
                    .filter(|l| l.trim_start().starts_with("GPU "))
                    .count() as u32,
                "nvidia-smi -L".to_owned(),
            ),
            None => (
                0,
                format!("checked {} and nvidia-smi -L", proc_dir.display()),
            ),
        },
    };
    match cuda_visible {
        Some(visible) if physical > 0 => {
            // CUDA stops at the first invalid entry; "" and "-1" hide every GPU.
            let listed = visible
                .split(',')
                .map(str::trim)
                .take_while(|d| !d.is_empty() && !d.starts_with('-'))
                .count() as u32;
            (
                listed.min(physical),
                format!("{source}, narrowed by CUDA_VISIBLE_DEVICES={visible:?}"),
            )
        }
        _ => (physical, source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(gpus: u32) -> impl FnOnce() -> Devices {
        move || Devices {
            gpus,
            gpu_source: "test".into(),
            cpus: 6,
        }
    }

    #[test]
    fn integers_cpu_gpu_auto() {
        assert_eq!(resolve("4", devices(0)).map(|r| r.0), Ok(4));
        assert_eq!(resolve("cpu", devices(2)).map(|r| r.0), Ok(6));
        assert_eq!(resolve("gpu", devices(8)).map(|r| r.0), Ok(8));
        assert_eq!(resolve("auto", devices(8)).map(|r| r.0), Ok(8));
        assert_eq!(resolve("auto", devices(0)).map(|r| r.0), Ok(6));
    }

    #[test]
    fn rejects_zero_garbage_and_missing_gpus() {
        assert_eq!(
            resolve("0", devices(0)),
            Err(NprocError::Invalid("0".into()))
        );
        assert_eq!(
            resolve("four", devices(0)),
            Err(NprocError::Invalid("four".into()))
        );
        let err = resolve("gpu", devices(0)).unwrap_err();
        assert!(err.to_string().contains("no GPU found"), "{err}");
    }

    #[test]
    fn counts_gpus_from_proc_then_nvidia_smi_then_cuda_visible_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..4 {
            std::fs::create_dir(dir.path().join(format!("0000:0{i}:00.0"))).expect("mkdir");
        }
        assert_eq!(count_gpus(dir.path(), || None, None).0, 4);
        assert_eq!(count_gpus(dir.path(), || None, Some("2,3")).0, 2);
        assert_eq!(count_gpus(dir.path(), || None, Some("")).0, 0);
        assert_eq!(count_gpus(dir.path(), || None, Some("0,-1,2")).0, 1);
        let missing = dir.path().join("absent");
        let smi = || {
            Some("GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n".to_owned())
        };
        assert_eq!(
            count_gpus(&missing, smi, None),
            (2, "nvidia-smi -L".to_owned())
        );
        assert_eq!(count_gpus(&missing, || None, None).0, 0);
    }
}
