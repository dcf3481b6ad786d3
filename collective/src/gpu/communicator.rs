//! [`GpuCommunicator`]: the collectives of [`Communicator`] on GPU buffers, over NCCL or staged
//! through host memory (see [`super::placement`]), bootstrapped from the worker environment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::device::{Device, DeviceMemory};
use super::library::Nccl;
use super::nccl::NcclComm;
use super::placement::{self, GpuPath, RankGpu};
use super::staged::Staged;
use super::{check_lengths, device_ordinal, fingerprint, unique_id, DeviceBuf, GpuError};
use crate::comm::{Call, Communicator, Kind, Options};
use crate::env::WorkerEnv;
use crate::reduce::{DType, ReduceOp};
use crate::store::{KeyValue, StoreClient};
use crate::transport::Auto;

/// A group of ranks running collectives on GPU buffers, one GPU per rank (or several ranks on
/// one GPU, staged). Calls return when the result is in the output buffer.
///
/// Buffers must be complete when a call is made: work queued on the legacy default stream
/// (torch's default) is waited for; work on other streams is the caller's to synchronize.
#[derive(Debug)]
pub struct GpuCommunicator {
    device: Arc<Device>,
    /// The CPU communicator: fingerprints on the NCCL path, the data on the staged one.
    host: Communicator<Auto>,
    path: Path,
    /// Taken for a whole op, so that fingerprints and NCCL ops keep one order per rank.
    order: Mutex<Staged>,
    /// Fingerprint every NCCL op (`FERRUN_GPU_CHECK=0` turns it off).
    check: bool,
    sequence: AtomicU64,
    why: String,
}

#[derive(Debug)]
enum Path {
    Nccl {
        comm: NcclComm,
        /// One element for barriers.
        scratch: DeviceMemory,
    },
    Staged,
}

impl GpuCommunicator {
    /// A communicator of every worker of the job, named `name`, from the environment `ferrun`
    /// (or torchrun) gives each worker. The GPU is `FERRUN_CUDA_DEVICE`, else the local rank
    /// modulo the GPUs visible.
    ///
    /// # Errors
    /// [`GpuError`] naming what is missing (driver, GPU, NCCL) or the peer that failed.
    pub fn from_env(name: &str, options: Options) -> Result<Self, GpuError> {
        let env = WorkerEnv::from_env().map_err(crate::comm::InitError::from)?;
        let ordinal = device_ordinal(env.local_rank as usize, Device::count()?)?;
        let forced = std::env::var("FERRUN_GPU_PATH").ok();
        Self::from_contract(&env, name, options, ordinal, forced.as_deref())
    }

    /// As [`GpuCommunicator::from_env`], from an explicit contract and device, and `forced`
    /// for `FERRUN_GPU_PATH` (`nccl`, `staged` or `auto`).
    ///
    /// # Errors
    /// As [`GpuCommunicator::from_env`].
    pub fn from_contract(
        env: &WorkerEnv,
        name: &str,
        options: Options,
        ordinal: usize,
        forced: Option<&str>,
    ) -> Result<Self, GpuError> {
        let host = Communicator::from_contract(env, &format!("{name}/gpu"), options)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(crate::comm::InitError::Runtime)?;
        let deadline = options.deadline.min(Duration::from_secs(600));
        runtime.block_on(async {
            let mut store = StoreClient::connect(&env.master_addr, env.master_port, deadline)
                .await?
                .prefixed(&format!("ferrun/gpu/{name}/attempt_{}", env.restart_count));
            Self::join(&mut store, host, ordinal, forced, deadline).await
        })
    }

    /// Joins the GPU communicator of `host`'s ranks through `store` (any store every rank
    /// shares, under a prefix of this communicator's own): `host` carries fingerprints, or the
    /// data when staged. NCCL's init is bounded by `deadline`.
    ///
    /// # Errors
    /// As [`GpuCommunicator::from_env`].
    pub async fn join(
        store: &mut impl KeyValue,
        host: Communicator<Auto>,
        ordinal: usize,
        forced: Option<&str>,
        deadline: Duration,
    ) -> Result<Self, GpuError> {
        let device = Device::open(ordinal)?;
        let nccl = Nccl::get();
        let (rank, size) = (host.rank(), host.size());
        let ours = RankGpu {
            host: crate::comm::host_identity(),
            device: device.uuid().to_owned(),
            nccl: nccl.is_ok(),
        };
        let keys: Vec<String> = (0..size).map(|r| format!("placement/{r}")).collect();
        store.set(&keys[rank], ours.encode().as_bytes()).await?;
        let ranks: Vec<RankGpu> = store
            .get_all(&keys)
            .await?
            .iter()
            .map(|v| RankGpu::decode(&String::from_utf8_lossy(v)))
            .collect();
        let (chosen, why) = placement::choose(forced, &ranks).map_err(GpuError::Placement)?;
        let path = match chosen {
            GpuPath::Staged => Path::Staged,
            GpuPath::Nccl => {
                // Loaded once: the same library, or the same error.
                let lib = Nccl::get()?;
                let id = unique_id::exchange(store, rank, || lib.unique_id()).await?;
                let comm = NcclComm::init(lib, device.clone(), id, rank, size, deadline)?;
                let scratch = DeviceMemory::upload(&device, &[0f32])?;
                Path::Nccl { comm, scratch }
            }
        };
        let why = match (&path, &nccl) {
            (Path::Nccl { .. }, Ok(lib)) => format!("{why} {lib:?}"),
            _ => why,
        };
        if rank == 0 {
            tracing::info!(
                "GPU collectives: {why}; rank 0 on {} ({})",
                device.name(),
                device.uuid()
            );
        }
        Ok(Self {
            order: Mutex::new(Staged::new(&device)),
            device,
            host,
            path,
            check: std::env::var("FERRUN_GPU_CHECK").map_or(true, |v| v != "0"),
            sequence: AtomicU64::new(0),
            why,
        })
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.host.rank()
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.host.size()
    }

    /// This rank's GPU.
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// How data moves.
    pub fn path(&self) -> GpuPath {
        match self.path {
            Path::Nccl { .. } => GpuPath::Nccl,
            Path::Staged => GpuPath::Staged,
        }
    }

    /// Why this path, and which NCCL, for logs and reports.
    pub fn describe(&self) -> &str {
        &self.why
    }

    /// Takes the op order; on the NCCL path, checks first that every rank calls `call`.
    fn begin(&self, op: &'static str, call: Call) -> Result<MutexGuard<'_, Staged>, GpuError> {
        let guard = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.check && matches!(self.path, Path::Nccl { .. }) && self.size() > 1 {
            let seq = self.sequence.fetch_add(1, Ordering::Relaxed);
            let ours = fingerprint::encode(seq, &call);
            let mut all = vec![0u8; fingerprint::BYTES * self.size()];
            self.host.all_gather(&ours, &mut all)?;
            if let Some(what) = fingerprint::disagreement(&all, self.rank()) {
                return Err(GpuError::Mismatch {
                    op,
                    rank: self.rank(),
                    what,
                });
            }
        }
        Ok(guard)
    }

    fn call(
        kind: Kind,
        dtype: DType,
        count: usize,
        reduce: Option<ReduceOp>,
        root: Option<usize>,
    ) -> Call {
        Call {
            kind,
            dtype: Some(dtype),
            reduce,
            root: root.map(|r| r as u32),
            count: count as u64,
        }
    }

    fn check_rank(
        &self,
        op: &'static str,
        what: &str,
        r: usize,
        not_self: bool,
    ) -> Result<(), GpuError> {
        if r < self.size() && !(not_self && r == self.rank()) {
            return Ok(());
        }
        Err(GpuError::Invalid {
            op,
            what: format!(
                "{what} {r} must be {}a rank of this {}-rank communicator",
                if not_self { "another " } else { "" },
                self.size()
            ),
        })
    }

    /// Reduces `buf` across all ranks, in place; every rank gets the result.
    ///
    /// # Errors
    /// [`GpuError`] naming the failure; after an NCCL failure or timeout the communicator is
    /// aborted and every later call says so.
    pub fn all_reduce(&self, buf: &DeviceBuf, op: ReduceOp) -> Result<(), GpuError> {
        let call = Self::call(Kind::AllReduce, buf.dtype(), buf.count(), Some(op), None);
        let mut staged = self.begin("all_reduce", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.all_reduce(buf, op),
            Path::Staged => staged.all_reduce(&self.host, buf, op),
        }
    }

    /// Copies `root`'s `buf` to every rank.
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_reduce`], and [`GpuError::Invalid`] for a root out of range.
    pub fn broadcast(&self, buf: &DeviceBuf, root: usize) -> Result<(), GpuError> {
        self.check_rank("broadcast", "root", root, false)?;
        let call = Self::call(Kind::Broadcast, buf.dtype(), buf.count(), None, Some(root));
        let mut staged = self.begin("broadcast", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.broadcast(buf, root),
            Path::Staged => staged.broadcast(&self.host, buf, root),
        }
    }

    /// Reduces every rank's `buf` into `root`'s; the others' are left as they were on the
    /// staged path, and unspecified on NCCL's (as NCCL's in-place reduce).
    ///
    /// # Errors
    /// As [`GpuCommunicator::broadcast`].
    pub fn reduce(&self, buf: &DeviceBuf, op: ReduceOp, root: usize) -> Result<(), GpuError> {
        self.check_rank("reduce", "root", root, false)?;
        let call = Self::call(Kind::Reduce, buf.dtype(), buf.count(), Some(op), Some(root));
        let mut staged = self.begin("reduce", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.reduce(buf, op, root),
            Path::Staged => staged.reduce(&self.host, buf, op, root),
        }
    }

    /// Gathers every rank's `input` into `output` (rank order); `output` is `size × input`.
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_reduce`], and [`GpuError::Invalid`] for mismatched lengths.
    pub fn all_gather(&self, input: &DeviceBuf, output: &DeviceBuf) -> Result<(), GpuError> {
        check_lengths("all_gather", input, output, self.size(), true)?;
        let call = Self::call(Kind::AllGather, input.dtype(), input.count(), None, None);
        let mut staged = self.begin("all_gather", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.all_gather(input, output),
            Path::Staged => staged.all_gather(&self.host, input, output),
        }
    }

    /// Reduces `input` (`size` equal blocks) across ranks; rank `r` gets block `r` in `output`.
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_gather`].
    pub fn reduce_scatter(
        &self,
        input: &DeviceBuf,
        output: &DeviceBuf,
        op: ReduceOp,
    ) -> Result<(), GpuError> {
        check_lengths("reduce_scatter", input, output, self.size(), false)?;
        let call = Self::call(
            Kind::ReduceScatter,
            input.dtype(),
            output.count(),
            Some(op),
            None,
        );
        let mut staged = self.begin("reduce_scatter", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.reduce_scatter(input, output, op),
            Path::Staged => staged.reduce_scatter(&self.host, input, output, op),
        }
    }

    /// Block `j` of this rank's `input` goes to rank `j`; block `i` of `output` comes from
    /// rank `i`.
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_gather`]: both must hold the same multiple of `size`.
    pub fn all_to_all(&self, input: &DeviceBuf, output: &DeviceBuf) -> Result<(), GpuError> {
        let n = self.size();
        if input.dtype() != output.dtype()
            || input.count() != output.count()
            || input.count() % n != 0
        {
            return Err(GpuError::Invalid {
                op: "all_to_all",
                what: format!(
                    "input ({} × {:?}) and output ({} × {:?}) must hold the same multiple of {n} elements of one dtype",
                    input.count(), input.dtype(), output.count(), output.dtype()
                ),
            });
        }
        let call = Self::call(Kind::AllToAll, input.dtype(), input.count(), None, None);
        let mut staged = self.begin("all_to_all", call)?;
        match &self.path {
            Path::Nccl { comm, .. } => comm.all_to_all(input, output),
            Path::Staged => staged.all_to_all(&self.host, input, output),
        }
    }

    /// Returns once every rank has called it (and, on NCCL, once the device has run every
    /// collective queued before it).
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_reduce`].
    pub fn barrier(&self) -> Result<(), GpuError> {
        let call = Call {
            kind: Kind::Barrier,
            dtype: None,
            reduce: None,
            root: None,
            count: 0,
        };
        let _order = self.begin("barrier", call)?;
        match &self.path {
            Path::Nccl { comm, scratch } => {
                comm.all_reduce(&scratch.buf(DType::F32), ReduceOp::Sum)
            }
            Path::Staged => Ok(self.host.barrier()?),
        }
    }

    /// Sends `buf` to `peer` (point-to-point sizes are not fingerprinted: a send without a
    /// matching receive ends at the deadline, naming the op).
    ///
    /// # Errors
    /// As [`GpuCommunicator::all_reduce`], and [`GpuError::Invalid`] for a peer that is this
    /// rank or out of range.
    pub fn send(&self, buf: &DeviceBuf, peer: usize) -> Result<(), GpuError> {
        self.check_rank("send", "peer", peer, true)?;
        let mut staged = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.path {
            Path::Nccl { comm, .. } => comm.send(buf, peer),
            Path::Staged => staged.send(&self.host, buf, peer, 0),
        }
    }

    /// Receives into `buf` what `peer` sent.
    ///
    /// # Errors
    /// As [`GpuCommunicator::send`].
    pub fn recv(&self, buf: &DeviceBuf, peer: usize) -> Result<(), GpuError> {
        self.check_rank("recv", "peer", peer, true)?;
        let mut staged = self
            .order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match &self.path {
            Path::Nccl { comm, .. } => comm.recv(buf, peer),
            Path::Staged => staged.recv(&self.host, buf, peer, 0),
        }
    }
}
