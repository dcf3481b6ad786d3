//! Creating a communicator from the worker environment contract: the agent store at
//! `MASTER_ADDR:MASTER_PORT` (which `ferrun` hosts) carries every rank's address.

use std::time::Duration;

use super::{Communicator, Options};
use crate::env::{EnvError, WorkerEnv};
use crate::store::{StoreClient, StoreError};
use crate::transport::tcp::{BootstrapError, TcpTransport};

/// Why a communicator could not be created.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// The environment contract is missing or malformed.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// The agent store is unreachable.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The mesh could not be built.
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    /// No runtime for the bootstrap.
    #[error("cannot start the bootstrap runtime: {0}")]
    Runtime(std::io::Error),
}

impl Communicator<TcpTransport> {
    /// A communicator of every worker of the job, named `name` (several may coexist), from
    /// the environment `ferrun` (or torchrun) gives each worker.
    ///
    /// # Errors
    /// [`InitError`] naming the variable, the store address or the peer that failed.
    pub fn from_env(name: &str, options: Options) -> Result<Self, InitError> {
        let env = WorkerEnv::from_env()?;
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
        let transport = runtime.block_on(async {
            let store = StoreClient::connect(&env.master_addr, env.master_port, join).await?;
            // Per attempt, so that a restarted group never meets the addresses of the last one.
            let mut store =
                store.prefixed(&format!("ferrun/comm/{name}/attempt_{}", env.restart_count));
            let transport =
                TcpTransport::connect(&mut store, env.rank as usize, env.world_size as usize, join)
                    .await?;
            Ok::<_, InitError>(transport)
        })?;
        Ok(Self::new(transport, options))
    }
}
