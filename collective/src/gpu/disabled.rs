//! A build without the `nccl` feature: every way in says so.

use super::GpuError;
use crate::comm::Options;

/// A GPU communicator; this build cannot make one.
#[derive(Debug)]
pub struct GpuCommunicator {
    never: std::convert::Infallible,
}

impl GpuCommunicator {
    /// Always [`GpuError::NotBuilt`].
    ///
    /// # Errors
    /// Always.
    pub fn from_env(_name: &str, _options: Options) -> Result<Self, GpuError> {
        Err(GpuError::NotBuilt)
    }

    /// This rank (never called: no value exists).
    pub fn rank(&self) -> usize {
        match self.never {}
    }
}

/// A CUDA device; this build cannot open one.
#[derive(Debug)]
pub struct Device {
    never: std::convert::Infallible,
}

impl Device {
    /// Always [`GpuError::NotBuilt`].
    ///
    /// # Errors
    /// Always.
    pub fn count() -> Result<usize, GpuError> {
        Err(GpuError::NotBuilt)
    }

    /// The ordinal (never called: no value exists).
    pub fn ordinal(&self) -> usize {
        match self.never {}
    }
}

/// Device memory; this build cannot allocate any.
#[derive(Debug)]
pub struct DeviceMemory {
    never: std::convert::Infallible,
}

impl DeviceMemory {
    /// Bytes (never called: no value exists).
    pub fn bytes(&self) -> usize {
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_feature_a_gpu_communicator_names_the_rebuild() {
        let err = GpuCommunicator::from_env("x", Options::default()).unwrap_err();
        assert!(err.to_string().contains("--features nccl"), "{err}");
        assert!(matches!(Device::count(), Err(GpuError::NotBuilt)));
    }
}
