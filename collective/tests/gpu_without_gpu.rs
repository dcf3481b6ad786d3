//! The GPU layer on a machine without a GPU, with the real NCCL that torch's wheel ships
//! (`scripts/test.sh` points `FERRUN_VENV` at the venv): NCCL loads by its soname and makes
//! unique ids without a GPU, and the missing CUDA driver is an error that names it.
#![cfg(feature = "nccl")]

use ferrun_collective::gpu::{nccl_version, Device, GpuError, Nccl};

fn nccl() -> &'static Nccl {
    Nccl::get().unwrap_or_else(|e| {
        panic!("{e}\n(these tests need torch's NCCL: set FERRUN_VENV to the venv, as scripts/test.sh does)")
    })
}

#[test]
fn nccl_loads_from_the_pip_wheel_by_its_soname_and_reports_its_version() {
    let lib = nccl();
    assert!(
        lib.path.to_string_lossy().ends_with("libnccl.so.2"),
        "{}",
        lib.path.display()
    );
    let version = nccl_version().expect("version");
    assert!(version.starts_with("2."), "{version}");
    assert!(lib.version >= 21200, "{}", lib.version);
}

#[test]
fn unique_ids_are_made_without_a_gpu_and_differ() {
    let lib = nccl();
    let a = lib.unique_id().expect("ncclGetUniqueId");
    let b = lib.unique_id().expect("ncclGetUniqueId");
    assert_eq!(a.len(), 128);
    assert_ne!(a, b, "two unique ids must differ");
    assert!(a.iter().any(|&x| x != 0));
}

#[test]
fn without_a_cuda_driver_counting_gpus_is_an_error_that_names_the_driver() {
    if std::path::Path::new("/proc/driver/nvidia").exists() {
        // A GPU machine: the device check (bench/gpu-check.sh) covers it.
        assert!(Device::count().is_ok());
        return;
    }
    let err = Device::count().unwrap_err();
    assert!(matches!(err, GpuError::NoCuda), "{err}");
    assert!(err.to_string().contains("libcuda.so.1"), "{err}");
    let err = Device::open(0).unwrap_err();
    assert!(matches!(err, GpuError::NoCuda), "{err}");
}
