//! Creating a communicator from the worker environment contract: the agent store at
//! `MASTER_ADDR:MASTER_PORT` (which `ferrun` hosts) carries every rank's address.
//!
//! The transport is chosen per pair of ranks: shared memory between ranks on one host (same
//! boot id, network namespace and user), TCP between hosts; `FERRUN_TRANSPORT=tcp` or `=shm` (one
//! host only) forces one for every pair.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Communicator, Options, Witness};
use crate::env::{EnvError, WorkerEnv};
use crate::store::{KeyValue, StoreClient, StoreError};
use crate::transport::mixed::Mixed;
use crate::transport::shm::{ShmError, ShmTransport};
use crate::transport::tcp::{BootstrapError, TcpTransport};
use crate::transport::Auto;

/// Why a communicator could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The environment contract is missing or malformed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The agent store is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TCP mesh could not be built.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// The shared-memory segments could not be set up.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// `FERRUN_TRANSPORT` names no transport, or asks for shared memory across hosts.
    #[error("FERRUN_TRANSPORT={0:?}: use tcp, shm (all ranks on one host) or auto")]
    Transport(String),
    /// No runtime for the bootstrap.
    #[error("cannot start the bootstrap runtime: {0}")]
    Runtime(std::io::Error),
}

impl Communicator<Auto> {
    /// A communicator of every worker of the job, named `name` (several may coexist), from
    /// the environment `ferrun` (or torchrun) gives each worker.
    ///
    /// # Errors
    /// [`InitError`] naming the variable, the store address or the peer that failed.
    pub fn from_env(name: &str, mut options: Options) -> Result<Self, InitError> {
        let env = WorkerEnv::from_env()?;
        // For measuring the algorithm switch on a machine (see `ferrun-bench`).
        if let Some(bytes) = std::env::var("FERRUN_SMALL_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            options.small_bytes = bytes;
        }
        Self::from_contract(&env, name, options)
    }

    /// As [`Communicator::from_env`], from an explicit contract.
    ///
    /// # Errors
    /// As [`Communicator::from_env`].
    pub fn from_contract(env: &WorkerEnv, name: &str, options: Options) -> Result<Self, InitError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(InitError::Runtime)?;
        let join = options.deadline.min(Duration::from_secs(600));
        let (rank, size) = (env.rank as usize, env.world_size as usize);
        let transport = runtime.block_on(async {
            let store = StoreClient::connect(&env.master_addr, env.master_port, join).await?;
            // Per attempt, so that a restarted group never meets the addresses of the last one.
            let mut store =
                store.prefixed(&format!("ferrun/comm/{name}/attempt_{}", env.restart_count));
            let transport = Auto::connect(&mut store, rank, size, join).await?;
            Ok::<_, InitError>((transport, store))
        })?;
        let (transport, store) = transport;
        let witness = StoreWitness::new(runtime, store);
        Ok(Self::new(transport, options).with_witness(Arc::new(witness)))
    }
}

impl Auto {
    /// Connects rank `rank` of `size` to its peers, through addresses published in `store`:
    /// shared memory between ranks on one host, TCP between hosts (or what
    /// `FERRUN_TRANSPORT` forces). Every rank of the group calls it with the same store.
    ///
    /// # Errors
    /// As [`Communicator::from_env`].
    pub async fn connect(
        store: &mut impl KeyValue,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<Self, InitError> {
        let forced = std::env::var("FERRUN_TRANSPORT")
            .ok()
            .filter(|t| !t.is_empty() && t != "auto");
        store
            .set(&format!("host/{rank}"), host_identity().as_bytes())
            .await?;
        let keys: Vec<String> = (0..size).map(|r| format!("host/{r}")).collect();
        let hosts = store.get_all(&keys).await?;
        let one_host = hosts.windows(2).all(|w| w[0] == w[1]);
        Ok(match (forced.as_deref(), one_host) {
            (Some("shm"), true) | (None, true) => {
                Auto::Shm(ShmTransport::connect(store, rank, size, timeout).await?)
            }
            (Some("tcp"), _) => Auto::Tcp(TcpTransport::connect(store, rank, size, timeout).await?),
            (None, false) => {
                // Several hosts: TCP between every pair of hosts, shared memory within a host
                // that holds more than one rank.
                let tcp = TcpTransport::connect(store, rank, size, timeout).await?;
                let group: Vec<usize> = (0..size).filter(|&r| hosts[r] == hosts[rank]).collect();
                if group.len() > 1 {
                    let shm = ShmTransport::connect_group(store, group, rank, timeout).await?;
                    Auto::Mixed(Mixed::new(shm, tcp, &hosts))
                } else {
                    Auto::Tcp(tcp)
                }
            }
            (Some(other), _) => return Err(InitError::Transport(other.to_owned())),
        })
    }
}

/// How long recording a failure in the store may take (it is on the way to an error).
const WITNESS_TIMEOUT: Duration = Duration::from_secs(2);

/// The job's first failure, recorded in the agent store under the communicator's prefix.
#[derive(Debug)]
pub struct StoreWitness {
    runtime: tokio::runtime::Runtime,
    store: Mutex<StoreClient>,
}

impl StoreWitness {
    /// A witness that records under `store`'s prefix, driven by `runtime` (a current-thread
    /// runtime of the caller's).
    pub fn new(runtime: tokio::runtime::Runtime, mut store: StoreClient) -> Self {
        store.set_timeout(WITNESS_TIMEOUT);
        Self {
            runtime,
            store: Mutex::new(store),
        }
    }
}

impl Witness for StoreWitness {
    fn first(&self, cause: &str) -> Option<String> {
        let mut store = self
            .store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let first = self
            .runtime
            .block_on(store.compare_set("failure", b"", cause.as_bytes()));
        match first {
            Ok(value) => String::from_utf8(value).ok(),
            Err(e) => {
                tracing::warn!("cannot record the failure in the store: {e}");
                None
            }
        }
    }
}

/// What makes two ranks able to share memory: the same kernel boot (one machine), the same
/// network namespace (segments are handed over on abstract Unix sockets, which live in it) and
/// the same user (segments are this user's). PID namespaces and `/dev/shm` mounts do not
/// matter: segments have no file name, and liveness is a lock, not a pid.
pub(crate) fn host_identity() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let netns = std::fs::read_link("/proc/self/ns/net")
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!("{}|{netns}|uid {}", boot.trim(), nix::unistd::geteuid())
}
