//! The staged path: a GPU buffer is copied to pinned host memory, moved by the CPU
//! [`Communicator`] (shared memory and TCP, with all of its guarantees and mismatch checks),
//! and copied back. For ranks that share a GPU (NCCL refuses them) and hosts without NCCL.
//!
//! # Trust
//! As the CPU communicator's: peers' bytes land only in the pinned buffer, sized here.

use std::sync::Arc;

use super::device::{elements_mut, Device, Pinned};
use super::{DeviceBuf, GpuError};
use crate::comm::Communicator;
use crate::reduce::{DType, ReduceOp};
use crate::transport::Auto;

/// Runs `$body` with `$E` the element type of `$dtype`.
macro_rules! typed {
    ($dtype:expr, $E:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $E = f32;
                $body
            }
            DType::F64 => {
                type $E = f64;
                $body
            }
            DType::F16 => {
                type $E = half::f16;
                $body
            }
            DType::Bf16 => {
                type $E = half::bf16;
                $body
            }
            DType::I32 => {
                type $E = i32;
                $body
            }
            DType::I64 => {
                type $E = i64;
                $body
            }
            DType::U8 => {
                type $E = u8;
                $body
            }
            DType::I8 => {
                type $E = i8;
                $body
            }
            DType::I16 => {
                type $E = i16;
                $body
            }
        }
    };
}

/// GPU buffers over the host communicator.
#[derive(Debug)]
pub(super) struct Staged {
    device: Arc<Device>,
    pinned: Pinned,
}

impl Staged {
    pub(super) fn new(device: &Arc<Device>) -> Self {
        Self {
            device: device.clone(),
            pinned: Pinned::new(device),
        }
    }

    pub(super) fn all_reduce(
        &mut self,
        host: &Communicator<Auto>,
        buf: &DeviceBuf,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        let staged = self.pinned.reserve(buf.bytes())?;
        self.device.to_host(staged, buf)?;
        typed!(buf.dtype(), E => host.all_reduce(elements_mut::<E>(staged), op))?;
        self.device.to_device(buf, staged)
    }

    pub(super) fn broadcast(
        &mut self,
        host: &Communicator<Auto>,
        buf: &DeviceBuf,
        root: usize,
    ) -> Result<(), GpuError> {
        let staged = self.pinned.reserve(buf.bytes())?;
        if host.rank() == root {
            self.device.to_host(staged, buf)?;
        }
        typed!(buf.dtype(), E => host.broadcast(elements_mut::<E>(staged), root))?;
        if host.rank() != root {
            self.device.to_device(buf, staged)?;
        }
        Ok(())
    }

    pub(super) fn reduce(
        &mut self,
        host: &Communicator<Auto>,
        buf: &DeviceBuf,
        op: ReduceOp,
        root: usize,
    ) -> Result<(), GpuError> {
        let staged = self.pinned.reserve(buf.bytes())?;
        self.device.to_host(staged, buf)?;
        typed!(buf.dtype(), E => host.reduce(elements_mut::<E>(staged), op, root))?;
        if host.rank() == root {
            self.device.to_device(buf, staged)?;
        }
        Ok(())
    }

    pub(super) fn all_gather(
        &mut self,
        host: &Communicator<Auto>,
        input: &DeviceBuf,
        output: &DeviceBuf,
    ) -> Result<(), GpuError> {
        let (r, m) = (host.rank(), input.bytes());
        let staged = self.pinned.reserve(output.bytes())?;
        self.device
            .to_host(&mut staged[r * m..(r + 1) * m], input)?;
        typed!(input.dtype(), E => host.all_gather_in_place(elements_mut::<E>(staged)))?;
        self.device.to_device(output, staged)
    }

    pub(super) fn reduce_scatter(
        &mut self,
        host: &Communicator<Auto>,
        input: &DeviceBuf,
        output: &DeviceBuf,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        let (r, m) = (host.rank(), output.bytes());
        let staged = self.pinned.reserve(input.bytes())?;
        self.device.to_host(staged, input)?;
        typed!(input.dtype(), E => host.reduce_scatter_in_place(elements_mut::<E>(staged), op))?;
        self.device.to_device(output, &staged[r * m..(r + 1) * m])
    }

    pub(super) fn all_to_all(
        &mut self,
        host: &Communicator<Auto>,
        input: &DeviceBuf,
        output: &DeviceBuf,
    ) -> Result<(), GpuError> {
        let n = input.bytes();
        let staged = self.pinned.reserve(2 * n)?;
        let (sent, received) = staged.split_at_mut(n);
        self.device.to_host(sent, input)?;
        typed!(input.dtype(), E => host.all_to_all(elements_mut::<E>(sent), elements_mut::<E>(received)))?;
        self.device.to_device(output, received)
    }

    pub(super) fn send(
        &mut self,
        host: &Communicator<Auto>,
        buf: &DeviceBuf,
        peer: usize,
        tag: u32,
    ) -> Result<(), GpuError> {
        let staged = self.pinned.reserve(buf.bytes())?;
        self.device.to_host(staged, buf)?;
        typed!(buf.dtype(), E => host.send(elements_mut::<E>(staged), peer, tag))?;
        Ok(())
    }

    pub(super) fn recv(
        &mut self,
        host: &Communicator<Auto>,
        buf: &DeviceBuf,
        peer: usize,
        tag: u32,
    ) -> Result<(), GpuError> {
        let staged = self.pinned.reserve(buf.bytes())?;
        typed!(buf.dtype(), E => host.recv(elements_mut::<E>(staged), peer, tag))?;
        self.device.to_device(buf, staged)
    }
}
