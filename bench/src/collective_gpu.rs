//! `ferrun-bench collective --device cuda`: the same sweep on GPU buffers, through ferrun's GPU
//! communicator — NCCL with `--backend nccl` (forced: a benchmark that silently staged would
//! lie), staged through pinned host memory with `--backend ferrun`. On a machine without a GPU
//! it fails with the communicator's error, which names what is missing.

use std::sync::Arc;

use anyhow::Context;
use ferrun_collective::comm::Options as CommOptions;
use ferrun_collective::gpu::{device_ordinal, Device, DeviceMemory, GpuCommunicator};
use ferrun_collective::reduce::{DType, ReduceOp};
use ferrun_collective::WorkerEnv;

use crate::collective::{
    buffer_counts, sweep, Backend, Case, Collective, Options, Ranks, AS_WORKER,
};

impl Ranks for GpuCommunicator {
    fn rank(&self) -> usize {
        GpuCommunicator::rank(self)
    }
    fn size(&self) -> usize {
        GpuCommunicator::size(self)
    }
    fn barrier(&self) -> anyhow::Result<()> {
        Ok(GpuCommunicator::barrier(self)?)
    }
    fn reduce_f64(&self, x: f64, op: ReduceOp) -> anyhow::Result<f64> {
        let value = DeviceMemory::upload(self.device(), &[x])?;
        self.all_reduce(&value.buf(DType::F64), op)?;
        Ok(value.download::<f64>()?[0])
    }
}

/// Device buffers for one collective at one size.
struct GpuCase {
    op: Collective,
    device: Arc<Device>,
    input: DeviceMemory,
    output: DeviceMemory,
    counts: (usize, usize),
}

impl GpuCase {
    fn new(op: Collective, device: &Arc<Device>, size: usize, n: usize) -> anyhow::Result<Self> {
        let counts = buffer_counts(op, size, n);
        Ok(Self {
            op,
            device: device.clone(),
            input: DeviceMemory::alloc(device, counts.0 * 4)?,
            output: DeviceMemory::alloc(device, counts.1 * 4)?,
            counts,
        })
    }
}

impl Case<GpuCommunicator> for GpuCase {
    fn count(&self) -> usize {
        self.counts.0.max(self.counts.1)
    }

    fn run(&mut self, c: &GpuCommunicator) -> anyhow::Result<()> {
        let (i, o) = (self.input.buf(DType::F32), self.output.buf(DType::F32));
        match self.op {
            Collective::AllReduce => c.all_reduce(&i, ReduceOp::Sum)?,
            Collective::Broadcast => c.broadcast(&i, 0)?,
            Collective::Reduce => c.reduce(&i, ReduceOp::Sum, 0)?,
            Collective::AllGather => c.all_gather(&i, &o)?,
            Collective::ReduceScatter => c.reduce_scatter(&i, &o, ReduceOp::Sum)?,
            Collective::AllToAll => c.all_to_all(&i, &o)?,
        }
        Ok(())
    }

    fn outcome(&mut self, c: &GpuCommunicator) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let r = c.rank();
        self.input = DeviceMemory::upload(&self.device, &vec![(r + 1) as f32; self.counts.0])?;
        self.output = DeviceMemory::upload(&self.device, &vec![-1.0f32; self.counts.1])?;
        self.run(c)?;
        Ok((self.input.download()?, self.output.download()?))
    }
}

pub(crate) fn run(o: &Options, backend: Backend) -> anyhow::Result<()> {
    let env = WorkerEnv::from_env().context(AS_WORKER)?;
    let forced = match backend {
        Backend::Nccl => "nccl",
        Backend::Ferrun => "staged",
    };
    let ordinal = device_ordinal(env.local_rank as usize, Device::count()?)?;
    let comm = GpuCommunicator::from_contract(
        &env,
        "bench",
        CommOptions::default(),
        ordinal,
        Some(forced),
    )
    .with_context(|| format!("--backend {forced:?} --device cuda"))?;
    let device = comm.device().clone();
    let transport = format!("{} on {}", comm.describe(), device.name());
    sweep(o, &comm, &transport, |size, n| {
        GpuCase::new(o.op, &device, size, n)
    })
}
