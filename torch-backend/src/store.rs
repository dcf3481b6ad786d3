//! Joining a group through torch's store, which serves as the bootstrap's [`KeyValue`]: the
//! Python half passes an object with `set(key, value)` and `get(key)` (which waits, bounded by
//! the group's timeout) over the store torch gave the backend — a `PrefixStore` over a TCPStore, a FileStore, a HashStore —
//! so sub-groups and jobs launched by torchrun or ferrun bootstrap alike.
//!
//! # Trust
//! Values read back are untrusted (the transports validate them); a Python exception becomes
//! [`StoreError::Foreign`] with its message.

use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use ferrun_collective::comm::{Communicator, Options, StoreWitness};
use ferrun_collective::store::{KeyValue, StoreClient, StoreError};
use ferrun_collective::transport::Auto;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::engine::Comm;

/// torch's store, reached through the Python half's adapter.
pub(crate) struct PyStore {
    /// The adapter: `set(str, bytes)`, `get(str) -> bytes`.
    pub(crate) adapter: Py<PyAny>,
    /// A host and port the store listens on, when torch's store is a TCPStore: the local
    /// address that reaches it is where this rank's TCP links listen.
    pub(crate) address: Option<(String, u16)>,
}

fn foreign(e: PyErr) -> StoreError {
    StoreError::Foreign {
        store: "torch's store".into(),
        what: e.to_string(),
    }
}

impl KeyValue for PyStore {
    async fn set(&mut self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        Python::attach(|py| {
            self.adapter
                .call_method1(py, "set", (key, PyBytes::new(py, value)))
                .map(drop)
        })
        .map_err(foreign)
    }

    async fn get(&mut self, key: &str) -> Result<Vec<u8>, StoreError> {
        Python::attach(|py| {
            let value = self.adapter.call_method1(py, "get", (key,))?;
            value.extract::<Vec<u8>>(py)
        })
        .map_err(foreign)
    }

    fn local_ip(&self) -> std::io::Result<IpAddr> {
        let Some((host, port)) = &self.address else {
            return Ok(IpAddr::V4(Ipv4Addr::LOCALHOST));
        };
        route_to(host, *port)
    }
}

/// The local address the kernel would send from to reach `host:port` (a UDP socket's
/// `connect` sends nothing).
pub(crate) fn route_to(host: &str, port: u16) -> std::io::Result<IpAddr> {
    let target = (host, port).to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{host} resolves to no address"),
        )
    })?;
    if target.ip().is_loopback() {
        return Ok(target.ip());
    }
    let any: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let probe = UdpSocket::bind((any, 0))?;
    probe.connect(target)?;
    Ok(probe.local_addr()?.ip())
}

/// Connects rank `rank` of `size` to its peers through `store`; the communicator, its every
/// receive bounded by `deadline`.
///
/// # Errors
/// What failed, naming the store, the peer or the step.
pub(crate) fn join(
    store: &mut PyStore,
    rank: usize,
    size: usize,
    deadline: Duration,
    witness_prefix: Option<String>,
) -> Result<Comm, String> {
    let runtime = || {
        // No signal driver (`enable_all`): its socket pair would outlive every group.
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(|e| format!("cannot start the bootstrap runtime: {e}"))
    };
    let join = deadline.min(Duration::from_secs(600));
    let transport = runtime()?
        .block_on(Auto::connect(store, rank, size, join))
        .map_err(|e| e.to_string())?;
    let options = Options {
        deadline,
        ..Options::default()
    };
    let comm = Communicator::new(transport, options);
    // Ranks agree on the root cause of a failure in the TCPStore when there is one (a short,
    // bounded client of ferrun's, never a call into Python from the group's thread).
    let (Some((host, port)), Some(prefix)) = (&store.address, witness_prefix) else {
        return Ok(comm);
    };
    let witness_runtime = runtime()?;
    let client = witness_runtime
        .block_on(StoreClient::connect(host, *port, Duration::from_secs(30)))
        .map_err(|e| e.to_string())?
        .prefixed(&prefix);
    Ok(comm.with_witness(Arc::new(StoreWitness::new(witness_runtime, client))))
}
