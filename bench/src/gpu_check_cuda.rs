//! `gpu-check --device cuda`: the checks on ferrun's GPU communicator, buffers in device memory.

use anyhow::Context;
use ferrun_collective::comm::Options as CommOptions;
use ferrun_collective::gpu::{DeviceMemory, GpuCommunicator};
use ferrun_collective::reduce::ReduceOp;

use crate::gpu_check::{check_all, Case, Num, UnderTest};

impl UnderTest for GpuCommunicator {
    fn rank(&self) -> usize {
        GpuCommunicator::rank(self)
    }
    fn size(&self) -> usize {
        GpuCommunicator::size(self)
    }
    fn path(&self) -> String {
        format!(
            "GPU communicator: {} on {}",
            self.describe(),
            self.device().name()
        )
    }
    fn apply<E: Num>(&self, case: Case, input: Vec<E>, out_len: usize) -> anyhow::Result<Vec<E>> {
        let (r, n) = (GpuCommunicator::rank(self), GpuCommunicator::size(self));
        let device = self.device();
        let i = DeviceMemory::upload(device, &input)?;
        let o = DeviceMemory::upload(device, &vec![E::ZERO; out_len])?;
        let (ib, ob) = (i.buf(E::DTYPE), o.buf(E::DTYPE));
        match case {
            Case::AllReduce(op) => self.all_reduce(&ib, op)?,
            Case::Broadcast => self.broadcast(&ib, n - 1)?,
            Case::Reduce => self.reduce(&ib, ReduceOp::Sum, n - 1)?,
            Case::AllGather => self.all_gather(&ib, &ob)?,
            Case::ReduceScatter => self.reduce_scatter(&ib, &ob, ReduceOp::Sum)?,
            Case::AllToAll => self.all_to_all(&ib, &ob)?,
            Case::SendRecv => {
                // Even ranks send first, odd ones receive first: NCCL's send blocks until
                // its receive is posted.
                let sent = DeviceMemory::upload(device, &input)?;
                let (to, from) = ((r + 1) % n, (r + n - 1) % n);
                if r % 2 == 0 {
                    self.send(&sent.buf(E::DTYPE), to)?;
                    self.recv(&ib, from)?;
                } else {
                    self.recv(&ib, from)?;
                    self.send(&sent.buf(E::DTYPE), to)?;
                }
            }
            Case::Barrier => self.barrier()?,
        }
        Ok(if out_len > 0 {
            o.download()?
        } else {
            i.download()?
        })
    }
}

pub(crate) fn run(count: usize, json: Option<&std::path::Path>) -> anyhow::Result<()> {
    let comm = GpuCommunicator::from_env("gpu-check", CommOptions::default())
        .context(crate::collective::AS_WORKER)?;
    check_all(&comm, count, json)
}
